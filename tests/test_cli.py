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


def test_preset_table_matches_the_model_definition():
    from prologue_export.cli.model import PRESET_PARAMETERS, parameter_counts
    from prologue_export.config import MODEL_PRESETS

    assert set(PRESET_PARAMETERS) == set(MODEL_PRESETS)
    for name in MODEL_PRESETS:
        assert PRESET_PARAMETERS[name] == parameter_counts(name), name


def test_presets_table_does_not_load_torch():
    code = ("import sys; from prologue_export.cli import main; main(['presets']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "prologue-b-b" in out.stdout and "115,470,176" in out.stdout


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


def test_every_room_raises_prologue_errors():
    from prologue_export.checkpoint import CheckpointError
    from prologue_export.export.bundle import ExportError
    from prologue_export.export.verify import VerificationError
    from prologue_export.runtime.errors import PrologueError
    from prologue_export.train.common import TrainError
    from prologue_export.train.data import DataError
    from prologue_export.train.metrics import MetricsError

    for error in (CheckpointError, ExportError, VerificationError, TrainError, DataError, MetricsError):
        assert issubclass(error, PrologueError), error


def test_an_error_of_any_room_is_one_line(tmp_path, capsys):
    rc = main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("prologue export: error: ") and "does not exist" in err and err.count("\n") == 1
