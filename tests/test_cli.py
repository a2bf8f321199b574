import json
import subprocess
import sys

import pytest

from prologue_export.cli import build_parser, main


def test_help_lists_the_commands():
    text = build_parser().format_help()
    assert "import-official" in text and "presets" in text


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "prologue_export.cli", "presets", "--json"],
                         capture_output=True, text=True, check=True)
    rows = {r["preset"]: r for r in json.loads(out.stdout)}
    assert rows["prologue-b-b"]["ar"] == 115_470_176
    assert rows["prologue-b-b"]["tokenizer_encoder"] == 87_120_508


def test_unknown_preset_is_a_clear_error(tmp_path, capsys, reference_dir):
    rc = main(["import-official", "--tokenizer", str(reference_dir / "fixture_a" / "tokenizer"),
               "--preset", "prologue-q", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "unknown model preset 'prologue-q'" in capsys.readouterr().err


def test_missing_required_flag_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["import-official", "--out", "x"])
    assert exc.value.code == 2


def test_runtime_import_does_not_pull_torch():
    code = ("import sys, prologue_export, prologue_export.runtime; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
