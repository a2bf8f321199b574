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
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction

CONFIG_FORMAT_VERSION = 1

TOKENIZER_VARIANTS = ("prologue", "2d", "post")
CFG_SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A config that is malformed: unknown, missing or ill-typed key, or inconsistent sizes."""


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
    prologue_temperature: float = 0.1  # straight-through softmax temperature (training only)
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
        if self.variant not in TOKENIZER_VARIANTS:
            raise ConfigError(
                f"tokenizer.variant: {self.variant!r} is not one of {', '.join(TOKENIZER_VARIANTS)}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"tokenizer.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
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

    def validate(self) -> None:
        _validate_stack("ar", TransformerSize(self.dim, self.layers, self.heads), self.rope_axes)
        _validate_ratio("ar.mlp_ratio", self.mlp_ratio)
        for name in ("dropout", "emb_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ar.{name} must be in [0, 1), got {getattr(self, name)}")


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
        if self.format_version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is not supported (this package reads "
                f"version {CONFIG_FORMAT_VERSION})"
            )
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
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
        return _build(cls, data, "config").validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class VocabLayout:
    """AR vocabulary: visual codes, then prologue codes at an offset, then EOS.

    Baselines without a prologue (`2d`) have neither prologue codes nor EOS.
    """

    visual_codebook_size: int  # K_v
    prologue_codebook_size: int  # K_p (0 without a prologue)
    num_prologue_tokens: int  # Z (0 without a prologue)
    num_visual_tokens: int  # X

    @property
    def has_prologue(self) -> bool:
        return self.num_prologue_tokens > 0

    @property
    def prologue_offset(self) -> int:
        return self.visual_codebook_size

    @property
    def eos_id(self) -> typing.Optional[int]:
        return self.visual_codebook_size + self.prologue_codebook_size if self.has_prologue else None

    @property
    def vocab_size(self) -> int:  # V
        return self.visual_codebook_size + (self.prologue_codebook_size + 1 if self.has_prologue else 0)

    @property
    def seq_len(self) -> int:  # T: [prologue (Z) ; EOS ; visual (X)]
        return self.num_prologue_tokens + (1 if self.has_prologue else 0) + self.num_visual_tokens

    @property
    def visual_start(self) -> int:  # index of the first visual token in the AR sequence
        return self.seq_len - self.num_visual_tokens


@dataclass
class SamplingConfig:
    """Sampling settings of the AR model (names mirror the release; see `from_official`).

    Split ("segmented") CFG is on when `prologue_cfg_schedule` or `visual_cfg_schedule` is set:
    prologue steps use the prologue schedule, EOS and visual steps the visual one. Otherwise the
    whole-sequence schedule `cfg_schedule` with scale `cfg` applies. Scales of a segment that are
    unset fall back to `cfg`; its power falls back to `cfg_power`.
    """

    cfg: float = 2.0
    cfg_schedule: str = "constant"
    cfg_power: float = 1.0
    prologue_cfg_schedule: typing.Optional[str] = None
    prologue_cfg_scale: typing.Optional[float] = None
    prologue_cfg_start: float = 0.0
    prologue_cfg_power: typing.Optional[float] = None
    visual_cfg_schedule: typing.Optional[str] = None
    visual_cfg_scale: typing.Optional[float] = None
    visual_cfg_start: float = 1.0
    visual_cfg_power: typing.Optional[float] = None
    temperature: float = 1.0
    prologue_temperature: typing.Optional[float] = None
    top_k: int = 0
    top_p: float = 0.0

    # official option name -> our field name
    OFFICIAL_NAMES: typing.ClassVar[typing.Dict[str, str]] = {
        "cfg": "cfg",
        "cfg_schedule": "cfg_schedule",
        "cfg_power": "cfg_power",
        "semantic_cfg_schedule": "prologue_cfg_schedule",
        "semantic_cfg_scale": "prologue_cfg_scale",
        "semantic_cfg_start": "prologue_cfg_start",
        "semantic_cfg_power": "prologue_cfg_power",
        "visual_cfg_schedule": "visual_cfg_schedule",
        "visual_cfg_scale": "visual_cfg_scale",
        "visual_cfg_start": "visual_cfg_start",
        "visual_cfg_power": "visual_cfg_power",
        "temperature": "temperature",
        "semantic_temperature": "prologue_temperature",
        "topK": "top_k",
        "topP": "top_p",
    }

    @property
    def segmented(self) -> bool:
        return self.prologue_cfg_schedule is not None or self.visual_cfg_schedule is not None

    def validate(self) -> "SamplingConfig":
        for name in ("cfg_schedule", "prologue_cfg_schedule", "visual_cfg_schedule"):
            value = getattr(self, name)
            if value is not None and value not in CFG_SCHEDULES:
                raise ConfigError(f"sampling.{name}: {value!r} is not one of {', '.join(CFG_SCHEDULES)}")
        for name in ("temperature", "prologue_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"sampling.{name} must be > 0, got {value}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingConfig":
        return _build(cls, data, "sampling").validate()

    @classmethod
    def from_official(cls, options: dict) -> "SamplingConfig":
        """Settings in the release's option names (`eval.sh`, `sample_vis.py`)."""
        ours = {}
        for key, value in options.items():
            if key not in cls.OFFICIAL_NAMES:
                raise ConfigError(
                    f"sampling option {key!r} is not an official sampling option; known: "
                    f"{', '.join(cls.OFFICIAL_NAMES)}"
                )
            ours[cls.OFFICIAL_NAMES[key]] = value
        if "top_k" in ours and isinstance(ours["top_k"], float) and ours["top_k"].is_integer():
            ours["top_k"] = int(ours["top_k"])  # the release's config stores topK as 0.0
        return cls.from_dict(ours)

    @classmethod
    def coerce(cls, settings) -> "SamplingConfig":
        """A SamplingConfig, a dict of our field names, or a dict of official option names."""
        if settings is None:
            return cls().validate()
        if isinstance(settings, SamplingConfig):
            return settings.validate()
        if isinstance(settings, dict):
            ours = {f.name for f in dataclasses.fields(cls)}
            if set(settings) <= ours:
                return cls.from_dict(settings)
            return cls.from_official(settings)
        raise ConfigError(f"sampling settings must be a SamplingConfig or a dict, got {type(settings).__name__}")


# ---------------------------------------------------------------------------------------------
# strict dict -> dataclass


def _validate_stack(name: str, size: TransformerSize, rope_axes) -> None:
    for attr in ("dim", "layers", "heads"):
        if getattr(size, attr) < 1:
            raise ConfigError(f"{name}.{attr} must be >= 1, got {getattr(size, attr)}")
    if size.dim % size.heads:
        raise ConfigError(f"{name}.dim {size.dim} is not divisible by heads {size.heads}")
    if len(rope_axes) != 3 or any(a < 0 or a % 2 for a in rope_axes):
        raise ConfigError(f"rope_axes must be three even sizes, got {list(rope_axes)}")
    if sum(rope_axes) != size.head_dim:
        raise ConfigError(
            f"{name}: rope_axes {list(rope_axes)} sum to {sum(rope_axes)}, but the head dim is "
            f"{size.head_dim} (dim {size.dim} / heads {size.heads})"
        )


def _validate_ratio(name: str, ratio: str) -> None:
    try:
        value = Fraction(ratio)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{name}: {ratio!r} is not a ratio like '8/3'") from None
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {ratio!r}")


def build_dataclass(cls, data, path: str):
    """A dataclass from a dict, strictly: unknown, missing or ill-typed keys raise ConfigError naming them."""
    return _build(cls, data, path)


def _build(cls, data, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name}: missing required key")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}")
    return cls(**kwargs)


def _convert(tp, value, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - config schema bug


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
