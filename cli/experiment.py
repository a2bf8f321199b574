"""`prologue experiment small`: the paper's comparison at Fashion-MNIST scale, one command.

Rows (equal budgets; every row uses the same tiny AR and the same training settings):
`2d` (no prologue; seeds 0 and 1), `prologue` (seeds 0 and 1) and `post` (a prologue encoder
trained on the frozen 2d tokenizer of seed 0, for the same number of steps). For each row:
phase 1 (tokenizer), phase 2 (pretokenize a subset with ten crops), phase 3 (AR), export to a
bundle (not re-verified), then rFID, gFID without and with CFG (samples from the torch-free
runtime), the Inception Score when the network file has a classifier head, and the linear
probe. Every stage is skipped when its output is complete, so an interrupted run continues.
`--scale` multiplies steps, subset sizes and sample counts (use > 1 on a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import typing
from pathlib import Path

import numpy as np

from ..config import ConfigError, build_dataclass, tokenizer_preset
from ..runtime.files import write_text_atomic

ROWS = (("2d", 0), ("2d", 1), ("prologue", 0), ("prologue", 1), ("post", 0))
TOKENIZER_OF = {"2d": "tiny-2d", "prologue": "tiny", "post": "tiny-post"}
IMAGE_SIZE = 32  # every row trains and is measured at 32x32
RESULTS_FILE = "results.json"


def budget(scale: float = 1.0) -> dict:
    s = float(scale)
    return {"tokenizer_steps": max(10, int(500 * s)), "ar_steps": max(10, int(650 * s)),
            "pretokenize_images": max(256, int(5000 * s)), "fid_samples": max(32, int(1000 * s)),
            "probe_train": max(64, int(10000 * s)), "probe_test": max(64, min(10000, int(5000 * s))),
            "cfg": 3.0}


def parse_rows(spec: str) -> tuple:
    """`prologue:0,2d:1` -> (("prologue", 0), ("2d", 1))."""
    rows = []
    for item in spec.split(","):
        variant, _, seed = item.strip().partition(":")
        if variant not in TOKENIZER_OF or not seed.isdigit():
            raise ConfigError(f"--rows item {item!r} is not VARIANT:SEED with VARIANT one of {', '.join(TOKENIZER_OF)}")
        rows.append((variant, int(seed)))
    return tuple(rows)


def row_configs(variant: str, seed: int, b: dict, channels: int, num_classes: int, init_from=None,
                tokenizer_overrides: typing.Sequence[str] = ()):
    from ..train.configs import TokenizerTrainConfig, apply_overrides
    from .demo import demo_configs

    phase1, phase3 = demo_configs(1.0, channels=channels, num_classes=num_classes)
    tok = dataclasses.replace(tokenizer_preset(TOKENIZER_OF[variant]), channels=channels, image_size=32)
    steps = b["tokenizer_steps"]
    phase1 = dataclasses.replace(
        phase1, tokenizer=tok, joint_ar=None if variant == "2d" else phase1.joint_ar, init_from=init_from,
        run=dataclasses.replace(phase1.run, steps=steps, seed=seed, image_every=steps, checkpoint_every=max(1, steps // 2)),
        gan_start=int(steps * 0.6), ema_halflife=max(1.0, steps / 15)).validate()
    if tokenizer_overrides:  # e.g. ce_weight_prologue=0.3 (an ablation; recorded in results.json)
        phase1 = build_dataclass(TokenizerTrainConfig, apply_overrides(dataclasses.asdict(phase1), tokenizer_overrides),
                                 "config").validate()
    ar_steps = b["ar_steps"]
    phase3 = dataclasses.replace(
        phase3, run=dataclasses.replace(phase3.run, steps=ar_steps, seed=seed, image_every=ar_steps,
                                        checkpoint_every=max(1, ar_steps // 2)),
        ema_halflife=max(1.0, ar_steps / 15)).validate()
    return phase1, phase3


def run_experiment(out, scale: float = 1.0, data=None, inception=None, compile_: bool = True, log=print,
                   rows=ROWS, tokenizer_overrides: typing.Sequence[str] = (), post_from=None) -> dict:
    """Run (or continue) the experiment in `out`. `tokenizer_overrides`: `key=value` changes to
    every row's phase-1 config; `post_from`: the 2d tokenizer checkpoint the post row builds on
    (default: this run's 2d-s0)."""
    run = ExperimentRun.open(out, scale, data, inception, compile_=compile_, log=log,
                             tokenizer_overrides=tokenizer_overrides, post_from=post_from)
    for variant, seed in rows:
        run.row(variant, seed)
    return run.finish()


@dataclasses.dataclass
class ExperimentRun:
    """One experiment folder: the budget, the FID network and reference statistics shared by every
    row, and `results` (results.json, rewritten after every stage)."""

    out: Path
    budget: dict
    data: typing.Optional[str]
    net: typing.Any  # metrics.FeatureNet
    real: np.ndarray  # [n, H, W, C] uint8: the FID reference images (test split)
    ref_stats: tuple  # (mu [D], sigma [D, D]) of `net` features of `real`
    channels: int
    num_classes: int
    results: dict
    compile_: bool = True
    log: typing.Callable[[str], None] = print
    tokenizer_overrides: typing.Sequence[str] = ()
    post_from: typing.Optional[str] = None
    _probe_images: dict = dataclasses.field(default_factory=dict)  # "train"/"test" -> (images, labels)

    @classmethod
    def open(cls, out, scale: float, data, inception, **settings) -> "ExperimentRun":
        """Set up `out`: the budget of `scale`, the FID network and the reference statistics (cached
        in `out/fid_stats`), and results.json as far as an earlier run got."""
        from ..train import metrics

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        b = budget(scale)
        net = metrics.FeatureNet(metrics.find_inception(inception))
        refs = metrics.ReferenceStats(out / "fid_stats")
        channels, num_classes = _data_shape(data)
        n = b["fid_samples"]
        real, _ = metrics.real_images(data, "test", n, IMAGE_SIZE, channels, seed=0)
        ref_key = f"{metrics.data_key(data, 'test', n, IMAGE_SIZE, channels)}-{net.key}"
        ref_stats = refs.get(ref_key, lambda: net(real)[0])
        results_path = out / RESULTS_FILE
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results.update({"budget": b, "scale": scale, "network": net.describe(), "reference": ref_key,
                        "tokenizer_overrides": list(settings.get("tokenizer_overrides", ()))})
        results.setdefault("rows", {})
        return cls(out, b, data, net, real, tuple(ref_stats), channels, num_classes, results, **settings)

    def save(self) -> None:
        """Rewrite results.json (atomically)."""
        from ..train import metrics

        metrics.write_report(self.results, self.out / RESULTS_FILE)

    def row(self, variant: str, seed: int) -> dict:
        """Run (or continue) one row: every stage not yet in its results, in order."""
        from ..checkpoint import load_checkpoint

        name = f"{variant}-s{seed}"
        row = self.results["rows"].setdefault(name, {"variant": variant, "seed": seed, "seconds": {}})
        folder = self.out / name
        t_row = time.perf_counter()
        init_from = None
        if variant == "post":  # the post row trains a prologue encoder on the frozen 2d tokenizer
            init_from = str(self.post_from or self.out / "2d-s0" / "tokenizer" / "checkpoint")
        phase1, phase3 = row_configs(variant, seed, self.budget, self.channels, self.num_classes, init_from,
                                     self.tokenizer_overrides)
        phase1.run.compile = phase3.run.compile = self.compile_
        self.stage(name, row, "tokenizer", lambda: self.tokenizer_stage(phase1, folder))
        self.stage(name, row, "pretokenize", lambda: self.pretokenize_stage(folder))
        self.stage(name, row, "ar", lambda: self.ar_stage(phase3, folder))
        self.stage(name, row, "bundle", lambda: _export(folder))
        tokenizer = load_checkpoint(folder / "ar" / "checkpoint").tokenizer.eval()
        cfg = self.budget["cfg"]
        self.stage(name, row, "rfid", lambda: self.rfid(tokenizer, folder))
        self.stage(name, row, "gfid_nocfg", lambda: self.gfid(folder, seed, 0.0))
        self.stage(name, row, f"gfid_cfg{cfg:g}", lambda: self.gfid(folder, seed, cfg))
        self.stage(name, row, "probe", lambda: self.probe(tokenizer))
        row["row_seconds"] = round(sum(row["seconds"].values()), 1)
        self.save()
        self.log(f"[experiment] {name}: done ({round(time.perf_counter() - t_row, 1)} s this run)")
        return row

    def stage(self, name: str, row: dict, key: str, fn: typing.Callable[[], typing.Any]):
        """`row[key]`: kept when an earlier run recorded it, else `fn()`, timed and saved at once."""
        if key in row:
            return row[key]
        t0 = time.perf_counter()
        self.log(f"[experiment] {name}: {key} ...")
        row[key] = fn()
        row["seconds"][key] = round(time.perf_counter() - t0, 1)
        self.log(f"[experiment] {name}: {key} done in {row['seconds'][key]} s: {_summary(row[key])}")
        self.save()
        return row[key]

    def tokenizer_stage(self, phase1, folder: Path) -> str:
        """Phase 1 into `folder/tokenizer`; returns its checkpoint folder."""
        from ..train.tokenizer import train_tokenizer

        out = folder / "tokenizer"
        return str(train_tokenizer(phase1, self.data, out, resume=resume_or_restart(out)))

    def pretokenize_stage(self, folder: Path) -> int:
        """Phase 2: ten crops of the first `pretokenize_images` items into `folder/tokens`; returns the image count."""
        from ..train.pretokenize import pretokenize

        report = pretokenize(folder / "tokenizer" / "checkpoint", self.data, folder / "tokens", crops="ten",
                             batch_size=256, shard_size=8192, limit=self.budget["pretokenize_images"])
        return int(report["num_images"])

    def ar_stage(self, phase3, folder: Path) -> str:
        """Phase 3 on `folder/tokens` into `folder/ar`; returns its checkpoint folder."""
        from ..train.ar import train_ar

        out = folder / "ar"
        return str(train_ar(phase3, folder / "tokens", out, resume=resume_or_restart(out)))

    def rfid(self, tokenizer, folder: Path) -> dict:
        """Reconstruction FID of the reference images; writes `reconstruction.png` (real over reconstructed)."""
        from ..train import metrics
        from ..runtime.images import grid, save_png

        fid, recon = metrics.reconstruction_fid(tokenizer, self.real, self.net, self.ref_stats)
        save_png(grid(np.concatenate([self.real[:16], recon[:16]]), 16), folder / "reconstruction.png")
        return {"fid": fid, "n": self.budget["fid_samples"]}

    def gfid(self, folder: Path, seed: int, cfg: float) -> dict:
        """Sample FID (and IS when the network has a classifier head) of images from the row's bundle
        made by the torch-free runtime; writes `samples_cfg{cfg}.png`."""
        from ..train import metrics
        from ..runtime.images import grid, save_png

        n, sampling = self.budget["fid_samples"], {"cfg": cfg}
        images = metrics.generate_images(n, self.num_classes, sampling, seed=1000 * seed, bundle=folder / "bundle")
        save_png(grid(images[:80], 10), folder / f"samples_cfg{cfg:g}.png")
        return {**metrics.sample_fid(images, self.net, self.ref_stats), "n": n, "sampling": sampling,
                "seeds": f"batch b uses seed {1000 * seed} + b; classes i % {self.num_classes}"}

    def probe(self, tokenizer) -> dict:
        """Linear probe on the tokens; the 2d baseline is probed on as many leading visual tokens as
        the prologue rows have prologue tokens."""
        from ..train import metrics

        if not self._probe_images:  # the same images for every row, read once
            b = self.budget
            self._probe_images["train"] = metrics.real_images(self.data, "train", b["probe_train"], IMAGE_SIZE,
                                                              self.channels, seed=1)
            self._probe_images["test"] = metrics.real_images(self.data, "test", b["probe_test"], IMAGE_SIZE,
                                                             self.channels, seed=2)
        return metrics.token_probe(tokenizer, self._probe_images["train"], self._probe_images["test"],
                                   k=tokenizer_preset("tiny").num_prologue_tokens)

    def finish(self) -> dict:
        """Add the table to results.json and write it to results.md; returns the results."""
        self.results["table"] = table(self.results)
        self.save()
        write_text_atomic(self.out / "results.md", self.results["table"] + "\n", "results table")
        return self.results


def resume_or_restart(folder: Path) -> bool:
    """True (resume) when `folder` holds a training checkpoint; a run that died before its first
    checkpoint is deleted so that it starts over (False)."""
    from ..train.common import STATE_FILE

    if (folder / "checkpoint" / STATE_FILE).is_file():
        return True
    if folder.exists():
        shutil.rmtree(folder)
    return False


def _data_shape(data) -> typing.Tuple[int, int]:
    """(channels, num_classes) of the data set: (1, 10) for Fashion-MNIST."""
    if data in (None, "", "fashion-mnist"):
        return 1, 10
    from .demo import _channels
    from ..train.data import open_dataset

    dataset = open_dataset(data)
    return _channels(dataset), dataset.num_classes


def _export(folder: Path) -> str:
    """The row's bundle (ONNX graphs were verified by the export tests; not re-verified here)."""
    from ..export.bundle import export_bundle

    export_bundle(folder / "ar" / "checkpoint", folder / "bundle", force=True, verify=False, log=lambda m: None)
    return str(folder / "bundle")


def _summary(value) -> str:
    if isinstance(value, dict):
        keys = ("fid", "test_accuracy")
        return ", ".join(f"{k} {value[k]:.4g}" for k in keys if k in value) or "ok"
    return str(value)[:80]


def table(results: dict) -> str:
    """Markdown: one line per row, then the mean of each variant over its seeds."""
    cfg_key = f"gfid_cfg{results['budget']['cfg']:g}"
    head = (f"| row | rFID | gFID no CFG | gFID CFG {results['budget']['cfg']:g} | IS no CFG | probe top-1 | "
            "prologue codes used | wall time |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    by_variant = {}
    for name, row in results["rows"].items():
        if "probe" not in row:
            continue
        isc = row["gfid_nocfg"].get("inception_score")
        vals = (row["rfid"]["fid"], row["gfid_nocfg"]["fid"], row[cfg_key]["fid"], row["probe"]["test_accuracy"])
        by_variant.setdefault(row["variant"], []).append(vals)
        codes = row["probe"]["codes_used"] if row["variant"] != "2d" else None
        lines.append(f"| {name} | {fmt(vals[0])} | {fmt(vals[1])} | {fmt(vals[2])} | "
                     f"{'n/a' if isc is None else fmt(isc[0])} | {100 * vals[3]:.1f}% | {fmt(codes, 'd')} | "
                     f"{row.get('row_seconds', 0) / 60:.1f} min |")
    for variant, vals in by_variant.items():
        if len(vals) > 1:
            m = np.mean(np.asarray(vals), axis=0)
            lines.append(f"| {variant} (mean of {len(vals)} seeds) | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | | "
                         f"{100 * m[3]:.1f}% | | |")
    return "\n".join(lines)
