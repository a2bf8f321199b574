"""Runtime vs torch reference sampler: images/s, per-step time, start-up and memory.

    python bench/runtime_bench.py                       # tiny and mid presets, batch 1 and 8
    python bench/runtime_bench.py --presets tiny --batches 1 --out bench/results/runtime.json

For each preset a random-weight model is exported to a bundle (in a temporary folder). Measured:
- images/s of the torch reference sampler in eager mode and with `torch.compile` on `ar.step`,
  and of the runtime (ONNX Runtime CPU), all generating the same classes with the same seed; the
  tokens of the three paths are compared (they must be identical). Every path runs in worker
  processes of its own (the runtime's never imports torch), `--rounds` of them per path,
  interleaved, so that machine noise hits all paths alike; images/s is the median over all
  timed generations;
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
    from prologue_export.model import PrologueModel
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
    """Seconds per generation (each of `repeats` runs after a warm-up) and the tokens."""
    import torch

    import prologue_export as pe

    torch.set_num_threads(os.cpu_count() or 1)
    model = pe.load_checkpoint(ckpt)
    if compiled:
        model.ar.step = torch.compile(model.ar.step)
        model.tokenizer.decode_codes = torch.compile(model.tokenizer.decode_codes)

    def run():
        tokens = pe.sample(model.ar, classes, SETTINGS, seed=seed)
        _, visual = pe.split_tokens(tokens, model.config.vocab())
        with torch.no_grad():
            model.tokenizer.decode(visual)
        return tokens.numpy()

    tokens = run()  # warm-up (compiles when compiled)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times, tokens


def time_runtime(bundle: Path, classes, seed: int, repeats: int):
    """Seconds per generation through the runtime, tokens, and step times at the first/last positions."""
    from prologue_export.runtime import Generator

    gen = Generator.from_bundle(bundle, backend="cpu")
    run = gen.start(classes, seed=seed, sampling=SETTINGS).run()
    gen.decode(run.ids()[1])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate(classes, seed=seed, sampling=SETTINGS)
        times.append(time.perf_counter() - t0)
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
    return times, run.tokens, first, last


def worker(args) -> int:
    """One measurement in this (fresh) process; prints one JSON line. The runtime worker never
    imports torch, as in an application; each torch worker has the process to itself, so neither
    path runs beside the other's idle thread pool."""
    classes = list(np.arange(args.batch) % 10)
    folder = Path(args.folder)
    out = {"path": args.worker}
    if args.worker == "runtime":
        times, tokens, first, last = time_runtime(folder / f"bundle_{args.preset}", classes, 0, args.repeats)
        out.update(step_first_s=first, step_last_s=last, imported_torch="torch" in sys.modules)
    else:
        times, tokens = time_torch(folder / f"ckpt_{args.preset}", classes, 0, args.worker == "compile", args.repeats)
    out.update(times=times, tokens=np.asarray(tokens).tolist())
    print(json.dumps(out))
    return 0


def measure(folder: Path, preset: str, batch: int, path: str, repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--folder", str(folder),
           "--presets", preset, "--batch", str(batch), "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
m.tokenizer.decode(pe.split_tokens(t, m.config.vocab())[1])
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
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per worker process")
    parser.add_argument("--rounds", type=int, default=2,
                        help="worker processes per path, interleaved (eager, compile, runtime, eager, ...)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime.json"))
    parser.add_argument("--worker", choices=("eager", "compile", "runtime"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.preset = args.presets
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.presets.split(","):
            ckpt = build_bundle(name, tmp)
            bundle = tmp / f"bundle_{name}"
            extra = startup_and_memory(bundle, ckpt)
            for batch in (int(b) for b in args.batches.split(",")):
                runs = {"eager": [], "compile": [], "runtime": []}
                for _ in range(args.rounds):
                    for path in runs:
                        runs[path].append(measure(tmp, name, batch, path, args.repeats))
                ips = {p: batch / float(np.median([t for r in rs for t in r["times"]])) for p, rs in runs.items()}
                tokens = [np.array(r["tokens"]) for rs in runs.values() for r in rs]
                rt = runs["runtime"]
                first = float(np.median([r["step_first_s"] for r in rt]))
                last = float(np.median([r["step_last_s"] for r in rt]))
                rows.append({
                    "preset": name, "batch": batch, "torch_eager_img_s": ips["eager"],
                    "torch_compile_img_s": ips["compile"], "runtime_img_s": ips["runtime"],
                    "speedup_vs_eager": ips["runtime"] / ips["eager"],
                    "speedup_vs_compile": ips["runtime"] / ips["compile"],
                    "tokens_identical": all(bool((t == tokens[0]).all()) for t in tokens),
                    "runtime_imported_torch_while_generating": any(r["imported_torch"] for r in rt),
                    "step_first_ms": first * 1e3, "step_last_ms": last * 1e3, "last_over_first": last / first,
                    "timed_generations_per_path": args.rounds * args.repeats,
                    "img_s_per_round": {p: [batch / float(np.median(r["times"])) for r in rs] for p, rs in runs.items()},
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
    print("spread: lowest / highest per-round median images/s")
    for r in rows:
        spread = "  ".join(f"{p} {min(v):.2f}-{max(v):.2f}" for p, v in r["img_s_per_round"].items())
        print(f"{r['preset']:<6}{r['batch']:>3}  {spread}")
    save_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
