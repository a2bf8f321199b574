"""The rooms' one-way doors (docs/architecture.md), checked on the source by walking its AST.

- `prologue_export/` (the model core) imports only itself and the runtime;
- `train/` and `export/` import the core, the runtime and themselves, never each other;
- `runtime/` imports nothing else of ours and never torch, nor a web framework (not even inside a function);
- `serve/` imports only the runtime (and never torch);
- `cli/` may import every room.
Also: no function anywhere in the package is longer than `MAX_FUNCTION_LINES`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> (its package, its room); pyproject's package-dir maps them into prologue_export
FOLDERS = {"prologue_export": ("prologue_export", "core"), "train": ("prologue_export.train", "train"),
           "export": ("prologue_export.export", "export"), "runtime": ("prologue_export.runtime", "runtime"),
           "serve": ("prologue_export.serve", "serve"), "cli": ("prologue_export.cli", "cli")}
DOORS = {"core": {"core", "runtime"}, "train": {"core", "runtime", "train"}, "export": {"core", "runtime", "export"},
         "runtime": {"runtime"}, "serve": {"runtime", "serve"},
         "cli": {"core", "runtime", "train", "export", "serve", "cli"}}
TORCH_STACK = {"torch", "einops", "safetensors", "onnx", "tqdm"}
FORBIDDEN_THIRD_PARTY = {"runtime": TORCH_STACK | {"starlette", "uvicorn"}, "serve": TORCH_STACK}
MAX_FUNCTION_LINES = 80


def room_of(module: str) -> str | None:
    """The room of an absolute module name of ours, None for anything else."""
    parts = module.split(".")
    if parts[0] != "prologue_export":
        return None
    if len(parts) > 1 and parts[1] in ("train", "export", "runtime", "serve", "cli"):
        return parts[1]
    return "core"


def imports_of(tree: ast.AST, package: str):
    """(line, absolute module name) of every import in a module of `package`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            if node.module is None:  # `from . import x`: x is a module of that package
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"
            else:
                yield node.lineno, base


def violations(root: Path, folders=FOLDERS) -> list:
    found = []
    for folder, (package, room) in folders.items():
        for file in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(file.read_text(), str(file))
            where = file.relative_to(root)
            for line, module in imports_of(tree, package):
                target = room_of(module)
                if target is not None and target not in DOORS[room]:
                    found.append(f"{where}:{line}: the {room} room imports {module} ({target})")
                top = module.split(".")[0]
                if top in FORBIDDEN_THIRD_PARTY.get(room, ()):
                    found.append(f"{where}:{line}: the {room} room imports {top}")
    return found


def long_functions(root: Path, folders=FOLDERS, limit: int = MAX_FUNCTION_LINES) -> list:
    found = []
    for folder in folders:
        for file in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        found.append(f"{file.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return found


def test_every_import_goes_through_an_open_door():
    assert violations(ROOT) == []


def test_no_function_is_over_the_limit():
    assert long_functions(ROOT) == []


MAX_CORE_LINES = 2300  # issue 22: the core is the model and its checkpoints; clients and recipes live elsewhere


def test_the_core_is_the_model_only():
    lines = sum(len(f.read_text().splitlines()) for f in (ROOT / "prologue_export").glob("*.py"))
    assert lines <= MAX_CORE_LINES, (f"prologue_export/ holds {lines} lines (> {MAX_CORE_LINES}): move what is not "
                                     "the model or its checkpoints to its room (docs/architecture.md)")


@pytest.mark.parametrize("folder, source, expected", [
    ("runtime", "import torch\n", "the runtime room imports torch"),
    ("runtime", "def f():\n    from torch import nn\n", "the runtime room imports torch"),
    ("runtime", "from ..checkpoint import load_checkpoint\n", "imports prologue_export.checkpoint (core)"),
    ("prologue_export", "from .train.data import open_dataset\n", "the core room imports prologue_export.train.data"),
    ("prologue_export", "from .cli import main\n", "(cli)"),
    ("train", "from ..export.bundle import export_bundle\n", "the train room imports prologue_export.export.bundle"),
    ("export", "from ..train import metrics\n", "the export room imports prologue_export.train (train)"),
    ("export", "import prologue_export.train.data\n", "(train)"),
    ("runtime", "def f():\n    import starlette.applications\n", "the runtime room imports starlette"),
    ("runtime", "from ..serve.app import create_app\n", "the runtime room imports prologue_export.serve.app (serve)"),
    ("serve", "from ..checkpoint import load_checkpoint\n", "the serve room imports prologue_export.checkpoint (core)"),
    ("serve", "import torch\n", "the serve room imports torch"),
])
def test_the_checker_finds_a_wrong_way_import(tmp_path, folder, source, expected):
    for name in FOLDERS:
        (tmp_path / name).mkdir()
    (tmp_path / folder / "bad.py").write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass_the_checker(tmp_path):
    for name in FOLDERS:
        (tmp_path / name).mkdir()
    (tmp_path / "train" / "ok.py").write_text("from ..model import PrologueModel\nfrom ..runtime.images import grid\n"
                                              "from . import metrics\nimport torch\n")
    (tmp_path / "cli" / "ok.py").write_text("from ..export.bundle import export_bundle\nfrom ..train import data\n")
    (tmp_path / "prologue_export" / "ok.py").write_text("from .runtime.settings import SamplingConfig\n")
    assert violations(tmp_path) == []


def test_the_checker_finds_a_long_function(tmp_path):
    for name in FOLDERS:
        (tmp_path / name).mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "export" / "long.py").write_text(f"def too_long():\n{body}")
    assert long_functions(tmp_path) == [f"export/long.py:1 too_long: {MAX_FUNCTION_LINES + 1} lines"]
