"""Weight-only quantized AR graphs vs fp32: ms per AR step, sequences/s, graph size, token
agreement (same seed and settings), through the runtime's own loop.

    python bench/quantize_bench.py                      # the mid preset of runtime_bench.py
    python bench/quantize_bench.py --presets tiny,mid --batches 1,8

Random-weight models are exported with `--ar-weights int8 int4` into a temporary folder. Prints a
table and writes JSON; no assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from runtime_bench import SETTINGS, build_bundle, save_json  # noqa: E402  (same presets and settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="mid")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = parser.parse_args(argv)
    from prologue_export.runtime import Generator

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            build_bundle(name, Path(tmp), ar_weights=("int8", "int4"))
            bundle = Path(tmp) / f"bundle_{name}"
            for batch in (int(b) for b in args.batches.split(",")):
                classes = list(np.arange(batch) % 10)
                reference = None
                for weights in ("fp32", "int8", "int4"):
                    gen = Generator.from_bundle(bundle, backend="cpu", ar_weights=weights)
                    graph = "ar_step" if weights == "fp32" else f"ar_step_{weights}"
                    tokens = gen.start(classes, seed=0, sampling=SETTINGS).run().tokens  # warm-up
                    best = float("inf")
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        gen.start(classes, seed=0, sampling=SETTINGS).run()
                        best = min(best, time.perf_counter() - t0)
                    reference = tokens if reference is None else reference
                    steps = gen.bundle.vocab.seq_len
                    rows.append({"preset": name, "weights": weights, "batch": batch, "ms_per_step": best / steps * 1e3,
                                 "sequences_per_s": batch / best,
                                 "graph_mb": (bundle / gen.bundle.graphs[graph]["file"]).stat().st_size / 1e6,
                                 "token_agreement": float((tokens == reference).mean())})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"{'preset':<7}{'weights':<8}{'B':>3}{'ms/step':>9}{'seq/s':>8}{'MB':>8}{'agree':>7}")
    for r in rows:
        print(f"{r['preset']:<7}{r['weights']:<8}{r['batch']:>3}{r['ms_per_step']:>9.2f}{r['sequences_per_s']:>8.2f}"
              f"{r['graph_mb']:>8.1f}{r['token_agreement']:>7.3f}")
    save_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
