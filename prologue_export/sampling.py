"""Reference sampler in torch (OFFICIAL_MODEL.md §5), driven by host-supplied uniform noise.

Per step s, in this order: CFG mix of the logits (cond rows vs null-class rows) with the
step's scale, temperature (the prologue temperature on prologue steps), the segment logit mask,
top-k, top-p, then Gumbel-max `argmax(log p - log(-log u))` with `u` the step's uniform noise.
`top_k == 1` is greedy decoding (argmax, no noise); as in the release, the distribution it
reports is the one before the top-1 truncation.

Noise contract (DESIGN.md §3): with `seed`, one `rng.random((B, V), dtype=float32)` per AR
position in order, forced positions included, `rng = numpy.random.Generator(PCG64(seed))`;
or an explicit `uniform` array `[B, T, V]`.

Devices: everything runs on the AR model's device (logits, mask, CFG mix, top-k/top-p,
Gumbel-max in float64, the tokens and the reported distributions); only the noise is drawn on
the host and uploaded per step, and the results stay on the model's device. `to_host` is the one
device -> host copy (inputs checked on the host, images and features in the training code).
"""

from __future__ import annotations

import typing

import numpy as np
import torch

from .ar import ARModel, write_kv
from .config import SamplingConfig, VocabLayout
from .runtime.loop import Noise, check_class_ids, check_prologue_ids
from .runtime.settings import cfg_enabled, cfg_scale_at, top_k_active, top_p_active


def process_logits(
    logits: torch.Tensor, step: int, settings: SamplingConfig, vocab: VocabLayout, mask: torch.Tensor
) -> torch.Tensor:
    """Temperature, segment mask, top-k and top-p on mixed logits `[B, V]` (float32)."""
    logits = logits / settings.temperature_at(step, vocab) + mask
    V = logits.shape[-1]
    if settings.top_k != 1 and top_k_active(settings.top_k, V):  # top_k == 1 is greedy decoding: see `sample`
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p_active(settings.top_p):
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


def to_host(x: torch.Tensor) -> np.ndarray:
    """The one device -> host copy of the sampling paths (a test replaces it to run on `meta`)."""
    return x.detach().cpu().numpy()


def _numpy(x):
    return to_host(x) if torch.is_tensor(x) else x


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
    """Sample AR sequences `[B, T]` (`[prologue (AR ids) ; EOS ; visual]`, as `ar(seq, class_ids)` takes).

    settings: a SamplingConfig, or a dict of its fields or of the release's option names
    (`semantic_cfg_scale`, `topK`, ...). prologue_ids: raw ids `[B, Z]` (as `encode` returns) to
    keep fixed; the visual tokens are then resampled. With `return_probs`, also returns the
    distributions drawn from, `[B, T, V]` float32 (NaN at fixed steps).
    Every step runs on the model's device (only the host noise is uploaded, one `[B, V]` per
    step); the returned tensors are on the model's device too (`.cpu()` them for numpy).
    """
    settings = SamplingConfig.coerce(settings)
    vocab = ar.vocab
    T, V, Z = vocab.seq_len, vocab.vocab_size, vocab.num_prologue_tokens
    device = ar.token_emb.weight.device
    classes = torch.from_numpy(check_class_ids(_numpy(class_ids), ar.num_classes)).to(device)
    B = classes.shape[0]
    noise = Noise(B, T, V, seed=seed, uniform=_numpy(uniform))
    fixed = None
    if prologue_ids is not None:
        fixed = torch.from_numpy(check_prologue_ids(_numpy(prologue_ids), B, vocab)).to(device) + vocab.prologue_offset

    use_cfg = cfg_enabled(settings)
    rows = torch.cat([classes, torch.full_like(classes, ar.null_class)]) if use_cfg else classes
    k_cache, v_cache = ar.new_kv_cache(rows.shape[0], dtype=ar.token_emb.weight.dtype, device=device)
    mask = ar.logit_mask.float()

    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    probs_out = torch.full((B, T, V), float("nan"), device=device) if return_probs else None
    feed = (rows + V).view(-1, 1)  # BOS of each row
    for step in range(T):
        logits, k_new, v_new = ar.step(feed, torch.tensor([step], device=device), k_cache, v_cache)
        write_kv(k_cache, v_cache, k_new, v_new, step)
        logits = logits[:, -1].float()  # [rows, V]
        if use_cfg:
            scale = cfg_scale_at(step, settings, vocab)
            logits = scale * logits[:B] + (1 - scale) * logits[B:]
        u = torch.from_numpy(noise.at(step)).to(device)  # drawn at every position, forced ones included
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
        feed = nxt.view(-1, 1)
    return (tokens, probs_out) if return_probs else tokens
