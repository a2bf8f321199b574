"""Hostile input to every `prologue` subcommand (issue 15): exit code 2, exactly one line on
stderr, no traceback, and nothing written.

Most cases fail on their arguments before any model is loaded, so they run against a fake
bundle (a folder with a manifest.json) and a fake checkpoint folder; the few that need a real
bundle or checkpoint build a tiny one once per module (torch).
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prologue_export.cli import build_parser, main


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def work(tmp_path):
    """A folder with every kind of input a case refers to; cases write (or must not write) in it."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "fakebundle").mkdir()
    (tmp_path / "fakebundle" / "manifest.json").write_text("{}")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "manifest.json").write_text("{not json")
    (tmp_path / "listjson").mkdir()
    (tmp_path / "listjson" / "manifest.json").write_text("[1, 2]")
    (tmp_path / "nanjson").mkdir()
    (tmp_path / "nanjson" / "manifest.json").write_text('{"max_batch": NaN}')
    (tmp_path / "fakeckpt").mkdir()
    (tmp_path / "fakeckpt" / "config.json").write_text("{}")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def run_both(argv, capsys):
    """(exit code, stdout, stderr) of `main(argv)` in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_cli(argv, capsys):
    """(exit code, stderr) of `main(argv)` in this process."""
    rc, _, err = run_both(argv, capsys)
    return rc, err


def assert_one_line_error(rc, err, expect=2):
    assert rc == expect, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n") and err.strip(), repr(err)


def _fill(args, paths: dict):
    return [str(a).format(**paths) for a in args]


def _paths(root: Path, **more) -> dict:
    return {"t": str(root), **{k: str(v) for k, v in more.items()}}


FB = ["--bundle", "{t}/fakebundle"]
GEN = ["generate", *FB, "--class", "1", "--out", "{t}/o.png"]
VAR = ["variations", *FB, "--image", "{t}/img.png", "--out", "{t}/o.png"]
REC = ["reconstruct", *FB, "--image", "{t}/img.png", "--out", "{t}/o.png"]
EXP = ["export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/b", "--no-verify"]
BE = ["build-engines", "{t}/fakebundle", "--print-trtexec"]
PRE = ["train", "pretokenize", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8", "--out", "{t}/tok"]
PROBE = ["eval", "probe", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8"]
RFID = ["eval", "rfid", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8", "--stats-dir", "{t}/st"]
GFID = ["eval", "gfid", *FB, "--data", "synthetic:8", "--stats-dir", "{t}/st"]
DEMO = ["demo", "--data", "synthetic:8", "--out", "{t}/demo", "--no-compile"]
XP = ["experiment", "small", "--data", "synthetic:8", "--out", "{t}/xp", "--no-compile"]
IMP = ["import-official", "--tokenizer", "{t}/adir", "--preset", "tiny", "--out", "{t}/imp"]
HUB = ["import-official", "--hub", "--preset", "prologue-b-b", "--out", "{t}/imp"]
SRV = ["serve", *FB]
TRI = ["triton", "{t}/fakebundle", "--out", "{t}/repo"]

CASES = {
    # family "json": JSON arguments that do not parse or are not an object
    "json": [
        (*GEN, "--sampling", "{{bad"), (*GEN, "--sampling", "[1,2]"), (*GEN, "--sampling", '{{"cfg": NaN}}'),
        (*GEN, "--sampling", '{{"cfg": Infinity}}'), (*GEN, "--sampling", '"cfg"'), (*GEN, "--sampling", ""),
        (*VAR, "--sampling", "{{bad"), (*VAR, "--sampling", "[1,2]"),
        (*EXP, "--sampling", "{{bad"), (*EXP, "--sampling", "[1,2]"), (*EXP, "--sampling", '{{"cfg": NaN}}'),
        (*GEN, "--sampling", "[" * 100 + "]" * 100),
    ],
    # family "int": counts that are zero, negative, too large or not numbers
    "int": [
        (*GEN, "--n", "0"), (*GEN, "--n", "-1"), (*GEN, "--n", "100000"), (*GEN, "--n", "two"),
        (*GEN, "--nrow", "0"), (*GEN, "--nrow", "-1"), (*GEN, "--seed", "-1"), (*GEN, "--seed", str(2**64)),
        (*GEN, "--top-k", "-1"), ("generate", *FB, "--class", "-1", "--out", "{t}/o.png"),
        ("generate", *FB, "--class", *["1"] * 5, "--n", "1000", "--out", "{t}/o.png"),
        (*VAR, "--n", "0"), (*VAR, "--n", "100000"), (*VAR, "--nrow", "-1"), (*VAR, "--class-id", "-3"),
        (*EXP, "--max-batch", "0"), (*EXP, "--max-batch", "-4"),
        (*BE, "--max-batch", "0"), (*BE, "--opt-batch", "-1"), (*BE, "--max-batch", "2", "--opt-batch", "4"),
        (*PRE, "--batch-size", "0"), (*PRE, "--shard-size", "-1"), (*PRE, "--num-workers", "-1"), (*PRE, "--limit", "0"),
        (*PROBE, "--train-n", "0"), (*PROBE, "--test-n", "0"), (*PROBE, "--epochs", "0"), (*PROBE, "--k", "-1"),
        (*RFID, "--n", "0"), (*RFID, "--ref-n", "-5"), (*RFID, "--batch-size", "0"), (*GFID, "--seed", "-1"),
        (*DEMO, "--pretokenize-limit", "-1"),
        (*SRV, "--port", "0"), (*SRV, "--port", "70000"), (*SRV, "--max-queue", "0"), (*SRV, "--max-images", "0"),
        (*SRV, "--max-images", "5000"),
        (*TRI, "--instances", "0"), (*TRI, "--instances", "65"), (*TRI, "--max-batch-size", "0"),
        (*TRI, "--max-batch-size", "2000"), (*TRI, "--queue-delay-us", "-1"), (*TRI, "--queue-delay-us", "1e12"),
        (*TRI, "--threads", "0"), (*TRI, "--kind", "gpu", "--gpus", "0,0"), (*TRI, "--kind", "gpu", "--gpus", "-1"),
        (*TRI, "--gpus", "0"), (*TRI, "--kind", "gpu", "--backend", "cpu"),
    ],
    # family "float": NaN, infinities and values out of range
    "float": [
        (*GEN, "--cfg", "nan"), (*GEN, "--cfg", "-1"), (*GEN, "--cfg", "inf"), (*GEN, "--temperature", "0"),
        (*GEN, "--temperature", "-1"), (*GEN, "--top-p", "2"), (*GEN, "--top-p", "nan"),
        (*GEN, "--prologue-temperature", "nan"), (*VAR, "--temperature", "inf"),
        (*DEMO, "--scale", "-1"), (*DEMO, "--scale", "0"), (*DEMO, "--scale", "nan"), (*DEMO, "--scale", "inf"),
        (*XP, "--scale", "0"), (*XP, "--scale", "nan"), (*BE, "--workspace-gb", "0"), (*BE, "--workspace-gb", "nan"),
        (*GFID, "--cfg", "nan"), (*GFID, "--top-p", "-0.5"),
        (*SRV, "--batch-window-ms", "nan"), (*SRV, "--batch-window-ms", "-1"), (*SRV, "--batch-window-ms", "1e9"),
    ],
    # family "out": outputs that cannot be written
    "out": [
        ("generate", *FB, "--class", "1", "--out", "{t}/afile/x.png"), ("generate", *FB, "--class", "1", "--out", "{t}/adir"),
        ("generate", *FB, "--class", "1", "--out", "{t}/afile/deeper/x.png"), ("generate", *FB, "--class", "1", "--out", ""),
        ("variations", *FB, "--image", "{t}/img.png", "--out", "{t}/adir"),
        ("reconstruct", *FB, "--image", "{t}/img.png", "--out", "{t}/afile/r.png"),
        ("export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/afile"),
        ("export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/afile/b"),
        ("train", "tokenizer", "--config", "tiny", "--data", "synthetic:8", "--out", "{t}/afile"),
        ("train", "ar", "--config", "tiny", "--tokens", "{t}/adir", "--out", "{t}/afile/run"),
        ("train", "pretokenize", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/afile"),
        ("demo", "--out", "{t}/afile"), ("demo", "--out", "{t}/afile/demo"), ("experiment", "small", "--out", "{t}/afile"),
        (*PROBE, "--out", "{t}/adir"), (*PROBE, "--out", "{t}/afile/r.json"),
        ("eval", "rfid", "--checkpoint", "{t}/fakeckpt", "--stats-dir", "{t}/afile"),
        ("import-official", "--tokenizer", "{t}/adir", "--preset", "tiny", "--out", "{t}/afile"),
        (*HUB[:-1], "{t}/afile"), (*HUB[:-1], "{t}/afile/x"),
        (*BE, "--timing-cache", "{t}/adir"),
        ("triton", "{t}/fakebundle", "--out", "{t}/afile"), ("triton", "{t}/fakebundle", "--out", "{t}/afile/r"),
        ("triton", "{t}/fakebundle", "--out", ""), (*TRI, "--name", "../x"), (*TRI, "--name", "a b"),
    ],
    # family "in": inputs that are missing or not what they must be
    "in": [
        ("serve", "--bundle", "{t}/nope"), ("serve", "--bundle", "{t}/badjson"), ("serve", "--bundle", "{t}/afile"),
        (*SRV, "--class-names", "{t}/nope"), (*SRV, "--class-names", "{t}/adir"), SRV,
        ("generate", "--bundle", "{t}/nope", "--class", "1", "--out", "{t}/o.png"),
        ("generate", "--bundle", "{t}/afile", "--class", "1", "--out", "{t}/o.png"),
        ("generate", "--bundle", "{t}/adir", "--class", "1", "--out", "{t}/o.png"),
        ("generate", "--bundle", "{t}/badjson", "--class", "1", "--out", "{t}/o.png"),
        ("generate", "--bundle", "{t}/listjson", "--class", "1", "--out", "{t}/o.png"),
        ("generate", "--bundle", "{t}/nanjson", "--class", "1", "--out", "{t}/o.png"),
        ("variations", *FB, "--image", "{t}/nope.png", "--out", "{t}/o.png"),
        ("variations", *FB, "--image", "{t}/adir", "--out", "{t}/o.png"),
        ("reconstruct", *FB, "--image", "{t}/img.png", "{t}/nope.png", "--out", "{t}/o.png"),
        ("reconstruct", "--bundle", "{t}/nope", "--image", "{t}/img.png", "--out", "{t}/o.png"),
        ("build-engines", "{t}/nope"), ("build-engines", "{t}/afile"), ("build-engines", "{t}/adir", "--print-trtexec"),
        ("build-engines", "{t}/badjson", "--print-trtexec"), ("build-engines", "{t}/listjson"),
        ("export", "--checkpoint", "{t}/nope", "--out", "{t}/b"), ("export", "--checkpoint", "{t}/afile", "--out", "{t}/b"),
        ("export", "--checkpoint", "{t}/fakeckpt", "--verify", "{t}/badjson"),
        ("export", "--checkpoint", "{t}/fakeckpt", "--verify", "{t}/nope"),
        ("train", "pretokenize", "--checkpoint", "{t}/nope", "--out", "{t}/tok"),
        ("train", "ar", "--config", "tiny", "--tokens", "{t}/nope", "--out", "{t}/run"),
        ("train", "tokenizer", "--config", "{t}/nope.json", "--out", "{t}/run"),
        ("train", "tokenizer", "--config", "{t}/adir", "--out", "{t}/run"),
        ("eval", "probe", "--checkpoint", "{t}/nope"), ("eval", "rfid", "--checkpoint", "{t}/nope"),
        ("eval", "gfid", "--bundle", "{t}/badjson"), ("eval", "gfid"),
        ("eval", "gfid", "--checkpoint", "{t}/fakeckpt", *FB), (*RFID, "--inception", "{t}/nope.pt"),
        ("import-official", "--tokenizer", "{t}/nope", "--preset", "tiny", "--out", "{t}/imp"),
        (*IMP, "--ar", "{t}/nope"), (*IMP, "--official-config", "{t}/nope.json"),
        (*HUB[:2], "a/../b", *HUB[2:]), (*HUB[:2], "-x", *HUB[2:]), (*HUB[:2], "a/b/c", *HUB[2:]),
        ("import-official", "--hub", "--preset", "tiny", "--out", "{t}/imp"), (*HUB, "--onestage", "--tokenizer-only"),
        (*HUB, "--offline", "--cache-dir", "{t}/adir"), (*HUB, "--offline", "--cache-dir", "{t}/afile"),
        (*HUB, "--revision", "v1", "--ar", "{t}/adir"), (*IMP, "--offline"),
        (*XP, "--post-from", "{t}/nope"), (*XP, "--inception", "{t}/nope.pt"), (*XP, "--rows", "bad:x"),
        (*XP, "--rows", ""), ("eval", "probe", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:0"),
        ("train", "tokenizer", "--config", "tiny", "--data", "synthetic:-3", "--out", "{t}/run"),
        (*DEMO, "--data", "synthetic:x"), (*XP, "--data", "synthetic:"),
        ("triton", "{t}/nope", "--out", "{t}/repo"), ("triton", "{t}/afile", "--out", "{t}/repo"), TRI,
        ("triton", "{t}/badjson", "--out", "{t}/repo"), ("triton", "{t}/listjson", "--out", "{t}/repo"),
        (*TRI, "--digest", "0" * 64), (*TRI, "--site-packages", "{t}/nope"), (*TRI, "--site-packages", "{t}/afile"),
    ],
    # family "usage": what argparse already refuses (kept: exit code 2, now on one line)
    "usage": [
        ("generate", *FB, "--out", "{t}/o.png"), ("export",), ("export", "--checkpoint", "{t}/fakeckpt"),
        ("export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/b", "--verify", "{t}/fakebundle"),
        ("train",), ("eval", "fid"), ("nonsense",), (*GEN, "--backend", "quantum"),
        ("triton",), ("triton", "{t}/fakebundle"), (*TRI, "--kind", "tpu"), (*TRI, "--backend", "quantum"),
    ],
}

MATRIX = [pytest.param(family, case, id=f"{family}-{i}-{case[0]}") for family, cases in CASES.items()
          for i, case in enumerate(cases)]


@pytest.mark.parametrize("family, case", MATRIX)
def test_hostile_argument_is_a_one_line_error(family, case, work, capsys):
    before = _snapshot(work)
    rc, err = run_cli(_fill(case, _paths(work)), capsys)
    assert_one_line_error(rc, err)
    assert _snapshot(work) == before, "something was written"


def test_the_matrix_covers_every_subcommand():
    commands = {case[0] for cases in CASES.values() for case in cases}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) - commands <= {"presets"}, set(sub.choices) - commands
    assert len(MATRIX) >= 50


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("case", [GEN, DEMO, ("export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/ro/b")])
def test_unwritable_folder(case, work, capsys):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = [a.replace("{t}/o.png", "{t}/ro/o.png").replace("{t}/demo", "{t}/ro/demo") for a in case]
        rc, err = run_cli(_fill(argv, _paths(work)), capsys)
    finally:
        ro.chmod(0o755)
    assert_one_line_error(rc, err)
    assert "not writable" in err and list(ro.iterdir()) == []


@pytest.mark.parametrize("case", [GEN, REC, DEMO, PRE])
def test_unwritable_folder_as_seen_by_access(case, work, capsys, monkeypatch):
    from prologue_export.cli import checks

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    rc, err = run_cli(_fill(case, _paths(work)), capsys)
    assert_one_line_error(rc, err)
    assert "is not writable" in err and str(work) in err


# --------------------------------------------------------------------------- main's last resorts


def _raising(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, expect, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.png"), 2, ("/data/out.png", "No space left")),
    (PermissionError(errno.EACCES, "Permission denied", "/etc/x"), 2, ("/etc/x", "Permission denied")),
    (FileExistsError(errno.EEXIST, "File exists", "/a", None, "/b"), 2, ("/a -> /b",)),
    (OSError("a library's\nmessage on two lines"), 2, ("two lines",)),
    (KeyboardInterrupt(), 130, ("interrupted",)),
])
def test_main_turns_the_environment_into_one_line(exc, expect, words, monkeypatch, capsys):
    parser = build_parser()
    monkeypatch.setattr("prologue_export.cli.build_parser", lambda: _with_func(parser, _raising(exc)))
    rc, err = run_cli(["generate", "--bundle", "b", "--class", "1", "--out", "o.png"], capsys)
    assert_one_line_error(rc, err, expect)
    assert err.startswith("prologue generate: ") and all(w in err for w in words), err


def _with_func(parser, func):
    """`parser` whose generate command runs `func`."""
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices["generate"].set_defaults(func=func)
    return parser


@pytest.mark.parametrize("exc", [TypeError("a bug"), KeyError("bug"), ZeroDivisionError()])
def test_programming_errors_keep_their_traceback(exc, monkeypatch):
    parser = build_parser()
    monkeypatch.setattr("prologue_export.cli.build_parser", lambda: _with_func(parser, _raising(exc)))
    with pytest.raises(type(exc)):
        main(["generate", "--bundle", "b", "--class", "1", "--out", "o.png"])


# --------------------------------------------------------------------------- the real process


@pytest.mark.parametrize("case", [
    (*GEN, "--sampling", "{{bad"), (*DEMO, "--scale", "-1"), ("export", "--checkpoint", "{t}/fakeckpt"),
    ("build-engines", "{t}/badjson"), (*PROBE, "--train-n", "0"), ("generate", *FB, "--class", "1", "--out", "{t}/adir"),
    ("train", "pretokenize", "--checkpoint", "{t}/nope", "--out", "{t}/tok"),
])
def test_the_process_exits_2_with_one_line(case, work):
    before = _snapshot(work)
    res = subprocess.run([sys.executable, "-m", "prologue_export.cli", *_fill(case, _paths(work))],
                         capture_output=True, text=True, timeout=120)
    assert_one_line_error(res.returncode, res.stderr)
    assert res.stderr.startswith(f"prologue {case[0]}") and _snapshot(work) == before


# --------------------------------------------------------------------------- a real bundle (torch)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny checkpoint and its bundle (not verified): built once for this module."""
    pytest.importorskip("torch")
    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.model import PrologueModel

    root = tmp_path_factory.mktemp("hostile")
    pe.save_checkpoint(PrologueModel(model_preset("tiny")).eval(), root / "ckpt")
    export_bundle(root / "ckpt", root / "bundle", max_batch=4, force=True, verify=False, log=lambda m: None)
    return root


RB = ["--bundle", "{bundle}"]
REAL_CASES = [
    ("generate", *RB, "--class", "99", "--out", "{t}/o.png"),
    ("generate", *RB, "--class", "1", "--sampling", '{{"cfg": -1}}', "--out", "{t}/o.png"),
    ("generate", *RB, "--class", "1", "--sampling", '{{"no_such_setting": 1}}', "--out", "{t}/o.png"),
    ("generate", *RB, "--class", "1", "--ar-weights", "int8", "--out", "{t}/o.png"),
    ("variations", *RB, "--image", "{t}/img.png", "--out", "{t}/o.png"),
    ("variations", *RB, "--image", "{t}/small.png", "--out", "{t}/o.png"),
    ("variations", *RB, "--image", "{t}/small.png", "--class-id", "1000", "--out", "{t}/o.png"),
    ("reconstruct", *RB, "--image", "{t}/afile", "--out", "{t}/o.png"),
    ("reconstruct", *RB, "--image", "{t}/small.png", "--out", "{t}/o.png"),
    ("export", "--checkpoint", "{ckpt}", "--out", "{bundle}"),
    ("export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/b", "--no-verify"),
    ("build-engines", "{t}/halfbundle", "--print-trtexec"),
    ("eval", "probe", "--checkpoint", "{ckpt}", "--data", "{t}/adir", "--train-n", "4", "--test-n", "4"),
    ("eval", "probe", "--checkpoint", "{ckpt}", "--data", "synthetic:2", "--train-n", "4", "--test-n", "4"),
    ("eval", "gfid", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8", "--n", "4", "--stats-dir", "{t}/st"),
    ("train", "pretokenize", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8", "--out", "{t}/tok"),
    ("train", "tokenizer", "--config", "tiny", "steps=-1", "--data", "synthetic:8", "--out", "{t}/run"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"real-{i}-{c[0]}") for i, c in enumerate(REAL_CASES)])
def test_hostile_input_against_a_real_model(case, real, work, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(work / "small.png")
    (work / "halfbundle").mkdir()
    manifest = json.loads((real / "bundle" / "manifest.json").read_text())
    manifest.pop("graphs")
    (work / "halfbundle" / "manifest.json").write_text(json.dumps(manifest))
    before, bundle_before = _snapshot(work), _snapshot(real)
    rc, err = run_cli(_fill(case, _paths(work, bundle=real / "bundle", ckpt=real / "ckpt")), capsys)
    assert_one_line_error(rc, err)
    assert _snapshot(work) == before and _snapshot(real) == bundle_before, "something was written"


# --------------------------------------------------------------------------- serve (issue 24)

SERVE_CASES = [  # --threads beyond the CPUs (20000 never answered), --digest and --allow-host that are not one
    (*SRV, "--threads", "20000"), (*SRV, "--threads", str((os.cpu_count() or 1) * 64)), (*SRV, "--digest", "xyz"),
    (*SRV, "--digest", "ab" * 33), (*SRV, "--allow-host", "http://evil.example"), (*SRV, "--allow-host", "evil.example:80"),
    (*SRV, "--allow-host", ""), (*SRV, "--allow-host", "a/b"), (*SRV, "--allow-host", "x" * 300),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"serve-{i}-{c[3]}") for i, c in enumerate(SERVE_CASES)])
def test_serve_flags_are_one_line_errors(case, work, capsys):
    before = _snapshot(work)
    rc, err = run_cli(_fill(case, _paths(work)), capsys)
    assert_one_line_error(rc, err)
    assert f"argument {case[3]}: must be" in err, err  # the flag's own rule, not the missing bundle
    assert _snapshot(work) == before, "something was written"


def test_serve_refuses_a_bundle_that_is_not_the_pinned_one(runtime_fixture_root, capsys):
    """`prologue serve --digest`: a bundle whose manifest has another sha256 (an impostor with its
    checksums updated) is refused in one line before anything listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc, err = run_cli(["serve", "--bundle", runtime_fixture_root / "bundle", "--digest", "0" * 64, "--port", port,
                       "--backend", "cpu"], capsys)
    assert_one_line_error(rc, err)
    assert "not the expected " + "0" * 64 in err, err
