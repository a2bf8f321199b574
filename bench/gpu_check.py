"""The GPU check: one call of at most 4 minutes on the GPU machine we are lent (one H100/H200,
torch + CUDA 13, cuda-bindings, a CPU-only onnxruntime; no TensorRT, no onnxruntime-gpu, no
network, 64 MiB of files per call). Writes `$OUT/gpu_check.json` (default `bench/results/gpu`)
after every section, and `$OUT/gpu_check.log`.

    python bench/gpu_check.py --prepare         # here: make bench/gpu_inputs (about 40 s, 4.7 MiB)
    python bench/gpu_check.py                   # there: every section, 225 s at most
    python bench/gpu_check.py --device cpu      # here: the CPU dry run of every section (no deadline,
                                                #   budgets x4 for a shared CPU)

On the device (the `run` tool): command `python3 bench/gpu_check.py`, carry `["bench/gpu_inputs"]`,
timeout_s 240 (bench/RESULTS.md, "How to run the GPU check").

Inputs are made here and carried (`--prepare`; the folder is ignored by git): a tiny random model's
checkpoint, its exported bundle (fp32 ONNX) and reference.json, the tokens ONNX Runtime and the
torch sampler give on this CPU for two sampling cases, and the decoder's images. Nothing is exported
on the device. Runs from a plain checkout: `bench/checkout.py` maps `prologue_export.*` to this
checkout's folders, ahead of any installed copy.

Sections (each in a child process under its own time budget, so a hang or a crash costs only that
section; `--deadline` caps the whole run, `--budget NAME=S`, `--budget-scale`):
1. env (20 s): driver, CUDA runtime, cuda-bindings, torch, onnxruntime and its providers, the
   inputs, and what is missing;
2. cuda (25 s): runtime/cuda.py on cuda-bindings: `DeviceBuffer`, `copy_new_kv` against numpy,
   stream ordering (the producing stream, an event, and the legacy stream the old code used),
   capture / instantiate / launch of `copy_new_kv`;
3. device_state (60 s): `DeviceARState` (runtime/tensorrt_backend.py) through `Generator` with a
   stand-in `tensorrt` module whose engines run export/graphs.py's modules in torch on the stream
   they are given (ar_step without `If`s, as the engine form): CUDA-graph capture and replay, tokens
   equal to ONNX Runtime's on the CPU and to the same run without graphs, the decoder through
   `TensorRTBackend.run`;
4. torch_sample (25 s): the torch sampler on CUDA, tokens equal to the CPU's;
5. ort_cuda (30 s): ONNX Runtime's CUDA provider, when an onnxruntime-gpu wheel was carried in
   parts (`--split-wheel`; 255 MB, so over several calls: bench/RESULTS.md), else skipped;
6. torch_train (90 s): torch.compile'd bf16 training steps of each model (AR, tokenizer; AdamW):
   the first compiles (its seconds apart), the second is timed.

The dry run (`--device cpu`) runs each section's logic on the CPU: `cuda` and `device_state` on the
fake cuda-python of tests/fakes/cuda.py (the stand-in engines then run torch on the CPU), torch on
the CPU with the `aot_eager` compiler; what needs a GPU is a row `skipped: no CUDA` with the reason.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import enum
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from checkout import use_checkout  # noqa: E402

use_checkout(ROOT)

CONF = {"device": "cuda", "inputs": str(ROOT / "bench" / "gpu_inputs"), "compile_backend": "inductor",
        "section": "main", "rows": None}
SECTIONS = {}  # name -> {"fn", "budget_s", "hidden"}; the order of the table is the run order
DEADLINE_S = 225  # the whole run; the run tool's timeout_s (240) leaves 15 s for start-up and the last write
PART_MIB = 56  # one carried part of an onnxruntime-gpu wheel: one call's 64 MiB less the checkout and a margin
ALIGNMENT = 256  # TensorRT's setTensorAddress alignment (NvInferRuntime.h, IExecutionContext::setTensorAddress)
STANDIN_VERSION = "gpu-check-standin"  # the `tensorrt_version` of the stand-in engines
# name, class ids, sampling (our or the release's option names), seed: a CFG schedule (cfg_scale and
# temperature change per step, so a replayed graph must read them fresh) and top-k + top-p without CFG
CASES = (
    ("cfg_schedule", [1, 2, 3], {"semantic_cfg_scale": 0.7, "visual_cfg_schedule": "cosine",
                                 "visual_cfg_scale": 3.0, "visual_cfg_power": 0.5}, 3),
    ("no_cfg_top_k_top_p", [4, 5], {"cfg": 0.0, "temperature": 0.9, "top_k": 30, "top_p": 0.95}, 7),
)
OPTIONAL = ("numpy", "onnx", "onnxscript", "safetensors", "einops", "triton", "tensorrt")


class Skipped(Exception):
    """A section that cannot run here: recorded as `skipped: <reason>`."""


class Failed(Exception):
    """A section whose checks failed (its rows say which): `failed: <what>`."""


def section(name: str, budget_s: float, hidden: bool = False):
    """Register a section: `fn()` runs in a child process with `budget_s` seconds."""
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


class Checks:
    """A section's expectations: each one is a row; `done()` raises `Failed` naming those that failed."""

    def __init__(self):
        self.failed = []

    def expect(self, ok: bool, what: str, value, note: str = "") -> bool:
        record(what, value, note if ok else f"FAILED {note}".strip())
        if not ok:
            self.failed.append(what)
        return ok

    def done(self) -> None:
        if self.failed:
            raise Failed("; ".join(self.failed))


def version_of(module: str) -> str:
    """The version of an importable module, or `not installed (...)` in one line."""
    import importlib

    try:
        m = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install (OSError from a missing .so, ...)
        return f"not installed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return str(getattr(m, "__version__", "importable"))


def distribution(name: str):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def same_tokens(a, b) -> tuple:
    """(equal, 'equal (n/n)' or 'k/n equal, first difference at [row, position]')."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, f"shapes differ: {list(a.shape)} vs {list(b.shape)}"
    differ = np.argwhere(a != b)
    n = a.size
    if not len(differ):
        return True, f"equal ({n}/{n})"
    return False, f"{n - len(differ)}/{n} equal, first difference at {differ[0].tolist()}"


def torch_device() -> str:
    """`cuda`, or `cpu` in the dry run; skips the section when CUDA was asked for and there is none."""
    import torch

    if CONF["device"] == "cuda" and not torch.cuda.is_available():
        raise Skipped("no CUDA device (torch.cuda.is_available() is False; --device cpu for the dry run)")
    if CONF["device"] == "cuda":  # fp32 as on the CPU: no TF32 in matmuls (the default) nor in cuDNN's convs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return CONF["device"]


def sync() -> None:
    import torch

    if CONF["device"] == "cuda":
        torch.cuda.synchronize()


# -- the inputs: made here (--prepare), carried to the device ---------------------------------


def random_model(seed: int = 0):
    """The tiny preset with O(1) random weights (default inits leave norms and biases at 0 and the
    logits flat: the tokens would then say little about the model's arithmetic)."""
    import torch

    from prologue_export.config import model_preset
    from prologue_export.model import PrologueModel

    model = PrologueModel(model_preset("tiny").validate()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _made() -> dict:
    import onnxruntime
    import torch

    def git(*args):
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else "unknown"

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
            "git": git("rev-parse", "HEAD"), "uncommitted": bool(git("status", "--porcelain", "--", ".")),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _reference(folder: Path) -> dict:
    """Tokens of ONNX Runtime (CPU) and of the torch sampler (CPU) for every case, and the decoder's
    images of the first case's tokens."""
    import torch

    import prologue_export as pe
    from prologue_export.runtime import Generator

    torch.manual_seed(0)
    model = pe.load_checkpoint(folder / "ckpt")
    cases, images = [], None
    with Generator.from_bundle(folder / "bundle", backend="cpu") as gen:
        for name, classes, sampling, seed in CASES:
            settings = dataclasses.asdict(gen.settings(sampling))
            ort = gen.start(classes, seed=seed, sampling=settings).run().tokens
            ref = pe.sample(model.ar, classes, settings, seed=seed).numpy()
            cases.append({"name": name, "classes": classes, "seed": seed, "settings": settings,
                          "ort_cpu": ort.tolist(), "torch_cpu": ref.tolist(),
                          "torch_equals_ort": same_tokens(ref, ort)[1]})
            if images is None:
                images = gen.images_of(ort)
    return {"made": _made(), "cases": cases, "images_of": CASES[0][0], "images_ort_cpu": images.tolist()}


def prepare(folder: Path) -> None:
    """Write the carried inputs into `folder` (replaced whole; a carried wheel's parts are kept)."""
    import prologue_export as pe
    from prologue_export.export.bundle import export_bundle
    from prologue_export.runtime.files import sha256_file, write_json_atomic

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".gpu_inputs_", dir=folder.parent))
    pe.save_checkpoint(random_model(), tmp / "ckpt")
    export_bundle(tmp / "ckpt", tmp / "bundle", max_batch=4, verify=False, log=lambda m: None)
    reference = _reference(tmp)
    reference["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json_atomic(tmp / "reference.json", reference, "gpu_check reference")
    if (folder / "ort_gpu").is_dir():
        shutil.move(str(folder / "ort_gpu"), str(tmp / "ort_gpu"))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "ort_gpu" not in p.parts)
    print(f"wrote {folder}: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s")
    for case in reference["cases"]:
        print(f"  {case['name']}: torch sampler vs ONNX Runtime on this CPU: {case['torch_equals_ort']}")


def split_wheel(wheel: Path, folder: Path, part_mib: float = PART_MIB) -> None:
    """Cut a wheel into `folder/part-NN` of `part_mib` MiB and write `folder/parts.json` (name,
    size and sha256 of the whole and of each part): one part travels per call."""
    from prologue_export.runtime.files import sha256_file, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    size, parts = int(part_mib * 2**20), []
    with open(wheel, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(size), b"")):
            part = folder / f"part-{i:02d}"
            part.write_bytes(chunk)
            parts.append({"file": part.name, "bytes": len(chunk), "sha256": sha256_file(part)})
    write_json_atomic(folder / "parts.json", {"wheel": wheel.name, "bytes": wheel.stat().st_size,
                                              "sha256": sha256_file(wheel), "parts": parts}, "wheel parts")
    print(f"wrote {len(parts)} parts of {wheel.name} to {folder}: carry one per call (bench/RESULTS.md)")


def join_parts(folder: Path, dest: Path) -> Path:
    """The wheel of `folder/parts.json`, put together in `dest` and checked part by part."""
    from prologue_export.runtime.files import parse_json, sha256_file

    meta = parse_json((folder / "parts.json").read_bytes(), str(folder / "parts.json"))
    missing = [p["file"] for p in meta["parts"] if not (folder / p["file"]).is_file()]
    if missing:
        raise Failed(f"{len(missing)} of {len(meta['parts'])} parts of {meta['wheel']} did not arrive: "
                     f"{', '.join(missing)} (each call carries one; the machine must stay warm between them)")
    wheel = dest / meta["wheel"]
    with open(wheel, "wb") as out:
        for p in meta["parts"]:
            out.write((folder / p["file"]).read_bytes())
    if sha256_file(wheel) != meta["sha256"]:
        bad = [p["file"] for p in meta["parts"] if sha256_file(folder / p["file"]) != p["sha256"]]
        raise Failed(f"{meta['wheel']} put together does not match its sha256 (parts that differ: {bad or 'none'})")
    return wheel


def load_inputs() -> types.SimpleNamespace:
    folder = Path(CONF["inputs"])
    ref_file = folder / "reference.json"
    if not ref_file.is_file():
        raise Skipped(f"no inputs at {folder}: make them with `python bench/gpu_check.py --prepare` and carry them")
    from prologue_export.runtime.files import parse_json

    ref = parse_json(ref_file.read_bytes(), str(ref_file))
    return types.SimpleNamespace(folder=folder, ckpt=folder / "ckpt", bundle=folder / "bundle", ref=ref,
                                 cases=ref["cases"])


# -- cuda-python: the real one, or in the dry run the fake of tests/fakes/cuda.py -------------


def cuda_api() -> tuple:
    """(cuda-python's runtime module, False), or in the dry run (a FakeCudart, True)."""
    if CONF["device"] == "cpu":
        from tests.fakes.cuda import FakeCudart

        return FakeCudart(), True
    from prologue_export.runtime.cuda import CudaUnavailable, cudart

    try:
        return cudart(), False
    except CudaUnavailable as exc:
        raise Skipped(f"cuda-bindings not installed ({exc})") from None


def native_handle(obj) -> int:
    """The address behind a stream handle (the runtime passes execute_async_v3 an int already)."""
    if isinstance(obj, int):
        return obj
    from prologue_export.runtime.cuda import native_handle as runtime_native_handle

    return runtime_native_handle(obj)


def use_fake_cuda(rt) -> None:
    """The dry run: the runtime's GPU code gets the fake cuda-python, and `import cuda.bindings...`
    its modules (as tests/test_gpu_backends.py installs them)."""
    from prologue_export.runtime import cuda as runtime_cuda
    from prologue_export.runtime import tensorrt_backend
    from tests.fakes import cuda as fake_cuda

    runtime_cuda.cudart = tensorrt_backend.cudart = lambda: rt
    if hasattr(fake_cuda, "fake_cuda_modules"):
        fake_cuda.fake_cuda_modules(types.SimpleNamespace(setitem=lambda d, k, v: d.__setitem__(k, v)), rt)


# -- sections ---------------------------------------------------------------------------------


@section("env", 20)
def environment():
    import prologue_export

    record("prologue_export", prologue_export.__file__, f"checkout {ROOT}; installed: {distribution('prologue-export')}")
    record("python", platform.python_version(), platform.platform())
    missing = _env_cuda() + _env_torch() + _env_onnxruntime()
    for mod in OPTIONAL:
        found = version_of(mod)
        record(mod, found)
        missing += [mod] if found.startswith("not installed") else []
    _env_inputs()
    record("missing", ", ".join(missing) or "nothing")


def _env_cuda() -> list:
    smi = shutil.which("nvidia-smi")
    if smi:
        run = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        record("nvidia-smi", run.stdout.strip() or run.stderr.strip()[:200])
    for dist in ("cuda-bindings", "cuda-python", "cuda-core"):
        record(dist, distribution(dist) or "not installed")
    if CONF["device"] == "cpu":
        record("CUDA driver / runtime", "skipped: no CUDA", "the dry run")
        return [] if smi else ["nvidia-smi"]
    try:
        rt, _ = cuda_api()
    except Skipped as exc:
        record("CUDA driver / runtime", str(exc))
        return ["cuda-bindings"]
    from prologue_export.runtime.cuda import check, device_info

    def version(call):
        v = check(getattr(rt, call)(), call)
        return f"{v // 1000}.{v % 1000 // 10}"

    record("CUDA driver / runtime", f"{version('cudaDriverGetVersion')} / {version('cudaRuntimeGetVersion')}",
           "cudaDriverGetVersion / cudaRuntimeGetVersion (cuda-bindings)")
    record("device (cuda-bindings)", device_info(0, rt))
    return [] if smi else ["nvidia-smi"]


def _env_torch() -> list:
    import torch

    record("torch", torch.__version__, f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if not torch.cuda.is_available():
        record("torch CUDA device", "none", "the dry run" if CONF["device"] == "cpu" else "")
        return ["torch CUDA device"] if CONF["device"] == "cuda" else []
    p = torch.cuda.get_device_properties(0)
    record("torch CUDA device", f"{p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.0f} GiB")
    return []


def _env_onnxruntime() -> list:
    try:
        import onnxruntime as ort
    except ImportError:
        record("onnxruntime", "not installed")
        return ["onnxruntime"]
    providers = ort.get_available_providers()
    gpu = distribution("onnxruntime-gpu")
    record("onnxruntime", ort.__version__, f"onnxruntime-gpu: {gpu or 'not installed'}; providers {','.join(providers)}")
    return [] if "CUDAExecutionProvider" in providers else ["onnxruntime CUDA provider (onnxruntime-gpu)"]


def _env_inputs() -> None:
    try:
        inputs = load_inputs()
    except Skipped as exc:
        record("inputs", "missing", str(exc))
        return
    from prologue_export.runtime.files import sha256_file

    files = inputs.ref.get("files", {})
    bad = [n for n, digest in files.items() if not (inputs.folder / n).is_file() or sha256_file(inputs.folder / n) != digest]
    size = sum((inputs.folder / n).stat().st_size for n in files if (inputs.folder / n).is_file())
    made = inputs.ref["made"]
    record("inputs", f"{len(files) - len(bad)}/{len(files)} files as made ({size / 2**20:.1f} MiB)",
           f"made {made['date']} at {made['git'][:12]}{' + uncommitted changes' if made['uncommitted'] else ''}, "
           f"torch {made['torch']}, onnxruntime {made['onnxruntime']}" + (f"; differ: {', '.join(bad)}" if bad else ""))


@section("cuda", 25)
def cuda_runtime():
    rt, fake = cuda_api()
    if fake:
        use_fake_cuda(rt)
    checks = Checks()
    note = "fake cuda-python (tests/fakes/cuda.py): the section's logic only" if fake else "cuda-bindings"
    record("cuda-python", type(rt).__name__ if fake else getattr(rt, "__name__", str(rt)), note)
    from prologue_export.runtime.cuda import check

    check(rt.cudaSetDevice(0), "cudaSetDevice")
    _check_buffers(rt, checks)
    _check_copy_new_kv(rt, checks)
    if fake:
        record("stream ordering", "skipped: no CUDA", "which stream waits for which is timing on a GPU")
    else:
        _check_stream_order(rt, checks)
    _check_capture(rt, checks)
    if fake:
        _check_fake_calls(rt, checks)
    checks.done()


def _check_fake_calls(rt, checks: Checks) -> None:
    """The dry run: the fake cuda-python saw no misuse (unknown handles, double frees, int(stream), ...)."""
    bad = getattr(rt, "bad_calls", [])
    checks.expect(not bad, "fake cuda-python: bad calls", len(bad), "; ".join(f"{c}: {w}" for c, w in bad[:3]))


@contextlib.contextmanager
def _stream(rt, flags=None):
    from prologue_export.runtime.cuda import check

    stream = check(rt.cudaStreamCreate() if flags is None else rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreate")
    try:
        yield stream
    finally:
        check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


def _check_buffers(rt, checks: Checks) -> None:
    from prologue_export.runtime.cuda import BundleError, DeviceBuffer, check

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    with _stream(rt) as stream:
        buf = DeviceBuffer(data.nbytes, rt)
        try:
            buf.upload(data, stream)
            back = buf.download(np.zeros_like(data), stream)
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            checks.expect(np.array_equal(back, data), "DeviceBuffer upload/download (1 MiB)",
                          "equal" if np.array_equal(back, data) else "differ")
            checks.expect(buf.ptr % ALIGNMENT == 0, "cudaMalloc alignment", f"{ALIGNMENT} bytes" if buf.ptr % ALIGNMENT == 0
                          else f"pointer {buf.ptr:#x}", "TensorRT needs 256-byte-aligned tensor addresses")
            try:
                buf.upload(np.zeros(data.nbytes + 1, np.uint8), stream)
                refused = False
            except BundleError:
                refused = True
            checks.expect(refused, "DeviceBuffer refuses an upload larger than itself", refused)
        finally:
            buf.free()
        buf.free()  # idempotent: a second free is no call at all
    record("DeviceBuffer.free twice", "no error")


def _check_copy_new_kv(rt, checks: Checks) -> None:
    """`copy_new_kv` of a prefill, a decode step and the last slot, each against numpy; the last
    with the layers `layer_stride` apart (padded to TensorRT's alignment), as DeviceARState lays
    them out, where the runtime has that."""
    import inspect

    from prologue_export.runtime import cuda as runtime_cuda

    shape = (2, 3, 2, 9, 8)  # L, R, H, S, d: a layer of 1728 bytes, not a multiple of 256
    dense = int(np.prod(shape[1:])) * 4
    padded = getattr(runtime_cuda, "layer_stride", None)
    if padded is None or "stride" not in inspect.signature(runtime_cuda.copy_new_kv).parameters:
        record("copy_new_kv with padded layers", "skipped", "this runtime has no layer_stride")
        padded = None
    rng = np.random.default_rng(1)
    with _stream(rt) as stream:
        for position, n, stride in ((0, 4, None), (4, 1, None), (8, 1, padded and padded(shape, 4))):
            if stride is False:
                continue
            out, want = _kv_case(rt, stream, rng, shape, position, n, stride)
            ok = np.array_equal(out, want)
            layout = f"layers {stride} bytes apart" if stride else "dense layers"
            checks.expect(ok, f"copy_new_kv position {position}, {n} new, {layout}",
                          "equal to numpy" if ok else f"max |diff| {np.abs(out - want).max():.3g}",
                          f"cache {list(shape)} ({dense} bytes a layer)")


def _kv_case(rt, stream, rng, shape, position: int, n: int, stride) -> tuple:
    """(the device cache after copy_new_kv, numpy's), both flat: L layers `stride` bytes apart."""
    from prologue_export.runtime.cuda import DeviceBuffer, check, copy_new_kv

    L, R, H, S, d = shape
    step = (stride or R * H * S * d * 4) // 4
    cache = rng.standard_normal(L * step).astype(np.float32)
    new = rng.standard_normal((L, R, H, n, d)).astype(np.float32)
    bufs = [DeviceBuffer(cache.nbytes, rt), DeviceBuffer(new.nbytes, rt)]
    try:
        bufs[0].upload(cache, stream)
        bufs[1].upload(new, stream)
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        extra = {"stride": stride} if stride else {}
        copy_new_kv(rt, bufs[0].ptr, bufs[1].ptr, shape, position, n, 4, stream, **extra)
        out = bufs[0].download(np.zeros_like(cache), stream)
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
    finally:
        for b in bufs:
            b.free()
    want = cache.copy()
    for i in range(L):
        want[i * step:i * step + R * H * S * d].reshape(R, H, S, d)[:, :, position:position + n] = new[i]
    return out, want


def _check_stream_order(rt, checks: Checks) -> None:
    """A non-blocking stream P writes the new slice after a long run of memsets; copy_new_kv then
    reads it on P itself or on another non-blocking stream that waits for P's event; and the old
    ONNX Runtime path's copy (cudaMemcpy2D on the legacy stream, which does not wait for
    non-blocking streams) reads it too, for the record."""
    from prologue_export.runtime.cuda import DeviceBuffer, check

    flags = getattr(rt, "cudaStreamNonBlocking", 1)  # cuda_runtime_api.h: cudaStreamNonBlocking 0x01
    with _stream(rt, flags) as producer, _stream(rt, flags) as consumer:
        scratch = DeviceBuffer(1 << 30, rt)
        event = check(rt.cudaEventCreateWithFlags(getattr(rt, "cudaEventDisableTiming", 2)), "cudaEventCreateWithFlags")
        try:
            for how in ("the producing stream", "another stream after an event", "the legacy stream"):
                fresh = _ordered_copy(rt, producer, consumer, event, scratch, how)
                if how.startswith("the legacy"):
                    record("the old copy (cudaMemcpy2D, legacy stream) while a non-blocking stream writes",
                           "read the new slice" if fresh else "read the stale slice",
                           "informational: the race of issue 23 item 1 is timing; stale is what CUDA allows")
                else:
                    checks.expect(fresh, f"copy_new_kv on {how}", "read the new slice" if fresh else "read the stale slice")
        finally:
            scratch.free()
            check(rt.cudaEventDestroy(event), "cudaEventDestroy")


def _ordered_copy(rt, producer, consumer, event, scratch, how: str) -> bool:
    from prologue_export.runtime.cuda import DeviceBuffer, check, copy_new_kv

    shape, position = (2, 4, 2, 16, 32), 5
    new = np.full(shape[:3] + (1, shape[4]), 7.0, np.float32)
    cache = np.zeros(shape, np.float32)
    bufs = [DeviceBuffer(cache.nbytes, rt), DeviceBuffer(new.nbytes, rt), DeviceBuffer(new.nbytes, rt)]
    kv, src, staged = bufs
    try:
        kv.upload(cache, producer)
        src.upload(np.full_like(new, -1.0), producer)  # what a reader sees before the producer's copy
        staged.upload(new, producer)
        check(rt.cudaStreamSynchronize(producer), "cudaStreamSynchronize")
        for _ in range(8):  # about 3 ms of work ahead of the copy that writes the new slice
            check(rt.cudaMemsetAsync(scratch.ptr, 0, scratch.nbytes, producer), "cudaMemsetAsync")
        check(rt.cudaMemcpyAsync(src.ptr, staged.ptr, new.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, producer),
              "cudaMemcpyAsync")
        if how.startswith("the producing"):
            copy_new_kv(rt, kv.ptr, src.ptr, shape, position, 1, 4, producer)
        elif how.startswith("another"):
            check(rt.cudaEventRecord(event, producer), "cudaEventRecord")
            check(rt.cudaStreamWaitEvent(consumer, event, 0), "cudaStreamWaitEvent")
            copy_new_kv(rt, kv.ptr, src.ptr, shape, position, 1, 4, consumer)
        else:  # the old copy: cudaMemcpy2D on the legacy stream, which does not wait for P
            row = shape[4] * 4
            check(rt.cudaMemcpy2D(kv.ptr + position * row, shape[3] * row, src.ptr, row, row,
                                  shape[0] * shape[1] * shape[2], rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice),
                  "cudaMemcpy2D")
        check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        out = kv.download(np.zeros_like(cache), producer)
        check(rt.cudaStreamSynchronize(producer), "cudaStreamSynchronize")
    finally:
        for b in bufs:
            b.free()
    return bool(np.all(out[:, :, :, position] == 7.0))


def _check_capture(rt, checks: Checks) -> None:
    """copy_new_kv captured on a stream (thread-local mode, as DeviceARState captures), instantiated,
    and launched twice with new data uploaded before each launch."""
    from prologue_export.runtime.cuda import DeviceBuffer, check, copy_new_kv

    shape, position = (2, 3, 2, 9, 8), 5
    new_shape = shape[:3] + (1, shape[4])
    with _stream(rt) as stream:
        cache, new = DeviceBuffer(4 * int(np.prod(shape)), rt), DeviceBuffer(4 * int(np.prod(new_shape)), rt)
        try:
            want = np.zeros(shape, np.float32)
            cache.upload(want, stream)
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture")
            try:
                copy_new_kv(rt, cache.ptr, new.ptr, shape, position, 1, 4, stream)
            finally:
                graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            graph_exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
            try:
                for launch in range(2):
                    values = np.full(new_shape, launch + 1.5, np.float32)
                    new.upload(values, stream)
                    check(rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")
                    out = cache.download(np.zeros(shape, np.float32), stream)
                    check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
                    want[:, :, :, position:position + 1] = values
                    ok = np.array_equal(out, want)
                    checks.expect(ok, f"captured copy_new_kv, launch {launch + 1}", "equal to numpy" if ok else "differs",
                                  "cudaStreamBeginCapture (thread-local) / EndCapture / GraphInstantiate / GraphLaunch")
            finally:
                check(rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        finally:
            cache.free()
            new.free()


# -- the stand-in TensorRT: export/graphs.py's modules in torch, on the stream they are given ---


class IOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class StandInEngine:
    """What runtime/tensorrt_backend.py calls of an ICudaEngine, for one graph of the bundle: its
    tensors from the bundle's specs, its execution by `module` (torch) through `memory`."""

    def __init__(self, graph: str, spec: dict, module, memory):
        self.graph, self.module, self.memory = graph, module, memory
        self.specs = {s["name"]: s for s in spec["inputs"] + spec["outputs"]}
        self.inputs, self.outputs = [s["name"] for s in spec["inputs"]], [s["name"] for s in spec["outputs"]]
        self.axes = spec.get("dynamic_axes", {})
        self.calls = self.captured = 0  # execute_async_v3 calls, and those made while the stream captured

    @property
    def num_io_tensors(self) -> int:
        return len(self.specs)

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name: str):
        return IOMode.INPUT if name in self.inputs else IOMode.OUTPUT if name in self.outputs else IOMode.NONE

    def get_tensor_dtype(self, name: str) -> str:
        return self.specs[name]["dtype"]

    def create_execution_context(self):
        return StandInContext(self)

    def fits(self, name: str, shape) -> bool:
        """The profile: static dims exactly, named dims within the bundle's dynamic-axis range."""
        want = self.specs[name]["shape"]
        return len(want) == len(shape) and all(
            self.axes[d]["min"] <= n <= self.axes[d]["max"] if isinstance(d, str) else n == d for d, n in zip(want, shape))


class StandInContext:
    """An IExecutionContext: refuses shapes outside the profile and unaligned addresses (returns
    False, as TensorRT does); `execute_async_v3` enqueues the module on the caller's stream."""

    def __init__(self, engine: StandInEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape) -> bool:
        shape = tuple(int(x) for x in shape)
        if name not in self.engine.inputs or not self.engine.fits(name, shape):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if name not in self.engine.specs or int(ptr) % ALIGNMENT:
            return False
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        sizes = {}
        for n, shape in self.shapes.items():
            sizes.update((d, x) for d, x in zip(self.engine.specs[n]["shape"], shape) if isinstance(d, str))
        return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in self.engine.specs[name]["shape"])

    def execute_async_v3(self, stream) -> bool:
        e = self.engine
        if set(self.shapes) != set(e.inputs) or not set(e.specs) <= set(self.addresses):
            return False
        views = {n: e.memory.view(self.addresses[n], self.get_tensor_shape(n), e.specs[n]["dtype"]) for n in e.specs}

        def work():
            import torch

            with torch.no_grad():
                results = e.module(*[e.memory.load(views[n]) for n in e.inputs])
            for name, value in zip(e.outputs, results if isinstance(results, (tuple, list)) else (results,)):
                e.memory.store(views[name], value)

        e.calls += 1
        e.captured += bool(e.memory.submit(stream, work))
        return True


class _CudaArray:
    def __init__(self, ptr: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "strides": None, "version": 2}


class CudaMemory:
    """Bound device addresses as torch CUDA tensors without a copy (torch reads
    `__cuda_array_interface__`), made before the work is enqueued and kept, so a captured step makes
    none; work runs on the caller's cuda-python stream (`torch.cuda.ExternalStream`)."""

    def __init__(self, rt):
        import torch

        self.torch, self.rt, self.views, self.streams = torch, rt, {}, {}

    def view(self, ptr: int, shape, dtype):
        key = (int(ptr), tuple(shape), np.dtype(dtype).str)
        if key not in self.views:
            self.views[key] = self.torch.as_tensor(_CudaArray(*key), device="cuda")
        return self.views[key]

    def load(self, view):
        return view

    def store(self, view, value) -> None:
        view.copy_(value.reshape(view.shape))

    def submit(self, stream, work) -> bool:
        """Run `work` on the stream; True when that stream was capturing (the kernels were recorded)."""
        handle = native_handle(stream)
        if handle not in self.streams:
            self.streams[handle] = self.torch.cuda.ExternalStream(handle)
        with self.torch.cuda.stream(self.streams[handle]):
            capturing = self.torch.cuda.is_current_stream_capturing()
            work()
        return capturing


class FakeMemory:
    """The dry run's: tests/fakes/cuda.py's memory read into CPU tensors when the work runs (at a
    replay too) and written back; work enqueued on the fake stream (recorded while it captures)."""

    def __init__(self, rt):
        self.rt = rt

    def view(self, ptr: int, shape, dtype):
        return int(ptr), tuple(shape), np.dtype(dtype)

    def load(self, view):
        import torch

        ptr, shape, dtype = view
        data = self.rt.read(ptr, int(np.prod(shape)) * dtype.itemsize)
        return torch.from_numpy(np.frombuffer(data, dtype).reshape(shape).copy())

    def store(self, view, value) -> None:
        ptr, shape, dtype = view
        self.rt.write(ptr, np.ascontiguousarray(value.detach().numpy(), dtype=dtype).reshape(shape).tobytes())

    def submit(self, stream, work) -> None:
        self.rt.enqueue(stream, work)  # None: not asked of the fake, the number of execute calls says


def standin_tensorrt(engines: dict):
    """A module object standing in for `tensorrt`: `Runtime.deserialize_cuda_engine(bytes)` gives
    `engines[bytes]` (StandInEngines), `nptype` maps the specs' dtype names."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = STANDIN_VERSION
    trt.TensorIOMode = IOMode
    trt.nptype = lambda dtype: np.dtype(dtype).type
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: engines.get(bytes(data))})
    return trt


def standin_bundle(source: Path, dest: Path, device: dict) -> dict:
    """A copy of the carried bundle with stand-in engine files recorded in its manifest, as
    `prologue build-engines` records real ones; returns {engine file bytes: graph}."""
    from prologue_export.runtime.bundle import MANIFEST
    from prologue_export.runtime.contract import ENGINE_GRAPHS
    from prologue_export.runtime.files import sha256_file
    from prologue_export.runtime.tensorrt_backend import engine_file_name

    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest.setdefault("engines", {})
    graphs = {}
    for graph in ENGINE_GRAPHS:
        if graph in manifest["graphs"]:
            file, data = engine_file_name(graph, "fp32"), f"gpu_check stand-in engine of {graph}".encode()
            (dest / file).write_bytes(data)
            manifest["files"][file] = {"sha256": sha256_file(dest / file), "bytes": len(data)}
            manifest["engines"][graph] = {"file": file, "precision": "fp32", "max_batch": manifest["max_batch"],
                                          "tensorrt_version": STANDIN_VERSION, "device": device["name"],
                                          "compute_capability": device["compute_capability"]}
            graphs[data] = graph
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return graphs


def standin_engines(model, bundle: Path, graphs: dict, memory) -> dict:
    """{engine bytes: StandInEngine} running export/graphs.py's module of each graph (ar_step
    without `If`s, as engines are built: export/tensorrt.py inlines them)."""
    from prologue_export.export.graphs import contracts
    from prologue_export.runtime.bundle import MANIFEST
    from prologue_export.runtime.contract import AR_STEP

    specs = json.loads((bundle / MANIFEST).read_text())["graphs"]
    by_name = {c.name: c for c in contracts(model, 1)}
    return {data: StandInEngine(g, specs[g], by_name[g].module(conditional=False) if g == AR_STEP else by_name[g].module(),
                                memory) for data, g in graphs.items()}


# -- device_state -----------------------------------------------------------------------------


@section("device_state", 60)
def device_state():
    import torch

    import prologue_export as pe
    from prologue_export.runtime import Generator
    from prologue_export.runtime.contract import AR_STEP
    from prologue_export.runtime.cuda import device_info

    inputs = load_inputs()
    dev = torch_device()
    rt, fake = cuda_api()
    if fake:
        use_fake_cuda(rt)
        torch.set_num_threads(2)
    model = pe.load_checkpoint(inputs.ckpt, device=dev)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_engines_"))
    atexit.register(shutil.rmtree, tmp, True)
    graphs = standin_bundle(inputs.bundle, tmp / "bundle", device_info(0, rt))
    engines = standin_engines(model, tmp / "bundle", graphs, FakeMemory(rt) if fake else CudaMemory(rt))
    sys.modules["tensorrt"] = standin_tensorrt(engines)
    ar = next(e for e in engines.values() if e.graph == AR_STEP)
    checks = Checks()
    record("stand-in engines", ", ".join(sorted(e.graph for e in engines.values())),
           f"torch on {dev}{' over the fake cuda-python' if fake else ', on the stream execute_async_v3 is given'}")
    with Generator.from_bundle(tmp / "bundle", backend="tensorrt") as gen:
        states = _track_states(gen.backend)
        for case in inputs.cases:
            _device_case(gen, case, ar, states, checks, fake)
        first = inputs.cases[0]
        tokens = gen.start(first["classes"], seed=first["seed"], sampling=first["settings"]).run().tokens
        images = gen.images_of(tokens)
        diff = int(np.abs(images.astype(int) - np.asarray(inputs.ref["images_ort_cpu"])).max())
        checks.expect(diff <= 1, "decoder through TensorRTBackend.run", f"max |diff| {diff}",
                      f"uint8 images of {first['name']} vs ONNX Runtime on the CPU (rounding: at most 1)")
    if fake:
        _check_fake_calls(rt, checks)
    _ort_here(inputs)
    checks.done()


def _track_states(backend) -> list:
    """Every DeviceARState the backend makes, in order."""
    states, make = [], backend.ar_state

    def tracked(*args):
        states.append(make(*args))
        return states[-1]

    backend.ar_state = tracked
    return states


def _device_case(gen, case: dict, ar: StandInEngine, states: list, checks: Checks, fake: bool) -> None:
    """One case with CUDA graphs and once without: the tokens of both equal to ONNX Runtime's on
    the CPU, one eager and one captured execute_async_v3, then replays only."""
    runs = {}
    for graphs in (True, False):
        gen.backend.cuda_graphs = graphs
        calls, captured, t0 = ar.calls, ar.captured, time.perf_counter()
        tokens = gen.start(case["classes"], seed=case["seed"], sampling=case["settings"]).run().tokens
        runs[graphs] = (tokens, ar.calls - calls, ar.captured - captured, time.perf_counter() - t0, states[-1])
    gen.backend.cuda_graphs = True
    (tokens, calls, captured, seconds, state), eager = runs[True], runs[False]
    steps = eager[1]
    name = case["name"]
    ok, text = same_tokens(tokens, case["ort_cpu"])
    checks.expect(ok, f"{name}: DeviceARState tokens vs ONNX Runtime (CPU)", text,
                  f"batch {len(case['classes'])}, CUDA graphs, {steps} steps")
    ok, text = same_tokens(tokens, eager[0])
    checks.expect(ok, f"{name}: with vs without CUDA graphs", text, "the same device, bit for bit")
    capture = state.capture_error is None and calls == 2 and (fake or captured == 1)
    checks.expect(capture, f"{name}: capture and replay",
                  f"{calls} execute_async_v3 calls ({'?' if fake else captured} captured), {steps - calls + 1} graph launches",
                  f"capture_error {state.capture_error!r}; without graphs {eager[1]} calls")
    record(f"{name}: ms per step, graphs / eager", f"{seconds / steps * 1e3:.2f} / {eager[3] / steps * 1e3:.2f}",
           "whole generations, host uploads and downloads included" + (" (fake cuda-python)" if fake else ""))


def _ort_here(inputs) -> None:
    """Informational: ONNX Runtime on this machine's CPU vs the carried tokens (made elsewhere)."""
    import onnxruntime

    from prologue_export.runtime import Generator

    with Generator.from_bundle(inputs.bundle, backend="cpu") as gen:
        for case in inputs.cases:
            tokens = gen.start(case["classes"], seed=case["seed"], sampling=case["settings"]).run().tokens
            record(f"{case['name']}: ONNX Runtime {onnxruntime.__version__} CPU here vs the carried tokens",
                   same_tokens(tokens, case["ort_cpu"])[1], f"made with onnxruntime {inputs.ref['made']['onnxruntime']}")


# -- torch_sample -----------------------------------------------------------------------------


@section("torch_sample", 25)
def torch_sample():
    import torch

    import prologue_export as pe

    inputs = load_inputs()
    dev = torch_device()
    checks = Checks()
    model = pe.load_checkpoint(inputs.ckpt, device=dev)
    cpu = pe.load_checkpoint(inputs.ckpt) if dev != "cpu" else model
    for case in inputs.cases:
        args = (case["classes"], case["settings"])
        tokens = pe.sample(model.ar, *args, seed=case["seed"]).cpu().numpy()
        here = pe.sample(cpu.ar, *args, seed=case["seed"]).numpy() if cpu is not model else tokens
        ok, text = same_tokens(tokens, here)
        checks.expect(ok, f"{case['name']}: torch sampler on {dev} vs this machine's CPU", text, f"torch {torch.__version__}")
        record(f"{case['name']}: vs the carried torch CPU tokens", same_tokens(tokens, case["torch_cpu"])[1],
               f"made with torch {inputs.ref['made']['torch']}")
        record(f"{case['name']}: vs the carried ONNX Runtime CPU tokens", same_tokens(tokens, case["ort_cpu"])[1])
    if dev == "cpu":
        record("torch sampler on CUDA", "skipped: no CUDA", "the dry run compares the CPU with the carried tokens")
    checks.done()


# -- ort_cuda ---------------------------------------------------------------------------------


@section("ort_cuda", 30)
def ort_cuda():
    folder = Path(CONF["inputs"]) / "ort_gpu"
    if not (folder / "parts.json").is_file():
        raise Skipped("no onnxruntime-gpu wheel carried: it is 255 MB, over one call's 64 MiB; carry it in parts "
                      "over several calls (bench/RESULTS.md, 'The CUDA provider')")
    site = Path(tempfile.mkdtemp(prefix="gpu_check_ort_"))
    try:
        ort = _carried_onnxruntime(folder, site)
        if CONF["device"] == "cpu":
            raise Skipped("no CUDA (the dry run: the wheel was put together and imported)")
        _ort_cuda_run(ort, load_inputs())
    finally:
        shutil.rmtree(site, ignore_errors=True)  # 350 MB; what was loaded stays mapped


def _carried_onnxruntime(folder: Path, site: Path):
    """onnxruntime imported from the carried wheel's parts, unpacked into `site` ahead of the
    CPU-only onnxruntime (nothing imported that one in this process)."""
    import zipfile

    t0 = time.perf_counter()
    wheel = join_parts(folder, site)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    wheel.unlink()
    sys.path.insert(0, str(site))
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Failed(f"the carried {wheel.name} does not import: {exc}") from None
    record("onnxruntime-gpu", ort.__version__, f"from {ort.__file__} ({time.perf_counter() - t0:.0f} s to join and unpack)")
    if not str(ort.__file__).startswith(str(site)):
        raise Failed(f"imported onnxruntime from {ort.__file__}, not the carried wheel")
    record("providers (built with)", ",".join(ort.get_available_providers()))
    return ort


def _ort_cuda_run(ort, inputs) -> None:
    """Whether the CUDA provider loads (a listed provider may fall back to the CPU), then the
    runtime's `cuda` backend: tokens vs ONNX Runtime on the CPU."""
    from prologue_export.runtime import Generator

    checks = Checks()
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels torch brought
    session = ort.InferenceSession(str(inputs.bundle / "ar_step.onnx"),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    loaded = session.get_providers()
    checks.expect("CUDAExecutionProvider" in loaded, "CUDA provider loads", ",".join(loaded), "session.get_providers()")
    with Generator.from_bundle(inputs.bundle, backend="cuda") as gen:
        record("runtime backend", gen.backend_name)
        for case in inputs.cases:
            tokens = gen.start(case["classes"], seed=case["seed"], sampling=case["settings"]).run().tokens
            ok, text = same_tokens(tokens, case["ort_cpu"])
            checks.expect(ok, f"{case['name']}: ONNX Runtime CUDA vs CPU tokens", text)
    checks.done()


# -- torch_train ------------------------------------------------------------------------------


@section("torch_train", 90)
def torch_train():
    import torch

    import prologue_export as pe

    inputs = load_inputs()
    dev = torch_device()
    torch.manual_seed(0)
    model = pe.load_checkpoint(inputs.ckpt, device=dev).train()
    cfg, v = model.config.tokenizer, model.config.vocab()
    images = torch.rand(8, cfg.channels, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
    seq = torch.randint(0, v.visual_codebook_size, (16, v.seq_len), device=dev)
    classes = torch.randint(0, model.config.num_classes, (16,), device=dev)

    def tokenizer_loss(out):
        return sum(x.float().mean() for x in out.values() if torch.is_tensor(x) and x.is_floating_point())

    checks = Checks()
    for name, module, batch, loss_of in (("ar", model.ar, (seq, classes), lambda x: x.float().logsumexp(-1).mean()),
                                         ("tokenizer", model.tokenizer, (images,), tokenizer_loss)):
        _train_step(name, module, batch, loss_of, dev, checks)
    checks.done()


def _train_step(name, module, batch, loss_of, dev, checks: Checks) -> None:
    """Two steps (AdamW) of `torch.compile(module)` under bf16 autocast: the first compiles."""
    import torch

    fn = torch.compile(module, backend=CONF["compile_backend"])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    losses, seconds = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = loss_of(fn(*batch))
        loss.backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)
        opt.step()
        sync()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - t0)
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, module.parameters()))
    ok = finite and all(np.isfinite(losses)) and moved > 0
    checks.expect(ok, f"{name}: compiled bf16 training step on {dev}", f"loss {losses[0]:.4f} -> {losses[1]:.4f}",
                  f"grads finite {finite}, {moved} parameters changed; first step {seconds[0]:.1f} s (compiles, "
                  f"{CONF['compile_backend']}), second {seconds[1] * 1e3:.0f} ms")


# -- test-only sections -----------------------------------------------------------------------


@section("selftest-hang", 30, hidden=True)
def _selftest_hang():
    """Test-only: records a row, then hangs (the parent must time it out and go on)."""
    record("before the hang", 1)
    time.sleep(3600)


@section("selftest-crash", 30, hidden=True)
def _selftest_crash():
    """Test-only: records a row, then dies without a word (the parent must go on)."""
    record("before the crash", 1)
    os._exit(3)


# -- one section in a child process -----------------------------------------------------------


def run_one(name: str, rows: Path) -> int:
    """The child: run section `name`, append its rows and finally its status to `rows`."""
    CONF.update(section=name, rows=str(rows))
    status = "ok"
    try:
        SECTIONS[name]["fn"]()
    except Skipped as exc:
        status = f"skipped: {exc}"
    except Failed as exc:
        status = f"failed: {exc}"[:500]
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] not in ("prologue_export", "tests"):  # a library, not our code
            status = f"skipped: {exc.name} not installed"
        else:
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
    except Exception as exc:
        traceback.print_exc()
        status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
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
                     "inputs": args.inputs, "deadline_s": args.deadline, "compile_backend": args.compile_backend}
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
           "--device", args.device, "--inputs", args.inputs, "--compile-backend", args.compile_backend]
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
    parser.add_argument("--sections", default=default, help=f"comma-separated, in this order (default {default})")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default); cpu: the dry run")
    parser.add_argument("--inputs", default=CONF["inputs"], help="the carried inputs (default bench/gpu_inputs)")
    parser.add_argument("--prepare", action="store_true", help="make the inputs into --inputs (here, on the CPU) and stop")
    parser.add_argument("--split-wheel", default=None, metavar="WHEEL",
                        help="cut an onnxruntime-gpu wheel into parts under --inputs/ort_gpu and stop")
    parser.add_argument("--part-mib", type=float, default=PART_MIB, help=argparse.SUPPRESS)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager with --device cpu)")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds for the whole run (default {DEADLINE_S}, with --device cpu 0: none); later "
                             "sections get what is left")
    parser.add_argument("--budget-scale", type=float, default=None,
                        help="multiply every section's time budget (default 1, with --device cpu 4: a shared CPU)")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=SECONDS",
                        help="one section's time budget (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/gpu)")
    parser.add_argument("--one-section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.compile_backend is None:
        args.compile_backend = "inductor" if gpu else "aot_eager"
    if args.deadline is None:
        args.deadline = DEADLINE_S if gpu else 0
    if args.budget_scale is None:
        args.budget_scale = 1.0 if gpu else 4.0
    args.inputs = str(Path(args.inputs).resolve())
    return args


def run_all(args) -> int:
    """Every chosen section in turn, each given its budget or what is left of the deadline; 1 when
    one failed or timed out."""
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
            left = args.deadline - (time.perf_counter() - report.t0) if args.deadline else float("inf")
            if left < 5:
                report.sections[name]["status"] = f"skipped: the run's deadline ({args.deadline:g} s) was reached"
                report.write()
                continue
            budget = min(budget, left)
            say(f"== {name} (budget {budget:.0f} s)")
            report.sections[name].update(status="running", budget_s=round(budget, 1))
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
    bad = [n for n, s in report.sections.items() if s["status"].startswith(("failed", "timed out"))]
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    CONF.update(device=args.device, inputs=args.inputs, compile_backend=args.compile_backend)
    if args.one_section:
        return run_one(args.one_section, Path(args.rows))
    if args.prepare:
        prepare(Path(args.inputs))
        return 0
    if args.split_wheel:
        split_wheel(Path(args.split_wheel), Path(args.inputs) / "ort_gpu", args.part_mib)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
