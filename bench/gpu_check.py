"""Every GPU check in one invocation (a few minutes on a GPU host); prints one table and writes
JSON (and a log) to `$OUT` (default `bench/results/gpu`).

    python bench/gpu_check.py                 # all sections
    python bench/gpu_check.py --quick         # smaller step counts (smoke run)

Sections (each runs when what it needs imports; a failure is recorded and the next runs):
1. environment: torch, CUDA device, TensorRT, onnxruntime providers, cuda-python;
2. training: one tokenizer (Prologue-B shapes, 256 px, batch 8) and one AR (AR-B shapes, batch
   32) step with bf16 autocast, eager vs torch.compile (ms per step after warm-up);
3. sampling: the torch reference sampler at AR-B shapes (random weights) at batch 1 / 8 / 64,
   eager vs torch.compile vs torch.compile(mode="reduce-overhead") (CUDA graphs), AR steps per
   second, tokens compared with eager;
4. the decode-step floor: device copy bandwidth measured with a large copy, and the bytes each
   decode step must read (weights + the KV cache), vs the measured eager step;
5. runtime backends on a tiny exported bundle: ONNX Runtime CPU, ONNX Runtime CUDA (where
   onnxruntime-gpu is installed), TensorRT engines built with `build_engines` (where tensorrt and
   cuda-python are installed): images/s and tokens equal to the CPU runtime's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = []  # (section, what, value, note)
CONF = {"device": "cuda", "preset": "prologue-b-b", "image": 256}  # --device cpu --preset tiny: a dry run


def sync():
    import torch

    if CONF["device"] == "cuda":
        torch.cuda.synchronize()


def record(section: str, what: str, value, note: str = "") -> None:
    ROWS.append({"section": section, "what": what, "value": value, "note": note})
    print(f"[{section}] {what}: {value} {note}", flush=True)


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # record and continue with the next section
                record(name, "FAILED", f"{type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
            record(name, "seconds", round(time.perf_counter() - t0, 1))
        return run
    return wrap


def timed(fn, repeats: int, sync=sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


@section("env")
def environment():
    import torch

    record("env", "torch", torch.__version__)
    record("env", "cuda", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        record("env", "device", f"{p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.0f} GiB")
    for mod in ("tensorrt", "torch_tensorrt", "onnxruntime"):
        try:
            m = __import__(mod)
            record("env", mod, getattr(m, "__version__", "?"))
        except ImportError:
            record("env", mod, "not installed")
    try:
        import onnxruntime as ort

        record("env", "ort providers", ",".join(ort.get_available_providers()))
    except ImportError:
        pass
    try:
        from prologue_export.runtime.cuda import cudart

        cudart()
        record("env", "cuda-python", "importable")
    except Exception as exc:
        record("env", "cuda-python", f"not usable ({exc})")


@section("train")
def training(quick: bool):
    import torch

    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset

    torch.manual_seed(0)
    cfg = model_preset(CONF["preset"]).validate()
    dev = CONF["device"]
    model = PrologueModel(cfg).to(dev).train()
    tok, ar = model.tokenizer, model.ar
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
            loss = sum(t.float().mean() for t in out.values() if torch.is_tensor(t) and t.is_floating_point())
            loss.backward()
        return run

    def ar_step(fn):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = fn(seq, classes)
            logits.float().logsumexp(-1).mean().backward()
        return run

    for name, module, make in (("tokenizer", tok, tok_step), ("ar", ar, ar_step)):
        eager = timed(make(module), steps)
        t0 = time.perf_counter()
        compiled_fn = torch.compile(module)
        make(compiled_fn)()
        sync()
        compile_s = time.perf_counter() - t0
        compiled = timed(make(compiled_fn), steps)
        record("train", f"{name} step eager / compiled (ms)", f"{eager * 1e3:.1f} / {compiled * 1e3:.1f}",
               f"compile {compile_s:.0f} s, bf16 autocast")


def _sampler_model():
    import torch

    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset

    torch.manual_seed(0)
    cfg = model_preset(CONF["preset"]).validate()
    model = PrologueModel(cfg).eval()
    model.tokenizer = None  # only the AR is timed here
    return model.ar.to(CONF["device"])


@section("sample")
def sampling(quick: bool):
    import torch

    import prologue_export as pe

    ar = _sampler_model()
    v = ar.vocab
    steps = v.seq_len
    results = {}
    eager_step = ar.step
    for mode in ("eager", "compile", "reduce-overhead"):
        ar.step = eager_step if mode == "eager" else torch.compile(
            eager_step, **({"mode": "reduce-overhead"} if mode == "reduce-overhead" else {}))
        for batch in ((1, 8) if quick else (1, 8, 64)):
            classes = list(np.arange(batch) % ar.num_classes)
            tokens = pe.sample(ar, classes, {"cfg": 2.0}, seed=0)  # warm-up (compiles)
            sync()
            t0 = time.perf_counter()
            tokens = pe.sample(ar, classes, {"cfg": 2.0}, seed=0)
            sync()
            dt = time.perf_counter() - t0
            results[(mode, batch)] = tokens
            same = (tokens == results[("eager", batch)]).float().mean().item()
            record("sample", f"{CONF['preset']} AR {mode} batch {batch}", f"{batch / dt:.2f} seq/s",
                   f"{dt / steps * 1e3:.2f} ms/step, tokens equal to eager {same:.3f}")
    ar.step = eager_step


def copy_bandwidth(nbytes: int, dev: str) -> float:
    """Bytes per second read + written by a large device-to-device copy."""
    import torch

    src = torch.empty(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    dt = timed(lambda: dst.copy_(src), 5)
    return 2 * nbytes / dt


@section("floor")
def decode_floor(quick: bool):
    import torch

    ar = _sampler_model()
    dev = CONF["device"]
    gib = 2 if dev == "cuda" else 0.25
    bandwidth = copy_bandwidth(int(gib * 1024**3), dev)
    record("floor", "device copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s", f"read+write of a {gib:g} GiB copy")
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
        record("floor", f"{CONF['preset']} decode step batch {batch} (eager fp32)", f"{step * 1e3:.2f} ms",
               f"floor {floor * 1e3:.2f} ms = ({weights / 1e6:.0f} MB weights + {kv_bytes / 1e6:.0f} MB KV) / bandwidth")


@section("runtime")
def runtime_backends(quick: bool):
    import runtime_bench

    from prologue_export.runtime import Generator

    tmp = Path(tempfile.mkdtemp())
    runtime_bench.build_bundle("mid", tmp)
    bundle = tmp / "bundle_mid"
    classes = list(np.arange(8) % 10)
    reference = None
    backends = [("cpu", {})]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        backends.append(("cuda", {}))
    try:
        import tensorrt  # noqa: F401

        from prologue_export.export.tensorrt import build_engines

        for precision in ("fp32", "fp16"):
            t0 = time.perf_counter()
            build_engines(bundle, precision=precision, log=lambda m: None)
            record("runtime", f"build engines {precision}", f"{time.perf_counter() - t0:.0f} s")
            backends.append((f"tensorrt-{precision}", {}))
            break  # fp16 would replace fp32: time fp32 only unless asked
    except ImportError:
        record("runtime", "tensorrt", "not installed: engines not built")
    for name, kwargs in backends:
        backend = "tensorrt" if name.startswith("tensorrt") else name
        gen = Generator.from_bundle(bundle, backend=backend, **kwargs)
        for batch in (1, 8):
            cls = classes[:batch]
            tokens = gen.start(cls, seed=0, cfg=2.0).run().tokens
            t0 = time.perf_counter()
            gen.generate(cls, seed=0, cfg=2.0)
            dt = time.perf_counter() - t0
            if name == "cpu":
                reference = reference or {}
                reference[batch] = tokens
            same = float((tokens == reference[batch]).mean())
            record("runtime", f"{name} ({gen.backend_name}) batch {batch}", f"{batch / dt:.1f} img/s",
                   f"tokens equal to the CPU runtime {same:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="env,train,sample,floor,runtime")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu for a dry run of the script")
    parser.add_argument("--preset", default="prologue-b-b", help="model preset (default prologue-b-b; tiny for a dry run)")
    args = parser.parse_args(argv)
    CONF.update(device=args.device, preset=args.preset)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chosen = args.sections.split(",")
    if "env" in chosen:
        environment()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        record("env", "stop", "no CUDA device: the GPU sections were not run")
    else:
        for name, fn in (("train", training), ("sample", sampling), ("floor", decode_floor),
                         ("runtime", runtime_backends)):
            if name in chosen:
                fn(args.quick)
    print("\n| section | what | value | note |\n|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['section']} | {r['what']} | {r['value']} | {r['note']} |")
    (out / "gpu_check.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "seconds": time.perf_counter() - t0,
        "rows": ROWS}, indent=2))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
