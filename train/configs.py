"""Training configurations (phases 1 and 3) and their presets.

Defaults follow the release's resolved configs (`official_keys/*.json`): phase 1 AdamW with
betas (0, 0.99) for the tokenizer and discriminator, (0.9, 0.99) and weight decay 0.03 for the
joint AR, LR 1e-4 -> 1e-5 with warm-up / flat / linear decay, EMA half-life 1000 steps, CE weight
3.0, visual-input dropout 0.5, GAN generator weight 0.1, LeCam 0.001, R1 0.01; phase 3 AdamW
betas (0.9, 0.96), weight decay 0.03, clip 1.0, LR 4e-4 -> 1e-5, label drop 0.1, dropout 0.1,
EMA half-life 2500. The `tiny` presets are the Fashion-MNIST scale used by tests and the demo.

Overrides on the command line are `dotted.key=value` with JSON values (`steps=200`,
`tokenizer.encoder.dim=128`, `optim.lr=3e-4`, `perceptual_weights="vgg.safetensors"`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ARConfig, ConfigError, TokenizerConfig, ar_preset, build_dataclass, tokenizer_preset


@dataclass
class OptimConfig:
    """AdamW + warm-up / flat / linear-decay schedule (to `lr_min` at the last step)."""

    lr: float = 1e-4
    lr_min: float = 1e-5
    warmup_steps: int = 0
    flat_steps: int = 0
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass
class GANConfig:
    loss: str = "vanilla"  # "vanilla" | "hinge"
    base_channels: int = 64
    num_layers: int = 3
    lecam_weight: float = 0.001
    r1_weight: float = 0.01
    aug_prob: float = 1.0


@dataclass
class RunConfig:
    """What every phase shares: length, batch, seeds, logging, checkpoints, compile, precision."""

    steps: int = 1000
    batch_size: int = 64  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    image_every: int = 500  # reconstruction / sample grid PNGs
    checkpoint_every: int = 500
    compile: bool = True
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, none on CPU) | "no" | "bf16" | "fp16"


@dataclass
class TokenizerTrainConfig:
    """Phase 1: tokenizer + (prologue variants) the unconditional joint AR."""

    num_classes: int
    tokenizer: TokenizerConfig
    joint_ar: typing.Optional[ARConfig]
    run: RunConfig = field(default_factory=RunConfig)
    optim_tokenizer: OptimConfig = field(default_factory=lambda: OptimConfig(betas=[0.0, 0.99]))
    optim_ar: OptimConfig = field(default_factory=lambda: OptimConfig(betas=[0.9, 0.99], weight_decay=0.03))
    optim_disc: OptimConfig = field(default_factory=lambda: OptimConfig(betas=[0.0, 0.99], weight_decay=1e-4))
    gan: GANConfig = field(default_factory=GANConfig)
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    perceptual_weights: typing.Optional[str] = None  # local VGG16/LPIPS file; none -> no perceptual loss
    gan_weight: float = 0.1
    gan_start: int = 0  # step from which the generator/discriminator losses are on
    vq_weight: float = 1.0
    ce_weight_prologue: float = 3.0  # CE on the prologue + EOS targets (the release's semantic weight)
    ce_weight_visual: float = 3.0  # CE on the visual targets
    visual_input_dropout: float = 0.5
    ema_halflife: float = 1000.0
    init_from: typing.Optional[str] = None  # `post`: the trained 2d tokenizer checkpoint to freeze

    def validate(self) -> "TokenizerTrainConfig":
        self.tokenizer.validate()
        if self.tokenizer.has_prologue and self.joint_ar is None:
            raise ConfigError("joint_ar is required for tokenizer variants with a prologue")
        if not self.tokenizer.has_prologue and self.joint_ar is not None:
            raise ConfigError("the '2d' variant trains no joint AR: set joint_ar to null")
        if self.joint_ar is not None:
            self.joint_ar.validate()
        if self.tokenizer.variant == "post" and not self.init_from:
            raise ConfigError("variant 'post' trains on a frozen 2d tokenizer: set init_from=PATH (a 2d tokenizer checkpoint)")
        _validate_run(self.run)
        if self.gan.loss not in ("vanilla", "hinge"):
            raise ConfigError(f"gan.loss must be 'vanilla' or 'hinge', got {self.gan.loss!r}")
        if not 0 <= self.visual_input_dropout <= 1:
            raise ConfigError(f"visual_input_dropout must be in [0, 1], got {self.visual_input_dropout}")
        return self


@dataclass
class ARTrainConfig:
    """Phase 3: the class-conditional AR on pretokenized ids."""

    ar: ARConfig
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=4e-4, lr_min=1e-5, betas=[0.9, 0.96], weight_decay=0.03, grad_clip=1.0))
    label_drop: float = 0.1
    ema_halflife: float = 2500.0
    sample_classes: int = 10  # rows of the sample grid
    sample_cfg: float = 2.0  # CFG scale of the sample grid

    def validate(self) -> "ARTrainConfig":
        self.ar.validate()
        _validate_run(self.run)
        if not 0 <= self.label_drop <= 1:
            raise ConfigError(f"label_drop must be in [0, 1], got {self.label_drop}")
        return self


def _validate_run(run: RunConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "image_every", "checkpoint_every"):
        if getattr(run, name) < 1:
            raise ConfigError(f"run.{name} must be >= 1, got {getattr(run, name)}")
    if run.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"run.mixed_precision must be auto, no, bf16 or fp16, got {run.mixed_precision!r}")


# ---------------------------------------------------------------------------------------------
# presets


def _tiny_run(**kw) -> RunConfig:
    base = dict(steps=2000, batch_size=64, log_every=20, image_every=500, checkpoint_every=500)
    base.update(kw)
    return RunConfig(**base)


def tokenizer_train_preset(name: str) -> TokenizerTrainConfig:
    tiny_opt = dict(lr=1e-3, lr_min=1e-4, warmup_steps=100, flat_steps=0)
    presets = {
        # the release's recipe at ImageNet scale (batch 256, 2M steps)
        "prologue-b": lambda: TokenizerTrainConfig(
            num_classes=1000, tokenizer=tokenizer_preset("prologue-b"), joint_ar=ar_preset("joint-small"),
            run=RunConfig(steps=2_000_000, batch_size=256, checkpoint_every=200_000, image_every=40_000, log_every=25),
            optim_tokenizer=OptimConfig(warmup_steps=20000, flat_steps=100000, betas=[0.0, 0.99]),
            optim_ar=OptimConfig(warmup_steps=20000, flat_steps=100000, betas=[0.9, 0.99], weight_decay=0.03),
            optim_disc=OptimConfig(warmup_steps=20000, flat_steps=100000, betas=[0.0, 0.99], weight_decay=1e-4),
        ),
        "2d": lambda: TokenizerTrainConfig(
            num_classes=1000, tokenizer=tokenizer_preset("2d"), joint_ar=None,
            run=RunConfig(steps=1_500_000, batch_size=256, checkpoint_every=200_000, image_every=40_000, log_every=25),
        ),
        "tiny": lambda: TokenizerTrainConfig(
            num_classes=10, tokenizer=tokenizer_preset("tiny"), joint_ar=ar_preset("tiny"), run=_tiny_run(),
            optim_tokenizer=OptimConfig(betas=[0.0, 0.99], **tiny_opt),
            optim_ar=OptimConfig(betas=[0.9, 0.99], weight_decay=0.03, **tiny_opt),
            optim_disc=OptimConfig(betas=[0.0, 0.99], weight_decay=1e-4, **tiny_opt),
            gan=GANConfig(base_channels=16), ema_halflife=100.0, gan_start=500,
        ),
        "tiny-2d": lambda: dataclasses.replace(
            tokenizer_train_preset("tiny"), tokenizer=tokenizer_preset("tiny-2d"), joint_ar=None),
        "tiny-post": lambda: dataclasses.replace(
            tokenizer_train_preset("tiny"), tokenizer=tokenizer_preset("tiny-post"), init_from="REQUIRED"),
    }
    if name not in presets:
        raise ConfigError(f"unknown tokenizer training preset {name!r}; known: {', '.join(presets)} "
                          "(or a JSON file)")
    return presets[name]()


def ar_train_preset(name: str) -> ARTrainConfig:
    presets = {
        "base": lambda: ARTrainConfig(
            ar=dataclasses.replace(ar_preset("base"), dropout=0.1, emb_dropout=0.1),
            run=RunConfig(steps=500_000, batch_size=2048, checkpoint_every=100_000, image_every=10_000, log_every=25),
            optim=OptimConfig(lr=4e-4, lr_min=1e-5, warmup_steps=62500, betas=[0.9, 0.96], weight_decay=0.03, grad_clip=1.0),
        ),
        "tiny": lambda: ARTrainConfig(
            ar=dataclasses.replace(ar_preset("tiny"), dropout=0.1, emb_dropout=0.1),
            run=_tiny_run(steps=3000, batch_size=128),
            optim=OptimConfig(lr=1e-3, lr_min=1e-4, warmup_steps=100, betas=[0.9, 0.96], weight_decay=0.03, grad_clip=1.0),
            ema_halflife=200.0,
        ),
    }
    for size in ("large", "xlarge"):
        presets[size] = (lambda s: lambda: dataclasses.replace(
            presets["base"](), ar=dataclasses.replace(ar_preset(s), dropout=0.1, emb_dropout=0.1)))(size)
    if name not in presets:
        raise ConfigError(f"unknown AR training preset {name!r}; known: {', '.join(presets)} (or a JSON file)")
    return presets[name]()


# ---------------------------------------------------------------------------------------------
# loading with overrides

T = typing.TypeVar("T")


def load_train_config(cls: typing.Type[T], preset_fn, spec: str, overrides: typing.Sequence[str]) -> T:
    """A preset name or a JSON file, then `dotted.key=value` overrides, strictly validated."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {spec} not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {spec} is not valid JSON: {exc}") from None
    else:
        data = dataclasses.asdict(preset_fn(spec))
    data = apply_overrides(data, overrides)
    return build_dataclass(cls, data, "config").validate()


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. run.steps=200)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings: init_from=runs/2d/checkpoint
        parts = key.split(".")
        if len(parts) == 1 and parts[0] not in data and parts[0] in data.get("run", {}):
            parts = ["run", parts[0]]  # steps=200 is run.steps=200
        target = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section of the config")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; known here: {', '.join(target)}")
        target[parts[-1]] = value
    return data

