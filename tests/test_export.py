"""Export to an ONNX bundle and its verification, on tiny random models."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import prologue_export as pe
from prologue_export.model import PrologueModel
from prologue_export.cli import main
from prologue_export.config import model_preset
from prologue_export.export import bundle as bundle_mod
from prologue_export.export.bundle import ExportError, export_bundle
from prologue_export.export.verify import VerificationError, verify_bundle
from prologue_export.runtime import files
from prologue_export.runtime.bundle import Bundle, BundleError
from prologue_export.runtime.files import OutputError

from .conftest import randomize_


def _checkpoint(path, name="tiny", seed=3):
    model = randomize_(PrologueModel(model_preset(name)), seed=seed)
    pe.save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(root / "ckpt")
    manifest = export_bundle(ckpt, root / "bundle", max_batch=4, log=lambda m: None)
    return root, ckpt, root / "bundle", manifest


def test_bundle_layout_and_manifest(exported):
    _, ckpt, bundle_dir, manifest = exported
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "ar_step.onnx", "decoder.onnx", "manifest.json", "prologue_generator.onnx"]
    assert manifest["format_version"] == 2 and manifest["precision"] == "fp32"
    assert manifest["vocab"] == {"visual_codebook_size": 256, "prologue_codebook_size": 64, "num_prologue_tokens": 8,
                                 "num_visual_tokens": 64, "prologue_offset": 256, "eos_id": 320, "vocab_size": 321,
                                 "seq_len": 73, "input_bos_offset": 321}
    assert manifest["graphs"]["ar_step"]["dynamic_axes"]["batch"] == {"min": 1, "opt": 4, "max": 4}
    assert manifest["model"] == pe.load_checkpoint(ckpt).config.to_dict()
    v = manifest["verification"]
    assert v["passed"] and v["decoder"]["image_float_max_err"] <= 1e-4
    assert v["ar_step"]["logits_max_err"] <= 1e-4
    assert {k: r["identical"] for k, r in v["generation"].items()} == {
        "cfg_split": 3, "no_cfg_temperatures_topk": 3, "fixed_prologue": 3}
    Bundle(bundle_dir)  # the runtime accepts it


def test_declared_dynamic_axes_are_dynamic_in_the_files(exported):
    import onnx

    _, _, bundle_dir, _ = exported
    proto = onnx.load(str(bundle_dir / "ar_step.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["rows", "new_tokens"]
    L = pe.load_checkpoint(exported[1]).config.ar.layers
    for name in [f"{kv}_cache_{i}" for kv in "kv" for i in range(L)]:  # one cache input per layer
        assert dims[name][0] == "rows" and dims[name][2] == 73
    assert "k_cache" not in dims
    assert dims["uniform"] == ["batch", 321]


def test_verify_cli_and_other_checkpoint_fails(exported, tmp_path, capsys):
    root, ckpt, bundle_dir, _ = exported
    assert main(["export", "--verify", str(bundle_dir), "--checkpoint", str(ckpt)]) == 0
    other = _checkpoint(tmp_path / "other", seed=99)  # same config, other weights
    with pytest.raises(VerificationError, match="differs from torch"):
        verify_bundle(bundle_dir, checkpoint=other, log=lambda m: None)


def test_modified_bundle_is_detected(exported, tmp_path):
    _, ckpt, bundle_dir, _ = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match the sha256"):
        Bundle(copy)
    with pytest.raises(VerificationError, match="sha256"):
        verify_bundle(copy, checkpoint=ckpt, log=lambda m: None)
    shutil.copy(bundle_dir / "decoder.onnx", copy / "decoder.onnx")
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not vouch for: extra.bin"):
        Bundle(copy)
    (copy / "extra.bin").unlink()
    (copy / "ar_step.onnx").unlink()
    with pytest.raises(BundleError, match="missing ar_step.onnx"):
        Bundle(copy)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["format_version"] = 7
    shutil.copy(bundle_dir / "ar_step.onnx", copy / "ar_step.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 7 is not supported"):
        Bundle(copy)


def test_declared_axis_fixed_in_file_is_caught(exported, tmp_path, monkeypatch):
    from prologue_export.export.verify import check_dynamic_axes
    from prologue_export.runtime.bundle import BundleError

    _, _, bundle_dir, _ = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["inputs"][0]["shape"][1] = "tokens"  # claims dynamic, file has 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    # the runtime refuses the manifest itself: its shapes must be the contract's (issue 24: engine
    # profiles and output checks are derived from them)
    with pytest.raises(BundleError, match=r"says \['batch', 64\]"):
        Bundle(copy, check_hashes=False)
    # and verification, reading the graph file, catches it too (the manifest check skipped)
    monkeypatch.setattr(Bundle, "_check_contract", lambda self, f, name: None)
    with pytest.raises(VerificationError, match="declared dynamic .* fixes it to 64"):
        check_dynamic_axes(Bundle(copy))


def test_2d_baseline_and_tokenizer_only(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt2d", "tiny-2d")
    manifest = export_bundle(ckpt, tmp_path / "b2d", max_batch=2, log=lambda m: None)
    assert set(manifest["verification"]["generation"]) == {"cfg_cosine", "no_cfg_temperatures_topk"}
    model = randomize_(PrologueModel(model_preset("tiny")), seed=1)
    model.ar = None
    model.config.ar = None
    pe.save_checkpoint(model, tmp_path / "tok")
    manifest = export_bundle(tmp_path / "tok", tmp_path / "btok", log=lambda m: None)
    assert sorted(manifest["graphs"]) == ["decoder", "prologue_generator"]


def test_bad_input(exported, tmp_path, monkeypatch):
    _, ckpt, bundle_dir, _ = exported
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a bundle; refusing to overwrite"):
        export_bundle(ckpt, tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").exists()
    with pytest.raises(ExportError, match="already holds a bundle; pass --force"):
        export_bundle(ckpt, bundle_dir)
    with pytest.raises(ExportError, match="--max-batch must be an integer >= 1"):
        export_bundle(ckpt, tmp_path / "x", max_batch=0)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "ar.safetensors").unlink()
    with pytest.raises(ExportError, match="missing ar.safetensors"):
        export_bundle(broken, tmp_path / "x")
    # a failure half way leaves nothing behind, and an existing bundle survives a failed --force
    real = bundle_mod.export_graph

    def failing(contract, folder):
        if contract.name == "ar_step":
            raise ExportError("simulated failure")
        return real(contract, folder)

    monkeypatch.setattr(bundle_mod, "export_graph", failing)
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(ckpt, tmp_path / "half", log=lambda m: None)
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(ckpt, bundle_dir, force=True, log=lambda m: None)
    assert (bundle_dir / "manifest.json").read_bytes() == before


def test_a_failure_between_the_two_renames_keeps_the_previous_bundle(exported, tmp_path, monkeypatch):
    """--force: the old bundle is moved aside, then renaming the new one into place fails (a disk
    error, or a crash would): the previous bundle is put back, still loadable, and nothing is left
    beside it (`runtime.files.publish_folder`)."""
    _, ckpt, bundle_dir, _ = exported
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace
    renames = []

    def failing(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".bundle.tmp-") and Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OutputError) as exc_info:
        export_bundle(ckpt, out, force=True, verify=False, log=lambda m: None)
    message = str(exc_info.value)
    assert "\n" not in message and str(out) in message and os.strerror(errno.EIO) in message
    aside = [dst for src, dst in renames if src == "bundle"]  # the old one was moved aside, then back
    assert len(aside) == 1 and aside[0].startswith(".bundle.old-") and renames[-1] == (aside[0], "bundle")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    Bundle(out)  # the runtime still loads it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .bundle.tmp- / .bundle.old- left


def test_cli_export_json(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", seed=5)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--json", "--no-verify",
                 "--sampling", '{"semantic_cfg_scale": 0.7, "semantic_cfg_schedule": "constant"}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["graphs"] == ["ar_step", "decoder", "prologue_generator"] and out["verified"] is False
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["sampling_defaults"]["prologue_cfg_scale"] == 0.7
    assert main(["export", "--checkpoint", str(ckpt), "--verify", str(tmp_path / "b")]) == 0


def test_weight_only_quantized_ar_graphs(exported, tmp_path):
    import onnx

    from prologue_export.runtime import Generator

    _, ckpt, plain_bundle, _ = exported
    manifest = export_bundle(ckpt, tmp_path / "q", max_batch=4, ar_weights=("int4", "int8"), log=lambda m: None)
    graphs = manifest["graphs"]
    assert graphs["ar_step_int4"]["weights"] == "int4" and graphs["ar_step_int8"]["weights"] == "int8"
    assert graphs["ar_step_int4"]["inputs"] == graphs["ar_step"]["inputs"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "ar_step_int4.onnx")).graph.node}
    assert "MatMulNBits" in ops
    for name in ("ar_step_int4", "ar_step_int8"):
        report = manifest["verification"][name]
        assert set(report) == {"cfg_split", "no_cfg_temperatures_topk", "fixed_prologue"}
        assert all(0.0 <= r["token_agreement"] <= 1.0 for r in report.values())
    # 8-bit weights track fp32 closely; a broken quantized graph would not
    assert min(r["token_agreement"] for r in manifest["verification"]["ar_step_int8"].values()) >= 0.5
    gen = Generator.from_bundle(tmp_path / "q", ar_weights="int4")
    a = gen.generate([1, 2], seed=0)
    assert a.shape == (2, 32, 32, 1) and (a == gen.generate([1, 2], seed=0)).all()
    with pytest.raises(BundleError, match="has no int4 AR graph"):
        Generator.from_bundle(plain_bundle, ar_weights="int4")
    with pytest.raises(ExportError, match="--ar-weights must be among int8, int4"):
        export_bundle(ckpt, tmp_path / "x", ar_weights=("int3",))
