"""The one table of sampling options (`runtime/settings.py` `SAMPLING_OPTIONS`) and everything made
from it: `SamplingConfig`'s fields and validation, the release's option names, the command-line
flags of every command that samples, `prologue serve`'s request fields and `/v1/info`. Torch-free."""

import argparse
import dataclasses
import math

import numpy as np
import pytest

from prologue_export.runtime.settings import (DIRECT_OPTIONS, OFFICIAL_NAMES, SAMPLING_OPTIONS, ConfigError,
                                              SamplingConfig)

SAMPLING_COMMANDS = (("generate",), ("variations",), ("eval", "gfid"))


def test_the_table_is_the_config():
    assert [o.name for o in SAMPLING_OPTIONS] == [f.name for f in dataclasses.fields(SamplingConfig)]
    hints = {f.name: f.type for f in dataclasses.fields(SamplingConfig)}
    for option in SAMPLING_OPTIONS:
        assert option.optional == ("Optional" in str(hints[option.name])), option.name
        assert option.help, option.name
        if option.direct:
            assert option.label and option.step > 0 and option.type in (int, float), option.name
    assert OFFICIAL_NAMES["semantic_temperature"] == "prologue_temperature" and OFFICIAL_NAMES["topK"] == "top_k"
    assert len(OFFICIAL_NAMES) == len(SAMPLING_OPTIONS)


def _bad_values(option):
    if option.kind == "schedule":
        return ["exp", 3, ""]
    low, high = option.bounds
    bad = [True, "1", math.nan, math.inf, low - 1, high * 2 + 1]
    if option.kind == "top_k":
        bad.append(2.0)
    if option.kind == "top_p":
        bad.append(1 - 1e-9)  # 1.0 in float32: would turn top-p off silently
    return bad


@pytest.mark.parametrize("option", SAMPLING_OPTIONS, ids=lambda o: o.name)
def test_validate_is_the_table_check(option):
    """A bad value is refused by SamplingConfig (naming `sampling.NAME`) exactly when the table
    refuses it; defaults and the bounds themselves pass."""
    SamplingConfig().validate()
    for value in _bad_values(option):
        with pytest.raises(ConfigError, match=f"sampling.{option.name}"):
            option.check(value)
        with pytest.raises(ConfigError, match=f"sampling.{option.name}"):
            SamplingConfig().updated({option.name: value})
    if option.kind != "schedule":
        for value in option.bounds:
            value = int(value) if option.type is int else value
            assert getattr(SamplingConfig().updated({option.name: value}), option.name) == value
    if option.optional:
        option.check(None)


def _parser():
    from prologue_export.cli import build_parser

    return build_parser()


def _subparser(parser: argparse.ArgumentParser, path):
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", SAMPLING_COMMANDS, ids=" ".join)
def test_every_sampling_command_has_the_direct_options_as_flags(path):
    sub = _subparser(_parser(), path)
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {o.flag for o in DIRECT_OPTIONS} | {"--sampling"} <= flags
    dests = {a.dest for a in sub._actions}
    assert {o.name for o in DIRECT_OPTIONS} <= dests


@pytest.mark.parametrize("option", DIRECT_OPTIONS, ids=lambda o: o.name)
def test_flag_values_are_checked_by_the_table(option, capsys):
    """The CLI refuses (argparse usage error, exit 2) exactly the values the table refuses."""
    from prologue_export.cli.sampling_args import option_type

    parse = option_type(option)
    low, high = option.bounds
    for good in (low, high):
        text = str(int(good)) if option.type is int else repr(float(good))
        assert parse(text) == option.type(text)
    for bad in ("nan", "inf", str(low - 1), "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    sub = ["generate", "--bundle", "b", "--class", "1", "--out", "o.png", option.flag, "nan"]
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(sub)
    assert exit_info.value.code == 2 and option.flag in capsys.readouterr().err


def test_sampling_request_merges_json_and_flags():
    from prologue_export.cli.sampling_args import sampling_arguments, sampling_request

    args = _subparser(_parser(), ("eval", "gfid")).parse_args(
        ["--bundle", "b", "--sampling", '{"topK": 3, "semantic_cfg_scale": 0.5}', "--top-k", "5", "--cfg", "1.5"])
    assert sampling_arguments(args) == ({"topK": 3, "semantic_cfg_scale": 0.5}, {"cfg": 1.5, "top_k": 5})
    assert sampling_request(args) == {"top_k": 5, "prologue_cfg_scale": 0.5, "cfg": 1.5}  # the flag wins
    s = SamplingConfig().updated(sampling_request(args))
    assert (s.top_k, s.prologue_cfg_scale, s.cfg) == (5, 0.5, 1.5)


def test_server_fields_and_info_come_from_the_table(runtime_fixture_root):
    from prologue_export.runtime import Generator
    from prologue_export.serve.app import OVERRIDES, Service

    assert OVERRIDES == tuple(o.name for o in DIRECT_OPTIONS)
    gen = Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu")
    service = Service(gen)
    try:
        info = service.info()
        assert [o["name"] for o in info["options"]] == list(OVERRIDES)
        defaults = gen.bundle.sampling_defaults
        for entry, option in zip(info["options"], DIRECT_OPTIONS):
            assert entry["default"] == getattr(defaults, option.name)
            assert (entry["min"], entry["max"]) == option.bounds and entry["type"] == option.type.__name__
        body = {"class_ids": [1], **{o.name: o.bounds[1] for o in DIRECT_OPTIONS if o.type is float}}
        body["top_k"] = 3
        job, _ = service.generate_job(body)
        assert job.settings.top_k == 3 and job.settings.cfg == DIRECT_OPTIONS[0].bounds[1]
        with pytest.raises(ValueError, match="sampling.top_p"):  # the Generator's InputError
            service.generate_job({"class_ids": [1], "top_p": 2.0})
    finally:
        service.close()


def test_the_page_builds_its_form_from_info():
    from prologue_export.serve.page import PAGE

    assert "info.options" in PAGE and "buildOptions" in PAGE
    for option in DIRECT_OPTIONS:  # no field is written into the page by hand
        assert f'id="{option.name}"' not in PAGE


def test_limits_have_one_owner():
    from prologue_export.cli import checks
    from prologue_export.runtime import loop
    from prologue_export.serve.app import ServeOptions

    assert checks.MAX_SEED is loop.MAX_SEED and checks.MAX_IMAGES_PER_CALL is loop.MAX_IMAGES_PER_CALL
    assert checks.image_count(str(loop.MAX_IMAGES_PER_CALL)) == loop.MAX_IMAGES_PER_CALL
    with pytest.raises(argparse.ArgumentTypeError):
        checks.image_count(str(loop.MAX_IMAGES_PER_CALL + 1))
    ServeOptions(max_images=loop.MAX_IMAGES_PER_CALL).validate()
    with pytest.raises(ValueError):
        ServeOptions(max_images=loop.MAX_IMAGES_PER_CALL + 1).validate()


def test_generate_over_the_runtime_limit_is_refused_before_the_bundle_loads(tmp_path, capsys):
    """`--n` x classes above the runtime's per-call limit: one line, exit 2, no bundle read
    (it was 4096 in the CLI and 1024 in the runtime: the CLI passed, loaded the bundle, then failed)."""
    from prologue_export.cli import main
    from prologue_export.runtime.loop import MAX_IMAGES_PER_CALL

    rc = main(["generate", "--bundle", str(tmp_path / "missing"), "--class", "1", "2", "--n",
               str(MAX_IMAGES_PER_CALL // 2 + 1), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and f"more than {MAX_IMAGES_PER_CALL} images" in err and "missing" not in err
    assert np.all([not p.exists() for p in (tmp_path / "o.png",)])
