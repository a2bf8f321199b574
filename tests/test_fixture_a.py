"""fixture_a, converted with `prologue import-official`, reproduces the authors' outputs.

Tolerances from fixture_a/README.md: ids and tokens exact; floats and probabilities <= 1e-5
(an RMS norm with eps inside the square root moves them by up to 6.4e-5); uint8 images exact
except +-1 where 127.5*y + 128 of the expected float image is within 1e-3 of an integer.
"""

import json

import numpy as np
import pytest
import torch

import prologue_export as pe
from prologue_export.cli import main
from prologue_export.tokenizer import images_to_uint8, patchify

FLOAT_TOL = 1e-5
NOT_SETTINGS = {"sampler", "noise_seed", "noise_shape", "min_gumbel_margin", "min_logprob_margin"}


@pytest.fixture(scope="module")
def fixture(reference_dir, tmp_path_factory):
    root = reference_dir / "fixture_a"
    out = tmp_path_factory.mktemp("ckpt") / "fixture_a"
    rc = main([
        "import-official", "--tokenizer", str(root / "tokenizer"), "--ar", str(root / "ar"),
        "--official-config", str(root / "config.json"), "--out", str(out),
    ])
    assert rc == 0
    return {
        "model": pe.load_checkpoint(out),
        "inp": np.load(root / "input.npz"),
        "exp": np.load(root / "expected.npz"),
        "config": json.loads((root / "config.json").read_text()),
    }


def close(actual, expected, tol=FLOAT_TOL):
    actual = np.asarray(actual.detach() if torch.is_tensor(actual) else actual)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    ok = ~np.isnan(expected)
    assert np.max(np.abs(actual[ok] - expected[ok]), initial=0.0) <= tol


def test_checkpoint_config_from_official(fixture):
    cfg = fixture["model"].config
    d = fixture["config"]["derived"]
    v = cfg.vocab()
    assert (v.vocab_size, v.eos_id, v.prologue_offset, v.seq_len) == (
        d["ar_vocab_size"], d["eos_token_id"], d["prologue_offset"], d["ar_max_length"])
    assert cfg.null_class == d["null_class"]
    assert cfg.tokenizer.rope_axes == d["tokenizer_rope_axes_dim"] and cfg.ar.rope_axes == d["ar_rope_axes_dim"]


@torch.no_grad()
def test_encoder_and_quantizers(fixture):
    t, inp, exp = fixture["model"].tokenizer, fixture["inp"], fixture["exp"]
    images = torch.from_numpy(inp["images"])
    np.testing.assert_array_equal(patchify(images, 8).numpy(), inp["patches"])
    hidden = t.encoder_hidden(images)
    close(torch.cat([hidden["visual"], hidden["prologue"]], dim=1), exp["enc_hidden"])
    close(t.encoder.null_condition().reshape(1, -1), exp["enc_cond_emb"])
    close(t.rope_grid_queries_cos[:16], exp["enc_rope_cos_patches"])
    close(t.rope_grid_queries_sin[:16], exp["enc_rope_sin_patches"])
    close(t.rope_grid_queries_cos[16:], exp["enc_rope_cos_queries"])
    close(t.rope_grid_queries_sin[16:], exp["enc_rope_sin_queries"])
    z, logits = t.visual_quantizer.cosine_logits(hidden["visual"])
    close(z, exp["visual_z"])
    close(logits, exp["visual_cos_logits"])
    z, logits = t.prologue_quantizer.cosine_logits(hidden["prologue"])
    close(z, exp["prologue_z"])
    close(logits, exp["prologue_cos_logits"])
    prologue_ids, visual_ids = t.encode(images)
    assert prologue_ids.dtype == visual_ids.dtype == torch.int64
    np.testing.assert_array_equal(visual_ids.numpy(), exp["visual_ids"])
    np.testing.assert_array_equal(prologue_ids.numpy(), exp["prologue_ids"])
    np.testing.assert_array_equal(torch.cat([prologue_ids, visual_ids], 1).numpy(), exp["encode_idx"])
    train = t(images)  # training path: straight-through values
    close(train["prologue_onehot"], exp["prologue_onehot_fwd"])
    np.testing.assert_array_equal(train["visual_ids"].numpy(), exp["visual_ids"])


@torch.no_grad()
@pytest.mark.parametrize("which", ["enc", "given"])
def test_decoder(fixture, which):
    t, inp, exp = fixture["model"].tokenizer, fixture["inp"], fixture["exp"]
    ids = torch.from_numpy(exp["visual_ids"] if which == "enc" else inp["visual_ids_given"])
    close(t.visual_quantizer.codes(ids), exp[f"dec_codes_{which}"])
    close(t.decoder.null_condition().reshape(1, -1), exp["dec_cond_emb"])
    close(t.rope_grid_cos, exp["dec_rope_cos"])
    close(t.rope_grid_sin, exp["dec_rope_sin"])
    image = t.decode(ids)
    close(image, exp[f"dec_image_{which}"])
    close(patchify(image, 8), exp[f"dec_patches_{which}"])
    pixels = images_to_uint8(image).numpy().astype(int)
    expected = exp[f"dec_image_uint8_{which}"].astype(int)
    y = 127.5 * exp[f"dec_image_{which}"].astype(np.float64) + 128
    near_integer = np.abs(y - np.round(y)) < 1e-3
    diff = np.abs(pixels - expected)
    assert diff.max() <= 1 and np.all(near_integer[diff == 1])


@torch.no_grad()
def test_ar_teacher_forced_logits(fixture):
    ar, inp, exp = fixture["model"].ar, fixture["inp"], fixture["exp"]
    seq = torch.from_numpy(inp["ar_seq"])
    classes = torch.from_numpy(inp["ar_class_idx"])
    close(ar(seq, classes), exp["ar_logits_class"])
    close(ar(seq, torch.full_like(classes, ar.null_class)), exp["ar_logits_null"])
    close(ar.transformer.null_condition().reshape(1, -1), exp["ar_cond_emb"])
    close(ar.rope_cos, exp["ar_rope_cos"])
    close(ar.rope_sin, exp["ar_rope_sin"])
    np.testing.assert_array_equal(ar.logit_mask.numpy(), exp["ar_logit_mask"])


NOISE_CASES = ["split_cfg", "nocfg_split_temp", "overall_cosine_cfg", "split_cfg_topk_topp",
               "fixed_prologue_split_cfg"]


@pytest.mark.parametrize("case", NOISE_CASES + ["split_cfg_greedy"])
def test_sampling_cases(fixture, case):
    model, inp, exp = fixture["model"], fixture["inp"], fixture["exp"]
    settings = {k: v for k, v in fixture["config"]["sampling"][case].items() if k not in NOT_SETTINGS}
    classes = inp["sample_class_idx"]
    kwargs = {}
    if case == "split_cfg_greedy":
        uniform = np.random.default_rng(1).random((2, 21, 81), dtype=np.float32)  # must not matter
    else:
        uniform = inp[f"sample_{case}_uniform"]
    if case == "fixed_prologue_split_cfg":
        classes = inp[f"sample_{case}_class_idx"]
        fixed = inp[f"sample_{case}_fixed_prologue"]  # AR ids, one row for both samples
        kwargs["prologue_ids"] = np.repeat(fixed - model.config.vocab().prologue_offset, len(classes), 0)
    tokens, probs = pe.sample(model.ar, classes, settings, uniform=uniform, return_probs=True, **kwargs)
    np.testing.assert_array_equal(tokens.numpy(), exp[f"sample_{case}_tokens"])
    close(probs, exp[f"sample_{case}_probs"])


def test_torch_decodes_sampled_tokens(fixture):
    """The sampled sequence splits into ids the decoder accepts (the whole generation path)."""
    model, inp = fixture["model"], fixture["inp"]
    tokens = pe.sample(model.ar, inp["sample_class_idx"], {"cfg": 0.0}, seed=3)
    prologue, visual = pe.split_tokens(tokens, model.config.vocab())
    assert prologue.min() >= 0 and prologue.max() < 16 and visual.max() < 64
    with torch.no_grad():
        assert model.tokenizer.decode(visual).shape == (2, 3, 32, 32)


def test_wrong_slots_are_not_what_inference_uses(fixture, reference_dir, tmp_path):
    """The decoys (non-EMA tokenizer, EMA AR) give different outputs: the importer picks the right slots."""
    from safetensors.torch import load_file

    decoy = load_file(reference_dir / "fixture_a" / "ar" / "model_1.safetensors")
    ours = fixture["model"].ar.state_dict()
    assert not torch.equal(decoy["ar_model.out.weight"], ours["transformer.out.weight"])
    real = load_file(reference_dir / "fixture_a" / "ar" / "model.safetensors")
    assert torch.equal(real["ar_model.out.weight"], ours["transformer.out.weight"])
