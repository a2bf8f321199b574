"""The GPU backends' resource handling and error checks, on a CPU, with a fake cuda-python runtime
and a fake `tensorrt` (tests/fakes/). The fake engines run the bundle's ONNX graphs with
ONNX Runtime on the bytes behind the fake device pointers, so a generation through the TensorRT
backend must give the CPU backend's tokens and images. None of this says anything about a real
GPU: it checks how the backends call the APIs (frees, destroys, capture mode, return values).
"""

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from prologue_export.runtime import BundleError, Generator, InputError
from prologue_export.runtime import cuda as runtime_cuda
from prologue_export.runtime import onnx_backend, tensorrt_backend
from prologue_export.runtime.bundle import MANIFEST
from prologue_export.runtime.files import sha256_file
from prologue_export.runtime.contract import ENGINE_GRAPHS
from prologue_export.runtime.cuda import CudaError

from .fakes.cuda import FakeCudart, cudaStreamCaptureMode, fake_cuda_modules
from .fakes.onnxruntime import fake_onnxruntime
from .fakes.tensorrt import DataType, TensorIOMode, fake_tensorrt

CFG = dict(cfg=2.0)
NO_CFG = dict(cfg=0.0, temperature=0.9, top_k=30, top_p=0.95)


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory):
    """A small exported bundle: `$PROLOGUE_TEST_BUNDLE_DIR/bundle` (see tests/runtime_fixture.py),
    else exported here from a tiny random model (needs torch)."""
    given = os.environ.get("PROLOGUE_TEST_BUNDLE_DIR")
    if given:
        return Path(given) / "bundle"
    torch = pytest.importorskip("torch", reason="no torch and no PROLOGUE_TEST_BUNDLE_DIR")
    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.model import PrologueModel

    from .conftest import randomize_

    torch.manual_seed(0)
    model = randomize_(PrologueModel(model_preset("tiny").validate()).eval(), seed=3)
    root = tmp_path_factory.mktemp("gpu_backends")
    pe.save_checkpoint(model, root / "ckpt")
    export_bundle(root / "ckpt", root / "bundle", max_batch=4, force=True, verify=False, log=lambda m: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def engine_bundle(plain_bundle, tmp_path_factory):
    """The bundle with fake engine files recorded in its manifest as `prologue build-engines` records
    them (profile, top-k bound): each file's bytes name the graph whose TensorRT ONNX form (the
    `.trt.onnx` file `prepare_tensorrt` writes, `If` inlined, TopK capped) the fake engine runs, with
    that profile's shape bounds. `$PROLOGUE_TEST_BUNDLE_DIR/bundle_trt` where given (the torch-free
    run: tests/runtime_fixture.py prepared it), else prepared here (needs onnx)."""
    given = os.environ.get("PROLOGUE_TEST_BUNDLE_DIR")
    bundle = tmp_path_factory.mktemp("engines") / "bundle"
    if given:
        shutil.copytree(Path(given) / "bundle_trt", bundle)
    else:
        pytest.importorskip("onnx", reason="preparing the TensorRT forms needs onnx")
        from prologue_export.export.tensorrt import prepare_tensorrt

        shutil.copytree(plain_bundle, bundle)
        prepare_tensorrt(bundle, "fp32", log=lambda m: None)
    manifest = json.loads((bundle / MANIFEST).read_text())
    section = manifest["tensorrt"]["fp32"]
    graphs = {}
    manifest["engines"] = {}
    for graph in ENGINE_GRAPHS:
        entry = section["graphs"][graph]
        file = tensorrt_backend.engine_file_name(graph, "fp32")
        data = f"fake engine of {graph}".encode()
        (bundle / file).write_bytes(data)
        manifest["files"][file] = {"sha256": sha256_file(bundle / file), "bytes": len(data)}
        manifest["engines"][graph] = {"file": file, "onnx": entry["onnx"], "precision": "fp32",
                                      "max_batch": section["max_batch"], "profile": entry["profile"],
                                      "tensorrt_version": "10.7.0", "compute_capability": "9.0", "device": "Fake GPU",
                                      **({"top_k_max": entry["top_k_max"]} if "top_k_max" in entry else {})}
        graphs[data] = (graph, bundle / entry["onnx"], entry["profile"])
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle, graphs


@pytest.fixture
def fakes(engine_bundle, monkeypatch):
    """(fake cudart, fake tensorrt module), installed where the runtime looks for them."""
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart, engine_bundle[1])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: cudart)
    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cudart)
    fake_cuda_modules(monkeypatch, cudart)
    return cudart, trt


@pytest.fixture(scope="module")
def cpu(plain_bundle):
    return Generator.from_bundle(plain_bundle, backend="cpu")


def trt_generator(engine_bundle) -> Generator:
    return Generator.from_bundle(engine_bundle[0], backend="tensorrt")


def engine_of(trt, graph):
    return next(e for e in trt.engines if e.graph == graph)


def streams_left(cudart) -> int:
    return cudart.created["stream"] - cudart.destroyed["stream"]


# --------------------------------------------------------------------------- results and resources


@pytest.mark.parametrize("settings", [CFG, NO_CFG], ids=["cfg", "no_cfg_top_k_top_p"])
def test_generation_gives_the_cpu_tokens_and_frees_everything(fakes, engine_bundle, cpu, settings):
    cudart, trt = fakes
    gen = trt_generator(engine_bundle)
    assert gen.backend_name == "tensorrt[Fake GPU, fp32]"
    classes = [1, 2, 10]
    want = cpu.start(classes, seed=0, **settings).run().tokens
    run = gen.start(classes, seed=0, **settings)
    state = run.loop.state
    run.run()
    np.testing.assert_array_equal(run.tokens, want)
    # the decode steps after the first were replayed from one CUDA graph, captured thread-locally
    assert state.closed and state.capture_error is None
    assert cudart.created["exec"] == 1 and cudart.created["graph"] == 1
    assert cudart.capture_modes == [cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal]
    assert engine_of(trt, "ar_step").contexts[0].runs == gen.bundle.vocab.seq_len
    cudart.assert_all_released()  # graph, graph exec, every buffer: freed by the run's end
    assert streams_left(cudart) == 1  # the backend's own stream for one-off runs
    np.testing.assert_array_equal(gen.generate(classes, seed=0, **settings), cpu.generate(classes, seed=0, **settings))
    cudart.assert_all_released()
    gen.close()
    gen.close()  # idempotent
    assert streams_left(cudart) == 0 and not cudart.bad_calls


def test_variations_prefill_and_encode_match_the_cpu(fakes, engine_bundle, cpu):
    cudart, _ = fakes
    gen = trt_generator(engine_bundle)
    image = cpu.generate([3], seed=1, **CFG)[0]
    np.testing.assert_array_equal(gen.variations(image, n=2, seed=4), cpu.variations(image, n=2, seed=4))
    np.testing.assert_array_equal(gen.reconstruct(image[None]), cpu.reconstruct(image[None]))
    cudart.assert_all_released()
    gen.close()
    assert streams_left(cudart) == 0


def test_an_error_mid_generation_frees_the_state(fakes, engine_bundle):
    cudart, _ = fakes
    gen = trt_generator(engine_bundle)
    calls = []

    def progress(done, total):
        calls.append(done)
        if done == 5:
            cudart.fail["cudaGraphLaunch"] = 719  # a launch failure, after the graph was captured
    with pytest.raises(CudaError, match="cudaGraphLaunch"):
        gen.generate([1, 2], seed=0, progress=progress, **CFG)
    del cudart.fail["cudaGraphLaunch"]
    cudart.assert_all_released()
    assert streams_left(cudart) == 1 and cudart.created["exec"] == 1

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        gen.generate([1], seed=0, progress=stop)
    cudart.assert_all_released()
    assert streams_left(cudart) == 1
    assert gen.backend.idle_contexts("ar_step") == 1  # given back, reused: one context in all
    assert len(engine_of(fakes[1], "ar_step").contexts) == 1


def test_closing_a_stepwise_generation(fakes, engine_bundle):
    cudart, _ = fakes
    gen = trt_generator(engine_bundle)
    with gen.start([1, 2], seed=0) as run:
        run.step()
        run.step()
        state = run.loop.state
    assert state.closed and run.loop.closed
    cudart.assert_all_released()
    run.close()  # idempotent
    state.close()
    with pytest.raises(InputError, match="closed"):
        run.step()
    with pytest.raises(InputError, match="closed"):
        state.step({})
    assert run.tokens.shape == (2, gen.bundle.vocab.seq_len)  # the tokens so far stay readable


def test_contexts_are_reused_in_sequence_and_distinct_at_once(fakes, engine_bundle, cpu):
    cudart, trt = fakes
    gen = trt_generator(engine_bundle)
    for seed in range(3):
        gen.start([1], seed=seed).run()
    engine = engine_of(trt, "ar_step")
    assert len(engine.contexts) == 1
    a, b = gen.start([1], seed=0), gen.start([2], seed=1)
    assert a.loop.state.context is not b.loop.state.context and len(engine.contexts) == 2
    a.run()
    b.run()
    assert gen.backend.idle_contexts("ar_step") == 2
    # two threads generating at once: each with its own context (the fake asserts no context runs
    # twice at a time), each with the CPU's tokens
    want = {c: cpu.start([c], seed=c, **CFG).run().tokens for c in (4, 5, 6, 7)}
    got, errors = {}, []

    def work(c):
        try:
            got[c] = gen.start([c], seed=c, **CFG).run().tokens
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(c,)) for c in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in want:
        np.testing.assert_array_equal(got[c], want[c])
    assert len(engine.contexts) <= 4
    cudart.assert_all_released()
    assert set(cudart.capture_modes) == {cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal}


@pytest.mark.parametrize("failure, reason", [
    ("end", "cudaStreamEndCapture"),  # cudaErrorStreamCaptureInvalidated at the end of the capture
    ("execute", "execute_async_v3 returned False"),  # a failure inside it, which invalidates the capture
])
def test_a_failed_capture_runs_eagerly(fakes, engine_bundle, cpu, failure, reason):
    cudart, trt = fakes
    if failure == "end":
        cudart.fail["cudaStreamEndCapture"] = 901
    else:
        trt.fail_in_capture = True
    gen = trt_generator(engine_bundle)
    run = gen.start([1, 2], seed=0, **CFG)
    state = run.loop.state
    run.run()
    assert reason in state.capture_error and cudart.created["exec"] == 0
    np.testing.assert_array_equal(run.tokens, cpu.start([1, 2], seed=0, **CFG).run().tokens)
    cudart.assert_all_released()


# --------------------------------------------------------------------------- checked return values


@pytest.mark.parametrize("call, tensor, when, match", [
    ("set_input_shape", "input_ids", "step", r"refused shape \[\d+, 1\] for input 'input_ids' of the ar_step"),
    ("set_input_shape", "visual_ids", "decode", r"refused shape .* 'visual_ids' of the decoder"),
    ("set_tensor_address", "k_cache_1", "start", r"refused the device address of tensor 'k_cache_1' of the ar_step"),
    ("set_tensor_address", "image", "decode", r"'image' of the decoder"),
    ("execute_async_v3", True, "step", r"failed to run the ar_step engine \(execute_async_v3 returned False\)"),
    ("execute_async_v3", True, "decode", r"failed to run the decoder engine"),
])
def test_refusals_of_tensorrt_raise_and_free(fakes, engine_bundle, call, tensor, when, match):
    cudart, trt = fakes
    gen = trt_generator(engine_bundle)
    trt.refuse[call] = tensor
    with pytest.raises(BundleError, match=match):
        if when == "decode":
            gen.decode(np.zeros((1, gen.bundle.vocab.num_visual_tokens), np.int64))
        elif when == "start":
            gen.start([1], seed=0)
        else:
            gen.start([1], seed=0).run()
    cudart.assert_all_released()
    assert streams_left(cudart) == 1


def test_cuda_errors_raise_naming_the_call(fakes, engine_bundle):
    cudart, _ = fakes
    gen = trt_generator(engine_bundle)
    cudart.fail["cudaMalloc"] = 2
    with pytest.raises(CudaError, match=r"cudaMalloc\(\d+ bytes\) failed: .*MemoryAllocation|cudaMalloc.*failed: 2"):
        gen.start([1], seed=0)
    del cudart.fail["cudaMalloc"]
    cudart.assert_all_released()
    assert streams_left(cudart) == 1  # the half-made state destroyed its stream
    run = gen.start([1], seed=0)
    run.step()
    cudart.fail["cudaFree"] = 1
    with pytest.raises(CudaError, match="cudaFree failed"):
        run.close()
    del cudart.fail["cudaFree"]
    assert cudart.live_allocations == 0 and streams_left(cudart) == 1  # the rest was still released
    run.close()  # idempotent: nothing is freed twice
    cudart.fail["cudaStreamSynchronize"] = 700
    with pytest.raises(CudaError, match=r"cudaStreamSynchronize \(after decoder\) failed: 700"):
        gen.decode(np.zeros((1, gen.bundle.vocab.num_visual_tokens), np.int64))
    cudart.assert_all_released()


# --------------------------------------------------------------------------- engine I/O vs contract


@pytest.mark.parametrize("graph, changes, match", [
    ("ar_step", {"next_tokens": (TensorIOMode.OUTPUT, DataType.INT32)},
     r"ar_step engine's tensor 'next_tokens' is an output of int32, the bundle's contract says an output of int64"),
    ("decoder", {"image_float": None}, r"decoder engine has no output 'image_float' \(float32\)"),
    ("prologue_generator", {"image": (TensorIOMode.OUTPUT, DataType.UINT8)}, r"'image' is an output of uint8.*input"),
    ("ar_step", {"extra": (TensorIOMode.INPUT, DataType.FLOAT)}, r"has an input 'extra' that the bundle's contract"),
])
def test_engines_that_differ_from_the_contract_are_refused(fakes, engine_bundle, graph, changes, match):
    cudart, trt = fakes
    trt.io_changes[graph] = changes
    with pytest.raises(BundleError, match=match) as info:
        trt_generator(engine_bundle)
    assert "prologue build-engines" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- ONNX Runtime


def test_tensorrt_provider_alias_keeps_cuda_behind_it(monkeypatch):
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_backend, "available_providers", lambda: everything)
    resolve = onnx_backend.resolve_providers
    assert resolve("tensorrt") == everything
    assert resolve(["tensorrt"]) == everything
    assert resolve("cuda") == everything[1:]
    assert resolve(None) == everything[1:]  # auto never picks TensorRT by itself
    assert resolve(["TensorrtExecutionProvider"]) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert resolve(["CUDAExecutionProvider", "tensorrt"]) == ["CUDAExecutionProvider", "TensorrtExecutionProvider",
                                                             "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_backend, "available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BundleError, match="CUDAExecutionProvider not available here.*onnxruntime-gpu"):
        resolve("tensorrt")


# --------------------------------------------------------------------------- ONNX Runtime on a (fake) GPU


@pytest.fixture
def ort_gpu(monkeypatch):
    """A fake onnxruntime-gpu with the CUDA provider on a fake GPU (tests/fakes/onnxruntime.py, with
    its rules: a non-blocking stream, synchronized runs, an arena that reuses outputs at once)."""
    cudart = FakeCudart()
    ort = fake_onnxruntime(cudart, available=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                              "CPUExecutionProvider"))
    monkeypatch.setattr(onnx_backend, "_ort", lambda: ort)
    monkeypatch.setattr(onnx_backend, "cudart", lambda: cudart)
    monkeypatch.setattr(onnx_backend, "_PRELOADED", [])
    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cudart)
    fake_cuda_modules(monkeypatch, cudart)
    return cudart, ort


@pytest.mark.parametrize("settings", [CFG, NO_CFG], ids=["cfg", "no_cfg_top_k_top_p"])
def test_onnxruntime_cuda_keeps_the_cache_on_the_device_and_gives_the_cpu_tokens(ort_gpu, plain_bundle, cpu, settings):
    """The new K/V slice is copied into the device cache on the state's own stream, synchronized
    before the next run: a copy left on the legacy stream (the old code) is not ordered with ONNX
    Runtime's non-blocking stream, so the next run reads a stale cache and the arena hands the slice's
    memory to the next outputs while the copy still has to read it: other tokens."""
    cudart, ort = ort_gpu
    classes = [1, 2, 10]
    want = cpu.start(classes, seed=0, **settings).run().tokens
    with Generator.from_bundle(plain_bundle, backend="cuda") as gen:
        assert gen.backend_name == "onnxruntime[CUDAExecutionProvider]"
        run = gen.start(classes, seed=0, **settings)
        state = run.loop.state
        assert isinstance(state, onnx_backend.OrtDeviceState)
        run.run()
        np.testing.assert_array_equal(run.tokens, want)
        assert state.closed and cudart.queued == 0
    del run, state
    ort.arena.release()
    import gc

    gc.collect()
    cudart.assert_all_released()
    assert cudart.created["stream"] == cudart.destroyed["stream"] == 1  # the state's own stream
    assert ort.preload_calls == [{}]  # onnxruntime.preload_dlls() before the first GPU session


def test_a_cuda_provider_that_does_not_load_is_not_reported_as_cuda(ort_gpu, plain_bundle, cpu):
    """ONNX Runtime lists CUDA (it was built with it) but the session could not load it: asked for
    explicitly, a one-line error; with auto, the backend says CPU and keeps the cache on the host."""
    cudart, ort = ort_gpu
    ort.unloadable = {"CUDAExecutionProvider"}
    gen = Generator.from_bundle(plain_bundle, backend="cuda")
    with pytest.raises(BundleError, match=r"could not load CUDAExecutionProvider .*prologue-export\[cpu\]") as info:
        gen.start([1], seed=0)
    assert "\n" not in str(info.value)
    gen = Generator.from_bundle(plain_bundle, backend="auto")
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        run = gen.start([1, 2], seed=0, **CFG)
    assert gen.backend_name == "onnxruntime[CPUExecutionProvider]" and gen.backend.device == "cpu"
    assert isinstance(run.loop.state, onnx_backend.HostKVState)
    np.testing.assert_array_equal(run.run().tokens, cpu.start([1, 2], seed=0, **CFG).run().tokens)
    assert cudart.mallocs == 0


def test_the_tensorrt_provider_gets_an_engine_cache_and_the_contract_profile(ort_gpu, plain_bundle, cpu, tmp_path,
                                                                           monkeypatch):
    from prologue_export.runtime.bundle import Bundle
    from prologue_export.runtime.contract import profile_shapes

    cudart, ort = ort_gpu
    monkeypatch.setenv("PROLOGUE_TRT_CACHE", str(tmp_path / "trt"))
    gen = Generator.from_bundle(plain_bundle, backend="onnxruntime", providers="tensorrt")  # ONNX Runtime's provider
    tokens = gen.start([1, 2], seed=0, **CFG).run().tokens
    np.testing.assert_array_equal(tokens, cpu.start([1, 2], seed=0, **CFG).run().tokens)
    session = next(s for s in ort.sessions if "k_cache_0" in [i.name for i in s.get_inputs()])
    assert session.requested == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    options = session.provider_options["TensorrtExecutionProvider"]
    bundle = Bundle(plain_bundle)
    cache = tmp_path / "trt" / bundle.digest[:16]
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == str(cache)
    assert options["trt_timing_cache_path"] == str(cache) and cache.is_dir()
    profile = profile_shapes(bundle.graphs["ar_step"], bundle.max_batch)
    for key in ("min", "opt", "max"):
        given = dict(item.split(":") for item in options[f"trt_profile_{key}_shapes"].split(","))
        assert given == {name: "x".join(map(str, dims[key])) for name, dims in profile.items()}
    assert given["input_ids"] == f"{2 * bundle.max_batch}x{bundle.vocab.seq_len}"  # a whole prefill at max batch


def test_the_device_caches_are_256_byte_aligned_per_layer(fakes, engine_bundle, cpu):
    """TensorRT refuses tensor addresses that are not 256-byte aligned. The per-layer cache inputs
    point inside one allocation: with a model width that is not a multiple of 64 (here 16) a dense
    layer of R*H*S*d float32 is not a multiple of 256 bytes, so every layer is padded to one."""
    cudart, trt = fakes
    gen = trt_generator(engine_bundle)
    shape = (2, 1, 1, 73, 16)  # L, rows, heads, S, head_dim: 4672 bytes a layer, 4672 % 256 = 64
    with gen.backend.ar_state(1, 1, shape) as state:
        assert state.stride % 256 == 0 and state.stride >= 1 * 1 * 73 * 16 * 4
    assert trt.misaligned == []
    run = gen.start([3], seed=0, cfg=0.0)  # and a whole generation of the bundle's own model
    np.testing.assert_array_equal(run.run().tokens, cpu.start([3], seed=0, cfg=0.0).run().tokens)
    assert trt.misaligned == [] and trt.refused_shapes == []
    cudart.assert_all_released()


def test_a_generation_steps_from_any_thread_on_its_device(engine_bundle, cpu, monkeypatch):
    """CUDA's current device is per thread: a backend on GPU 1 stepped from a thread that never set
    it must make it current first (the fake records work issued to another device's stream)."""
    cudart = FakeCudart(devices=2)
    trt = fake_tensorrt(cudart, engine_bundle[1])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: cudart)
    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cudart)
    fake_cuda_modules(monkeypatch, cudart)
    bundle = Generator.from_bundle(engine_bundle[0], backend="cpu").bundle
    gen = Generator(bundle, tensorrt_backend.TensorRTBackend(bundle, device=1))
    run = gen.start([1, 2], seed=0, **CFG)
    errors = []

    def step_all():
        try:
            run.run()
        except Exception as exc:  # reported below
            errors.append(exc)
    worker = threading.Thread(target=step_all)
    worker.start()
    worker.join()
    assert not errors, errors
    np.testing.assert_array_equal(run.tokens, cpu.start([1, 2], seed=0, **CFG).run().tokens)
    cudart.assert_all_released()


def test_cuda_python_newer_than_the_driver_is_one_line(monkeypatch):
    """cuda-python 13 (CUDA 13 runtime) on a CUDA 12 driver: its first cudaSetDevice would fail with
    cudaErrorInsufficientDriver; the runtime says which install matches the driver instead."""
    cudart = FakeCudart(driver_version=12040, runtime_version=13000)
    fake_cuda_modules(monkeypatch, cudart)
    monkeypatch.setattr(runtime_cuda, "_DRIVER_CHECKED", set())
    with pytest.raises(runtime_cuda.CudaUnavailable, match=r"built for CUDA 13\.0, but the driver supports CUDA 12\.4.*"
                                                          r"gpu-cu12") as info:
        runtime_cuda.cudart()
    assert "\n" not in str(info.value)
    cudart.driver_version = 13010
    assert runtime_cuda.cudart() is cudart


def test_the_engines_top_k_bound_is_enforced(fakes, engine_bundle, tmp_path):
    """An ar_step engine records the TopK bound it was built with (`top_k_max`: TensorRT's TopK takes
    K < 3840, the `.trt.onnx` form caps it); a larger top_k is refused before anything runs."""
    cudart, _ = fakes
    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle[0], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["engines"]["ar_step"]["top_k_max"] = 10
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    gen = Generator.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(InputError, match=r"top_k 20 is more than this bundle's TensorRT engines can keep \(10"):
        gen.start([1], seed=0, top_k=20)
    assert gen.start([1], seed=0, top_k=10, cfg=0.0).run().tokens.shape[0] == 1
    gen.close()
    cudart.assert_all_released()
