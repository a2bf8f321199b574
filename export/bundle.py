"""`prologue export`: a checkpoint -> a self-describing, verified bundle (docs/bundle.md).

Written into a temporary sibling folder and renamed into place at the end, so a failure leaves
nothing half-written; an existing folder is replaced only when it is a bundle and `force` is set.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import shutil
import tempfile
import typing
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import CheckpointError, load_checkpoint
from ..model import PrologueModel
from ..config import SamplingConfig
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from ..runtime.contract import AR_STEP, DEFAULT_MAX_BATCH, QUANTIZED_AR_WEIGHTS, ar_graph_name
from ..runtime.files import publish_folder, recover_folder, sha256_file, shown, temp_folder
from .errors import ExportError
from .graphs import contracts
from .manifest import Published, write_manifest

OPSET = 20
GRAPH_PRECISION = "fp32"  # ONNX graphs are fp32; reduced precision is a TensorRT engine option
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger graphs keep weights in a .data file


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (torchvision op registration, deprecations) are noise for users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(contract, folder: Path) -> typing.List[str]:
    """Lower one contract to ONNX (fp32) in `folder`; returns the files written."""
    module = contract.module()
    args = contract.sample_inputs(torch.Generator().manual_seed(0))
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    path = folder / f"{contract.name}.onnx"
    quiet = _quiet_exporter()
    try:
        with quiet:
            torch.onnx.export(
                module, args, str(path), input_names=[s.name for s in contract.inputs],
                output_names=[s.name for s in contract.outputs], dynamic_shapes=contract.export_dynamic_shapes(),
                opset_version=OPSET, dynamo=True, external_data=external, verbose=False)
    except Exception as exc:
        raise ExportError(f"exporting {contract.name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
    if any(s.dtype == "uint8" for s in contract.inputs):
        _shapes_from_cast(path)
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{contract.name}.onnx"))


def _shapes_from_cast(path: Path) -> int:
    """Rewrite `Shape(uint8 graph input)` as `Shape(Cast(input))` in the ONNX file at `path`.

    The exporter reads dynamic sizes off the first input that carries them, the uint8 image;
    TensorRT takes UINT8 only as a network input or output (onnx-tensorrt operators.md: Shape is
    listed for FP32/FP16/BF16/INT32/INT64/BOOL), so the shape is taken from the float copy that the
    graph makes of its input anyway (an existing Cast is reused). Returns the nodes rewritten."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    uint8 = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.UINT8}
    casts = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in uint8}
    rewritten, new_casts = 0, []
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in uint8:
            source = node.input[0]
            if source not in casts:
                casts[source] = f"{source}__as_float"
                new_casts.append(helper.make_node("Cast", [source], [casts[source]], to=TensorProto.FLOAT,
                                                  name=f"{source}__cast_for_shape"))
            node.input[0] = casts[source]
            rewritten += 1
    if rewritten:
        first_cast = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in uint8]
        nodes = new_casts + first_cast + [n for n in graph.node if n not in first_cast]
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))
    return rewritten


QUANT_BLOCK = 32


def constant_matmuls_below(model, min_k: int) -> typing.List[str]:
    """Names of the MatMul nodes whose second input is a constant `[K, N]` with K < `min_k`: the
    RoPE pair rotation (`[2, 2]`), which is exact in fp32 and must stay so; not a weight layer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] < min_k]


def _fold_constants(path: Path):
    """The graph with everything that depends only on weights computed once (ONNX Runtime's basic,
    hardware-independent level: standard ONNX ops out). The AR's condition path (null-class
    embedding -> adaptive-norm scales and gates) becomes constants, so quantization touches only
    the layers that multiply activations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        if path.stat().st_size > EXTERNAL_DATA_BYTES:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.data")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def quantize_ar_step(folder: Path, weights: str) -> typing.List[str]:
    """Weight-only quantized copy of `ar_step.onnx` (ONNX Runtime `MatMulNBits`, block 32,
    symmetric): `ar_step_<weights>.onnx`. Norms, softmax and sampling stay fp32; the quantized
    matmuls run at `accuracy_level` 4 (activations rounded to int8 per block inside the matmul),
    which lets ONNX Runtime's CPU kernels use integer dot products: 1.4-1.5x faster than fp32 at
    the full AR-B size here, where the default level (fp32 compute) was slower than fp32."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise ExportError("weight-only quantization needs onnxruntime's quantization tools (pip install "
                          "'prologue-export[cpu]', or gpu-cu12 / gpu-cu13)") from None
    bits = {"int8": 8, "int4": 4}[weights]
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = _fold_constants(folder / f"{AR_STEP}.onnx")
        quantizer = MatMulNBitsQuantizer(model, block_size=QUANT_BLOCK, is_symmetric=True, bits=bits, accuracy_level=4,
                                         nodes_to_exclude=constant_matmuls_below(model, QUANT_BLOCK))
        quantizer.process()
    finally:
        logger.setLevel(level)
    name = f"{ar_graph_name(weights)}.onnx"
    external = quantizer.model.model.ByteSize() > EXTERNAL_DATA_BYTES
    quantizer.model.save_model_to_file(str(folder / name), use_external_data_format=external)
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name))


def build_manifest(model: PrologueModel, folder: Path, graph_contracts, files_by_graph,
                   max_batch: int, sampling: SamplingConfig) -> dict:
    cfg = model.config
    v = cfg.vocab()
    graphs = {}
    for c in graph_contracts:
        entry = c.to_json()
        entry["file"] = f"{c.name}.onnx"
        entry["precision"] = GRAPH_PRECISION
        graphs[c.name] = entry
    for weights in QUANTIZED_AR_WEIGHTS:
        name = ar_graph_name(weights)
        if name in files_by_graph:  # same contract as ar_step, weight-only quantized matmuls
            graphs[name] = dict(graphs[AR_STEP], file=f"{name}.onnx", weights=weights)
    files = {}
    for name in sorted(f for fs in files_by_graph.values() for f in fs):
        files[name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {
            "prologue_export": __version__, "torch": torch.__version__, "onnx_opset": OPSET,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "model": cfg.to_dict(),
        "num_classes": cfg.num_classes,
        "null_class": cfg.null_class,
        "vocab": {
            "visual_codebook_size": v.visual_codebook_size, "prologue_codebook_size": v.prologue_codebook_size,
            "num_prologue_tokens": v.num_prologue_tokens, "num_visual_tokens": v.num_visual_tokens,
            "prologue_offset": v.prologue_offset, "eos_id": v.eos_id, "vocab_size": v.vocab_size,
            "seq_len": v.seq_len, "input_bos_offset": v.vocab_size,
        },
        "image": {"size": cfg.tokenizer.image_size, "channels": cfg.tokenizer.channels,
                  "patch_size": cfg.tokenizer.patch_size},
        "precision": GRAPH_PRECISION,
        "max_batch": max_batch,
        "sampling_defaults": vars(sampling).copy(),
        "graphs": graphs,
        "engines": {},
        "files": files,
    }
    if cfg.ar is not None:
        manifest["ar"] = {"layers": cfg.ar.layers, "heads": cfg.ar.heads, "head_dim": cfg.ar.head_dim,
                          "max_seq_len": v.seq_len}
    return manifest


def _still_a_bundle(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not (out / MANIFEST).is_file()):
        raise ExportError(f"--out {shown(out)} changed while exporting (now a link or not a bundle); "
                          "refusing to replace it")


def export_bundle(checkpoint, out, max_batch: int = DEFAULT_MAX_BATCH, force: bool = False,
                  verify: bool = True, sampling=None, log=print, ar_weights: typing.Sequence[str] = ()) -> Published:
    """Export `checkpoint` to the bundle folder `out`; verifies it unless `verify=False`. Returns
    the manifest, with `.digest`: the sha256 of the manifest.json written (what `--digest` pins).

    ar_weights: extra weight-only quantized AR graphs to add (`int8`, `int4`)."""
    unknown = sorted(set(ar_weights) - set(QUANTIZED_AR_WEIGHTS))
    if unknown:
        raise ExportError(f"--ar-weights must be among {', '.join(QUANTIZED_AR_WEIGHTS)}, got {', '.join(unknown)}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
    out = Path(out)
    if out.exists():
        if not (out / MANIFEST).is_file():
            raise ExportError(f"--out {out} exists and is not a bundle; refusing to overwrite it (choose a new folder)")
        if not force:
            raise ExportError(f"--out {out} already holds a bundle; pass --force to replace it")
    try:
        model = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(f"cannot export {checkpoint}: {exc}") from None
    model.eval()
    sampling = SamplingConfig.coerce(sampling)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out, MANIFEST)  # a replace killed between its two renames: the previous bundle back
    tmp = temp_folder(out, "bundle")
    try:
        graph_contracts = contracts(model, max_batch)
        files_by_graph = {}
        for c in graph_contracts:
            log(f"[export] {c.name} ...")
            files_by_graph[c.name] = export_graph(c, tmp)
        if ar_weights and AR_STEP not in files_by_graph:
            raise ExportError("--ar-weights needs an AR model; this checkpoint has only a tokenizer")
        for weights in dict.fromkeys(ar_weights):
            log(f"[export] {ar_graph_name(weights)} (weight-only {weights}) ...")
            files_by_graph[ar_graph_name(weights)] = quantize_ar_step(tmp, weights)
        manifest = build_manifest(model, tmp, graph_contracts, files_by_graph, max_batch, sampling)
        digest = write_manifest(tmp / MANIFEST, manifest)
        if verify:
            from .verify import verify_bundle

            report = verify_bundle(tmp, model=model, log=log, digest=digest)
            manifest["verification"] = report
            digest = write_manifest(tmp / MANIFEST, manifest)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)
        publish_folder(tmp, out, "bundle", check=_still_a_bundle)  # the previous bundle is put back if the swap fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Published(manifest, digest)
