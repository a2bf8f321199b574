"""The AR decode step against this machine's own limits: memory bandwidth and matmul throughput
measured in the same run, and each step's time as a fraction of its floor.

    python bench/limits_bench.py                                  # tiny, mid, prologue-b-b; batch 1 and 8
    python bench/limits_bench.py --presets tiny,mid --weights fp32

Limits, in ONNX Runtime (CPU provider, the step's own thread count) on graphs made here:
- bandwidth: a matrix-vector product `[1, K] x [K, N]` whose weight is as large as the step's
  working set (weights + the KV cache read per step): the fastest way ONNX Runtime streams that
  many bytes through a matmul on this machine (also numpy's copy, for reference);
- matmul throughput: `[R, d] x [d, 4d]` at the step's rows R (2 x batch with CFG) and model width
  d, fp32, and weight-only int8 (`MatMulNBits`, block 32, accuracy level 4: what the int8 bundles use).
The floor of a step: max(bytes / bandwidth, flops / throughput), with bytes = the graph's weights +
the K/V cache of the positions before it (mean over the sequence) and flops = 2 x matmul weights x
R + the attention's 4 x L x R x H x pos x d. fraction = floor / measured step (1.0: at the limit).
The measured step: the runtime's loop (bench/fullsize_bench.py's method, median decode step) and
the torch sampler (`prologue_export.sample`, eager, whole generation / T). Random weights. Prints a
table, writes JSON. No assertions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime_bench import PRESETS, save_json  # noqa: E402

MODEL_PRESETS = {**PRESETS, "prologue-b-b": ("prologue-b-b", None)}


def session(path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def matmul_graph(path: Path, rows, k: int, n: int, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32) * 0.02
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path), save_as_external_data=w.nbytes > 1 << 30)


def time_run(sess, feeds, seconds: float = 1.0, min_runs: int = 5) -> float:
    """Median seconds of one run, over at least `min_runs` runs and about `seconds`."""
    sess.run(None, feeds)
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bandwidth(folder: Path, nbytes: int, threads: int) -> float:
    """Bytes/s of ONNX Runtime's GEMV over a weight of about `nbytes` (fp32 [K, N], N = 4096)."""
    n = 4096
    k = max(64, nbytes // (4 * n))
    path = folder / f"gemv_{k}.onnx"
    matmul_graph(path, 1, k, n)
    sess = session(path, threads)
    s = time_run(sess, {"x": np.ones((1, k), np.float32)})
    return k * n * 4 / s


def numpy_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / float(np.median(times))  # read + write


def matmul_flops(folder: Path, rows: int, d: int, threads: int, int8: bool) -> float:
    path = folder / f"mm_{rows}_{d}.onnx"
    matmul_graph(path, rows, d, 4 * d)
    if int8:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True, bits=8, accuracy_level=4)
        q.process()
        path = folder / f"mm_{rows}_{d}_int8.onnx"
        q.model.save_model_to_file(str(path))
    s = time_run(session(path, threads), {"x": np.ones((rows, d), np.float32)})
    return 2 * rows * d * 4 * d / s


def build_model(preset: str):
    import torch

    from prologue_export.config import model_preset
    from prologue_export.model import PrologueModel

    name, override = MODEL_PRESETS[preset]
    cfg = model_preset(name)
    if override:
        cfg.ar = dataclasses.replace(cfg.ar, **override)
    torch.manual_seed(0)
    return PrologueModel(cfg.validate()).eval()


def export_ar(model, folder: Path, weights) -> dict:
    from prologue_export.export.bundle import export_graph, quantize_ar_step
    from prologue_export.export.graphs import ARStepContract
    from prologue_export.runtime.contract import ar_graph_name

    export_graph(ARStepContract(model, max_batch=8), folder)
    for w in weights:
        if w != "fp32":
            quantize_ar_step(folder, w)
    return {w: folder / f"{ar_graph_name(w)}.onnx" for w in weights}


def runtime_step_s(model, graph: Path, batch: int, threads: int, steps: int) -> float:
    from prologue_export.runtime.contract import cache_feeds
    from prologue_export.runtime.loop import HostKVState, Noise, TokenLoop
    from prologue_export.runtime.settings import SamplingConfig

    cfg = model.config
    vocab, a = cfg.vocab(), cfg.ar
    sess = session(graph, threads)

    def step(feeds, k_cache, v_cache):
        return sess.run(["next_tokens", "k_new", "v_new"], {**feeds, **cache_feeds(k_cache, v_cache)})

    def state(rows, _batch):
        return HostKVState(step, (a.layers, rows, a.heads, vocab.seq_len, a.head_dim))

    classes = np.arange(batch) % cfg.num_classes
    steps = min(steps, vocab.seq_len - 1)
    times = []
    for _ in range(2):  # the first pass warms up
        loop = TokenLoop(state, vocab, cfg.num_classes, classes, SamplingConfig.from_dict({"cfg": 2.0}),
                         Noise(batch, vocab.seq_len, vocab.vocab_size, seed=0))
        loop.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loop.step()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_step_s(model, batch: int, threads: int) -> float:
    import torch

    import prologue_export as pe

    torch.set_num_threads(threads)
    classes = list(np.arange(batch) % model.config.num_classes)
    T = model.config.vocab().seq_len
    with torch.no_grad():
        pe.sample(model.ar, classes, {"cfg": 2.0}, seed=0)  # warm-up
        t0 = time.perf_counter()
        pe.sample(model.ar, classes, {"cfg": 2.0}, seed=0)
    return (time.perf_counter() - t0) / T


def step_work(model, graph_bytes: int, batch: int) -> dict:
    """Bytes and flops of a mean decode step (CFG: 2 rows per image)."""
    cfg = model.config
    a, T = cfg.ar, cfg.vocab().seq_len
    rows = 2 * batch
    mm_params = sum(m.weight.numel() for m in model.ar.modules() if type(m).__name__ == "Linear")
    pos = T / 2
    cache_bytes = 2 * a.layers * rows * a.heads * pos * a.head_dim * 4
    flops = 2 * mm_params * rows + 4 * a.layers * rows * a.heads * pos * a.head_dim
    return {"rows": rows, "bytes": graph_bytes + cache_bytes, "flops": flops, "width": a.dim}


def measure_preset(preset: str, args, folder: Path, limits: dict) -> list:
    model = build_model(preset)
    graphs = export_ar(model, folder, args.weights.split(","))
    out = []
    for batch in (int(b) for b in args.batches.split(",")):
        torch_s = torch_step_s(model, batch, args.threads) if args.torch else None
        for weights, graph in graphs.items():
            gbytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(graph.name))
            work = step_work(model, gbytes, batch)
            bw = bandwidth(folder, int(work["bytes"]), args.threads)
            key = ("int8" if weights != "fp32" else "fp32", work["rows"], work["width"])
            if key not in limits:
                limits[key] = matmul_flops(folder, work["rows"], work["width"], args.threads, weights != "fp32")
            floor_bw, floor_mm = work["bytes"] / bw, work["flops"] / limits[key]
            step = runtime_step_s(model, graph, batch, args.threads, args.steps)
            floor = max(floor_bw, floor_mm)
            row = {"preset": preset, "batch": batch, "weights": weights, "step_ms": step * 1e3,
                   "floor_ms": floor * 1e3, "bound": "bandwidth" if floor_bw >= floor_mm else "matmul",
                   "fraction": floor / step, "floor_bw_ms": floor_bw * 1e3, "floor_matmul_ms": floor_mm * 1e3,
                   "bytes_mb": work["bytes"] / 1e6, "gflop": work["flops"] / 1e9, "gemv_gb_s": bw / 1e9,
                   "matmul_gflop_s": limits[key] / 1e9, "torch_step_ms": torch_s * 1e3 if torch_s else None,
                   "x_torch": torch_s / step if torch_s else None}
            out.append(row)
            print(f"  {preset} B{batch} {weights}: step {row['step_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms "
                  f"({row['bound']}), {row['fraction']:.0%} of the limit", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid,prologue-b-b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--weights", default="fp32,int8,int4", help="AR graphs (int8/int4 only for prologue-b-b)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the torch sampler")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "limits.json"))
    args = parser.parse_args(argv)
    copy_bw = numpy_copy_bandwidth()
    print(f"numpy copy (1 GiB, read + write): {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows, limits = [], {}
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            a = args if preset == "prologue-b-b" else argparse.Namespace(**{**vars(args), "weights": "fp32"})
            rows += measure_preset(preset, a, Path(tmp), limits)
    print(f"{'preset':<13}{'B':>3}{'weights':>8}{'step ms':>9}{'floor ms':>9}{'bound':>10}{'of limit':>9}"
          f"{'GEMV GB/s':>10}{'GFLOP/s':>9}{'torch ms':>9}{'x torch':>8}")
    for r in rows:
        torch_ms = f"{r['torch_step_ms']:>9.2f}" if r["torch_step_ms"] else f"{'-':>9}"
        x = f"{r['x_torch']:>8.2f}" if r["x_torch"] else f"{'-':>8}"
        print(f"{r['preset']:<13}{r['batch']:>3}{r['weights']:>8}{r['step_ms']:>9.2f}{r['floor_ms']:>9.2f}"
              f"{r['bound']:>10}{r['fraction']:>9.0%}{r['gemv_gb_s']:>10.1f}{r['matmul_gflop_s']:>9.1f}{torch_ms}{x}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    save_json(args.out, rows, threads=args.threads, numpy_copy_gb_s=copy_bw / 1e9, cpu=cpu,
              load=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
