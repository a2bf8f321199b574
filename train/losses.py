"""Tokenizer training losses: the PatchGAN discriminator loss (LeCam, lazy R1) and the two
perceptual losses of the release, LPIPS-VGG16 (prologue-b) and ConvNeXt-S logit MSE (prologue-l).

Release = github.com/Zyriix/prologue at ``3b6db41`` (``model_gan.py``, ``model_lpips.py``,
``train_tokenizer.py``); the file:line in comments point there. Spec:
``shared/reference/OFFICIAL_TRAINING.md`` §2.9 (GAN), §2.10 (perceptual).

State-dict layout of :class:`GANLoss` matches the authors' released GAN file
(``model_4.safetensors``): ``discriminator.main.{0,2,3,5,6,8,9,11}.*`` and
``lecam_ema.logits_{real,fake}_ema``, plus one buffer of ours, ``d_updates`` (the count of
discriminator updates that drives the R1 cadence; the release derives it from its global step).

Perceptual weights: nothing here downloads; :func:`load_perceptual` reads a local file
(``.safetensors``, or ``.pt``/``.pth`` holding a dict of tensors). The network is chosen by the
file's keys (``features.0.weight`` -> VGG16/LPIPS, ``features.0.0.weight`` -> ConvNeXt) or by
``kind=``. Converting the published weights (run once where torchvision is installed; the
resulting keys are torchvision's own, so no renaming beyond a prefix is needed)::

    import torch, torchvision
    from safetensors.torch import save_file

    # prologue-b: LPIPS v0.1 VGG16 = torchvision vgg16 IMAGENET1K_V1 features (convs 0..28)
    # + the LPIPS linear heads (taming / PerceptualSimilarity "vgg.pth", md5 d507d734...,
    # keys lin0.model.1.weight ... lin4.model.1.weight, shape [1, C, 1, 1]).
    feats = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
    sd = {f"features.{k}": v for k, v in feats.items() if int(k.split(".")[0]) <= 28}
    heads = torch.load("vgg.pth", map_location="cpu")
    sd.update({k: v for k, v in heads.items() if k.startswith("lin")})
    save_file({k: v.contiguous() for k, v in sd.items()}, "lpips_vgg16.safetensors")

    # prologue-l: torchvision convnext_small IMAGENET1K_V1, its state dict unchanged
    # (features.*, classifier.0.* = LayerNorm2d, classifier.2.* = Linear(768, 1000)).
    m = torchvision.models.convnext_small(weights="IMAGENET1K_V1")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "convnext_small.safetensors")

Then ``perceptual_weights=lpips_vgg16.safetensors`` (B) or ``convnext_small.safetensors`` (L).
A file that fits neither raises :class:`PerceptualWeightsError` (a ``PrologueError``) naming it.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.errors import PrologueError

__all__ = [
    "PatchDiscriminator",
    "LeCamEMA",
    "GANLoss",
    "diff_augment",
    "PerceptualWeightsError",
    "PerceptualWeightsMissing",
    "PerceptualLoss",
    "ConvNeXtPerceptualLoss",
    "load_perceptual",
    "VGG16_CONV_LAYERS",
    "VGG16_TAPS",
    "LPIPS_SHIFT",
    "LPIPS_SCALE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CONVNEXT_SMALL_DIMS",
    "CONVNEXT_SMALL_DEPTHS",
]


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming layout), logits map ``(B, 1, h, w)``.

    ``main`` (num_layers=3): conv(s2, bias) lrelu | [conv(s2, no bias) BN lrelu] x (num_layers-1)
    | conv(s1, no bias) BN lrelu | conv(s1, bias) -> 1 channel. Kernel 4, padding 1 everywhere;
    widths ``base_channels * min(2**n, 8)``. 256x256 -> 30x30 logits, 32x32 -> 2x2.
    (release ``model_gan.py:24-96``). BatchNorm2d is PyTorch's default (eps 1e-5, momentum 0.1),
    per-process batch statistics (no SyncBN), and the release never switches it to eval mode.
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
        """Conv weights ~ N(0, 0.02); conv biases (first and last conv) PyTorch's default
        U(+-1/sqrt(fan_in)) -- the release's ``_init_weights`` leaves them alone
        (``model_gan.py:98-103``); BN weights ~ N(1, 0.02), BN biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    bound = 1.0 / (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
                    nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, 1, h, w) logits
        return self.main(x)


# --------------------------------------------------------------------------------------------
# Differentiable augmentation (DiffAugment-style: translation + cutout). NOT used by GANLoss:
# the release builds DiffAug only for its DINO discriminator (model_gan.py:1099-1101).
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
    ``x.device``. ``x``: (B, C, H, W) -> same shape. Kept as a utility; the PatchGAN loss
    below never calls it (the release does not augment PatchGAN inputs).
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
    """EMAs of the mean real / fake discriminator logits (scalar float32 buffers, start at 0;
    release ``LeCAM_EMA``, ``model_gan.py:1031-1041``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits_real_ema", torch.zeros(()))
        self.register_buffer("logits_fake_ema", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: Tensor, fake_mean: Tensor, decay: float) -> None:
        """``ema <- ema + (1 - decay) * (batch_mean - ema)`` for both buffers, as the release's
        ``lerp_`` (``model_gan.py:1038-1041``)."""
        self.logits_real_ema.lerp_(real_mean.detach().float(), 1.0 - decay)
        self.logits_fake_ema.lerp_(fake_mean.detach().float(), 1.0 - decay)


class GANLoss(nn.Module):
    """Adversarial loss for tokenizer training: PatchGAN ``discriminator`` + ``lecam_ema``
    (release ``GANLoss``, ``model_gan.py:1062-1191``, ``disc_type: patchgan``).

    Args:
        in_channels, base_channels, num_layers: :class:`PatchDiscriminator` shape.
        loss: ``"vanilla"`` (softplus, the release's setting) or ``"hinge"`` (the release's
            ``hinge_d_loss`` halves the sum, ``model_gan.py:988-991``; so does this one).
        lecam_weight: LeCam regulariser weight (0 disables it; release 0.001).
        lecam_decay: EMA decay of the LeCam logit means (release 0.999, ``model_gan.py:1032``).
        r1_weight: R1 weight gamma; penalty = gamma/2 * mean_b ||grad_x sum D(x_real)||^2
            (0 disables it; release 0.01, ``model_gan.py:1044-1052``).
        r1_every: R1 is added on discriminator update ``k`` (0-based, counted in the persistent
            buffer ``d_updates``) when ``(k + 1) % r1_every == 0``: updates 24, 49, 74, ...
            The release tests ``(global_step + 1) % 25 == 0`` (``model_gan.py:1186``) with D
            steps on odd global steps ``g = 2k + 1``, i.e. the same updates. The penalty is
            *not* multiplied by the interval (no lazy-regularisation rescaling).
        aug_prob: accepted for compatibility and ignored. The release's ``aug_prob`` only
            configures DiffAug for its DINO discriminator (``model_gan.py:1099-1101``); PatchGAN
            inputs are never augmented, on the generator and the discriminator path alike.
            :meth:`augment` stays available for explicit use.
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
        aug_prob: float = 0.0,
        r1_every: int = 25,
    ):
        super().__init__()
        if loss not in ("vanilla", "hinge"):
            raise ValueError(f"loss must be 'vanilla' or 'hinge', got {loss!r}")
        if r1_every < 1:
            raise ValueError(f"r1_every must be >= 1, got {r1_every}")
        self.discriminator = PatchDiscriminator(in_channels, base_channels, num_layers)
        self.lecam_ema = LeCamEMA()
        self.loss = loss
        self.lecam_weight = float(lecam_weight)
        self.lecam_decay = float(lecam_decay)
        self.r1_weight = float(r1_weight)
        self.r1_every = int(r1_every)
        self.aug_prob = float(aug_prob)  # unused by PatchGAN, as in the release
        # discriminator updates begun so far (persistent: an exact resume keeps the R1 cadence)
        self.register_buffer("d_updates", torch.zeros((), dtype=torch.int64))
        # Under DDP the trainer sets this to a broadcast from rank 0: every forward of the loss then
        # starts from rank 0's buffers (the discriminator's BatchNorm running statistics, the LeCam
        # EMAs), as the release's DDP-wrapped GAN loss does with DDP's default `broadcast_buffers=True`
        # (OFFICIAL_TRAINING.md §7.18). Our DDP wrappers keep `broadcast_buffers=False` (a broadcast
        # into the tokenizer's buffers between two forwards of one graph would break its backward),
        # so the GAN loss broadcasts its own, here.
        self.sync_buffers: typing.Optional[typing.Callable[[typing.List[Tensor]], None]] = None

    def _from_rank0(self) -> None:
        if self.sync_buffers is not None and self.training:
            with torch.no_grad():
                self.sync_buffers(list(self.buffers()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before `d_updates` existed load with the counter at 0
        absent = prefix + "d_updates" not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent and prefix + "d_updates" in missing_keys:
            missing_keys.remove(prefix + "d_updates")

    # ---- augmentation (explicit use only)
    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """With probability ``aug_prob`` (one draw per call) return ``diff_augment(x)``, else ``x``.
        Never called by the losses."""
        if self.aug_prob <= 0.0:
            return x
        if self.aug_prob < 1.0 and torch.rand((), generator=generator).item() >= self.aug_prob:
            return x
        return diff_augment(x, generator)

    # ---- R1 cadence
    def r1_due(self, update: int) -> bool:
        """Whether discriminator update ``update`` (0-based) carries the R1 term."""
        return self.r1_weight > 0.0 and (update + 1) % self.r1_every == 0

    # ---- generator side
    def generator_loss(self, fake_images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial loss for the generator (scalar); gradients flow into ``fake_images``.

        vanilla: ``softplus(-D(fake)).mean()``; hinge: ``-D(fake).mean()``
        (``model_gan.py:1155-1158``, ``:1016-1017``). No augmentation; ``generator`` is unused.
        """
        self._from_rank0()
        logits = self.discriminator(fake_images.contiguous())
        if self.loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()

    # ---- discriminator side
    def discriminator_loss(
        self,
        real_images: Tensor,
        fake_images: Tensor,
        generator: torch.Generator | None = None,
        *,
        new_update: bool = True,
    ) -> dict[str, Tensor]:
        """Discriminator objective (release ``GANLoss.forward(loss='D')``, ``model_gan.py:1162-1191``).

        Order as the release: ``f = D(sg(fake))`` then ``r = D(real)`` in two forwards (separate
        BN batch statistics, ``:1172-1173``); ``d_loss`` (vanilla: ``mean softplus(-r) + mean
        softplus(f)``, hinge: ``0.5 * (mean relu(1 - r) + mean relu(1 + f))``); LeCam: the EMAs
        are first updated with this batch's means (training mode only), then ``lecam =
        lecam_weight * [mean relu(r - ema_f)^2 + mean relu(ema_r - f)^2]`` with the *updated*
        EMAs (``:1176-1178``); R1 on R1 updates (see ``r1_every``): a third forward on the raw
        reals, ``r1 = mean_b r1_weight/2 * ||grad_x sum D(x)||^2``, ``create_graph=True``
        (``:1044-1052``, ``:1186-1189``).

        ``new_update``: a training-mode call with grad enabled begins a new discriminator
        update (``d_updates`` += 1) when True; pass False for the 2nd.. micro-batches of a
        gradient-accumulated update (they share its R1 decision). Calls in eval mode or under
        ``torch.no_grad`` neither count nor compute R1. ``generator`` is unused.

        Returns scalars: ``loss`` = ``d_loss + lecam + r1``, ``d_loss``, ``lecam``, ``r1``,
        ``logits_real`` / ``logits_fake`` (detached means).
        """
        self._from_rank0()
        counting = self.training and torch.is_grad_enabled()
        want_r1 = False
        if counting:
            if new_update or int(self.d_updates) == 0:
                update = int(self.d_updates)
                self.d_updates += 1
            else:
                update = int(self.d_updates) - 1
            want_r1 = self.r1_due(update)

        logits_fake = self.discriminator(fake_images.detach().contiguous())  # (B, 1, h, w)
        logits_real = self.discriminator(real_images.detach().contiguous())

        if self.loss == "hinge":
            d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        else:
            d_loss = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()

        zero = d_loss.new_zeros(())
        lecam = zero
        if self.lecam_weight > 0.0:
            if self.training:  # update first, then use (model_gan.py:1177-1178)
                self.lecam_ema.update(logits_real.mean(), logits_fake.mean(), self.lecam_decay)
            ema_real, ema_fake = self.lecam_ema.logits_real_ema, self.lecam_ema.logits_fake_ema
            reg = F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
            lecam = self.lecam_weight * reg

        r1 = zero
        if want_r1:  # third forward on the un-augmented reals (model_gan.py:1044-1052)
            # through the bare module when the loop wrapped it (DDP), as the release calls its inner
            # discriminator from inside the prepared GANLoss
            disc = getattr(self.discriminator, "module", self.discriminator)
            x = real_images.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(disc(x).sum(), x, create_graph=True, allow_unused=True)
            if grad is not None:  # None: D ignores its input -> zero penalty
                r1 = (grad.pow(2).flatten(1).sum(1) * (self.r1_weight / 2)).mean()

        return {
            "loss": d_loss + lecam + r1,
            "d_loss": d_loss,
            "lecam": lecam,
            "r1": r1,
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


# --------------------------------------------------------------------------------------------
# Perceptual losses (release model_lpips.py)
# --------------------------------------------------------------------------------------------


class PerceptualWeightsError(PrologueError, ValueError):
    """A perceptual-loss weights file that cannot be used; the message names the file."""


class PerceptualWeightsMissing(PerceptualWeightsError, FileNotFoundError):
    """The perceptual-loss weights file does not exist."""


class _Float32(nn.Module):
    """Base of the frozen perceptual networks: always eval mode, float32 with autocast off
    (the release does not ``accelerate.prepare`` them, so they run in fp32, OFFICIAL §2.10)."""

    def train(self, mode: bool = True):
        """Ignored: the module always stays in eval mode."""
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _rgb(x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, 3, H, W) float32; C != 3 is averaged to grey and repeated
        x = x.float()
        if x.shape[1] != 3:
            x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        return x


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
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # model_lpips.py ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _Lin(nn.Module):
    """LPIPS ``NetLinLayer`` layout: ``model = [Dropout, Conv1x1(C -> 1, no bias)]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.constant_(self.model[1].weight, 1.0 / channels)  # uniform fallback


def _strip_module(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _fit_error(what: str, missing: list[str], misshaped: list[str], unexpected: list[str] = ()) -> str | None:
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    if misshaped:
        parts.append("misshaped: " + "; ".join(misshaped[:12]) + (" ..." if len(misshaped) > 12 else ""))
    if unexpected:
        parts.append("unexpected: " + ", ".join(list(unexpected)[:12]) + (" ..." if len(unexpected) > 12 else ""))
    return f"perceptual weights do not fit {what} — " + " | ".join(parts) if parts else None


class PerceptualLoss(_Float32):
    """LPIPS v0.1 distance on VGG16 (release ``LPIPS``, ``model_lpips.py:132-184``); frozen,
    always in eval mode (the heads' dropout off), float32.

    ``features.N`` follows torchvision's ``vgg16().features`` numbering (up to relu5_3), so
    its ``features.*`` tensors load directly; ``lin{i}.model.1.weight`` ((1, C, 1, 1)) follow
    the LPIPS file layout. Without LPIPS ``lin`` weights (``has_lpips_weights`` False) the
    weights are uniform 1/C, i.e. a plain channel-normalised VGG distance, *not* LPIPS.

    ``forward(x, y)``: images ``(B, C, H, W)`` in [-1, 1] -> per-sample distance ``(B,)``:
    ScalingLayer, relu1_2..relu5_3, unit-normalise over channels (eps 1e-10), squared
    difference, 1x1 head, spatial mean, sum over the 5 taps. C == 3 is used as is; any other
    channel count is averaged to grey and repeated to 3. Parameters have
    ``requires_grad=False``; gradients still flow to the inputs. Build it with
    :func:`load_perceptual` or :meth:`from_state_dict`; ``PerceptualLoss()`` alone has random
    (untrained) VGG weights.
    """

    kind = "vgg"

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
        self._freeze()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> "PerceptualLoss":
        """Build from ``features.N.{weight,bias}`` (+ optional ``lin{0..4}.model.1.weight``).

        A leading ``module.`` is stripped; other keys are ignored. Raises
        :class:`PerceptualWeightsError` naming missing / misshaped VGG tensors, or incomplete /
        misshaped ``lin`` weights.
        """
        sd = _strip_module(state_dict)
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
        msg = _fit_error("VGG16/LPIPS", missing, misshaped)
        if msg:
            raise PerceptualWeightsError(msg)
        with torch.no_grad():
            for k in vgg_keys + present_lin:
                own[k].copy_(sd[k].to(own[k].dtype))
        model.has_lpips_weights = bool(present_lin)
        return model

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distance ``(B,)`` (float32) between image batches ``x``, ``y`` in [-1, 1]."""
        with torch.autocast(x.device.type, enabled=False):
            fx = self._taps((self._rgb(x) - self.shift) / self.scale)
            fy = self._taps((self._rgb(y) - self.shift) / self.scale)
            total = fx[0].new_zeros(x.shape[0])
            for i, (a, b) in enumerate(zip(fx, fy)):
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit L2 norm over channels
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = getattr(self, f"lin{i}").model[1]((a - b).pow(2))  # (B, 1, h, w)
                total = total + d.mean(dim=(1, 2, 3))
        return total


# ---- ConvNeXt (torchvision's convnext_small layout and key names, written out here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # model_lpips.py _IMAGENET_MEAN / _IMAGENET_STD
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_SMALL_DIMS = (96, 192, 384, 768)
CONVNEXT_SMALL_DEPTHS = (3, 3, 27, 3)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, C, H, W)`` (torchvision ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class _CNBlock(nn.Module):
    """torchvision ``CNBlock``: dwconv7 -> LN -> Linear(4C) -> GELU -> Linear(C), layer scale,
    residual. Stochastic depth is the identity in eval mode, the only mode used here."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            _Permute((0, 2, 3, 1)),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _Permute((0, 3, 1, 2)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXtPerceptualLoss(_Float32):
    """ConvNeXt logit MSE (release ``ConvNeXtPerceptualLoss``, ``model_lpips.py:98-125``).

    The network is torchvision's ``convnext_small`` (defaults ``dims=(96, 192, 384, 768)``,
    ``depths=(3, 3, 27, 3)``, 1000 classes) with torchvision's key names (``features.0.0``
    stem conv, ``features.0.1`` stem LayerNorm2d, ``features.{1,3,5,7}.j`` blocks,
    ``features.{2,4,6}`` downsampling LN + conv, ``classifier.{0,2}``); smaller ``dims`` /
    ``depths`` give stand-ins for tests. Always eval mode (the release forces ``self.eval()``
    on every call, so stochastic depth is off), frozen, float32.

    ``forward(x, y)``: images in [-1, 1] -> per-sample ``mean_k (logit_k(x) - logit_k(y))^2``
    ``(B,)``, after ``(img + 1) / 2``, a bilinear antialiased resize to ``image_size``
    (224; ``align_corners=False``) and ImageNet mean/std normalisation.
    """

    kind = "convnext"

    def __init__(self, dims: tuple[int, ...] = CONVNEXT_SMALL_DIMS, depths: tuple[int, ...] = CONVNEXT_SMALL_DEPTHS,
                 num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims and depths must have one entry per stage, got {dims} and {depths}")
        self.dims, self.depths, self.image_size = tuple(dims), tuple(depths), int(image_size)
        stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), _LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stages.append(nn.Sequential(*[_CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                stages.append(nn.Sequential(_LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(_LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], image_size: int = 224) -> "ConvNeXtPerceptualLoss":
        """Build from a torchvision ConvNeXt state dict (``module.`` stripped); the stage
        widths, depths and class count are read from the tensors. Raises
        :class:`PerceptualWeightsError` when keys are missing, misshaped or unexpected."""
        sd = _strip_module(state_dict)
        if "features.0.0.weight" not in sd or "classifier.2.weight" not in sd:
            missing = [k for k in ("features.0.0.weight", "classifier.2.weight") if k not in sd]
            raise PerceptualWeightsError(_fit_error("ConvNeXt", missing, []))
        dims, depths = [], []
        while f"features.{1 + 2 * len(dims)}.0.layer_scale" in sd:
            stage = 1 + 2 * len(dims)
            n = 0
            while f"features.{stage}.{n}.layer_scale" in sd:
                n += 1
            dims.append(int(sd[f"features.{stage}.0.layer_scale"].shape[0]))
            depths.append(n)
        if not dims:
            raise PerceptualWeightsError(_fit_error("ConvNeXt", ["features.1.0.layer_scale"], []))
        model = cls(tuple(dims), tuple(depths), int(sd["classifier.2.weight"].shape[0]), image_size)
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        misshaped = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
                     for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        msg = _fit_error(f"ConvNeXt (dims {tuple(dims)}, depths {tuple(depths)})", missing, misshaped, unexpected)
        if msg:
            raise PerceptualWeightsError(msg)
        with torch.no_grad():
            for k in own:
                own[k].copy_(sd[k].to(own[k].dtype))
        return model

    def logits(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] ``(B, C, H, W)`` -> class logits ``(B, num_classes)`` (float32)."""
        with torch.autocast(x.device.type, enabled=False):
            x = self._rgb(x) * 0.5 + 0.5
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            x = self.features((x - self.mean) / self.std)
            return self.classifier(self.avgpool(x))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample logit MSE ``(B,)`` between image batches ``x``, ``y`` in [-1, 1]."""
        return (self.logits(x) - self.logits(y)).pow(2).mean(-1)


_KINDS = {"vgg": "vgg", "lpips": "vgg", "convnext": "convnext"}


_PERCEPTUAL_EXPECTED = ("a safetensors (or .pt/.pth dict of tensors) file of floating-point tensors with torchvision key names (VGG16 "
                        "'features.N.weight/bias' + optional LPIPS 'lin{0..4}.model.1.weight', or convnext_small's "
                        "state dict)")


def load_perceptual(path: str | os.PathLike | None, kind: str | None = None
                    ) -> PerceptualLoss | ConvNeXtPerceptualLoss | None:
    """Load a perceptual loss from a local weights file, or ``None`` when ``path`` is None.

    ``.safetensors`` is read with safetensors; ``.pt`` / ``.pth`` (the published formats) with
    ``torch.load(weights_only=True, map_location="cpu")``, which unpickles nothing but tensors and
    plain containers; a pickle under any other name is refused unread.
    Every tensor the network uses must be floating point and finite. ``kind``: ``"vgg"``
    (alias ``"lpips"``) -> :class:`PerceptualLoss` from torchvision VGG16 ``features.N.{weight,bias}``
    plus optional LPIPS ``lin{0..4}.model.1.weight``; ``"convnext"`` -> :class:`ConvNeXtPerceptualLoss`
    from a torchvision ConvNeXt state dict; ``None`` -> chosen by the keys. Nothing is downloaded.
    Raises :class:`PerceptualWeightsMissing` (no file) or :class:`PerceptualWeightsError`
    (format, dtype, unknown layout, missing / misshaped keys), one-line ``PrologueError``s naming the file.
    """
    if path is None:
        return None
    if kind is not None and kind not in _KINDS:
        raise PerceptualWeightsError(f"perceptual kind must be 'vgg', 'lpips' or 'convnext', got {kind!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PerceptualWeightsMissing(
            f"perceptual-loss weights not found at {path!r}: expected a local file, {_PERCEPTUAL_EXPECTED}; "
            "nothing is downloaded")
    sd = _read_perceptual_file(path)
    names = {k[len("module."):] if k.startswith("module.") else k for k in sd}
    if kind is None:
        if "features.0.0.weight" in names:
            kind = "convnext"
        elif "features.0.weight" in names:
            kind = "vgg"
        else:
            shown = ", ".join(sorted(names)[:6]) or "no tensors"
            raise PerceptualWeightsError(
                f"{path}: neither VGG16/LPIPS ('features.0.weight') nor ConvNeXt ('features.0.0.weight') "
                f"perceptual weights (found {shown}{' ...' if len(names) > 6 else ''}); expected {_PERCEPTUAL_EXPECTED}")
    try:
        if _KINDS[kind] == "convnext":
            return ConvNeXtPerceptualLoss.from_state_dict(sd)
        return PerceptualLoss.from_state_dict(sd)
    except PerceptualWeightsError as exc:
        raise PerceptualWeightsError(f"{path}: {' '.join(str(exc).split())}") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # e.g. a 0-d tensor where a vector belongs
        raise PerceptualWeightsError(f"{path}: unusable perceptual weights ({type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())[:300]}); expected {_PERCEPTUAL_EXPECTED}") from None


def _read_perceptual_file(path: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or of a `.pt` / `.pth` (the format torchvision and LPIPS
    publish) through `torch.load(weights_only=True)`, which unpickles nothing but tensors and plain
    containers; a pickle under any other name is refused unread. Checked to be finite floating point."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # a pickle of anything but tensors, a corrupt file
            raise PerceptualWeightsError(f"{path}: torch.load(weights_only=True) refused it ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]}); expected {_PERCEPTUAL_EXPECTED}") from None
        if not isinstance(obj, Mapping):
            raise PerceptualWeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    elif head[:1] == b"\x80" or head[:4] == b"PK\x03\x04" or ext in (".pkl", ".pickle", ".bin", ".ckpt"):
        raise PerceptualWeightsError(
            f"{path}: a pickle / torch.save file under a name that is not .pt/.pth; it is never unpickled here: "
            f"convert it to safetensors (see train/losses.py) - expected {_PERCEPTUAL_EXPECTED}")
    elif ext != ".safetensors":
        raise PerceptualWeightsError(f"{path}: unsupported perceptual weights format {ext!r}; "
                                     f"expected {_PERCEPTUAL_EXPECTED}")
    else:
        try:
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        except Exception as exc:  # corrupt or truncated file: safetensors raises several error types
            raise PerceptualWeightsError(f"{path}: cannot read perceptual weights ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:300]}); expected {_PERCEPTUAL_EXPECTED}") from None
    for name, tensor in sd.items():
        used = (name[len("module."):] if name.startswith("module.") else name).startswith(("features.", "lin",
                                                                                            "classifier."))
        if not used:
            continue
        if not tensor.is_floating_point():
            raise PerceptualWeightsError(f"{path}: tensor {name!r} is {str(tensor.dtype).replace('torch.', '')}, "
                                         f"expected floating point ({_PERCEPTUAL_EXPECTED})")
        if not bool(torch.isfinite(tensor).all()):
            raise PerceptualWeightsError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return sd
