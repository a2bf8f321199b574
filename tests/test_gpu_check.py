"""bench/gpu_check.py: the inputs it carries (`--prepare`), the CPU dry run of every section from a
plain checkout, the stand-in engine's refusals, an onnxruntime-gpu wheel carried in parts, sections
that hang or crash, the run's deadline, and the checkout importer (bench/checkout.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
TREE = ("prologue_export", "train", "export", "runtime", "cli", "bench", "tests/fakes")
SECTIONS = ("env", "cuda", "device_state", "torch_sample", "ort_cuda", "torch_train")
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
    ignore = shutil.ignore_patterns("__pycache__", "results", "gpu_inputs", "*.pyc")
    for folder in TREE:
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore)
    shutil.copy(REPO / "tests" / "__init__.py", copy / "tests" / "__init__.py")
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "OUT"}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    return copy, env


def gpu_check(args, env=None, cwd=None, timeout=120, script=SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], env=env or dict(os.environ), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def read_report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A plain checkout and the inputs its `--prepare` made (what travels to the device)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    copy, env = plain_checkout(tmp)
    run = gpu_check(["--prepare"], env=env, cwd=tmp, timeout=600, script=copy / "bench" / "gpu_check.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return copy, env, copy / "bench" / "gpu_inputs"


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
def test_prepared_inputs_fit_a_call(prepared):
    """The carried folder: a checkpoint, a bundle and the CPU's tokens and images, a few MiB."""
    _, _, inputs = prepared
    size = sum(p.stat().st_size for p in inputs.rglob("*") if p.is_file())
    assert size < 8 * 2**20, size  # the device call takes 64 MiB with the checkout
    ref = json.loads((inputs / "reference.json").read_text())
    assert sorted(ref["files"]) == sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")
                                          if p.is_file() and p.name != "reference.json")
    for case in ref["cases"]:
        assert case["ort_cpu"] == case["torch_cpu"], case["name"]  # the export samples what torch samples
        assert len({tuple(row) for row in case["ort_cpu"]}) == len(case["classes"])  # rows differ: not a flat model
    assert len(ref["images_ort_cpu"]) == len(ref["cases"][0]["classes"])


@pytest.mark.slow
def test_dry_run_from_a_plain_checkout(prepared, tmp_path):
    copy, env, _ = prepared
    out = tmp_path / "out"
    env = dict(env, OUT=str(out))
    t0 = time.perf_counter()
    run = gpu_check(["--device", "cpu"], env=env, cwd=tmp_path, timeout=1200, script=copy / "bench" / "gpu_check.py")
    print(f"dry run: {time.perf_counter() - t0:.0f} s")
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = read_report(out)
    status = {name: s["status"] for name, s in report["sections"].items()}
    assert list(status) == list(SECTIONS)
    assert status.pop("ort_cuda").startswith("skipped: no onnxruntime-gpu wheel carried")
    assert set(status.values()) == {"ok"}, status
    rows = {(r["section"], r["what"]): r for r in report["rows"]}
    assert Path(rows["env", "prologue_export"]["value"]) == copy / "prologue_export" / "__init__.py"
    assert rows["env", "inputs"]["value"].startswith("7/7 files as made")
    for case in ("cfg_schedule", "no_cfg_top_k_top_p"):
        assert rows["device_state", f"{case}: DeviceARState tokens vs ONNX Runtime (CPU)"]["value"].startswith("equal")
        assert rows["device_state", f"{case}: capture and replay"]["value"].startswith("2 execute_async_v3 calls")
        assert rows["torch_sample", f"{case}: vs the carried ONNX Runtime CPU tokens"]["value"].startswith("equal")
    assert rows["cuda", "captured copy_new_kv, launch 2"]["value"] == "equal to numpy"
    assert rows["cuda", "stream ordering"]["value"] == "skipped: no CUDA"  # what needs a GPU says so
    assert "first step" in rows["torch_train", "ar: compiled bf16 training step on cpu"]["note"]
    assert "Traceback" not in run.stdout + run.stderr
    assert (out / "gpu_check.log").read_text().count("== device_state: ok") == 1


def test_the_stand_in_engine_refuses_what_tensorrt_refuses():
    """Shapes outside the profile and unaligned addresses get False; output shapes follow the inputs'."""
    code = """
import sys; sys.path.insert(0, 'bench')
import gpu_check as g
spec = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["rows", 4]}],
        "outputs": [{"name": "y", "dtype": "int64", "shape": ["rows"]}],
        "dynamic_axes": {"rows": {"min": 1, "opt": 2, "max": 8}}}
e = g.StandInEngine("ar_step", spec, module=None, memory=None)
c = e.create_execution_context()
print([c.set_input_shape("x", (9, 4)), c.set_input_shape("x", (2, 5)), c.set_input_shape("y", (2,)),
       c.set_input_shape("x", (2, 4)), c.get_tensor_shape("y"),
       c.set_tensor_address("x", 4096 + 128), c.set_tensor_address("z", 4096), c.set_tensor_address("x", 4096),
       c.execute_async_v3(None), e.get_tensor_mode("y") == g.IOMode.OUTPUT, e.num_io_tensors])
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == "[False, False, False, True, (2,), False, False, True, False, True, 2]"


def test_a_wheel_carried_in_parts(tmp_path):
    """`--split-wheel` cuts a wheel into parts with sha256s; ort_cuda puts them together, unpacks the
    wheel and imports onnxruntime from it (a stub wheel here); a missing part is named."""
    wheel = tmp_path / "onnxruntime_gpu-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("onnxruntime/__init__.py", "__version__ = '0.0-stub'\n"
                   "def get_available_providers():\n    return ['CUDAExecutionProvider', 'CPUExecutionProvider']\n"
                   + "# padding\n" * 200)
    inputs = tmp_path / "inputs"
    run = gpu_check(["--split-wheel", str(wheel), "--inputs", str(inputs), "--part-mib", "0.001"])
    assert run.returncode == 0, run.stderr
    parts = json.loads((inputs / "ort_gpu" / "parts.json").read_text())["parts"]
    assert len(parts) > 1 and sum(p["bytes"] for p in parts) == wheel.stat().st_size
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    args = ["--device", "cpu", "--sections", "ort_cuda", "--inputs", str(inputs)]
    run = gpu_check(args, env=env)
    report = read_report(tmp_path / "out")
    assert report["sections"]["ort_cuda"]["status"].startswith("skipped: no CUDA"), run.stdout + run.stderr
    row = next(r for r in report["rows"] if r["what"] == "onnxruntime-gpu")
    assert row["value"] == "0.0-stub" and "gpu_check_ort_" in row["note"]
    (inputs / "ort_gpu" / parts[1]["file"]).unlink()
    run = gpu_check(args, env=env)
    assert run.returncode == 1
    status = read_report(tmp_path / "out")["sections"]["ort_cuda"]["status"]
    assert status.startswith("failed: 1 of") and parts[1]["file"] in status


def test_a_hanging_or_crashing_section_costs_only_itself(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    t0 = time.perf_counter()
    run = gpu_check(["--device", "cpu", "--sections", "selftest-hang,selftest-crash,env", "--budget", "selftest-hang=3"],
                    env=env)
    assert run.returncode == 1, run.stdout + run.stderr  # a section failed
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
    assert ("env", "inputs") in whats  # no inputs here: one row, not a failure


def test_the_deadline_caps_the_run(tmp_path):
    """A section gets at most what is left of `--deadline`; the sections after it are skipped, saying why."""
    run = gpu_check(["--device", "cpu", "--sections", "selftest-hang,env", "--deadline", "6"],
                    env=dict(os.environ, OUT=str(tmp_path)))
    assert run.returncode == 1
    status = {name: s["status"] for name, s in read_report(tmp_path)["sections"].items()}
    assert status["selftest-hang"].startswith("timed out after") and float(status["selftest-hang"].split()[3]) <= 6
    assert status["env"] == "skipped: the run's deadline (6 s) was reached"


def test_unknown_section_is_an_error(tmp_path):
    run = gpu_check(["--sections", "env,nope"], env=dict(os.environ, OUT=str(tmp_path)))
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
