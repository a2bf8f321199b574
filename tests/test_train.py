"""Training phases 1-3 on tiny configs: losses fall, exact resume after kill -9, interrupted
checkpoint writes, process-count independence, gradient routing of phase 1."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prologue_export as pe
from prologue_export.cli import main
from prologue_export.train import common
from prologue_export.train.configs import TokenizerTrainConfig, load_train_config, tokenizer_train_preset
from prologue_export.train.tokenizer import TokenizerTrainer

FAST = ["run.compile=false", "run.num_workers=0", "run.batch_size=16", "run.log_every=1",
        "run.image_every=1000", "gan.base_channels=8", "gan_start=0"]


def cli(*args):
    rc = main([str(a) for a in args])
    assert rc == 0


def run_cli_subprocess(args, env=None, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "prologue_export.cli"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def first_last(values, k=3):
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    out = tmp_path_factory.mktemp("p1") / "run"
    cli("train", "tokenizer", "--config", "tiny", "--data", "synthetic:256", "--out", out, *FAST, "steps=30",
        "run.checkpoint_every=15", "optim_tokenizer.warmup_steps=5")
    return out


@pytest.fixture(scope="module")
def tokens(phase1, tmp_path_factory):
    out = tmp_path_factory.mktemp("p2") / "tokens"
    cli("train", "pretokenize", "--checkpoint", phase1 / "checkpoint", "--data", "synthetic:256", "--out", out,
        "--shard-size", "100", "--batch-size", "64", "--num-workers", "0")
    return out


def test_phase1_prologue_losses_fall(phase1):
    m = metrics(phase1)
    for key in ("l1", "ce_prologue", "ar_ce"):
        first, last = first_last([r[key] for r in m])
        assert last < first, (key, first, last)
    model = pe.load_checkpoint(phase1 / "checkpoint")
    assert model.ar is None and model.tokenizer.cfg.variant == "prologue"
    assert sorted(p.name for p in (phase1 / "images").iterdir()) == ["recon_step0000030.png"]
    assert "_orig_mod" not in "".join(load_file(phase1 / "checkpoint" / "tokenizer.safetensors"))


@pytest.mark.parametrize("variant", ["tiny-2d", "tiny-post"])
def test_phase1_variants_losses_fall(tmp_path, variant, phase1):
    extra = []
    if variant == "tiny-post":
        base = tmp_path / "base2d"
        cli("train", "tokenizer", "--config", "tiny-2d", "--data", "synthetic:128", "--out", base, *FAST, "steps=3")
        extra = [f"init_from={base / 'checkpoint'}"]
    out = tmp_path / "run"
    cli("train", "tokenizer", "--config", variant, "--data", "synthetic:256", "--out", out, *FAST, "steps=25",
        "optim_tokenizer.warmup_steps=5", *extra)
    m = metrics(out)
    key = "l1" if variant == "tiny-2d" else "ce_prologue"
    first, last = first_last([r[key] for r in m])
    assert last < first, (first, last)
    if variant == "tiny-post":  # the frozen 2d path is unchanged
        frozen = pe.load_checkpoint(extra[0].split("=", 1)[1]).tokenizer.decoder.state_dict()
        trained = pe.load_checkpoint(out / "checkpoint").tokenizer.decoder.state_dict()
        assert all(torch.equal(frozen[k], trained[k]) for k in frozen)


def test_phase2_shards(tokens):
    index = json.loads((tokens / "index.json").read_text())
    assert index["complete"] and index["num_images"] == 256 and len(index["shards"]) == 3
    from prologue_export.train.pretokenize import TokenShards

    ts = TokenShards(tokens)
    assert ts.ids[0].shape == (100, 10, 8 + 64)
    tok = pe.load_checkpoint(tokens / "tokenizer").tokenizer
    from prologue_export.train.data import SyntheticDataset, ten_crop, to_model_input

    image, label = SyntheticDataset(256, 32, 1, 10)[5]
    prologue, visual = tok.encode(to_model_input(torch.from_numpy(ten_crop(image, 32, 1)), "cpu"))
    assert torch.equal(torch.cat([prologue, visual], 1), torch.from_numpy(ts.ids[0][5].astype("int64")))
    assert ts.labels[5] == label


def test_phase2_resumes_after_interruption(phase1, tmp_path):
    out = tmp_path / "tokens"
    args = ["train", "pretokenize", "--checkpoint", phase1 / "checkpoint", "--data", "synthetic:200", "--out", out,
            "--shard-size", "50", "--batch-size", "50", "--num-workers", "0"]
    cli(*args)
    reference = {p.name: p.read_bytes() for p in out.glob("shard_*")}
    index = json.loads((out / "index.json").read_text())
    # simulate a run killed after two shards: drop the rest from the index and the disk
    index["shards"], index["complete"] = index["shards"][:2], False
    (out / "index.json").write_text(json.dumps(index))
    for p in out.glob("shard_0000[23]_*"):
        p.unlink()
    with pytest.raises(Exception, match="did not finish"):
        from prologue_export.train.pretokenize import TokenShards

        TokenShards(out)
    cli(*args)
    assert {p.name: p.read_bytes() for p in out.glob("shard_*")} == reference


def test_phase3_loss_falls_and_checkpoint_is_complete(tokens, tmp_path):
    out = tmp_path / "ar"
    cli("train", "ar", "--config", "tiny", "--tokens", tokens, "--out", out, *FAST[:5], "steps=40",
        "run.checkpoint_every=20", "run.image_every=40", "optim.warmup_steps=5")
    first, last = first_last([r["ce"] for r in metrics(out)])
    assert last < first - 0.3, (first, last)
    model = pe.load_checkpoint(out / "checkpoint")
    assert model.ar is not None and model.tokenizer is not None
    assert (out / "images" / "samples_step0000040.png").is_file()
    tokens_out = pe.sample(model.ar, [1, 2], None, seed=0)
    _, visual = pe.split_tokens(tokens_out, model.config.vocab())
    assert model.tokenizer.decode(visual).shape == (2, 1, 32, 32)


def _weights(ckpt):
    return {f.name: load_file(f) for f in sorted(Path(ckpt).glob("*.safetensors")) if f.name != "train_rng.safetensors"}


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            if atol == 0.0:
                assert torch.equal(a[name][k], b[name][k]), (name, k)
            else:
                assert (a[name][k].float() - b[name][k].float()).abs().max() <= atol, (name, k)


PHASE1_RESUME = ["train", "tokenizer", "--config", "tiny", "--data", "synthetic:128", *FAST, "steps=6",
                 "run.checkpoint_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    res = run_cli_subprocess(PHASE1_RESUME + ["--out", out])
    assert res.returncode == 0, res.stderr[-2000:]
    return _weights(out / "checkpoint")


def test_kill_9_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "run"
    res = run_cli_subprocess(PHASE1_RESUME + ["--out", out], env={"PROLOGUE_TEST_KILL_AT_STEP": "5"})
    assert res.returncode == -signal.SIGKILL
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 4
    res = run_cli_subprocess(PHASE1_RESUME + ["--out", out, "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_same(_weights(out / "checkpoint"), uninterrupted)


def test_interrupted_checkpoint_write_is_never_loaded(uninterrupted, tmp_path):
    out = tmp_path / "run"
    res = run_cli_subprocess(PHASE1_RESUME + ["--out", out], env={"PROLOGUE_TEST_KILL_MID_WRITE": "4"})
    assert res.returncode == -signal.SIGKILL
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.tmp-")]
    assert leftovers, "the kill should have hit a half-written temporary folder"
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 2
    pe.load_checkpoint(out / "checkpoint")  # the previous checkpoint loads
    res = run_cli_subprocess(PHASE1_RESUME + ["--out", out, "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.")]
    _assert_same(_weights(out / "checkpoint"), uninterrupted)


def test_two_processes_match_one(tokens, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), same global batch: same weights (<= 1e-6)."""
    args = ["train", "ar", "--config", "tiny", "--tokens", tokens, *FAST[:4], "steps=4", "ar.dropout=0",
            "ar.emb_dropout=0"]
    one = run_cli_subprocess(args + ["--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                "prologue_export.cli"]
    two = run_cli_subprocess(args + ["--out", tmp_path / "two"], launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "checkpoint"), _weights(tmp_path / "two" / "checkpoint")
    _assert_same({"ar": a["ar.safetensors"]}, {"ar": b["ar.safetensors"]}, atol=1e-6)
    assert not torch.equal(a["ar.safetensors"]["token_emb.weight"],
                           load_file(tmp_path / "one" / "checkpoint" / "train_ema_ar.safetensors")["token_emb.weight"])


def _launch_two(*args):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run(launcher + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def test_lecam_emas_and_bn_statistics_come_from_rank_0_under_ddp(tmp_path):
    """As the release's DDP-wrapped GAN loss (broadcast_buffers=True, OFFICIAL_TRAINING.md §7.18):
    every loss forward starts from rank 0's buffers, so at the start of each (before the LeCam update
    and the BatchNorm forwards, which use each rank's own images) the EMAs and the discriminator's
    running statistics are the same on both ranks; without the broadcast (the control) they drift
    apart after the first forward."""
    probe = Path(__file__).with_name("ddp_lecam_probe.py")
    runs = {}
    for name, extra in (("synced", []), ("control", ["--no-sync"])):
        res = _launch_two(probe, tmp_path / f"{name}.json", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    rank0, rank1 = runs["synced"]
    assert len(rank0) == len(rank1) >= 3
    assert rank0 == rank1  # every EMA and running mean, at every update, bit for bit
    c0, c1 = runs["control"]
    assert c0[0] == c1[0]  # both start from the same initial buffers
    assert c0[-1][:2] != c1[-1][:2] and c0[1][2] != c1[1][2]  # then each rank keeps its own


def test_step_a_updates_the_tokenizer_only_and_ce_reaches_the_encoder():
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny", FAST)
    trainer = TokenizerTrainer(cfg, common.make_accelerator(cfg.run))
    trainer.wrap()
    images = (torch.rand(16, 1, 32, 32) * 255).to(torch.uint8)
    before_ar = {k: v.clone() for k, v in trainer.joint.state_dict().items()}
    before_enc = {k: v.clone() for k, v in trainer.tok.encoder.state_dict().items()}
    # the CE alone reaches the encoder through the prologue one-hots
    cfg.l1_weight = cfg.vq_weight = cfg.gan_weight = 0.0
    grads = {}
    hook = trainer.optimizers["tokenizer"].register_step_pre_hook(
        lambda opt, *_: grads.update({n: p.grad.clone() for n, p in trainer.tok.named_parameters() if p.grad is not None}))
    trainer.step_a(images, step=0)
    hook.remove()
    assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in grads.items())
    assert all(not n.startswith(("decoder.", "visual_quantizer.")) or g.abs().sum() == 0 for n, g in grads.items())
    assert all(torch.equal(before_ar[k], v) for k, v in trainer.joint.state_dict().items())
    assert any(not torch.equal(before_enc[k], v) for k, v in trainer.tok.encoder.state_dict().items())
    trainer.step_b(step=0)
    assert any(not torch.equal(before_ar[k], v) for k, v in trainer.joint.state_dict().items())


def test_bad_input_errors(tmp_path, capsys):
    def err(*args):
        rc = main([str(a) for a in args])
        assert rc == 2
        return capsys.readouterr().err

    assert "unknown key 'run.stepz'" in err("train", "tokenizer", "--config", "tiny", "--out", tmp_path / "a", "run.stepz=3")
    assert "unknown tokenizer training preset 'tinny'" in err("train", "tokenizer", "--config", "tinny", "--out", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert "no class folders" in err("train", "tokenizer", "--config", "tiny", "--data", tmp_path / "empty",
                                     "--out", tmp_path / "b", *FAST)
    assert "no checkpoint in" in err("train", "tokenizer", "--config", "tiny", "--out", tmp_path / "c", "--resume")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert "already holds files" in err("train", "tokenizer", "--config", "tiny", "--out", tmp_path / "used")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"garbage")
    assert "train-images-idx3-ubyte" in err("train", "tokenizer", "--config", "tiny", "--data", tmp_path / "idx",
                                            "--out", tmp_path / "d", *FAST)
    assert "no such file or folder" in err("train", "tokenizer", "--config", "tiny", "--data", tmp_path / "nope",
                                           "--out", tmp_path / "e", *FAST)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root writes anywhere
        assert "cannot write" in err("train", "tokenizer", "--config", "tiny", "--out", ro / "run", *FAST)


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    cli("train", "tokenizer", "--config", "tiny", "--data", "synthetic:64", "--out", out, *FAST, "steps=1")
    rc = main(["train", "tokenizer", "--config", "tiny", "--data", "synthetic:64", "--out", str(out), "--resume",
               *FAST, "steps=2", "ce_weight_visual=1.0"])
    assert rc == 2
    assert "was trained with another config (differs in: ce_weight_visual)" in capsys.readouterr().err


def test_progress_in_a_log_is_ten_plain_lines():
    import io

    from prologue_export.train.common import LineProgress, progress

    log = io.StringIO()
    bar = LineProgress(73, 0, "tokenizer", unit="img", file=log)
    for _ in range(73):
        bar.set_postfix({"loss": "0.5"})
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()
    assert lines[0].startswith("tokenizer: 8/73 (10%)") and lines[-1].startswith("tokenizer: 73/73 (100%)")
    assert "loss=0.5" in lines[-1]
    resumed = LineProgress(100, 50, "ar", file=io.StringIO())  # a resumed run starts at its step
    resumed.update(5)
    assert resumed.file.getvalue() == ""
    resumed.update(5)
    assert resumed.file.getvalue().startswith("ar: 60/100 (60%)")
    assert isinstance(progress(10, 0, True, "x"), LineProgress)  # pytest's stderr is not a terminal
