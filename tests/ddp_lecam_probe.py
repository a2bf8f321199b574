"""Run by tests/test_train.py under `accelerate launch --num_processes 2` (gloo, CPU): phase-1 tiny
steps with the GAN on, each rank on its own images, recording on every rank the LeCam EMAs and the
discriminator's BatchNorm running mean at the start of every GAN-loss forward (after the broadcast). Rank 0 writes them, per rank,
as JSON to argv[1]. `--no-sync` turns off the broadcast from rank 0 (the control: the ranks then
drift apart).

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_lecam_probe.py OUT.json [--no-sync]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from prologue_export.train import common
from prologue_export.train.configs import TokenizerTrainConfig, load_train_config, tokenizer_train_preset
from prologue_export.train.tokenizer import TokenizerTrainer

STEPS = 3
OVERRIDES = ["run.compile=false", "run.num_workers=0", "run.batch_size=16", "gan.base_channels=8", "gan_start=0"]


def main(out: str, sync: bool) -> None:
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny", OVERRIDES)
    trainer = TokenizerTrainer(cfg, common.make_accelerator(cfg.run))
    trainer.wrap()
    gan = trainer.gan
    if not sync:
        gan.sync_buffers = None
    seen = []
    start = gan._from_rank0  # the start of every loss forward (generator and discriminator side)
    bn = next(m for m in gan.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def recording():
        start()
        ema = gan.lecam_ema
        seen.append([float(ema.logits_real_ema), float(ema.logits_fake_ema), bn.running_mean.tolist()])

    gan._from_rank0 = recording
    rank = trainer.rank
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own images
        images = torch.randint(0, 256, (cfg.run.batch_size // trainer.world, 1, 32, 32), generator=g, dtype=torch.uint8)
        trainer.step_a(images, step)
        trainer.step_b(step)
    every = [None] * trainer.world
    dist.all_gather_object(every, seen)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(every, fh)
    common.end_distributed(ok=True)


if __name__ == "__main__":
    main(sys.argv[1], "--no-sync" not in sys.argv[2:])
