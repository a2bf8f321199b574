"""The class-conditional AR model over `[prologue ; EOS ; visual]` tokens.

OFFICIAL_MODEL.md §4. LlamaGen-style conditioning: the class (or the null class) enters only as
the BOS embedding; every adaptive norm and gate reads the constant null condition. RoPE carries
the 1-D position on the first axis only (channels `0 .. rope_axes[0]-1` of each head).

Two forwards over one set of weights:
- `forward(seq, class_ids)`: teacher-forced, causal, full sequence (training, parity checks);
- `step(input_ids, start_pos, k_cache, v_cache)`: prefill or decode over a static,
  preallocated KV cache with the start position as a tensor (what export lowers).
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from .config import ARConfig, VocabLayout
from .layers import Transformer, init_trunc_normal_, rope_table, sequence_positions


def build_logit_mask(vocab: VocabLayout) -> torch.Tensor:
    """Additive per-step mask `[T, V]` (0 allowed, -inf forbidden); zeros for baselines."""
    T, V = vocab.seq_len, vocab.vocab_size
    mask = torch.zeros(T, V, device="cpu")
    if not vocab.has_prologue:
        return mask
    Z, Kv, Kp = vocab.num_prologue_tokens, vocab.visual_codebook_size, vocab.prologue_codebook_size
    allowed = torch.zeros(T, V, dtype=torch.bool, device="cpu")
    allowed[:Z, Kv : Kv + Kp] = True
    allowed[Z, vocab.eos_id] = True
    allowed[Z + 1 :, :Kv] = True
    return mask.masked_fill(~allowed, float("-inf"))


class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig, vocab: VocabLayout, num_classes: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab = vocab
        self.num_classes = num_classes
        V = vocab.vocab_size
        self.class_emb = nn.Embedding(num_classes + 1, cfg.dim)  # BOS rows; last row = null class
        self.token_emb = nn.Embedding(V, cfg.dim)  # visual, prologue and EOS tokens
        self.transformer = Transformer(
            cfg.dim, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, cond_dim=cfg.cond_dim,
            cond_classes=num_classes + 1, bias=False, output_dim=V, output_bias=False, dropout=cfg.dropout,
            emb_dropout=cfg.emb_dropout,  # on [BOS ; tokens] and on the condition (models.py:564-569)
            zero_out=False,  # AR `out`: trunc_normal 0.02, unscaled, no bias (ar/_defaults.yaml:30, 35)
        )
        T = vocab.seq_len  # BOS + T-1 tokens occupy positions 0 .. T-1
        cos, sin = rope_table(sequence_positions(T, axis=0), cfg.rope_axes, torch.full((T,), cfg.rope_theta, device="cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)  # [T, d/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("logit_mask", build_logit_mask(vocab), persistent=False)  # [T, V]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`bos_emb` / `semantic_emb` drawn trunc_normal(0.02), overriding nn.Embedding's N(0, 1)
        (models.py:931-935); the Transformer initialises itself (OFFICIAL_TRAINING.md §5)."""
        init_trunc_normal_(self.class_emb.weight)  # models.py:931-932
        init_trunc_normal_(self.token_emb.weight)  # models.py:934-935

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def max_seq_len(self) -> int:
        """Length of the KV cache a whole generation needs (BOS + T-1 fed tokens)."""
        return self.vocab.seq_len

    # -- embeddings ---------------------------------------------------------------------------

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ids of the *input* vocabulary: `0 .. V-1` tokens, `V + c` the BOS of class c."""
        V = self.vocab.vocab_size
        is_bos = input_ids >= V
        zero = torch.zeros_like(input_ids)  # Where, not Clip: TensorRT has no integer Clip
        tokens = self.token_emb(torch.where(is_bos, zero, input_ids))
        bos = self.class_emb(torch.where(is_bos, input_ids - V, zero))
        return torch.where(is_bos.unsqueeze(-1), bos, tokens)  # [B, T, D]

    def input_embeddings(
        self,
        seq: torch.Tensor,
        class_ids: torch.Tensor,
        prologue_onehot: typing.Optional[torch.Tensor] = None,
        drop_visual_inputs: typing.Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Teacher-forcing inputs `[BOS(class) ; seq[:, :-1]]` -> `[B, L, D]`.

        prologue_onehot `[B, Z, K_p]` (straight-through one-hots from the tokenizer) replaces the
        prologue inputs by `onehot @ token_emb[prologue rows]`: same forward value, but the CE
        gradient reaches the tokenizer through it. drop_visual_inputs `[B]` bool replaces every
        visual *input* of those rows by EOS (phase-1 visual-input dropout; targets unchanged).
        """
        inputs = seq[:, :-1]
        if drop_visual_inputs is not None:
            if not self.vocab.has_prologue:
                raise ValueError("visual-input dropout needs an EOS token (a prologue vocabulary)")
            start = self.vocab.visual_start
            dropped = inputs.clone()
            dropped[:, start:] = self.vocab.eos_id
            inputs = torch.where(drop_visual_inputs.view(-1, 1), dropped, inputs)
        e = torch.cat([self.class_emb(class_ids).unsqueeze(1), self.token_emb(inputs)], dim=1)
        if prologue_onehot is not None:
            Z, off = self.vocab.num_prologue_tokens, self.vocab.prologue_offset
            table = self.token_emb.weight[off : off + self.vocab.prologue_codebook_size]  # [K_p, D]
            soft = prologue_onehot.to(table.dtype) @ table  # [B, Z, D]
            n = min(Z, e.shape[1] - 1)
            e = torch.cat([e[:, :1], soft[:, :n], e[:, 1 + n :]], dim=1)
        return e

    # -- forwards -----------------------------------------------------------------------------

    def forward(
        self,
        seq: torch.Tensor,
        class_ids: torch.Tensor,
        prologue_onehot: typing.Optional[torch.Tensor] = None,
        drop_visual_inputs: typing.Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Teacher-forced logits `[B, L, V]`: position t predicts `seq[:, t]` (no logit mask)."""
        e = self.input_embeddings(seq, class_ids, prologue_onehot, drop_visual_inputs)
        L = e.shape[1]  # emb_dropout (inputs, then condition) is applied inside the Transformer
        return self.transformer(e, self.rope_cos[:L], self.rope_sin[:L], causal=True)

    def new_kv_cache(
        self, batch: int, dtype: torch.dtype = torch.float32, device=None
    ) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        """Zeroed K and V caches `[layers, B, heads, S_max, head_dim]`."""
        shape = (self.cfg.layers, batch, self.cfg.heads, self.max_seq_len, self.cfg.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def step(
        self,
        input_ids: torch.Tensor,
        start_pos: torch.Tensor,
        k_cache: typing.Union[torch.Tensor, typing.Sequence[torch.Tensor]],
        v_cache: typing.Union[torch.Tensor, typing.Sequence[torch.Tensor]],
    ) -> typing.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill or decode `T` new tokens at positions `start_pos .. start_pos+T-1`.

        input_ids `[B, T]` in the input vocabulary (`V + c` = BOS of class c); start_pos a long
        tensor (0-d or `[1]`); caches `[layers, B, H, S, d]`, or sequences of one `[B, H, S, d]`
        tensor per layer (what export lowers: per-layer graph inputs), holding positions
        `< start_pos` (the rest is ignored). Returns logits `[B, T, V]` and the new keys/values
        `[layers, B, H, T, d]`, which the caller writes into its cache at `start_pos` (`write_kv`).
        """
        T = input_ids.shape[1]
        S = k_cache[0].shape[-2]
        start = start_pos.reshape(-1)[:1]
        positions = start + torch.arange(T, device=input_ids.device)  # [T]
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        stale = (torch.arange(S, device=input_ids.device) >= start).expand(T, S)  # [T, S]: unfilled cache slots
        later = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).triu(1)  # [T, T]: causal mask
        blocked = torch.cat([stale, later], dim=-1)  # [T, S + T]
        tf = self.transformer
        cond = tf.null_condition()
        e = self.embed_ids(input_ids)
        new_k, new_v = [], []
        for i, layer in enumerate(tf.layers):
            e, k, v = layer.forward_cached(e, cond, cos, sin, k_cache[i], v_cache[i], blocked)
            new_k.append(k)
            new_v.append(v)
        return tf.head(e, cond), torch.stack(new_k), torch.stack(new_v)


def write_kv(k_cache, v_cache, k_new, v_new, start: int) -> None:
    """Store `step`'s new keys/values `[L, B, H, T, d]` into the caches `[L, B, H, S, d]` at `start`
    (in place; torch tensors or numpy arrays): the one KV-cache write of the torch paths."""
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache[:, :, :, start:start + new.shape[3]] = new
