"""Issue 27 probe: a whole AR decode step (the mid preset by default) (logits only, no sampling) as ONNX Runtime's
fused operators against the form exported today, on the same random weights.

    python bench/fused_step_probe.py [--preset mid] [--batch 8] [--rounds 5]

Today's form: `ARModel.step` exported by torch.onnx with per-layer cache inputs, returning the last
position's logits and the new K/V slice, which the host writes into its cache (as `HostKVState`).
Fused form (bench/fused_generation_probe.py `fused_transformer`, written with onnx.helper from the
model's weights): per layer
`SimplifiedLayerNormalization` (the adaptive norms' scale folded: the AR's condition is always the
null class's), the Q/KV matmuls, QK-norm (per head, before the attention: GQA's own
`q_norm_weight`/`k_norm_weight` run only on CUDA and WebGPU), `com.microsoft.GroupQueryAttention`
with the three-axis RoPE (`do_rotary`, interleaved, cos/sin caches =
the model's per-position tables) and the cache bound as both past and present (updated in place),
the output projection, the gated residuals, GeGLU, then the output norm and head. Decode steps only
(a token at position p over a cache of p slots). Prints the largest logit difference from torch and
the step times over interleaved rounds. No assertions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def fused_graph(model, path: Path) -> None:
    import onnx

    from fused_generation_probe import fused_transformer

    onnx.save(fused_transformer(model), str(path))


def standard_graph(model, rows: int, path: Path) -> None:
    """`ARModel.step` as the runtime's graph has it (per-layer caches in, logits and the new slice out)."""
    import torch

    L = model.config.ar.layers

    class Step(torch.nn.Module):
        def __init__(self, ar):
            super().__init__()
            self.ar = ar

        def forward(self, input_ids, start_pos, *caches):
            logits, k_new, v_new = self.ar.step(input_ids, start_pos, caches[:L], caches[L:])
            return logits[:, -1], k_new, v_new

    a, S = model.config.ar, model.config.vocab().seq_len
    caches = [torch.zeros(rows, a.heads, S, a.head_dim) for _ in range(2 * L)]
    args = (torch.zeros(rows, 1, dtype=torch.long), torch.tensor([5]), *caches)
    torch.onnx.export(Step(model.ar).eval(), args, str(path), dynamo=True, opset_version=20,
                      input_names=["input_ids", "start_pos"] + [f"c{i}" for i in range(2 * L)],
                      output_names=["logits", "k_new", "v_new"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid", help="mid, tiny or prologue-b-b (limits_bench's presets)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--position", type=int, default=40)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    from limits_bench import build_model

    model = build_model(args.preset)
    a = model.config.ar
    R, L, H, d, S, p = 2 * args.batch, a.layers, a.heads, a.head_dim, model.config.vocab().seq_len, args.position
    tmp = Path(tempfile.mkdtemp())
    fused_graph(model, tmp / "fused.onnx")
    standard_graph(model, R, tmp / "std.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    fused = ort.InferenceSession(str(tmp / "fused.onnx"), opts, providers=["CPUExecutionProvider"])
    std = ort.InferenceSession(str(tmp / "std.onnx"), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.ar.vocab.vocab_size, (R, 1))
    k_cache = rng.standard_normal((L, R, H, S, d), dtype=np.float32)
    v_cache = rng.standard_normal((L, R, H, S, d), dtype=np.float32)
    with torch.no_grad():
        ref = model.ar.step(torch.from_numpy(ids), torch.tensor([p]), torch.from_numpy(k_cache),
                            torch.from_numpy(v_cache))[0][:, -1].numpy()

    std_feeds = {"input_ids": ids, "start_pos": np.array([p])}
    std_feeds.update({f"c{i}": k_cache[i] for i in range(L)})
    std_feeds.update({f"c{L + i}": v_cache[i] for i in range(L)})
    std_logits = std.run(["logits"], std_feeds)[0]

    buffers = {}
    io = fused.io_binding()
    io.bind_cpu_input("input_ids", ids)
    io.bind_cpu_input("start_pos", np.array([p]))
    for i in range(L):
        for kind, cache in (("k", k_cache), ("v", v_cache)):
            buffers[(i, kind)] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cache[i]))
            io.bind_ortvalue_input(f"l{i}_past_{kind}", buffers[(i, kind)])
            io.bind_ortvalue_output(f"l{i}_present_{kind}", buffers[(i, kind)])
    io.bind_output("last")
    fused.run_with_iobinding(io)
    fused_logits = io.copy_outputs_to_cpu()[-1]  # in binding order: the caches, then the logits
    print(f"max |logits - torch|: today's form {np.abs(std_logits - ref).max():.2e}, fused {np.abs(fused_logits - ref).max():.2e} "
          f"(logit scale {np.abs(ref).max():.2f}); argmax equal: {np.array_equal(fused_logits.argmax(-1), ref.argmax(-1))}")

    def run_std():
        out = std.run(None, std_feeds)
        k_cache[:, :, :, p] = out[1][:, :, :, 0]  # the host's write of the new slice, as HostKVState
        v_cache[:, :, :, p] = out[2][:, :, :, 0]

    def run_fused():
        fused.run_with_iobinding(io)

    times = {"today": [], "fused": []}
    for r in range(args.rounds):
        order = (("today", run_std), ("fused", run_fused))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            fn()
            t = []
            for _ in range(50):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
            times[name].append(float(np.median(t)) * 1e3)
    ratios = [s / f for s, f in zip(times["today"], times["fused"])]
    print(f"{args.preset}, batch {args.batch} ({R} rows), position {p}: today's step {np.median(times['today']):.2f} ms, fused "
          f"{np.median(times['fused']):.2f} ms; today / fused per round " + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"nodes: today's {len(__import__('onnx').load(str(tmp / 'std.onnx')).graph.node)}, "
          f"fused {len(__import__('onnx').load(str(tmp / 'fused.onnx')).graph.node)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
