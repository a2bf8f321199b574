"""Runtime vs torch reference sampler: images/s, per-step time, start-up and memory.

    python bench/runtime_bench.py                       # tiny and mid presets, batch 1 and 8
    python bench/runtime_bench.py --presets tiny --batches 1 --out bench/results/runtime.json

For each preset a random-weight model is exported to a bundle (in a temporary folder). Measured:
- images/s of the torch reference sampler in eager mode and with `torch.compile` on `ar.step`,
  and of the runtime (ONNX Runtime CPU), all generating the same classes with the same seed; the
  tokens of the three paths are compared (they must be identical);
- the runtime's AR step time at the first and at the last position;
- in fresh processes: import + bundle load + first image (runtime), and peak RSS of a generation
  through the runtime vs through torch.
Prints a table and writes JSON. No assertions: this measures, tests never do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    # name: (model preset, AR override)
    "tiny": ("tiny", None),
    "mid": ("tiny", {"dim": 384, "layers": 6, "heads": 6, "rope_axes": [24, 20, 20]}),
}
SETTINGS = {"cfg": 2.0}


def build_bundle(name: str, folder: Path, ar_weights=()) -> Path:
    """A random-weight model of preset `name`: checkpoint `folder/ckpt_<name>`, bundle `folder/bundle_<name>`."""
    import dataclasses

    import torch

    import prologue_export as pe
    from prologue_export.checkpoint import PrologueModel
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle

    preset, ar_override = PRESETS[name]
    cfg = model_preset(preset)
    if ar_override:
        cfg.ar = dataclasses.replace(cfg.ar, **ar_override)
    torch.manual_seed(0)
    model = PrologueModel(cfg.validate()).eval()
    ckpt = folder / f"ckpt_{name}"
    pe.save_checkpoint(model, ckpt)
    export_bundle(ckpt, folder / f"bundle_{name}", max_batch=8, verify=False, log=lambda m: None, ar_weights=ar_weights)
    return ckpt


def time_torch(ckpt: Path, classes, seed: int, compiled: bool, repeats: int):
    import torch

    import prologue_export as pe

    torch.set_num_threads(os.cpu_count() or 1)
    model = pe.load_checkpoint(ckpt)
    if compiled:
        model.ar.step = torch.compile(model.ar.step)
        model.tokenizer.decode_codes = torch.compile(model.tokenizer.decode_codes)

    def run():
        tokens = pe.sample(model.ar, classes, SETTINGS, seed=seed)
        _, visual = pe.split_sequence(tokens, model.config.vocab())
        with torch.no_grad():
            model.tokenizer.decode(visual)
        return tokens.numpy()

    tokens = run()  # warm-up (compiles when compiled)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    dt = (time.perf_counter() - t0) / repeats
    return len(classes) / dt, tokens


def time_runtime(bundle: Path, classes, seed: int, repeats: int):
    from prologue_export.runtime import Generator

    gen = Generator.from_bundle(bundle, backend="cpu")
    run = gen.start(classes, seed=seed, sampling=SETTINGS).run()
    gen.decode(run.ids()[1])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        gen.generate(classes, seed=seed, sampling=SETTINGS)
    dt = (time.perf_counter() - t0) / repeats
    # per-step timing of one more generation
    state = gen.start(classes, seed=seed, sampling=SETTINGS)
    step_times = []
    while not state.done:
        t = time.perf_counter()
        state.step()
        step_times.append(time.perf_counter() - t)
    k = max(1, len(step_times) // 10)
    first = float(np.median(step_times[1:1 + k]))  # step 0 is the BOS prefill
    last = float(np.median(step_times[-k:]))
    return len(classes) / dt, run.tokens, first, last


# peak resident memory of this process: VmHWM resets at exec (ru_maxrss would carry the parent's)
PEAK_RSS = "float([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]) / 1024"

STARTUP = """
import time, sys
t0 = time.perf_counter()
from prologue_export.runtime import Generator
g = Generator.from_bundle(sys.argv[1], backend="cpu")
g.generate([1], seed=0)
dt = time.perf_counter() - t0
print(dt, PEAK, 'torch' in sys.modules)
""".replace("PEAK", PEAK_RSS)

TORCH_RSS = """
import sys
import prologue_export as pe
m = pe.load_checkpoint(sys.argv[1])
t = pe.sample(m.ar, [1], {"cfg": 2.0}, seed=0)
m.tokenizer.decode(pe.split_sequence(t, m.config.vocab())[1])
print(PEAK)
""".replace("PEAK", PEAK_RSS)


def startup_and_memory(bundle: Path, ckpt: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", STARTUP, str(bundle)], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    torch_rss = float(subprocess.run([sys.executable, "-c", TORCH_RSS, str(ckpt)], capture_output=True, text=True,
                                     env=env, check=True).stdout.split()[-1])
    return {"runtime_import_load_first_image_s": float(out[0]), "runtime_peak_rss_mb": float(out[1]),
            "runtime_imported_torch": out[2] == "True", "torch_peak_rss_mb": torch_rss}


def save_json(out, rows, **extra) -> Path:
    """Write a benchmark's rows with the date and machine: the format every bench/ script uses."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                               "cpus": os.cpu_count(), **extra, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.presets.split(","):
            ckpt = build_bundle(name, tmp)
            bundle = tmp / f"bundle_{name}"
            extra = startup_and_memory(bundle, ckpt)
            for batch in (int(b) for b in args.batches.split(",")):
                classes = list(np.arange(batch) % 10)
                eager, tok_e = time_torch(ckpt, classes, 0, False, args.repeats)
                compiled, tok_c = time_torch(ckpt, classes, 0, True, args.repeats)
                rt, tok_r, first, last = time_runtime(bundle, classes, 0, args.repeats)
                rows.append({
                    "preset": name, "batch": batch, "torch_eager_img_s": eager, "torch_compile_img_s": compiled,
                    "runtime_img_s": rt, "speedup_vs_eager": rt / eager, "speedup_vs_compile": rt / compiled,
                    "tokens_identical": bool((tok_e == tok_r).all() and (tok_c == tok_r).all()),
                    "step_first_ms": first * 1e3, "step_last_ms": last * 1e3, "last_over_first": last / first,
                    **extra,
                })
                print(json.dumps(rows[-1]), flush=True)
    header = (f"{'preset':<6}{'B':>3}{'eager':>9}{'compile':>9}{'runtime':>9}{'x eager':>9}{'x comp':>8}"
              f"{'same':>6}{'step1 ms':>10}{'last/1st':>9}{'start s':>9}{'RSS rt/torch MB':>17}")
    print(header)
    for r in rows:
        print(f"{r['preset']:<6}{r['batch']:>3}{r['torch_eager_img_s']:>9.2f}{r['torch_compile_img_s']:>9.2f}"
              f"{r['runtime_img_s']:>9.2f}{r['speedup_vs_eager']:>9.2f}{r['speedup_vs_compile']:>8.2f}"
              f"{str(r['tokens_identical']):>6}{r['step_first_ms']:>10.2f}{r['last_over_first']:>9.2f}"
              f"{r['runtime_import_load_first_image_s']:>9.2f}"
              f"{r['runtime_peak_rss_mb']:>8.0f}/{r['torch_peak_rss_mb']:<8.0f}")
    save_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
