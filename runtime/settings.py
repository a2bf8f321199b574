"""Settings shared by the model package and the runtime: the AR vocabulary layout, sampling
settings with their CFG schedules and the top-k rule, and the strict dict -> dataclass parser.

Torch-free; the model side imports these so that one definition of each fact serves both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass

import numpy as np

from .errors import PrologueError

CFG_SCHEDULES = ("constant", "linear", "cosine")
# Bounds of the sampling settings (`SamplingConfig.validate`): the ar_step graph computes in float32,
# where 1e-46 is 0 and 1e300 is inf; these keep `mixed / temperature` finite for any sane logits.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
MAX_CFG_VALUE = 1e4  # CFG scales, schedule starts and powers: finite, in [0, MAX_CFG_VALUE]
MAX_TOP_K = 2**31 - 1  # an int64 graph input; check_top_k bounds it by the vocabulary where the bundle is known


class ConfigError(PrologueError, ValueError):
    """A config that is malformed: unknown, missing or ill-typed key, or inconsistent sizes."""


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
    whole-sequence schedule `cfg_schedule` with scale `cfg` applies. In split mode a segment
    whose schedule is unset is `constant` (the release's `semantic_cfg_schedule or 'constant'`,
    `models.py:1068, 1074`; `cfg_schedule` is never consulted there); scales of a segment that
    are unset fall back to `cfg`; its power falls back to `cfg_power`.
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

    def temperature_at(self, step: int, vocab: "VocabLayout") -> float:
        """The prologue temperature (when set) at prologue steps, else `temperature`."""
        if step < vocab.num_prologue_tokens and self.prologue_temperature is not None:
            return self.prologue_temperature
        return self.temperature

    @property
    def segmented(self) -> bool:
        return self.prologue_cfg_schedule is not None or self.visual_cfg_schedule is not None

    def validate(self) -> "SamplingConfig":
        """Every value in the type and range it is used in: the ar_step graph takes the CFG scale,
        temperature and top-p as float32 and top-k as int64 (see the bounds above the class)."""
        for name in ("cfg_schedule", "prologue_cfg_schedule", "visual_cfg_schedule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value not in CFG_SCHEDULES):
                raise ConfigError(f"sampling.{name}: {_short(value)} is not one of {', '.join(CFG_SCHEDULES)}")
        for name in ("cfg", "prologue_cfg_scale", "visual_cfg_scale", "prologue_cfg_start", "visual_cfg_start",
                     "cfg_power", "prologue_cfg_power", "visual_cfg_power"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value <= MAX_CFG_VALUE):
                raise ConfigError(f"sampling.{name} must be a finite number >= 0 and <= {MAX_CFG_VALUE:g}, "
                                  f"got {_short(value)}")
        for name in ("temperature", "prologue_temperature"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
                raise ConfigError(f"sampling.{name} must be a finite number > 0, in [{MIN_TEMPERATURE:g}, "
                                  f"{MAX_TEMPERATURE:g}] (the graph divides by it in float32), got {_short(value)}")
        top_k = self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= MAX_TOP_K:
            raise ConfigError(f"sampling.top_k must be an integer >= 0 (0 = off) and <= {MAX_TOP_K}, got {_short(top_k)}")
        if not (_is_number(self.top_p) and 0.0 <= self.top_p <= 1.0):  # NaN fails too
            raise ConfigError(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {_short(self.top_p)}")
        if bool(top_p_active(self.top_p)) != bool(top_p_active(float(np.float32(self.top_p)))):
            raise ConfigError(f"sampling.top_p {self.top_p!r} is {float(np.float32(self.top_p))!r} in float32, which "
                              "turns top-p off; use 0 (off) or a value in [1e-6, 0.9999999]")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingConfig":
        return _build(cls, data, "sampling").validate()

    @classmethod
    def from_official(cls, options: dict) -> "SamplingConfig":
        """Settings in the release's option names (`eval.sh`, `sample_vis.py`)."""
        return cls().updated(_official_to_ours(options))

    @classmethod
    def coerce(cls, settings) -> "SamplingConfig":
        """A SamplingConfig, a dict of our field names, or a dict of official option names."""
        return cls().updated(settings)

    def updated(self, sampling=None, **overrides) -> "SamplingConfig":
        """These settings with `sampling` (a SamplingConfig, or a dict of our or the release's
        option names) and then keyword `overrides` (our names) on top: one parse, one validation."""
        changes = {}
        if isinstance(sampling, SamplingConfig):
            changes.update(vars(sampling))
        elif isinstance(sampling, dict):
            ours = {f.name for f in dataclasses.fields(SamplingConfig)}
            changes.update(sampling if set(sampling) <= ours else _official_to_ours(sampling))
        elif sampling is not None:
            raise ConfigError(f"sampling settings must be a SamplingConfig or a dict, got {type(sampling).__name__}")
        changes.update(overrides)
        if not changes:
            return self.validate()
        return _build(type(self), {**vars(self), **changes}, "sampling").validate()


def _is_number(value) -> bool:
    """A real, finite number that is not a bool (True is an int in Python, not a setting)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _official_to_ours(options: dict) -> dict:
    ours = {}
    for key, value in options.items():
        if key not in SamplingConfig.OFFICIAL_NAMES:
            raise ConfigError(f"sampling option {_short(key)} is not an official sampling option; known: "
                              f"{', '.join(SamplingConfig.OFFICIAL_NAMES)}")
        ours[SamplingConfig.OFFICIAL_NAMES[key]] = value
    if "top_k" in ours and isinstance(ours["top_k"], float) and ours["top_k"].is_integer():
        ours["top_k"] = int(ours["top_k"])  # the release's config stores topK as 0.0
    return ours


# ---------------------------------------------------------------------------------------------
# top-k / top-p: when they truncate (Python numbers and torch tensors alike)


def top_k_active(top_k, vocab_size: int):
    """top-k truncates for 0 < k < V (0 = off; k >= V keeps every token)."""
    return (top_k > 0) & (top_k < vocab_size)


def top_p_active(top_p):
    """top-p truncates for 0 < p < 1 (0 or 1 = off)."""
    return (top_p > 0) & (top_p < 1)


def max_top_k(vocab: "VocabLayout") -> int:
    """The largest top-k that can hold at every step: the smallest segment's codebook (the segment
    mask leaves no more candidates than that). The ar_step graph's TopK keeps this many."""
    segments = [vocab.visual_codebook_size] + ([vocab.prologue_codebook_size] if vocab.has_prologue else [])
    return min(segments)


def check_top_k(top_k: int, vocab: "VocabLayout", engine_limit: typing.Optional[int] = None) -> None:
    """A top-k larger than the smallest segment's codebook cannot hold: the segment mask leaves
    fewer candidates than k at that segment's steps. `engine_limit`: the TensorRT engines' TopK
    bound (TensorRT's TopK takes K < 3840), which the tensorrt backend passes."""
    limit = max_top_k(vocab)
    if top_k > limit:
        raise ConfigError(f"top_k {top_k} is larger than the smallest segment's vocabulary ({limit} codes); "
                          f"use at most {limit} or 0 (off)")
    if engine_limit is not None and top_k > engine_limit:
        raise ConfigError(f"top_k {top_k} is more than this bundle's TensorRT engines can keep ({engine_limit}: "
                          f"TensorRT's TopK takes K < 3840); use at most {engine_limit}, 0 (off), or the ONNX Runtime "
                          "backend")


# ---------------------------------------------------------------------------------------------
# CFG schedules


def cfg_scale_at(step: int, settings: "SamplingConfig", vocab: "VocabLayout") -> float:
    """The CFG scale applied at sampling step `step` (0-based)."""
    T, Z = vocab.seq_len, vocab.num_prologue_tokens
    if settings.segmented:
        if step < Z:
            schedule = settings.prologue_cfg_schedule or "constant"  # release models.py:1068
            scale = _or(settings.prologue_cfg_scale, settings.cfg)
            start, power = settings.prologue_cfg_start, _or(settings.prologue_cfg_power, settings.cfg_power)
            t = step / Z
        else:
            schedule = settings.visual_cfg_schedule or "constant"  # release models.py:1074
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


def cfg_enabled(settings: "SamplingConfig") -> bool:
    if settings.segmented:
        return _or(settings.prologue_cfg_scale, settings.cfg) > 0 or _or(settings.visual_cfg_scale, settings.cfg) > 0
    return settings.cfg > 0


def _or(value, fallback):
    return fallback if value is None else value


# ---------------------------------------------------------------------------------------------
# strict dict -> dataclass


def build_dataclass(cls, data, path: str):
    """A dataclass from a dict, strictly: unknown, missing or ill-typed keys raise ConfigError naming them."""
    return _build(cls, data, path)


def _build(cls, data, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - set(fields)))
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
            raise ConfigError(f"{path}: expected true/false, got {_short(value)}")
        return value
    if tp is int:  # numpy integers too; never a bool (True is an int in Python)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}: expected a number, got {_short(value)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            raise ConfigError(f"{path}: {_short(value)} is too large") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - config schema bug
