"""Configuration of the Prologue model: dataclasses, strict JSON round trip, named presets.

One place for every size and vocabulary fact. The tokenizer config owns the image geometry and
the codebooks; the AR vocabulary layout is *derived* from it (`TokenizerConfig.vocab()`), never
written down twice.

Presets mirror the authors' released configurations (see
`shared/reference/OFFICIAL_MODEL.md` §6 and §4.4) plus `tiny` ones for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction

from .runtime.files import FileFormatError, parse_json
from .runtime.settings import (  # re-exported: one definition for the model and the runtime
    CFG_SCHEDULES, ConfigError, SamplingConfig, VocabLayout, build_dataclass,
)

__all__ = [
    "CFG_SCHEDULES", "CONFIG_FORMAT_VERSION", "TOKENIZER_VARIANTS", "ARConfig", "ConfigError", "ModelConfig",
    "SamplingConfig", "TokenizerConfig", "TransformerSize", "VocabLayout", "ar_preset", "build_dataclass",
    "ffn_hidden", "migrate_config", "migrate_tokenizer", "model_preset", "tokenizer_preset",
]

# config.json format: version 2 renamed `tokenizer.prologue_temperature` (version 1) to
# `prologue_softmax_temperature`, apart from the sampling option `prologue_temperature`;
# `migrate_config` reads version 1 files (docs/model.md, "Config format").
CONFIG_FORMAT_VERSION = 2

TOKENIZER_VARIANTS = ("prologue", "2d", "post")

# Upper bounds on sizes, checked before any module is built (a hostile or mistyped config must
# fail at once with a one-line ConfigError, not after minutes of allocation). The released
# models are far below every one of them.
MAX_LAYERS = 256
MAX_DIM = 16384  # dim, code_dim, cond_dim
MAX_HEADS = 1024
MAX_CODEBOOK = 2**20  # visual and prologue codebook sizes
MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 4
MAX_VISUAL_TOKENS = 2**16  # (image_size / patch_size) ** 2
MAX_PROLOGUE_TOKENS = 4096
MAX_NUM_CLASSES = 10**6
MAX_MLP_RATIO = 16
MAX_STACK_PARAMS = 4 * 10**9  # estimated parameters of one Transformer stack (16 GB in float32)


def ffn_hidden(dim: int, mlp_ratio: str) -> int:
    """GeGLU hidden width: Python `round(dim * ratio)` as the release computes it."""
    return round(dim * float(Fraction(mlp_ratio)))


@dataclass
class TransformerSize:
    """Width, depth and heads of one Transformer stack."""

    dim: int
    layers: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class TokenizerConfig:
    """The image tokenizer (encoder, quantizers, decoder) and its image geometry."""

    variant: str  # "prologue" | "2d" | "post"
    image_size: int
    patch_size: int
    channels: int
    encoder: TransformerSize
    decoder: TransformerSize
    visual_codebook_size: int
    prologue_codebook_size: int  # 0 for "2d"
    num_prologue_tokens: int  # Z; 0 for "2d"
    prologue_encoder: typing.Optional[TransformerSize] = None  # "post" only
    code_dim: int = 14
    cond_dim: int = 32
    mlp_ratio: str = "8/3"
    prologue_encoder_mlp_ratio: str = "11/4"
    rope_axes: typing.List[int] = field(default_factory=lambda: [20, 20, 24])
    rope_theta_grid: float = 2000.0  # image-grid tokens (row, col)
    rope_theta_seq: float = 10000.0  # 1-D query tokens
    prologue_softmax_temperature: float = 0.1  # prologue quantizer's straight-through softmax T (training only)
    vq_beta: float = 0.25

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_visual_tokens(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def has_prologue(self) -> bool:
        return self.variant != "2d"

    def vocab(self) -> "VocabLayout":
        return VocabLayout(
            visual_codebook_size=self.visual_codebook_size,
            prologue_codebook_size=self.prologue_codebook_size if self.has_prologue else 0,
            num_prologue_tokens=self.num_prologue_tokens if self.has_prologue else 0,
            num_visual_tokens=self.num_visual_tokens,
        )

    def validate(self) -> None:
        self._validate_numbers()
        if self.variant not in TOKENIZER_VARIANTS:
            raise ConfigError(
                f"tokenizer.variant: {self.variant!r} is not one of {', '.join(TOKENIZER_VARIANTS)}"
            )
        if self.has_prologue and (self.num_prologue_tokens < 1 or self.prologue_codebook_size < 1):
            raise ConfigError(
                f"tokenizer variant {self.variant!r} needs num_prologue_tokens >= 1 and "
                "prologue_codebook_size >= 1"
            )
        if not self.has_prologue and (self.num_prologue_tokens or self.prologue_codebook_size):
            raise ConfigError(
                "tokenizer variant '2d' has no prologue: set num_prologue_tokens and "
                "prologue_codebook_size to 0"
            )
        if (self.variant == "post") != (self.prologue_encoder is not None):
            raise ConfigError("tokenizer.prologue_encoder is required for variant 'post' and only there")
        stacks = [("encoder", self.encoder), ("decoder", self.decoder)]
        if self.prologue_encoder is not None:
            stacks.append(("prologue_encoder", self.prologue_encoder))
        for name, size in stacks:
            _validate_stack(f"tokenizer.{name}", size, self.rope_axes)
        for name in ("mlp_ratio", "prologue_encoder_mlp_ratio"):
            _validate_ratio(f"tokenizer.{name}", getattr(self, name))
        for name, size in stacks:
            ratio = self.prologue_encoder_mlp_ratio if name == "prologue_encoder" else self.mlp_ratio
            _validate_stack_params(f"tokenizer.{name}", size, ratio)

    def _validate_numbers(self) -> None:
        """Types and ranges of the scalar fields (before any derived size is computed)."""
        if not isinstance(self.variant, str):
            raise ConfigError(f"tokenizer.variant must be a string, got {self.variant!r}")
        check_int("tokenizer.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_int("tokenizer.patch_size", self.patch_size, 1, MAX_IMAGE_SIZE)
        check_int("tokenizer.channels", self.channels, 1, MAX_CHANNELS)
        check_int("tokenizer.visual_codebook_size", self.visual_codebook_size, 1, MAX_CODEBOOK)
        check_int("tokenizer.prologue_codebook_size", self.prologue_codebook_size, 0, MAX_CODEBOOK)
        check_int("tokenizer.num_prologue_tokens", self.num_prologue_tokens, 0, MAX_PROLOGUE_TOKENS)
        check_int("tokenizer.code_dim", self.code_dim, 1, MAX_DIM)
        check_int("tokenizer.cond_dim", self.cond_dim, 1, MAX_DIM)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"tokenizer.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_visual_tokens > MAX_VISUAL_TOKENS:
            raise ConfigError(f"tokenizer: (image_size / patch_size) ** 2 = {self.num_visual_tokens} visual tokens; "
                              f"at most {MAX_VISUAL_TOKENS} are supported")
        check_float("tokenizer.rope_theta_grid", self.rope_theta_grid, positive=True)
        check_float("tokenizer.rope_theta_seq", self.rope_theta_seq, positive=True)
        check_float("tokenizer.prologue_softmax_temperature", self.prologue_softmax_temperature, positive=True)
        check_float("tokenizer.vq_beta", self.vq_beta)


@dataclass
class ARConfig:
    """The class-conditional AR Transformer (LlamaGen-style BOS conditioning)."""

    dim: int
    layers: int
    heads: int
    mlp_ratio: str = "11/4"
    rope_axes: typing.List[int] = field(default_factory=lambda: [24, 20, 20])
    rope_theta: float = 10000.0
    cond_dim: int = 32
    dropout: float = 0.0  # residual-branch dropout, training only (the release's phase 3: 0.1)
    emb_dropout: float = 0.0  # input-embedding dropout, training only (phase 3: 0.1)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self, name: str = "ar") -> None:
        size = TransformerSize(self.dim, self.layers, self.heads)
        _validate_stack(name, size, self.rope_axes)
        _validate_ratio(f"{name}.mlp_ratio", self.mlp_ratio)
        _validate_stack_params(name, size, self.mlp_ratio)
        check_float(f"{name}.rope_theta", self.rope_theta, positive=True)
        check_int(f"{name}.cond_dim", self.cond_dim, 1, MAX_DIM)
        for attr in ("dropout", "emb_dropout"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}.{attr} must be in [0, 1), got {value!r}")


@dataclass
class ModelConfig:
    """A whole Prologue model: tokenizer plus (optionally) the AR model over its tokens."""

    num_classes: int  # real classes; the null (unconditional) class is index `num_classes`
    tokenizer: TokenizerConfig
    ar: typing.Optional[ARConfig] = None
    format_version: int = CONFIG_FORMAT_VERSION

    @property
    def null_class(self) -> int:
        return self.num_classes

    def vocab(self) -> "VocabLayout":
        return self.tokenizer.vocab()

    def validate(self) -> "ModelConfig":
        if isinstance(self.format_version, bool) or self.format_version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is not supported (this package reads "
                f"version {CONFIG_FORMAT_VERSION})"
            )
        check_int("num_classes", self.num_classes, 1, MAX_NUM_CLASSES)
        self.tokenizer.validate()
        if self.ar is not None:
            self.ar.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return build_dataclass(cls, migrate_config(data), "config").validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = parse_json(text, "config")  # strict: no NaN / Infinity, bounded size and depth
        except FileFormatError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data)


def migrate_config(data):
    """A version-1 config dict as version 2 (a copy: `tokenizer.prologue_temperature` becomes
    `prologue_softmax_temperature`); any other value is returned as it is, for the strict checks."""
    if not isinstance(data, dict) or type(data.get("format_version")) is not int or data["format_version"] != 1:
        return data
    return {**data, "format_version": 2, **({"tokenizer": migrate_tokenizer(data["tokenizer"])} if "tokenizer" in data else {})}


def migrate_tokenizer(tokenizer):
    """A tokenizer section written before config version 2 (a checkpoint's, or a training config's,
    which has no version of its own): `prologue_temperature` read as `prologue_softmax_temperature`."""
    old, new = "prologue_temperature", "prologue_softmax_temperature"
    if isinstance(tokenizer, dict) and old in tokenizer and new not in tokenizer:
        return {(new if k == old else k): v for k, v in tokenizer.items()}
    return tokenizer


# ---------------------------------------------------------------------------------------------
# strict dict -> dataclass


def check_int(name: str, value, lo: int, hi: typing.Optional[int] = None) -> int:
    """`value` must be an int (not a bool) in `[lo, hi]`; else a one-line ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value, lo: float = 0.0, hi: typing.Optional[float] = None,
                positive: bool = False) -> float:
    """`value` must be a finite number (int or float, not bool) >= `lo` (> 0 if `positive`) and <= `hi`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return float(value)


def _validate_stack(name: str, size: TransformerSize, rope_axes) -> None:
    check_int(f"{name}.dim", size.dim, 1, MAX_DIM)
    check_int(f"{name}.layers", size.layers, 1, MAX_LAYERS)
    check_int(f"{name}.heads", size.heads, 1, MAX_HEADS)
    if size.dim % size.heads:
        raise ConfigError(f"{name}.dim {size.dim} is not divisible by heads {size.heads}")
    if not isinstance(rope_axes, (list, tuple)) or any(isinstance(a, bool) or not isinstance(a, int) for a in rope_axes):
        raise ConfigError(f"rope_axes must be three even sizes, got {rope_axes!r}")
    if len(rope_axes) != 3 or any(a < 0 or a % 2 for a in rope_axes):
        raise ConfigError(f"rope_axes must be three even sizes, got {list(rope_axes)}")
    if sum(rope_axes) != size.head_dim:
        raise ConfigError(
            f"{name}: rope_axes {list(rope_axes)} sum to {sum(rope_axes)}, but the head dim is "
            f"{size.head_dim} (dim {size.dim} / heads {size.heads})"
        )


def _validate_ratio(name: str, ratio: str) -> None:
    if not isinstance(ratio, str) or len(ratio) > 64:
        raise ConfigError(f"{name}: {ratio!r} is not a ratio like '8/3'")
    try:
        value = Fraction(ratio)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{name}: {ratio!r} is not a ratio like '8/3'") from None
    if not 0 < value <= MAX_MLP_RATIO:
        raise ConfigError(f"{name} must be in (0, {MAX_MLP_RATIO}], got {ratio!r}")


def _validate_stack_params(name: str, size: TransformerSize, ratio: str) -> None:
    """Refuse a stack whose estimated parameter count (attention 4 d^2 + GeGLU 3 d h per layer)
    exceeds MAX_STACK_PARAMS, before anything is allocated."""
    estimate = size.layers * (4 * size.dim**2 + 3 * size.dim * ffn_hidden(size.dim, ratio))
    if estimate > MAX_STACK_PARAMS:
        raise ConfigError(f"{name}: about {estimate / 1e9:.1f}e9 parameters (dim {size.dim}, layers {size.layers}); "
                          f"at most {MAX_STACK_PARAMS / 1e9:.0f}e9 per stack are supported")


# ---------------------------------------------------------------------------------------------
# presets

_B = TransformerSize(768, 12, 12)


def _tokenizer_presets() -> typing.Dict[str, TokenizerConfig]:
    imagenet = dict(image_size=256, patch_size=16, channels=3)
    return {
        "prologue-b": TokenizerConfig(
            variant="prologue", **imagenet, encoder=_B, decoder=_B,
            visual_codebook_size=16384, prologue_codebook_size=1024, num_prologue_tokens=16,
        ),
        "prologue-l": TokenizerConfig(
            variant="prologue", **imagenet, encoder=_B, decoder=TransformerSize(1024, 24, 16),
            visual_codebook_size=4096, prologue_codebook_size=1024, num_prologue_tokens=16,
        ),
        "2d": TokenizerConfig(
            variant="2d", **imagenet, encoder=_B, decoder=_B,
            visual_codebook_size=16384, prologue_codebook_size=0, num_prologue_tokens=0,
        ),
        "post": TokenizerConfig(
            variant="post", **imagenet, encoder=_B, decoder=_B,
            prologue_encoder=TransformerSize(512, 10, 8),
            visual_codebook_size=16384, prologue_codebook_size=1024, num_prologue_tokens=16,
        ),
        # Fashion-MNIST scale (1 x 32 x 32, 8 x 8 grid of 4-pixel patches); tests and the demo.
        "tiny": TokenizerConfig(
            variant="prologue", image_size=32, patch_size=4, channels=1,
            encoder=TransformerSize(64, 2, 2), decoder=TransformerSize(64, 2, 2),
            visual_codebook_size=256, prologue_codebook_size=64, num_prologue_tokens=8,
            rope_axes=[10, 10, 12],
        ),
        "tiny-2d": TokenizerConfig(
            variant="2d", image_size=32, patch_size=4, channels=1,
            encoder=TransformerSize(64, 2, 2), decoder=TransformerSize(64, 2, 2),
            visual_codebook_size=256, prologue_codebook_size=0, num_prologue_tokens=0,
            rope_axes=[10, 10, 12],
        ),
        "tiny-post": TokenizerConfig(
            variant="post", image_size=32, patch_size=4, channels=1,
            encoder=TransformerSize(64, 2, 2), decoder=TransformerSize(64, 2, 2),
            prologue_encoder=TransformerSize(64, 2, 2),
            visual_codebook_size=256, prologue_codebook_size=64, num_prologue_tokens=8,
            rope_axes=[10, 10, 12],
        ),
    }


def _ar_presets() -> typing.Dict[str, ARConfig]:
    return {
        "joint-small": ARConfig(dim=512, layers=7, heads=8),  # phase-1 joint AR
        "base": ARConfig(dim=768, layers=12, heads=12),
        "large": ARConfig(dim=1024, layers=24, heads=16),
        "xlarge": ARConfig(dim=1280, layers=32, heads=20),
        "tiny": ARConfig(dim=64, layers=2, heads=2, rope_axes=[12, 10, 10]),
    }


TOKENIZER_PRESETS = tuple(_tokenizer_presets())
AR_PRESETS = tuple(_ar_presets())

# Released model pairs (hub folder names without the `ar-` prefix) -> (tokenizer, AR).
MODEL_PRESETS: typing.Dict[str, typing.Tuple[str, str]] = {
    "prologue-b-b": ("prologue-b", "base"),
    "prologue-b-l": ("prologue-b", "large"),
    "prologue-b-xl": ("prologue-b", "xlarge"),
    "prologue-l-b": ("prologue-l", "base"),
    "prologue-l-l": ("prologue-l", "large"),
    "prologue-l-xl": ("prologue-l", "xlarge"),
    "prologue-post-b": ("post", "base"),
    "2d-base": ("2d", "base"),
    "tiny": ("tiny", "tiny"),
    "tiny-2d": ("tiny-2d", "tiny"),
    "tiny-post": ("tiny-post", "tiny"),
}


def tokenizer_preset(name: str) -> TokenizerConfig:
    presets = _tokenizer_presets()
    if name not in presets:
        raise ConfigError(f"unknown tokenizer preset {name!r}; known: {', '.join(presets)}")
    return presets[name]


def ar_preset(name: str) -> ARConfig:
    presets = _ar_presets()
    if name not in presets:
        raise ConfigError(f"unknown AR preset {name!r}; known: {', '.join(presets)}")
    return presets[name]


def model_preset(name: str, num_classes: typing.Optional[int] = None) -> ModelConfig:
    """A named model (see MODEL_PRESETS) or `TOKENIZER+AR` (e.g. `prologue-b+joint-small`).

    `num_classes` defaults to 1000 (ImageNet) for released shapes and 10 for `tiny*`.
    """
    if "+" in name:
        tok_name, ar_name = name.split("+", 1)
    elif name in MODEL_PRESETS:
        tok_name, ar_name = MODEL_PRESETS[name]
    else:
        raise ConfigError(
            f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)} "
            f"or TOKENIZER+AR with tokenizer in ({', '.join(TOKENIZER_PRESETS)}) and AR in "
            f"({', '.join(AR_PRESETS)})"
        )
    if num_classes is None:
        num_classes = 10 if tok_name.startswith("tiny") else 1000
    return ModelConfig(
        num_classes=num_classes, tokenizer=tokenizer_preset(tok_name), ar=ar_preset(ar_name)
    ).validate()
