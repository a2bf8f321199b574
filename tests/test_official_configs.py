"""The release's own configurations go through `import-official --official-config`.

The 2d baseline's resolved configs (`official_keys/2d-tokenizer.json`, `ar-2d-base.json`) carry
`share_semantic_codebook: true`, which the release reads only together with `Prologue: true`
(`models.py:710, 717, 862, 906` at 3b6db41), so it must be accepted for 2d. The folders here are
tiny random "official" ones, written in the release's file layout and key names from a model of
ours (the inverse of the importer's prefix map), with the config derived from the shipped JSON.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import prologue_export as pe
from prologue_export.cli import main
from prologue_export.config import ARConfig, ModelConfig, TokenizerConfig, TransformerSize
from prologue_export.model import PrologueModel
from prologue_export.official import (
    AR_PREFIXES, TOKENIZER_PREFIXES, OfficialImportError, config_from_official, import_official,
)

TINY_STACK = {"dim": 64, "layer_num": 2, "heads": 2, "rope_axes_dim": [10, 10, 12]}


def _tiny_resolved(reference_dir, name: str) -> dict:
    """The shipped resolved config of `name` with tiny sizes (1 x 32 x 32 images, 4-pixel
    patches, 64-wide stacks, 256 codes, 10 classes + null); every other entry as released."""
    data = json.loads((reference_dir / "official_keys" / name).read_text())
    rc = data["resolved_config"]
    assert rc["Prologue"] is False and rc["share_semantic_codebook"] is True  # the case at stake
    rc.update(image_size=32, patch_size=4, num_channels=1, patch_dim=16, x_len=64, z_len=64,
              num_classes=11, codebook_size=256)
    for stack in ("Encoder", "Decoder"):
        rc[stack].update(TINY_STACK, max_seq_len=64, ctx_max_seq_len=64, cond_input_dim=11)
    rc["Encoder"].update(input_dim=16, output_dim=64)
    rc["Decoder"].update(output_dim=16)
    rc["Quantizer"].update(codebook_size=256, dim=64, length=64)
    rc["ARModel"].update(dim=64, layer_num=2, heads=2, rope_axes_dim=[12, 10, 10], output_dim=256,
                         max_seq_len=64, cond_input_dim=11)
    return data


def _our_config(with_ar: bool) -> ModelConfig:
    tok = TokenizerConfig(
        variant="2d", image_size=32, patch_size=4, channels=1,
        encoder=TransformerSize(64, 2, 2), decoder=TransformerSize(64, 2, 2),
        visual_codebook_size=256, prologue_codebook_size=0, num_prologue_tokens=0, rope_axes=[10, 10, 12],
    )
    ar = ARConfig(dim=64, layers=2, heads=2, rope_axes=[12, 10, 10]) if with_ar else None
    return ModelConfig(num_classes=10, tokenizer=tok, ar=ar).validate()


def _official(state: dict, prefixes: dict) -> dict:
    inverse = {ours: official for official, ours in prefixes.items()}
    out = {}
    for key, tensor in state.items():
        ours = next(p for p in inverse if key.startswith(p))
        out[inverse[ours] + key[len(ours):]] = tensor.detach().clone().contiguous()
    return out


def _write_official(tmp_path, with_ar: bool):
    """A random model of ours, written as a released 2d tokenizer folder (+ an `ar-2d-*` folder)."""
    torch.manual_seed(0)
    model = PrologueModel(_our_config(with_ar))
    with torch.no_grad():  # away from the init (gates ~1e-5), so the round trip is a real check
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    tok = _official(model.tokenizer.state_dict(), TOKENIZER_PREFIXES)
    tok["quantizer.pos_select_mask"] = torch.zeros(64, 256)  # constant buffer the release saves
    tdir = tmp_path / "2d-tokenizer"
    tdir.mkdir()
    save_file({k: v for k, v in tok.items() if not k.startswith("dec.")}, str(tdir / "model_2.safetensors"))
    save_file({k: v for k, v in tok.items() if k.startswith("dec.")}, str(tdir / "model_3.safetensors"))
    adir = None
    if with_ar:
        ar = _official(model.ar.state_dict(), AR_PREFIXES)
        ar["uncond_ar_labels"] = torch.nn.functional.one_hot(torch.tensor([10]), 11).float()
        adir = tmp_path / "ar-2d-base"
        adir.mkdir()
        save_file(ar, str(adir / "model.safetensors"))
    return model.eval(), tdir, adir


def _assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["2d-tokenizer.json", "ar-2d-base.json"])
def test_shipped_2d_configs_are_accepted(reference_dir, name):
    data = json.loads((reference_dir / "official_keys" / name).read_text())
    cfg = config_from_official(data, with_ar=name.startswith("ar-"))
    assert cfg.tokenizer.variant == "2d" and cfg.vocab().vocab_size == 16384
    assert cfg.to_dict()["tokenizer"] == pe.config.model_preset("2d-base").to_dict()["tokenizer"]
    if cfg.ar is not None:
        assert cfg.ar.dim == 768 and cfg.ar.layers == 12 and cfg.ar.heads == 12


def test_share_semantic_codebook_still_refused_with_a_prologue(reference_dir):
    data = json.loads((reference_dir / "official_keys" / "prologue-b-tokenizer.json").read_text())
    data["resolved_config"]["share_semantic_codebook"] = True
    with pytest.raises(OfficialImportError, match="share_semantic_codebook = True"):
        config_from_official(data, with_ar=False)


def test_2d_tokenizer_only_import_through_the_cli(reference_dir, tmp_path, capsys):
    source, tdir, _ = _write_official(tmp_path, with_ar=False)
    cfg_file = tmp_path / "2d-tokenizer.json"
    cfg_file.write_text(json.dumps(_tiny_resolved(reference_dir, "2d-tokenizer.json")))
    rc = main(["import-official", "--tokenizer", str(tdir), "--official-config", str(cfg_file),
               "--out", str(tmp_path / "ckpt"), "--json"])
    assert rc == 0, capsys.readouterr().err
    json.loads(capsys.readouterr().out)
    model = pe.load_checkpoint(tmp_path / "ckpt")
    assert model.ar is None and model.config.tokenizer.variant == "2d"
    assert model.config.to_dict()["tokenizer"] == source.config.to_dict()["tokenizer"]
    _assert_same(model.tokenizer, source.tokenizer)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        p_ids, v_ids = model.tokenizer.encode(images)
        assert p_ids.shape == (2, 0)
        assert torch.equal(v_ids, source.tokenizer.encode(images)[1])
        assert torch.equal(model.tokenizer.decode(v_ids), source.tokenizer.decode(v_ids))


def test_2d_tokenizer_and_ar_import(reference_dir, tmp_path, capsys):
    source, tdir, adir = _write_official(tmp_path, with_ar=True)
    cfg_file = tmp_path / "ar-2d-base.json"
    cfg_file.write_text(json.dumps(_tiny_resolved(reference_dir, "ar-2d-base.json")))
    rc = main(["import-official", "--tokenizer", str(tdir), "--ar", str(adir), "--official-config", str(cfg_file),
               "--out", str(tmp_path / "ckpt")])
    assert rc == 0, capsys.readouterr().err
    model = pe.load_checkpoint(tmp_path / "ckpt")
    assert model.config.to_dict() == source.config.to_dict()
    _assert_same(model.tokenizer, source.tokenizer)
    _assert_same(model.ar, source.ar)
    seq = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(model.ar(seq, torch.tensor([3, 10])), source.ar(seq, torch.tensor([3, 10])))
    # the Python API (config as a dict) gives the same model; the tokenizer folder's own config
    # describes its joint AR (`small`, tied), so it serves a tokenizer-only import
    again = import_official(tdir, tmp_path / "ckpt2", ar_dir=adir,
                            official_config=_tiny_resolved(reference_dir, "ar-2d-base.json"))
    _assert_same(again.ar, source.ar)
    tok_only = import_official(tdir, tmp_path / "ckpt3", official_config=_tiny_resolved(reference_dir, "2d-tokenizer.json"))
    _assert_same(tok_only.tokenizer, source.tokenizer)
