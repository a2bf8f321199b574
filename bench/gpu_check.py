"""Every GPU check in one invocation (under 8 minutes on a GPU host); prints one table and writes
JSON and a log to `$OUT` (default `bench/results/gpu`).

    python bench/gpu_check.py                                  # all sections
    python bench/gpu_check.py --quick                          # smaller step counts and batches
    python bench/gpu_check.py --device cpu --preset tiny --quick   # dry run of the script on a CPU

Runs from a plain checkout (the package not pip-installed, only its dependencies): `bench/checkout.py`
maps `prologue_export.*` to this checkout's folders, ahead of any installed copy. Each section runs
in a child process of its own under its own time budget (`--budget-scale`, `--budget NAME=S`), so
a hang or a crash costs that section only; `$OUT/gpu_check.json` is rewritten after every section
with each section's status (ok / failed: ... / timed out after N s / skipped: ... / stopped) and the rows
measured so far (a section's rows survive its timeout), `$OUT/gpu_check.log` has all output.
A library that is not installed (tensorrt, torch_tensorrt, onnxruntime's CUDA provider,
cuda-python, ...) is one `not installed` / `skipped` row, never a traceback.

Sections (`SECTIONS`: name -> function, budget; add one with `@section(name, budget)`):
1. env: python, torch, CUDA device, the optional libraries, onnxruntime providers, cuda-python,
   and where `prologue_export` was imported from;
2. train: one tokenizer (Prologue-B shapes, 256 px, batch 8) and one AR (AR-B shapes, batch 32)
   step with bf16 autocast, eager vs torch.compile (ms per step after warm-up; the cold compile,
   i.e. the first compiled call, in seconds apart);
3. sample: the torch reference sampler at AR-B shapes (random weights) at batch 1 / 8 / 64,
   eager vs torch.compile vs torch.compile(mode="reduce-overhead") (CUDA graphs): the first call
   (compiles) apart, then steady sequences/s and ms per AR step, tokens compared with eager;
4. floor: the decode-step floor: device copy bandwidth measured with a large copy, and the
   bytes each decode step must read (weights + the KV cache), vs the measured eager step;
5. runtime: runtime backends on a small exported bundle (`mid` of bench/runtime_bench.py; `tiny`
   with `--preset tiny`), exported on the CPU: ONNX Runtime CPU, ONNX Runtime CUDA
   (where onnxruntime-gpu is installed), TensorRT engines built with `build_engines` (where
   tensorrt and cuda-python are installed): images/s and tokens equal to the CPU runtime's.

The budgets (env 30 s, train 150, sample 170, floor 30, runtime 90: 470 s at most) keep a run
under 8 minutes; a section that timed out keeps its rows, and can be rerun alone with more time:
`--sections sample --budget sample=400` (a rerun on the same host compiles from inductor's warm
on-disk caches, so its "first call" is not cold). The dry run (`--device cpu`) compiles with the
`aot_eager` backend by default (it checks the script and the graph capture, not the compiler;
`--compile-backend inductor` compiles for real) and skips reduce-overhead (CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from checkout import use_checkout  # noqa: E402

use_checkout(ROOT)

CONF = {"device": "cuda", "preset": "prologue-b-b", "quick": False, "compile_backend": "inductor",
        "section": "main", "rows": None}
SECTIONS = {}  # name -> {"fn", "budget_s", "hidden"}; the order of the table is the run order
OPTIONAL = ("numpy", "onnxruntime", "onnx", "onnxscript", "einops", "safetensors", "triton", "tensorrt",
            "torch_tensorrt")


class Skipped(Exception):
    """A section (or part of one) that cannot run here: recorded as `skipped: <reason>`."""


def section(name: str, budget_s: float, hidden: bool = False):
    """Register a section: `fn(quick)` runs in a child process with `budget_s` seconds."""
    def register(fn):
        SECTIONS[name] = {"fn": fn, "budget_s": budget_s, "hidden": hidden}
        return fn
    return register


def record(what: str, value, note: str = "") -> None:
    row = {"section": CONF["section"], "what": what, "value": value, "note": note}
    print(f"[{row['section']}] {what}: {value} {note}", flush=True)
    if CONF["rows"]:
        with open(CONF["rows"], "a") as f:  # one line each, so a killed section keeps its rows
            f.write(json.dumps({"row": row}, default=str) + "\n")


def sync():
    import torch

    if CONF["device"] == "cuda":
        torch.cuda.synchronize()


def need_device():
    """The torch device of the run; skips the section when it is CUDA and there is none."""
    import torch

    if CONF["device"] == "cuda" and not torch.cuda.is_available():
        raise Skipped("no CUDA device")
    return CONF["device"]


def compiled(fn, mode: str = "default"):
    import torch

    kwargs = {"backend": CONF["compile_backend"]}
    if mode != "default":
        kwargs["mode"] = mode
    return torch.compile(fn, **kwargs)


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def first_call(fn) -> float:
    """Seconds of one call (the cold compile of a compiled function)."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def version_of(module: str) -> str:
    """The version of an importable module, or `not installed (...)` in one line."""
    import importlib

    try:
        m = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install (OSError from a missing .so, ...)
        return f"not installed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return str(getattr(m, "__version__", "importable"))


def cuda_python() -> str | None:
    """None when cuda-python is usable, else why not (one line)."""
    try:
        from prologue_export.runtime.cuda import cudart

        cudart()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


# -- sections ---------------------------------------------------------------------------------


@section("env", 30)
def environment(quick: bool):
    import importlib.metadata

    import prologue_export

    record("prologue_export", prologue_export.__file__, f"checkout {ROOT}")
    try:
        installed = importlib.metadata.version("prologue-export")
    except importlib.metadata.PackageNotFoundError:
        installed = "none"
    record("installed prologue-export", installed, "not used: the checkout's code runs")
    record("python", platform.python_version(), platform.platform())
    import torch

    record("torch", torch.__version__, f"CUDA {torch.version.cuda}")
    record("cuda", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        record("device", f"{p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.0f} GiB")
    for mod in OPTIONAL:
        record(mod, version_of(mod))
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        record("ort providers", ",".join(providers))
        if "CUDAExecutionProvider" not in providers:
            record("onnxruntime CUDA provider", "not installed", "CPU-only onnxruntime (onnxruntime-gpu has it)")
    except ImportError:
        pass
    why = cuda_python()
    record("cuda-python", "importable" if why is None else f"not installed ({why})")


@section("train", 150)
def training(quick: bool):
    import torch

    from prologue_export.config import model_preset
    from prologue_export.model import PrologueModel

    dev = need_device()
    torch.manual_seed(0)
    cfg = model_preset(CONF["preset"]).validate()
    model = PrologueModel(cfg).to(dev).train()
    steps = 3 if quick else 10
    t = cfg.tokenizer
    images = torch.rand(8, t.channels, t.image_size, t.image_size, device=dev) * 2 - 1
    v = cfg.vocab()
    seq = torch.randint(0, v.visual_codebook_size, (32, v.seq_len), device=dev)  # valid input ids
    classes = torch.randint(0, cfg.num_classes, (32,), device=dev)

    def tok_step(fn):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = fn(images)
            loss = sum(x.float().mean() for x in out.values() if torch.is_tensor(x) and x.is_floating_point())
            loss.backward()
        return run

    def ar_step(fn):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = fn(seq, classes)
            logits.float().logsumexp(-1).mean().backward()
        return run

    parts = (("tokenizer", model.tokenizer, tok_step, 8), ("ar", model.ar, ar_step, 32))
    eager = {}
    for name, module, make, batch in parts:  # every eager number first: a compile failure cannot lose them
        eager[name] = timed(make(module), steps)
        record(f"{name} step eager (ms)", f"{eager[name] * 1e3:.1f}", f"bf16 autocast, batch {batch}")
    for name, module, make, _ in parts:
        fn = compiled(module)
        cold = first_call(make(fn))
        record(f"{name} torch.compile first step (s)", f"{cold:.1f}", f"cold compile, backend {CONF['compile_backend']}")
        steady = timed(make(fn), steps)
        record(f"{name} step eager / compiled (ms)", f"{eager[name] * 1e3:.1f} / {steady * 1e3:.1f}",
               f"{eager[name] / steady:.2f}x; steady, mean of {steps} after warm-up")


def _sampler_model():
    import torch

    from prologue_export.config import model_preset
    from prologue_export.model import PrologueModel

    dev = need_device()
    torch.manual_seed(0)
    cfg = model_preset(CONF["preset"]).validate()
    model = PrologueModel(cfg).eval()
    model.tokenizer = None  # only the AR is timed here
    return model.ar.to(dev)


@section("sample", 170)
def sampling(quick: bool):
    import torch

    import prologue_export as pe

    ar = _sampler_model()
    steps = ar.vocab.seq_len
    repeats = 1 if quick else 3
    reference = {}
    eager_step = ar.step
    for mode in ("eager", "compile", "reduce-overhead"):
        if mode == "reduce-overhead" and CONF["device"] != "cuda":
            record(f"{CONF['preset']} AR reduce-overhead", "skipped", "CUDA graphs need a CUDA device")
            continue
        torch._dynamo.reset()  # each mode compiles from cold
        ar.step = eager_step if mode == "eager" else compiled(eager_step, "default" if mode == "compile" else mode)
        for batch in ((1, 8) if quick else (1, 8, 64)):
            classes = list(np.arange(batch) % ar.num_classes)
            run = lambda: pe.sample(ar, classes, {"cfg": 2.0}, seed=0)
            first = first_call(run)  # compiles (and recompiles for a new batch)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                tokens = run()
                sync()
                times.append(time.perf_counter() - t0)
            dt = float(np.median(times))
            reference.setdefault(batch, tokens)
            same = (tokens == reference[batch]).float().mean().item()
            record(f"{CONF['preset']} AR {mode} batch {batch}", f"{batch / dt:.2f} seq/s",
                   f"{dt / steps * 1e3:.2f} ms/step steady (median of {repeats}); first call {first:.1f} s"
                   f"{' (compile)' if mode != 'eager' else ''}; tokens equal to eager {same:.3f}")
    ar.step = eager_step


def copy_bandwidth(nbytes: int, dev: str) -> float:
    """Bytes per second read + written by a large device-to-device copy."""
    import torch

    src = torch.empty(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    dt = timed(lambda: dst.copy_(src), 5)
    return 2 * nbytes / dt


@section("floor", 30)
def decode_floor(quick: bool):
    import torch

    ar = _sampler_model()
    dev = CONF["device"]
    gib = 2 if dev == "cuda" else 0.25
    bandwidth = copy_bandwidth(int(gib * 1024**3), dev)
    record("device copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s", f"read+write of a {gib:g} GiB copy")
    weights = sum(p.numel() * p.element_size() for p in ar.parameters())
    v = ar.vocab
    for batch in (1, 8, 64):
        rows = 2 * batch
        k, vv = ar.new_kv_cache(rows, dtype=torch.float32, device=dev)
        kv_bytes = 2 * k.numel() * 4
        ids = torch.randint(0, v.vocab_size, (rows, 1), device=dev)
        pos = torch.tensor([v.seq_len // 2], device=dev)
        with torch.no_grad():
            step = timed(lambda: ar.step(ids, pos, k, vv), 10)
        floor = (weights + kv_bytes) / bandwidth
        record(f"{CONF['preset']} decode step batch {batch} (eager fp32)", f"{step * 1e3:.2f} ms",
               f"floor {floor * 1e3:.2f} ms = ({weights / 1e6:.0f} MB weights + {kv_bytes / 1e6:.0f} MB KV) / bandwidth")


def _gpu_backends(bundle: Path) -> list:
    """The runtime backends to time besides `cpu`; one `skipped` row for each that cannot run here."""
    import onnxruntime as ort

    backends = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        backends.append("cuda")
    else:
        record("onnxruntime CUDA", "skipped", "no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    trt, cuda = version_of("tensorrt"), cuda_python()
    if trt.startswith("not installed"):
        record("tensorrt", "skipped", f"tensorrt {trt}: no engines built")
    elif cuda is not None:
        record("tensorrt", "skipped", f"cuda-python not installed ({cuda}): no engines built")
    else:
        from prologue_export.export.tensorrt import build_engines

        t0 = time.perf_counter()
        build_engines(bundle, precision="fp32", log=lambda m: None)  # fp16 would replace fp32: fp32 only
        record("build engines fp32", f"{time.perf_counter() - t0:.0f} s")
        backends.append("tensorrt")
    return backends


@section("runtime", 90)
def runtime_backends(quick: bool):
    for module in ("onnxruntime", "onnx", "onnxscript"):
        if version_of(module).startswith("not installed"):
            raise Skipped(f"{module} not installed (the export needs onnx and onnxscript)")
    import runtime_bench

    from prologue_export.runtime import Generator

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    name = "tiny" if CONF["preset"] == "tiny" else "mid"
    t0 = time.perf_counter()
    runtime_bench.build_bundle(name, tmp)
    bundle = tmp / f"bundle_{name}"
    record(f"export bundle {name}", f"{time.perf_counter() - t0:.0f} s", "random weights, fp32 ONNX, on the CPU")
    classes = list(np.arange(8) % 10)
    reference = {}
    for backend in ["cpu"] + _gpu_backends(bundle):
        gen = Generator.from_bundle(bundle, backend=backend)
        for batch in (1, 8):
            cls = classes[:batch]
            first = first_call(lambda: gen.start(cls, seed=0, cfg=2.0).run())
            tokens = gen.start(cls, seed=0, cfg=2.0).run().tokens
            t0 = time.perf_counter()
            gen.generate(cls, seed=0, cfg=2.0)
            dt = time.perf_counter() - t0
            reference.setdefault(batch, tokens)
            same = float((tokens == reference[batch]).mean())
            record(f"{backend} ({gen.backend_name}) batch {batch}", f"{batch / dt:.1f} img/s",
                   f"first generation {first:.1f} s; tokens equal to the CPU runtime {same:.3f}")


@section("selftest-hang", 30, hidden=True)
def _selftest_hang(quick: bool):
    """Test-only: records a row, then hangs (the parent must time it out and go on)."""
    record("before the hang", 1)
    time.sleep(3600)


@section("selftest-crash", 30, hidden=True)
def _selftest_crash(quick: bool):
    """Test-only: records a row, then dies without a word (the parent must go on)."""
    record("before the crash", 1)
    os._exit(3)


# -- one section in a child process -----------------------------------------------------------


def run_one(name: str, rows: Path) -> int:
    """The child: run section `name`, append its rows and finally its status to `rows`."""
    CONF.update(section=name, rows=str(rows))
    status = "ok"
    try:
        SECTIONS[name]["fn"](CONF["quick"])
    except Skipped as exc:
        status = f"skipped: {exc}"
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "prologue_export":  # a library, not our code
            status = f"skipped: {exc.name} not installed"
        else:
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
    except Exception as exc:
        traceback.print_exc()
        status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    with open(rows, "a") as f:
        f.write(json.dumps({"status": status}) + "\n")
    print(f"[{name}] status: {status}", flush=True)
    return 0


# -- the parent: every section in turn --------------------------------------------------------


class Report:
    """gpu_check.json: rewritten after every section, so that a killed run keeps what it measured."""

    def __init__(self, out: Path, args, budgets: dict):
        self.path = out / "gpu_check.json"
        self.t0 = time.perf_counter()
        self.rows = []
        self.head = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
                     "python": platform.python_version(), "command": sys.argv, "device": args.device,
                     "preset": args.preset, "quick": args.quick, "compile_backend": args.compile_backend}
        self.sections = {name: {"status": "not run yet", "seconds": None, "budget_s": b} for name, b in budgets.items()}

    def write(self) -> None:
        data = dict(self.head, seconds=round(time.perf_counter() - self.t0, 1), sections=self.sections, rows=self.rows)
        from prologue_export.runtime.files import write_text_atomic  # this checkout's (use_checkout above)

        write_text_atomic(self.path, json.dumps(data, indent=2, default=str), "gpu_check report")

    def table(self) -> str:
        lines = ["| section | what | value | note |", "|---|---|---|---|"]
        lines += [f"| {r['section']} | {r['what']} | {r['value']} | {r['note']} |" for r in self.rows]
        lines += ["", "| section | status | seconds | budget (s) |", "|---|---|---|---|"]
        lines += [f"| {n} | {s['status']} | {s['seconds']} | {s['budget_s']:g} |" for n, s in self.sections.items()]
        return "\n".join(lines)


def _tee(stream, log) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def run_child(name: str, budget: float, args, out: Path, log) -> tuple:
    """Run section `name` in a child process for at most `budget` s: (status, rows, seconds, the
    KeyboardInterrupt or SystemExit that stopped the run, else None)."""
    rows_file = out / f".rows_{name}.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-section", name, "--rows", str(rows_file),
           "--device", args.device, "--preset", args.preset, "--compile-backend", args.compile_backend]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)  # its own process group: compile workers die with it
    reader = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
    reader.start()
    status = stopped = None
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        status = f"timed out after {budget:g} s"
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C or SIGTERM: keep what this section measured
        status, stopped = "stopped: the run was interrupted", exc
    finally:
        if proc.poll() is None or status is not None:
            _kill_group(proc)
    reader.join(timeout=10)
    seconds = round(time.perf_counter() - t0, 1)
    rows, child_status = _read_rows(rows_file)
    rows_file.unlink(missing_ok=True)
    if status is None:
        status = child_status or f"failed: the section's process died (exit code {proc.returncode}) without a status"
    return status, rows, seconds, stopped


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_rows(path: Path) -> tuple:
    rows, status = [], None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if "row" in item:
                rows.append(item["row"])
            elif "status" in item:
                status = item["status"]
    return rows, status


def budgets_of(args) -> dict:
    """{section: seconds} of the chosen sections: the table's budgets, scaled, then overrides."""
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    budgets = {s: SECTIONS[s]["budget_s"] * args.budget_scale for s in chosen}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"--budget {item}: {name} is not a chosen section")
        budgets[name] = float(seconds)
    return budgets


def parse_args(argv):
    default = ",".join(n for n, s in SECTIONS.items() if not s["hidden"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and batches")
    parser.add_argument("--sections", default=default, help=f"comma-separated, in this order (default {default})")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu for a dry run of the script")
    parser.add_argument("--preset", default="prologue-b-b", help="model preset (default prologue-b-b; tiny for a dry run)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager with --device cpu)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=SECONDS",
                        help="one section's time budget (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/gpu)")
    parser.add_argument("--one-section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device == "cuda" else "aot_eager"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    CONF.update(device=args.device, preset=args.preset, quick=args.quick, compile_backend=args.compile_backend)
    if args.one_section:
        return run_one(args.one_section, Path(args.rows))
    budgets = budgets_of(args)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args, budgets)
    report.write()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run also ends the section it runs
    with open(out / "gpu_check.log", "w") as log:
        def say(text):
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"gpu_check: {' '.join(sys.argv)}; sections {', '.join(f'{n} ({b:g} s)' for n, b in budgets.items())}")
        for name, budget in budgets.items():
            say(f"== {name} (budget {budget:g} s)")
            report.sections[name]["status"] = "running"
            report.write()
            status, rows, seconds, stopped = run_child(name, budget, args, out, log)
            report.rows += rows
            report.sections[name].update(status=status, seconds=seconds)
            report.write()
            say(f"== {name}: {status} ({seconds:g} s)")
            if stopped is not None:
                raise stopped
        say("\n" + report.table())
        say(f"wrote {report.path} and {out / 'gpu_check.log'} ({time.perf_counter() - report.t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
