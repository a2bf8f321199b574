"""Issue 27 probe: whole generations through a fused `ar_step` (ONNX Runtime's fused operators, the
KV cache updated inside the graph) against today's `ar_step`, both through the runtime's `TokenLoop`.

    python bench/fused_generation_probe.py [--preset mid] [--batch 8] [--rounds 3]

The fused graph has today's step inputs (runtime/contract.py STEP_INPUTS: input_ids, start_pos,
uniform, cfg_scale, temperature, top_k, top_p) and per-layer caches bound as both past and present
(one OrtValue each, updated by `GroupQueryAttention` in place: no host copy); its transformer is
written with onnx.helper from the model's weights (`fused_transformer`: the BOS/class embedding,
`SimplifiedLayerNormalization` with the null condition's adaptive scales folded in, QK-norm per
head, GQA with the 3-axis RoPE as its interleaved rotary over the model's cos/sin tables, GeGLU, the
gated residuals, the output norm and head on the last position), and its sampling tail is today's
(`export/graphs.py`'s CFG mix, temperature, segment mask, top-k, top-p and Gumbel argmax), exported
by torch.onnx and merged in. Checks: the same tokens as today's graph for every row and position in
several sampling modes (split CFG, no CFG, top-k/top-p, temperatures, a fixed prologue's prefill);
then images/s of each, interleaved rounds. Random weights. No assertions.
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

EPS = 1e-30  # our RMS norm divides by max(||x||, 1e-12) / sqrt(n); SimplifiedLayerNormalization adds eps


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


def layer_nodes(n, x: str, H: int, d: int) -> list:
    """One layer's nodes: `n(name)` is the layer's prefixed name, `x` its input."""
    from onnx import helper

    return [
        helper.make_node("SimplifiedLayerNormalization", [x, n("s1")], [n("h")], axis=-1, epsilon=EPS),
        helper.make_node("MatMul", [n("h"), n("wq")], [n("q")]),
        helper.make_node("MatMul", [n("h"), n("wkv")], [n("kv")]),
        helper.make_node("Split", [n("kv")], [n("k"), n("v")], axis=-1, num_outputs=2),
        helper.make_node("Reshape", [n("q"), "heads_shape"], [n("qh")]),
        helper.make_node("SimplifiedLayerNormalization", [n("qh"), n("qn")], [n("qhn")], axis=-1, epsilon=EPS),
        helper.make_node("Reshape", [n("qhn"), "flat_shape"], [n("qf")]),
        helper.make_node("Reshape", [n("k"), "heads_shape"], [n("kh")]),
        helper.make_node("SimplifiedLayerNormalization", [n("kh"), n("kn")], [n("khn")], axis=-1, epsilon=EPS),
        helper.make_node("Reshape", [n("khn"), "flat_shape"], [n("kf")]),
        helper.make_node("GroupQueryAttention",
                         [n("qf"), n("kf"), n("v"), n("past_k"), n("past_v"), "seqlens_k", "total_len", "cos", "sin"],
                         [n("o"), n("present_k"), n("present_v")], domain="com.microsoft", num_heads=H,
                         kv_num_heads=H, do_rotary=1, rotary_interleaved=1),
        helper.make_node("MatMul", [n("o"), n("wo")], [n("om")]),
        helper.make_node("Add", [n("om"), n("bo")], [n("ob")]),
        helper.make_node("Mul", [n("ob"), n("g1")], [n("og")]),
        helper.make_node("Add", [x, n("og")], [n("x1")]),
        helper.make_node("SimplifiedLayerNormalization", [n("x1"), n("s2")], [n("h2")], axis=-1, epsilon=EPS),
        helper.make_node("MatMul", [n("h2"), n("w1")], [n("f1m")]),
        helper.make_node("Add", [n("f1m"), n("b1")], [n("f1")]),
        helper.make_node("Split", [n("f1")], [n("u"), n("gv")], axis=-1, num_outputs=2),
        helper.make_node("Gelu", [n("gv")], [n("ga")], approximate="tanh"),
        helper.make_node("Mul", [n("ga"), n("u")], [n("gu")]),
        helper.make_node("MatMul", [n("gu"), n("w2")], [n("f2m")]),
        helper.make_node("Add", [n("f2m"), n("b2")], [n("f2")]),
        helper.make_node("Mul", [n("f2"), n("g2")], [n("fg")]),
        helper.make_node("Add", [n("x1"), n("fg")], [n("x2")])]


def fused_transformer(model):
    """The transformer of one step as an ONNX model: inputs input_ids [R, T], start_pos [1] and the
    per-layer caches `l{i}_past_{k,v}` [R, H, S, d]; outputs the last position's logits [R, V], its
    `position` [1] and `l{i}_present_{k,v}` (the same buffers when bound so)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    layers, head, emb, cos, sin = constants(model)
    with torch.no_grad():
        class_emb = np.ascontiguousarray(model.ar.class_emb.weight.float().numpy())
    a = model.config.ar
    H, d, D, V = a.heads, a.head_dim, a.dim, emb.shape[0]
    f, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    const = {"emb": emb, "class_emb": class_emb, "cos": cos, "sin": sin, "V": np.array(V, np.int64),
             "zero": np.array(0, np.int64), "one": np.array(1, np.int64), "one32": np.array(1, np.int32),
             "heads_shape": np.array([0, 0, H, d]), "flat_shape": np.array([0, 0, D]), "axis1": np.array([1]),
             "minus1": np.array([-1]), "scalar": np.array([], np.int64)}
    inits = [numpy_helper.from_array(v, k) for k, v in const.items()]
    nodes = [  # the embedding: V + c is the BOS of class c
        helper.make_node("GreaterOrEqual", ["input_ids", "V"], ["is_bos"]),
        helper.make_node("Sub", ["input_ids", "V"], ["cls"]),
        helper.make_node("Where", ["is_bos", "cls", "zero"], ["cls_ids"]),
        helper.make_node("Where", ["is_bos", "zero", "input_ids"], ["tok_ids"]),
        helper.make_node("Gather", ["class_emb", "cls_ids"], ["bos_e"]),
        helper.make_node("Gather", ["emb", "tok_ids"], ["tok_e"]),
        helper.make_node("Unsqueeze", ["is_bos", "minus1"], ["is_bos3"]),
        helper.make_node("Where", ["is_bos3", "bos_e", "tok_e"], ["x0"]),
        # GQA's lengths: the cache holds start_pos slots, T tokens come in
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "axis1"], ["T1"]),  # [1]
        helper.make_node("Slice", ["ids_shape", "zero1", "axis1"], ["R1"]),  # [1]
        helper.make_node("Add", ["start_pos", "T1"], ["total64"]),  # [1]
        helper.make_node("Sub", ["total64", "one"], ["position"]),  # [1] the position sampled
        helper.make_node("Cast", ["total64"], ["total32_1"], to=i32),
        helper.make_node("Reshape", ["total32_1", "scalar"], ["total_len"]),
        helper.make_node("Sub", ["total32_1", "one32"], ["seq1"]),
        helper.make_node("Expand", ["seq1", "R1"], ["seqlens_k"])]
    inits.append(numpy_helper.from_array(np.array([0]), "zero1"))
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["rows", "new_tokens"]),
              helper.make_tensor_value_info("start_pos", i64, [1])]
    outputs = [helper.make_tensor_value_info("last", f, ["rows", V]), helper.make_tensor_value_info("position", i64, [1])]
    S = model.config.vocab().seq_len
    x = "x0"
    for i, w in enumerate(layers):
        n = lambda s, i=i: f"l{i}_{s}"  # noqa: E731
        inits += [numpy_helper.from_array(v, n(k)) for k, v in w.items()]
        inputs += [helper.make_tensor_value_info(n(c), f, ["rows", H, S, d]) for c in ("past_k", "past_v")]
        outputs += [helper.make_tensor_value_info(n(c), f, ["rows", H, S, d]) for c in ("present_k", "present_v")]
        nodes += layer_nodes(n, x, H, d)
        x = n("x2")
    inits += [numpy_helper.from_array(v, k) for k, v in head.items()]
    inits.append(numpy_helper.from_array(np.array(-1, np.int64), "last_index"))
    nodes += [helper.make_node("Gather", [x, "last_index"], ["x_last"], axis=1),  # [R, D]
              helper.make_node("SimplifiedLayerNormalization", ["x_last", "so"], ["hn"], axis=-1, epsilon=EPS),
              helper.make_node("MatMul", ["hn", "wh"], ["lm"]), helper.make_node("Add", ["lm", "bh"], ["last"])]
    return helper.make_model(helper.make_graph(nodes, "fused_transformer", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def sampling_tail(model, path: Path):
    """Today's sampling tail of `ARStepModule` as its own ONNX model: (last [R, V], position [1],
    uniform [B, V], cfg_scale, temperature, top_k, top_p) -> next_tokens [B]."""
    import onnx
    import torch

    from prologue_export.export.graphs import _top_k, _top_p
    from prologue_export.runtime.settings import max_top_k

    class Tail(torch.nn.Module):
        def __init__(self, ar):
            super().__init__()
            self.ar, self.cap = ar, max_top_k(ar.vocab)

        def forward(self, last, position, uniform, cfg_scale, temperature, top_k, top_p):
            R, B = last.shape[0], uniform.shape[0]
            torch._check(B <= R)
            mixed = cfg_scale * last[:B] + (1.0 - cfg_scale) * last[R - B:]
            scores = mixed / temperature + self.ar.logit_mask.index_select(0, position)
            scores = _top_p(_top_k(scores, top_k, self.cap, True), top_p, True)
            return torch.argmax(scores - torch.log(-torch.log(uniform)), dim=-1)

    V = model.ar.vocab.vocab_size
    rows, batch = torch.export.Dim("rows", min=1, max=2048), torch.export.Dim("batch", min=1, max=1024)
    args = (torch.zeros(4, V), torch.tensor([3]), torch.full((2, V), 0.5), torch.tensor([2.0]), torch.tensor([1.0]),
            torch.tensor([0]), torch.tensor([0.0]))
    torch.onnx.export(Tail(model.ar).eval(), args, str(path), dynamo=True, opset_version=20,
                      input_names=["last", "position", "uniform", "cfg_scale", "temperature", "top_k", "top_p"],
                      output_names=["next_tokens"],
                      dynamic_shapes=({0: rows}, None, {0: batch}, None, None, None, None))
    return onnx.load(str(path))


def fused_ar_step(model, folder: Path) -> Path:
    """The merged graph: the fused transformer, then today's sampling tail."""
    import onnx
    from onnx import compose

    tail = sampling_tail(model, folder / "tail.onnx")
    body = fused_transformer(model)
    body.ir_version = tail.ir_version
    tail_ops = {o.domain: o.version for o in tail.opset_import}
    del body.opset_import[:]
    body.opset_import.extend([onnx.helper.make_opsetid(k, v) for k, v in tail_ops.items()]
                             + [onnx.helper.make_opsetid("com.microsoft", 1)])
    tail_ops.setdefault("com.microsoft", 1)
    del tail.opset_import[:]
    tail.opset_import.extend([onnx.helper.make_opsetid(k, v) for k, v in tail_ops.items()])
    graph = compose.merge_graphs(body.graph, tail.graph, io_map=[("last", "last"), ("position", "position")],
                                 outputs=["next_tokens"] + [o.name for o in body.graph.output if "present" in o.name])
    merged = onnx.helper.make_model(graph, opset_imports=list(tail.opset_import), ir_version=tail.ir_version)
    merged.functions.extend(tail.functions)  # no onnx.checker: it does not know ONNX Runtime's contrib ops
    path = folder / "ar_step_fused.onnx"
    onnx.save(merged, str(path))
    return path


class FusedKVState:
    """A generation's caches as OrtValues bound as both past and present of the fused graph."""

    def __init__(self, session, layers: int, cache_shape: tuple):
        import onnxruntime as ort

        self.session, self.io = session, session.io_binding()
        self.buffers = []
        for i in range(layers):
            for kind in ("k", "v"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(cache_shape, np.float32))
                self.buffers.append(buf)
                self.io.bind_ortvalue_input(f"l{i}_past_{kind}", buf)
                self.io.bind_ortvalue_output(f"l{i}_present_{kind}", buf)
        self.io.bind_output("next_tokens")

    def step(self, feeds):
        for name, value in feeds.items():
            self.io.bind_cpu_input(name, np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.io)
        return self.io.copy_outputs_to_cpu()[-1]

    def close(self):
        self.buffers = []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from limits_bench import build_model, export_ar, session
    from prologue_export.runtime.contract import cache_feeds
    from prologue_export.runtime.loop import HostKVState, Noise, TokenLoop
    from prologue_export.runtime.settings import SamplingConfig

    model = build_model(args.preset)
    cfg, a = model.config, model.config.ar
    vocab = cfg.vocab()
    folder = Path(tempfile.mkdtemp())
    today = session(export_ar(model, folder, ["fp32"])["fp32"], args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    fused = ort.InferenceSession(str(fused_ar_step(model, folder)), opts, providers=["CPUExecutionProvider"])
    cache = lambda rows: (rows, a.heads, vocab.seq_len, a.head_dim)  # noqa: E731

    def today_state(rows, _batch):
        def run(feeds, k, v):
            return today.run(["next_tokens", "k_new", "v_new"], {**feeds, **cache_feeds(k, v)})
        return HostKVState(run, (a.layers, *cache(rows)))

    def fused_state(rows, _batch):
        return FusedKVState(fused, a.layers, cache(rows))

    def generate(make_state, classes, settings, seed, prologue=None):
        loop = TokenLoop(make_state, vocab, cfg.num_classes, classes, SamplingConfig.coerce(settings),
                         Noise(len(classes), vocab.seq_len, vocab.vocab_size, seed=seed), prologue_ids=prologue)
        while not loop.done:
            loop.step()
        return loop.tokens

    classes = np.arange(args.batch) % cfg.num_classes
    cases = {"cfg 2": {"cfg": 2.0}, "no cfg, T 0.9, prologue T 0.8": {"cfg": 0.0, "temperature": 0.9,
                                                                       "semantic_temperature": 0.8},
             "split cfg": {"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7,
                           "visual_cfg_schedule": "cosine", "visual_cfg_scale": 3.0},
             "top-k 30, top-p 0.95": {"cfg": 1.5, "topK": 30, "topP": 0.95}}
    for name, settings in cases.items():
        same = np.array_equal(generate(today_state, classes, settings, 7), generate(fused_state, classes, settings, 7))
        print(f"  tokens equal ({name}): {same}", flush=True)
    fixed = np.random.default_rng(1).integers(0, vocab.prologue_codebook_size, (args.batch, vocab.num_prologue_tokens))
    same = np.array_equal(generate(today_state, classes, {"cfg": 0.0}, 3, fixed),
                          generate(fused_state, classes, {"cfg": 0.0}, 3, fixed))
    print(f"  tokens equal (a fixed prologue, prefill of {vocab.num_prologue_tokens + 1} tokens): {same}", flush=True)

    times = {"today": [], "fused": []}
    for r in range(args.rounds):
        order = (("today", today_state), ("fused", fused_state))
        for name, make in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            generate(make, classes, {"cfg": 2.0}, r)
            times[name].append(args.batch / (time.perf_counter() - t0))
    ratios = [f / t for f, t in zip(times["fused"], times["today"])]
    print(f"{args.preset} batch {args.batch}: today {np.median(times['today']):.2f} img/s (AR only), fused "
          f"{np.median(times['fused']):.2f} img/s; fused / today per round " + ", ".join(f"{x:.2f}" for x in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
