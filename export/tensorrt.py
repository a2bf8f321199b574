"""TensorRT engines from a bundle's ONNX graphs: `prologue build-engines BUNDLE` (and
`prologue export --tensorrt`).

One engine per graph, built with the TensorRT Python builder from the bundle's verified fp32
ONNX: a strongly typed network (every tensor's type comes from the graph, so what runs is what
the graph says), one optimisation profile per engine (min 1, opt = the serving shape, max from
`--max-batch`), a timing cache kept outside the bundle and reused across builds, and the
engine's provenance (TensorRT version, GPU name and compute capability, precision, profile)
written into the manifest, which also vouches for the engine file's sha256.

Reduced precision under strong typing is a property of the graph, so `fp16`/`bf16` engines are
built from a copy of the ONNX whose weight matmuls run in that type (weights stored in it, the
activation cast in, the result cast back to fp32): norms, softmax, RoPE, the sampling and the
logits projection (the matmul that produces the vocabulary) stay fp32. That rewrite is plain
ONNX and is tested on the CPU; building and running engines needs TensorRT and a GPU.
"""

from __future__ import annotations

import copy
import datetime
import os
import shlex
import shutil
import stat
import tempfile
import typing
from pathlib import Path

import numpy as np

from ..runtime.bundle import ENGINE_PRECISIONS, MANIFEST, Bundle, tensorrt_onnx_name  # noqa: F401 (re-exported)
from ..runtime.contract import ENGINE_GRAPHS, profile_shapes
from ..runtime.cuda import device_info
from ..runtime.files import sha256_file, write_bytes_atomic
from ..runtime.tensorrt_backend import engine_file_name
from .errors import ExportError
from .manifest import Published, manifest_text, write_manifest
from .trt_support import OPERATORS_MD, TOPK_MAX_K, check_model

PRECISIONS = ENGINE_PRECISIONS
MIN_REDUCED_K = 16  # constant matmuls with a shorter reduction (the RoPE rotation) are not weights
DEFAULT_WORKSPACE_GB = 8.0


def default_timing_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "prologue-export" / "tensorrt-timing.cache"


# --------------------------------------------------------------------------- profiles


def engine_profile(contract: dict, max_batch: int, opt_batch: typing.Optional[int] = None) -> dict:
    """min/opt/max shapes of every input of one graph (`runtime/contract.py` `profile_shapes`: the
    batch-like axes from `batch_ranges`, the others from the manifest); a bad batch is an ExportError."""
    try:
        return profile_shapes(contract, max_batch, opt_batch)
    except ValueError as exc:
        raise ExportError(str(exc).replace("max batch", "--max-batch", 1)) from None


# --------------------------------------------------------------------------- reduced precision


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _names_used(nodes) -> typing.Set[str]:
    """Every value name the nodes read, including inside their subgraphs (`If` branches read
    initializers of the outer graph)."""
    used = set()
    for node in nodes:
        used.update(node.input)
        for attr in node.attribute:
            for graph in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used |= _names_used(graph.node)
    return used


def inline_conditionals(model):
    """A copy of an ONNX model whose top-level `If` nodes are replaced by both branches and a
    `Where(cond, then, else)`: the same outputs without control flow.

    The ar_step graph sorts for top-k / top-p inside `If`s so that ONNX Runtime skips the sort
    when they are off; TensorRT runs conditionals lazily, which can make an engine impossible to
    capture as a CUDA graph, and a sort costs little on a GPU. Returns (model, Ifs inlined)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes, inlined = [], 0
    for node in graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        branches = {a.name: a.g for a in node.attribute}
        outputs = {}
        for key in ("then_branch", "else_branch"):
            sub = branches[key]
            prefix = f"{node.name or 'if'}__{key}__"
            local = {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
            rename = {name: prefix + name for name in local}
            for t in sub.initializer:
                copy = onnx.TensorProto.FromString(t.SerializeToString())
                copy.name = rename[t.name]
                graph.initializer.append(copy)
            for n in sub.node:
                if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                    raise ExportError(f"cannot inline {node.name}: its {key} holds nested control flow")
                copy = onnx.NodeProto.FromString(n.SerializeToString())
                copy.name = prefix + n.name
                copy.input[:] = [rename.get(i, i) for i in n.input]
                copy.output[:] = [rename[o] for o in n.output]
                nodes.append(copy)
            outputs[key] = [rename.get(o.name, o.name) for o in sub.output]
        for out, yes, no in zip(node.output, outputs["then_branch"], outputs["else_branch"]):
            nodes.append(helper.make_node("Where", [node.input[0], yes, no], [out], name=f"{node.name}__select_{out}"))
        inlined += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return model, inlined


def reduce_matmul_precision(model, precision: str, keep_output_dims: typing.Sequence[int] = ()):
    """A copy of an fp32 ONNX model whose weight matmuls run in `precision` (`fp16`/`bf16`).

    For each `MatMul` whose second input is a 2-D fp32 initializer (a weight) and whose output
    width is not in `keep_output_dims` (the vocabulary: logits stay fp32): the weight is stored
    in the low type, the activation is cast to it and the product cast back to float32. Returns
    (model, number of matmuls converted)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in ("fp16", "bf16"):
        raise ExportError(f"reduced precision must be fp16 or bf16, got {precision!r}")
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, converted, done = [], 0, {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2
                or weight.dims[1] in keep_output_dims or weight.dims[0] < MIN_REDUCED_K):  # not the RoPE rotation
            new_nodes.append(node)
            continue
        if weight.name not in done:
            w = numpy_helper.to_array(weight)
            low_name = f"{weight.name}__{precision}"
            if precision == "fp16":
                tensor = numpy_helper.from_array(w.astype(np.float16), low_name)
            else:
                tensor = helper.make_tensor(low_name, TensorProto.BFLOAT16, list(w.shape),
                                            _to_bf16_bits(w).tobytes(), raw=True)
            graph.initializer.append(tensor)
            done[weight.name] = low_name
        a_cast, y_low = f"{node.name}__in_{precision}", f"{node.name}__out_{precision}"
        new_nodes.append(helper.make_node("Cast", [node.input[0]], [a_cast], to=low, name=f"{node.name}__cast_in"))
        new_nodes.append(helper.make_node("MatMul", [a_cast, done[weight.name]], [y_low], name=node.name))
        new_nodes.append(helper.make_node("Cast", [y_low], [node.output[0]], to=TensorProto.FLOAT,
                                          name=f"{node.name}__cast_out"))
        converted += 1
    used = _names_used(new_nodes)
    kept = [t for t in graph.initializer if t.name in used or t.name in {i.name for i in graph.input}]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, converted


# --------------------------------------------------------------------------- the ONNX engines are built from


def cap_topk(model, limit: int = TOPK_MAX_K):
    """A copy whose TopK nodes keep at most `limit` (TensorRT's TopK takes K < 3840): each
    constant K above it gets its own initializer of `limit`. The ar_step graph's TopK keeps the
    largest top-k the vocabulary allows (16384 for a 2d model); its engine then serves top_k up
    to `limit`, which the tensorrt backend enforces. Returns (model, the smallest K or None, changed)."""
    import onnx
    from onnx import numpy_helper

    from .trt_support import constant_value

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, cap, changed = model.graph, None, False
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        k = constant_value([graph], node.input[1])
        if k is None:
            continue  # the compatibility check reports a computed K
        k = int(k.reshape(-1)[0])
        if k > limit:
            name = f"{node.name or node.output[0]}__k_tensorrt"
            graph.initializer.append(numpy_helper.from_array(np.array([limit], dtype=np.int64), name))
            node.input[1] = name
            k, changed = limit, True
        cap = k if cap is None else min(cap, k)
    return model, cap, changed


def tensorrt_model(model, precision: str, vocab_size: int):
    """The ONNX a TensorRT engine is built from: `If`s inlined, TopK capped, weight matmuls in
    `precision`. Returns (model, facts for the manifest)."""
    model, n_if = inline_conditionals(model)
    model, top_k_max, capped = cap_topk(model)
    facts = {"inlined_ifs": n_if, "reduced_matmuls": 0}
    if top_k_max is not None:
        facts.update(top_k_max=top_k_max, top_k_capped=capped)
    if precision != "fp32":
        model, facts["reduced_matmuls"] = reduce_matmul_precision(model, precision, keep_output_dims=[vocab_size])
    return model, facts


def check_for_tensorrt(model, what: str) -> None:
    """Refuse a graph outside TensorRT 10's ONNX operator table, listing every problem."""
    problems = check_model(model)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ExportError(f"{what} is not buildable by TensorRT 10 ({OPERATORS_MD}):\n  {shown}")


def _tensors(graph):
    """Every tensor a graph holds: initializers and node attributes, inside subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _tensors(sub)


def verified_model(bundle: Bundle, graph: str):
    """The ONNX model of `graph` made from the bytes `Bundle.read_verified` checked against the
    manifest, never from the file read again; its external weights (`<file>.data`) are read and
    checked the same way and placed in the model in memory, as the ONNX Runtime backend hands them
    to ONNX Runtime. A graph swapped after `Bundle()` is refused, never vouched for."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    file = bundle.graphs[graph]["file"]
    model = onnx.load_model_from_string(bundle.read_verified(file))
    external = [t for t in _tensors(model.graph) if uses_external_data(t)]
    if not external:
        return model
    name = file + ".data"
    if name not in bundle.files:
        raise ExportError(f"{bundle.path / file} keeps weights outside the graph, but the bundle does not vouch for "
                          f"{name}; re-export the bundle")
    data = bundle.read_verified(name)
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", len(data) - offset))
        except ValueError:
            offset = length = -1
        if info.get("location") != name or offset < 0 or length < 0 or offset + length > len(data):
            raise ExportError(f"{bundle.path / file}: tensor {tensor.name!r} points outside the checked {name}; "
                              "re-export the bundle")
        tensor.raw_data = data[offset:offset + length]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _staging(bundle: Bundle) -> Path:
    """An exclusively created, private folder beside the bundle (same file system: files move in by rename)."""
    return Path(tempfile.mkdtemp(prefix=f".{bundle.path.name[:64]}.tensorrt-", dir=bundle.path.parent))


def _stage_tensorrt(bundle: Bundle, precision: str, max_batch, opt_batch, graphs, staging: Path,
                    log) -> typing.Tuple[dict, typing.List[str]]:
    """Write into `staging` the ONNX files the engines are built from (from the verified bytes),
    check each against TensorRT's operator table; returns (the `tensorrt.<precision>` section, the
    files written). Nothing in the bundle changes."""
    max_batch = bundle.max_batch if max_batch is None else max_batch
    graphs = [g for g in (graphs or ENGINE_GRAPHS) if g in bundle.graphs]
    if not graphs:
        raise ExportError(f"{bundle.path} has none of the graphs {', '.join(ENGINE_GRAPHS)}")
    entries, files = {}, []
    for graph in graphs:
        source = bundle.graphs[graph]["file"]
        profile = engine_profile(bundle.graphs[graph], max_batch, opt_batch)  # a bad batch before any work
        model, facts = tensorrt_model(verified_model(bundle, graph), precision, bundle.vocab.vocab_size)
        check_for_tensorrt(model, f"{graph} ({precision})")
        name = source
        if facts["inlined_ifs"] or facts["reduced_matmuls"] or facts.get("top_k_capped"):
            name = tensorrt_onnx_name(graph, precision)
            files += _save(model, staging / name)
        entries[graph] = {"onnx": name, "source": source, **facts, "profile": profile}
        log(f"[tensorrt] {graph} ({precision}): {name}, {facts['inlined_ifs']} If inlined, "
            f"{facts['reduced_matmuls']} weight matmuls in {precision}; TensorRT operator check passed")
    return {"operators_table": OPERATORS_MD, "max_batch": max_batch, "graphs": entries}, files


def prepare_tensorrt(bundle_path, precision: str = "fp16", max_batch: typing.Optional[int] = None,
                     opt_batch: typing.Optional[int] = None, graphs: typing.Optional[typing.Sequence[str]] = None,
                     log=print, digest: typing.Optional[str] = None) -> Published:
    """Write into the bundle the exact ONNX files its engines are built from, check each against
    TensorRT's operator table, and list them in the manifest's `tensorrt` section (per precision,
    per graph: file, source graph, profile, what was rewritten). A graph that needs no rewrite
    (no `If`, fp32) is built from the bundle's own file. Needs onnx, not TensorRT.

    All or nothing: the files are made from the verified bytes in a staging folder and moved in
    with the manifest written last (`_install`). Returns the section, with `.digest` (the new
    manifest's sha256); `digest` pins the bundle read (`Bundle(path, digest=...)`)."""
    _check_precision(precision)
    bundle = Bundle(bundle_path, digest=digest)  # verifies every file before we add to it
    staging = _staging(bundle)
    try:
        section, files = _stage_tensorrt(bundle, precision, max_batch, opt_batch, graphs, staging, log)
        written = _install(bundle, staging, files, lambda m: m.setdefault("tensorrt", {}).__setitem__(precision, section))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Published(section, written)


def _save(model, path: Path) -> typing.List[str]:
    import onnx

    external = model.ByteSize() > 2 * 1024**3
    onnx.save(model, str(path), save_as_external_data=external,
              location=path.name + ".data" if external else None)
    return [path.name] + ([path.name + ".data"] if external else [])


def trtexec_commands(bundle_path, precision: str = "fp16", timing_cache=None,
                     workspace_gb: float = DEFAULT_WORKSPACE_GB, digest: typing.Optional[str] = None) -> typing.List[str]:
    """`trtexec` command lines that build the bundle's engines from the files of its `tensorrt`
    section (`prepare_tensorrt` writes them), one per graph, with the same profile, strong typing,
    workspace and timing cache as `build_engines`; `digest` pins the manifest read (give the one
    `prepare_tensorrt` returned: the commands are then those of the section it wrote)."""
    bundle = Bundle(bundle_path, check_hashes=False, digest=digest)  # only names and profiles are read; nothing runs
    section = bundle.tensorrt.get(precision)
    if not section:
        raise ExportError(f"{bundle.path} has no TensorRT {precision} files yet: run prologue build-engines "
                          f"{bundle.path} --precision {precision} --print-trtexec")
    cache = Path(timing_cache) if timing_cache else default_timing_cache()
    lines = []
    for graph, entry in section["graphs"].items():
        shapes = {k: ",".join(f"{name}:{'x'.join(str(d) for d in dims[k])}" for name, dims in entry["profile"].items())
                  for k in ("min", "opt", "max")}
        if entry["onnx"] not in bundle.files:
            raise ExportError(f"{bundle.path}: the tensorrt section names {entry['onnx']!r}, which the bundle does not "
                              f"hold; run prologue build-engines {bundle.path} --precision {precision} --print-trtexec")
        lines.append(" ".join(shlex.quote(arg) for arg in [
            "trtexec", f"--onnx={bundle.path / entry['onnx']}",
            f"--saveEngine={bundle.path / engine_file_name(graph, precision)}", "--stronglyTyped",
            f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}",
            f"--memPoolSize=workspace:{int(workspace_gb * 1024)}M", f"--timingCacheFile={cache}"]))
    return lines


# --------------------------------------------------------------------------- building


TENSORRT_MAJORS = (10, 11)  # every TensorRT name used here is checked against both (tests/test_tensorrt_api.py)


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed here: building engines needs a CUDA GPU host with "
                          "`pip install 'prologue-export[tensorrt-cu12]'` (CUDA 12 driver) or "
                          "'prologue-export[tensorrt-cu13]' (CUDA 13); the ONNX bundle works without it, and "
                          "`prologue build-engines BUNDLE --print-trtexec` prints trtexec commands") from None
    if _tensorrt_major(tensorrt) not in TENSORRT_MAJORS:
        majors = " and ".join(f"{m}.x" for m in TENSORRT_MAJORS)
        raise ExportError(f"TensorRT {tensorrt.__version__} is installed; building engines is written for TensorRT "
                          f"{majors} (pip install 'prologue-export[tensorrt-cu12]' or '[tensorrt-cu13]'); "
                          "`prologue build-engines BUNDLE --print-trtexec` prints trtexec commands for any version")
    return tensorrt


def _tensorrt_major(trt) -> int:
    """The major version of the `tensorrt` module (`__version__`, e.g. "10.7.0.23"); -1 if unreadable."""
    head = str(getattr(trt, "__version__", "")).split(".")[0]
    return int(head) if head.isdigit() else -1


def _checked(ok, what: str) -> None:
    if not ok:
        raise ExportError(f"TensorRT refused to {what}")


def _build_one(trt, logger, onnx_path: Path, profile: dict, cache_path: Path, workspace_gb: float, graph: str):
    """One strongly typed engine from `onnx_path`; returns the serialized engine and the timing cache."""
    builder = trt.Builder(logger)
    # Strong typing is a creation flag in TensorRT 10 (kSTRONGLY_TYPED = 1: include/NvInfer.h:9407 at v10.0.1,
    # :12113 at v10.16) and the only mode in TensorRT 11, where the flag is deprecated and ignored
    # (kSTRONGLY_TYPED TRT_DEPRECATED_ENUM = 0, "Strongly typed mode is always enabled": :11415 at v11.0,
    # :11471 at v11.1): set on 10 only.
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if _tensorrt_major(trt) < 11 else 0
    network = builder.create_network(strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {graph}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    _checked(cache is not None and config.set_timing_cache(cache, ignore_mismatch=False),
             f"use the timing cache {cache_path} (delete it if it came from another TensorRT or GPU)")
    opt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    # IOptimizationProfile has no is_valid in Python: its validity is bool(profile) (`__bool__` ->
    # isValid, TensorRT python/src/infer/pyCore.cpp:879-880 at v10.7.0, :1049-1050 at v11.1)
    _checked(bool(opt_profile), f"the profile of {graph} (min <= opt <= max for every input)")
    _checked(config.add_optimization_profile(opt_profile) >= 0, f"add the optimisation profile of {graph}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build the {graph} engine (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(bundle_path, precision: str = "fp16", max_batch: typing.Optional[int] = None,
                  opt_batch: typing.Optional[int] = None, timing_cache=None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                  graphs: typing.Optional[typing.Sequence[str]] = None, log=print,
                  digest: typing.Optional[str] = None) -> Published:
    """Build and add engines to the bundle at `bundle_path`; returns the manifest's `engines`, with
    `.digest` (the sha256 of the manifest written); `digest` pins the bundle read.

    The ONNX files engines are built from (`_stage_tensorrt`: made from the verified bytes, checked
    against TensorRT's operator table) and the engines built from exactly those staged files go into
    a staging folder; only when every engine is built are they moved in, with the manifest written
    last (`_install`). On any failure the bundle is as it was."""
    _check_precision(precision)
    trt = _tensorrt()  # before reading anything
    bundle = Bundle(bundle_path, digest=digest)
    info = device_info()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache()
    logger = trt.Logger(trt.Logger.WARNING)
    staging = _staging(bundle)
    engines = {}
    try:
        section, files = _stage_tensorrt(bundle, precision, max_batch, opt_batch, graphs, staging, log)
        for graph, entry in section["graphs"].items():
            log(f"[engines] building {graph} ({precision}, batch up to {section['max_batch']}) ...")
            engine, cache = _build_one(trt, logger, _build_input(bundle, staging, entry), entry["profile"],
                                       cache_path, workspace_gb, graph)
            name = engine_file_name(graph, precision)
            (staging / name).write_bytes(engine)
            files.append(name)
            write_bytes_atomic(cache_path, cache, "TensorRT timing cache")
            engines[graph] = {
                "file": name, "onnx": entry["onnx"], "precision": precision, "strongly_typed": True,
                "profile": entry["profile"], "max_batch": section["max_batch"], "tensorrt_version": trt.__version__,
                "compute_capability": info["compute_capability"], "device": info["name"],
                "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **({"top_k_max": entry["top_k_max"]} if "top_k_max" in entry else {}),
            }

        def update(manifest: dict) -> None:
            manifest.setdefault("tensorrt", {})[precision] = section
            manifest["engines"] = {**manifest.get("engines", {}), **engines}

        written = _install(bundle, staging, files, update)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Published(engines, written)


def _build_input(bundle: Bundle, staging: Path, entry: dict) -> Path:
    """The staged file an engine is built from: the `.trt.onnx` staged for it, or, for a graph with
    nothing to rewrite, a staged copy of the bundle's verified bytes (and external weights): TensorRT
    never reads a bundle file that was not checked."""
    if entry["onnx"] != entry["source"]:
        return staging / entry["onnx"]
    folder = staging / "sources"
    folder.mkdir(exist_ok=True)
    for name in (entry["source"], entry["source"] + ".data"):
        if name in bundle.files:
            (folder / name).write_bytes(bundle.read_verified(name))
    return folder / entry["source"]


def _stale_files(manifest: dict) -> typing.List[str]:
    """Engines and TensorRT ONNX files (with their `.data`) that no entry of `manifest` references
    any more: a replaced engine or ONNX copy."""
    referenced = {g["file"] for g in manifest["graphs"].values()} | {e["file"] for e in manifest.get("engines", {}).values()}
    referenced |= {e["onnx"] for s in manifest.get("tensorrt", {}).values() for e in s["graphs"].values()}
    stale = []
    for name in manifest["files"]:
        base = name[:-len(".data")] if name.endswith(".data") else name
        if base not in referenced and (name.endswith(".engine") or ".trt.onnx" in name):
            stale.append(name)
    return stale


def _plain_file(folder: Path, name: str) -> bool:
    """`name` is a single path component naming a regular file (not a link) directly in `folder`."""
    if not name or name in (".", "..", MANIFEST) or Path(name).name != name or "/" in name or "\\" in name:
        return False
    try:
        return stat.S_ISREG(os.lstat(folder / name).st_mode)
    except OSError:
        return False


def _install(bundle: Bundle, staging: Path, names: typing.Sequence[str], update) -> str:
    """Move the files `names` from `staging` into the bundle, vouch for them in a copy of the
    manifest that `bundle` verified (never the file read again), apply `update(manifest)`, drop the
    files nothing references any more, and write the manifest last, atomically; returns its digest.

    Files it replaces and files it drops (only those the verified manifest listed and that are plain
    files in the bundle folder: no path component, no link) are first moved aside into `staging`; if
    anything fails before the manifest is written they are put back and the new files taken out, so
    the bundle is as it was."""
    folder, manifest = bundle.path, copy.deepcopy(bundle.manifest)
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
    update(manifest)
    stale = [n for n in _stale_files(manifest) if n not in names]
    for name in stale:
        manifest["files"].pop(name)
    manifest_text(manifest, folder / MANIFEST)  # unwritable JSON is refused before anything moves
    aside = Path(tempfile.mkdtemp(prefix="previous-", dir=staging))
    moved, saved = [], []
    try:
        for name in names:
            if os.path.lexists(folder / name):
                os.replace(folder / name, aside / name)
                saved.append(name)
            os.replace(staging / name, folder / name)
            moved.append(name)
        for name in stale:
            if _plain_file(folder, name):
                os.replace(folder / name, aside / name)
                saved.append(name)
        return write_manifest(folder / MANIFEST, manifest)
    except BaseException:
        for name in moved:
            _quietly(os.replace, folder / name, staging / name)
        for name in saved:
            _quietly(os.replace, aside / name, folder / name)
        raise


def _quietly(call, *args) -> None:
    """A rollback step: its own failure must not hide the error on its way out."""
    try:
        call(*args)
    except OSError:
        pass


def install_engines(bundle, staging: Path, engines: dict) -> str:
    """Move built engine files from `staging` into the bundle (a `Bundle`, or its folder, which is
    verified first) and record them in the manifest (written last, atomically); returns the new
    manifest's digest. Engines of the same graphs built before are replaced."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    return _install(bundle, staging, [m["file"] for m in engines.values()],
                    lambda m: m.__setitem__("engines", {**m.get("engines", {}), **engines}))
