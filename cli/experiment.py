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

ROWS = (("2d", 0), ("2d", 1), ("prologue", 0), ("prologue", 1), ("post", 0))
TOKENIZER_OF = {"2d": "tiny-2d", "prologue": "tiny", "post": "tiny-post"}


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
    from ..train import metrics
    from ..checkpoint import load_checkpoint
    from ..export.bundle import export_bundle
    from ..runtime.images import grid, save_png
    from ..train.ar import train_ar
    from ..train.common import STATE_FILE
    from ..train.pretokenize import pretokenize
    from ..train.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = budget(scale)
    net = metrics.FeatureNet(metrics.find_inception(inception))
    refs = metrics.ReferenceStats(out / "fid_stats")
    channels, num_classes, size = 1, 10, 32
    if data not in (None, "", "fashion-mnist"):
        from .demo import _channels
        from ..train.data import open_dataset

        dataset = open_dataset(data)
        channels, num_classes = _channels(dataset), dataset.num_classes
    n = b["fid_samples"]
    real, _ = metrics.real_images(data, "test", n, size, channels, seed=0)
    ref_key = f"{metrics.data_key(data, 'test', n, size, channels)}-{net.key}"
    ref_mu, ref_sigma = refs.get(ref_key, lambda: net(real)[0])
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update({"budget": b, "scale": scale, "network": net.describe(), "reference": ref_key,
                    "tokenizer_overrides": list(tokenizer_overrides)})
    results.setdefault("rows", {})

    def save():
        metrics.write_report(results, results_path)

    probe_data = {}

    def probe_images():
        if not probe_data:
            probe_data["train"] = metrics.real_images(data, "train", b["probe_train"], size, channels, seed=1)
            probe_data["test"] = metrics.real_images(data, "test", b["probe_test"], size, channels, seed=2)
        return probe_data["train"], probe_data["test"]

    def resume(folder: Path) -> bool:
        """Continue from the last checkpoint; a run that died before its first one starts over."""
        if (folder / "checkpoint" / STATE_FILE).is_file():
            return True
        if folder.exists():
            shutil.rmtree(folder)
        return False

    for variant, seed in rows:
        name = f"{variant}-s{seed}"
        row = results["rows"].setdefault(name, {"variant": variant, "seed": seed, "seconds": {}})
        folder = out / name
        t_row = time.perf_counter()

        def stage(key, fn):
            if key in row:
                return row[key]
            t0 = time.perf_counter()
            log(f"[experiment] {name}: {key} ...")
            row[key] = fn()
            row["seconds"][key] = round(time.perf_counter() - t0, 1)
            log(f"[experiment] {name}: {key} done in {row['seconds'][key]} s: {_short(row[key])}")
            save()
            return row[key]

        init_from = str(post_from or out / "2d-s0" / "tokenizer" / "checkpoint") if variant == "post" else None
        phase1, phase3 = row_configs(variant, seed, b, channels, num_classes, init_from, tokenizer_overrides)
        phase1.run.compile = phase3.run.compile = compile_
        stage("tokenizer", lambda: str(train_tokenizer(phase1, data, folder / "tokenizer",
                                                       resume=resume(folder / "tokenizer"))))
        stage("pretokenize", lambda: _pretokenize(pretokenize, folder, data, b))
        stage("ar", lambda: str(train_ar(phase3, folder / "tokens", folder / "ar", resume=resume(folder / "ar"))))
        stage("bundle", lambda: _export(export_bundle, folder))
        tokenizer = load_checkpoint(folder / "ar" / "checkpoint").tokenizer.eval()

        def rfid():
            fid, recon = metrics.reconstruction_fid(tokenizer, real, net, (ref_mu, ref_sigma))
            save_png(grid(np.concatenate([real[:16], recon[:16]]), 16), folder / "reconstruction.png")
            return {"fid": fid, "n": n}

        def gfid(cfg):
            sampling = {"cfg": cfg}
            images = metrics.generate_images(n, num_classes, sampling, seed=1000 * seed, bundle=folder / "bundle")
            save_png(grid(images[:80], 10), folder / f"samples_cfg{cfg:g}.png")
            return {**metrics.sample_fid(images, net, (ref_mu, ref_sigma)), "n": n, "sampling": sampling,
                    "seeds": f"batch b uses seed {1000 * seed} + b; classes i % {num_classes}"}

        stage("rfid", rfid)
        stage("gfid_nocfg", lambda: gfid(0.0))
        stage(f"gfid_cfg{b['cfg']:g}", lambda: gfid(b["cfg"]))
        # the 2d baseline is probed on as many leading visual tokens as the prologue rows have
        stage("probe", lambda: metrics.token_probe(tokenizer, *probe_images(),
                                                   k=tokenizer_preset("tiny").num_prologue_tokens))
        row["row_seconds"] = round(sum(row["seconds"].values()), 1)
        save()
        log(f"[experiment] {name}: done ({round(time.perf_counter() - t_row, 1)} s this run)")
    results["table"] = table(results)
    save()
    (out / "results.md").write_text(results["table"] + "\n")
    return results


def _export(export_bundle, folder: Path) -> str:
    """The row's bundle (ONNX graphs were verified by the export tests; not re-verified here)."""
    export_bundle(folder / "ar" / "checkpoint", folder / "bundle", force=True, verify=False, log=lambda m: None)
    return str(folder / "bundle")


def _pretokenize(pretokenize, folder: Path, data, b: dict) -> int:
    report = pretokenize(folder / "tokenizer" / "checkpoint", data, folder / "tokens", crops="ten", batch_size=256,
                         shard_size=8192, limit=b["pretokenize_images"])
    return int(report["num_images"])


def _short(value) -> str:
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
