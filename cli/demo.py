"""`prologue demo`: the whole story on one machine, no GPU needed.

Trains a small Prologue on Fashion-MNIST (or `--data` folders), pretokenizes, trains the AR,
exports and verifies the bundle, then uses the torch-free runtime to write three pictures:
- `class_grid.png`: one row per class, generated with CFG;
- `reconstruction.png`: held-out images (top) over their reconstructions (bottom);
- `fixed_prologue.png`: each row keeps the prologue of its first image and resamples the rest.
Each stage is skipped when its output is already complete, so an interrupted demo continues.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ..config import ar_preset, tokenizer_preset
from ..train.configs import ARTrainConfig, GANConfig, OptimConfig, RunConfig, TokenizerTrainConfig
from ..train.data import open_dataset


def demo_configs(scale: float = 1.0, channels: int = 1, num_classes: int = 10, image_size: int = 32):
    """The demo's phase-1 and phase-3 configs; `scale` multiplies the step counts."""
    tok = dataclasses.replace(tokenizer_preset("tiny"), channels=channels, image_size=image_size)
    ar = dataclasses.replace(ar_preset("tiny"), dropout=0.1, emb_dropout=0.1)
    opt = dict(lr=1e-3, lr_min=1e-4, warmup_steps=100)
    tok_steps = max(10, int(1000 * scale))
    ar_steps = max(10, int(1300 * scale))
    phase1 = TokenizerTrainConfig(
        num_classes=num_classes, tokenizer=tok, joint_ar=ar_preset("tiny"),
        run=RunConfig(steps=tok_steps, batch_size=64, log_every=20, image_every=max(1, tok_steps // 2),
                      checkpoint_every=max(1, tok_steps // 2)),
        optim_tokenizer=OptimConfig(betas=[0.0, 0.99], **opt),
        optim_ar=OptimConfig(betas=[0.9, 0.99], weight_decay=0.03, **opt),
        optim_disc=OptimConfig(betas=[0.0, 0.99], weight_decay=1e-4, **opt),
        gan=GANConfig(base_channels=16), gan_start=int(tok_steps * 0.6), ema_halflife=max(1.0, tok_steps / 15),
    ).validate()
    phase3 = ARTrainConfig(
        ar=ar, run=RunConfig(steps=ar_steps, batch_size=128, log_every=20, image_every=ar_steps,
                             checkpoint_every=max(1, ar_steps // 2)),
        optim=OptimConfig(lr=1e-3, lr_min=1e-4, warmup_steps=100, betas=[0.9, 0.96], weight_decay=0.03, grad_clip=1.0),
        ema_halflife=max(1.0, ar_steps / 15), sample_classes=min(10, num_classes),
    ).validate()
    return phase1, phase3


def run_demo(out, data=None, scale: float = 1.0, compile_: bool = True, pretokenize_limit=None, log=print) -> dict:
    from ..runtime.generator import Generator
    from ..runtime.images import grid, save_png
    from ..export.bundle import export_bundle
    from ..train.ar import train_ar
    from ..train.common import STATE_FILE
    from ..train.pretokenize import pretokenize
    from ..train.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(data)
    channels = _channels(dataset)
    phase1, phase3 = demo_configs(scale, channels=channels, num_classes=dataset.num_classes)
    phase1.run.compile = phase3.run.compile = compile_
    timings = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        log(f"[demo] {name} ...")
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[demo] {name}: {timings[name]} s")
        return result

    def resume(folder: Path) -> bool:
        return (folder / "checkpoint" / STATE_FILE).is_file()

    stage("1 tokenizer", lambda: train_tokenizer(phase1, data, out / "tokenizer", resume=resume(out / "tokenizer")))
    stage("2 pretokenize", lambda: pretokenize(out / "tokenizer" / "checkpoint", data, out / "tokens",
                                                crops="ten", batch_size=256, shard_size=8192,
                                                limit=pretokenize_limit))
    stage("3 ar", lambda: train_ar(phase3, out / "tokens", out / "ar", resume=resume(out / "ar")))
    stage("4 export + verify", lambda: export_bundle(out / "ar" / "checkpoint", out / "bundle", force=True,
                                                      log=lambda m: None))

    def pictures():
        gen = Generator.from_bundle(out / "bundle")
        k = min(10, dataset.num_classes)
        classes = np.repeat(np.arange(k), 8)
        files = {}
        images = gen.generate(classes, seed=0, cfg=3.0)
        files["class_grid"] = str(save_png(grid(images, 8), out / "class_grid.png"))
        held_out = _held_out(data, gen.bundle.image_size, gen.bundle.channels, 8)
        recon = gen.reconstruct(held_out)
        files["reconstruction"] = str(save_png(grid(np.concatenate([held_out, recon]), 8), out / "reconstruction.png"))
        rows = []
        for c in range(min(4, k)):
            first = gen.start([c], seed=100 + c, cfg=3.0).run()
            prologue, _ = first.ids()
            rows.append(gen.start([c] * 8, seed=200 + c, cfg=3.0, prologue_ids=np.repeat(prologue, 8, 0)).run().images())
        files["fixed_prologue"] = str(save_png(grid(np.concatenate(rows), 8), out / "fixed_prologue.png"))
        return files, gen.backend_name

    files, backend = stage("5 runtime pictures", pictures)
    report = {"out": str(out), "pictures": files, "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
              "runtime_backend": backend, "phase1_steps": phase1.run.steps, "phase3_steps": phase3.run.steps}
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    return report


def _channels(dataset) -> int:
    """1 for grey data sets (Fashion-MNIST, grey folders), else 3."""
    first = dataset[0][0]
    if first is None:
        return 3
    if hasattr(first, "mode"):  # a PIL image from class folders
        return 1 if first.mode == "L" else 3
    return int(np.asarray(first).shape[0])


def _held_out(data, size: int, channels: int, n: int) -> np.ndarray:
    """`n` images the tokenizer did not train on when possible (the Fashion-MNIST test split)."""
    from ..train.data import fashion_mnist, train_transform

    if data in (None, "fashion-mnist"):
        dataset = fashion_mnist(split="test")
    else:
        dataset = open_dataset(data)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(dataset), size=n, replace=False)
    images = [train_transform(dataset[int(i)][0], size, channels, rng, crop="center", flip=False) for i in picks]
    return np.stack(images).transpose(0, 2, 3, 1)  # [n, H, W, C]
