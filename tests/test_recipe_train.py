"""The release's training recipe (../shared/reference/OFFICIAL_TRAINING.md, issue 13): the step-A
CE normalisation, the A/B alternation and per-optimizer schedules, the AR weight-decay groups,
the EMA half-lives, the released presets, and the codebook-usage log of phase 1."""

import json

import pytest
import torch

from prologue_export.ar import ARModel
from prologue_export.cli import main
from prologue_export.config import VocabLayout, ar_preset
from prologue_export.train import common
from prologue_export.train.configs import (OptimConfig, TokenizerTrainConfig, ar_train_preset, load_train_config,
                                           tokenizer_train_preset)
from prologue_export.train.tokenizer import TokenizerTrainer, joint_ce, segment_ce

FAST = ["run.compile=false", "run.num_workers=0", "run.batch_size=16", "run.log_every=1",
        "run.image_every=1000", "gan.base_channels=8", "gan_start=0"]

# --------------------------------------------------------------------------- 1. CE normalisation

VOCAB = VocabLayout(visual_codebook_size=4, prologue_codebook_size=3, num_prologue_tokens=2, num_visual_tokens=3)


def _fake_ar(logits):
    def ar(seq, classes, prologue_onehot=None, drop_visual_inputs=None):
        ar.seq = seq
        return logits
    return ar


def test_segment_ce_is_the_segment_sum_over_T_hand_computed():
    B, Z, X = 2, VOCAB.num_prologue_tokens, VOCAB.num_visual_tokens
    T, V = Z + 1 + X, VOCAB.vocab_size
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(0))
    prologue = torch.tensor([[0, 2], [1, 1]])
    visual = torch.tensor([[3, 0, 1], [2, 2, 0]])
    ar = _fake_ar(logits)
    pro, vis, ce = joint_ce(ar, VOCAB, prologue, visual, None, None, null_class=10)
    seq = ar.seq.tolist()
    assert seq[0] == [4, 6, VOCAB.eos_id, 3, 0, 1]  # prologue + K_v, EOS, visual
    # by hand: per sample, sum of -log softmax at the target over the segment, / T, batch mean
    tok = [[float(torch.logsumexp(logits[b, t], 0) - logits[b, t, seq[b][t]]) for t in range(T)] for b in range(B)]
    want_pro = sum(sum(tok[b][:Z + 1]) / T for b in range(B)) / B
    want_vis = sum(sum(tok[b][Z + 1:]) / T for b in range(B)) / B
    assert float(pro) == pytest.approx(want_pro, rel=1e-6)
    assert float(vis) == pytest.approx(want_vis, rel=1e-6)
    # step B's AR loss is the token mean over all T positions; step A's is 3 * that with weights 3/3
    mean = sum(map(sum, tok)) / (B * T)
    assert float(pro + vis) == pytest.approx(mean, rel=1e-6)
    assert float(3.0 * pro + 3.0 * vis) == pytest.approx(3 * mean, rel=1e-6)
    assert torch.allclose(ce, torch.tensor(tok), atol=1e-6)


def test_prologue_and_visual_tokens_get_the_same_per_token_gradient():
    B, T, V = 3, VOCAB.seq_len, VOCAB.vocab_size
    logits = torch.zeros(B, T, V, requires_grad=True)  # same softmax everywhere: the weight shows alone
    prologue = torch.tensor([[0, 2], [1, 1], [2, 0]])
    visual = torch.tensor([[3, 0, 1], [2, 2, 0], [1, 1, 1]])
    ar = _fake_ar(logits)
    pro, vis, _ = joint_ce(ar, VOCAB, prologue, visual, None, None, null_class=10)
    (3.0 * pro + 3.0 * vis).backward()
    g = logits.grad
    target_grad = g.gather(2, ar.seq.unsqueeze(-1)).squeeze(-1)  # [B, T]
    want = 3.0 / (B * T) * (1.0 / V - 1.0)  # d/dlogit_y of 3 * CE / (B T)
    assert torch.allclose(target_grad, torch.full_like(target_grad, want), atol=1e-7)
    Z = VOCAB.num_prologue_tokens
    norms = g.norm(dim=-1)  # [B, T]: a prologue token's gradient is as large as a visual token's
    assert torch.allclose(norms[:, :Z], norms[:, Z + 1:Z + 1 + Z], atol=1e-8)
    assert torch.allclose(norms, norms[0, 0].expand_as(norms), atol=1e-8)


def test_segment_ce_matches_the_token_mean():
    logits = torch.randn(4, 7, 9)
    seq = torch.randint(0, 9, (4, 7))
    pro, vis, _ = segment_ce(logits, seq, 2)
    assert float(pro + vis) == pytest.approx(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                                                       seq.flatten())), rel=1e-6)


# --------------------------------------------------------------------------- 2. schedule and A/B


def test_lr_schedule_is_the_release_formula():
    opt = OptimConfig(lr=1e-3, lr_min=1e-4, warmup_steps=4, flat_steps=2)
    assert common.lr_at(0, 10, opt) == 0.0  # the first call runs at lr 0 (and is skipped)
    assert common.lr_at(1, 10, opt) == pytest.approx(2.5e-4)
    assert common.lr_at(4, 10, opt) == pytest.approx(1e-3)  # warm-up ends
    assert common.lr_at(5, 10, opt) == pytest.approx(1e-3)  # flat ("peak") calls 4, 5
    assert common.lr_at(6, 10, opt) == pytest.approx(1e-3)  # decay starts from lr
    assert common.lr_at(9, 10, opt) == pytest.approx(1e-4 + 9e-4 * 0.25)  # last call: one decay step above lr_min
    assert common.lr_at(10, 10, opt) == pytest.approx(1e-4)
    rel = tokenizer_train_preset("prologue-b")
    for o in (rel.optim_tokenizer, rel.optim_ar, rel.optim_disc):  # horizon total/2 = 1M calls each
        assert common.lr_at(0, rel.run.steps, o) == 0.0
        assert common.lr_at(1, rel.run.steps, o) == pytest.approx(1e-4 / 20000)
        assert common.lr_at(20000, rel.run.steps, o) == pytest.approx(1e-4)
        assert common.lr_at(119_999, rel.run.steps, o) == pytest.approx(1e-4)
        assert common.lr_at(999_999, rel.run.steps, o) == pytest.approx(1e-5 + 9e-5 / 880_000)


def _opt_name(opt):
    g = opt.param_groups[0]
    if tuple(g["betas"]) == (0.9, 0.99):
        return "joint_ar"
    return "disc" if g["weight_decay"] > 0 else "tokenizer"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """6 A/B pairs; every optimizer call recorded (name, lr, whether it stepped)."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    calls = []
    real = common.clip_and_step

    def spy(optimizer, params, grad_clip, acc, fix_nonfinite=False):
        lr = common.optimizer_lr(optimizer)
        calls.append((_opt_name(optimizer), lr))
        return real(optimizer, params, grad_clip, acc, fix_nonfinite)

    mp = pytest.MonkeyPatch()
    mp.setattr(common, "clip_and_step", spy)
    try:
        rc = main(["train", "tokenizer", "--config", "tiny", "--data", "synthetic:64", "--out", str(out), *FAST,
                   "steps=6", "run.checkpoint_every=6", "optim_tokenizer.warmup_steps=2",
                   "optim_tokenizer.flat_steps=1", "optim_ar.warmup_steps=3", "optim_disc.warmup_steps=2"])
    finally:
        mp.undo()
    assert rc == 0
    return out, calls


def test_a_b_alternation_and_each_optimizers_schedule(tiny_run):
    out, calls = tiny_run
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, str(out / "train_config.json"), [])
    steps = cfg.run.steps
    # every pair: step A (tokenizer) then step B (discriminator, joint AR); one call each per pair
    assert [n for n, _ in calls] == ["tokenizer", "disc", "joint_ar"] * steps
    for name, ocfg in (("tokenizer", cfg.optim_tokenizer), ("joint_ar", cfg.optim_ar), ("disc", cfg.optim_disc)):
        lrs = [lr for n, lr in calls if n == name]
        assert lrs == pytest.approx([common.lr_at(k, steps, ocfg) for k in range(steps)]), name
        W = ocfg.warmup_steps
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(ocfg.lr / W) and lrs[W] == pytest.approx(ocfg.lr)
        P = ocfg.flat_steps
        assert lrs[-1] == pytest.approx(ocfg.lr_min + (ocfg.lr - ocfg.lr_min) / (steps - W - P))
    # the first call of every optimizer is skipped: AdamW counted steps - 1 updates
    state = json.loads((out / "checkpoint" / common.STATE_FILE).read_text())
    for name in ("tokenizer", "joint_ar", "disc"):
        from safetensors.torch import load_file

        t = load_file(out / "checkpoint" / f"train_optim_{name}.safetensors")
        counts = {float(v) for k, v in t.items() if k.endswith(".step")}
        counts |= {float(v) for k, v in state["optimizers"][name]["scalars"].items() if k.endswith(".step")}
        assert counts == {steps - 1.0}, (name, counts)


# --------------------------------------------------------------------------- 3. weight decay groups


def test_ar_weight_decay_groups():
    ar = ARModel(ar_preset("tiny"), VOCAB, 10)
    opt = common.make_optimizer(ar.named_parameters(), OptimConfig(weight_decay=0.03), no_decay=common.ar_no_decay)
    names = {id(p): n for n, p in ar.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.03, 0.0]
    assert set(decay) | set(no_decay) == set(names.values())
    # no decay: biases, RMS-norm weights, adaLN affine weights and biases, out_norm
    for n in no_decay:
        assert ("bias" in n or "norm" in n or "adaln" in n or n == "transformer.cond_proj.1.weight"), n
    assert "transformer.layers.0.adaln_1.affine.weight" in no_decay  # a 2-D matrix, excluded by name
    assert "transformer.out_norm.affine.weight" in no_decay
    assert {"transformer.layers.0.attn1.q_norm.weight", "transformer.cond_proj.1.weight",
            "transformer.cond_proj.0.bias"} <= set(no_decay)
    # decayed: embeddings, projections, gates, the output layer
    assert {"class_emb.weight", "token_emb.weight", "transformer.cond_proj.0.weight", "transformer.out.weight",
            "transformer.layers.0.gate1.weight", "transformer.layers.0.gate_mlp.weight",
            "transformer.layers.1.attn1.to_q.weight", "transformer.layers.1.attn1.to_kv.weight",
            "transformer.layers.1.attn1.proj.weight", "transformer.layers.1.ffn.fc1.weight",
            "transformer.layers.1.ffn.fc2.weight"} <= set(decay)
    assert all(p.dim() >= 2 for n, p in ar.named_parameters() if n in decay)


def test_trainer_optimizer_groups():
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny", FAST)
    t = TokenizerTrainer(cfg, common.make_accelerator(cfg.run))
    assert [g["weight_decay"] for g in t.optimizers["joint_ar"].param_groups] == [0.03, 0.0]
    disc = t.optimizers["disc"].param_groups
    assert len(disc) == 1 and disc[0]["weight_decay"] == 1e-4  # every discriminator parameter, BN included
    assert len(disc[0]["params"]) == len(list(t.gan.parameters()))
    tok = t.optimizers["tokenizer"].param_groups
    assert len(tok) == 1 and tok[0]["weight_decay"] == 0.0
    assert t.emas["tokenizer"].decay == pytest.approx(0.5 ** (1 / cfg.ema_halflife))
    assert t.emas["joint_ar"].decay == pytest.approx(0.5 ** (1 / cfg.ar_ema_halflife))


# --------------------------------------------------------------------------- 4. presets


def test_released_presets():
    p1 = tokenizer_train_preset("prologue-b")
    assert p1.run.steps == 1_000_000 and p1.run.batch_size == 256 and p1.run.seed == 42
    assert p1.ema_halflife == 1000 and p1.ar_ema_halflife == 2500
    assert p1.optim_tokenizer.betas == [0.0, 0.99] and p1.optim_tokenizer.weight_decay == 0
    assert p1.optim_ar.betas == [0.9, 0.99] and p1.optim_ar.weight_decay == 0.03
    assert p1.optim_disc.betas == [0.0, 0.99] and p1.optim_disc.weight_decay == 1e-4
    for o in (p1.optim_tokenizer, p1.optim_ar, p1.optim_disc):
        assert (o.lr, o.lr_min, o.warmup_steps, o.flat_steps, o.grad_clip) == (1e-4, 1e-5, 20000, 100000, 0.0)
    assert (p1.ce_weight_prologue, p1.ce_weight_visual, p1.visual_input_dropout) == (3.0, 3.0, 0.5)
    assert (p1.gan_weight, p1.gan_start, p1.gan.r1_weight, p1.gan.lecam_weight) == (0.1, 0, 0.01, 0.001)
    assert p1.joint_ar.dropout == 0 and p1.joint_ar.emb_dropout == 0 and p1.joint_ar.layers == 7
    assert tokenizer_train_preset("2d").run.steps == 750_000
    for size in ("base", "large", "xlarge"):
        p3 = ar_train_preset(size)
        assert (p3.run.steps, p3.run.batch_size, p3.run.seed) == (500_000, 2048, 42)
        o = p3.optim
        assert (o.lr, o.lr_min, o.warmup_steps, o.flat_steps, o.betas, o.weight_decay, o.grad_clip) == (
            4e-4, 1e-5, 62500, 0, [0.9, 0.96], 0.03, 1.0)
        assert (p3.label_drop, p3.ar.dropout, p3.ar.emb_dropout, p3.ema_halflife) == (0.1, 0.1, 0.1, 2500)


# --------------------------------------------------------------------------- 5. codebook usage


def test_code_usage():
    assert common.code_usage(torch.tensor([2, 2, 0, 0])) == (2, pytest.approx(2.0))
    used, ppl = common.code_usage(torch.tensor([5, 0, 0, 0]))
    assert used == 1 and ppl == pytest.approx(1.0)


def test_phase1_logs_codebook_usage(tiny_run):
    out, _ = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    K = {"prologue": 64, "visual": 256}  # the tiny tokenizer
    for r in records:
        for book, k in K.items():
            for suffix in ("", "_window"):
                used, ppl = r[f"{book}_used{suffix}"], r[f"{book}_ppl{suffix}"]
                assert 1 <= used <= k and 1 <= ppl <= used + 1e-6, (book, suffix, r)
                assert float(used).is_integer()
        assert 0 <= r["prior_enc"] and r["ce_prologue"] > 0


def test_progress_bar_shows_prologue_codes(tmp_path, capfd):
    rc = main(["train", "tokenizer", "--config", "tiny", "--data", "synthetic:32", "--out", str(tmp_path / "r"),
               *FAST, "steps=2"])
    assert rc == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenizer[prologue]: 2/2")]
    assert lines and "p_codes=" in lines[0] and "/64" in lines[0], err[-2000:]
