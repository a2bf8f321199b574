"""Behaviour of the model on tiny presets with O(1) random weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prologue_export as pe
from prologue_export.ar import write_kv
from prologue_export.model import PrologueModel
from prologue_export.config import model_preset

from .conftest import randomize_


def tiny(name="tiny", seed=0):
    model = PrologueModel(model_preset(name))
    return randomize_(model, seed).eval()


def random_seq(vocab, batch, g):
    Z, X = vocab.num_prologue_tokens, vocab.num_visual_tokens
    parts = []
    if vocab.has_prologue:
        parts.append(torch.randint(0, vocab.prologue_codebook_size, (batch, Z), generator=g) + vocab.prologue_offset)
        parts.append(torch.full((batch, 1), vocab.eos_id))
    parts.append(torch.randint(0, vocab.visual_codebook_size, (batch, X), generator=g))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", ["tiny", "tiny-2d"])
@pytest.mark.parametrize("chunks", [[1] * 73, [9, 1, 1, 30, 32], [73]])
def test_kv_cache_steps_equal_full_forward(name, chunks):
    """Prefill + decode over the static cache gives the full causal forward's logits everywhere."""
    model = tiny(name)
    ar, vocab = model.ar, model.config.vocab()
    T = vocab.seq_len
    cover, total = [], 0
    for c in chunks + [T]:  # cover exactly T inputs (BOS + T-1 tokens) with these chunk sizes
        c = min(c, T - total)
        if c > 0:
            cover.append(c)
            total += c
    chunks = cover
    g = torch.Generator().manual_seed(1)
    B = 3
    seq = random_seq(vocab, B, g)
    classes = torch.tensor([0, 5, ar.null_class])
    with torch.no_grad():
        full = ar(seq, classes)  # [B, T, V]
        inputs = torch.cat([(classes + vocab.vocab_size)[:, None], seq[:, :-1]], dim=1)  # BOS as input id
        k, v = ar.new_kv_cache(B)
        k.normal_()  # slots not yet written must not matter
        v.normal_()
        got, start = [], 0
        for n in chunks:
            logits, k_new, v_new = ar.step(inputs[:, start:start + n], torch.tensor(start), k, v)
            assert k_new.shape == (ar.cfg.layers, B, ar.cfg.heads, n, ar.cfg.head_dim)
            write_kv(k, v, k_new, v_new, start)
            got.append(logits)
            start += n
    stepped = torch.cat(got, dim=1)
    assert stepped.shape == full.shape
    assert (stepped - full).abs().max() <= 1e-5


def test_step_does_not_modify_its_cache_inputs():
    ar = tiny().ar
    k, v = ar.new_kv_cache(2)
    with torch.no_grad():
        _, k_new, v_new = ar.step(torch.tensor([[ar.vocab.vocab_size], [ar.vocab.vocab_size + 1]]), torch.tensor([0]), k, v)
    assert k.abs().sum() == 0 and v.abs().sum() == 0
    assert k_new.shape == (2, 2, 2, 1, 32) and k_new.abs().sum() > 0


def test_decoder_ignores_the_prologue():
    """Decoding depends on visual ids only: changing the whole prologue path changes nothing."""
    model = tiny()
    t = model.tokenizer
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 64), generator=g)
    with torch.no_grad():
        before = t.decode(ids)
        t.prologue_quantizer.embedding.weight.normal_()
        t.encoder.learnable_query.normal_()
        after = t.decode(ids)
    assert torch.equal(before, after)
    # and in the training pass the reconstruction carries no gradient to the prologue quantizer
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    out = t(images)
    out["reconstruction"].square().mean().backward()
    assert t.prologue_quantizer.proj_in.weight.grad is None or t.prologue_quantizer.proj_in.weight.grad.abs().max() == 0


def test_sampling_respects_segments():
    """Under the logit mask the prologue, EOS and visual segments hold only their own tokens."""
    model = tiny()
    vocab = model.config.vocab()
    Z, Kv, Kp = vocab.num_prologue_tokens, vocab.visual_codebook_size, vocab.prologue_codebook_size
    for seed in range(3):
        tokens, probs = pe.sample(model.ar, [0, 3, 9, 10], {"cfg": 1.5, "temperature": 3.0}, seed=seed, return_probs=True)
        assert ((tokens[:, :Z] >= Kv) & (tokens[:, :Z] < Kv + Kp)).all()
        assert (tokens[:, Z] == vocab.eos_id).all()
        assert (tokens[:, Z + 1:] < Kv).all()
        assert (probs[:, :Z, :Kv] == 0).all() and (probs[:, :Z, Kv + Kp:] == 0).all()
        assert (probs[:, Z + 1:, Kv:] == 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(4, vocab.seq_len))


def test_mask_is_what_keeps_segments():
    """Without the mask the same model does emit cross-segment tokens (the test above can fail)."""
    model = tiny()
    model.ar.logit_mask.zero_()
    tokens = pe.sample(model.ar, [0, 1, 2, 3], {"cfg": 0.0, "temperature": 3.0}, seed=0)
    Kv = model.config.vocab().visual_codebook_size
    assert (tokens[:, 9:] >= Kv).any()


def test_seed_determinism_and_noise_contract():
    model = tiny()
    ar, vocab = model.ar, model.config.vocab()
    a = pe.sample(ar, [1, 2], {"cfg": 2.0}, seed=7)
    b = pe.sample(ar, [1, 2], {"cfg": 2.0}, seed=7)
    c = pe.sample(ar, [1, 2], {"cfg": 2.0}, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the seed stream is one rng.random((B, V), float32) per position, in order
    rng = np.random.Generator(np.random.PCG64(7))
    uniform = np.stack([rng.random((2, vocab.vocab_size), dtype=np.float32) for _ in range(vocab.seq_len)], axis=1)
    assert torch.equal(pe.sample(ar, [1, 2], {"cfg": 2.0}, uniform=uniform), a)


def test_fixed_prologue_is_kept_and_consumes_noise():
    model = tiny()
    ar, vocab = model.ar, model.config.vocab()
    first = pe.sample(ar, [4, 4], None, seed=0)
    prologue, _ = pe.split_tokens(first, vocab)
    again = pe.sample(ar, [4, 4], None, seed=1, prologue_ids=prologue)
    assert torch.equal(again[:, :vocab.num_prologue_tokens], first[:, :vocab.num_prologue_tokens])
    assert (again[:, vocab.num_prologue_tokens] == vocab.eos_id).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(class_ids=[11]), r"class ids must lie in \[0, 10\]"),
        (dict(class_ids=[1.5]), "1-D integer"),
        (dict(class_ids=[]), "empty"),
        (dict(class_ids=[1], seed=None), "exactly one of `seed`"),
        (dict(class_ids=[1], uniform=np.zeros((1, 3, 3), np.float32), seed=None), r"uniform must have shape \[1, 73, 321\]"),
        (dict(class_ids=[1], prologue_ids=[[64] * 8]), r"raw prologue codes in \[0, 64\)"),
        (dict(class_ids=[1], prologue_ids=[[1] * 7]), r"prologue_ids must be integer \[B, Z\] = \[1, 8\]"),
        (dict(class_ids=[1], settings={"topK": -1}), "top_k must be an integer >= 0"),
    ],
)
def test_sampler_rejects_bad_input(kwargs, message):
    ar = tiny().ar
    kwargs.setdefault("seed", 0)
    with pytest.raises((ValueError, pe.ConfigError), match=message):
        pe.sample(ar, **kwargs)


def test_decode_and_encode_reject_bad_input():
    t = tiny().tokenizer
    with pytest.raises(ValueError, match=r"visual_ids must be \[B, 64\]"):
        t.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"visual_ids must lie in \[0, 256\)"):
        t.decode(torch.full((1, 64), 256))
    with pytest.raises(ValueError, match=r"images must be float \[B, 1, 32, 32\]"):
        t.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="uint8_to_images"):
        t.encode(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def _joint_ce(model, images, detach_onehot=False):
    t, ar = model.tokenizer, model.ar
    out = t(images)
    vocab = model.config.vocab()
    onehot = out["prologue_onehot"].detach() if detach_onehot else out["prologue_onehot"]
    seq = torch.cat([out["prologue_ids"] + vocab.prologue_offset,
                     torch.full((images.shape[0], 1), vocab.eos_id), out["visual_ids"]], dim=1)
    classes = torch.full((images.shape[0],), ar.null_class)
    logits = ar(seq, classes, prologue_onehot=onehot)
    return F.cross_entropy(logits.flatten(0, 1), seq.flatten())


def _grad_norm(params):
    grads = [p.grad for p in params if p.grad is not None]
    return sum(float(g.abs().sum()) for g in grads)


def test_ce_reaches_the_encoder_only_through_the_prologue_onehots():
    model = tiny()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    _joint_ce(model, images).backward()
    t = model.tokenizer
    assert _grad_norm(t.encoder.parameters()) > 0
    assert _grad_norm(t.prologue_quantizer.parameters()) > 0
    assert _grad_norm(t.visual_quantizer.parameters()) == 0  # visual ids are hard: no gradient
    assert _grad_norm(t.decoder.parameters()) == 0
    model.zero_grad(set_to_none=True)
    _joint_ce(model, images, detach_onehot=True).backward()
    assert _grad_norm(t.encoder.parameters()) == 0
    assert _grad_norm(t.prologue_quantizer.parameters()) == 0
    assert _grad_norm(model.ar.parameters()) > 0


def test_post_variant_ce_leaves_the_visual_path_alone():
    model = tiny("tiny-post")
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    _joint_ce(model, images).backward()
    t = model.tokenizer
    for part in (t.encoder, t.visual_quantizer, t.decoder):
        assert _grad_norm(part.parameters()) == 0
    assert _grad_norm(t.prologue_encoder.parameters()) > 0
    assert _grad_norm(t.prologue_quantizer.parameters()) > 0


def test_visual_input_dropout_replaces_inputs_not_targets():
    model = tiny()
    ar, vocab = model.ar, model.config.vocab()
    seq = random_seq(vocab, 2, torch.Generator().manual_seed(3))
    classes = torch.tensor([1, 2])
    drop = torch.tensor([True, False])
    with torch.no_grad():
        dropped = ar(seq, classes, drop_visual_inputs=drop)
        plain = ar(seq, classes)
        manual = seq.clone()
        manual[0, vocab.visual_start:] = vocab.eos_id
        manual[0, -1] = seq[0, -1]  # the last token is never an input
        expected = ar(manual, classes)
    assert torch.allclose(dropped[0], expected[0], atol=1e-6)
    assert torch.equal(dropped[1], plain[1])
    assert not torch.allclose(dropped[0], plain[0])


def test_output_head_runs_in_float32_under_autocast():
    """The release's float32 island (models.py:625-634): output norm + output layer in fp32 math
    even under bf16 autocast, so AR logits are fp32 (compared against the same head without autocast)."""
    from prologue_export.ar import ARModel
    from prologue_export.config import ar_preset, model_preset

    cfg = model_preset("tiny")
    ar = ARModel(ar_preset("tiny"), cfg.vocab(), cfg.num_classes).eval()
    torch.manual_seed(0)
    e = torch.randn(2, 5, ar.cfg.dim)
    cond = ar.transformer.condition(2)
    plain = ar.transformer.head(e, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ar.transformer.head(e.bfloat16(), cond)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ar.transformer.head(e.bfloat16().float(), cond), rtol=0, atol=0)
    assert plain.dtype == torch.float32
