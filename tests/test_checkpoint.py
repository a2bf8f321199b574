import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import prologue_export as pe
from prologue_export import checkpoint as ckpt_mod
from prologue_export.checkpoint import CheckpointError
from prologue_export.model import PrologueModel
from prologue_export.config import model_preset

from .conftest import randomize_


def _model(name="tiny"):
    return randomize_(PrologueModel(model_preset(name)), seed=4).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-2d", "tiny-post"])
def test_round_trip_is_bit_exact(tmp_path, name):
    model = _model(name)
    pe.save_checkpoint(model, tmp_path / "ckpt")
    loaded = pe.load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    for comp, module in model.components().items():
        a, b = module.state_dict(), loaded.components()[comp].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        # non-persistent buffers (RoPE tables, logit mask) are rebuilt identically
        for (n1, b1), (n2, b2) in zip(module.named_buffers(), loaded.components()[comp].named_buffers()):
            assert n1 == n2 and torch.equal(b1, b2)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.tokenizer.decode(model.tokenizer.encode(images)[1]),
                           loaded.tokenizer.decode(loaded.tokenizer.encode(images)[1]))
    assert torch.equal(pe.sample(model.ar, [1, 2], None, seed=0), pe.sample(loaded.ar, [1, 2], None, seed=0))


def test_compiled_model_saves_clean_keys(tmp_path):
    model = _model()
    model.ar = torch.compile(model.ar)  # wrapper only; nothing is compiled until called
    pe.save_checkpoint(model, tmp_path / "ckpt")
    keys = load_file(tmp_path / "ckpt" / "ar.safetensors").keys()
    assert keys and not any("_orig_mod" in k for k in keys)


def test_wrong_shape_is_refused_by_name(tmp_path):
    pe.save_checkpoint(_model(), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "ar.safetensors"
    state = load_file(file)
    state["transformer.layers.1.ffn.fc2.weight"] = torch.zeros(3, 3)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer\.layers\.1\.ffn\.fc2\.weight: file \[3, 3\] vs model \[64, 176\]"):
        pe.load_checkpoint(tmp_path / "ckpt")


def test_missing_and_extra_tensors_are_named(tmp_path):
    pe.save_checkpoint(_model(), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "tokenizer.safetensors"
    state = load_file(file)
    del state["decoder.out.bias"]
    state["decoder.surprise"] = torch.zeros(1)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"missing tensors: decoder\.out\.bias \| unexpected tensors: decoder\.surprise"):
        pe.load_checkpoint(tmp_path / "ckpt")


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pe.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        pe.load_checkpoint(tmp_path / "empty")
    pe.save_checkpoint(_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "ar.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing ar.safetensors"):
        pe.load_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["ar"]["heads"] = "two"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.ar\.heads: expected an integer"):
        pe.load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.safetensors").write_bytes(b"not a tensor file")
    cfg["ar"]["heads"] = 2
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pe.load_checkpoint(tmp_path / "ckpt")


def test_crash_while_saving_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    first = _model()
    pe.save_checkpoint(first, tmp_path / "ckpt")
    calls = []

    def failing_save(state, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(state, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    second = randomize_(PrologueModel(model_preset("tiny")), seed=9)
    with pytest.raises(OSError, match="disk full"):
        pe.save_checkpoint(second, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind
    loaded = pe.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.ar.token_emb.weight, first.ar.token_emb.weight)
    calls.clear()
    with pytest.raises(OSError):
        pe.save_checkpoint(second, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        pe.save_checkpoint(_model(), tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").exists()
