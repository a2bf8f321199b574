"""Import `prologue_export` from a checkout of this repository, installed or not.

The package's subpackages live in top-level folders (`train/`, `export/`, `runtime/`, `cli/`),
mapped into `prologue_export` by pyproject.toml's `[tool.setuptools.package-dir]`; a plain
`sys.path` entry cannot express that mapping, so a checkout that was never `pip install`ed fails
at the first `prologue_export.runtime` import. `use_checkout(root)` puts a finder at the front of
`sys.meta_path` that resolves those names from the folders of `root`, which also makes the
checkout's code win over an installed (or editable-installed) copy:

    from checkout import use_checkout
    use_checkout(Path(__file__).resolve().parents[1])

The mapping has one owner, pyproject.toml; it is read with `tomllib` (Python >= 3.11), else with
a parser of just that table.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path

PACKAGE = "prologue_export"
TABLE = "tool.setuptools.package-dir"
_KEY = r'"(?P<dq>[^"]*)"|\'(?P<sq>[^\']*)\'|(?P<bare>[A-Za-z0-9_.-]+)'
_LINE = re.compile(rf'^(?:{_KEY})\s*=\s*(?:"(?P<vdq>[^"]*)"|\'(?P<vsq>[^\']*)\')\s*(?:#.*)?$')


def parse_package_dir(text: str) -> dict:
    """The `[tool.setuptools.package-dir]` table of a pyproject.toml text, as {package: folder}.

    Enough TOML for that table on Pythons without `tomllib`: one `key = "value"` a line, keys bare
    or quoted (dotted package names are quoted there), comments and blank lines skipped."""
    table, inside = {}, False
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("["):
            inside = re.sub(r"\s", "", s.split("#", 1)[0].strip()) == f"[{TABLE}]"
            continue
        if inside:
            m = _LINE.match(s)
            if m is None:
                raise ValueError(f"pyproject.toml [{TABLE}]: cannot read the line {line!r}")
            key = next(v for v in (m["dq"], m["sq"], m["bare"]) if v is not None)
            table[key] = m["vdq"] if m["vdq"] is not None else m["vsq"]
    return table


def package_dirs(root) -> dict:
    """{package name: folder} of the `prologue_export` packages of the checkout at `root`."""
    root = Path(root).resolve()
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        table = parse_package_dir(text)
    else:
        table = tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    dirs = {name: (root / folder).resolve() for name, folder in table.items()
            if name == PACKAGE or name.startswith(PACKAGE + ".")}
    dirs.setdefault(PACKAGE, root / PACKAGE)
    return dirs


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages, and the modules directly in them, in the checkout's folders."""

    def __init__(self, root, dirs: dict):
        self.root = Path(root).resolve()
        self.dirs = dirs

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is not None:
            init = folder / "__init__.py"
            if not init.is_file():
                raise ModuleNotFoundError(f"{fullname}: no {init} in the checkout", name=fullname)
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        parent = fullname.rpartition(".")[0]
        if parent in self.dirs:  # never let another finder (an installed copy) answer for these
            spec = importlib.machinery.PathFinder.find_spec(fullname, [str(self.dirs[parent])])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {fullname!r} (in the checkout {self.root})", name=fullname)
            return spec
        return None  # deeper modules follow their parent's __path__, which is in the checkout

    def __repr__(self):
        return f"CheckoutFinder({str(self.root)!r})"


def _from_checkout(module, root: Path) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve().is_relative_to(root)


def use_checkout(root) -> CheckoutFinder:
    """Import `prologue_export` (all its subpackages) from the checkout at `root` from now on.

    Installs a `CheckoutFinder` first in `sys.meta_path` (replacing an earlier one) and forgets
    modules of the package already imported from elsewhere. Returns the finder."""
    root = Path(root).resolve()
    finder = CheckoutFinder(root, package_dirs(root))
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "CheckoutFinder"]
    sys.meta_path.insert(0, finder)
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        if not _from_checkout(sys.modules[name], root):
            del sys.modules[name]
    importlib.invalidate_caches()
    return finder
