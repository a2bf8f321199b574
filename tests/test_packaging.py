"""The extras and every install line we document give environments with exactly one ONNX Runtime,
and CUDA packages of one CUDA major.

`onnxruntime` and `onnxruntime-gpu` both install the `onnxruntime` package and overwrite each
other's files (the CUDA provider is often lost), so no environment may hold both. Read here: the
requirements of each extra in pyproject.toml (self-references such as `prologue-export[cpu]`
expanded), the same from the installed distribution's metadata (`importlib.metadata.requires`),
and every `pip install ...` in README.md, docs/*.md and scripts/*.sh. Only the declared
requirements are checked (not what pip would resolve on some machine); which CUDA major each
onnxruntime-gpu release is built for comes from the wheels' metadata on PyPI (ORT_GPU_CUDA).
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import typing
from pathlib import Path

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements")
Requirement = packaging_requirements.Requirement
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
NAME = "prologue-export"

# Distributions that install the `onnxruntime` import package (any two in one environment clash).
ORT = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
       "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training", "onnxruntime-silicon"}

# The CUDA major each onnxruntime-gpu release on PyPI is built for: from each Linux x86_64 wheel's
# METADATA (its `cuda` extra: nvidia-cuda-runtime-cu12~=12.0 for 1.21.0-1.26.0; nvidia-cuda-runtime-cu13~=13.0
# (1.27.0) or nvidia-cuda-runtime~=13.0 (1.28.0 on)), read 2026-12 with HTTP range requests; 1.19/1.20 declare
# no CUDA packages ("Starting with version 1.19, CUDA 12.x becomes the default version ... in PyPI":
# onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider), 1.18 and earlier were CUDA 11.8.
ORT_GPU_CUDA = {
    **{v: 11 for v in ("1.15.0", "1.15.1", "1.16.0", "1.16.3", "1.17.0", "1.17.1", "1.18.0", "1.18.1")},
    **{v: 12 for v in ("1.19.0", "1.19.2", "1.20.0", "1.20.2", "1.21.0", "1.21.1", "1.22.0", "1.23.0", "1.23.2",
                       "1.24.1", "1.24.4", "1.25.0", "1.25.1", "1.26.0")},
    **{v: 13 for v in ("1.27.0", "1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.31.1")},
}
# The ONNX Runtime each extra must bring (none: the extra must bring none).
ORT_OF_EXTRA = {"cpu": "onnxruntime", "gpu-cu12": "onnxruntime-gpu", "gpu-cu13": "onnxruntime-gpu",
                "dev": "onnxruntime"}
CUDA_PACKAGES = ("cuda-python", "cuda-bindings", "onnxruntime-gpu", "tensorrt-cu12", "tensorrt-cu13")
DOCUMENTS = ("README.md", "docs/*.md", "scripts/*.sh")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- requirements


def pyproject_requirements() -> typing.Dict[str, typing.List[Requirement]]:
    """{"": base, extra: [...]} as pyproject.toml declares them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    table = {"": [Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        table[extra] = [Requirement(r) for r in reqs]
    return table


def metadata_requirements() -> typing.Dict[str, typing.List[Requirement]]:
    """The same from the installed distribution's metadata (`extra == "..."` markers)."""
    requires = importlib.metadata.requires(NAME) or []
    extras = importlib.metadata.metadata(NAME).get_all("Provides-Extra") or []
    table: typing.Dict[str, typing.List[Requirement]] = {"": [], **{e: [] for e in extras}}
    for line in requires:
        req = Requirement(line)
        marker, req.marker = req.marker, None
        owners = [e for e in extras if marker is None or marker.evaluate({"extra": e})]
        if marker is None or marker.evaluate({"extra": ""}):
            table[""].append(req)
        else:
            for extra in owners:
                table[extra].append(req)
    return table


def resolve(table, extras: typing.Iterable[str]) -> typing.List[Requirement]:
    """The requirements of `prologue-export[extras]`: the base, the extras, self-references expanded."""
    out, todo, seen = list(table[""]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in table:
            raise AssertionError(f"{NAME} has no extra {extra!r} (extras: {sorted(e for e in table if e)})")
        for req in table[extra]:
            if _norm(req.name) == NAME:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def onnx_runtimes(reqs) -> typing.Set[str]:
    return {_norm(r.name) for r in reqs} & ORT


def cuda_majors(reqs) -> typing.Dict[str, typing.Set[int]]:
    """For each CUDA-bound requirement, the CUDA majors its versions allow."""
    found: typing.Dict[str, typing.Set[int]] = {}
    for r in reqs:
        name = _norm(r.name)
        if name in ("cuda-python", "cuda-bindings"):
            majors = {m for m in range(11, 16)
                      if any(r.specifier.contains(f"{m}.{minor}.{patch}", prereleases=True)
                             for minor in range(10) for patch in (0, 1, 10))}
        elif name == "onnxruntime-gpu":
            majors = {cuda for v, cuda in ORT_GPU_CUDA.items() if r.specifier.contains(v)}
        elif re.fullmatch(r"tensorrt-cu\d+", name):
            majors = {int(name.rpartition("cu")[2])}
        else:
            continue
        found[f"{r.name}{r.specifier}"] = majors
    return found


# --------------------------------------------------------------------------- install lines


class InstallLine(typing.NamedTuple):
    where: str  # file:line
    text: str
    ours: typing.Tuple[str, ...]  # the extras of each prologue-export / checkout requirement on the line
    others: typing.Tuple[Requirement, ...]


PIP = re.compile(r"\bpip3?\"?\s+install\b([^`\n]*)")
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:python3?\s+-m\s+)?pip3?\s+install\b")
OURS = re.compile(r"""^(?:prologue[-_]export|\.|\$\{?ROOT\}?|\$\{?REPO\}?)(?:\[([\w,\- ]*)\])?$""")
VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f",
                 "--find-links", "-t", "--target", "-d", "--dest", "--python-version", "--platform", "--report"}


def commands(path: Path) -> typing.Iterator[typing.Tuple[int, str]]:
    """(line number, text) of each `pip install` command a document gives: lines of fenced code blocks
    and inline code spans that start with it, and in shell scripts the commands and the comments'
    inline spans. A message quoted in prose (`error: ... pip install ...`) is not a command."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix == ".md" and line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        code = fenced or (path.suffix == ".sh" and not line.lstrip().startswith("#"))
        if code:
            if PIP.search(line):
                yield number, line
            continue
        for span in re.findall(r"`([^`]*)`", line):
            if COMMAND.match(span):
                yield number, span


def install_lines() -> typing.List[InstallLine]:
    """Every `pip install ...` command of README.md, docs/*.md and scripts/*.sh."""
    lines = []
    for pattern in DOCUMENTS:
        for path in sorted(REPO.glob(pattern)):
            for number, text in commands(path):
                for match in PIP.finditer(text):
                    parsed = parse_install(match.group(1))
                    if parsed is not None:
                        lines.append(InstallLine(f"{path.relative_to(REPO)}:{number}", match.group(0).strip(), *parsed))
    return lines


def parse_install(args: str):
    """(extras of each of our requirements, other requirements) of the arguments of `pip install`."""
    args = re.split(r"\s(?:#|&&|\|\||;|\|)|\)\s*$", args)[0]
    try:
        tokens = shlex.split(args)
    except ValueError:
        return None
    ours, others, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in VALUE_OPTIONS:
            skip = True
            continue
        if token.startswith("-") and token not in ("-e", "--editable"):
            continue
        if token in ("-e", "--editable"):
            continue
        match = OURS.match(token)
        if match:
            ours.append(tuple(e.strip() for e in (match.group(1) or "").split(",") if e.strip()))
            continue
        if token.startswith("$") or "/" in token:
            continue  # a variable or a file we cannot read here
        try:
            others.append(Requirement(token))
        except Exception:  # noqa: BLE001 - prose that happens to follow "pip install"
            return None
    flat = tuple(sorted({e for extras in ours for e in extras}))
    return (flat if ours else None), tuple(others)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def declared():
    return pyproject_requirements()


def test_the_installed_metadata_is_what_pyproject_declares(declared):
    try:
        installed = metadata_requirements()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{NAME} is not installed here")
    as_set = lambda table: {e: sorted(str(r) for r in reqs) for e, reqs in table.items()}  # noqa: E731
    assert as_set(installed) == as_set(declared), "stale install: pip install -e '.[dev]'"


@pytest.mark.parametrize("source", ["pyproject", "metadata"])
def test_each_extra_brings_the_onnx_runtime_it_should(source, declared):
    if source == "metadata":
        try:
            table = metadata_requirements()
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{NAME} is not installed here")
    else:
        table = declared
    assert not onnx_runtimes(table[""]), "the base install brings no ONNX Runtime: the extras choose one"
    for extra in table:
        if not extra:
            continue
        runtimes = onnx_runtimes(resolve(table, [extra]))
        want = ORT_OF_EXTRA.get(extra)
        assert runtimes == ({want} if want else set()), (extra, runtimes)


def test_the_extras_are_the_documented_ones(declared):
    assert set(declared) - {""} == {"cpu", "gpu-cu12", "gpu-cu13", "tensorrt-cu12", "tensorrt-cu13", "train", "export",
                                     "eval", "hub", "serve", "triton", "dev"}


def test_cuda_packages_of_an_extra_share_its_cuda_major(declared):
    for extra in declared:
        reqs = resolve(declared, [extra]) if extra else declared[""]
        majors = cuda_majors(reqs)
        suffix = re.search(r"-cu(\d+)$", extra)
        if suffix is None:
            assert not majors, f"{extra or 'the base'} names CUDA packages: {majors}"
            continue
        for req, allowed in majors.items():
            assert allowed == {int(suffix.group(1))}, f"{extra}: {req} allows CUDA {sorted(allowed)}"
        names = {_norm(r.name) for r in reqs}
        assert "cuda-python" in names, extra  # runtime/cuda.py: the device buffers both GPU backends use
        assert "tensorrt" not in names  # the bare package picks tensorrt-cu13 since 10.13.2.6, whatever the host


def test_the_gpu_extras_bring_cuda_and_cudnn_as_pip_packages(declared):
    """A fresh machine with only the driver gets a working CUDA provider: onnxruntime-gpu's `cuda` and
    `cudnn` extras (in its wheels from 1.21.0; loaded by onnxruntime.preload_dlls())."""
    for extra in ("gpu-cu12", "gpu-cu13"):
        (ort,) = [r for r in declared[extra] if _norm(r.name) == "onnxruntime-gpu"]
        assert {"cuda", "cudnn"} <= ort.extras and not ort.specifier.contains("1.20.2"), extra


def test_tensorrt_extras_allow_10_and_11_only(declared):
    for extra in ("tensorrt-cu12", "tensorrt-cu13"):
        (trt,) = [r for r in declared[extra] if _norm(r.name).startswith("tensorrt")]
        assert trt.specifier.contains("10.16.1.11") and trt.specifier.contains("11.4.0.106"), extra
        assert not trt.specifier.contains("9.3.0") and not trt.specifier.contains("12.0.0"), extra
    # tensorrt-cu13 exists on PyPI from 10.13.2.6
    (cu13,) = [r for r in declared["tensorrt-cu13"] if _norm(r.name) == "tensorrt-cu13"]
    assert not cu13.specifier.contains("10.13.0.35")


def test_the_documents_have_install_lines():
    lines = install_lines()
    ours = [line for line in lines if line.ours is not None]
    assert len(ours) >= 8, [line.text for line in lines]
    documented = {e for line in ours for e in line.ours}
    assert {"cpu", "gpu-cu12", "gpu-cu13", "tensorrt-cu12", "tensorrt-cu13", "serve", "dev"} <= documented, documented


@pytest.mark.parametrize("line", install_lines(), ids=lambda line: line.where)
def test_each_install_line_gives_one_onnx_runtime_and_one_cuda_major(line, declared):
    """No documented line brings both ONNX Runtimes; each one that installs prologue-export brings
    exactly one; the CUDA packages a line brings are of one CUDA major."""
    reqs = list(line.others) + (resolve(declared, line.ours) if line.ours is not None else [])
    runtimes = onnx_runtimes(reqs)
    assert len(runtimes) <= 1, f"{line.where}: `{line.text}` installs {sorted(runtimes)}"
    if line.ours is not None:
        assert len(runtimes) == 1, (f"{line.where}: `{line.text}` installs prologue-export without an ONNX Runtime: "
                                    "add `cpu` or `gpu-cu12` / `gpu-cu13`")
    majors = cuda_majors(reqs)
    assert len(set().union(*majors.values())) <= 1, f"{line.where}: `{line.text}` mixes CUDA majors: {majors}"


def test_the_parser_reads_what_the_documents_write(declared):
    assert parse_install(' -q --disable-pip-version-check -e ".[dev]"') == (("dev",), ())
    assert parse_install(' "prologue-export[gpu-cu12,tensorrt-cu12]"   # comment') == (
        ("gpu-cu12", "tensorrt-cu12"), ())
    ours, others = parse_install(' --upgrade "$ROOT[cpu,serve]" pytest httpx')
    assert ours == ("cpu", "serve") and [r.name for r in others] == ["pytest", "httpx"]
    # the old README's GPU recipe and the old `gpu` extra: both ONNX Runtimes
    _, others = parse_install(" prologue-export onnxruntime-gpu")
    assert onnx_runtimes(list(others) + resolve(declared, ["cpu"])) == {"onnxruntime", "onnxruntime-gpu"}
    assert cuda_majors([Requirement("cuda-python>=12")]) == {"cuda-python>=12": {12, 13, 14, 15}}
