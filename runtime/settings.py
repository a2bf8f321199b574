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

from .errors import PrologueError, short_repr

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


@dataclass(frozen=True)
class SamplingOption:
    """One sampling setting, a field of `SamplingConfig`: its range, the release's name for it, and
    whether users set it directly. This table (`SAMPLING_OPTIONS`) is the one owner of those facts:
    `SamplingConfig.validate`, the command-line flags of every command that samples (`prologue
    generate`, `variations`, `eval gfid`), `prologue serve`'s request fields, its `/v1/info` and the
    page's form all come from it. The defaults are `SamplingConfig`'s (a bundle carries its own).

    kind: `scale` (CFG scales, schedule starts and powers: a finite number in [0, MAX_CFG_VALUE]),
    `temperature` ([MIN_TEMPERATURE, MAX_TEMPERATURE]: the graph divides by it in float32),
    `schedule` (one of CFG_SCHEDULES), `top_k` (an integer, 0 = off), `top_p` (in [0, 1], 0 or 1 = off).
    direct: a command-line flag (`--top-k`), a field of a server request and of the page; the others
    are reached through `--sampling` / the request's `sampling` object. optional: None is allowed (the
    setting then falls back to another one, see `SamplingConfig`)."""

    name: str
    kind: str
    official: str  # the release's option name (eval.sh, sample_vis.py)
    help: str
    direct: bool = False
    optional: bool = False
    label: str = ""  # the page's short label (direct options)
    step: float = 0.0  # the page's input step (direct options)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def type(self) -> type:
        return {"top_k": int, "schedule": str}.get(self.kind, float)

    @property
    def bounds(self) -> typing.Tuple[typing.Optional[float], typing.Optional[float]]:
        """(lowest, highest) allowed value of a number; (None, None) for a schedule."""
        return {"scale": (0, MAX_CFG_VALUE), "temperature": (MIN_TEMPERATURE, MAX_TEMPERATURE), "top_k": (0, MAX_TOP_K),
                "top_p": (0.0, 1.0)}.get(self.kind, (None, None))

    def check(self, value, what: typing.Optional[str] = None) -> None:
        """A ConfigError (`what` = "sampling.NAME" unless given) when `value` is not allowed."""
        what = f"sampling.{self.name}" if what is None else what
        if value is None and self.optional:
            return
        low, high = self.bounds
        if self.kind == "schedule":
            if not isinstance(value, str) or value not in CFG_SCHEDULES:
                raise ConfigError(f"{what}: " * bool(what) + f"{short_repr(value, 60)} is not one of "
                                  f"{', '.join(CFG_SCHEDULES)}")
        elif self.kind == "scale":
            if not (_is_number(value) and low <= value <= high):
                raise ConfigError(f"{what} must be a finite number >= 0 and <= {high:g}, got {short_repr(value, 60)}")
        elif self.kind == "temperature":
            if not (_is_number(value) and low <= value <= high):
                raise ConfigError(f"{what} must be a finite number > 0, in [{low:g}, {high:g}] (the graph divides by "
                                  f"it in float32), got {short_repr(value, 60)}")
        elif self.kind == "top_k":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
                raise ConfigError(f"{what} must be an integer >= 0 (0 = off) and <= {high}, got {short_repr(value, 60)}")
        else:
            self._check_top_p(value, what)

    @staticmethod
    def _check_top_p(value, what: str) -> None:
        if not (_is_number(value) and 0.0 <= value <= 1.0):  # NaN fails too
            raise ConfigError(f"{what} must be in [0, 1] (0 or 1 = off), got {short_repr(value, 60)}")
        if bool(top_p_active(value)) != bool(top_p_active(float(np.float32(value)))):
            raise ConfigError(f"{what} {value!r} is {float(np.float32(value))!r} in float32, which turns top-p off; "
                              "use 0 (off) or a value in [1e-6, 0.9999999]")

    def parse(self, text: str, what: typing.Optional[str] = None):
        """A command-line value: the text as this option's type, checked (ValueError / ConfigError)."""
        if self.type is int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"invalid integer: {text!r}") from None
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"invalid number: {text!r}") from None
        else:
            value = text
        self.check(value, what)
        return value

    def to_json(self, default=None) -> dict:
        """What `/v1/info` tells a client (the page builds its form from it)."""
        low, high = self.bounds
        return {"name": self.name, "type": self.type.__name__, "min": low, "max": high, "optional": self.optional,
                "label": self.label or self.name, "step": self.step or None, "help": self.help, "default": default}


SAMPLING_OPTIONS = (
    SamplingOption("cfg", "scale", "cfg", "CFG scale (0 = off; also the split scales' fallback)", direct=True,
                   label="CFG", step=0.1),
    SamplingOption("cfg_schedule", "schedule", "cfg_schedule", "whole-sequence CFG schedule"),
    SamplingOption("cfg_power", "scale", "cfg_power", "power of the cosine schedule"),
    SamplingOption("prologue_cfg_schedule", "schedule", "semantic_cfg_schedule",
                   "split CFG: the prologue segment's schedule", optional=True),
    SamplingOption("prologue_cfg_scale", "scale", "semantic_cfg_scale", "split CFG: the prologue's scale (default: "
                   "cfg)", optional=True),
    SamplingOption("prologue_cfg_start", "scale", "semantic_cfg_start", "split CFG: the prologue schedule's start"),
    SamplingOption("prologue_cfg_power", "scale", "semantic_cfg_power", "split CFG: the prologue's cosine power "
                   "(default: cfg_power)", optional=True),
    SamplingOption("visual_cfg_schedule", "schedule", "visual_cfg_schedule", "split CFG: the visual segment's schedule",
                   optional=True),
    SamplingOption("visual_cfg_scale", "scale", "visual_cfg_scale", "split CFG: the visual scale (default: cfg)",
                   optional=True),
    SamplingOption("visual_cfg_start", "scale", "visual_cfg_start", "split CFG: the visual schedule's start"),
    SamplingOption("visual_cfg_power", "scale", "visual_cfg_power", "split CFG: the visual cosine power (default: "
                   "cfg_power)", optional=True),
    SamplingOption("temperature", "temperature", "temperature", "sampling temperature", direct=True, label="Temperature",
                   step=0.05),
    SamplingOption("prologue_temperature", "temperature", "semantic_temperature", "temperature of the prologue tokens "
                   "(default: the temperature)", direct=True, optional=True, label="Prologue temp.", step=0.05),
    SamplingOption("top_k", "top_k", "topK", "keep the k most likely tokens (0 = off)", direct=True, label="Top-k", step=1),
    SamplingOption("top_p", "top_p", "topP", "keep the most likely tokens of probability mass p (0 or 1 = off)",
                   direct=True, label="Top-p", step=0.01),
)
OPTIONS_BY_NAME = {o.name: o for o in SAMPLING_OPTIONS}
DIRECT_OPTIONS = tuple(o for o in SAMPLING_OPTIONS if o.direct)
OFFICIAL_NAMES = {o.official: o.name for o in SAMPLING_OPTIONS}  # the release's option name -> ours


@dataclass
class SamplingConfig:
    """Sampling settings of the AR model (names mirror the release: `OFFICIAL_NAMES`; the ranges
    and which settings users set directly: `SAMPLING_OPTIONS`).

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

    def temperature_at(self, step: int, vocab: "VocabLayout") -> float:
        """The prologue temperature (when set) at prologue steps, else `temperature`."""
        if step < vocab.num_prologue_tokens and self.prologue_temperature is not None:
            return self.prologue_temperature
        return self.temperature

    @property
    def segmented(self) -> bool:
        return self.prologue_cfg_schedule is not None or self.visual_cfg_schedule is not None

    def validate(self) -> "SamplingConfig":
        """Every value in the type and range `SAMPLING_OPTIONS` gives it (the ar_step graph takes the
        CFG scale, temperature and top-p as float32 and top-k as int64)."""
        for option in SAMPLING_OPTIONS:
            option.check(getattr(self, option.name))
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingConfig":
        return build_dataclass(cls, data, "sampling").validate()

    @classmethod
    def coerce(cls, settings) -> "SamplingConfig":
        """A SamplingConfig, a dict of our field names, or a dict of official option names."""
        return cls().updated(settings)

    def updated(self, sampling=None, **overrides) -> "SamplingConfig":
        """These settings with `sampling` (a SamplingConfig, or a dict of our or the release's
        option names) and then keyword `overrides` (our names) on top: one parse, one validation."""
        changes = sampling_changes(sampling, **overrides)
        if not changes:
            return self.validate()
        return build_dataclass(type(self), {**vars(self), **changes}, "sampling").validate()


def sampling_changes(sampling=None, **overrides) -> dict:
    """`sampling` (None, a SamplingConfig, or a dict of our or the release's option names), then the
    keyword `overrides` (our names) on top, as one dict of our field names (checked when applied)."""
    changes = {}
    if isinstance(sampling, SamplingConfig):
        changes.update(vars(sampling))
    elif isinstance(sampling, dict):
        changes.update(sampling if set(sampling) <= set(OPTIONS_BY_NAME) else _official_to_ours(sampling))
    elif sampling is not None:
        raise ConfigError(f"sampling settings must be a SamplingConfig or a dict, got {type(sampling).__name__}")
    changes.update(overrides)
    return changes


def _is_number(value) -> bool:
    """A real, finite number that is not a bool (True is an int in Python, not a setting)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _official_to_ours(options: dict) -> dict:
    ours = {}
    for key, value in options.items():
        if key not in OFFICIAL_NAMES:
            raise ConfigError(f"sampling option {short_repr(key, 60)} is not an official sampling option; known: "
                              f"{', '.join(OFFICIAL_NAMES)}")
        ours[OFFICIAL_NAMES[key]] = value
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
        return build_dataclass(tp, value, path)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {short_repr(value, 60)}")
        return value
    if tp is int:  # numpy integers too; never a bool (True is an int in Python)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}: expected an integer, got {short_repr(value, 60)}")
        return int(value)
    if tp is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}: expected a number, got {short_repr(value, 60)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            raise ConfigError(f"{path}: {short_repr(value, 60)} is too large") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {short_repr(value, 60)}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - config schema bug
