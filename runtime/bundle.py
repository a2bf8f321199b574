"""A bundle on disk: `manifest.json` + graph files, checked before anything runs.

The manifest vouches for every file (sha256 and size); a file it does not list, a missing file,
a changed byte, an unknown format version, a symlink or special file in the folder, a manifest
field of the wrong type or out of range, or a graph contract that is not the runtime's contract
for the manifest's sizes is a one-line `BundleError` that says what is wrong and how to fix it.

Hostile input (docs/runtime.md): the manifest is strict JSON read with `parse_json` (no NaN /
Infinity, at most 16 MiB, 32 levels deep) and validated field by field, with these bounds
(`LIMITS`): max_batch <= 4096, ar layers / heads <= 1024, head_dim <= 4096, sequence lengths
<= 65536, codebooks <= 2^20 entries, image size <= 4096 with 1..4 channels, num_classes <= 10^6,
at most 1024 files of at most 1 TiB each, file names a single path component (bundles are flat),
and a KV cache of at most `MAX_KV_CACHE_BYTES` (64 GiB) for the max batch, checked before anything
is allocated. The `tensorrt` section (the ONNX files engines are built from) is checked as strictly:
precisions, graph names, file names (the graph's own file or `<graph>.<precision>.trt.onnx`, listed
in `files`), counts and profiles (every input of the graph, min <= opt <= max, the contract's static
sizes), so `prologue build-engines` and `--print-trtexec` never meet a malformed one.

Outputs are checked against the contract too (`check_outputs`, `check_tokens`): a graph whose
output has another shape or dtype than the contract gives for the call's sizes, or whose sampled
tokens lie outside the vocabulary, is a one-line `BundleError` naming the graph.

A loaded bundle is immutable for its users: `read_verified(name)` reads a file once (never
through a symlink), checks its size and sha256 against the manifest and returns those bytes, so
a backend builds its session or engine from exactly the bytes that were checked; a file swapped
after `Bundle(...)` is refused when it is read, never run.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import typing
from pathlib import Path

from .contract import (AR_STEP, DECODER, DEFAULT_MAX_BATCH, ENGINE_GRAPHS, GRAPHS, PROLOGUE_GENERATOR, ar_step_axes,
                       ar_step_io, batch_axes, decoder_io, prologue_generator_io, resolve_shape, static_axes)
from .errors import PrologueError, short_repr
from .files import FileFormatError, MAX_JSON_BYTES, parse_json
from .settings import ConfigError, SamplingConfig, VocabLayout

MANIFEST = "manifest.json"
FORMAT = "prologue-export-bundle"
FORMAT_VERSION = 2  # 2: ar_step takes its KV cache per layer (k_cache_0 ..)

LIMITS = {"max_batch": 4096, "layers": 1024, "heads": 1024, "head_dim": 4096, "seq_len": 65536,
          "codebook": 1 << 20, "image_size": 4096, "channels": 4, "num_classes": 10**6,
          "files": 1024, "file_bytes": 1 << 40, "name_chars": 255, "tensors": 4096, "rank": 8, "dim": 2**31 - 1}
# The K and V caches of one generation of the max batch with CFG (2 x max_batch rows), float32: 2 x 4 x
# layers x rows x heads x max_seq_len x head_dim bytes. The largest released model (prologue-*-xl: 32 layers,
# 20 heads of 64, T = 273) needs 89 MB a row, 1.4 GB at the default max batch 8 and reaches this bound at
# max batch 384; each dimension within LIMITS can still multiply to petabytes, refused before any allocation.
MAX_KV_CACHE_BYTES = 64 * 1024**3
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")  # TensorRT engines: the precision of their weight matmuls
MAX_NODE_COUNT = 10**7  # counts of rewritten nodes recorded in the tensorrt section
DTYPES = ("int64", "int32", "float32", "float16", "bfloat16", "uint8", "int8", "bool")
SHA256 = re.compile(r"[0-9a-f]{64}")
_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
               float: "a number", type(None): "null"}


class BundleError(PrologueError, RuntimeError):
    """A bundle that cannot be trusted or used as it is."""


def tensorrt_onnx_name(graph: str, precision: str) -> str:
    """The file a `precision` TensorRT engine of `graph` is built from when the graph needs rewriting."""
    return f"{graph}.{precision}.trt.onnx"


def kv_cache_bytes(ar: dict, rows: int) -> int:
    """Bytes of one generation's K and V caches (float32) of `rows` rows for the manifest's `ar` sizes."""
    return 2 * 4 * rows * math.prod(int(ar[k]) for k in ("layers", "heads", "max_seq_len", "head_dim"))


def _show(value) -> str:
    """A JSON value in an error message: `null`, or its short repr."""
    return "null" if value is None else short_repr(value, 40)


def _open_nofollow(path: Path) -> int:
    """A read-only descriptor of the regular file at `path`; a symlink (O_NOFOLLOW), a FIFO or a
    device is refused (O_NONBLOCK: opening a FIFO must not hang)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise BundleError(f"{path} is a symlink; a bundle must not contain symlinks (copy the real file)") from None
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path} is not a regular file; a bundle holds only regular files")
    return fd


class _Fields:
    """Typed access to the parsed manifest: every failure is one line naming the field."""

    def __init__(self, where: Path):
        self.where = where

    def fail(self, field: str, problem: str) -> typing.NoReturn:
        raise BundleError(f"{self.where}: manifest field {field} {problem}; re-export the bundle")

    def get(self, obj: dict, key: str, field: str, kind: type, required: bool = True):
        if key not in obj:
            if required:
                self.fail(field, "is missing")
            return None
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(field, f"must be {_JSON_KINDS[kind]}, got {_show(value)}")
        return value

    def int_(self, obj: dict, key: str, field: str, lo: int, hi: int, required: bool = True):
        value = self.get(obj, key, field, int, required)
        if value is not None and not lo <= value <= hi:
            self.fail(field, f"must be an integer in [{lo}, {hi}], got {value}")
        return value

    def str_(self, obj: dict, key: str, field: str, required: bool = True, max_chars: int = 255):
        value = self.get(obj, key, field, str, required)
        if value is not None and (len(value) > max_chars or not value.isprintable()):
            self.fail(field, f"must be a printable string of at most {max_chars} characters, got {_show(value)}")
        return value


class Bundle:
    """Parsed, validated manifest of a bundle folder; `read_verified` hands out checked bytes."""

    def __init__(self, path, check_hashes: bool = True, digest: typing.Optional[str] = None):
        """check_hashes: verify every file's size and sha256 now (a damaged bundle is refused here;
        each file is verified again whenever a backend reads it); digest: the expected sha256 of
        manifest.json (`Bundle(...).digest`), which pins the whole bundle: the manifest is the root
        of trust, and it vouches for every other file."""
        self.path = Path(path)
        self._outputs: typing.Dict[str, dict] = {}  # graph -> its output specs (`check_output`)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(f"bundle folder {self.path} does not exist")
        present = self._scan()
        if MANIFEST not in present:
            raise BundleError(f"{self.path} has no {MANIFEST}: not a prologue-export bundle "
                              "(write one with `prologue export --checkpoint CKPT --out DIR`)")
        data = self._read_manifest(manifest_path)
        self.digest = hashlib.sha256(data).hexdigest()
        if digest is not None and digest != self.digest:
            raise BundleError(f"{manifest_path} has sha256 {self.digest}, not the expected {digest}: this is not "
                              "the bundle you pinned")
        try:
            self.manifest = parse_json(data, str(manifest_path))
        except FileFormatError as exc:
            raise BundleError(f"{exc}; re-export the bundle") from None
        f = _Fields(manifest_path)
        self._validate_header(f)
        self._validate_sizes(f)
        self._validate_files(f)
        self._validate_graphs(f)
        self._validate_engines(f)
        self._validate_tensorrt(f)
        if check_hashes:
            self.verify_files(present)

    # -- the folder ------------------------------------------------------------------------------

    def _scan(self) -> typing.Set[str]:
        """Names (relative, posix) of the regular files under the folder. A symlink anywhere (file
        or folder: `rglob` and hashing would follow or skip it) or a special file is refused."""
        found: typing.Set[str] = set()

        def fail(exc: OSError):
            raise BundleError(f"cannot list {exc.filename or self.path}: {exc.strerror or exc}")

        try:
            for top, dirs, files in os.walk(self.path, onerror=fail, followlinks=False):
                for name in dirs + files:
                    full = Path(top, name)
                    rel = full.relative_to(self.path).as_posix()
                    mode = os.lstat(full).st_mode
                    if stat.S_ISLNK(mode):
                        raise BundleError(f"{self.path} holds a symlink, {rel}; a bundle must not contain symlinks "
                                          "(copy the real files in, or re-export the bundle)")
                    if stat.S_ISREG(mode):
                        found.add(rel)
                    elif not stat.S_ISDIR(mode):
                        raise BundleError(f"{self.path} holds {rel}, which is not a regular file; remove it or "
                                          "re-export the bundle")
                if len(found) > 4 * LIMITS["files"]:
                    raise BundleError(f"{self.path} holds more than {4 * LIMITS['files']} files: not a bundle")
        except OSError as exc:
            fail(exc)
        return found

    @staticmethod
    def _read_manifest(manifest_path: Path) -> bytes:
        fd = _open_nofollow(manifest_path)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise BundleError(f"{manifest_path} is larger than {MAX_JSON_BYTES // 1024**2} MiB; refusing to parse it "
                              "(re-export the bundle)")
        return data

    # -- the manifest ----------------------------------------------------------------------------

    def _validate_header(self, f: _Fields) -> None:
        m = self.manifest
        if m.get("format") != FORMAT:
            raise BundleError(f"{f.where}: format {_show(m.get('format'))} is not {FORMAT!r}: not a prologue-export "
                              "bundle manifest (re-export the bundle)")
        version = m.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise BundleError(f"{f.where}: format version {_show(version)} is not supported (this runtime reads version "
                              f"{FORMAT_VERSION}); re-export the bundle or upgrade prologue-export")
        for key in ("producer", "model", "verification", "tensorrt"):
            f.get(m, key, key, dict, required=False)

    def _validate_sizes(self, f: _Fields) -> None:
        """num_classes, vocab, image, max_batch, precision, ar and sampling_defaults: types, ranges
        and the derived fields."""
        m, seq = self.manifest, LIMITS["seq_len"]
        self.num_classes = f.int_(m, "num_classes", "num_classes", 1, LIMITS["num_classes"])
        if "null_class" in m and f.int_(m, "null_class", "null_class", 0, LIMITS["num_classes"]) != self.num_classes:
            f.fail("null_class", f"must equal num_classes ({self.num_classes}), got {m['null_class']}")
        vocab = f.get(m, "vocab", "vocab", dict)
        sizes = {"visual_codebook_size": (1, LIMITS["codebook"]), "prologue_codebook_size": (0, LIMITS["codebook"]),
                 "num_prologue_tokens": (0, seq), "num_visual_tokens": (1, seq)}
        self.vocab = VocabLayout(**{k: f.int_(vocab, k, f"vocab.{k}", lo, hi) for k, (lo, hi) in sizes.items()})
        if (self.vocab.prologue_codebook_size > 0) != self.vocab.has_prologue:
            f.fail("vocab.prologue_codebook_size", "and vocab.num_prologue_tokens must both be 0 (no prologue) or both "
                   f"positive, got {self.vocab.prologue_codebook_size} and {self.vocab.num_prologue_tokens}")
        if self.vocab.seq_len > seq:
            f.fail("vocab", f"gives a sequence of {self.vocab.seq_len} tokens, more than {seq}")
        self._check_derived_vocab(f.where)
        image = f.get(m, "image", "image", dict)
        self.image_size = f.int_(image, "size", "image.size", 1, LIMITS["image_size"])
        self.channels = f.int_(image, "channels", "image.channels", 1, LIMITS["channels"])
        f.int_(image, "patch_size", "image.patch_size", 1, self.image_size, required=False)
        self.precision = f.str_(m, "precision", "precision", required=False, max_chars=16) or "fp32"
        self.max_batch = f.int_(m, "max_batch", "max_batch", 1, LIMITS["max_batch"], required=False) or DEFAULT_MAX_BATCH
        self.ar = None
        if "ar" in m:
            ar = f.get(m, "ar", "ar", dict)
            self.ar = {k: f.int_(ar, k, f"ar.{k}", 1, hi) for k, hi in (
                ("layers", LIMITS["layers"]), ("heads", LIMITS["heads"]), ("head_dim", LIMITS["head_dim"]),
                ("max_seq_len", seq))}
            if self.ar["max_seq_len"] != self.vocab.seq_len:
                f.fail("ar.max_seq_len", f"must equal vocab.seq_len ({self.vocab.seq_len}), got {self.ar['max_seq_len']}")
            cache = kv_cache_bytes(self.ar, 2 * self.max_batch)
            if cache > MAX_KV_CACHE_BYTES:
                f.fail("ar", f"sizes give a KV cache of {cache / 1024**3:.3g} GiB for max_batch {self.max_batch} "
                       f"(layers x 2 x max_batch rows x heads x max_seq_len x head_dim x 8 bytes), more than "
                       f"{MAX_KV_CACHE_BYTES // 1024**3} GiB")
        defaults = f.get(m, "sampling_defaults", "sampling_defaults", dict)
        try:
            self.sampling_defaults = SamplingConfig.from_dict(defaults)
        except (ConfigError, TypeError, ValueError, OverflowError) as exc:
            f.fail("sampling_defaults", f"is invalid ({' '.join(str(exc).split())[:200]})")

    def _check_derived_vocab(self, manifest_path: Path) -> None:
        """The manifest's derived vocabulary fields (offsets, EOS, V, T) must be what the layout
        gives: a bundle that disagrees with itself is refused rather than half trusted."""
        v, written = self.vocab, self.manifest["vocab"]
        derived = {"prologue_offset": v.prologue_offset, "eos_id": v.eos_id, "vocab_size": v.vocab_size,
                   "seq_len": v.seq_len, "input_bos_offset": v.vocab_size}
        wrong = [f"{k} {_show(written.get(k, 'missing'))} (expected {want!r})" for k, want in derived.items()
                 if k not in written or type(written[k]) is not type(want) or written[k] != want]
        if wrong:
            raise BundleError(f"{manifest_path}: vocab fields contradict the layout: {', '.join(wrong)}; re-export the bundle")

    def _validate_files(self, f: _Fields) -> None:
        files = f.get(self.manifest, "files", "files", dict)
        if len(files) > LIMITS["files"]:
            f.fail("files", f"lists {len(files)} files, more than {LIMITS['files']}")
        for name, info in files.items():
            if (not name or len(name) > LIMITS["name_chars"] or not name.isprintable() or name in (".", "..", MANIFEST)
                    or "/" in name or "\\" in name or Path(name).is_absolute()):
                raise BundleError(f"{f.where} names a file outside the bundle folder, in a sub-folder or otherwise not a "
                                  f"plain file name ({_show(name)}); bundles are flat: refusing it (re-export the bundle)")
            if not isinstance(info, dict):
                f.fail(f"files[{name!r}]", f"must be an object, got {_show(info)}")
            digest = f.get(info, "sha256", f"files[{name!r}].sha256", str)
            if not SHA256.fullmatch(digest):
                f.fail(f"files[{name!r}].sha256", f"must be 64 lowercase hex digits, got {_show(digest)}")
            f.int_(info, "bytes", f"files[{name!r}].bytes", 0, LIMITS["file_bytes"])
        self.files: typing.Dict[str, dict] = dict(files)

    def _validate_entry(self, f: _Fields, field: str, name: str, entry, known, unknown: str) -> None:
        """A `graphs` / `engines` entry: a known graph name, an object, a `file` listed in files."""
        if name not in known:
            f.fail(field, f"{unknown}{', '.join(known)})")
        if not isinstance(entry, dict):
            f.fail(field, f"must be an object, got {_show(entry)}")
        file = f.str_(entry, "file", f"{field}.file")
        if file not in self.files:
            f.fail(f"{field}.file", f"names {file!r}, which is not listed in files")

    def _validate_graphs(self, f: _Fields) -> None:
        graphs = f.get(self.manifest, "graphs", "graphs", dict)
        for name, graph in graphs.items():
            field = f"graphs.{name}"
            self._validate_entry(f, field, name, graph, GRAPHS, "is an unknown graph (this runtime knows")
            for key in ("precision", "weights"):
                f.str_(graph, key, f"{field}.{key}", required=False, max_chars=16)
            for key in ("inputs", "outputs"):
                self._validate_specs(f, graph, key, f"{field}.{key}")
            axes = f.get(graph, "dynamic_axes", f"{field}.dynamic_axes", dict, required=False) or {}
            for axis, r in axes.items():
                if not isinstance(r, dict):
                    f.fail(f"{field}.dynamic_axes.{axis}", f"must be an object, got {_show(r)}")
                lo, opt, hi = (f.int_(r, k, f"{field}.dynamic_axes.{axis}.{k}", 1, LIMITS["dim"]) for k in ("min", "opt", "max"))
                if not lo <= opt <= hi:
                    f.fail(f"{field}.dynamic_axes.{axis}", f"must have min <= opt <= max, got {lo}, {opt}, {hi}")
        if any(g.startswith(AR_STEP) for g in graphs) and self.ar is None:
            f.fail("ar", "is missing (the bundle has an AR graph)")
        self.graphs: typing.Dict[str, dict] = dict(graphs)
        for name in self.graphs:
            self._check_contract(f, name)

    @staticmethod
    def _validate_specs(f: _Fields, graph: dict, key: str, field: str) -> None:
        specs = f.get(graph, key, field, list)
        if len(specs) > LIMITS["tensors"]:
            f.fail(field, f"lists {len(specs)} tensors, more than {LIMITS['tensors']}")
        names = set()
        for i, spec in enumerate(specs):
            where = f"{field}[{i}]"
            if not isinstance(spec, dict):
                f.fail(where, f"must be an object, got {_show(spec)}")
            name = f.str_(spec, "name", f"{where}.name")
            if name in names:
                f.fail(f"{where}.name", f"repeats {name!r}")
            names.add(name)
            dtype = f.str_(spec, "dtype", f"{where}.dtype", max_chars=16)
            if dtype not in DTYPES:
                f.fail(f"{where}.dtype", f"must be one of {', '.join(DTYPES)}, got {_show(dtype)}")
            shape = f.get(spec, "shape", f"{where}.shape", list)
            if len(shape) > LIMITS["rank"]:
                f.fail(f"{where}.shape", f"has rank {len(shape)}, more than {LIMITS['rank']}")
            for j, d in enumerate(shape):
                static = isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= LIMITS["dim"]
                if not static and not (isinstance(d, str) and 0 < len(d) <= 64 and d.isidentifier()):
                    f.fail(f"{where}.shape[{j}]", f"must be a size in [0, 2^31) or an axis name, got {_show(d)}")

    def expected_contract(self, graph: str):
        """(inputs, outputs, dynamic axes) that this runtime feeds and reads for `graph`, from the
        manifest's sizes (vocab, image, ar, max_batch) and `runtime/contract.py`."""
        v, c, size = self.vocab, self.channels, self.image_size
        if graph == DECODER:
            return static_axes(*decoder_io(c, size, v.num_visual_tokens), batch_axes(self.max_batch))
        if graph == PROLOGUE_GENERATOR:
            return static_axes(*prologue_generator_io(c, size, v.num_prologue_tokens, v.num_visual_tokens),
                               batch_axes(self.max_batch))
        a = self.ar
        return static_axes(*ar_step_io(a["layers"], a["heads"], a["head_dim"], a["max_seq_len"], v.vocab_size),
                           ar_step_axes(self.max_batch, v.seq_len))

    def _check_contract(self, f: _Fields, name: str) -> None:
        """The manifest's contract of a graph must be the runtime's: the same tensor names and
        dtypes, and the same shapes (static sizes equal, dynamic dimensions named by the runtime's
        axis: engine profiles and output checks are derived from them; the graph itself is checked
        against the manifest when it is loaded, `check_signature`); dynamic axes within the
        runtime's ranges."""
        graph, (inputs, outputs, axes) = self.graphs[name], self.expected_contract(name)
        for key, expected in (("inputs", inputs), ("outputs", outputs)):
            declared = {s["name"]: s for s in graph[key]}
            want = {s.name for s in expected}
            if set(declared) != want:
                missing, extra = sorted(want - set(declared))[:3], sorted(set(declared) - want)[:3]
                f.fail(f"graphs.{name}.{key}", f"are not this runtime's (missing {missing}, unexpected {extra})")
            for spec in expected:
                got, field = declared[spec.name], f"graphs.{name}.{key}.{spec.name}"
                if got["dtype"] != spec.dtype:
                    f.fail(f"{field}.dtype", f"is {got['dtype']}, the runtime's contract says {spec.dtype}")
                if len(got["shape"]) != len(spec.shape) or any(g != w for g, w in zip(got["shape"], spec.shape)):
                    f.fail(f"{field}.shape", f"is {got['shape']}, the runtime's contract says {spec.shape}")
        declared_axes = graph.get("dynamic_axes", {})
        for axis, r in declared_axes.items():
            if axis not in axes or r["min"] < axes[axis].min or r["max"] > axes[axis].max:
                allowed = f"[{axes[axis].min}, {axes[axis].max}]" if axis in axes else "none"
                f.fail(f"graphs.{name}.dynamic_axes.{axis}", f"is outside the runtime's range ({allowed})")
        if set(declared_axes) != set(axes):
            f.fail(f"graphs.{name}.dynamic_axes", f"names {sorted(declared_axes)}, the runtime's contract {sorted(axes)}")

    def _validate_engines(self, f: _Fields) -> None:
        self.engines = f.get(self.manifest, "engines", "engines", dict, required=False) or {}
        batches = []
        for graph, meta in self.engines.items():
            field = f"engines.{graph}"
            self._validate_entry(f, field, graph, meta, ENGINE_GRAPHS, "is not a graph with an engine (")
            batches.append(f.int_(meta, "max_batch", f"{field}.max_batch", 1, LIMITS["max_batch"], required=False)
                           or DEFAULT_MAX_BATCH)
            f.int_(meta, "top_k_max", f"{field}.top_k_max", 1, LIMITS["dim"], required=False)
            for key in ("precision", "tensorrt_version", "compute_capability", "device"):
                f.str_(meta, key, f"{field}.{key}", required=False)
            f.get(meta, "profile", f"{field}.profile", dict, required=False)
        # the largest batch every TensorRT engine's profile takes (None without engines)
        self.engine_max_batch = min(batches) if batches else None

    def _validate_tensorrt(self, f: _Fields) -> None:
        """`tensorrt.<precision>`: the ONNX files engines are built from (`prologue build-engines`)."""
        self.tensorrt = f.get(self.manifest, "tensorrt", "tensorrt", dict, required=False) or {}
        for precision, section in self.tensorrt.items():
            if precision not in ENGINE_PRECISIONS:
                f.fail(f"tensorrt[{_show(precision)}]", f"is not an engine precision ({', '.join(ENGINE_PRECISIONS)})")
            field = f"tensorrt.{precision}"
            if not isinstance(section, dict):
                f.fail(field, f"must be an object, got {_show(section)}")
            f.str_(section, "operators_table", f"{field}.operators_table")
            f.int_(section, "max_batch", f"{field}.max_batch", 1, LIMITS["max_batch"])
            graphs = f.get(section, "graphs", f"{field}.graphs", dict)
            if not graphs:
                f.fail(f"{field}.graphs", "lists no graph")
            for graph, entry in graphs.items():
                if graph not in ENGINE_GRAPHS or graph not in self.graphs:
                    f.fail(f"{field}.graphs[{_show(graph)}]", "is not a graph of this bundle that engines are built "
                           f"for ({', '.join(g for g in ENGINE_GRAPHS if g in self.graphs)})")
                self._validate_tensorrt_entry(f, f"{field}.graphs.{graph}", precision, graph, entry)

    def _validate_tensorrt_entry(self, f: _Fields, field: str, precision: str, graph: str, entry) -> None:
        if not isinstance(entry, dict):
            f.fail(field, f"must be an object, got {_show(entry)}")
        own = self.graphs[graph]["file"]
        if f.str_(entry, "source", f"{field}.source") != own:
            f.fail(f"{field}.source", f"must be the graph's file {own!r}, got {_show(entry['source'])}")
        onnx = f.str_(entry, "onnx", f"{field}.onnx")
        if onnx not in (own, tensorrt_onnx_name(graph, precision)):
            f.fail(f"{field}.onnx", f"must be {own!r} or {tensorrt_onnx_name(graph, precision)!r}, got {_show(onnx)}")
        if onnx not in self.files:
            f.fail(f"{field}.onnx", f"names {onnx!r}, which is not listed in files")
        for key in ("inlined_ifs", "reduced_matmuls"):
            f.int_(entry, key, f"{field}.{key}", 0, MAX_NODE_COUNT)
        f.int_(entry, "top_k_max", f"{field}.top_k_max", 1, LIMITS["dim"], required=False)
        f.get(entry, "top_k_capped", f"{field}.top_k_capped", bool, required=False)
        self._validate_profile(f, f"{field}.profile", graph, f.get(entry, "profile", f"{field}.profile", dict))

    def _validate_profile(self, f: _Fields, field: str, graph: str, profile: dict) -> None:
        """min/opt/max of every input of `graph`: its rank, its static sizes, min <= opt <= max."""
        specs = {s["name"]: s["shape"] for s in self.graphs[graph]["inputs"]}
        if set(profile) != set(specs):
            missing, extra = sorted(set(specs) - set(profile))[:3], sorted(set(profile) - set(specs))[:3]
            f.fail(field, f"must give every input of {graph} (missing {missing}, unexpected {[_show(e) for e in extra]})")
        for name, shapes in profile.items():
            where, spec = f"{field}.{name}", specs[name]
            if not isinstance(shapes, dict) or set(shapes) != {"min", "opt", "max"}:
                f.fail(where, f"must be an object with min, opt and max, got {_show(shapes)}")
            dims = [shapes[k] for k in ("min", "opt", "max")]
            for key, shape in zip(("min", "opt", "max"), dims):
                if not isinstance(shape, list) or len(shape) != len(spec) or not all(
                        type(d) is int and 1 <= d <= LIMITS["dim"] for d in shape):
                    f.fail(f"{where}.{key}", f"must be {len(spec)} sizes in [1, 2^31), got {_show(shape)}")
            for i, (lo, opt, hi) in enumerate(zip(*dims)):
                static = isinstance(spec[i], int)
                if not lo <= opt <= hi or (static and not lo == hi == spec[i]):
                    rule = f"equal the static size {spec[i]}" if static else "have min <= opt <= max"
                    f.fail(where, f"dimension {i} must {rule}, got {lo}, {opt}, {hi}")

    @property
    def null_class(self) -> int:
        return self.num_classes

    # -- the files -------------------------------------------------------------------------------

    def verify_files(self, present: typing.Optional[typing.Set[str]] = None) -> None:
        """Every file listed, nothing else (`present`: the folder's files, scanned again if not
        given), each of the size and sha256 the manifest says."""
        present = set(self._scan() if present is None else present)
        present.discard(MANIFEST)
        unlisted = sorted(present - set(self.files))
        if unlisted:
            raise BundleError(f"{self.path} holds files its manifest does not vouch for: {', '.join(unlisted[:5])}; "
                              "remove them or re-export the bundle")
        for name in sorted(self.files):
            self._read_checked(name, keep=False)

    def read_verified(self, name: str) -> bytes:
        """The bytes of the listed file `name`, read once (never through a symlink) and checked
        against the manifest's size and sha256: use these bytes, never read the file again."""
        return self._read_checked(name, keep=True)

    def copy_verified(self, name: str, sink: typing.BinaryIO) -> None:
        """Write the listed file `name` to `sink` in chunks (never through a symlink), checked as
        `read_verified` checks it: a mismatch raises BundleError after the copy (discard `sink`)."""
        self._read_checked(name, keep=False, sink=sink)

    def _read_checked(self, name: str, keep: bool, sink: typing.Optional[typing.BinaryIO] = None) -> typing.Optional[bytes]:
        info = self.files.get(name)
        if info is None:
            raise BundleError(f"{self.path}: {name!r} is not listed in the manifest's files; re-export the bundle")
        file = self.path / name
        if not os.path.lexists(file):
            raise BundleError(f"{self.path} is missing {name}, which its manifest lists; re-export the bundle")
        with os.fdopen(_open_nofollow(file), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != info["bytes"]:
                raise BundleError(f"{file} has {size} bytes, the manifest says {info['bytes']}: the file was modified or "
                                  "truncated; re-export the bundle")
            h, data, total = hashlib.sha256(), (fh.read(size + 1) if keep else None), 0
            if keep:
                h.update(data)
                total = len(data)
            else:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                    total += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
        if total != info["bytes"] or h.hexdigest() != info["sha256"]:
            raise BundleError(f"{file} does not match the sha256 in the manifest: the file was modified; "
                              "re-export the bundle")
        return data

    # -- outputs -------------------------------------------------------------------------------

    def _output_specs(self, graph: str) -> typing.Dict[str, typing.Any]:
        if graph not in self._outputs:
            self._outputs[graph] = {s.name: s for s in self.expected_contract(graph)[1]}
        return self._outputs[graph]

    def check_output(self, graph: str, name: str, shape, dtype: typing.Optional[str], sizes: dict) -> None:
        """Refuse an output of `graph` whose shape (or dtype, where given) is not the contract's for
        the call's `sizes` (`batch`, `rows`, `new_tokens`): one line naming the graph, never an
        image of the wrong size or a numpy error further on."""
        spec = self._output_specs(graph)[name]
        want = resolve_shape(spec.shape, sizes)
        got = tuple(int(d) for d in shape)
        if got != want or (dtype is not None and dtype != spec.dtype):
            said = f"{list(got)}" + (f" {dtype}" if dtype is not None else "")
            raise BundleError(f"the {graph} graph of {self.path} returned {name} {said}, its contract says "
                              f"{list(want)} {spec.dtype}: the graph does not match its manifest (re-export the bundle)")

    def check_outputs(self, graph: str, outputs: typing.Dict[str, typing.Any], sizes: dict) -> None:
        """`check_output` of every `name: array` in `outputs`."""
        for name, array in outputs.items():
            if not hasattr(array, "shape") or not hasattr(array, "dtype"):
                raise BundleError(f"the {graph} graph of {self.path} returned {name} as {type(array).__name__}, "
                                  "not an array (re-export the bundle)")
            self.check_output(graph, name, array.shape, array.dtype.name, sizes)

    def check_tokens(self, graph: str, tokens, batch: int) -> None:
        """Sampled tokens of `graph` (an ar_step graph): int64 `[batch]` in [0, V)."""
        self.check_outputs(graph, {"next_tokens": tokens}, {"batch": batch})
        V = self.vocab.vocab_size
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise BundleError(f"the {graph} graph of {self.path} sampled tokens outside the vocabulary [0, {V}) "
                              f"(range [{int(tokens.min())}, {int(tokens.max())}]); re-export the bundle")

    def check_ids(self, graph: str, name: str, ids, limit: int) -> None:
        """Codebook ids a graph returned (the prologue generator's): every one in [0, limit)."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            raise BundleError(f"the {graph} graph of {self.path} returned {name} outside [0, {limit}) (range "
                              f"[{int(ids.min())}, {int(ids.max())}]); re-export the bundle")

    def graph_file(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"the bundle {self.path} has no {name!r} graph (it has: {', '.join(self.graphs)})")
        return self.path / self.graphs[name]["file"]

    def ar_cache_shape(self, rows: int) -> typing.Tuple[int, ...]:
        a = self.ar
        if a is None:
            raise BundleError(f"the bundle {self.path} has no AR model (no `ar` in its manifest)")
        return (a["layers"], rows, a["heads"], a["max_seq_len"], a["head_dim"])


def check_signature(name: str, contract: dict, inputs, outputs) -> None:
    """Compare a loaded graph's I/O (name, dtype, rank, static dims) with the manifest's contract.

    inputs/outputs: sequences of (name, dtype_name, shape) with None or strings for dynamic dims.
    """
    for kind, declared, actual in (("input", contract["inputs"], inputs), ("output", contract["outputs"], outputs)):
        got = {n: (d, s) for n, d, s in actual}
        want = [d["name"] for d in declared]
        if sorted(got) != sorted(want):
            raise BundleError(f"graph {name!r}: {kind}s are {sorted(got)[:8]}, the manifest says {sorted(want)[:8]}; "
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
