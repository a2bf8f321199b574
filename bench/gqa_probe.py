"""Issue 27, first measurement toward a fused AR step: one layer's cached attention as the runtime's
`ar_step` graph has it (our `Attention.attend_cached` exported with torch.onnx, plus the host's
write of the new K/V slice into the cache, as `HostKVState` does) against ONNX Runtime's fused
`com.microsoft.GroupQueryAttention` with the cache as one buffer bound as both `past_*` and
`present_*` (updated in place, no host copy), each followed by the output projection.

    python bench/gqa_probe.py ROWS          # ROWS = 2 x batch with CFG: 2 (batch 1) or 16 (batch 8)

The mid preset's shapes (6 heads of 64, T = 73), the new token at position 40. Prints the largest
difference of the two outputs, whether GQA wrote the cache slot, and the median time of each over
5 interleaved rounds of 300 calls (ratio per round). QK-norm and RoPE stay outside both (GQA can
take them too: `q_norm_weight`/`k_norm_weight`, `do_rotary` with cos/sin caches). No assertions.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prologue_export.layers import Attention  # noqa: E402

TMP = Path(tempfile.mkdtemp())
R, H, d, S, p = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 6, 64, 73, 40
D = H * d
torch.manual_seed(0)
att = Attention(D, H, out_bias=True).eval()

class Cached(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, q, k, v, kc, vc, blocked):
        return self.a.attend_cached(q, k, v, kc, vc, blocked)

rng = np.random.default_rng(0)
q = rng.standard_normal((R, H, 1, d), dtype=np.float32); k = rng.standard_normal((R, H, 1, d), dtype=np.float32); v = rng.standard_normal((R, H, 1, d), dtype=np.float32)
kc = rng.standard_normal((R, H, S, d), dtype=np.float32); vc = rng.standard_normal((R, H, S, d), dtype=np.float32)
blocked = np.zeros((1, S + 1), dtype=bool); blocked[0, p:S] = True  # stale slots p..S-1; the new token at S
args = tuple(torch.from_numpy(a) for a in (q, k, v, kc, vc, blocked))
torch.onnx.export(Cached(att), args, str(TMP / "std.onnx"), dynamo=True, opset_version=20, input_names=["q","k","v","kc","vc","blocked"], output_names=["out"])
with torch.no_grad():
    ref = Cached(att)(*args).numpy()

# GQA graph: query/key/value [R, 1, D]; shared cache [R, H, S, d]; then the output projection
W = att.proj.weight.detach().numpy().T.copy(); b = att.proj.bias.detach().numpy()
nodes = [helper.make_node("GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_len"],
                          ["attn", "present_key", "present_value"], domain="com.microsoft", num_heads=H, kv_num_heads=H),
         helper.make_node("MatMul", ["attn", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["out"])]
f = TensorProto.FLOAT
g = helper.make_graph(nodes, "gqa",
    [helper.make_tensor_value_info("query", f, [R, 1, D]), helper.make_tensor_value_info("key", f, [R, 1, D]),
     helper.make_tensor_value_info("value", f, [R, 1, D]), helper.make_tensor_value_info("past_key", f, [R, H, S, d]),
     helper.make_tensor_value_info("past_value", f, [R, H, S, d]), helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [R]),
     helper.make_tensor_value_info("total_len", TensorProto.INT32, [])],
    [helper.make_tensor_value_info("out", f, [R, 1, D]), helper.make_tensor_value_info("present_key", f, [R, H, S, d]),
     helper.make_tensor_value_info("present_value", f, [R, H, S, d])],
    [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
onnx.save(m, str(TMP / "gqa.onnx"))

opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
std = ort.InferenceSession(str(TMP / "std.onnx"), opts, providers=["CPUExecutionProvider"])
gqa = ort.InferenceSession(str(TMP / "gqa.onnx"), opts, providers=["CPUExecutionProvider"])

def flat(x): return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(R, 1, D))
# the GQA cache holds the valid p slots then the new token written at p (it writes in place at seqlens)
kc2 = kc.copy(); vc2 = vc.copy()
kbuf = ort.OrtValue.ortvalue_from_numpy(kc2); vbuf = ort.OrtValue.ortvalue_from_numpy(vc2)
io = gqa.io_binding()
for name, arr in (("query", flat(q)), ("key", flat(k)), ("value", flat(v)),
                  ("seqlens_k", np.full(R, p, np.int32)), ("total_len", np.array(p + 1, np.int32))):
    io.bind_cpu_input(name, arr)
io.bind_ortvalue_input("past_key", kbuf); io.bind_ortvalue_input("past_value", vbuf)
io.bind_ortvalue_output("present_key", kbuf); io.bind_ortvalue_output("present_value", vbuf)
io.bind_output("out")
gqa.run_with_iobinding(io)
out_gqa = io.copy_outputs_to_cpu()[2]
print("max |gqa - ours|", float(np.abs(out_gqa - ref).max()), "cache slot p written:", np.allclose(kbuf.numpy()[:, :, p], k[:, :, 0]))

feeds = dict(q=q, k=k, v=v, kc=kc, vc=vc, blocked=blocked)
def run_std():
    std.run(None, feeds)
    kc[:, :, p] = k[:, :, 0]; vc[:, :, p] = v[:, :, 0]   # the host's cache write, as HostKVState
def run_gqa():
    gqa.run_with_iobinding(io)
res = {"std": [], "gqa": []}
for rnd in range(5):
    for name, fn in (("std", run_std), ("gqa", run_gqa)) if rnd % 2 == 0 else (("gqa", run_gqa), ("std", run_std)):
        fn(); t = []
        for _ in range(300):
            t0 = time.perf_counter(); fn(); t.append(time.perf_counter() - t0)
        res[name].append(np.median(t) * 1e6)
print(f"R={R}: ours {np.median(res['std']):.1f} us, GQA {np.median(res['gqa']):.1f} us, ratio per round",
      [round(float(a / b), 2) for a, b in zip(res["std"], res["gqa"])], "nodes ours", len(onnx.load(str(TMP / "std.onnx")).graph.node))
