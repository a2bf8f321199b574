"""Hostile checkpoints, released files, official configs and run folders (issue 24, items 12-14
and the training part of 17).

- Our checkpoints (`load_checkpoint`) and the released files (`import_official`) are judged from
  their safetensors headers (names, shapes, dtypes, byte ranges, total size) before any tensor
  data is read: a 1.5 GB tensor declared in a sparse file (0 bytes on disk) is refused without
  being read (`checkpoint._read_data` is never called; the peak memory does not grow).
- `--official-config` is strict JSON checked field by field: each bad case is one line, raised
  before any released file is opened.
- A training run refused for bad data or bad perceptual weights leaves no run folder; `--resume`
  on an empty folder is refused.
Every case ends in one line (a `PrologueError`, or exit 2 with one stderr line from the CLI).
"""

import json
import math
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import prologue_export as pe
from prologue_export import checkpoint as ckpt_mod
from prologue_export import official
from prologue_export.checkpoint import MAX_HEADER_BYTES, MAX_METADATA_BYTES, CheckpointError, read_header
from prologue_export.config import model_preset
from prologue_export.model import PrologueModel
from prologue_export.official import OfficialImportError, import_official
from prologue_export.runtime.errors import PrologueError
from prologue_export.train import common
from prologue_export.train.common import TrainError
from prologue_export.train.configs import TokenizerTrainConfig, load_train_config, tokenizer_train_preset
from prologue_export.train.tokenizer import train_tokenizer

from .test_hostile_cli import assert_one_line_error, run_cli
from .test_hostile_training import one_line
from .test_import_official import _copy_fixture

ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1}
HUGE = [375_000_000]  # float32: 1.5 GB declared, a hole on disk


# ------------------------------------------------------------------ writing (hostile) safetensors files


def tensors_of(path: Path):
    """[(name, dtype, shape, bytes)] of a safetensors file, in file order, and its metadata."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in items], meta


def write_tensors(path: Path, tensors, meta=None, raw_header: bytes = None, pad_to: int = None):
    """A safetensors file of `tensors` [(name, dtype, shape, bytes or None)]; None is a hole (a sparse
    file: the declared bytes take no disk space). `raw_header` replaces the JSON header as given."""
    header, offset = {}, 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, _blob in tensors:
        size = math.prod(shape) * ITEM[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for _name, _dtype, shape, blob in tensors:
            if blob is None:
                fh.seek(math.prod(shape) * ITEM[_dtype], os.SEEK_CUR)
            else:
                fh.write(blob)
        fh.truncate(pad_to if pad_to is not None else 8 + len(text) + offset)
    return path


def rewrite(path: Path, change, meta=None):
    tensors, old_meta = tensors_of(path)
    return write_tensors(path, change(tensors), meta if meta is not None else old_meta)


def _retyped(tensors, name, dtype):
    """`name` stored as `dtype` (its values cast), the rest unchanged."""
    torch_dtype = {"I64": torch.int64, "BOOL": torch.bool, "F64": torch.float64, "F16": torch.float16,
                   "BF16": torch.bfloat16, "I32": torch.int32}[dtype]
    out = []
    for n, d, shape, blob in tensors:
        if n == name:
            value = torch.frombuffer(bytearray(blob), dtype=torch.float32).reshape(shape).to(torch_dtype)
            blob = value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b""
            d = dtype
        out.append((n, d, shape, blob))
    return out


# ------------------------------------------------------------------ spies: no tensor data read, small peak


@pytest.fixture
def no_tensor_read(monkeypatch):
    """Fails the test if any tensor data is read (`checkpoint._read_data`) and checks the peak RSS."""
    def refused(*a, **k):
        raise AssertionError("tensor data was read before the file was refused")

    monkeypatch.setattr(ckpt_mod, "_read_data", refused)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB"


# ------------------------------------------------------------------ our checkpoints (load_checkpoint)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    with torch.device("cpu"):
        pe.save_checkpoint(PrologueModel(model_preset("tiny")).eval(), path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(saved, out)
    return out


FIRST = "decoder.out.weight"  # a tensor of tokenizer.safetensors

OURS = {  # case -> (how tokenizer.safetensors is damaged, what the one line says)
    "extra-1.5GB-sparse": (lambda f: rewrite(f, lambda t: t + [("decoder.huge", "F32", HUGE, None)]),
                           "unexpected tensors: decoder.huge"),
    "redeclared-1.5GB-sparse": (lambda f: rewrite(f, lambda t: [x for x in t if x[0] != FIRST] + [(FIRST, "F32", HUGE, None)]),
                                f"wrong shapes: {FIRST}: file [375000000]"),
    "metadata-50MB-sparse": (lambda f: _declared_header(f, 50 * 1024**2), "52428800-byte header; at most 8 MiB"),
    "metadata-100KB": (lambda f: rewrite(f, lambda t: t, meta={"format": "pt", "x": "y" * 100_000}),
                       f"metadata holds more than {MAX_METADATA_BYTES // 1024} KiB"),
    "metadata-not-strings": (lambda f: rewrite(f, lambda t: t, meta={"format": 3}), "__metadata__ must map strings"),
    "header-past-end": (lambda f: f.write_bytes((10**6).to_bytes(8, "little") + b"{}"), "inside the file"),
    "shorter-than-8-bytes": (lambda f: f.write_bytes(b"\x10\x00"), "shorter than a header"),
    "header-not-json": (lambda f: write_tensors(f, [], raw_header=b"{not json"), "not valid JSON"),
    "header-nan": (lambda f: write_tensors(f, [], raw_header=b'{"a": NaN}'), "not valid JSON"),
    "header-list": (lambda f: write_tensors(f, [], raw_header=b"[1, 2]"), "must be an object"),
    "header-deep": (lambda f: write_tensors(f, [], raw_header=b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "header-not-utf8": (lambda f: write_tensors(f, [], raw_header=b'{"\xff\xfe": 1}'), "not valid JSON"),
    "data-past-end": (lambda f: rewrite(f, lambda t: t + [("decoder.huge", "F32", HUGE, None)])
                      and os.truncate(f, f.stat().st_size - 4), "the file holds"),
    "trailing-bytes": (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 16), "the file holds"),
    "offsets-vs-shape": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8)),
                         "do not hold F32 [4]"),
    "offsets-overlap": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12)),
                        "overlap or leave gaps"),
    "offsets-gap": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8)),
                    "overlap or leave gaps"),
    "negative-size": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0)),
                      "sizes >= 0"),
    "rank-9": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, 4)),
               "at most 8 sizes"),
    "extra-entry-key": (lambda f: f.write_bytes(_header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                                                     "x": 1}}, 4)), "is not {dtype, shape, data_offsets}"),
    "unknown-dtype": (lambda f: rewrite(f, lambda t: t + [("decoder.c", "C64", [2], b"\0" * 16)]), "unsupported dtype 'C64'"),
    "newline-in-name": (lambda f: rewrite(f, lambda t: t + [("decoder.x\nFAKE LINE", "F32", [1], b"\0" * 4)]),
                        "unexpected tensors: 'decoder.x\\nFAKE LINE'"),
    "int64-weight": (lambda f: rewrite(f, lambda t: _retyped(t, FIRST, "I64")), f"{FIRST}: int64"),
    "bool-weight": (lambda f: rewrite(f, lambda t: _retyped(t, FIRST, "BOOL")), f"{FIRST}: bool"),
    "float64-weight": (lambda f: rewrite(f, lambda t: _retyped(t, FIRST, "F64")), f"{FIRST}: float64"),
    "float16-weight": (lambda f: rewrite(f, lambda t: _retyped(t, FIRST, "F16")), f"{FIRST}: float16"),
    "bfloat16-weight": (lambda f: rewrite(f, lambda t: _retyped(t, FIRST, "BF16")), f"{FIRST}: bfloat16"),
}


def _declared_header(path: Path, n: int) -> None:
    """A file whose header claims `n` bytes (a 50 MB metadata string), sparse: nothing of it is written."""
    with open(path, "wb") as fh:
        fh.write(n.to_bytes(8, "little") + b'{"__metadata__": {"x": "')
        fh.truncate(8 + n)


def _header_bytes(header: dict, data: int) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"\0" * data


@pytest.mark.parametrize("case", list(OURS))
def test_our_checkpoint_is_judged_from_its_header(ckpt, case, no_tensor_read):
    damage, message = OURS[case]
    file = ckpt / "tokenizer.safetensors"
    damage(file)
    assert file.stat().st_blocks * 512 < 64 * 1024**2  # the "huge" files are holes on disk
    with pytest.raises(CheckpointError) as exc:
        pe.load_checkpoint(ckpt)
    text = one_line(exc)
    assert message in text and "tokenizer.safetensors" in text, text
    if "weight" in case:
        assert "wrong dtypes (the weights are float32)" in text


def test_header_bounds_are_stated():
    assert MAX_HEADER_BYTES == 8 * 1024**2 and MAX_METADATA_BYTES == 64 * 1024


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link", "folder"])
def test_special_files_are_refused_without_opening(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    elif kind == "dev-zero-link":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(CheckpointError) as exc:
        read_header(path)
    assert "not a regular file" in one_line(exc)


def test_round_trip_reads_the_same_bits_through_the_header_reader(ckpt):
    model = pe.load_checkpoint(ckpt)
    for comp, module in model.components().items():
        ref = load_file(ckpt / ckpt_mod.COMPONENT_FILES[comp])
        for k, v in module.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k
            assert v.data_ptr() % 64 == 0, k  # each tensor in its own aligned buffer


# ------------------------------------------------------------------ released files (import_official)


@pytest.fixture
def fixture(reference_dir, tmp_path):
    return _copy_fixture(reference_dir, tmp_path)


def _import(root: Path, out: Path):
    return import_official(root / "tokenizer", out, ar_dir=root / "ar", official_config=root / "config.json")


RELEASED = {  # case -> (file, damage, message)
    "extra-unknown-prefix-1.5GB": ("tokenizer/model_2.safetensors", lambda t: t + [("mystery.huge", "F32", HUGE, None)],
                                   "unexpected tokenizer tensor 'mystery.huge'"),
    "extra-encoder-1.5GB": ("tokenizer/model_2.safetensors", lambda t: t + [("enc.huge", "F32", HUGE, None)],
                            "unexpected tensors: encoder.huge"),
    "redeclared-1.5GB": ("tokenizer/model_2.safetensors",
                         lambda t: [x for x in t if x[0] != "enc.input_layer.weight"]
                         + [("enc.input_layer.weight", "F32", [1000, 375_000], None)], "patch_dim: files say 375000"),
    "redeclared-ar-1.5GB": ("ar/model.safetensors",
                            lambda t: [x for x in t if x[0] != "ar_model.layers.1.ffn.fc2.weight"]
                            + [("ar_model.layers.1.ffn.fc2.weight", "F32", HUGE, None)], "wrong shapes"),
    "legacy-entry-1.5GB": ("ar/model.safetensors", lambda t: t + [("logit_mask", "F32", HUGE, None)],
                           "ignored legacy entries hold 15000000"),
    "wrong-rank": ("tokenizer/model_2.safetensors",
                   lambda t: [(n, d, [s[0], 1, s[1]] if n == "quantizer.embedding.weight" else s, b) for n, d, s, b in t],
                   "'visual_quantizer.embedding.weight' has shape [64, 1, 14]"),
    "int64-weight": ("ar/model.safetensors", lambda t: _retyped(t, "bos_emb.weight", "I64"), "'bos_emb.weight' is int64"),
    "bool-weight": ("tokenizer/model_3.safetensors", lambda t: _retyped(t, "dec.out.weight", "BOOL"),
                    "'dec.out.weight' is bool"),
    "float64-weight": ("ar/model.safetensors", lambda t: _retyped(t, "semantic_emb.weight", "F64"),
                       "'semantic_emb.weight' is float64"),
    "int32-weight": ("tokenizer/model_2.safetensors", lambda t: _retyped(t, "enc.input_layer.weight", "I32"),
                     "'enc.input_layer.weight' is int32"),
}


@pytest.mark.parametrize("case", list(RELEASED))
def test_released_files_are_judged_from_their_headers(fixture, tmp_path, case, no_tensor_read):
    name, change, message = RELEASED[case]
    rewrite(fixture / name, change)
    with pytest.raises(OfficialImportError) as exc:
        _import(fixture, tmp_path / "out")
    text = one_line(exc)
    assert message in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, tensor", [("ar/model.safetensors", "ar_model.layers.1.ffn.fc2.weight"),
                                          ("tokenizer/model_3.safetensors", "dec.out.weight")])
def test_a_released_file_swapped_after_its_header_was_checked_is_not_read(fixture, tmp_path, monkeypatch, name, tensor):
    """The tensors are read from a file whose header, read again from the same open file, maps to
    exactly what the model was checked against: a file swapped in between (here: a tensor of the
    right name re-declared at 1.5 GB) is refused before any tensor data is read."""
    from prologue_export import official

    real = official.read_official_headers

    def headers_then_swap(*args, **kwargs):
        checked = real(*args, **kwargs)
        rewrite(fixture / name, lambda t: [x for x in t if x[0] != tensor] + [(tensor, "F32", HUGE, None)])
        return checked

    read, real_read = [], ckpt_mod._read_data

    def spy(fh, file, table):
        read.append(Path(file).resolve())
        return real_read(fh, file, table)

    monkeypatch.setattr(official, "read_official_headers", headers_then_swap)
    monkeypatch.setattr(ckpt_mod, "_read_data", spy)
    with pytest.raises(OfficialImportError) as exc:
        _import(fixture, tmp_path / "out")
    assert "changed since its header was checked" in one_line(exc)
    assert (fixture / name).resolve() not in read and read  # the files before it were read, it was not
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_release_is_widened_to_float32(fixture, tmp_path, dtype):
    """bfloat16 / float16 copies of the release are accepted and widened exactly (docs/model.md)."""
    file = fixture / "ar" / "model.safetensors"
    rewrite(file, lambda t: [_retyped([x], x[0], dtype)[0] if x[1] == "F32" else x for x in t])
    halves = load_file(file)
    model = _import(fixture, tmp_path / "out")
    assert model.ar.token_emb.weight.dtype == torch.float32
    assert torch.equal(model.ar.token_emb.weight, halves["semantic_emb.weight"].float())


# ------------------------------------------------------------------ --official-config


def _config_case(case: str, root: Path) -> bytes:
    cfg = json.loads((root / "config.json").read_text())
    rc = cfg["resolved_config"]
    edits = {
        "string-dim": lambda: rc["Encoder"].update(dim="64"),
        "null-dim": lambda: rc["ARModel"].update(heads=None),
        "bool-dim": lambda: rc["Decoder"].update(layer_num=True),
        "float-dim": lambda: rc.update(image_size=32.5),
        "huge-dim": lambda: rc["ARModel"].update(dim=10**30),
        "negative-dim": lambda: rc.update(patch_size=-8),
        "rope-not-list": lambda: rc["Encoder"].update(rope_axes_dim="10,10,12"),
        "rope-strings": lambda: rc["ARModel"].update(rope_axes_dim=["12", "10", "10"]),
        "rope-long": lambda: rc["Encoder"].update(rope_axes_dim=[2] * 100_000),
        "section-not-object": lambda: rc.update(Quantizer=[64]),
        "resolved-not-object": lambda: cfg.update(resolved_config="x"),
        "mlp-ratio-number": lambda: rc["Encoder"].update(mlp_ratio=2.5),
        "prologue-not-bool": lambda: rc.update(Prologue="yes"),
        "theta-huge-int": lambda: rc["ARModel"].update(rope_theta=10**400),
        "infinity-theta": lambda: rc["ARModel"].update(rope_theta=123456789),
        "missing-entry": lambda: rc.pop("z_dim"),
        "norm-layer-huge": lambda: rc.update(norm_layer="x" * 1_000_000),
    }
    if case in edits:
        edits[case]()
        return json.dumps(cfg).replace("123456789", "1e999").encode()
    text = json.dumps(cfg)
    return {"nan-dim": text.replace('"z_len": 4', '"z_len": NaN').encode(),
            "top-level-list": b"[1, 2, 3]",
            "top-level-string": b'"config"',
            "deep-100k": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "not-utf8": text.encode().replace(b'"fixture"', b'"fi\xffxture"'),
            "empty": b"",
            "not-json": b"{resolved_config: 1"}[case]


CONFIG_CASES = {
    "string-dim": "Encoder.dim must be an integer, got '64'",
    "null-dim": "ARModel.heads must be an integer, got None",
    "bool-dim": "Decoder.layer_num must be an integer, got True",
    "float-dim": "image_size must be an integer, got 32.5",
    "huge-dim": "ar.dim must be in",
    "negative-dim": "patch_size must be in",
    "rope-not-list": "Encoder.rope_axes_dim must be a list of at most 16 integers, got '10,10,12'",
    "rope-strings": "ARModel.rope_axes_dim must be a list",
    "rope-long": "Encoder.rope_axes_dim must be a list of at most 16 integers",
    "section-not-object": "Quantizer must be an object, got [64]",
    "resolved-not-object": "resolved_config must be an object, got 'x'",
    "mlp-ratio-number": "Encoder.mlp_ratio must be a string",
    "prologue-not-bool": "Prologue must be true or false",
    "theta-huge-int": "ARModel.rope_theta must be a finite number",
    "missing-entry": "lacks the entry 'resolved_config.z_dim'",
    "norm-layer-huge": "unsupported official config: norm_layer = 'xxx",
    "nan-dim": "not valid JSON",
    "infinity-theta": "ARModel.rope_theta must be a finite number, got inf",
    "top-level-list": "must be an object at the top level, got list",
    "top-level-string": "must be an object at the top level, got str",
    "deep-100k": "nested too deeply",
    "not-utf8": "not valid JSON",
    "empty": "not valid JSON",
    "not-json": "not valid JSON",
}


@pytest.fixture
def no_file_opened(monkeypatch):
    def refused(*a, **k):
        raise AssertionError("a released file was opened before the config was refused")

    monkeypatch.setattr(official, "read_header", refused)
    monkeypatch.setattr(official, "read_tensors", refused)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_official_config_is_strict_and_checked_field_by_field(fixture, tmp_path, case, capsys, no_file_opened):
    bad = tmp_path / "bad.json"
    bad.write_bytes(_config_case(case, fixture))
    out = tmp_path / "out"
    rc, err = run_cli(["import-official", "--tokenizer", fixture / "tokenizer", "--ar", fixture / "ar",
                       "--official-config", bad, "--out", out], capsys)
    assert_one_line_error(rc, err)
    assert CONFIG_CASES[case] in err and len(err) < 600, err
    assert not out.exists()
    with pytest.raises(OfficialImportError) as exc:  # the library reads it the same way
        import_official(fixture / "tokenizer", out, ar_dir=fixture / "ar", official_config=bad)
    assert CONFIG_CASES[case] in one_line(exc)


def test_official_config_over_the_size_bound(fixture, tmp_path, capsys, no_file_opened):
    bad = tmp_path / "big.json"
    with open(bad, "wb") as fh:
        fh.truncate(17 * 1024**2)  # sparse: refused from its size, never read
    rc, err = run_cli(["import-official", "--tokenizer", fixture / "tokenizer", "--official-config", bad,
                       "--out", tmp_path / "out"], capsys)
    assert_one_line_error(rc, err)
    assert "larger than 16 MiB" in err


def test_official_config_is_checked_before_the_hub_is_asked(fixture, tmp_path, capsys, monkeypatch):
    from prologue_export.cli import hub

    monkeypatch.setattr(hub, "fetch_release", lambda *a, **k: pytest.fail("fetched before the config was checked"))
    bad = tmp_path / "bad.json"
    bad.write_bytes(_config_case("null-dim", fixture))
    rc, err = run_cli(["import-official", "--hub", "--preset", "prologue-b-b", "--official-config", bad,
                       "--out", tmp_path / "out"], capsys)
    assert_one_line_error(rc, err)
    assert "ARModel.heads must be an integer" in err


# ------------------------------------------------------------------ training: --resume and refused runs

FAST = ["run.compile=false", "run.num_workers=0", "run.batch_size=4", "gan.base_channels=8", "steps=1"]


def tiny_cfg(*extra):
    return load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny", FAST + list(extra))


def test_resume_on_an_empty_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(TrainError) as exc:
        train_tokenizer(tiny_cfg(), "synthetic:8", out, resume=True)
    text = one_line(exc)
    assert "is empty: there is no run to resume" in text and "without --resume" in text
    assert out.is_dir() and not any(out.iterdir())  # it existed before: kept, and nothing written in it


def test_resume_on_a_missing_folder_is_refused_and_creates_nothing(tmp_path):
    with pytest.raises(TrainError) as exc:
        train_tokenizer(tiny_cfg(), "synthetic:8", tmp_path / "a" / "run", resume=True)
    assert "does not exist" in one_line(exc)
    assert not (tmp_path / "a").exists()


def _bad_perceptual(tmp_path: Path) -> list:
    path = tmp_path / "vgg.safetensors"
    save_file({"features.0.weight": torch.zeros(2, dtype=torch.int64)}, str(path))
    return [f"perceptual_weights={json.dumps(str(path))}"]


REFUSED = {  # case -> (data, extra overrides, error type name)
    "data-missing": (lambda t: str(t / "no-such-data"), lambda t: [], "DataError"),
    "data-empty-folder": (lambda t: (t / "empty-data").mkdir() or str(t / "empty-data"), lambda t: [], "DataError"),
    "perceptual-int64": (lambda t: "synthetic:8", _bad_perceptual, "PerceptualWeightsError"),
}


@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "existing-empty-folder"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_run_leaves_no_run_folder(tmp_path, case, existed):
    data, extra, kind = REFUSED[case]
    out = tmp_path / "runs" / "deeper" / "run"
    if existed:
        out.mkdir(parents=True)
    with pytest.raises(PrologueError) as exc:
        train_tokenizer(tiny_cfg(*extra(tmp_path)), data(tmp_path), out)
    one_line(exc)
    assert type(exc.value).__name__ == kind
    if existed:  # never removed: it was there before
        assert out.is_dir() and not any(out.iterdir())
    else:  # neither the run folder nor the parents this run created
        assert not (tmp_path / "runs").exists()


def test_a_refused_run_keeps_a_parent_that_gained_other_files(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "run"
    real = common.prepare_out_dir

    def prepare_and_someone_writes(*a, **k):
        real(*a, **k)
        (tmp_path / "runs" / "theirs.txt").write_text("not ours")

    monkeypatch.setattr(common, "prepare_out_dir", prepare_and_someone_writes)
    with pytest.raises(PrologueError):
        train_tokenizer(tiny_cfg(), str(tmp_path / "nothing"), out)
    assert not out.exists() and (tmp_path / "runs" / "theirs.txt").read_text() == "not ours"


def test_cli_train_refused_for_bad_data_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(["train", "tokenizer", "--config", "tiny", "--data", tmp_path / "missing", "--out", out,
                       "--no-compile", "run.num_workers=0"], capsys)
    assert_one_line_error(rc, err)
    assert "no such file or folder" in err and not out.exists()
