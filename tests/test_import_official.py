"""Importer behaviour on the authors' file layout (fixture_a) and on damaged copies of it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import prologue_export as pe
from prologue_export.cli import main
from prologue_export.official import OfficialImportError, import_official, map_key


def _copy_fixture(reference_dir, tmp_path):
    root = tmp_path / "fixture"
    shutil.copytree(reference_dir / "fixture_a", root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def test_key_mapping():
    assert map_key("enc.layers.0.attn1.to_q.weight", "tokenizer") == "encoder.layers.0.attn1.to_q.weight"
    assert map_key("semantic_quantizer.embedding.weight", "tokenizer") == "prologue_quantizer.embedding.weight"
    assert map_key("module._orig_mod.dec.out.bias", "tokenizer") == "decoder.out.bias"
    assert map_key("bos_emb.weight", "ar") == "class_emb.weight"
    for ignored in ("quantizer.pos_select_mask", "semantic_quantizer.codebook_size_per_pos", "logit_mask", "uncond_ar_labels"):
        assert map_key(ignored, "tokenizer" if "quantizer" in ignored else "ar") is None
    with pytest.raises(OfficialImportError, match="unexpected ar tensor 'ar_model_typo.x'"):
        map_key("ar_model_typo.x", "ar")


def test_wrapped_and_legacy_keys_import_identically(reference_dir, tmp_path):
    root = _copy_fixture(reference_dir, tmp_path)
    file = root / "ar" / "model.safetensors"
    state = load_file(file)
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["logit_mask"] = torch.zeros(21, 81)
    save_file(wrapped, file)
    enc = root / "tokenizer" / "model_2.safetensors"
    state = load_file(enc)
    state = {f"_orig_mod.{k}": v for k, v in state.items()}
    state["_orig_mod.quantizer.codebook_size_per_pos"] = torch.zeros(16)
    save_file(state, enc)
    a = import_official(root / "tokenizer", tmp_path / "a", ar_dir=root / "ar", official_config=root / "config.json")
    b = import_official(reference_dir / "fixture_a" / "tokenizer", tmp_path / "b",
                        ar_dir=reference_dir / "fixture_a" / "ar", official_config=reference_dir / "fixture_a" / "config.json")
    for comp in ("tokenizer", "ar"):
        sa, sb = a.components()[comp].state_dict(), b.components()[comp].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_unknown_tensor_is_an_error(reference_dir, tmp_path):
    root = _copy_fixture(reference_dir, tmp_path)
    file = root / "ar" / "model.safetensors"
    state = load_file(file)
    state["ar_model.extra_head.weight"] = torch.zeros(2)
    save_file(state, file)
    with pytest.raises(OfficialImportError, match="unexpected tensors: transformer.extra_head.weight"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar", official_config=root / "config.json")
    assert not (tmp_path / "out").exists()


def test_missing_slot_names_the_file(reference_dir, tmp_path):
    root = _copy_fixture(reference_dir, tmp_path)
    (root / "tokenizer" / "model_3.safetensors").unlink()
    with pytest.raises(OfficialImportError, match=r"model_3.safetensors not found: the EMA decoder"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar", official_config=root / "config.json")


def test_config_contradicting_the_files_is_an_error(reference_dir, tmp_path):
    root = _copy_fixture(reference_dir, tmp_path)
    cfg = json.loads((root / "config.json").read_text())
    cfg["resolved_config"]["ARModel"]["heads"] = 4
    cfg["resolved_config"]["ARModel"]["rope_axes_dim"] = [6, 6, 4]
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OfficialImportError, match=r"ar\.heads: files say 2, the official config says 4"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar", official_config=root / "config.json")
    # a preset of other sizes contradicts the files as well
    with pytest.raises(OfficialImportError, match=r"tokenizer\.encoder\.dim: files say 64, preset 'prologue-b-b' says 768"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar", preset="prologue-b-b")


def test_no_config_and_no_preset_is_an_error(reference_dir, tmp_path):
    root = reference_dir / "fixture_a"
    with pytest.raises(OfficialImportError, match="pass --official-config FILE"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar")


def test_unsupported_official_config(reference_dir, tmp_path):
    root = _copy_fixture(reference_dir, tmp_path)
    cfg = json.loads((root / "config.json").read_text())
    cfg["resolved_config"]["ARModel"]["tied_embedding"] = True
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OfficialImportError, match="ARModel.tied_embedding = True"):
        import_official(root / "tokenizer", tmp_path / "out", ar_dir=root / "ar", official_config=root / "config.json")


def test_tokenizer_only_import_and_cli_errors(reference_dir, tmp_path, capsys):
    root = reference_dir / "fixture_a"
    rc = main(["import-official", "--tokenizer", str(root / "tokenizer"), "--official-config",
               str(root / "config.json"), "--out", str(tmp_path / "tok"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == {"tokenizer": 132360 + 132364}
    model = pe.load_checkpoint(tmp_path / "tok")
    assert model.ar is None
    rc = main(["import-official", "--tokenizer", str(tmp_path / "nowhere"), "--preset", "tiny",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "nowhere does not exist" in capsys.readouterr().err  # checked before anything is read
    (tmp_path / "empty").mkdir()
    rc = main(["import-official", "--tokenizer", str(tmp_path / "empty"), "--preset", "tiny",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "model_2.safetensors not found" in capsys.readouterr().err


def test_onestage_layout_reads_non_ema_slots(reference_dir, tmp_path):
    """OneStage: tokenizer from model/model_1 (non-EMA), AR from the tokenizer folder's model_5."""
    root = _copy_fixture(reference_dir, tmp_path)
    shutil.copy(root / "ar" / "model.safetensors", root / "tokenizer" / "model_5.safetensors")
    model = import_official(root / "tokenizer", tmp_path / "out", official_config=root / "config.json", onestage=True)
    non_ema = load_file(root / "tokenizer" / "model_1.safetensors")
    assert torch.equal(model.tokenizer.decoder.out.weight, non_ema["dec.out.weight"])
    ema = load_file(root / "tokenizer" / "model_3.safetensors")
    assert not torch.equal(model.tokenizer.decoder.out.weight, ema["dec.out.weight"])
    assert torch.equal(model.ar.token_emb.weight, load_file(root / "ar" / "model.safetensors")["semantic_emb.weight"])
    with pytest.raises(OfficialImportError, match="do not pass --ar"):
        import_official(root / "tokenizer", tmp_path / "o2", ar_dir=root / "ar", official_config=root / "config.json", onestage=True)
