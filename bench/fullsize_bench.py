"""Decode-step time at the released full size (Prologue-B tokenizer + AR-B: ~115M AR parameters,
~460 MB of fp32 weights), fp32 vs weight-only int8/int4 AR graphs, through the runtime's loop.

    python bench/fullsize_bench.py                       # batch 1, 24 decode steps
    python bench/fullsize_bench.py --batches 1,8 --steps 32

Only the `ar_step` graph is exported (random weights are fine for timing). For each graph the
script runs the prefill and `--steps` decode steps through `TokenLoop` (CFG 2, seed 0, 2 rows per
image), reports the median decode step, the weight bytes each step must read and the bandwidth
that implies, and the agreement of the sampled tokens with fp32. Prints a table and writes JSON.
No assertions: this measures, tests never do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime_bench import save_json  # noqa: E402


def export_ar(folder: Path, preset: str):
    import torch

    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_graph, quantize_ar_step
    from prologue_export.export.graphs import ARStepContract

    torch.manual_seed(0)
    model = PrologueModel(model_preset(preset).validate()).eval()
    ar_params = sum(p.numel() for p in model.ar.parameters())
    t0 = time.perf_counter()
    export_graph(ARStepContract(model, max_batch=8), folder)
    export_s = time.perf_counter() - t0
    quant_s = {}
    for weights in ("int8", "int4"):
        t0 = time.perf_counter()
        quantize_ar_step(folder, weights)
        quant_s[weights] = time.perf_counter() - t0
    cfg = model.config
    vocab, a = cfg.vocab(), cfg.ar
    return {"ar_params": ar_params, "export_s": export_s, "quantize_s": quant_s, "vocab": vocab,
            "cache_shape": lambda rows: (a.layers, rows, a.heads, vocab.seq_len, a.head_dim),
            "num_classes": cfg.num_classes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="prologue-b-b")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed after the prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fullsize.json"))
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from prologue_export.runtime.contract import AR_WEIGHTS, ar_graph_name, cache_feeds
    from prologue_export.runtime.loop import HostKVState, Noise, TokenLoop
    from prologue_export.runtime.settings import SamplingConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = export_ar(tmp, args.preset)
        print(f"AR parameters {info['ar_params']:,}; export {info['export_s']:.0f} s; quantize "
              + ", ".join(f"{k} {v:.0f} s" for k, v in info["quantize_s"].items()), flush=True)
        settings = SamplingConfig.from_dict({"cfg": 2.0})
        for batch in (int(b) for b in args.batches.split(",")):
            classes = np.arange(batch) % 10
            reference = None
            for weights in AR_WEIGHTS:
                name = f"{ar_graph_name(weights)}.onnx"
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(str(tmp / name), options, providers=["CPUExecutionProvider"])

                def step(feeds, k_cache, v_cache, session=sess):
                    return session.run(["next_tokens", "k_new", "v_new"], {**feeds, **cache_feeds(k_cache, v_cache)})

                def state(rows, batch, step=step):
                    return HostKVState(step, info["cache_shape"](rows))

                times = []
                for _ in range(2):  # the first pass warms up
                    vocab = info["vocab"]
                    noise = Noise(len(classes), vocab.seq_len, vocab.vocab_size, seed=0)
                    loop = TokenLoop(state, vocab, info["num_classes"], classes, settings, noise)
                    loop.step()  # prefill (BOS)
                    times = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        loop.step()
                        times.append(time.perf_counter() - t0)
                tokens = loop.tokens[:, :args.steps + 1]
                reference = tokens if reference is None else reference
                graph_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(name))
                ms = float(np.median(times)) * 1e3
                rows.append({"preset": args.preset, "weights": weights, "batch": batch, "ms_per_step": ms,
                             "graph_mb": graph_bytes / 1e6, "implied_gb_s": graph_bytes / (ms * 1e-3) / 1e9,
                             "token_agreement": float((tokens == reference).mean()), "steps": args.steps})
                print(json.dumps(rows[-1]), flush=True)
    print(f"{'weights':<8}{'B':>3}{'ms/step':>9}{'graph MB':>10}{'GB/s':>7}{'agree':>7}")
    for r in rows:
        print(f"{r['weights']:<8}{r['batch']:>3}{r['ms_per_step']:>9.2f}{r['graph_mb']:>10.1f}{r['implied_gb_s']:>7.1f}"
              f"{r['token_agreement']:>7.3f}")
    save_json(args.out, rows, threads=args.threads, ar_params=info["ar_params"], export_s=info["export_s"],
              quantize_s=info["quantize_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
