"""Fresh models start from the release's distribution (OFFICIAL_TRAINING.md §5), the quantizers
run in float32 under autocast (§2.6), and phase-3 dropout also hits the condition (§4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from prologue_export.ar import ARModel
from prologue_export.config import ARConfig, ModelConfig, SamplingConfig, TokenizerConfig, TransformerSize
from prologue_export.layers import Block
from prologue_export.model import PrologueModel
from prologue_export.runtime.settings import VocabLayout, cfg_scale_at
from prologue_export.tokenizer import PrologueQuantizer, VisualQuantizer

STD = 0.02
TINY = STD * 1e-5


def _config(variant="prologue", emb_dropout=0.0) -> ModelConfig:
    size = TransformerSize(256, 2, 4)  # head dim 64: the released RoPE axes
    tok = TokenizerConfig(
        variant=variant, image_size=32, patch_size=4, channels=3, encoder=size, decoder=size,
        visual_codebook_size=1024, prologue_codebook_size=0 if variant == "2d" else 256,
        num_prologue_tokens=0 if variant == "2d" else 8,
        prologue_encoder=TransformerSize(128, 2, 2) if variant == "post" else None,
    )
    ar = ARConfig(dim=256, layers=2, heads=4, emb_dropout=emb_dropout)
    return ModelConfig(num_classes=10, tokenizer=tok, ar=ar).validate()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PrologueModel(_config())


def _groups(model: PrologueModel):
    """name -> group, per OFFICIAL_TRAINING.md §5."""
    out = {}
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        if name.endswith(("q_norm.weight", "k_norm.weight", "cond_proj.1.weight")):
            out[name] = "zero"  # plain RMS-norm weights (models.py:61)
        elif leaf == "bias":
            out[name] = "zero"  # every Linear bias (models.py:40)
        elif ".gate1." in name or ".gate_mlp." in name or ".affine." in name or name == "tokenizer.decoder.out.weight":
            out[name] = "tiny"  # x 1e-5 (models.py:59, 287, 302, 396)
        elif name.endswith("embedding.weight"):
            out[name] = "codebook"  # simvq N(0, 1/14) (models.py:1222-1223)
        else:
            out[name] = "normal"  # trunc_normal(0.02), unscaled
    return out


def test_every_tensor_follows_the_release(model):
    groups = _groups(model)
    params = dict(model.named_parameters())
    assert {"normal", "tiny", "zero", "codebook"} == set(groups.values())
    for name, group in groups.items():
        p = params[name].detach().double()
        if group == "zero":
            assert torch.count_nonzero(p) == 0, name
            continue
        std = {"normal": STD, "tiny": TINY, "codebook": 14 ** -0.5}[group]
        n = p.numel()
        tol = max(0.03, 5 / math.sqrt(2 * n))  # relative sampling error of a std estimate, 5 sigma
        assert abs(p.std().item() / std - 1) < tol, (name, p.std().item(), std)
        assert abs(p.mean().item()) < 5 * std / math.sqrt(n), name
        assert p.abs().max().item() <= 2.0 * (std / STD if group != "codebook" else 1e9), name  # bounds +-2 (x scale)
        if n >= 20000:  # gaussian shape, not uniform: mass within one sigma
            inside = (p.abs() < std).double().mean().item()
            assert abs(inside - 0.6827) < 0.01, (name, inside)


def test_named_groups(model):
    tok, ar = model.tokenizer, model.ar
    groups = _groups(model)
    for name in ("tokenizer.encoder.layers.0.attn1.to_q.weight", "tokenizer.encoder.layers.1.ffn.fc2.weight",
                 "tokenizer.encoder.layers.0.attn1.proj.weight", "tokenizer.encoder.input_layer.weight",
                 "tokenizer.encoder.learnable_query", "tokenizer.encoder.cond_proj.0.weight",
                 "tokenizer.visual_quantizer.proj_in.weight", "tokenizer.prologue_quantizer.proj_in.weight",
                 "ar.class_emb.weight", "ar.token_emb.weight", "ar.transformer.out.weight"):
        assert groups[name] == "normal", name
    for name in ("tokenizer.decoder.out.weight", "ar.transformer.out_norm.affine.weight",
                 "ar.transformer.layers.1.gate_mlp.weight", "tokenizer.decoder.layers.0.adaln_1.affine.weight"):
        assert groups[name] == "tiny", name
    assert tok.decoder.out.bias is not None and ar.transformer.out.bias is None  # AR out: no bias
    assert groups["tokenizer.prologue_quantizer.embedding.weight"] == "codebook"


def test_blocks_start_as_the_identity(model):
    torch.manual_seed(1)
    for tf in (model.tokenizer.encoder, model.tokenizer.decoder, model.ar.transformer):
        cond = tf.null_condition()
        for layer in tf.layers:
            assert isinstance(layer, Block)
            x = torch.randn(2, 16, 256)
            cos, sin = torch.ones(16, 32), torch.zeros(16, 32)
            with torch.no_grad():
                y = layer(x, cond, cos, sin)
                scale = 1 + layer.adaln_1.affine(cond)
                gate = layer.gate1(cond)
            assert (y - x).abs().max() < 1e-4 * x.abs().max()
            assert (scale - 1).abs().max() < 1e-4 and gate.abs().max() < 1e-4


def test_decoder_output_starts_near_zero(model):
    ids = torch.randint(0, 1024, (2, 64))
    with torch.no_grad():
        assert model.tokenizer.decode(ids).abs().max() < 1e-4


def test_fresh_prologue_is_input_independent(model):
    """At init every block is ~the identity, so the query outputs are ~the learned queries
    themselves: one prologue code per position, whatever the image (visual codes still vary)."""
    torch.manual_seed(2)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        p_ids, v_ids = model.tokenizer.encode(images)
    assert (p_ids == p_ids[:1]).all()
    assert len(set(p_ids[0].tolist())) > 1  # but not one code for every position
    assert not (v_ids == v_ids[:1]).all()


def test_direct_ar_and_other_variants_get_the_init():
    torch.manual_seed(3)
    ar = ARModel(ARConfig(dim=256, layers=2, heads=4), VocabLayout(1024, 256, 8, 64), 10)
    assert abs(ar.token_emb.weight.std().item() / STD - 1) < 0.03  # not nn.Embedding's N(0, 1)
    assert abs(ar.transformer.layers[0].gate1.weight.std().item() / TINY - 1) < 0.05
    for variant in ("2d", "post"):
        m = PrologueModel(_config(variant))
        assert abs(m.tokenizer.decoder.out.weight.std().item() / TINY - 1) < 0.05
        if variant == "post":
            assert abs(m.tokenizer.prologue_encoder.learnable_query.std().item() / STD - 1) < 0.1


def test_meta_construction_draws_nothing():
    with torch.device("meta"):
        m = PrologueModel(_config())
    assert all(p.device.type == "meta" for p in m.parameters())


# -- §2.6: quantizers in float32 with autocast off ---------------------------------------------


def test_quantizers_run_in_fp32_under_autocast():
    torch.manual_seed(4)
    vq, pq = VisualQuantizer(256, 14, 1024), PrologueQuantizer(256, 14, 256)
    h = torch.randn(2, 16, 256)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16  # autocast is live
        v_amp, p_amp = vq(h, 0.25), pq(h, 0.1)
        ids_amp, logits_amp = vq.ids(h), vq.cosine_logits(h)[1]
        codes_amp = vq.codes(ids_amp)
    v, p = vq(h, 0.25), pq(h, 0.1)
    for amp, ref in ((v_amp, v), (p_amp, p)):
        for key in ref:
            if ref[key].is_floating_point():
                assert amp[key].dtype == torch.float32, key
            assert torch.equal(amp[key], ref[key]), key
    assert logits_amp.dtype == torch.float32 and torch.equal(logits_amp, vq.cosine_logits(h)[1])
    assert torch.equal(ids_amp, vq.ids(h)) and torch.equal(codes_amp, vq.codes(ids_amp))
    # bf16 hidden states from an autocast encoder are promoted to fp32 before the projection
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z = vq.latents(h.bfloat16())
    assert z.dtype == torch.float32 and torch.equal(z, vq.latents(h.bfloat16().float()))
    # the straight-through gradient flows in fp32 too
    h2 = h.clone().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        pq(h2, 0.1)["onehot"].sum().backward()
    assert h2.grad.dtype == torch.float32


# -- §4: phase-3 dropout on the condition embedding ----------------------------------------------


def _ar(emb_dropout):
    torch.manual_seed(5)
    return ARModel(ARConfig(dim=64, layers=2, heads=2, rope_axes=[12, 10, 10], emb_dropout=emb_dropout),
                   VocabLayout(32, 16, 4, 16), 10)


def test_condition_dropout_in_training_matches_the_release_order():
    ar = _ar(0.5).train()
    seq = torch.randint(0, 32, (4, 21))
    classes = torch.tensor([1, 2, 10, 3])
    torch.manual_seed(6)
    got = ar(seq, classes)
    # by hand: dropout on [BOS ; tokens] (models.py:564), then on cond_proj.0's output per sample,
    # before its RMS norm and GELU (models.py:566-569), then the layers with that condition
    torch.manual_seed(6)
    tf = ar.transformer
    e = F.dropout(ar.input_embeddings(seq, classes), 0.5, True)
    onehot = torch.zeros(4, 1, 11)
    onehot[..., -1] = 1
    cond = tf.cond_proj[2](tf.cond_proj[1](F.dropout(tf.cond_proj[0](onehot), 0.5, True)))
    assert not torch.equal(cond[0], cond[1])  # one mask per sample
    L = e.shape[1]
    for layer in tf.layers:
        e = layer(e, cond, ar.rope_cos[:L], ar.rope_sin[:L], True)
    assert torch.equal(got, tf.head(e, cond))
    # and it matters: without the condition's dropout the result differs
    torch.manual_seed(6)
    e2 = F.dropout(ar.input_embeddings(seq, classes), 0.5, True)
    for layer in tf.layers:
        e2 = layer(e2, tf.null_condition(), ar.rope_cos[:L], ar.rope_sin[:L], True)
    assert not torch.allclose(got, tf.head(e2, tf.null_condition()))


def test_condition_dropout_is_training_only():
    with_drop, without = _ar(0.5).eval(), _ar(0.0).eval()
    without.load_state_dict(with_drop.state_dict())
    seq = torch.randint(0, 32, (2, 21))
    classes = torch.tensor([4, 10])
    with torch.no_grad():
        assert torch.equal(with_drop(seq, classes), without(seq, classes))
        assert torch.equal(with_drop.transformer.condition(2), with_drop.transformer.null_condition())
    without.train()
    assert torch.equal(without.transformer.condition(3), without.transformer.null_condition())


# -- split CFG with one segment's schedule unset (OFFICIAL_MODEL.md §5.2; release models.py:1068, 1074)


def test_split_cfg_unset_segment_is_constant():
    vocab = VocabLayout(16384, 1024, 16, 256)  # Z = 16, T = 273
    # only the visual schedule set, whole-sequence schedule cosine: prologue steps are constant S_p
    s = SamplingConfig(cfg=2.0, cfg_schedule="cosine", cfg_power=1.5, visual_cfg_schedule="cosine",
                       visual_cfg_scale=3.0, prologue_cfg_scale=0.7)
    for step in (0, 5, 15):
        assert cfg_scale_at(step, s, vocab) == 0.7
    assert cfg_scale_at(16, s, vocab) == 1.0  # EOS step: t = 0, start 1
    t = (100 - 16) / 257
    assert cfg_scale_at(100, s, vocab) == pytest.approx(1.0 + 2.0 * (1 - math.cos(math.pi * t**1.5)) / 2, abs=1e-12)
    # only the prologue schedule set: visual steps constant S_v (or cfg when S_v is unset)
    s = SamplingConfig(cfg=2.0, cfg_schedule="cosine", prologue_cfg_schedule="linear", prologue_cfg_scale=0.8)
    assert cfg_scale_at(4, s, vocab) == pytest.approx(0.0 + 0.8 * 4 / 16, abs=1e-12)
    for step in (16, 17, 200, 272):
        assert cfg_scale_at(step, s, vocab) == 2.0
    s = s.updated(visual_cfg_scale=3.5)
    assert cfg_scale_at(272, s, vocab) == 3.5
