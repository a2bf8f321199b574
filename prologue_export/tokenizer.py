"""The Prologue image tokenizer: shared ViT encoder, visual + prologue quantizers, decoder.

OFFICIAL_MODEL.md §3. Variants:
- `prologue`: one encoder over `[patches ; K learned queries]`; patch outputs -> visual codes,
  query outputs -> prologue codes.
- `2d`: encoder over patches only; no prologue.
- `post`: the `2d` path (frozen when training) plus a separate prologue encoder that reads the
  raw visual encoder output and appends its own queries.
The decoder sees only the visual codes.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TokenizerConfig
from .layers import Transformer, fp32_island, grid_positions, init_linear_, rope_table, sequence_positions


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, N, p*p*C]`; raster tokens, vector order (row-in-patch, col, channel)."""
    return rearrange(images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Exact inverse of `patchify` for a square grid."""
    side = int(round(patches.shape[1] ** 0.5))
    return rearrange(patches, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)",
                     gh=side, gw=side, p1=patch_size, p2=patch_size, c=channels)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output -> uint8 as the release's evaluation: `floor(clamp(127.5 y + 128, 0, 255))`
    (the one float -> pixel conversion: training grids, metrics and the exported decoder use it)."""
    return torch.floor(torch.clamp(127.5 * images + 128.0, 0, 255)).to(torch.uint8)


def uint8_to_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (`x / 127.5 - 1`; the one pixel -> float conversion)."""
    return images.float() / 127.5 - 1.0


class CosineQuantizer(nn.Module):
    """Cosine-similarity codebook lookup: `argmax(normalize(h W^T + b) . normalize(E_k))`.

    As the release's quantizers, both sides are L2-normalised; codes are normalised rows. Every
    computation (projection, normalisation, cosine logits, softmax, straight-through) runs in
    float32 with autocast disabled (`fp32_island`), as the release's (models.py:1271-1331).
    """

    def __init__(self, dim: int, code_dim: int, codebook_size: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, code_dim)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_(self.proj_in)  # trunc_normal 0.02, bias 0 (models.py:1190, :40)
        # `codebook_init: simvq`: N(0, z_dim^-1/2 squared), untruncated (models.py:1222-1223;
        # tokenizer/default.yaml:52, prologue.yaml:29)
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, mean=0.0, std=self.embedding.weight.shape[1] ** -0.5)

    def latents(self, h: torch.Tensor) -> torch.Tensor:
        with fp32_island(h.device):
            return F.normalize(self.proj_in(h.float()), dim=-1, eps=1e-12)  # [B, L, z]

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        with fp32_island(weight.device):
            return F.normalize(weight.float(), dim=-1, eps=1e-12)  # [K, z]

    def cosine_logits(self, h: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        z = self.latents(h)
        with fp32_island(h.device):
            return z, z @ self.codebook().t()  # [B, L, z], [B, L, K]

    def ids(self, h: torch.Tensor) -> torch.Tensor:
        return self.cosine_logits(h)[1].argmax(dim=-1)  # [B, L] (first index on ties)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codebook())  # [B, L, z]


class VisualQuantizer(CosineQuantizer):
    """Visual codes with a straight-through estimator and the VQ loss (training path)."""

    def forward(self, h: torch.Tensor, beta: float) -> typing.Dict[str, torch.Tensor]:
        with fp32_island(h.device):
            z, logits = self.cosine_logits(h)
            ids = logits.argmax(dim=-1)
            code = self.codes(ids)
            vq_loss = beta * F.mse_loss(z, code.detach()) + F.mse_loss(code, z.detach())
            return {"quantized": z + (code - z).detach(), "ids": ids, "vq_loss": vq_loss}


class PrologueQuantizer(CosineQuantizer):
    """Prologue codes as a straight-through one-hot over a temperature softmax (training path)."""

    def forward(self, h: torch.Tensor, temperature: float) -> typing.Dict[str, torch.Tensor]:
        with fp32_island(h.device):
            _, logits = self.cosine_logits(h)
            ids = logits.argmax(dim=-1)
            probs = torch.softmax(logits / temperature, dim=-1)
            onehot = F.one_hot(ids, logits.shape[-1]).to(probs.dtype)
            return {"onehot": probs + (onehot - probs).detach(), "ids": ids, "logits": logits}


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, num_classes: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        cond_classes = num_classes + 1
        common = dict(mlp_ratio=cfg.mlp_ratio, cond_dim=cfg.cond_dim, cond_classes=cond_classes, bias=True)
        X, Z = cfg.num_visual_tokens, cfg.num_prologue_tokens
        shared_queries = Z if cfg.variant == "prologue" else 0
        self.encoder = Transformer(
            cfg.encoder.dim, cfg.encoder.layers, cfg.encoder.heads,
            input_dim=cfg.patch_dim, num_queries=shared_queries, **common,
        )
        self.visual_quantizer = VisualQuantizer(cfg.encoder.dim, cfg.code_dim, cfg.visual_codebook_size)
        self.prologue_encoder = None
        self.prologue_quantizer = None
        if cfg.variant == "post":
            pe = cfg.prologue_encoder
            self.prologue_encoder = Transformer(
                pe.dim, pe.layers, pe.heads, input_dim=cfg.encoder.dim, num_queries=Z,
                **{**common, "mlp_ratio": cfg.prologue_encoder_mlp_ratio},
            )
        if cfg.has_prologue:
            source_dim = cfg.prologue_encoder.dim if cfg.variant == "post" else cfg.encoder.dim
            self.prologue_quantizer = PrologueQuantizer(source_dim, cfg.code_dim, cfg.prologue_codebook_size)
        self.decoder = Transformer(
            cfg.decoder.dim, cfg.decoder.layers, cfg.decoder.heads,
            input_dim=cfg.code_dim, output_dim=cfg.patch_dim, output_bias=True,
            zero_out=True,  # `dec.out` x 1e-5: near-zero output at init (models.py:396, 404; tokenizer/default.yaml:81)
            **common,
        )

        # RoPE tables: grid tokens (row, col, 0) with the grid theta, queries (0, 0, j) with the
        # sequence theta. Non-persistent: they are functions of the config.
        grid = grid_positions(cfg.grid_size)
        queries = sequence_positions(Z, axis=2)
        theta_grid = torch.full((X,), cfg.rope_theta_grid, device="cpu")
        theta_seq = torch.full((Z,), cfg.rope_theta_seq, device="cpu")
        self._register_rope("rope_grid", grid, theta_grid)
        if cfg.has_prologue:
            self._register_rope(
                "rope_grid_queries", torch.cat([grid, queries]), torch.cat([theta_grid, theta_seq])
            )

    def _register_rope(self, name: str, positions: torch.Tensor, thetas: torch.Tensor) -> None:
        cos, sin = rope_table(positions, self.cfg.rope_axes, thetas)
        self.register_buffer(f"{name}_cos", cos, persistent=False)
        self.register_buffer(f"{name}_sin", sin, persistent=False)

    def _rope(self, name: str):
        return getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin")

    # -- encoder side ------------------------------------------------------------------------

    def encoder_hidden(self, images: torch.Tensor) -> typing.Dict[str, torch.Tensor]:
        """Raw residual streams (no final norm) feeding the quantizers.

        images: float `[B, C, H, W]` in [-1, 1]. Returns `visual` `[B, X, D]` and, with a
        prologue, `prologue` `[B, Z, D']`.
        """
        self._check_images(images)
        patches = patchify(images.float(), self.cfg.patch_size)  # [B, X, p*p*C]
        X = self.cfg.num_visual_tokens
        if self.cfg.variant == "prologue":
            h = self.encoder(patches, *self._rope("rope_grid_queries"))  # [B, X + Z, D]
            return {"visual": h[:, :X], "prologue": h[:, X:]}
        h = self.encoder(patches, *self._rope("rope_grid"))  # [B, X, D]
        out = {"visual": h}
        if self.cfg.variant == "post":
            # the visual path is frozen in this variant: no gradient flows back into it
            out["prologue"] = self.prologue_encoder(h.detach(), *self._rope("rope_grid_queries"))[:, X:]
        return out

    def encode(self, images: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        """float images `[B, C, H, W]` in [-1, 1] -> (prologue_ids `[B, Z]`, visual_ids `[B, X]`).

        Prologue ids are raw codebook indices (not offset into the AR vocabulary); `[B, 0]` for
        the `2d` variant.
        """
        hidden = self.encoder_hidden(images)
        visual_ids = self.visual_quantizer.ids(hidden["visual"])
        if "prologue" in hidden:
            prologue_ids = self.prologue_quantizer.ids(hidden["prologue"])
        else:
            prologue_ids = visual_ids.new_zeros(visual_ids.shape[0], 0)
        return prologue_ids, visual_ids

    # -- decoder side ------------------------------------------------------------------------

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes `[B, X, code_dim]` -> float images `[B, C, H, W]`, unclamped."""
        patches = self.decoder(codes, *self._rope("rope_grid"))  # [B, X, patch_dim]
        return unpatchify(patches, self.cfg.patch_size, self.cfg.channels)

    def decode(self, visual_ids: torch.Tensor) -> torch.Tensor:
        """visual ids `[B, X]` -> float images `[B, C, H, W]`, unclamped (the prologue is never used)."""
        X, K = self.cfg.num_visual_tokens, self.cfg.visual_codebook_size
        if visual_ids.dim() != 2 or visual_ids.shape[1] != X:
            raise ValueError(f"visual_ids must be [B, {X}], got {list(visual_ids.shape)}")
        if visual_ids.numel() and (int(visual_ids.min()) < 0 or int(visual_ids.max()) >= K):
            raise ValueError(f"visual_ids must lie in [0, {K}); got range "
                             f"[{int(visual_ids.min())}, {int(visual_ids.max())}]")
        return self.decode_codes(self.visual_quantizer.codes(visual_ids))

    # -- training ----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> typing.Dict[str, torch.Tensor]:
        """Training pass: reconstruction through the straight-through visual codes, VQ loss, and
        the prologue's straight-through one-hots `[B, Z, K_p]` for the joint AR's CE."""
        hidden = self.encoder_hidden(images)
        vis = self.visual_quantizer(hidden["visual"], self.cfg.vq_beta)
        out = {
            "reconstruction": self.decode_codes(vis["quantized"]),
            "visual_ids": vis["ids"],
            "vq_loss": vis["vq_loss"],
        }
        if "prologue" in hidden:
            pro = self.prologue_quantizer(hidden["prologue"], self.cfg.prologue_softmax_temperature)
            out["prologue_ids"] = pro["ids"]
            out["prologue_onehot"] = pro["onehot"]
        return out

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.cfg
        expected = [c.channels, c.image_size, c.image_size]
        if images.dim() != 4 or list(images.shape[1:]) != expected:
            raise ValueError(f"images must be float [B, {', '.join(map(str, expected))}] in [-1, 1], "
                             f"got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1] (use uint8_to_images for pixels), "
                             f"got dtype {images.dtype}")
