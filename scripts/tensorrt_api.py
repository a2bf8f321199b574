#!/usr/bin/env python3
"""Write tests/data/tensorrt_python_api.json: TensorRT's Python API, read from its sources.

For each tag of NVIDIA/TensorRT given, this reads the pybind11 binding sources
(`python/src/**/*.cpp`: infer/pyCore.cpp, infer/pyGraph.cpp, infer/pyFoundationalTypes.cpp,
parsers/pyOnnx.cpp, ...) and the Python package they are wrapped in
(`python/packaging/bindings_wheel/tensorrt/__init__.py`: `__version__`, `nptype`, ...), and
records every module-level name, every class and enum, each class's methods, properties and
enum values, the keyword names of each method (`"flags"_a`) and where each is defined
(`file:line` at that tag). tests/test_tensorrt_api.py checks every TensorRT name our code uses
against each tag in the file.

    python scripts/tensorrt_api.py --repo /path/to/TensorRT.git [--tags v10.0.1 v10.16 v11.0 v11.1]

`--repo` is a clone of https://github.com/NVIDIA/TensorRT (bare is fine); only `git show` and
`git ls-tree` are run. The parser understands the binding idioms these files use, not C++:
`py::class_<T, Bases...>(scope, "Name", ...)` and `py::enum_<T>(scope, "Name", ...)`
(also brace-initialised into a variable), chained `.def("x", ...)`, `.def_static`,
`.def_property*`, `.def_readonly/readwrite`, `.value("X", ...)`, `.export_values()`,
`.def(py::init...)` (-> `__init__`), `.def_buffer(...)` / `py::buffer_protocol()` (-> `__buffer__`),
`m.def("f", ...)`, `m.attr("x") = ...`, `py::bind_vector<...>(m, "Name")`; bases are the
template arguments that are bound classes themselves.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

DEFAULT_TAGS = ("v10.0.1", "v10.16", "v11.0", "v11.1")  # oldest 10.x GA, newest 10.x, both 11.x
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tensorrt_python_api.json"
PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
MEMBER_CALLS = ("def", "def_static", "def_property", "def_property_readonly", "def_property_static",
                "def_property_readonly_static", "def_readwrite", "def_readonly", "def_readwrite_static",
                "def_readonly_static", "value", "def_buffer", "export_values")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------- C++ scanning


def blank_comments(text: str) -> str:
    """Comments and preprocessor lines replaced by spaces (newlines kept, so offsets and line
    numbers stay); string and character literals kept as they are."""
    out, i, n = list(text), 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            while text[j - 1] == "\\" and j < n:  # continued directive
                j2 = text.find("\n", j + 1)
                j = n if j2 < 0 else j2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
            continue
        if c in " \t":
            i += 1
            continue
        line_start = c == "\n"
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            i = skip_literal(text, i)
        else:
            i += 1
    return "".join(out)


def skip_literal(text: str, i: int) -> int:
    """Offset just past the string or character literal starting at `i`."""
    quote, j = text[i], i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    return j + 1


def statements(code: str) -> typing.Iterator[typing.Tuple[int, str]]:
    """(offset, text) of each statement: split at `;` and at block braces outside parentheses.
    A brace right after `py::class_<...> name` is a brace initialiser, read like a parenthesis."""
    start, depth, braces, i, n = 0, 0, [], 0, len(code)
    while i < n:
        c = code[i]
        if c in "\"'":
            i = skip_literal(code, i)
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "{":
            if depth > 0:
                braces.append(False)
            elif re.search(r"py::(class_|enum_)\s*<.*>\s*\w+\s*$", code[start:i], re.S):
                braces.append(True)
                depth += 1
            else:
                braces.append(None)
                yield start, code[start:i]
                start = i + 1
        elif c == "}":
            kind = braces.pop() if braces else None
            if kind is True:
                depth -= 1
            elif kind is None and depth == 0:
                yield start, code[start:i]
                start = i + 1
        elif c == ";" and depth == 0:
            yield start, code[start:i]
            start = i + 1
        i += 1
    yield start, code[start:]


def balanced(text: str, i: int, open_: str, close: str) -> int:
    """Offset just past the bracket that closes the one at `i` (skipping literals)."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in "\"'":
            j = skip_literal(text, j)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(text)


def split_top(text: str, angle: bool = False) -> typing.List[typing.Tuple[int, str]]:
    """Top-level comma-separated parts of `text` (an argument list without its brackets), with
    offsets; `angle`: `<...>` nest too (template argument lists)."""
    opening, closing = ("([{<", ")]}>") if angle else ("([{", ")]}")
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = skip_literal(text, i)
            continue
        if c in opening:
            depth += 1
        elif c in closing:
            depth -= 1
        elif c == "," and depth == 0:
            parts.append((start, text[start:i]))
            start = i + 1
        i += 1
    parts.append((start, text[start:]))
    return parts


HEAD = re.compile(r"\s*(?:auto\s+\w+\s*=\s*)?py::(class_|enum_|bind_vector|bind_map)\s*<")
VAR_HEAD = re.compile(r"\s*(\w+)\s*(?=\.)")
STRING = re.compile(r'\s*"([^"\\]*)"\s*$')
KWARG = re.compile(r'"(\w+)"_a|py::arg\(\s*"(\w+)"\s*\)')


class Api:
    """What one tag's sources define (the JSON's per-tag object)."""

    def __init__(self):
        self.module: typing.Dict[str, str] = {}
        self.classes: typing.Dict[str, dict] = {}
        self.cpp_types: typing.Dict[str, str] = {}  # C++ type -> Python class name
        self._bases: typing.Dict[str, typing.List[str]] = {}  # class -> C++ template arguments

    def add_class(self, name: str, kind: str, where: str, scope: typing.Optional[str], cpp_type: str,
                  template_args: typing.List[str]) -> str:
        key = f"{scope}.{name}" if scope else name
        self.classes[key] = {"kind": kind, "where": where, "bases": [], "members": {}, "kwargs": {}}
        self.cpp_types[cpp_type] = key
        self._bases[key] = template_args
        if scope:
            self.classes[scope]["members"].setdefault(name, where)
        else:
            self.module.setdefault(name, where)
        return key

    def add_member(self, key: typing.Optional[str], name: str, where: str, kwargs: typing.Sequence[str] = ()):
        if key is None:
            self.module.setdefault(name, where)
            return
        entry = self.classes[key]
        entry["members"].setdefault(name, where)
        if kwargs:
            known = entry["kwargs"].setdefault(name, [])
            known.extend(k for k in kwargs if k not in known)

    def finish(self) -> dict:
        for key, args in self._bases.items():
            self.classes[key]["bases"] = [self.cpp_types[a] for a in args if a in self.cpp_types]
        for entry in self.classes.values():
            file = entry["where"].rpartition(":")[0]
            entry["members"] = {name: int(where.rpartition(":")[2]) if where.rpartition(":")[0] == file else where
                                for name, where in sorted(entry["members"].items())}
            if not entry["kwargs"]:
                del entry["kwargs"]
            if not entry["bases"]:
                del entry["bases"]
        return {"module": dict(sorted(self.module.items())), "classes": dict(sorted(self.classes.items()))}


def read_bindings(api: Api, path: str, text: str) -> None:
    code = blank_comments(text)
    line_of = lambda offset: f"{path}:{code.count(chr(10), 0, offset) + 1}"  # noqa: E731
    variables: typing.Dict[str, typing.Optional[str]] = {"m": None}  # C++ variable -> class key (None: the module)
    for offset, stmt in statements(code):
        head = HEAD.match(stmt)
        key: typing.Optional[str] = None
        rest = 0
        if head:
            kind = head.group(1)
            t_end = balanced(stmt, head.end() - 1, "<", ">")
            template = [a.strip() for _, a in split_top(stmt[head.end():t_end - 1], angle=True)]
            m = re.compile(r"\s*(\w+)?\s*([({])").match(stmt, t_end)
            if not m:
                continue
            var, open_ = m.group(1), m.group(2)
            a_end = balanced(stmt, m.end() - 1, open_, ")" if open_ == "(" else "}")
            args = split_top(stmt[m.end():a_end - 1])
            scope_name = args[0][1].strip()
            name_match = STRING.match(args[1][1]) if len(args) > 1 else None
            if not name_match or scope_name not in variables:
                continue
            where = line_of(offset + m.end() + args[1][0] + args[1][1].index('"'))
            py_kind = "enum" if kind == "enum_" else "class"
            key = api.add_class(name_match.group(1), py_kind, where, variables[scope_name], template[0], template[1:])
            if any(a.strip() == "py::buffer_protocol()" for _, a in args):
                api.add_member(key, "__buffer__", where)
            if var:
                variables[var] = key
            rest = a_end
        else:
            var = VAR_HEAD.match(stmt)
            if not var or var.group(1) not in variables:
                continue
            key, rest = variables[var.group(1)], var.end()
        read_chain(api, key, stmt, rest, offset, line_of, text)


def read_chain(api: Api, key, stmt: str, i: int, offset: int, line_of, raw: str) -> None:
    """The `.def(...)`, `.value(...)` calls chained from offset `i` of `stmt` onto `key`; a call
    wrapped in `utils::deprecate*` (not the TensorRT-RTX-only variants) or followed on its last line
    by a `// Deprecated` comment marks the member deprecated at this tag."""
    exported = []
    call = re.compile(r"\s*\.\s*(\w+)\s*\(")
    attr = re.compile(r'\s*\.\s*attr\s*\(\s*"(\w+)"\s*\)\s*=[^=]').match(stmt, i)
    if attr:  # `m.attr("x") = ...` / `cls.attr("x") = ...`
        api.add_member(key, attr.group(1), line_of(offset + attr.start(1)))
        return
    while True:
        m = call.match(stmt, i)
        if not m:
            break
        end = balanced(stmt, m.end() - 1, "(", ")")
        method, inner, inner_at = m.group(1), stmt[m.end():end - 1], m.end()
        args = split_top(inner)
        first = args[0][1]
        if method in MEMBER_CALLS or (key is None and method == "def"):
            name_match = STRING.match(first)
            where = line_of(offset + inner_at + args[0][0] + (first.index('"') if '"' in first else 0))
            kwargs = [a or b for part in args[1:] for a, b in KWARG.findall(part[1])]
            if method == "def_buffer":
                api.add_member(key, "__buffer__", where)
            elif method == "export_values":
                exported.append(key)
            elif name_match:
                api.add_member(key, name_match.group(1), where, kwargs)
                why = deprecation(raw, offset + m.start(1), offset + end)
                if why and key is not None:
                    api.classes[key].setdefault("deprecated", {})[name_match.group(1)] = why
                if method == "value" and key is not None:
                    api.classes[key].setdefault("_values", []).append((name_match.group(1), where))
            elif method == "def" and first.strip().startswith("py::init"):
                init_kwargs = kwargs + [a or b for a, b in KWARG.findall(first)]
                api.add_member(key, "__init__", where, init_kwargs)
        i = end
    for enum_key in exported:  # the values become members of the enum's scope too
        values = api.classes[enum_key].get("_values", [])
        scope = enum_key.rpartition(".")[0] or None
        for name, where in values:
            api.add_member(scope, name, where)


def deprecation(raw: str, start: int, end: int) -> typing.Optional[str]:
    """Why the binding call raw[start:end] is deprecated (its message or comment), else None."""
    line_end = raw.find("\n", end)
    span = raw[start:len(raw) if line_end < 0 else line_end]
    wrapped = re.search(r'utils::deprecate(?:Member)?\s*\((?:[^"]*?),\s*"([^"]*)"', span, re.S)
    if wrapped:
        return wrapped.group(1)
    comment = re.search(r"//\s*(Deprecated[^\n]*)", span, re.I)
    return comment.group(1).strip() if comment else None


# --------------------------------------------------------------------------- the Python package


def read_package_init(api: Api, path: str, text: str) -> None:
    """Module-level functions and assignments of tensorrt/__init__.py (a template: `##X##` is
    filled in when the wheel is built), and `Class.attr = ...` additions to bound classes."""
    tree = ast.parse(re.sub(r"##(\w+)##", r"TEMPLATE_\1", text))
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            api.add_member(None, node.name, where)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    api.module.pop(target.id, None)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    api.add_member(None, target.id, where)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id in api.classes:
                    api.add_member(target.value.id, target.attr, where)


def read_tag(repo: Path, tag: str) -> dict:
    files = git(repo, "ls-tree", "-r", "--name-only", tag, "python/src").split()
    api = Api()
    for path in sorted(files, key=lambda p: (not p.endswith("pyFoundationalTypes.cpp"), p)):
        if path.endswith(".cpp"):
            read_bindings(api, path, git(repo, "show", f"{tag}:{path}"))
    read_package_init(api, PACKAGE_INIT, git(repo, "show", f"{tag}:{PACKAGE_INIT}"))
    result = api.finish()
    for entry in result["classes"].values():
        entry.pop("_values", None)
    return {"commit": git(repo, "rev-parse", f"{tag}^{{commit}}").strip(), **result}


def dump(data: dict) -> str:
    """JSON with one line per module name and per class (diffs stay readable, the file small)."""
    line = lambda value: json.dumps(value, separators=(", ", ": "))  # noqa: E731
    out = ["{", f' "about": {line(data["about"])},', ' "tags": {']
    for t, (tag, api) in enumerate(data["tags"].items()):
        out += [f"  {line(tag)}: {{", f'   "commit": {line(api["commit"])},', '   "module": {']
        out += [f"    {line(k)}: {line(v)}," for k, v in api["module"].items()]
        out[-1] = out[-1].rstrip(",")
        out += ["   },", '   "classes": {']
        out += [f"    {line(k)}: {line(v)}," for k, v in api["classes"].items()]
        out[-1] = out[-1].rstrip(",")
        out += ["   }", "  }" + ("," if t < len(data["tags"]) - 1 else "")]
    out += [" }", "}"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of NVIDIA/TensorRT (bare is fine)")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = {
        "about": "TensorRT's Python API at each tag of https://github.com/NVIDIA/TensorRT, read from the binding "
                 "sources (python/src/**/*.cpp) and " + PACKAGE_INIT + " by scripts/tensorrt_api.py; "
                 "'where' is file:line at that tag, a member's int is its line in its class's file; "
                 "'kwargs' are the keyword names a method accepts; '__buffer__' marks the buffer protocol; "
                 "'deprecated': members wrapped in utils::deprecate* or marked '// Deprecated' at that tag. "
                 "Regenerate: python scripts/tensorrt_api.py --repo PATH_TO_TENSORRT_CLONE",
        "tags": {tag: read_tag(args.repo, tag) for tag in args.tags},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(data))
    for tag, api in data["tags"].items():
        members = sum(len(c["members"]) for c in api["classes"].values())
        print(f"{tag}: {len(api['module'])} module names, {len(api['classes'])} classes/enums, {members} members")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
