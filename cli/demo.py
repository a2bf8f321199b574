"""`prologue demo`: the whole story on one machine, no GPU needed.

Trains a small Prologue on Fashion-MNIST (or `--data` folders), pretokenizes, trains the AR,
exports and verifies the bundle, then uses the torch-free runtime to write three pictures:
- `class_grid.png`: one row per class, generated with CFG;
- `reconstruction.png`: held-out images (top) over their reconstructions (bottom);
- `fixed_prologue.png`: each row keeps the prologue of its first image and resamples the rest.
Training and pretokenizing continue where an earlier run stopped (a finished stage returns at
once), so an interrupted demo continues; the export and the pictures are redone on every run.
`demo.json` records each stage's seconds from the run that did its work (see `run_demo`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path

import numpy as np

from ..config import ar_preset, tokenizer_preset
from ..runtime.files import write_json_atomic
from ..train.configs import ARTrainConfig, GANConfig, OptimConfig, RunConfig, TokenizerTrainConfig
from ..train.data import open_dataset

DEMO_REPORT = "demo.json"  # the report: pictures, stage seconds (see run_demo), steps, runtime backend


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
    """Run (or continue) the demo in `out`; returns the report, also written to `out/demo.json`.

    `seconds` holds each stage's time in the run that did its work: a stage that an earlier run
    completed keeps the seconds recorded then and is listed in `reused`."""
    from ..export.bundle import export_bundle
    from ..train.ar import train_ar
    from ..train.pretokenize import pretokenize
    from ..train.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(data)
    phase1, phase3 = demo_configs(scale, channels=_channels(dataset), num_classes=dataset.num_classes)
    phase1.run.compile = phase3.run.compile = compile_
    times = StageTimes(out / DEMO_REPORT, log)
    # the done-before checks are made before each stage starts (arguments are evaluated first)
    times.run("1 tokenizer", training_done(out / "tokenizer", phase1.run.steps),
              lambda: train_tokenizer(phase1, data, out / "tokenizer", resume=has_checkpoint(out / "tokenizer")))
    times.run("2 pretokenize", pretokenize_done(out / "tokens"),
              lambda: pretokenize(out / "tokenizer" / "checkpoint", data, out / "tokens", crops="ten", batch_size=256,
                                  shard_size=8192, limit=pretokenize_limit))
    times.run("3 ar", training_done(out / "ar", phase3.run.steps),
              lambda: train_ar(phase3, out / "tokens", out / "ar", resume=has_checkpoint(out / "ar")))
    # export_bundle(force=True) replaces the bundle on every run, so this stage's time is always this run's
    times.run("4 export + verify", False,
              lambda: export_bundle(out / "ar" / "checkpoint", out / "bundle", force=True, log=lambda m: None))
    files, backend = times.run("5 runtime pictures", False, lambda: _pictures(out, data, dataset.num_classes))
    report = {"out": str(out), "pictures": files, **times.summary(), "runtime_backend": backend,
              "phase1_steps": phase1.run.steps, "phase3_steps": phase3.run.steps}
    write_json_atomic(out / DEMO_REPORT, report, "demo report")
    return report


def _pictures(out: Path, data, num_classes: int) -> typing.Tuple[dict, str]:
    """The three grids from the torch-free runtime on `out/bundle`; returns ({name: png path}, backend)."""
    from ..runtime.generator import Generator
    from ..runtime.images import grid, save_png

    gen = Generator.from_bundle(out / "bundle")
    k = min(10, num_classes)
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


# --------------------------------------------------------------------------- stage times


class StageTimes:
    """Times the demo's stages and keeps, for a stage an earlier run completed, the seconds that run
    recorded in demo.json. Rewrites demo.json (`out`, `seconds`, `total_seconds`, `reused`) after
    every stage, so an interrupted demo keeps the times of the stages it finished."""

    def __init__(self, report_path: Path, log=print):
        self.report_path = Path(report_path)
        self.earlier = earlier_seconds(self.report_path)  # stage name -> seconds
        self.seconds: typing.Dict[str, float] = {}
        self.reused: typing.List[str] = []
        self.log = log

    def run(self, name: str, done_before: bool, fn: typing.Callable[[], typing.Any]):
        """Run `fn()` (a stage whose output is complete returns at once) and record its seconds;
        `done_before`: the stage's output was already complete when it started."""
        t0 = time.perf_counter()
        self.log(f"[demo] {name} ...")
        result = fn()
        measured = round(time.perf_counter() - t0, 1)
        self.seconds[name], reused = stage_seconds(name, measured, done_before, self.earlier)
        if reused:
            self.reused.append(name)
            took = f"{self.seconds[name]} s in an earlier run" if name in self.earlier else "earlier time not recorded"
            self.log(f"[demo] {name}: already complete ({took}; {measured} s this run)")
        else:
            self.log(f"[demo] {name}: {measured} s")
        write_json_atomic(self.report_path, {"out": str(self.report_path.parent), **self.summary()}, "demo report")
        return result

    def summary(self) -> dict:
        return {"seconds": dict(self.seconds), "total_seconds": round(sum(self.seconds.values()), 1),
                "reused": list(self.reused)}


def stage_seconds(name: str, measured: float, done_before: bool,
                  earlier: typing.Mapping[str, float]) -> typing.Tuple[float, bool]:
    """(seconds to report, reused) for stage `name` that took `measured` seconds in this run.

    A stage whose output was complete before it started (`done_before`) did its work in an earlier
    run: it reports the seconds recorded then (`earlier[name]`), or `measured` when none were
    recorded, and is reused. Any other stage did its work (or the rest of it) now: `measured`."""
    if not done_before:
        return measured, False
    return earlier.get(name, measured), True


def earlier_seconds(report_path: Path) -> typing.Dict[str, float]:
    """Stage name -> seconds from an earlier run's demo.json; empty when there is none or it cannot
    be read (a stage without an earlier time then reports this run's)."""
    try:
        seconds = json.loads(Path(report_path).read_text()).get("seconds", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(seconds, dict):
        return {}
    return {str(k): float(v) for k, v in seconds.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def has_checkpoint(run_folder: Path) -> bool:
    """The training run in `run_folder` saved a resumable checkpoint (so the stage resumes from it)."""
    from ..train.common import STATE_FILE

    return (Path(run_folder) / "checkpoint" / STATE_FILE).is_file()


def training_done(run_folder: Path, steps: int) -> bool:
    """The run's checkpoint reached `steps` (train_tokenizer/train_ar then return without training)."""
    from ..train.common import STATE_FILE

    try:
        return int(json.loads((Path(run_folder) / "checkpoint" / STATE_FILE).read_text())["step"]) >= steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def pretokenize_done(tokens_folder: Path) -> bool:
    """The folder's index says every shard is written (pretokenize then writes nothing new)."""
    from ..train.pretokenize import INDEX_FILE

    try:
        return json.loads((Path(tokens_folder) / INDEX_FILE).read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


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
