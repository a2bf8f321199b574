"""The three exported graphs, one small class each declaring its whole contract (DESIGN.md §3).

Each contract names its inputs and outputs with dtypes and symbolic shapes, says which axes are
dynamic (with min/opt/max for engine builders), builds a sample input with every dynamic size
>= 2 (size 1 gets specialised into a constant), and wraps the model in the module that export
lowers. The wrappers call the one model definition in `prologue_export`; they add only the I/O
conversions (uint8 pixels, in-graph sampling).

- `decoder`: visual ids `[B, X]` -> image uint8 `[B, C, H, W]` (+ the unclamped float image).
- `prologue_generator`: image uint8 `[B, C, H, W]` -> prologue ids `[B, Z]`, visual ids `[B, X]`.
- `ar_step`: prefill or decode over a static KV cache, CFG mixing, temperature, segment mask,
  top-k, top-p and Gumbel-max with host noise, for the last fed position.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from ..ar import ARModel
from ..model import PrologueModel
from ..runtime import contract as io
from ..runtime.contract import AxisRange, TensorSpec
from ..runtime.settings import max_top_k, top_k_active, top_p_active
from ..tokenizer import images_to_uint8, uint8_to_images
from .errors import ExportError


class GraphContract:
    name: str
    inputs: typing.List[TensorSpec]
    outputs: typing.List[TensorSpec]
    axes: typing.Dict[str, AxisRange]

    def module(self) -> nn.Module:
        raise NotImplementedError

    def sample_inputs(self, generator: torch.Generator) -> typing.Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def sample_batch(self) -> int:
        """The batch of the sample inputs: 2 (a size-1 sample would be specialised), or 1 when the
        batch range is the single value 1 (`--max-batch 1`: a static batch)."""
        return min(2, self.axes["batch"].max) if "batch" in self.axes else 1

    def dynamic_shapes(self) -> typing.Dict[str, dict]:
        """`torch.export` dynamic shapes keyed by input name (axes whose range is one value are
        already numbers in the specs: torch.export's Dim needs min < max)."""
        dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in self.axes.items()}
        return {spec.name: {i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in self.inputs}

    def export_dynamic_shapes(self) -> typing.Dict[str, typing.Any]:
        """`dynamic_shapes` keyed by the wrapper's `forward` arguments (what `torch.export` takes)."""
        return self.dynamic_shapes()

    def to_json(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "dynamic_axes": {name: r.to_json() for name, r in self.axes.items()},
        }


# ---------------------------------------------------------------------------------------------


class DecoderModule(nn.Module):
    def __init__(self, model: PrologueModel):
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, visual_ids: torch.Tensor):
        image = self.tokenizer.decode_codes(self.tokenizer.visual_quantizer.codes(visual_ids))  # [B, C, H, W]
        return images_to_uint8(image), image


class DecoderContract(GraphContract):
    name = io.DECODER

    def __init__(self, model: PrologueModel, max_batch: int):
        self.model = model
        t = model.config.tokenizer
        self.inputs, self.outputs, self.axes = io.static_axes(
            *io.decoder_io(t.channels, t.image_size, t.num_visual_tokens), io.batch_axes(max_batch))

    def module(self) -> nn.Module:
        return DecoderModule(self.model).eval()

    def sample_inputs(self, generator):
        t = self.model.config.tokenizer
        return (torch.randint(0, t.visual_codebook_size, (self.sample_batch, t.num_visual_tokens), generator=generator),)


class PrologueGeneratorModule(nn.Module):
    def __init__(self, model: PrologueModel):
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, image: torch.Tensor):
        return self.tokenizer.encode(uint8_to_images(image))  # [B, C, H, W] in [-1, 1]


class PrologueGeneratorContract(GraphContract):
    name = io.PROLOGUE_GENERATOR

    def __init__(self, model: PrologueModel, max_batch: int):
        self.model = model
        t = model.config.tokenizer
        self.inputs, self.outputs, self.axes = io.static_axes(
            *io.prologue_generator_io(t.channels, t.image_size, t.num_prologue_tokens, t.num_visual_tokens),
            io.batch_axes(max_batch))

    def module(self) -> nn.Module:
        return PrologueGeneratorModule(self.model).eval()

    def sample_inputs(self, generator):
        t = self.model.config.tokenizer
        shape = (self.sample_batch, t.channels, t.image_size, t.image_size)
        return (torch.randint(0, 256, shape, generator=generator).to(torch.uint8),)


class ARStepModule(nn.Module):
    """One AR step with sampling of the last fed position, for `B` images in `R` rows.

    Rows are `[cond ; uncond]` (R = 2B) with CFG, or `[cond]` (R = B) without; the CFG mix is
    `s * cond + (1 - s) * uncond` with `uncond = rows[R - B:]`, so without CFG the host passes
    `cfg_scale = 1` and the mix is exactly `cond`. Then `/ temperature`, `+ mask[position]`, top-k
    (`top_k` 0 = off), top-p (`top_p` 0 or >= 1 = off) and `argmax(logits + Gumbel(uniform))`.
    The KV cache comes in per layer: `kv_cache` = `k_cache_0 .. k_cache_{L-1}, v_cache_0 ..`.

    Every op stays inside TensorRT 10's ONNX operator table (export/trt_support.py): top-k is a
    TopK of constant K = `top_k_cap` (the largest top-k the vocabulary allows) and a compare, top-p
    a bisection on the scores (no sort, no scatter), integer bounds use Min/Max/Where (no Clip).
    """

    def __init__(self, ar: ARModel, conditional: bool = True):
        super().__init__()
        self.ar = ar
        self.conditional = conditional  # top-k / top-p run only when on (False: always, then select)
        self.top_k_cap = max_top_k(ar.vocab)

    def forward(self, *inputs):
        # the graph's inputs in the contract's order (runtime/contract.py STEP_INPUTS), then the caches
        step = dict(zip(io.STEP_INPUT_NAMES, inputs))
        kv_cache = inputs[len(io.STEP_INPUT_NAMES):]
        input_ids, start_pos, uniform = step["input_ids"], step["start_pos"], step["uniform"]
        R, T = input_ids.shape
        B = uniform.shape[0]
        torch._check(B <= R)  # rows hold the batch once or twice: lets export see `last[:B]` as B rows
        L = self.ar.cfg.layers
        k_cache, v_cache = kv_cache[:L], kv_cache[L:]  # L tensors [R, H, S, d] each
        logits, k_new, v_new = self.ar.step(input_ids, start_pos, k_cache, v_cache)  # [R, T, V], [L, R, H, T, d]
        last = logits[:, -1].float()  # [R, V]
        cond, uncond = last[:B], last[R - B:]
        cfg_scale = step["cfg_scale"]
        mixed = cfg_scale * cond + (1.0 - cfg_scale) * uncond  # [B, V]
        position = start_pos.reshape(-1)[:1] + (T - 1)  # [1] the step being sampled
        mask = self.ar.logit_mask.index_select(0, position)  # [1, V]
        scores = mixed / step["temperature"] + mask
        scores = _top_k(scores, step["top_k"], self.top_k_cap, self.conditional)
        scores = _top_p(scores, step["top_p"], self.conditional)
        gumbel = -torch.log(-torch.log(uniform))
        next_tokens = torch.argmax(scores + gumbel, dim=-1)  # [B]
        # the new K/V slice only: the host writes it into its cache at start_pos
        return next_tokens, k_new, v_new, last


TOP_P_BISECTION_STEPS = 40  # the final interval is 2^-40 of the score range: one distinct score at most


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, cap: int, conditional: bool = True) -> torch.Tensor:
    """Keep the `top_k` best scores of each row (0 = off; ties with the k-th kept, as the release's
    `logits < kth -> -inf`). The k-th value comes from one TopK of constant K = `cap` (>= every
    allowed top_k); with `conditional` it runs only when top-k is on (an ONNX `If`), without, it
    always runs and a select picks the result (for compilers without control flow)."""
    V = scores.shape[-1]
    k = top_k.reshape(-1)[:1]
    active = top_k_active(k, V).reshape(())

    def truncate(scores, k):
        best = torch.topk(scores, min(cap, V), dim=-1).values  # [B, cap], sorted
        index = torch.where(k < 1, torch.ones_like(k), torch.where(k > cap, torch.full_like(k, cap), k)) - 1
        kth = best.gather(-1, index.reshape(1, 1).expand(scores.shape[0], 1))
        return torch.where(scores < kth, torch.full_like(scores, float("-inf")), scores)

    return _apply_if(active, truncate, scores, k, conditional)


def _top_p(scores: torch.Tensor, top_p: torch.Tensor, conditional: bool = True) -> torch.Tensor:
    """Keep the smallest set of best scores whose probability reaches `top_p` (0 or >= 1 = off):
    token i stays iff the mass of the tokens scoring strictly above it is <= p (the release's
    sorted rule `c_{i-1} <= p`; the best token always stays). Without a sort: the threshold is
    found by bisection on the score axis (`mass_above` falls as the threshold rises), then the
    one score left inside the final interval is decided exactly. `conditional` as in `_top_k`."""
    p = top_p.reshape(-1)[:1]
    active = top_p_active(p).reshape(())
    return _apply_if(active, _top_p_truncate, scores, p, conditional)


def _top_p_truncate(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    neg_inf, pos_inf = torch.full_like(scores, float("-inf")), torch.full_like(scores, float("inf"))

    def mass_above(t):  # [B, 1] -> [B, 1]
        return torch.where(scores > t, probs, torch.zeros_like(probs)).sum(-1, keepdim=True)

    hi = scores.amax(-1, keepdim=True)  # mass above the best = 0 <= p: a valid threshold
    lo = torch.where(scores > neg_inf, scores, hi).amin(-1, keepdim=True) - 1.0  # everything above: > p
    for _ in range(TOP_P_BISECTION_STEPS):
        mid = (lo + hi) * 0.5
        ok = mass_above(mid) <= p
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    t = torch.where(scores > lo, scores, pos_inf).amin(-1, keepdim=True)  # the lowest score that may stay
    keep = (scores > t) | ((scores >= t) & (mass_above(t) <= p))  # t itself stays iff its mass above is <= p
    return torch.where(keep, scores, neg_inf)


def _apply_if(active: torch.Tensor, truncate, scores: torch.Tensor, arg: torch.Tensor, conditional: bool):
    """`truncate(scores, arg)` where `active`, else `scores`: a `torch.cond` (an ONNX `If`, run
    only when on) or, without `conditional`, always computed and selected."""
    if conditional:
        return torch.cond(active, truncate, _unchanged, (scores, arg))
    return torch.where(active, truncate(scores, arg), scores)


def _unchanged(scores: torch.Tensor, _) -> torch.Tensor:
    return scores.clone()  # a branch of torch.cond may not return its input itself


class ARStepContract(GraphContract):
    name = io.AR_STEP

    def __init__(self, model: PrologueModel, max_batch: int):
        if model.ar is None:
            raise ExportError("the checkpoint has no AR model: ar_step cannot be exported")
        self.model = model
        a, v = model.config.ar, model.config.vocab()
        self.inputs, self.outputs, self.axes = io.static_axes(
            *io.ar_step_io(a.layers, a.heads, a.head_dim, v.seq_len, v.vocab_size), io.ar_step_axes(max_batch, v.seq_len))

    def module(self, conditional: bool = True) -> nn.Module:
        return ARStepModule(self.model.ar, conditional).eval()

    def export_dynamic_shapes(self) -> typing.Dict[str, typing.Any]:
        shapes = self.dynamic_shapes()
        return {"inputs": tuple(shapes[s.name] for s in self.inputs)}  # `forward(*inputs)`, in the contract's order

    def sample_inputs(self, generator):
        """The step inputs in the contract's order, then zero caches: token ids with each row's BOS
        (classes, then the null class: CFG rows), noise in (0, 1), the per-call scalars at their
        `example` values."""
        a, v = self.model.config.ar, self.model.config.vocab()
        B, T = self.sample_batch, 3
        R = 2 * B  # with CFG
        ids = torch.randint(0, v.vocab_size, (R, T), generator=generator)
        ids[:, 0] = v.vocab_size + torch.tensor(list(range(1, B + 1)) + [self.model.config.null_class] * B)
        uniform = torch.rand(B, v.vocab_size, generator=generator).clamp(1e-6, 1 - 1e-6)
        made = {"input_ids": ids, "uniform": uniform}
        step = tuple(made[s.name] if s.name in made else torch.tensor([s.example], dtype=getattr(torch, s.dtype))
                     for s in io.STEP_INPUTS)
        caches = tuple(torch.zeros(R, a.heads, v.seq_len, a.head_dim) for _ in range(2 * a.layers))
        return step + caches


def contracts(model: PrologueModel, max_batch: int) -> typing.List[GraphContract]:
    out: typing.List[GraphContract] = [DecoderContract(model, max_batch), PrologueGeneratorContract(model, max_batch)]
    if model.ar is not None:
        out.append(ARStepContract(model, max_batch))
    return out
