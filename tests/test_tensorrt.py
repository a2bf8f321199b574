"""TensorRT engines and GPU paths: what runs on a CPU (profiles, the reduced-precision rewrite,
provenance and refusal logic, manifest updates, clear errors where TensorRT or a GPU is absent)
and, behind the `tensorrt` / `gpu` markers, what needs them."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from prologue_export.export.bundle import ExportError  # noqa: E402
from prologue_export.export.tensorrt import (  # noqa: E402
    MIN_REDUCED_K, _to_bf16_bits, build_engines, engine_profile, inline_conditionals, install_engines,
    reduce_matmul_precision)
from prologue_export.runtime import Generator  # noqa: E402
from prologue_export.runtime.bundle import Bundle, BundleError  # noqa: E402
from prologue_export.runtime.tensorrt_backend import check_engine, engine_file_name  # noqa: E402
from prologue_export.runtime.contract import cache_feeds  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    import prologue_export as pe
    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle

    from .conftest import randomize_

    torch.manual_seed(0)
    model = PrologueModel(model_preset("tiny").validate()).eval()
    randomize_(model)
    root = tmp_path_factory.mktemp("trt")
    pe.save_checkpoint(model, root / "ckpt")
    export_bundle(root / "ckpt", root / "bundle", verify=False, log=lambda m: None)
    return root / "bundle"


def test_engine_profiles_follow_the_contract(bundle_dir):
    b = Bundle(bundle_dir)
    a, T = b.manifest["ar"], b.vocab.seq_len
    p = engine_profile(b.graphs["ar_step"], max_batch=8)
    assert p["input_ids"] == {"min": [1, 1], "opt": [16, 1], "max": [16, T]}
    L, H, d = a["layers"], a["heads"], a["head_dim"]
    for name in [f"{kv}_cache_{i}" for kv in "kv" for i in range(L)]:  # one cache input per layer
        assert p[name] == {"min": [1, H, T, d], "opt": [16, H, T, d], "max": [16, H, T, d]}
    assert p["uniform"]["min"][0] == 1 and p["uniform"]["opt"][0] == 8 and p["uniform"]["max"][0] == 8
    assert p["start_pos"] == {"min": [1], "opt": [1], "max": [1]}
    p = engine_profile(b.graphs["decoder"], max_batch=32, opt_batch=4)
    assert p["visual_ids"]["min"][0] == 1 and p["visual_ids"]["opt"][0] == 4 and p["visual_ids"]["max"][0] == 32
    with pytest.raises(ExportError, match="max-batch"):
        engine_profile(b.graphs["decoder"], max_batch=0)
    with pytest.raises(ExportError, match="serving batch"):
        engine_profile(b.graphs["decoder"], max_batch=4, opt_batch=8)


def test_bf16_rounding():
    x = np.array([1.0, -2.5, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.0e38], dtype=np.float32)
    bits = _to_bf16_bits(x)
    assert bits[0] == 0x3F80 and bits[1] == 0xC020
    assert bits[2] == 0x3F80  # halfway: rounds to even (down)
    assert bits[3] == 0x3F82  # halfway: rounds to even (up)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(back, x, rtol=2**-8)


def test_inlined_conditionals_give_the_same_outputs(bundle_dir):
    """The engine builder's copy of ar_step without `If` (both branches + Where) gives exactly
    the outputs of the bundle's graph, with top-k / top-p off and on."""
    import onnxruntime as ort

    b = Bundle(bundle_dir)
    V = b.manifest["vocab"]["vocab_size"]
    original = onnx.load(str(b.graph_file("ar_step")))
    assert sum(n.op_type == "If" for n in original.graph.node) == 2  # top-k and top-p
    model, n = inline_conditionals(original)
    onnx.checker.check_model(model, full_check=True)
    assert n == 2 and not any(node.op_type == "If" for node in model.graph.node)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (original, model)]
    rng = np.random.default_rng(1)
    shape = b.ar_cache_shape(4)
    for top_k, top_p in ((0, 0.0), (7, 0.0), (0, 0.8), (20, 0.9)):
        feeds = {"input_ids": np.array([[V + 1], [V + 2], [V + b.num_classes], [V + b.num_classes]]),
                 "start_pos": np.array([0]), "uniform": rng.random((2, V), dtype=np.float32),
                 "cfg_scale": np.array([2.0], np.float32), "temperature": np.array([1.0], np.float32),
                 "top_k": np.array([top_k]), "top_p": np.array([top_p], np.float32),
                 **cache_feeds(np.zeros(shape, np.float32), np.zeros(shape, np.float32))}
        want, got = (s.run(None, feeds) for s in sessions)
        for a, c in zip(want, got):
            np.testing.assert_array_equal(a, c)


def test_reduced_precision_keeps_norms_softmax_and_logits_fp32(bundle_dir):
    import onnxruntime as ort

    b = Bundle(bundle_dir)
    V = b.manifest["vocab"]["vocab_size"]
    original = onnx.load(str(b.graph_file("ar_step")))
    for precision, low in (("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)):
        model, n = reduce_matmul_precision(original, precision, keep_output_dims=[V])
        onnx.checker.check_model(model)
        assert n > 0
        inits = {t.name: t for t in model.graph.initializer}
        low_weights = [t for t in inits.values() if t.data_type == low]
        assert len(low_weights) >= 1
        # the logits projection (output width V) and the RoPE rotation (a [2, 2] constant) are
        # untouched, and only MatMuls changed type
        rotations = 0
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                w = inits[node.input[1]]
                rotations += list(w.dims) == [2, 2]
                assert (w.dims[-1] == V or w.dims[0] < MIN_REDUCED_K) == (w.data_type == onnx.TensorProto.FLOAT)
        assert rotations == 2 * b.manifest["ar"]["layers"]  # q and k of every layer
        casts = [nd for nd in model.graph.node if nd.op_type == "Cast"]
        assert len(casts) >= 2 * n
        assert {i.type.tensor_type.elem_type for i in model.graph.input} == {i.type.tensor_type.elem_type
                                                                             for i in original.graph.input}
    # fp16 numerics where ONNX Runtime's CPU provider runs fp16 matmuls: logits close to fp32
    model, _ = reduce_matmul_precision(original, "fp16", keep_output_dims=[V])
    try:
        sess16 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - depends on the ORT build
        pytest.skip(f"this ONNX Runtime build cannot run the fp16 graph on CPU: {exc}")
    sess32 = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = b.ar_cache_shape(2)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[V + 1], [V + b.num_classes]]), "start_pos": np.array([0]),
             **cache_feeds(np.zeros(shape, np.float32), np.zeros(shape, np.float32)),
             "uniform": rng.random((1, V), dtype=np.float32), "cfg_scale": np.array([2.0], np.float32),
             "temperature": np.array([1.0], np.float32), "top_k": np.array([0]), "top_p": np.array([0.0], np.float32)}
    l32 = sess32.run(["logits"], feeds)[0]
    l16 = sess16.run(["logits"], feeds)[0]
    assert np.abs(l16 - l32).max() < 0.05 * np.abs(l32).max()


def test_engine_provenance_is_checked():
    meta = {"tensorrt_version": "10.7.0", "compute_capability": "9.0", "device": "NVIDIA H200"}
    check_engine("ar_step", meta, "10.7.0", "9.0")
    with pytest.raises(BundleError, match=r"built with TensorRT 10\.7\.0.*10\.8\.0.*prologue build-engines"):
        check_engine("ar_step", meta, "10.8.0", "9.0")
    with pytest.raises(BundleError, match=r"compute capability 9\.0 \(NVIDIA H200\).*8\.9.*prologue build-engines"):
        check_engine("decoder", meta, "10.7.0", "8.9")


def test_installed_engines_are_vouched_for_by_the_manifest(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    staging = tmp_path / "staging"
    staging.mkdir()
    meta = {"tensorrt_version": "10.7.0", "compute_capability": "9.0", "device": "test", "precision": "fp16",
            "max_batch": 8, "profile": {}}
    for graph in ("decoder", "ar_step"):
        (staging / engine_file_name(graph, "fp16")).write_bytes(b"engine bytes of " + graph.encode())
    engines = {g: dict(meta, file=engine_file_name(g, "fp16")) for g in ("decoder", "ar_step")}
    install_engines(bundle, staging, engines)
    b = Bundle(bundle)  # sha256 of every file, engines included
    assert set(b.manifest["engines"]) == {"decoder", "ar_step"}
    assert engine_file_name("ar_step", "fp16") in b.files
    # rebuilding at another precision replaces the old engine file
    (staging / engine_file_name("ar_step", "fp32")).write_bytes(b"fp32 engine")
    install_engines(bundle, staging, {"ar_step": dict(meta, precision="fp32", file=engine_file_name("ar_step", "fp32"))})
    b = Bundle(bundle)
    assert not (bundle / engine_file_name("ar_step", "fp16")).exists()
    assert b.manifest["engines"]["ar_step"]["precision"] == "fp32"
    # a tampered engine is refused like any other file
    (bundle / engine_file_name("decoder", "fp16")).write_bytes(b"engine bytes of decodeX")
    with pytest.raises(BundleError, match="sha256"):
        Bundle(bundle)


def test_without_tensorrt_the_errors_say_what_to_do(bundle_dir, capsys):
    from prologue_export.cli import main

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        build_engines(bundle_dir, precision="fp16")
    assert main(["build-engines", str(bundle_dir)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    with pytest.raises(BundleError, match="no TensorRT engine.*prologue build-engines"):
        Generator.from_bundle(bundle_dir, backend="tensorrt")
    with pytest.raises(ExportError, match="--precision"):
        build_engines(bundle_dir, precision="int8")


def test_cpu_provider_keeps_the_cache_on_the_host(bundle_dir):
    from prologue_export.runtime.loop import HostKVState

    gen = Generator.from_bundle(bundle_dir, backend="cpu")
    assert gen.backend.device == "cpu"
    state = gen.backend.ar_state(2, 1, gen.bundle.ar_cache_shape(2))
    assert isinstance(state, HostKVState) and state.k_cache.shape == gen.bundle.ar_cache_shape(2)


# --------------------------------------------------------------------------- GPU hosts only


def _cuda():
    return torch.cuda.is_available()


@pytest.mark.tensorrt
def test_tensorrt_engines_give_the_onnx_runtime_tokens(bundle_dir, tmp_path):
    pytest.importorskip("tensorrt")
    if not _cuda():
        pytest.skip("no CUDA GPU")
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    engines = build_engines(bundle, precision="fp32", timing_cache=tmp_path / "cache", log=lambda m: None)
    assert set(engines) == {"decoder", "prologue_generator", "ar_step"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engines"]["ar_step"]["strongly_typed"] is True
    ort_gen = Generator.from_bundle(bundle, backend="cpu")
    trt_gen = Generator.from_bundle(bundle, backend="tensorrt")
    classes = [0, 1, 2, 3]
    a = ort_gen.start(classes, seed=0, cfg=2.0).run().tokens
    b = trt_gen.start(classes, seed=0, cfg=2.0).run().tokens  # decode steps replayed from a CUDA graph
    assert (a == b).mean() >= 0.99  # fp32 engines: equal up to float ties
    images = trt_gen.generate(classes, seed=0)
    assert images.dtype == np.uint8 and images.shape[0] == 4


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_keeps_the_cache_on_the_gpu(bundle_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    pytest.importorskip("cuda")
    from prologue_export.runtime.onnx_backend import OrtDeviceState

    gen = Generator.from_bundle(bundle_dir, backend="cuda")
    assert isinstance(gen.backend.ar_state(2, 1, gen.bundle.ar_cache_shape(2)), OrtDeviceState)
    cpu = Generator.from_bundle(bundle_dir, backend="cpu")
    a = cpu.start([1, 2], seed=0, cfg=2.0).run().tokens
    b = gen.start([1, 2], seed=0, cfg=2.0).run().tokens
    assert (a == b).mean() >= 0.99


@pytest.mark.gpu
def test_torch_cuda_sampler_matches_cpu():
    if not _cuda():
        pytest.skip("no CUDA GPU")
    import prologue_export as pe
    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset

    torch.manual_seed(0)
    model = PrologueModel(model_preset("tiny").validate()).eval()
    cpu = pe.sample(model.ar, [0, 1, 2], {"cfg": 2.0}, seed=0)
    gpu = pe.sample(model.ar.cuda(), [0, 1, 2], {"cfg": 2.0}, seed=0)
    assert (cpu == gpu.cpu()).float().mean() >= 0.99  # sample() returns tensors on the model's device
