"""Issue 27 probe: a whole AR decode step (the mid preset by default) (logits only, no sampling) as ONNX Runtime's
fused operators against the form exported today, on the same random weights.

    python bench/fused_step_probe.py [--preset mid] [--batch 8] [--rounds 5]

Today's form: `ARModel.step` exported by torch.onnx with per-layer cache inputs, returning the last
position's logits and the new K/V slice, which the host writes into its cache (as `HostKVState`).
Fused form, written here with onnx.helper from the model's weights: per layer
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


def constants(model):
    """numpy weights and the null-condition vectors the fused graph folds in."""
    import torch

    ar = model.ar
    tf = ar.transformer
    with torch.no_grad():
        cond = tf.null_condition()  # [1, 1, C]
        layers = []
        for layer in tf.layers:
            a = layer.attn1
            layers.append({
                "s1": (1 + layer.adaln_1.affine(cond)).reshape(-1), "g1": layer.gate1(cond).reshape(-1),
                "s2": (1 + layer.adaln_mlp.affine(cond)).reshape(-1), "g2": layer.gate_mlp(cond).reshape(-1),
                "wq": a.to_q.weight.T, "wkv": a.to_kv.weight.T, "qn": 1 + a.q_norm.weight, "kn": 1 + a.k_norm.weight,
                "wo": a.proj.weight.T, "bo": a.proj.bias if a.proj.bias is not None else torch.zeros(a.proj.out_features),
                "w1": layer.ffn.fc1.weight.T, "b1": _bias(layer.ffn.fc1), "w2": layer.ffn.fc2.weight.T,
                "b2": _bias(layer.ffn.fc2)})
        head = {"so": (1 + tf.out_norm.affine(cond)).reshape(-1), "wh": tf.out.weight.T, "bh": _bias(tf.out)}
        emb = ar.token_emb.weight
    as_np = lambda t: np.ascontiguousarray(t.detach().float().numpy())  # noqa: E731
    return ([{k: as_np(v) for k, v in d.items()} for d in layers], {k: as_np(v) for k, v in head.items()},
            as_np(emb), as_np(ar.rope_cos), as_np(ar.rope_sin))


def _bias(linear):
    import torch

    return linear.bias if linear.bias is not None else torch.zeros(linear.out_features)


def fused_graph(model, rows: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers, head, emb, cos, sin = constants(model)
    a = model.config.ar
    H, d, D, S, V = a.heads, a.head_dim, a.dim, model.config.vocab().seq_len, emb.shape[0]
    inits, nodes = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(cos, "cos"),
                    numpy_helper.from_array(sin, "sin"), numpy_helper.from_array(np.array([rows, 1, H, d]), "heads_shape"),
                    numpy_helper.from_array(np.array([rows, 1, D]), "flat_shape")], []
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [rows, 1]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [rows]),
              helper.make_tensor_value_info("total_len", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", f, [rows, 1, V])]
    nodes.append(helper.make_node("Gather", ["emb", "input_ids"], ["x0"]))
    x = "x0"
    for i, w in enumerate(layers):
        for k, v in w.items():
            inits.append(numpy_helper.from_array(v, f"l{i}_{k}"))
        n = lambda s: f"l{i}_{s}"  # noqa: E731
        inputs += [helper.make_tensor_value_info(n(c), f, [rows, H, S, d]) for c in ("past_k", "past_v")]
        outputs += [helper.make_tensor_value_info(n(c), f, [rows, H, S, d]) for c in ("present_k", "present_v")]
        nodes += [
            helper.make_node("SimplifiedLayerNormalization", [x, n("s1")], [n("h")], axis=-1, epsilon=1e-30),
            helper.make_node("MatMul", [n("h"), n("wq")], [n("q")]),
            helper.make_node("MatMul", [n("h"), n("wkv")], [n("kv")]),
            helper.make_node("Split", [n("kv")], [n("k"), n("v")], axis=-1, num_outputs=2),
            # QK-norm per head, outside GQA: its q_norm_weight/k_norm_weight inputs run on CUDA and
            # WebGPU only (ONNX Runtime 1.32's CPU kernel refuses them)
            helper.make_node("Reshape", [n("q"), "heads_shape"], [n("qh")]),
            helper.make_node("SimplifiedLayerNormalization", [n("qh"), n("qn")], [n("qhn")], axis=-1, epsilon=1e-30),
            helper.make_node("Reshape", [n("qhn"), "flat_shape"], [n("qf")]),
            helper.make_node("Reshape", [n("k"), "heads_shape"], [n("kh")]),
            helper.make_node("SimplifiedLayerNormalization", [n("kh"), n("kn")], [n("khn")], axis=-1, epsilon=1e-30),
            helper.make_node("Reshape", [n("khn"), "flat_shape"], [n("kf")]),
            helper.make_node("GroupQueryAttention",
                             [n("qf"), n("kf"), n("v"), n("past_k"), n("past_v"), "seqlens_k", "total_len", "cos", "sin"],
                             [n("o"), n("present_k"), n("present_v")], domain="com.microsoft", num_heads=H,
                             kv_num_heads=H, do_rotary=1, rotary_interleaved=1),
            helper.make_node("MatMul", [n("o"), n("wo")], [n("om")]),
            helper.make_node("Add", [n("om"), n("bo")], [n("ob")]),
            helper.make_node("Mul", [n("ob"), n("g1")], [n("og")]),
            helper.make_node("Add", [x, n("og")], [n("x1")]),
            helper.make_node("SimplifiedLayerNormalization", [n("x1"), n("s2")], [n("h2")], axis=-1, epsilon=1e-30),
            helper.make_node("MatMul", [n("h2"), n("w1")], [n("f1m")]),
            helper.make_node("Add", [n("f1m"), n("b1")], [n("f1")]),
            helper.make_node("Split", [n("f1")], [n("u"), n("gv")], axis=-1, num_outputs=2),
            helper.make_node("Gelu", [n("gv")], [n("ga")], approximate="tanh"),
            helper.make_node("Mul", [n("ga"), n("u")], [n("gu")]),
            helper.make_node("MatMul", [n("gu"), n("w2")], [n("f2m")]),
            helper.make_node("Add", [n("f2m"), n("b2")], [n("f2")]),
            helper.make_node("Mul", [n("f2"), n("g2")], [n("fg")]),
            helper.make_node("Add", [n("x1"), n("fg")], [n("x2")])]
        x = n("x2")
    for k, v in head.items():
        inits.append(numpy_helper.from_array(v, k))
    nodes += [helper.make_node("SimplifiedLayerNormalization", [x, "so"], ["hn"], axis=-1, epsilon=1e-30),
              helper.make_node("MatMul", ["hn", "wh"], ["lm"]), helper.make_node("Add", ["lm", "bh"], ["logits"])]
    model_proto = helper.make_model(helper.make_graph(nodes, "fused_step", inputs, outputs, inits),
                                    opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model_proto, str(path))


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
    fused_graph(model, R, tmp / "fused.onnx")
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
    io.bind_cpu_input("seqlens_k", np.full(R, p, np.int32))
    io.bind_cpu_input("total_len", np.array(p + 1, np.int32))
    for i in range(L):
        for kind, cache in (("k", k_cache), ("v", v_cache)):
            buffers[(i, kind)] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cache[i]))
            io.bind_ortvalue_input(f"l{i}_past_{kind}", buffers[(i, kind)])
            io.bind_ortvalue_output(f"l{i}_present_{kind}", buffers[(i, kind)])
    io.bind_output("logits")
    fused.run_with_iobinding(io)
    fused_logits = io.copy_outputs_to_cpu()[-1][:, 0]  # in binding order: the caches, then the logits
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
