"""Transformer building blocks shared by the tokenizer and the AR model.

Every detail follows `shared/reference/OFFICIAL_MODEL.md` §2: RMS norm without epsilon and a
`1 + w` scale, a constant null-class condition embedding, gated pre-norm residuals, QK-norm,
interleaved three-axis RoPE, GeGLU with the tanh GELU on the second half. Submodule names match
the release's state-dict keys below the top-level prefix, so the importer only renames prefixes.
"""

from __future__ import annotations

import contextlib
import math
import typing

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ffn_hidden


# ---------------------------------------------------------------------------------------------
# Initialisation (OFFICIAL_TRAINING.md §5). Release = github.com/Zyriix/prologue @ 3b6db41.
# Each module initialises the parameters it owns directly, from its constructor, so every
# construction path (PrologueModel, a bare ARModel / Tokenizer / Transformer) starts from the
# release's distribution. All of it works on the meta device (nothing is drawn there), so
# `load_checkpoint`'s meta construction + assign is unaffected.

INIT_STD = 0.02  # the release's `trunc_normal` init (models.py:23-31)
GATE_SCALE = 1e-5  # `init_weight=1e-5` of gates and adaLN affines (models.py:59, 287, 302)


@torch.no_grad()
def init_trunc_normal_(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`trunc_normal_(std=0.02)` with PyTorch's absolute bounds (-2, 2) = +-100 sigma, times `scale`
    (the release's `Linear` multiplies the draw by `init_weight`, models.py:30-40)."""
    nn.init.trunc_normal_(tensor, mean=0.0, std=INIT_STD, a=-2.0, b=2.0)
    if scale != 1.0:
        tensor.mul_(scale)
    return tensor


@torch.no_grad()
def init_linear_(linear: typing.Optional[nn.Linear], scale: float = 1.0) -> None:
    """The release's `Linear` (models.py:33-40): W ~ trunc_normal(0, 0.02) * init_weight; the bias
    is drawn and multiplied by `init_bias = 0`, i.e. exactly zero (models.py:40)."""
    if linear is None:
        return
    init_trunc_normal_(linear.weight, scale)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def fp32_island(device: torch.device):
    """Autocast disabled for `device` (the release's float32 islands: the quantizers,
    models.py:1271, 1333, 1348, and the output norm + output layer, models.py:625-634;
    OFFICIAL_TRAINING.md §2.6, §2.14), so that with the inputs cast to float32 every op runs in
    float32. A no-op context when autocast is off (export, plain fp32)."""
    kind = device.type
    if kind in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


def rms(x: torch.Tensor) -> torch.Tensor:
    """`x / max(||x||, 1e-12) * sqrt(n)` over the last axis, in float32, cast back.

    Computed as `x * (sqrt(n) / max(||x||, 1e-12))` (F.normalize's math up to rounding): one
    full-size multiply by a per-row factor, where F.normalize's export expands the norm to the
    full shape and divides by it."""
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(1e-12)  # [..., 1]
    return (xf * (math.sqrt(x.shape[-1]) / norm)).to(x.dtype)


class RMSNorm(nn.Module):
    """Learned-offset RMS norm: `rms(x) * (1 + weight)` (weight initialised to 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)  # plain RMS-norm weight = 0, scale 1 + w = 1 (models.py:61)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms(x) * (1 + self.weight)


class AdaRMSNorm(nn.Module):
    """Conditional RMS norm: `rms(x) * (1 + affine(c))`."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.affine = nn.Linear(cond_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # `Linear(cond_dim, dim, init_weight=1e-5)`: scale 1 + A c + a starts at ~1 (models.py:59, bias 0 :40)
        init_linear_(self.affine, GATE_SCALE)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return rms(x) * (1 + self.affine(cond))


class GeGLU(nn.Module):
    """`(gelu_tanh(v) * u) W2` with `[u, v] = h W1` (activation on the second half)."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self.fc1)  # models.py:175
        # out_value = 1: every released layer is `cond_based_affine` (use_label: True), models.py:177, 283
        init_linear_(self.fc2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, v = self.fc1(h).chunk(2, dim=-1)
        return self.fc2(F.gelu(v, approximate="tanh") * u)


def rope_table(
    positions: torch.Tensor, axes: typing.Sequence[int], theta: torch.Tensor
) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables `[L, head_dim / 2]` of the three-axis interleaved RoPE.

    positions: `[L, 3]` float position ids; theta: `[L]` per-token base (grid tokens and query
    tokens of one encoder use different bases). Chunk m of the head dim is rotated by component m
    with frequencies `theta ** (-2k / a_m)`.
    """
    angles = []
    for m, a in enumerate(axes):
        if a == 0:
            continue
        exponent = torch.arange(0, a, 2, dtype=torch.float32, device=positions.device) / a  # [a/2]
        omega = 1.0 / (theta.float()[:, None] ** exponent[None, :])  # [L, a/2]
        angles.append(positions[:, m : m + 1].float() * omega)
    angle = torch.cat(angles, dim=-1)  # [L, d/2]
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1). x: `[B, H, L, d]`, cos/sin: `[L, d/2]`.

    Written as `x * cos + rot(x) * sin` with `rot(x) = (-x_{2j+1}, x_{2j})`, and `rot` as a
    product of each pair with the constant `[[0, 1], [-1, 0]]`: the same products and sums as the
    pairwise form (multiplying by 0 and +-1 is exact), in one MatMul node once exported (a
    flip and a sign multiply over a last axis of 2 cost ONNX Runtime ~10x more).
    """
    xf = x.float()
    rotate = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], device=x.device)
    rot = (xf.unflatten(-1, (-1, 2)) @ rotate).flatten(-2)  # [B, H, L, d]
    return (xf * cos.repeat_interleave(2, dim=-1) + rot * sin.repeat_interleave(2, dim=-1)).to(x.dtype)


def grid_positions(side: int) -> torch.Tensor:
    """`(row, col, 0)` ids of a raster-ordered `side x side` grid: `[side*side, 3]`."""
    idx = torch.arange(side * side, device="cpu")  # buffers: real even under a meta device
    return torch.stack((idx // side, idx % side, torch.zeros_like(idx)), dim=-1).float()


def sequence_positions(length: int, axis: int) -> torch.Tensor:
    """1-D ids `0..length-1` on one RoPE axis, zeros elsewhere: `[length, 3]`."""
    pos = torch.zeros(length, 3, device="cpu")
    pos[:, axis] = torch.arange(length, device="cpu").float()
    return pos


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, d]` -> `[B, L, H*d]` (head-major channels, as the projections' weights)."""
    return rearrange(x, "b heads l d -> b l (heads d)")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, out_bias: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)  # first `dim` outputs are K
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=out_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self.to_q)  # models.py:211
        init_linear_(self.to_kv)  # models.py:212
        init_linear_(self.proj)  # models.py:214 (out_value = 1, :283)
        # q_norm / k_norm: RMSNorm weights 0 (models.py:207-208, :61), set by RMSNorm itself

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Post-norm, post-RoPE q, k and v, each `[B, H, L, d]`."""
        q = rearrange(self.to_q(h), "b l (heads d) -> b heads l d", heads=self.heads)
        kv = rearrange(self.to_kv(h), "b l (kv heads d) -> kv b heads l d", kv=2, heads=self.heads)
        k, v = kv[0], kv[1]  # two Gathers once exported (`k, v = kv` unpacks to Slices + Squeezes)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return q, k, v

    def attend(self, q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, L, d]
        return self.proj(merge_heads(out))

    def attend_cached(self, q, k, v, k_cache, v_cache, blocked) -> torch.Tensor:
        """New tokens' q, k, v `[B, H, T, d]` attending to a static KV cache `[B, H, S, d]` plus
        themselves, without copying the cache; blocked `[T, S + T]` bool: True where a new token
        may not attend (stale cache slots, later new tokens)."""
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = torch.cat([q @ k_cache.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1).float() * scale  # [B, H, T, S+T]
        # softmax over the allowed slots, masked after the exp: exp of -inf (or of anything below
        # about -87) takes a slow path in ONNX Runtime's CPU kernels, ~4x a normal exp
        peak = scores.masked_fill(blocked, float("-inf")).amax(dim=-1, keepdim=True)
        weights = torch.exp((scores - peak).masked_fill(blocked, 0.0)).masked_fill(blocked, 0.0)
        probs = (weights / weights.sum(dim=-1, keepdim=True)).to(q.dtype)
        S = k_cache.shape[2]
        out = probs[..., :S] @ v_cache + probs[..., S:] @ v  # [B, H, T, d]
        return self.proj(merge_heads(out))

    def forward(self, h, cos, sin, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(h, cos, sin)
        return self.attend(q, k, v, is_causal=causal)


class Block(nn.Module):
    """Pre-norm layer with adaptive norms and gated residuals (OFFICIAL_MODEL.md §2.3)."""

    def __init__(self, dim: int, heads: int, hidden: int, cond_dim: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # residual-branch dropout (training only)
        self.adaln_1 = AdaRMSNorm(dim, cond_dim)
        self.attn1 = Attention(dim, heads, out_bias=bias)
        self.gate1 = nn.Linear(cond_dim, dim, bias=bias)
        self.adaln_mlp = AdaRMSNorm(dim, cond_dim)
        self.ffn = GeGLU(dim, hidden, bias=bias)
        self.gate_mlp = nn.Linear(cond_dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # gates `Linear(cond_dim, dim, init_weight=1e-5)`: each residual branch starts ~off, so the
        # block starts as (almost) the identity (models.py:287, 302; biases 0, :40)
        init_linear_(self.gate1, GATE_SCALE)
        init_linear_(self.gate_mlp, GATE_SCALE)

    def forward(self, x, cond, cos, sin, causal: bool = False):
        return self.residuals(x, cond, self.attn1(self.adaln_1(x, cond), cos, sin, causal))

    def forward_cached(self, x, cond, cos, sin, k_cache, v_cache, blocked):
        """`forward` for new tokens over a static KV cache (`Attention.attend_cached`): x `[B, T, D]`,
        k_cache/v_cache `[B, H, S, d]` (slots at and after the start position are stale). Returns x
        and this layer's new K, V `[B, H, T, d]` for the caller to store."""
        q, k, v = self.attn1.qkv(self.adaln_1(x, cond), cos, sin)
        return self.residuals(x, cond, self.attn1.attend_cached(q, k, v, k_cache, v_cache, blocked)), k, v

    def residuals(self, x, cond, attn):
        """The gated residual branches around the attention output `attn` `[B, L, D]`: the one
        wiring of both forwards (dropout on each branch in training mode only)."""
        x = x + self.gate1(cond) * F.dropout(attn, self.dropout, self.training)
        ffn = self.ffn(self.adaln_mlp(x, cond))
        return x + self.gate_mlp(cond) * F.dropout(ffn, self.dropout, self.training)


class Transformer(nn.Module):
    """The release's Transformer wrapper (OFFICIAL_MODEL.md §2.5).

    `cond_proj` maps the (always null) class one-hot to the condition vector; an optional
    `input_layer` embeds the inputs; optional learned queries are appended after the inputs;
    an optional output norm + output layer close the stack (encoders have neither).
    """

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        mlp_ratio: str,
        cond_dim: int,
        cond_classes: int,
        bias: bool,
        input_dim: typing.Optional[int] = None,
        num_queries: int = 0,
        output_dim: typing.Optional[int] = None,
        output_bias: bool = False,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        zero_out: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.cond_classes = cond_classes
        self.emb_dropout = emb_dropout  # inputs and condition embedding (training only, models.py:564-569)
        self.zero_out = zero_out  # output layer drawn x 1e-5 (decoder: True; AR: False), models.py:396
        hidden = ffn_hidden(dim, mlp_ratio)
        self.cond_proj = nn.Sequential(
            nn.Linear(cond_classes, cond_dim), RMSNorm(cond_dim), nn.GELU(approximate="tanh")
        )
        self.input_layer = nn.Linear(input_dim, dim) if input_dim is not None else None
        self.learnable_query = nn.Parameter(torch.empty(1, num_queries, dim)) if num_queries else None
        self.layers = nn.ModuleList(Block(dim, heads, hidden, cond_dim, bias, dropout) for _ in range(layers))
        if output_dim is not None:
            self.out_norm = AdaRMSNorm(dim, cond_dim)
            self.out = nn.Linear(dim, output_dim, bias=output_bias)
        else:
            self.out_norm = None
            self.out = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The parameters this wrapper owns directly (layers and norms initialise themselves)."""
        init_linear_(self.cond_proj[0])  # cond_proj.0: trunc_normal 0.02, bias 0 (models.py:407, :40)
        # cond_proj.1 (plain RMS norm, weight 0) and out_norm (adaLN x 1e-5) initialise themselves
        init_linear_(self.input_layer)  # models.py:437, bias 0
        if self.learnable_query is not None:
            init_trunc_normal_(self.learnable_query)  # models.py:439-440
        # output layer: `Linear(dim, out, init_weight=1e-5 if zero_out else 1)`, bias 0 (models.py:396, 404)
        init_linear_(self.out, GATE_SCALE if self.zero_out else 1.0)

    def _null_onehot(self) -> torch.Tensor:
        weight = self.cond_proj[0].weight
        onehot = torch.zeros(1, 1, self.cond_classes, device=weight.device, dtype=weight.dtype)
        onehot[..., -1] = 1.0
        return onehot

    def null_condition(self) -> torch.Tensor:
        """Condition vector of the null class, `[1, 1, C]` (every released model uses only this)."""
        return self.cond_proj(self._null_onehot())

    def condition(self, batch: int) -> torch.Tensor:
        """The condition for a training or inference forward: `[1, 1, C]`, or, in training with
        `emb_dropout > 0`, `[batch, 1, C]` with the release's per-sample dropout on the
        condition embedding right after `cond_proj`'s Linear, before its RMS norm and GELU
        (models.py:566-569; OFFICIAL_TRAINING.md §4)."""
        if not (self.training and self.emb_dropout > 0):
            return self.null_condition()
        linear, norm, act = self.cond_proj
        h = linear(self._null_onehot()).expand(batch, -1, -1)  # [B, 1, C]
        return act(norm(F.dropout(h, self.emb_dropout, True)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        e = self.input_layer(x) if self.input_layer is not None else x
        if self.learnable_query is not None:
            e = torch.cat([e, self.learnable_query.expand(e.shape[0], -1, -1).to(e.dtype)], dim=1)
        return e

    def head(self, e: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Output norm + output layer in float32 with autocast off (models.py:625-634): decoder
        outputs and AR logits are fp32 math under bf16 training too."""
        e = e.float()
        if self.out_norm is not None:
            with fp32_island(e.device):
                e = self.out(self.out_norm(e, cond.float()))
        return e

    def forward(self, x, cos, sin, causal: bool = False) -> torch.Tensor:
        # order as the release: input dropout (models.py:564), then the condition's (:566-569)
        e = F.dropout(self.embed(x), self.emb_dropout, self.training) if self.emb_dropout > 0 else self.embed(x)
        cond = self.condition(e.shape[0])
        for layer in self.layers:
            e = layer(e, cond, cos, sin, causal)
        return self.head(e, cond)
