"""The contract between export and the runtime: which graphs a bundle holds and what each
one takes and returns (DESIGN.md §3).

Export builds its graph specs from these functions and writes them into the manifest; every
runtime backend feeds `ar_step` through `step_feeds` and `cache_feeds`, and the TensorRT backend
sizes its buffers from the manifest's specs (`resolve_shape`), so an input's name, dtype and
shape are written down once (`STEP_INPUTS`). Torch-free.
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


def batch_ranges(max_batch: int, opt_batch: typing.Optional[int] = None) -> typing.Dict[str, AxisRange]:
    """The batch-like axes: `batch` (images per call, 1 .. max_batch, tuned for `opt_batch`, by
    default min(OPT_BATCH, max_batch)) and `rows` (the batch once without CFG or twice with it)."""
    opt = min(OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    return {"batch": AxisRange(1, opt, max_batch), "rows": AxisRange(1, 2 * opt, 2 * max_batch)}


def batch_axes(max_batch: int) -> typing.Dict[str, AxisRange]:
    """`batch`: images per call, 1 .. max_batch."""
    return {"batch": batch_ranges(max_batch)["batch"]}


def ar_step_axes(max_batch: int, seq_len: int) -> typing.Dict[str, AxisRange]:
    """`batch`; `rows` = the batch once (no CFG) or twice (cond + uncond); `new_tokens` = 1 for
    a decode step, up to the whole sequence for a prefill."""
    return {**batch_ranges(max_batch), "new_tokens": AxisRange(1, 1, seq_len)}


def profile_shapes(graph: dict, max_batch: int, opt_batch: typing.Optional[int] = None) -> typing.Dict[str, dict]:
    """min/opt/max shapes of every input of one graph, from the manifest's spec of it (`graphs.<name>`):
    `{input: {"min": [...], "opt": [...], "max": [...]}}`. The batch-like axes take `batch_ranges`
    (max_batch, opt_batch); the others (`new_tokens`: opt 1, a decode step) keep the manifest's range.
    What TensorRT engines (`prologue build-engines`) and ONNX Runtime's TensorRT provider are built for."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max batch must be an integer >= 1, got {max_batch!r}")
    if opt_batch is not None and not 1 <= opt_batch <= max_batch:
        raise ValueError(f"the serving batch (opt) must lie in [1, {max_batch}], got {opt_batch}")
    batch_like = batch_ranges(max_batch, opt_batch)
    ranges = {}
    for name, r in graph.get("dynamic_axes", {}).items():
        b = batch_like.get(name)
        ranges[name] = (b.min, b.opt, b.max) if b else (max(1, int(r["min"])), max(1, int(r["opt"])), int(r["max"]))
    return {spec["name"]: {k: [int(d) if not isinstance(d, str) else ranges[d][i] for d in spec["shape"]]
                           for i, k in enumerate(("min", "opt", "max"))}
            for spec in graph["inputs"]}


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


@dataclasses.dataclass(frozen=True)
class StepInput:
    """One per-step input of `ar_step`: everything export, the backends, verification and the
    benchmarks need to know about it. `shape` holds axis names (`rows`, `batch`, `new_tokens`,
    `vocab`) and numbers; `example` is the value a per-call scalar is traced with at export."""

    name: str
    dtype: str  # numpy dtype name
    shape: typing.Tuple[typing.Union[int, str], ...]
    meaning: str
    example: typing.Optional[float] = None


# The per-step inputs of ar_step, in the graph's order: the one place they are written down.
# Adding one: a StepInput here, its use in export/graphs.py `ARStepModule`, and the value the
# sampler (`runtime/loop.py` `TokenLoop.step`, the torch reference `prologue_export/sampling.py`) feeds.
STEP_INPUTS = (
    StepInput("input_ids", "int64", ("rows", "new_tokens"), "fed tokens; a row starts with its BOS (class + V)"),
    StepInput("start_pos", "int64", (1,), "cache slot of the first fed token: a tensor, never baked in", 0),
    StepInput("uniform", "float32", ("batch", "vocab"), "the host's uniform noise for the position sampled"),
    StepInput("cfg_scale", "float32", (1,), "CFG scale s: s * cond + (1 - s) * uncond (1 without CFG rows)", 2.0),
    StepInput("temperature", "float32", (1,), "the mixed logits are divided by it", 1.0),
    StepInput("top_k", "int64", (1,), "keep the k best tokens (0 = off)", 0),
    StepInput("top_p", "float32", (1,), "keep the smallest set of best tokens of mass p (0 or 1 = off)", 0.0),
)
STEP_INPUT_NAMES = tuple(s.name for s in STEP_INPUTS)


def resolve_shape(shape, sizes: typing.Dict[str, int]) -> typing.Tuple[int, ...]:
    """A spec's shape with its named axes replaced by `sizes` (e.g. rows, batch, new_tokens)."""
    try:
        return tuple(int(sizes[d]) if isinstance(d, str) else int(d) for d in shape)
    except KeyError as exc:
        raise ValueError(f"no size given for axis {exc.args[0]!r} of shape {list(shape)}") from None


def cache_input_names(layers: int) -> typing.Tuple[typing.List[str], typing.List[str]]:
    """Names of the `ar_step` graph's per-layer KV-cache inputs, each `[rows, H, S, d]`.

    One input per layer and tensor (bundle format 2): a graph that slices layer i out of one
    `[L, rows, H, S, d]` input copies the whole cache every step (ONNX Runtime has no views)."""
    return [f"k_cache_{i}" for i in range(layers)], [f"v_cache_{i}" for i in range(layers)]


def ar_step_io(layers: int, heads: int, head_dim: int, seq_len: int, vocab_size: int):
    """The step inputs, then the caches (all K, then all V) -> sampled tokens `[B]`, the new
    K/V slices `[L, rows, H, new_tokens, d]` and the last position's logits `[rows, V]`."""
    k_names, v_names = cache_input_names(layers)
    inputs = [TensorSpec(s.name, s.dtype, [vocab_size if d == "vocab" else d for d in s.shape]) for s in STEP_INPUTS]
    inputs += [TensorSpec(name, "float32", ["rows", heads, seq_len, head_dim]) for name in k_names + v_names]
    outputs = [TensorSpec("next_tokens", "int64", ["batch"]),
               TensorSpec("k_new", "float32", [layers, "rows", heads, "new_tokens", head_dim]),
               TensorSpec("v_new", "float32", [layers, "rows", heads, "new_tokens", head_dim]),
               TensorSpec("logits", "float32", ["rows", vocab_size])]
    return inputs, outputs


# --------------------------------------------------------------------------- feeds


def step_feeds(**values) -> typing.Dict[str, np.ndarray]:
    """The per-step `ar_step` inputs, keyed by name (every one of `STEP_INPUTS`, no other), as
    contiguous arrays of the contract's dtypes; a per-call scalar (shape `[1]`) may be a number."""
    if set(values) != set(STEP_INPUT_NAMES):
        missing, unknown = set(STEP_INPUT_NAMES) - set(values), set(values) - set(STEP_INPUT_NAMES)
        raise TypeError(f"step_feeds needs exactly the ar_step inputs {', '.join(STEP_INPUT_NAMES)}"
                        f" (missing: {sorted(missing)}, unknown: {sorted(unknown)})")
    feeds = {}
    for spec in STEP_INPUTS:
        value = values[spec.name]
        if spec.shape == (1,):
            value = np.reshape(value, (1,))
        feeds[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
    return feeds


def cache_feeds(k_cache, v_cache) -> dict:
    """`ar_step` cache inputs from caches `[L, rows, H, S, d]`: the layers' views, not copies."""
    k_names, v_names = cache_input_names(len(k_cache))
    return {**{n: k_cache[i] for i, n in enumerate(k_names)}, **{n: v_cache[i] for i, n in enumerate(v_names)}}
