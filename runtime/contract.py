"""The contract between export and the runtime: which graphs a bundle holds and what each
one takes and returns (DESIGN.md §3).

Export builds its graph specs from these functions and writes them into the manifest; every
runtime backend feeds `ar_step` through `step_feeds` and `cache_feeds`, so an input's name,
dtype and shape are written down once. Torch-free.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

DECODER, PROLOGUE_GENERATOR, AR_STEP = "decoder", "prologue_generator", "ar_step"
# the graphs that become TensorRT engines (the quantized AR variants are ONNX Runtime only)
ENGINE_GRAPHS = (DECODER, PROLOGUE_GENERATOR, AR_STEP)
# AR weights: fp32 is `ar_step`; the others are weight-only quantized copies (ONNX Runtime MatMulNBits)
AR_WEIGHTS = ("fp32", "int8", "int4")
QUANTIZED_AR_WEIGHTS = AR_WEIGHTS[1:]
DEFAULT_MAX_BATCH = 8  # the largest batch a bundle serves unless export is told otherwise
OPT_BATCH = 8  # the batch dynamic axes are tuned for (never above the maximum)


def ar_graph_name(weights: str) -> str:
    """`ar_step` for fp32 weights, `ar_step_int8` / `ar_step_int4` for the quantized copies."""
    return AR_STEP if weights == "fp32" else f"{AR_STEP}_{weights}"


GRAPHS = ENGINE_GRAPHS + tuple(ar_graph_name(w) for w in QUANTIZED_AR_WEIGHTS)


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: typing.List[typing.Union[int, str]]  # ints are static, strings name dynamic axes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclasses.dataclass
class AxisRange:
    """Allowed sizes of one dynamic axis: engines are built for [min, max], tuned for opt."""

    min: int
    opt: int
    max: int

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


# --------------------------------------------------------------------------- axes


def batch_axes(max_batch: int) -> typing.Dict[str, AxisRange]:
    """`batch`: images per call, 1 .. max_batch."""
    return {"batch": AxisRange(1, min(OPT_BATCH, max_batch), max_batch)}


def ar_step_axes(max_batch: int, seq_len: int) -> typing.Dict[str, AxisRange]:
    """`batch`; `rows` = the batch once (no CFG) or twice (cond + uncond); `new_tokens` = 1 for
    a decode step, up to the whole sequence for a prefill."""
    return {**batch_axes(max_batch),
            "rows": AxisRange(1, min(2 * OPT_BATCH, 2 * max_batch), 2 * max_batch),
            "new_tokens": AxisRange(1, 1, seq_len)}


def static_axes(inputs, outputs, axes: typing.Dict[str, AxisRange]):
    """Axes whose range is one value (`batch` with max batch 1) become that number in the specs
    and leave `axes`: a static dimension, which exporters and engine builders take as it is."""
    fixed = {name: r.min for name, r in axes.items() if r.min == r.max}

    def resolve(specs):
        return [TensorSpec(s.name, s.dtype, [fixed.get(d, d) if isinstance(d, str) else d for d in s.shape])
                for s in specs]

    return resolve(inputs), resolve(outputs), {name: r for name, r in axes.items() if name not in fixed}


# --------------------------------------------------------------------------- graph I/O


def decoder_io(channels: int, image_size: int, num_visual_tokens: int):
    """visual ids `[B, X]` -> uint8 image `[B, C, H, W]` and the unclamped float image."""
    image = ["batch", channels, image_size, image_size]
    return ([TensorSpec("visual_ids", "int64", ["batch", num_visual_tokens])],
            [TensorSpec("image", "uint8", image), TensorSpec("image_float", "float32", image)])


def prologue_generator_io(channels: int, image_size: int, num_prologue_tokens: int, num_visual_tokens: int):
    """uint8 image `[B, C, H, W]` -> raw prologue ids `[B, Z]`, visual ids `[B, X]`."""
    return ([TensorSpec("image", "uint8", ["batch", channels, image_size, image_size])],
            [TensorSpec("prologue_ids", "int64", ["batch", num_prologue_tokens]),
             TensorSpec("visual_ids", "int64", ["batch", num_visual_tokens])])


# the per-step inputs of ar_step, in the graph's order, with their dtypes and shapes
STEP_INPUTS = (
    ("input_ids", "int64", ["rows", "new_tokens"]),  # fed tokens (BOS = class + V)
    ("start_pos", "int64", [1]),  # cache slot of the first fed token: a tensor, never baked in
    ("uniform", "float32", ["batch", "vocab"]),  # the host's noise for this position
    ("cfg_scale", "float32", [1]),
    ("temperature", "float32", [1]),
    ("top_k", "int64", [1]),  # 0 = off
    ("top_p", "float32", [1]),  # 0 or 1 = off
)


def cache_input_names(layers: int) -> typing.Tuple[typing.List[str], typing.List[str]]:
    """Names of the `ar_step` graph's per-layer KV-cache inputs, each `[rows, H, S, d]`.

    One input per layer and tensor (bundle format 2): a graph that slices layer i out of one
    `[L, rows, H, S, d]` input copies the whole cache every step (ONNX Runtime has no views)."""
    return [f"k_cache_{i}" for i in range(layers)], [f"v_cache_{i}" for i in range(layers)]


def ar_step_io(layers: int, heads: int, head_dim: int, seq_len: int, vocab_size: int):
    """The step inputs, then the caches (all K, then all V) -> sampled tokens `[B]`, the new
    K/V slices `[L, rows, H, new_tokens, d]` and the last position's logits `[rows, V]`."""
    k_names, v_names = cache_input_names(layers)
    inputs = [TensorSpec(name, dtype, [vocab_size if d == "vocab" else d for d in shape])
              for name, dtype, shape in STEP_INPUTS]
    inputs += [TensorSpec(name, "float32", ["rows", heads, seq_len, head_dim]) for name in k_names + v_names]
    outputs = [TensorSpec("next_tokens", "int64", ["batch"]),
               TensorSpec("k_new", "float32", [layers, "rows", heads, "new_tokens", head_dim]),
               TensorSpec("v_new", "float32", [layers, "rows", heads, "new_tokens", head_dim]),
               TensorSpec("logits", "float32", ["rows", vocab_size])]
    return inputs, outputs


# --------------------------------------------------------------------------- feeds


def step_feeds(input_ids, start_pos: int, uniform, cfg_scale: float, temperature: float, top_k: int,
               top_p: float) -> typing.Dict[str, np.ndarray]:
    """The per-step `ar_step` inputs as contiguous arrays of the contract's dtypes."""
    values = dict(input_ids=input_ids, start_pos=[start_pos], uniform=uniform, cfg_scale=[cfg_scale],
                  temperature=[temperature], top_k=[top_k], top_p=[top_p])
    return {name: np.ascontiguousarray(values[name], dtype=dtype) for name, dtype, _ in STEP_INPUTS}


def cache_feeds(k_cache, v_cache) -> dict:
    """`ar_step` cache inputs from caches `[L, rows, H, S, d]`: the layers' views, not copies."""
    k_names, v_names = cache_input_names(len(k_cache))
    return {**{n: k_cache[i] for i, n in enumerate(k_names)}, **{n: v_cache[i] for i, n in enumerate(v_names)}}
