"""Reference sampler in torch (OFFICIAL_MODEL.md §5), driven by host-supplied uniform noise.

Per step s, in this order: CFG mix of the logits (cond rows vs null-class rows) with the
step's scale, temperature (the prologue temperature on prologue steps), the segment logit mask,
top-k, top-p, then Gumbel-max `argmax(log p - log(-log u))` with `u` the step's uniform noise.
`top_k == 1` is greedy decoding (argmax, no noise); as in the release, the distribution it
reports is the one before the top-1 truncation.

Noise contract (DESIGN.md §3): with `seed`, one `rng.random((B, V), dtype=float32)` per AR
position in order, forced positions included, `rng = numpy.random.Generator(PCG64(seed))`;
or an explicit `uniform` array `[B, T, V]`.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import torch

from .ar import ARModel
from .config import SamplingConfig, VocabLayout


def cfg_scale_at(step: int, settings: SamplingConfig, vocab: VocabLayout) -> float:
    """The CFG scale applied at sampling step `step` (0-based)."""
    T, Z = vocab.seq_len, vocab.num_prologue_tokens
    if settings.segmented:
        if step < Z:
            schedule = settings.prologue_cfg_schedule or settings.cfg_schedule
            scale = _or(settings.prologue_cfg_scale, settings.cfg)
            start, power = settings.prologue_cfg_start, _or(settings.prologue_cfg_power, settings.cfg_power)
            t = step / Z
        else:
            schedule = settings.visual_cfg_schedule or settings.cfg_schedule
            scale = _or(settings.visual_cfg_scale, settings.cfg)
            start, power = settings.visual_cfg_start, _or(settings.visual_cfg_power, settings.cfg_power)
            t = (step - Z) / (T - Z)
        if schedule == "constant":
            return scale
        if schedule == "linear":
            return start + (scale - start) * t
        return start + (scale - start) * (1 - math.cos(math.pi * t**power)) / 2
    t = step / T
    if settings.cfg_schedule == "constant":
        return settings.cfg
    if settings.cfg_schedule == "linear":
        return (1 - t) + settings.cfg * t
    return 1 + (settings.cfg - 1) * (1 - math.cos(math.pi * t**settings.cfg_power)) / 2


def cfg_enabled(settings: SamplingConfig) -> bool:
    if settings.segmented:
        return _or(settings.prologue_cfg_scale, settings.cfg) > 0 or _or(settings.visual_cfg_scale, settings.cfg) > 0
    return settings.cfg > 0


def process_logits(
    logits: torch.Tensor, step: int, settings: SamplingConfig, vocab: VocabLayout, mask: torch.Tensor
) -> torch.Tensor:
    """Temperature, segment mask, top-k and top-p on mixed logits `[B, V]` (float32)."""
    Z = vocab.num_prologue_tokens
    tau = settings.prologue_temperature if (step < Z and settings.prologue_temperature is not None) else settings.temperature
    logits = logits / tau + mask
    V = logits.shape[-1]
    if 1 < settings.top_k < V:  # top_k == 1 is greedy decoding: see `sample`
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < settings.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        remove_sorted = before > settings.top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def gumbel_argmax(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """`argmax(log_softmax(logits) - log(-log u))` in float64: a draw from softmax(logits)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    gumbel = -torch.log(-torch.log(uniform.double()))
    return torch.argmax(logp + gumbel, dim=-1)


class NoiseSource:
    """Uniform noise per AR position: from a seed (PCG64 stream) or an explicit `[B, T, V]` array."""

    def __init__(self, batch: int, seq_len: int, vocab_size: int, uniform=None, seed=None):
        if (uniform is None) == (seed is None):
            raise ValueError("give exactly one of `seed` (an int) or `uniform` (an array [B, T, V])")
        self.shape = (batch, vocab_size)
        self.uniform = None
        self.rng = None
        if uniform is not None:
            u = torch.as_tensor(np.asarray(uniform))
            expected = [batch, seq_len, vocab_size]
            if list(u.shape) != expected:
                raise ValueError(f"uniform must have shape {expected} (B, T, V), got {list(u.shape)}")
            if not u.is_floating_point():
                raise ValueError(f"uniform must be float noise in [0, 1), got dtype {u.dtype}")
            if u.numel() and (float(u.min()) < 0 or float(u.max()) >= 1):
                raise ValueError("uniform noise must lie in [0, 1)")
            self.uniform = u.float()
        else:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
            self.rng = np.random.Generator(np.random.PCG64(int(seed)))

    def at(self, step: int) -> torch.Tensor:
        if self.uniform is not None:
            return self.uniform[:, step]
        return torch.from_numpy(self.rng.random(self.shape, dtype=np.float32))


def _as_class_ids(class_ids, num_classes: int) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(class_ids) if not torch.is_tensor(class_ids) else class_ids)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if ids.numel() == 0:
        raise ValueError("class_ids is empty: give at least one class")
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"class_ids must be a 1-D integer array [B], got {list(ids.shape)} {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) > num_classes:
        raise ValueError(
            f"class ids must lie in [0, {num_classes}] ({num_classes} = the null class), "
            f"got range [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.long()


@torch.no_grad()
def sample(
    ar: ARModel,
    class_ids,
    settings=None,
    uniform=None,
    seed: typing.Optional[int] = None,
    prologue_ids=None,
    return_probs: bool = False,
):
    """Sample AR sequences `[B, T]` (`[prologue (AR ids) ; EOS ; visual]`, as `ar.logits` takes).

    settings: a SamplingConfig, or a dict of its fields or of the release's option names
    (`semantic_cfg_scale`, `topK`, ...). prologue_ids: raw ids `[B, Z]` (as `encode` returns) to
    keep fixed; the visual tokens are then resampled. With `return_probs`, also returns the
    distributions drawn from, `[B, T, V]` float32 (NaN at fixed steps).
    """
    settings = SamplingConfig.coerce(settings)
    vocab = ar.vocab
    T, V, Z = vocab.seq_len, vocab.vocab_size, vocab.num_prologue_tokens
    classes = _as_class_ids(class_ids, ar.num_classes)
    B = classes.shape[0]
    noise = NoiseSource(B, T, V, uniform=uniform, seed=seed)
    fixed = None
    if prologue_ids is not None:
        if not vocab.has_prologue:
            raise ValueError("prologue_ids given, but this model has no prologue (a '2d' baseline)")
        fixed = torch.as_tensor(np.asarray(prologue_ids) if not torch.is_tensor(prologue_ids) else prologue_ids)
        if list(fixed.shape) != [B, Z] or fixed.is_floating_point():
            raise ValueError(f"prologue_ids must be integer [B, Z] = [{B}, {Z}], got {list(fixed.shape)} {fixed.dtype}")
        Kp = vocab.prologue_codebook_size
        if int(fixed.min()) < 0 or int(fixed.max()) >= Kp:
            raise ValueError(f"prologue_ids are raw prologue codes in [0, {Kp}); got range "
                             f"[{int(fixed.min())}, {int(fixed.max())}] (pass them un-offset, as encode returns them)")
        fixed = fixed.long() + vocab.prologue_offset

    device = ar.token_emb.weight.device
    use_cfg = cfg_enabled(settings)
    rows = torch.cat([classes, torch.full_like(classes, ar.null_class)]) if use_cfg else classes
    k_cache, v_cache = ar.new_kv_cache(rows.shape[0], dtype=ar.token_emb.weight.dtype, device=device)
    mask = ar.logit_mask.float()

    tokens = torch.zeros(B, T, dtype=torch.long)
    probs_out = torch.full((B, T, V), float("nan")) if return_probs else None
    feed = (rows + V).view(-1, 1).to(device)  # BOS of each row
    for step in range(T):
        logits, k_cache, v_cache = ar.step(feed, torch.tensor([step], device=device), k_cache, v_cache)
        logits = logits[:, -1].float().cpu()  # [rows, V]
        if use_cfg:
            scale = cfg_scale_at(step, settings, vocab)
            logits = scale * logits[:B] + (1 - scale) * logits[B:]
        u = noise.at(step)  # drawn at every position, forced ones included
        if fixed is not None and step < Z:
            chosen = fixed[:, step]
        else:
            processed = process_logits(logits, step, settings, vocab, mask[step])
            if return_probs:
                probs_out[:, step] = torch.softmax(processed, dim=-1)
            if settings.top_k == 1:  # greedy; like the release, report the untruncated distribution
                chosen = torch.argmax(processed, dim=-1)
            else:
                chosen = gumbel_argmax(processed, u)
        tokens[:, step] = chosen
        nxt = torch.cat([chosen, chosen]) if use_cfg else chosen
        feed = nxt.view(-1, 1).to(device)
    return (tokens, probs_out) if return_probs else tokens


def split_sequence(tokens: torch.Tensor, vocab: VocabLayout) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """AR sequence `[B, T]` -> (raw prologue ids `[B, Z]`, visual ids `[B, X]`)."""
    Z = vocab.num_prologue_tokens
    prologue = tokens[:, :Z] - vocab.prologue_offset
    return prologue, tokens[:, vocab.visual_start :]


def _or(value, fallback):
    return fallback if value is None else value
