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

import datetime
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

import numpy as np

from ..runtime.bundle import MANIFEST, Bundle, sha256_file
from ..runtime.contract import DEFAULT_MAX_BATCH, ENGINE_GRAPHS, OPT_BATCH
from ..runtime.cuda import device_info
from ..runtime.tensorrt_backend import engine_file_name
from .errors import ExportError

PRECISIONS = ("fp32", "fp16", "bf16")
MIN_REDUCED_K = 16  # constant matmuls with a shorter reduction (the RoPE rotation) are not weights
DEFAULT_WORKSPACE_GB = 8.0


def default_timing_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "prologue-export" / "tensorrt-timing.cache"


# --------------------------------------------------------------------------- profiles


def engine_profile(contract: dict, max_batch: int, opt_batch: typing.Optional[int] = None) -> dict:
    """min/opt/max shapes of every input of one graph: `{input: {"min": [...], "opt": [...], "max": [...]}}`.

    Dynamic axes come from the manifest contract: `batch` (and `rows` = 2 x batch for CFG) get
    min 1, opt `opt_batch` (default min(OPT_BATCH, max_batch)) and max `max_batch`; `new_tokens` gets
    min 1, opt 1 (a decode step) and the contract's max (the whole sequence, for prefills)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
    opt_batch = min(OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt_batch <= max_batch:
        raise ExportError(f"the serving batch (opt) must lie in [1, {max_batch}], got {opt_batch}")
    axes = contract.get("dynamic_axes", {})
    ranges = {}
    for name, r in axes.items():
        if name == "batch":
            ranges[name] = (1, opt_batch, max_batch)
        elif name == "rows":
            ranges[name] = (1, 2 * opt_batch, 2 * max_batch)
        else:  # sequence-like axes keep the contract's range; opt is the decode shape
            ranges[name] = (max(1, int(r["min"])), max(1, int(r["opt"])), int(r["max"]))
    profile = {}
    for spec in contract["inputs"]:
        shapes = {"min": [], "opt": [], "max": []}
        for dim in spec["shape"]:
            for k, i in (("min", 0), ("opt", 1), ("max", 2)):
                shapes[k].append(int(dim) if not isinstance(dim, str) else ranges[dim][i])
        profile[spec["name"]] = shapes
    return profile


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


# --------------------------------------------------------------------------- building


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed here: building engines needs a CUDA GPU host with "
                          "`pip install tensorrt` (and cuda-python); the ONNX bundle works without it") from None
    return tensorrt


def build_engines(bundle_path, precision: str = "fp16", max_batch: typing.Optional[int] = None,
                  opt_batch: typing.Optional[int] = None, timing_cache=None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                  graphs: typing.Optional[typing.Sequence[str]] = None, log=print) -> dict:
    """Build and add engines to the bundle at `bundle_path`; returns the manifest's `engines`."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bundle = Bundle(bundle_path)  # verifies every file before we add to it
    max_batch = int(bundle.manifest.get("max_batch", DEFAULT_MAX_BATCH)) if max_batch is None else max_batch
    graphs = [g for g in (graphs or ENGINE_GRAPHS) if g in bundle.graphs]
    if not graphs:
        raise ExportError(f"{bundle.path} has none of the graphs {', '.join(ENGINE_GRAPHS)}")
    trt = _tensorrt()
    import onnx

    info = device_info()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache()
    logger = trt.Logger(trt.Logger.WARNING)
    vocab_size = bundle.manifest["vocab"]["vocab_size"]
    staging = Path(tempfile.mkdtemp(prefix=".engines-", dir=bundle.path.parent))
    engines = {}
    try:
        for graph in graphs:
            contract = bundle.graphs[graph]
            onnx_path = bundle.graph_file(graph)
            model, n_if = inline_conditionals(onnx.load(str(onnx_path)))
            if precision != "fp32":
                model, n = reduce_matmul_precision(model, precision, keep_output_dims=[vocab_size])
                log(f"[engines] {graph}: {n} weight matmuls in {precision}, the rest fp32")
            if n_if or precision != "fp32":
                onnx_path = staging / f"{graph}.{precision}.onnx"
                onnx.save(model, str(onnx_path), save_as_external_data=model.ByteSize() > 2 * 1024**3)
            profile = engine_profile(contract, max_batch, opt_batch)
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise ExportError(f"TensorRT cannot parse {graph}: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
            cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
            opt_profile = builder.create_optimization_profile()
            for name, shapes in profile.items():
                opt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
            config.add_optimization_profile(opt_profile)
            log(f"[engines] building {graph} ({precision}, batch up to {max_batch}) ...")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise ExportError(f"TensorRT failed to build the {graph} engine (see its log above)")
            name = engine_file_name(graph, precision)
            (staging / name).write_bytes(bytes(serialized))
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp_cache = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
            tmp_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
            os.replace(tmp_cache, cache_path)
            engines[graph] = {
                "file": name, "precision": precision, "strongly_typed": True, "profile": profile,
                "max_batch": max_batch, "tensorrt_version": trt.__version__,
                "compute_capability": info["compute_capability"], "device": info["name"],
                "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        install_engines(bundle.path, staging, engines)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return engines


def install_engines(bundle_path, staging: Path, engines: dict) -> None:
    """Move built engine files from `staging` into the bundle and record them in the manifest
    (written last, atomically). Engines of the same graphs built before are replaced."""
    bundle_path = Path(bundle_path)
    manifest = json.loads((bundle_path / MANIFEST).read_text())
    old = manifest.get("engines", {})
    for graph, meta in engines.items():
        previous = old.get(graph, {}).get("file")
        if previous and previous != meta["file"]:
            manifest["files"].pop(previous, None)
            (bundle_path / previous).unlink(missing_ok=True)
        os.replace(staging / meta["file"], bundle_path / meta["file"])
        file = bundle_path / meta["file"]
        manifest["files"][meta["file"]] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        old[graph] = meta
    manifest["engines"] = old
    tmp = bundle_path / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, bundle_path / MANIFEST)


# --------------------------------------------------------------------------- torch-tensorrt path


def torch_tensorrt_engine(checkpoint, graph: str, out, precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """One serialized engine straight from a checkpoint through `torch_tensorrt.dynamo` (for
    users who start from torch): the same graph contract and profile as `build_engines`."""
    try:
        import torch
        import torch_tensorrt
    except ImportError:
        raise ExportError("torch-tensorrt is not installed here (a CUDA GPU host with `pip install torch-tensorrt`)") from None
    from ..checkpoint import load_checkpoint
    from .graphs import contracts

    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = load_checkpoint(checkpoint).eval().cuda()
    by_name = {c.name: c for c in contracts(model, max_batch)}
    if graph not in by_name:
        raise ExportError(f"unknown graph {graph!r}; choose from {', '.join(by_name)}")
    contract = by_name[graph]
    # no control flow for TensorRT: top-k/top-p always sort and select (see inline_conditionals)
    module = (contract.module(conditional=False) if graph == "ar_step" else contract.module()).cuda()
    args = tuple(a.cuda() for a in contract.sample_inputs(torch.Generator().manual_seed(0)))
    exported = torch.export.export(module, args, dynamic_shapes=contract.export_dynamic_shapes())
    profile = engine_profile(contract.to_json(), max_batch)
    inputs = [torch_tensorrt.Input(min_shape=profile[s.name]["min"], opt_shape=profile[s.name]["opt"],
                                   max_shape=profile[s.name]["max"], dtype=getattr(torch, s.dtype))
              for s in contract.inputs]
    kwargs = {"use_explicit_typing": True} if precision == "fp32" else {
        "use_explicit_typing": False, "enabled_precisions": {torch.float16 if precision == "fp16" else torch.bfloat16}}
    engine = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
        exported, arg_inputs=inputs, **kwargs)
    out = Path(out)
    out.write_bytes(bytes(engine))
    return out
