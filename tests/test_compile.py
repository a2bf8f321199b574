"""torch.compile smoke tests, one per model, through the training code: a compiled training step
matches the eager one and checkpoints carry clean keys."""

import pytest
import torch
from safetensors.torch import load_file

from prologue_export.cli import main
from prologue_export.train import common
from prologue_export.train.configs import TokenizerTrainConfig, load_train_config, tokenizer_train_preset
from prologue_export.train.tokenizer import TokenizerTrainer

FAST = ["run.num_workers=0", "run.batch_size=8", "run.log_every=1", "run.image_every=1000", "gan.base_channels=8"]


def _trainer(compile_):
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny",
                            FAST + [f"run.compile={'true' if compile_ else 'false'}", "gan_start=0"])
    trainer = TokenizerTrainer(cfg, common.make_accelerator(cfg.run))
    trainer.wrap()
    return trainer


def test_tokenizer_training_step_compiles():
    images = (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    eager, compiled = _trainer(False), _trainer(True)
    assert all(torch.equal(a, b) for a, b in zip(eager.tok.state_dict().values(), compiled.tok.state_dict().values()))
    torch.manual_seed(1)  # the discriminator's augmentation draws from the global RNG
    stats_e = eager.step_a(images, 0)
    torch.manual_seed(1)
    stats_c = compiled.step_a(images, 0)
    for key in ("l1", "vq", "ce_prologue", "ce_visual", "gan_g"):
        assert stats_c[key] == pytest.approx(stats_e[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(eager.tok.state_dict().items(), compiled.tok.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    compiled.step_b(0)  # discriminator + compiled joint AR on hard tokens


def test_ar_training_step_compiles(tmp_path):
    def cli(*args):
        assert main([str(a) for a in args]) == 0

    cli("train", "tokenizer", "--config", "tiny", "--data", "synthetic:64", "--out", tmp_path / "p1", *FAST,
        "run.compile=false", "steps=1")
    cli("train", "pretokenize", "--checkpoint", tmp_path / "p1" / "checkpoint", "--data", "synthetic:64",
        "--out", tmp_path / "tok", "--num-workers", "0")
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"ar_{flag}"
        cli("train", "ar", "--config", "tiny", "--tokens", tmp_path / "tok", "--out", out, *FAST[:4], "steps=2",
            f"run.compile={flag}", "ar.dropout=0", "ar.emb_dropout=0")
        runs[flag] = load_file(out / "checkpoint" / "ar.safetensors")
    assert not any("_orig_mod" in k for k in runs["true"])
    for k in runs["false"]:
        assert torch.allclose(runs["false"][k], runs["true"][k], atol=1e-4), k
