"""The sampling flags of every command that samples (`generate`, `variations`, `eval gfid`), made
from the runtime's one table of sampling options (`runtime/settings.py` `SAMPLING_OPTIONS`): one
flag per direct option (`--cfg`, `--temperature`, `--prologue-temperature`, `--top-k`, `--top-p`),
its range checked by the table's own check, plus `--sampling JSON` for the rest. Torch-free."""

from __future__ import annotations

import argparse
import typing

from ..runtime.settings import DIRECT_OPTIONS, ConfigError, SamplingOption, sampling_changes
from .checks import json_argument


def option_type(option: SamplingOption) -> typing.Callable[[str], typing.Any]:
    """An argparse `type=` for one option: a bad value is argparse's usage error (exit code 2)
    with the table's message."""

    def parse(text: str):
        try:
            return option.parse(text, what="")
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None

    parse.__name__ = option.type.__name__
    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The direct options' flags and `--sampling`, in a group of the help that says where unset
    settings come from (`defaults`)."""
    group = parser.add_argument_group("sampling", f"settings left unset come from {defaults}")
    for option in DIRECT_OPTIONS:
        group.add_argument(option.flag, dest=option.name, type=option_type(option), metavar=option.type.__name__.upper(),
                           help=option.help)
    group.add_argument("--sampling", metavar="JSON", help="more settings as a JSON object, our or the release's "
                       "option names (split CFG schedules, ...; docs/runtime.md)")


def sampling_arguments(args) -> typing.Tuple[typing.Optional[dict], dict]:
    """(the parsed `--sampling` object or None, the direct options given as flags)."""
    sampling = json_argument(getattr(args, "sampling", None), "--sampling")
    overrides = {o.name: getattr(args, o.name) for o in DIRECT_OPTIONS if getattr(args, o.name, None) is not None}
    return sampling, overrides


def sampling_request(args) -> dict:
    """`--sampling` with the flags on top, as one dict of our option names (checked when applied)."""
    sampling, overrides = sampling_arguments(args)
    return sampling_changes(sampling, **overrides)
