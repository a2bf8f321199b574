"""Tokenizer training losses: PatchGAN discriminator loss (LeCam, R1, DiffAugment) and a
VGG16 perceptual (LPIPS-style) distance.

State-dict layout of :class:`GANLoss` matches the authors' released GAN file
(``model_4.safetensors``): ``discriminator.main.{0,2,3,5,6,8,9,11}.*`` and
``lecam_ema.logits_{real,fake}_ema``.

Nothing here downloads weights: :func:`load_perceptual` reads a local file only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PatchDiscriminator",
    "LeCamEMA",
    "GANLoss",
    "diff_augment",
    "PerceptualLoss",
    "load_perceptual",
    "VGG16_CONV_LAYERS",
    "VGG16_TAPS",
    "LPIPS_SHIFT",
    "LPIPS_SCALE",
]


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming layout), logits map ``(B, 1, h, w)``.

    ``main`` (num_layers=3): conv(s2, bias) lrelu | [conv(s2, no bias) BN lrelu] x (num_layers-1)
    | conv(s1, no bias) BN lrelu | conv(s1, bias) -> 1 channel. Kernel 4, padding 1 everywhere;
    widths ``base_channels * min(2**n, 8)``. 256x256 -> 30x30 logits, 32x32 -> 2x2.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1, bias=True),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden conv keeps resolution (-1)
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1, bias=True))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Conv weights ~ N(0, 0.02); BN weights ~ N(1, 0.02); all biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, 1, h, w) logits
        return self.main(x)


# --------------------------------------------------------------------------------------------
# Differentiable augmentation (DiffAugment-style: translation + cutout)
# --------------------------------------------------------------------------------------------


def _randint(low: int, high: int, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` ints in ``[low, high)`` on CPU (from ``generator`` or the global CPU RNG)."""
    return torch.randint(low, high, (n,), generator=generator)


def diff_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.5,
) -> Tensor:
    """Random translation then cutout, per sample; differentiable w.r.t. ``x``.

    * translation: integer shift ``(dy, dx)`` uniform in ``[-s, s]`` with
      ``s = round(ratio * size)`` (1/8 of H resp. W); vacated pixels are zero.
    * cutout: a ``round(0.5 * H) x round(0.5 * W)`` rectangle, centre uniform over the image,
      clipped at the borders, is set to zero.

    Random numbers are drawn on CPU from ``generator`` (or the global torch RNG) and moved to
    ``x.device``. ``x``: (B, C, H, W) -> same shape.
    """
    b, _, h, w = x.shape
    dev = x.device
    # ---- translation: out[i, j] = x[i - dy, j - dx], zero outside
    sh, sw = int(h * translation_ratio + 0.5), int(w * translation_ratio + 0.5)
    dy = _randint(-sh, sh + 1, b, generator).to(dev)
    dx = _randint(-sw, sw + 1, b, generator).to(dev)
    rows = torch.arange(h, device=dev)[None] - dy[:, None]  # (B, H)
    cols = torch.arange(w, device=dev)[None] - dx[:, None]  # (B, W)
    keep = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
    bidx = torch.arange(b, device=dev)[:, None, None]
    # advanced indices around a slice -> (B, H, W, C)
    x = x[bidx, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    x = x.permute(0, 3, 1, 2) * keep[:, None].to(x.dtype)
    # ---- cutout
    ch, cw = int(h * cutout_ratio + 0.5), int(w * cutout_ratio + 0.5)
    cy = _randint(0, h, b, generator).to(dev) - ch // 2  # top edge (may be < 0)
    cx = _randint(0, w, b, generator).to(dev) - cw // 2
    r = torch.arange(h, device=dev)[None]
    c = torch.arange(w, device=dev)[None]
    in_r = (r >= cy[:, None]) & (r < cy[:, None] + ch)  # (B, H)
    in_c = (c >= cx[:, None]) & (c < cx[:, None] + cw)  # (B, W)
    hole = in_r[:, :, None] & in_c[:, None, :]  # (B, H, W)
    return x * (~hole)[:, None].to(x.dtype)


# --------------------------------------------------------------------------------------------
# GAN loss
# --------------------------------------------------------------------------------------------


class LeCamEMA(nn.Module):
    """EMAs of the mean real / fake discriminator logits (scalar float32 buffers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits_real_ema", torch.zeros(()))
        self.register_buffer("logits_fake_ema", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: Tensor, fake_mean: Tensor, decay: float) -> None:
        """``ema <- decay * ema + (1 - decay) * batch_mean`` for both buffers."""
        self.logits_real_ema.mul_(decay).add_(real_mean.detach().float(), alpha=1.0 - decay)
        self.logits_fake_ema.mul_(decay).add_(fake_mean.detach().float(), alpha=1.0 - decay)


class GANLoss(nn.Module):
    """Adversarial loss for tokenizer training: PatchGAN ``discriminator`` + ``lecam_ema``.

    Args:
        in_channels, base_channels, num_layers: :class:`PatchDiscriminator` shape.
        loss: ``"vanilla"`` (non-saturating softplus) or ``"hinge"``.
        lecam_weight: LeCam regulariser weight (0 disables it).
        lecam_decay: EMA decay of the LeCam logit means.
        r1_weight: R1 gradient-penalty weight gamma (penalty = gamma/2 * E||grad_x D(x_real)||^2;
            0 disables it).
        aug_prob: probability, per batch and per call, of applying :func:`diff_augment` to a
            discriminator input. Augmentation is applied in training mode only (also to the
            fake images in :meth:`generator_loss`, as DiffAugment requires).
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        num_layers: int = 3,
        loss: str = "vanilla",
        lecam_weight: float = 0.001,
        lecam_decay: float = 0.999,
        r1_weight: float = 0.01,
        aug_prob: float = 1.0,
    ):
        super().__init__()
        if loss not in ("vanilla", "hinge"):
            raise ValueError(f"loss must be 'vanilla' or 'hinge', got {loss!r}")
        self.discriminator = PatchDiscriminator(in_channels, base_channels, num_layers)
        self.lecam_ema = LeCamEMA()
        self.loss = loss
        self.lecam_weight = float(lecam_weight)
        self.lecam_decay = float(lecam_decay)
        self.r1_weight = float(r1_weight)
        self.aug_prob = float(aug_prob)

    # ---- augmentation
    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """With probability ``aug_prob`` (one draw per call) return ``diff_augment(x)``, else ``x``.

        Unconditional on the training flag (the loss methods only call it in training mode).
        """
        if self.aug_prob <= 0.0:
            return x
        if self.aug_prob < 1.0 and torch.rand((), generator=generator).item() >= self.aug_prob:
            return x
        return diff_augment(x, generator)

    def _maybe_augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.augment(x, generator) if self.training else x

    # ---- generator side
    def generator_loss(self, fake_images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial loss for the generator (scalar); gradients flow into ``fake_images``.

        vanilla: ``softplus(-D(fake)).mean()``; hinge: ``-D(fake).mean()``.
        """
        logits = self.discriminator(self._maybe_augment(fake_images, generator))
        if self.loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()

    # ---- discriminator side
    def discriminator_loss(
        self, real_images: Tensor, fake_images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Discriminator objective. ``fake_images`` are detached here.

        Returns a dict of scalars: ``loss`` = ``d_loss + lecam + r1``; ``d_loss``
        (vanilla: ``softplus(-D(real)) + softplus(D(fake))``, hinge:
        ``relu(1 - D(real)) + relu(1 + D(fake))``, each a mean); ``lecam`` =
        ``lecam_weight * [mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)]``
        using the EMAs from *before* this batch, which are then updated (training mode only) with
        the batch logit means; ``r1`` = ``r1_weight / 2 * mean_b ||grad_x sum D(x_real)||^2``
        (``x_real`` = the augmented real input; built with ``create_graph=True``; 0 when
        ``r1_weight == 0`` or grad mode is off); ``logits_real`` / ``logits_fake``: detached means.
        """
        real = self._maybe_augment(real_images.detach(), generator)
        fake = self._maybe_augment(fake_images.detach(), generator)
        want_r1 = self.r1_weight > 0.0 and torch.is_grad_enabled()
        if want_r1:
            real = real.detach().requires_grad_(True)
        logits_real = self.discriminator(real)  # (B, 1, h, w)
        logits_fake = self.discriminator(fake)

        if self.loss == "hinge":
            d_loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        else:
            d_loss = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()

        zero = d_loss.new_zeros(())
        lecam = zero
        if self.lecam_weight > 0.0:
            ema_real = self.lecam_ema.logits_real_ema.to(logits_real.dtype)
            ema_fake = self.lecam_ema.logits_fake_ema.to(logits_real.dtype)
            reg = F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
            lecam = self.lecam_weight * reg
            if self.training:
                self.lecam_ema.update(logits_real.mean(), logits_fake.mean(), self.lecam_decay)

        r1 = zero
        if want_r1:
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True, allow_unused=True)
            if grad is not None:  # None: D ignores its input -> zero penalty
                r1 = 0.5 * self.r1_weight * grad.pow(2).flatten(1).sum(1).mean()

        return {
            "loss": d_loss + lecam + r1,
            "d_loss": d_loss,
            "lecam": lecam,
            "r1": r1,
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


# --------------------------------------------------------------------------------------------
# Perceptual loss (VGG16 / LPIPS-style)
# --------------------------------------------------------------------------------------------

# torchvision vgg16().features index -> (in, out) of each 3x3 conv; a ReLU follows each conv,
# a 2x2 max-pool sits at indices 4, 9, 16, 23 (and 30, not needed here).
VGG16_CONV_LAYERS: dict[int, tuple[int, int]] = {
    0: (3, 64), 2: (64, 64),
    5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
# features index of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (output taken after it)
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
_VGG16_POOLS = (4, 9, 16, 23)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _Lin(nn.Module):
    """LPIPS ``NetLinLayer`` layout: ``model = [Dropout, Conv1x1(C -> 1, no bias)]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.constant_(self.model[1].weight, 1.0 / channels)  # uniform fallback


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on a VGG16 feature stack; frozen, always in eval mode.

    ``features.N`` follows torchvision's ``vgg16().features`` numbering (up to relu5_3), so
    its ``features.*`` tensors load directly; ``lin{i}.model.1.weight`` ((1, C, 1, 1)) follow
    the LPIPS file layout. Without LPIPS ``lin`` weights (``has_lpips_weights`` False) the
    weights are uniform 1/C, i.e. a plain channel-normalised VGG distance, *not* LPIPS.

    ``forward(x, y)``: images ``(B, C, H, W)`` in [-1, 1] -> per-sample distance ``(B,)``.
    C == 3 is used as is; any other channel count is averaged to grey and repeated to 3.
    Parameters have ``requires_grad=False``; gradients still flow to the inputs.
    Build it with :func:`load_perceptual` or :meth:`from_state_dict`; ``PerceptualLoss()``
    alone has random (untrained) VGG weights.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(VGG16_TAPS[-1] + 1):
            if i in VGG16_CONV_LAYERS:
                cin, cout = VGG16_CONV_LAYERS[i]
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            elif i in _VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        for i, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.has_lpips_weights = False
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Ignored: the module always stays in eval mode."""
        return super().train(False)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> "PerceptualLoss":
        """Build from ``features.N.{weight,bias}`` (+ optional ``lin{0..4}.model.1.weight``).

        A leading ``module.`` is stripped; other keys are ignored. Raises ``ValueError``
        naming missing / misshaped VGG tensors, or incomplete / misshaped ``lin`` weights.
        """
        sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        model = cls()
        own = model.state_dict()
        vgg_keys = [k for k in own if k.startswith("features.")]
        lin_keys = [k for k in own if k.startswith("lin")]
        missing = [k for k in vgg_keys if k not in sd]
        present_lin = [k for k in lin_keys if k in sd]
        if present_lin:
            missing += [k for k in lin_keys if k not in sd]
        misshaped = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
            for k in vgg_keys + present_lin
            if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
        ]
        if missing or misshaped:
            parts = []
            if missing:
                parts.append("missing: " + ", ".join(missing))
            if misshaped:
                parts.append("misshaped: " + "; ".join(misshaped))
            raise ValueError("perceptual weights do not fit VGG16/LPIPS — " + " | ".join(parts))
        with torch.no_grad():
            for k in vgg_keys + present_lin:
                own[k].copy_(sd[k].to(own[k].dtype))
        model.has_lpips_weights = bool(present_lin)
        return model

    def _prepare(self, x: Tensor) -> Tensor:
        # (B, C, H, W) in [-1, 1] -> (B, 3, H, W) LPIPS-scaled
        if x.shape[1] != 3:
            x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distance ``(B,)`` between image batches ``x``, ``y`` in [-1, 1]."""
        fx = self._taps(self._prepare(x))
        fy = self._taps(self._prepare(y))
        total = x.new_zeros(x.shape[0])
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit L2 norm over channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{i}").model[1]((a - b).pow(2))  # (B, 1, h, w)
            total = total + d.mean(dim=(1, 2, 3))
        return total


def load_perceptual(path: str | os.PathLike | None) -> PerceptualLoss | None:
    """Load a :class:`PerceptualLoss` from a local weights file, or ``None`` when ``path`` is None.

    ``.safetensors`` is read with safetensors; ``.pt`` / ``.pth`` with
    ``torch.load(weights_only=True, map_location="cpu")`` (a dict of tensors; nothing else is
    unpickled). Keys: torchvision VGG16 ``features.N.{weight,bias}`` plus optional LPIPS
    ``lin{0..4}.model.1.weight``. Nothing is downloaded.
    Raises ``FileNotFoundError`` (no file), ``ValueError`` (format / missing or misshaped keys).
    """
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"perceptual-loss weights not found at {path!r}: expected a local VGG16 / LPIPS weights "
            "file (.safetensors, .pt or .pth) with torchvision 'features.N.weight/bias' tensors and "
            "optionally LPIPS 'lin{0..4}.model.1.weight'; nothing is downloaded"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    elif ext in (".pt", ".pth"):
        obj = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    else:
        raise ValueError(f"{path}: unsupported perceptual weights format {ext!r} (use .safetensors, .pt or .pth)")
    return PerceptualLoss.from_state_dict(sd)
