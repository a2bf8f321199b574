"""A bundle on disk: `manifest.json` + graph files, checked before anything runs.

The manifest vouches for every file (sha256 and size); a file it does not list, a missing file,
a changed byte, an unknown format version or a graph whose inputs/outputs differ from the
manifest's contract is a `BundleError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path

from .contract import GRAPHS
from .errors import PrologueError
from .settings import SamplingConfig, VocabLayout

MANIFEST = "manifest.json"
FORMAT = "prologue-export-bundle"
FORMAT_VERSION = 2  # 2: ar_step takes its KV cache per layer (k_cache_0 ..)


class BundleError(PrologueError, RuntimeError):
    """A bundle that cannot be trusted or used as it is."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """Parsed, verified manifest of a bundle folder."""

    def __init__(self, path, check_hashes: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(f"bundle folder {self.path} does not exist")
        if not manifest_path.is_file():
            raise BundleError(f"{self.path} has no {MANIFEST}: not a prologue-export bundle "
                              "(write one with `prologue export --checkpoint CKPT --out DIR`)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise BundleError(f"{manifest_path}: format {m.get('format')!r} is not {FORMAT!r}")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{manifest_path}: format version {m.get('format_version')!r} is not supported "
                              f"(this runtime reads version {FORMAT_VERSION}); re-export the bundle or upgrade "
                              "prologue-export")
        try:
            self.vocab = VocabLayout(**{k: m["vocab"][k] for k in (
                "visual_codebook_size", "prologue_codebook_size", "num_prologue_tokens", "num_visual_tokens")})
            self.sampling_defaults = SamplingConfig.from_dict(m["sampling_defaults"])
            self.num_classes = int(m["num_classes"])
            self.image_size = int(m["image"]["size"])
            self.channels = int(m["image"]["channels"])
            self.graphs: typing.Dict[str, dict] = dict(m["graphs"])
            self.files: typing.Dict[str, dict] = dict(m["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest_path} is incomplete or malformed ({exc!r}); re-export the bundle") from None
        self._check_derived_vocab(manifest_path)
        root = self.path.resolve()
        for name in self.files:
            target = (self.path / name).resolve()
            if Path(name).is_absolute() or ".." in Path(name).parts or root not in target.parents:
                raise BundleError(f"{manifest_path} names a file outside the bundle folder ({name!r}); refusing it")
        for name, graph in self.graphs.items():
            if name not in GRAPHS:
                raise BundleError(f"{manifest_path}: unknown graph {name!r}")
            if graph.get("file") not in self.files:
                raise BundleError(f"{manifest_path}: graph {name!r} file {graph.get('file')!r} is not listed in files")
        if check_hashes:
            self.verify_files()

    def _check_derived_vocab(self, manifest_path: Path) -> None:
        """The manifest's derived vocabulary fields (offsets, EOS, V, T) must be what the layout
        gives: a bundle that disagrees with itself is refused rather than half trusted."""
        v, written = self.vocab, self.manifest["vocab"]
        derived = {"prologue_offset": v.prologue_offset, "eos_id": v.eos_id, "vocab_size": v.vocab_size,
                   "seq_len": v.seq_len, "input_bos_offset": v.vocab_size}
        wrong = [f"{k} {written.get(k, 'missing')!r} (expected {want!r})" for k, want in derived.items()
                 if k not in written or written[k] != want]
        if wrong:
            raise BundleError(f"{manifest_path}: vocab fields contradict the layout: {', '.join(wrong)}; re-export the bundle")

    @property
    def null_class(self) -> int:
        return self.num_classes

    def verify_files(self) -> None:
        present = {p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()}
        present.discard(MANIFEST)
        unlisted = sorted(present - set(self.files))
        if unlisted:
            raise BundleError(f"{self.path} holds files its manifest does not vouch for: {', '.join(unlisted[:5])}; "
                              "remove them or re-export the bundle")
        for name, info in sorted(self.files.items()):
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"{self.path} is missing {name}, which its manifest lists; re-export the bundle")
            if file.stat().st_size != info.get("bytes"):
                raise BundleError(f"{file} has {file.stat().st_size} bytes, the manifest says {info.get('bytes')}: "
                                  "the file was modified or truncated; re-export the bundle")
            if sha256_file(file) != info.get("sha256"):
                raise BundleError(f"{file} does not match the sha256 in the manifest: the file was modified; "
                                  "re-export the bundle")

    def graph_file(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"the bundle {self.path} has no {name!r} graph (it has: {', '.join(self.graphs)})")
        return self.path / self.graphs[name]["file"]

    def ar_cache_shape(self, rows: int) -> typing.Tuple[int, ...]:
        a = self.manifest["ar"]
        return (a["layers"], rows, a["heads"], a["max_seq_len"], a["head_dim"])


def check_signature(name: str, contract: dict, inputs, outputs) -> None:
    """Compare a loaded graph's I/O (name, dtype, rank, static dims) with the manifest's contract.

    inputs/outputs: sequences of (name, dtype_name, shape) with None or strings for dynamic dims.
    """
    for kind, declared, actual in (("input", contract["inputs"], inputs), ("output", contract["outputs"], outputs)):
        got = {n: (d, s) for n, d, s in actual}
        want = [d["name"] for d in declared]
        if sorted(got) != sorted(want):
            raise BundleError(f"graph {name!r}: {kind}s are {sorted(got)}, the manifest says {sorted(want)}; "
                              "re-export the bundle")
        for spec in declared:
            dtype, shape = got[spec["name"]]
            if dtype != spec["dtype"]:
                raise BundleError(f"graph {name!r} {kind} {spec['name']!r} is {dtype}, the manifest says {spec['dtype']}")
            if len(shape) != len(spec["shape"]):
                raise BundleError(f"graph {name!r} {kind} {spec['name']!r} has rank {len(shape)}, the manifest says "
                                  f"{len(spec['shape'])}")
            for dim, want_dim in zip(shape, spec["shape"]):
                if isinstance(want_dim, int) and isinstance(dim, int) and dim != want_dim:
                    raise BundleError(f"graph {name!r} {kind} {spec['name']!r} has shape {shape}, the manifest says "
                                      f"{spec['shape']}")
