"""Every TensorRT Python name our code uses exists in TensorRT 10.x and 11.x, read from their sources.

tests/data/tensorrt_python_api.json holds TensorRT's Python API at the tags of NVIDIA/TensorRT it
names (scripts/tensorrt_api.py reads the pybind11 binding sources `python/src/**/*.cpp` and the
package's `__init__.py`; each name with its file:line). This test reads export/tensorrt.py and
runtime/tensorrt_backend.py (the only modules that touch TensorRT) with `ast`, finds the type of
each TensorRT object from what created it (`trt.Builder(...)` is a Builder; a method's result type
comes from RETURNS below), and checks at every tag: each `trt.X` / `trt.X.Y`, each method or
property used on a TensorRT object, each keyword argument passed to one, and `bool()`, `str()`,
`bytes()` of one (`__bool__`, `__str__`, the buffer protocol). A name deprecated at a tag fails
unless DEPRECATED_OK says how the code avoids it there.

Receivers the inference cannot see (parameters, attributes set from our own methods) are named
in SEEDS; a seed the code no longer has fails, and so does a method of a TensorRT class we use
called on a receiver of unknown type (add it to SEEDS), so a name the code starts using cannot
go unchecked.

Nothing here ran TensorRT: it checks names against the binding sources, not behaviour.
"""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "tensorrt_python_api.json"
SOURCES = ("export/tensorrt.py", "runtime/tensorrt_backend.py")
MAJORS = {"10", "11"}  # the majors the tensorrt-cu12 / tensorrt-cu13 extras allow (pyproject.toml)

MODULE = ("module",)

# What a TensorRT method returns, where our code uses the result (the C++ function each binding
# wraps, e.g. `create_network` -> IBuilder::createNetworkV2 -> INetworkDefinition*). None: a plain
# value (bool, int, str, None) on which the code calls nothing.
RETURNS: typing.Dict[str, typing.Dict[str, typing.Optional[str]]] = {
    "Builder": {"create_network": "INetworkDefinition", "create_builder_config": "IBuilderConfig",
                "create_optimization_profile": "IOptimizationProfile", "build_serialized_network": "IHostMemory"},
    "IBuilderConfig": {"create_timing_cache": "ITimingCache", "get_timing_cache": "ITimingCache",
                       "set_memory_pool_limit": None, "set_timing_cache": None, "add_optimization_profile": None},
    "ITimingCache": {"serialize": "IHostMemory"},
    "IOptimizationProfile": {"set_shape": None},
    "OnnxParser": {"parse_from_file": None, "get_error": "ParserError"},
    "Runtime": {"deserialize_cuda_engine": "ICudaEngine"},
    "ICudaEngine": {"create_execution_context": "IExecutionContext", "get_tensor_name": None,
                    "get_tensor_mode": "TensorIOMode", "get_tensor_dtype": "DataType"},
    "IExecutionContext": {"set_input_shape": None, "set_tensor_address": None, "execute_async_v3": None,
                          "get_tensor_shape": "Dims"},
}

# Receivers whose type the inference cannot see, per file: parameters and attributes set from our
# own methods (`self.context = self.b.borrow_context(...)`).
SEEDS: typing.Dict[str, typing.Dict[str, tuple]] = {
    "export/tensorrt.py": {"trt": MODULE},
    "runtime/tensorrt_backend.py": {
        "context": ("instance", "IExecutionContext"),  # set_shape / set_address / execute / _run's parameter
        "engine": ("instance", "ICudaEngine"),  # _dtype / _io / _check_io's parameter
        "self.context": ("instance", "IExecutionContext"),  # DeviceARState: borrowed from the backend's pool
    },
}

# Names deprecated at some tag that the code uses, and how it avoids them there.
DEPRECATED_OK = {
    ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "11"):
        "export/tensorrt.py _build_one sets the flag only on TensorRT 10 (11: always strongly typed)",
}

# Names of TensorRT members that these files also use on other objects (onnx protos' `.name`,
# dicts' `.update`): an untyped receiver using one of them is not taken for a TensorRT object.
GENERIC = {"name", "update"}


def _data() -> dict:
    return json.loads(DATA.read_text())


def _tags(data) -> typing.Dict[str, dict]:
    return data["tags"]


def _mro(api: dict, cls: str) -> typing.Iterator[dict]:
    """The entries of `cls` and of its bases in one tag's API."""
    seen, todo = set(), [cls]
    while todo:
        key = todo.pop(0)
        entry = api["classes"].get(key)
        if entry is not None and key not in seen:
            seen.add(key)
            yield entry
            todo += entry.get("bases", [])


def lookup(api: dict, cls: str, name: str) -> typing.Optional[str]:
    """Where `cls.name` is defined in one tag's API (through the class's bases), else None."""
    for entry in _mro(api, cls):
        if name in entry["members"]:
            where = entry["members"][name]
            return f"{entry['where'].rpartition(':')[0]}:{where}" if isinstance(where, int) else where
    return None


def kwargs_of(api: dict, cls: str, name: str) -> typing.Set[str]:
    return {kw for entry in _mro(api, cls) for kw in entry.get("kwargs", {}).get(name, ())}


def deprecated(api: dict, cls: str, name: str) -> typing.Optional[str]:
    entry = api["classes"].get(cls, {})
    return entry.get("deprecated", {}).get(name)


# --------------------------------------------------------------------------- the code's uses


class Use(typing.NamedTuple):
    kind: str  # "module" (trt.X), "member" (X.name on a class or instance), "kwarg", "protocol"
    cls: str  # the class ("" for the module)
    name: str
    where: str  # file:line in this repository


def _key(node) -> typing.Optional[str]:
    """`a.b[...].c` -> "a.b[].c" for names, attributes and subscripts; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _key(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    if isinstance(node, ast.Subscript):
        inner = _key(node.value)
        return None if inner is None else f"{inner}[]"
    return None


class Analysis:
    """The TensorRT uses of one source file (see the module docstring)."""

    def __init__(self, path: str, api_classes: typing.Set[str], text: typing.Optional[str] = None):
        self.path, self.classes = path, api_classes
        self.tree = ast.parse((REPO / path).read_text() if text is None else text)
        self.seeds = dict(SEEDS.get(path, {}))
        self.seeds_used: typing.Set[str] = set()
        self.module_functions = self._functions_returning_module()
        self.attrs: typing.Dict[str, tuple] = {}  # "self.x" / "self.x[]" -> type, per file (classes share names rarely)
        self.uses: typing.List[Use] = []
        self.unknown: typing.List[str] = []  # results of TensorRT calls that RETURNS lacks, then used
        self.untyped: typing.List[typing.Tuple[str, str]] = []  # (name, where) on receivers of unknown type
        for _ in range(3):  # self attributes set in one method and read in another
            self.uses, self.unknown, self.untyped = [], [], []
            for node in ast.walk(self.tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self._function(node)

    def _functions_returning_module(self) -> typing.Set[str]:
        """Functions that `import tensorrt` and return it (`_tensorrt()`)."""
        found = set()
        for fn in ast.walk(self.tree):
            if isinstance(fn, ast.FunctionDef):
                bound = {a.asname or a.name for n in ast.walk(fn) if isinstance(n, ast.Import)
                         for a in n.names if a.name == "tensorrt"}
                if any(isinstance(n, ast.Return) and isinstance(n.value, ast.Name) and n.value.id in bound
                       for n in ast.walk(fn)):
                    found.add(fn.name)
        return found

    def where(self, node) -> str:
        return f"{self.path}:{node.lineno}"

    # -- types -------------------------------------------------------------------------------

    def _function(self, fn) -> None:
        env: typing.Dict[str, tuple] = {}
        for arg in fn.args.args + fn.args.kwonlyargs:
            if arg.arg in self.seeds:
                env[arg.arg] = self.seeds[arg.arg]
                self.seeds_used.add(arg.arg)
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "tensorrt":
                        env[alias.asname or alias.name] = MODULE
        body = [n for n in ast.walk(fn) if isinstance(n, ast.stmt)]
        body.sort(key=lambda n: (n.lineno, n.col_offset))
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    self._bind(target, stmt.value, env)
        self._visit(fn, env)

    def _bind(self, target, value, env) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts):
                self._bind(t, v, env)
            return
        key = _key(target)
        kind = self.type_of(value, env, record=False)
        if key is None or kind is None:
            return
        if key.startswith("self."):
            self.attrs[key] = kind
        else:
            env[key] = kind

    def type_of(self, node, env, record=True) -> typing.Optional[tuple]:
        key = _key(node)
        if key is not None:
            for table in (env, self.attrs):
                if key in table:
                    return table[key]
            if key in self.seeds and not isinstance(node, ast.Name):
                self.seeds_used.add(key)
                return self.seeds[key]
        if isinstance(node, ast.Attribute):
            owner = self.type_of(node.value, env, record)
            if owner == MODULE:
                return ("class", node.attr) if node.attr in self.classes else ("value",)
            if owner and owner[0] == "class":
                nested = f"{owner[1]}.{node.attr}"
                return ("class", nested) if nested in self.classes else ("value",)
            if owner and owner[0] == "instance":
                return ("value",)
            return None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in self.module_functions:
                return MODULE
            callee = self.type_of(func, env, record)
            if callee and callee[0] == "class":
                return ("instance", callee[1])
            if isinstance(func, ast.Attribute):
                owner = self.type_of(func.value, env, record)
                if owner and owner[0] == "instance":
                    returns = RETURNS.get(owner[1], {})
                    if func.attr in returns:
                        result = returns[func.attr]
                        return None if result is None else ("instance", result)
                    return ("unknown", f"{owner[1]}.{func.attr}")
        return None

    # -- uses --------------------------------------------------------------------------------

    def _visit(self, fn, env) -> None:
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute):
                owner = self.type_of(node.value, env)
                if owner == MODULE:
                    self.uses.append(Use("module", "", node.attr, self.where(node)))
                elif owner and owner[0] in ("class", "instance"):
                    self.uses.append(Use("member", owner[1], node.attr, self.where(node)))
                elif owner and owner[0] == "unknown":
                    self.unknown.append(f"{self.where(node)}: .{node.attr} on the result of {owner[1]}()")
                elif owner is None and _key(node.value) != "self":
                    self.untyped.append((node.attr, self.where(node)))
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.keywords:
                    owner = self.type_of(node.func.value, env)
                    if owner and owner[0] in ("class", "instance"):
                        for kw in node.keywords:
                            self.uses.append(Use("kwarg", owner[1], f"{node.func.attr}({kw.arg}=)", self.where(node)))
                callee = self.type_of(node.func, env)
                if callee and callee[0] == "class" and node.keywords:
                    for kw in node.keywords:
                        self.uses.append(Use("kwarg", callee[1], f"__init__({kw.arg}=)", self.where(node)))
                if isinstance(node.func, ast.Name) and node.func.id in ("bool", "str", "bytes", "memoryview") \
                        and len(node.args) == 1:
                    owner = self.type_of(node.args[0], env)
                    if owner and owner[0] == "instance":
                        protocol = {"bool": "__bool__", "str": "__str__"}.get(node.func.id, "__buffer__")
                        self.uses.append(Use("protocol", owner[1], protocol, self.where(node)))
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                owner = self.type_of(node.operand, env)
                if owner and owner[0] == "instance" and owner[1] == "IOptimizationProfile":
                    self.uses.append(Use("protocol", owner[1], "__bool__", self.where(node)))


def analyses(data) -> typing.List[Analysis]:
    classes = set().union(*(set(api["classes"]) for api in _tags(data).values()))
    return [Analysis(path, classes) for path in SOURCES]


def problems(data, found: typing.List[Analysis]) -> typing.List[str]:
    """Every use missing, deprecated or of an unknown keyword at some tag of `data`."""
    out = []
    for tag, api in _tags(data).items():
        major = re.match(r"v?(\d+)", tag).group(1)
        for a in found:
            for use in a.uses:
                if use.kind == "module":
                    if use.name not in api["module"]:
                        out.append(f"{use.where}: trt.{use.name} does not exist in TensorRT {tag}")
                elif use.kind == "kwarg":
                    method, kw = re.match(r"(\w+)\((\w+)=\)", use.name).groups()
                    if kw not in kwargs_of(api, use.cls, method):
                        out.append(f"{use.where}: {use.cls}.{method} takes no keyword {kw!r} in TensorRT {tag} "
                                   f"(its keywords: {sorted(kwargs_of(api, use.cls, method))})")
                else:
                    if lookup(api, use.cls, use.name) is None:
                        what = {"__bool__": "bool() of", "__str__": "str() of", "__buffer__": "bytes() of"}.get(
                            use.name, f".{use.name} on")
                        out.append(f"{use.where}: {what} {use.cls} is not defined in TensorRT {tag}")
                    why = deprecated(api, use.cls, use.name)
                    if why and (use.cls, use.name, major) not in DEPRECATED_OK:
                        out.append(f"{use.where}: {use.cls}.{use.name} is deprecated in TensorRT {tag}: {why}")
    return sorted(set(out))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def found(data):
    return analyses(data)


def test_the_data_covers_both_majors_from_the_oldest_supported_release(data):
    tags = _tags(data)
    assert {re.match(r"v?(\d+)", t).group(1) for t in tags} == MAJORS
    assert "v10.0.1" in tags  # the first TensorRT 10 GA (tensorrt-cu12 10.0.1 on PyPI)
    for tag, api in tags.items():
        assert re.fullmatch(r"[0-9a-f]{40}", api["commit"]), tag
        assert lookup(api, "Builder", "create_network") and lookup(api, "IExecutionContext", "execute_async_v3"), tag


def test_every_tensorrt_name_the_code_uses_exists_at_every_tag(data, found):
    assert not problems(data, found)


def test_the_code_uses_what_we_expect(found):
    """The inference sees the calls: a sample of uses per file (a broken inference finds nothing)."""
    uses = {(u.cls, u.name) for a in found for u in a.uses}
    for expected in [("", "Builder"), ("Builder", "create_network"),
                     ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
                     ("IBuilderConfig", "set_timing_cache(ignore_mismatch=)"), ("IOptimizationProfile", "__bool__"),
                     ("OnnxParser", "num_errors"), ("ParserError", "__str__"), ("IHostMemory", "__buffer__"),
                     ("", "Runtime"), ("Runtime", "deserialize_cuda_engine"), ("ICudaEngine", "num_io_tensors"),
                     ("IExecutionContext", "set_tensor_address"), ("TensorIOMode", "INPUT"), ("Logger", "WARNING"),
                     ("", "nptype"), ("", "__version__")]:
        assert expected in uses, expected


def untyped_tensorrt_calls(data, found: typing.List[Analysis]) -> typing.List[str]:
    """Methods and properties of the TensorRT classes the code uses, used on receivers of unknown type."""
    used_classes = {u.cls for a in found for u in a.uses if u.kind == "member"}
    members = set()
    for api in _tags(data).values():
        for cls in used_classes:
            entry = api["classes"].get(cls)
            if entry and entry["kind"] == "class":
                members |= {m for m in entry["members"] if not m.startswith("_")}
    return sorted({f"{where}: .{name}" for a in found for name, where in a.untyped
                   if name in members and name not in GENERIC})


def test_no_tensorrt_object_goes_unchecked(data, found):
    """Results of TensorRT calls used without a RETURNS entry, seeds the code no longer has, and
    methods of the TensorRT classes we use called on receivers of unknown type."""
    assert not [u for a in found for u in a.unknown]
    stale = [f"{a.path}: {s}" for a in found for s in a.seeds if s not in a.seeds_used]
    assert not stale, f"SEEDS names receivers the code no longer has: {stale}"
    suspicious = untyped_tensorrt_calls(data, found)
    assert not suspicious, f"TensorRT methods on receivers of unknown type (add them to SEEDS): {suspicious}"


def test_the_check_fails_for_a_name_missing_at_one_tag(data, found):
    """Drop one name from one tag: the check reports it (it is not vacuous)."""
    broken = json.loads(json.dumps(data))
    del broken["tags"]["v11.1"]["classes"]["IExecutionContext"]["members"]["set_input_shape"]
    del broken["tags"]["v10.0.1"]["classes"]["IBuilderConfig"]["kwargs"]["set_timing_cache"]
    del broken["tags"]["v10.0.1"]["classes"]["IOptimizationProfile"]["members"]["__bool__"]
    found_problems = problems(broken, found)
    assert any("IExecutionContext is not defined in TensorRT v11.1" in p and "set_input_shape" in p
               for p in found_problems), found_problems
    assert any("set_timing_cache takes no keyword 'ignore_mismatch' in TensorRT v10.0.1" in p for p in found_problems)
    assert any("bool() of IOptimizationProfile is not defined in TensorRT v10.0.1" in p for p in found_problems)


SNIPPET = """
def build(logger, path):
    import tensorrt as trt
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False, strict=True)
    builder.build_engine(network, config)
    return builder.create_optimization_profile().is_valid()


def run(ctx, stream):
    ctx.set_input_shape("input_ids", (1, 1))
"""


def test_a_name_the_code_starts_using_fails_until_the_data_covers_it(data, found):
    classes = set().union(*(set(api["classes"]) for api in _tags(data).values()))
    snippet = Analysis("snippet.py", classes, SNIPPET)
    reported = "\n".join(problems(data, [snippet]))
    assert ".build_engine on Builder is not defined in TensorRT v10.0.1" in reported  # removed in 10.0
    assert ".is_valid on IOptimizationProfile is not defined" in reported  # issue 23 item 4
    assert "set_timing_cache takes no keyword 'strict'" in reported
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED is deprecated in TensorRT v11.1" not in reported  # allowed
    assert "snippet.py:13: .set_input_shape" in untyped_tensorrt_calls(data, [*found, snippet])  # unknown receiver


def test_strong_typing_is_deprecated_in_11_and_a_flag_in_10(data):
    """What `_build_one` relies on, from the sources: the flag exists at every tag, deprecated at 11.x only."""
    for tag, api in _tags(data).items():
        assert lookup(api, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED"), tag
        is_deprecated = deprecated(api, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED") is not None
        assert is_deprecated == tag.startswith("v11"), tag


# --------------------------------------------------------------------------- _build_one on 10.x and 11.x


# kSTRONGLY_TYPED's value (include/NvInfer.h: = 1 at v10.0.1:9407 and v10.16:12113; = 0, deprecated, at
# v11.0:11415 and v11.1:11471) and each major's strong-typing rule
STRONGLY_TYPED = {"10.16.1.11": 1, "11.1.0.106": 0}


@pytest.mark.parametrize("version", sorted(STRONGLY_TYPED))
def test_build_one_creates_a_strongly_typed_network_on_both_majors(version, tmp_path):
    from prologue_export.export import tensorrt as export_trt

    from .fakes.tensorrt import fake_tensorrt

    trt = fake_tensorrt(version=version)
    trt.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (),
                                             {"STRONGLY_TYPED": STRONGLY_TYPED[version]})
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new_tokens"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "new_tokens"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "g.onnx"))
    profile = {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [2, 4]}}
    export_trt._build_one(trt, trt.Logger(), tmp_path / "g.onnx", profile, tmp_path / "cache", 0.01, "g")
    # 10.x: the kSTRONGLY_TYPED bit (1 << 1); 11.x: no flag (always strongly typed; the flag is ignored there)
    assert trt.flags == ([1 << 1] if version.startswith("10.") else [0])


@pytest.mark.parametrize("version,ok", [("10.0.1", True), ("11.4.0.106", True), ("9.3.0", False), ("12.0.0", False),
                                        ("unknown", False)])
def test_building_engines_needs_tensorrt_10_or_11(version, ok, monkeypatch):
    import sys

    from prologue_export.export import tensorrt as export_trt
    from prologue_export.export.errors import ExportError

    from .fakes.tensorrt import fake_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version=version))
    if ok:
        assert export_trt._tensorrt().__version__ == version
    else:
        with pytest.raises(ExportError, match="10.x and 11.x"):
            export_trt._tensorrt()
