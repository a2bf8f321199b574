"""bench/gpu_check.py: the dry run (`--device cpu --preset tiny --quick`) from a plain checkout,
sections that hang or crash, and the checkout importer (bench/checkout.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
TREE = ("prologue_export", "train", "export", "runtime", "cli", "bench")
SECTIONS = ("env", "train", "sample", "floor", "runtime")
# Run first in every process (PYTHONPATH): drops this venv's editable install of prologue-export,
# so that the copy below is a checkout that was never installed.
SITECUSTOMIZE = """\
import sys
def _ours(obj):
    return "__editable__" in str(getattr(obj, "__module__", "")) + repr(obj)
sys.meta_path[:] = [f for f in sys.meta_path if not _ours(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _ours(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
for _key in [k for k in sys.path_importer_cache if "__editable__" in k]:
    del sys.path_importer_cache[_key]
"""


def plain_checkout(tmp_path: Path) -> tuple:
    """A copy of the repository's code (no install) and the environment that hides the install."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for folder in TREE:
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "OUT"}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    return copy, env


def read_report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_the_copy_is_a_plain_checkout(tmp_path):
    """Without the checkout importer the copy cannot import its runtime (the bug that the
    importer fixes), with it everything comes from the copy."""
    copy, env = plain_checkout(tmp_path)
    plain = subprocess.run([sys.executable, "-c", "import prologue_export.runtime"], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "No module named 'prologue_export.runtime'" in plain.stderr, plain.stderr
    code = ("import sys; sys.path.insert(0, 'bench'); from checkout import use_checkout; use_checkout('.');"
            "import prologue_export.config, prologue_export.runtime.settings as s, prologue_export.export as e;"
            "print(prologue_export.config.__file__); print(s.__file__); print(e.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    files = [Path(line) for line in run.stdout.split()]
    assert files == [copy / "prologue_export" / "config.py", copy / "runtime" / "settings.py",
                     copy / "export" / "__init__.py"]


@pytest.mark.slow
def test_dry_run_from_a_plain_checkout(tmp_path):
    copy, env = plain_checkout(tmp_path)
    out = tmp_path / "out"
    env["OUT"] = str(out)
    t0 = time.perf_counter()
    # --budget-scale: this CPU is shared; the budgets are sized for a GPU host
    run = subprocess.run([sys.executable, str(copy / "bench" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny", "--quick",
                          "--budget-scale", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    print(f"dry run: {time.perf_counter() - t0:.0f} s")
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = read_report(out)
    assert list(report["sections"]) == list(SECTIONS)
    for name, s in report["sections"].items():
        assert s["status"] == "ok" or s["status"].startswith("skipped"), (name, s["status"])
        assert any(r["section"] == name for r in report["rows"]), f"{name} recorded no rows"
    rows = {(r["section"], r["what"]): r for r in report["rows"]}
    assert Path(rows["env", "prologue_export"]["value"]) == copy / "prologue_export" / "__init__.py"
    assert (out / "gpu_check.log").read_text().count("== runtime: ok") == 1
    assert "| section | status | seconds | budget (s) |" in run.stdout
    assert "Traceback" not in run.stdout  # missing tensorrt / CUDA provider / cuda-python: one line each
    assert ("train", "ar torch.compile first step (s)") in rows  # the cold compile apart from the steady step
    assert "first call" in rows["sample", "tiny AR compile batch 1"]["note"]
    skipped = [r["what"] for r in report["rows"] if r["value"] == "skipped"]
    assert {"tensorrt", "onnxruntime CUDA"} <= set(skipped)


def test_a_hanging_or_crashing_section_costs_only_itself(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--sections", "selftest-hang,selftest-crash,env",
                          "--budget", "selftest-hang=3"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.perf_counter() - t0 < 60
    report = read_report(tmp_path)
    status = {name: s["status"] for name, s in report["sections"].items()}
    assert status["selftest-hang"] == "timed out after 3 s"
    assert status["selftest-crash"].startswith("failed:") and "exit code 3" in status["selftest-crash"]
    assert status["env"] == "ok"
    whats = [(r["section"], r["what"]) for r in report["rows"]]
    assert ("selftest-hang", "before the hang") in whats  # rows of a section survive its timeout
    assert ("selftest-crash", "before the crash") in whats
    assert ("env", "torch") in whats


def test_unknown_section_is_an_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--sections", "env,nope"], env=dict(os.environ, OUT=str(tmp_path)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "unknown section(s) nope" in run.stderr


def test_package_dir_parser_agrees_with_tomllib():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from checkout import package_dirs, parse_package_dir
    finally:
        sys.path.remove(str(REPO / "bench"))
    text = (REPO / "pyproject.toml").read_text()
    table = parse_package_dir(text)
    assert table["prologue_export.runtime"] == "runtime" and table["prologue_export"] == "prologue_export"
    tomllib = pytest.importorskip("tomllib")
    assert table == tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    assert package_dirs(REPO)["prologue_export.cli"] == REPO / "cli"
    toml = "[tool.setuptools.package-dir]  # comment\n'a.b' = 'x'  # c\nc = \"y\"\n\n[other]\nz = \"w\"\n"
    assert parse_package_dir(toml) == {"a.b": "x", "c": "y"}
