"""Cost of the in-graph sampling of `ar_step` on ONNX Runtime's CPU provider, per sampling mode,
at a released vocabulary (V = 17409, prologue-b's; tiny widths, so the sampling dominates).

    python bench/sampling_bench.py                          # export the bundle, time each mode
    python bench/sampling_bench.py --compare OTHER_BUNDLE   # interleaved against another bundle's ar_step

One decode step (batch 8, CFG rows 16, one intra-op thread) per call; the modes and the bundles
are interleaved in rounds and the median of the rounds after warm-up is reported. Prints a table
and writes JSON to `bench/results/sampling_bench.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = {"off": (0, 0.0), "top_k 50": (50, 0.0), "top_p 0.9": (0, 0.9), "top_k 50 + top_p 0.9": (50, 0.9)}


def released_vocab_bundle(folder: Path) -> Path:
    import torch

    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.model import PrologueModel

    cfg = model_preset("tiny")
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, visual_codebook_size=16384, prologue_codebook_size=1024)
    torch.manual_seed(0)
    pe.save_checkpoint(PrologueModel(cfg.validate()).eval(), folder / "ckpt")
    export_bundle(folder / "ckpt", folder / "bundle", max_batch=8, verify=False, log=lambda m: None)
    return folder / "bundle"


def session(bundle: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / "ar_step.onnx"), options, providers=["CPUExecutionProvider"])


def feeds_for(bundle, top_k: int, top_p: float, rng) -> dict:
    """One decode step's feeds (batch 8, CFG rows 16), built as the runtime builds them."""
    from prologue_export.runtime.contract import cache_feeds, step_feeds

    V = bundle.vocab.vocab_size
    k, v = (rng.standard_normal(bundle.ar_cache_shape(16)).astype(np.float32) for _ in "kv")
    return {**step_feeds(input_ids=rng.integers(0, V, (16, 1)), start_pos=10, uniform=rng.random((8, V), dtype=np.float32),
                         cfg_scale=2.0, temperature=1.0, top_k=top_k, top_p=top_p), **cache_feeds(k, v)}


def measure(sessions: dict, bundle, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {mode: feeds_for(bundle, k, p, rng) for mode, (k, p) in MODES.items()}
    times = {(label, mode): [] for label in sessions for mode in MODES}
    for r in range(rounds):
        order = list(sessions.items())[:: 1 if r % 2 else -1]
        for mode in MODES:
            for label, sess in order:
                t0 = time.perf_counter()
                sess.run(["next_tokens"], feeds[mode])
                times[(label, mode)].append(time.perf_counter() - t0)
    skip = min(5, rounds // 4)
    return {f"{label} | {mode}": float(np.median(t[skip:]) * 1e3) for (label, mode), t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="BUNDLE", help="another bundle (same vocabulary) to time against")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling_bench.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        from prologue_export.runtime.bundle import Bundle

        bundle = Bundle(released_vocab_bundle(Path(tmp)))
        sessions = {"this checkout": session(bundle.path)}
        if args.compare:
            sessions["compare"] = session(Path(args.compare))
        result = measure(sessions, bundle, args.rounds)
    print("| bundle | mode | ms per decode step |\n|---|---|---|")
    for key, ms in result.items():
        label, mode = key.split(" | ")
        print(f"| {label} | {mode} | {ms:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "vocab_size": bundle.vocab.vocab_size,
                               "ms_per_step": result}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
