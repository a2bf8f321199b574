"""Training configurations (phases 1 and 3) and their presets.

Defaults follow the release's resolved configs (`official_keys/*.json`; file:line below cite
the release at 3b6db41, see `../shared/reference/OFFICIAL_TRAINING.md` §6): phase 1 AdamW with
betas (0, 0.99) for the tokenizer and discriminator, (0.9, 0.99) and weight decay 0.03 for the
joint AR, LR 1e-4 -> 1e-5 with warm-up / flat / linear decay, EMA half-lives 1000 (tokenizer) and
2500 (joint AR) updates, CE weights 3 / 3, visual-input dropout 0.5, GAN generator weight 0.1,
LeCam 0.001, R1 0.01; phase 3 AdamW betas (0.9, 0.96), weight decay 0.03, clip 1.0, LR 4e-4 ->
1e-5, label drop 0.1, dropout 0.1, EMA half-life 2500. The `tiny` presets are the Fashion-MNIST
scale used by tests and the demo.

Phase-1 step counting: `run.steps` counts A/B *pairs* (one tokenizer update and one joint-AR /
discriminator update each), i.e. half the release's global steps; every optimizer's schedule runs
over its own calls, `run.steps` of them, as the release's over `total_global_steps / 2`
(train_tokenizer.py:392-395). So the released `phases: 2000000:...` (ae.yaml:11) is
`run.steps = 1_000_000` here, warm-up 20k calls = 40k global steps.

Overrides on the command line are `dotted.key=value` with JSON values (`steps=200`,
`tokenizer.encoder.dim=128`, `optim.lr=3e-4`, `perceptual_weights="vgg.safetensors"`).

Perceptual loss (`perceptual_weights`): a local weights file (`train/losses.py`), `"none"` (the loss
off on purpose, recorded as such in train_config.json) or null (not given: off, with a note; the
tiny presets' choice, and what runs saved before `"none"` existed hold). The released-scale presets
hold `"REQUIRED"` instead, because the release always trains with it (LPIPS-VGG for B, ConvNeXt-S
for L, weight 1.0; OFFICIAL_TRAINING.md:179, :224-238, :485-486): they refuse to start until a file
or `none` is given (`TokenizerTrainConfig.perceptual_file`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (MAX_NUM_CLASSES, ARConfig, ConfigError, TokenizerConfig, ar_preset, build_dataclass, check_float,
                      check_int, migrate_tokenizer, tokenizer_preset)
from ..runtime.files import FileFormatError, parse_json, read_json

# Upper bounds of the run settings (a typo such as steps=1e30 must fail at once, not overflow later).
MAX_STEPS = 10**12
MAX_BATCH = 2**20
MAX_WORKERS = 256
MAX_GAN_CHANNELS = 4096
MAX_GAN_LAYERS = 16
MAX_SAMPLE_CFG = 100.0

PERCEPTUAL_REQUIRED = "REQUIRED"  # released-scale presets: a weights file or "none" must be given
PERCEPTUAL_NONE = "none"  # perceptual_weights=none: no perceptual loss, on purpose
PERCEPTUAL_MISSING = (
    "perceptual_weights is required by the released-scale presets (the release always trains with the perceptual "
    "loss, weight 1.0): pass perceptual_weights=PATH to a local LPIPS-VGG16 file with its 'lin' heads "
    "(prologue-b, 2d; ConvNeXt-S for prologue-l; conversion recipe in train/losses.py), or perceptual_weights=none "
    "to train without it on purpose")


@dataclass
class OptimConfig:
    """AdamW + the release's warm-up / flat ("peak") / linear-decay schedule (utils.py:141-163):
    lr 0 at the first call (skipped), `lr` from call `warmup_steps` on, decay after another
    `flat_steps` towards `lr_min` at `run.steps` (`common.lr_at`)."""

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
    r1_weight: float = 0.01  # every 25th discriminator update, on the raw reals (train/losses.py)


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
    # a local LPIPS-VGG16 (with its heads) or ConvNeXt-S file; "none": off on purpose; null: not given (off,
    # with a note); "REQUIRED" (released-scale presets): refused until one of the others is given
    perceptual_weights: typing.Optional[str] = None
    gan_weight: float = 0.1
    gan_start: int = 0  # step from which the generator/discriminator losses are on
    vq_weight: float = 1.0
    ce_weight_prologue: float = 3.0  # CE on the prologue + EOS targets (the release's semantic weight)
    ce_weight_visual: float = 3.0  # CE on the visual targets
    visual_input_dropout: float = 0.5
    ema_halflife: float = 1000.0  # tokenizer EMA, in tokenizer updates (ae_ema_halflife, default.yaml:71)
    ar_ema_halflife: float = 2500.0  # joint-AR EMA, in joint-AR updates (ar_ema_halflife, default.yaml:72)
    init_from: typing.Optional[str] = None  # `post`: the trained 2d tokenizer checkpoint to freeze

    def validate(self) -> "TokenizerTrainConfig":
        self.tokenizer.validate()
        if self.tokenizer.has_prologue and self.joint_ar is None:
            raise ConfigError("joint_ar is required for tokenizer variants with a prologue")
        if not self.tokenizer.has_prologue and self.joint_ar is not None:
            raise ConfigError("the '2d' variant trains no joint AR: set joint_ar to null")
        if self.joint_ar is not None:
            self.joint_ar.validate("joint_ar")
        if self.tokenizer.variant == "post" and not self.init_from:
            raise ConfigError("variant 'post' trains on a frozen 2d tokenizer: set init_from=PATH (a 2d tokenizer checkpoint)")
        _validate_run(self.run)
        check_int("num_classes", self.num_classes, 1, MAX_NUM_CLASSES)
        for name in ("optim_tokenizer", "optim_ar", "optim_disc"):
            _validate_optim(name, getattr(self, name))
        _validate_gan(self.gan)
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "gan_weight", "vq_weight", "ce_weight_prologue",
                     "ce_weight_visual", "ema_halflife", "ar_ema_halflife"):
            check_float(name, getattr(self, name))
        check_float("visual_input_dropout", self.visual_input_dropout, 0.0, 1.0)
        check_int("gan_start", self.gan_start, 0, MAX_STEPS)
        for name in ("perceptual_weights", "init_from"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a path (a string) or null, got {getattr(self, name)!r}")
        self.perceptual_file()
        return self

    def perceptual_file(self) -> typing.Optional[str]:
        """The perceptual-loss weights file phase 1 loads, or None when the loss is off (`post`,
        `perceptual_weight` 0, `perceptual_weights` "none" or null). A released-scale preset's
        "REQUIRED" raises `ConfigError` (`PERCEPTUAL_MISSING`), before any run folder or data."""
        path = self.perceptual_weights
        if self.tokenizer.variant == "post" or self.perceptual_weight == 0 or path is None:
            return None
        if path == PERCEPTUAL_REQUIRED:
            raise ConfigError(PERCEPTUAL_MISSING)
        return None if path.strip().lower() == PERCEPTUAL_NONE else path


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
        _validate_optim("optim", self.optim)
        check_float("label_drop", self.label_drop, 0.0, 1.0)
        check_float("ema_halflife", self.ema_halflife)
        check_int("sample_classes", self.sample_classes, 1, MAX_NUM_CLASSES)
        # the sample grids' CFG scale: the runtime's sampling rule (finite, >= 0), bounded
        check_float("sample_cfg", self.sample_cfg, 0.0, MAX_SAMPLE_CFG)
        return self


def _validate_run(run: RunConfig) -> None:
    for name in ("steps", "log_every", "image_every", "checkpoint_every"):
        check_int(f"run.{name}", getattr(run, name), 1, MAX_STEPS)
    check_int("run.batch_size", run.batch_size, 1, MAX_BATCH)
    check_int("run.grad_accum", run.grad_accum, 1, MAX_BATCH)
    check_int("run.seed", run.seed, 0, 2**63 - 1)
    check_int("run.num_workers", run.num_workers, 0, MAX_WORKERS)
    if not isinstance(run.compile, bool):
        raise ConfigError(f"run.compile must be true or false, got {run.compile!r}")
    if run.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"run.mixed_precision must be auto, no, bf16 or fp16, got {run.mixed_precision!r}")


def _validate_optim(name: str, opt: OptimConfig) -> None:
    check_float(f"{name}.lr", opt.lr, 0.0, 1.0)
    check_float(f"{name}.lr_min", opt.lr_min, 0.0, 1.0)
    check_int(f"{name}.warmup_steps", opt.warmup_steps, 0, MAX_STEPS)
    check_int(f"{name}.flat_steps", opt.flat_steps, 0, MAX_STEPS)
    if not isinstance(opt.betas, (list, tuple)) or len(opt.betas) != 2:
        raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {opt.betas!r}")
    for i, beta in enumerate(opt.betas):
        if check_float(f"{name}.betas[{i}]", beta, 0.0, 1.0) >= 1.0:
            raise ConfigError(f"{name}.betas[{i}] must be in [0, 1), got {beta}")
    check_float(f"{name}.weight_decay", opt.weight_decay)
    check_float(f"{name}.grad_clip", opt.grad_clip)


def _validate_gan(gan: GANConfig) -> None:
    if gan.loss not in ("vanilla", "hinge"):
        raise ConfigError(f"gan.loss must be 'vanilla' or 'hinge', got {gan.loss!r}")
    check_int("gan.base_channels", gan.base_channels, 1, MAX_GAN_CHANNELS)
    check_int("gan.num_layers", gan.num_layers, 1, MAX_GAN_LAYERS)
    check_float("gan.lecam_weight", gan.lecam_weight)
    check_float("gan.r1_weight", gan.r1_weight)


# ---------------------------------------------------------------------------------------------
# presets


def _tiny_run(**kw) -> RunConfig:
    base = dict(steps=2000, batch_size=64, log_every=20, image_every=500, checkpoint_every=500)
    base.update(kw)
    return RunConfig(**base)


def _release_phase1(pairs: int) -> dict:
    """The release's phase-1 settings (OFFICIAL_TRAINING §6.1) for a run of `2 * pairs` global steps."""
    # lr 1e-4 -> 1e-5 for enc/dec/ar/gan (ae.yaml:14-21); warm-up 20000 and peak 100000 calls
    # (ae.yaml:23-24); horizon total/2 = run.steps (train_tokenizer.py:392-395); no clipping
    # (grad_clip_* 0, ae.yaml:37-40)
    sched = dict(lr=1e-4, lr_min=1e-5, warmup_steps=20000, flat_steps=100000, grad_clip=0.0)
    return dict(
        num_classes=1000,
        # batch 256 global (ae.yaml:9); seed 42 (default.yaml:39); checkpoints every 200k global steps
        # (ae.yaml:74) = 100k pairs, pictures every 40k global (visualize_freq, ae.yaml:75) = 20k pairs;
        # log_freq 25 global (ae.yaml:73) would be 12.5 pairs: we log every 25 pairs
        run=RunConfig(steps=pairs, batch_size=256, seed=42, checkpoint_every=100_000, image_every=20_000,
                      log_every=25),
        # betas (0.0, 0.99), wd 0 for enc/dec (ae.yaml:27-28, 43-44)
        optim_tokenizer=OptimConfig(betas=[0.0, 0.99], weight_decay=0.0, **sched),
        # joint AR: betas (0.9, 0.99) (ae.yaml:29-30), wd 0.03 with exclusions (ae.yaml:45; :288-296)
        optim_ar=OptimConfig(betas=[0.9, 0.99], weight_decay=0.03, **sched),
        # discriminator: betas (0.0, 0.99), wd 1e-4 on every parameter (ae.yaml:46; train_tokenizer.py:310)
        optim_disc=OptimConfig(betas=[0.0, 0.99], weight_decay=1e-4, **sched),
        # PatchGAN 3 layers x 64, vanilla, LeCam 0.001, R1 0.01 (default.yaml:56-68); no DiffAug for
        # patchgan (model_gan.py:1099-1101)
        gan=GANConfig(loss="vanilla", base_channels=64, num_layers=3, lecam_weight=0.001, r1_weight=0.01),
        l1_weight=1.0, l2_weight=0.0,  # ae.yaml:50; DO_L2 is never set (ae.yaml:51 dead)
        # lpips_weight 1.0 (ae.yaml:52) on LPIPS-VGG for B and 2d (default.yaml:16), ConvNeXt-S for L (train.sh:73),
        # always on in the release (train_tokenizer.py:621-629; OFFICIAL_TRAINING.md:179, :224-238, :485-486):
        # no silent fallback, a weights file or "none" must be given (`perceptual_file`)
        perceptual_weight=1.0, perceptual_weights=PERCEPTUAL_REQUIRED,
        gan_weight=0.1, gan_start=0,  # gan_G_weight 0.1 non-adaptive, gan_start 0 (ae.yaml:53, 59-60)
        vq_weight=1.0,  # commitment_loss_weight (ae.yaml:56); vq_beta 0.25 is in the tokenizer config
        ce_weight_prologue=3.0, ce_weight_visual=3.0,  # prior_enc_*_weight (train.sh:17-18)
        visual_input_dropout=0.5,  # prior_visual_dropout (train.sh:25)
        ema_halflife=1000.0, ar_ema_halflife=2500.0,  # default.yaml:71-72
    )


def tokenizer_train_preset(name: str) -> TokenizerTrainConfig:
    tiny_opt = dict(lr=1e-3, lr_min=1e-4, warmup_steps=100, flat_steps=0)
    presets = {
        # the release's prologue-b recipe: 2M global steps (ae.yaml:11) = 1M A/B pairs; joint AR
        # "small" cut to 7 layers, untied, dropout 0 (train.sh:21-22; ae.yaml:34-36), unconditional
        # (label_drop_prob 1.0, train.sh:26: our joint AR always gets the null class)
        "prologue-b": lambda: TokenizerTrainConfig(
            tokenizer=tokenizer_preset("prologue-b"), joint_ar=ar_preset("joint-small"), **_release_phase1(1_000_000)),
        # 2d baseline: 1.5M global steps (train.sh:7) = 750k pairs, A = AE, B = discriminator
        "2d": lambda: TokenizerTrainConfig(
            tokenizer=tokenizer_preset("2d"), joint_ar=None, **_release_phase1(750_000)),
        "tiny": lambda: TokenizerTrainConfig(
            num_classes=10, tokenizer=tokenizer_preset("tiny"), joint_ar=ar_preset("tiny"), run=_tiny_run(),
            optim_tokenizer=OptimConfig(betas=[0.0, 0.99], **tiny_opt),
            optim_ar=OptimConfig(betas=[0.9, 0.99], weight_decay=0.03, **tiny_opt),
            optim_disc=OptimConfig(betas=[0.0, 0.99], weight_decay=1e-4, **tiny_opt),
            gan=GANConfig(base_channels=16), ema_halflife=100.0, ar_ema_halflife=250.0, gan_start=500,
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
        # the release's phase 3 (OFFICIAL_TRAINING §6.2), the same for every AR size
        "base": lambda: ARTrainConfig(
            # ar_drop 0.1, ar_emb_drop 0.1, ar_attn_drop 0 (ar.yaml:25-27; we have no attention dropout)
            ar=dataclasses.replace(ar_preset("base"), dropout=0.1, emb_dropout=0.1),
            # 500k steps (ar.yaml:14), batch 2048 global (ar.yaml:12), seed 42 (default.yaml:39),
            # checkpoints every 100k (ar.yaml:47), sample grids every 10k steps
            run=RunConfig(steps=500_000, batch_size=2048, seed=42, checkpoint_every=100_000, image_every=10_000,
                          log_every=25),
            # lr 4e-4 -> 1e-5, warm-up 62500, flat 0 (ar.yaml:17-21); betas (0.9, 0.96) (default.yaml:40-41);
            # wd 0.03 with exclusions, clip 1.0 (ar.yaml:28-29)
            optim=OptimConfig(lr=4e-4, lr_min=1e-5, warmup_steps=62500, flat_steps=0, betas=[0.9, 0.96],
                              weight_decay=0.03, grad_clip=1.0),
            label_drop=0.1,  # ar.yaml:24
            ema_halflife=2500.0,  # ar_ema_halflife (default.yaml:72)
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
        if not path.exists():
            raise ConfigError(f"config file {spec} not found")
        try:  # strict JSON (no NaN / Infinity), bounded size and depth
            data = read_json(path, f"config file {spec}")
        except FileFormatError as exc:
            raise ConfigError(str(exc)) from None
    else:
        data = dataclasses.asdict(preset_fn(spec))
    if isinstance(data, dict) and "tokenizer" in data:  # a file written before the tokenizer key's rename
        data = {**data, "tokenizer": migrate_tokenizer(data["tokenizer"])}
    data = apply_overrides(data, overrides)
    return build_dataclass(cls, data, "config").validate()


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. run.steps=200)")
        key, raw = item.split("=", 1)
        try:
            value = parse_json(raw, f"override {key}", expect=None)  # strict: NaN stays the string 'NaN'
        except FileFormatError:
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

