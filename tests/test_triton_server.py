"""The model repository `prologue triton` writes, served by a real Triton Inference Server (tritonserver
2.51 from the nvidia-pytriton 0.7.0 wheel: tests/triton_server.py, scripts/get_triton.sh) on this
CPU, and called with NVIDIA's tritonclient over HTTP and gRPC. Skips outside CI when the server
cannot be had (saying why); fails in CI."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from prologue_export.runtime import Generator
from prologue_export.serve.triton import RepositoryOptions, write_repository
from tests import triton_server

http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the dev extra has it)")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the dev extra has it)")
from tritonclient.utils import InferenceServerException  # noqa: E402

MISSING = triton_server.why_missing()
if MISSING:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Triton tests: {MISSING}", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

MODEL = "prologue"


@pytest.fixture(scope="module")
def gen(runtime_fixture_root):
    return Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu")


@pytest.fixture(scope="module")
def server(runtime_fixture_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repo = write_repository(runtime_fixture_root / "bundle", root / "repo",
                            RepositoryOptions(backend="cpu", threads=1, queue_delay_us=50_000))
    with triton_server.running_triton([repo], root / "server.log") as running:
        yield running


def _inputs(module, class_ids, seeds=None, **options):
    """tritonclient inputs for rows `class_ids` (a column each); options: one value for every row."""
    rows = len(class_ids)
    out = []

    def add(name, array, datatype):
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)

    add("class_id", np.array(class_ids, dtype=np.int64).reshape(rows, 1), "INT64")
    if seeds is not None:
        add("seed", np.array(seeds, dtype=np.uint64).reshape(rows, 1), "UINT64")
    for name, value in options.items():
        if isinstance(value, np.ndarray):
            add(name, value, "INT64")
        elif isinstance(value, str):
            add(name, np.array([[value.encode()]] * rows, dtype=object), "BYTES")
        elif isinstance(value, int):
            add(name, np.array([[value]] * rows, dtype=np.int64), "INT64")
        else:
            add(name, np.array([[value]] * rows, dtype=np.float64), "FP64")
    return out


def _client(module, server):
    return module.InferenceServerClient(server.http if module is http else server.grpc)


def _stats(server):
    import json

    status, text = server.get(f"/v2/models/{MODEL}/stats")
    assert status == 200, text
    return json.loads(text)["model_stats"][0]


def _settled(read, done, timeout: float = 15.0):
    """`read()` again until `done(value)` or `timeout` s: Triton counts a request in its statistics
    and metrics after it has sent the response (a client can read them before; seen in CI under
    load), so a test waits for the count, boundedly, instead of reading it once."""
    import time

    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


CASES = [  # (class ids, seeds, options): 16 requests, different seeds and settings
    ([1], [0], {}), ([2], [1], {}), ([3], [2], {}), ([4], [3], {}), ([5], [2**64 - 1], {}), ([6], [5], {}),
    ([3], [2], {"cfg": 1.5}), ([4], [3], {"cfg": 1.5}), ([5], [2**64 - 1], {"top_k": 20}),
    ([7], [6], {"top_p": 0.9, "temperature": 0.8}), ([8], [7], {"cfg_schedule": "cosine", "cfg_power": 2.0}),
    ([10], [9], {"cfg": 0.0}), ([0], [10], {"prologue_temperature": 0.5}),
    ([1], [11], {"visual_cfg_schedule": "linear", "visual_cfg_scale": 3.0, "prologue_cfg_scale": 0.5}),
    ([2, 3], [12, 13], {}), ([6, 7, 8], [16, 17, 18], {"cfg": 1.5}),
]
# Triton's dynamic batcher puts together only requests that carry the same inputs (the optional
# ones included): the first six carry class_id and seed only, and all sixteen are sent at once.


def test_sixteen_concurrent_requests_equal_generate(server, gen):
    """16 requests at once, half over HTTP and half over gRPC, with different seeds and settings: each
    image byte-identical to Generator.generate([class], seed, settings) in this process, although
    Triton's dynamic batcher handed several requests to one execute (its statistics show fewer
    executions than requests) and rows with equal settings shared AR loops."""
    before = _stats(server)

    start = threading.Barrier(len(CASES))

    def call(index):
        classes, seeds, options = CASES[index]
        module = http if index % 2 == 0 else grpc
        client, inputs = _client(module, server), _inputs(module, classes, seeds, **options)
        start.wait(60)
        result = client.infer(MODEL, inputs)
        return result.as_numpy("image"), result.as_numpy("seed"), result.as_numpy("prologue_ids")

    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        answers = list(pool.map(call, range(len(CASES))))
    for (classes, seeds, options), (images, seed_out, prologue) in zip(CASES, answers):
        assert images.shape == (len(classes), 32, 32, 1) and images.dtype == np.uint8
        assert seed_out.ravel().tolist() == seeds
        for row, (c, s) in enumerate(zip(classes, seeds)):
            tokens = gen.sample_tokens([c], seed=s, **options)
            assert np.array_equal(images[row], gen.images_of(tokens)[0]), (c, s, options)
            assert np.array_equal(prologue[row], gen.prologue_of(tokens)[0])
    done = before["inference_stats"]["success"]["count"] + len(CASES)
    after = _settled(lambda: _stats(server), lambda st: st["inference_stats"]["success"]["count"] >= done)
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    executions = after["execution_count"] - before["execution_count"]
    rows = after["inference_count"] - before["inference_count"]
    assert requests == len(CASES) and rows == sum(len(c) for c, _, _ in CASES)
    assert executions < len(CASES), (executions, requests)  # the dynamic batcher merged requests


def test_variations_and_a_random_seed(server, gen):
    """No seed: the server picks one and sends it back (the image is generate's for it); the
    `prologue_ids` output sent back as an input fixes the prologue (variations)."""
    client = _client(http, server)
    first = client.infer(MODEL, _inputs(http, [3], None))
    seed = int(first.as_numpy("seed")[0, 0])
    assert np.array_equal(first.as_numpy("image"), gen.generate([3], seed=seed))
    prologue = first.as_numpy("prologue_ids")
    again = _client(grpc, server).infer(MODEL, _inputs(grpc, [10], [42], cfg=0.0, prologue_ids=prologue))
    tokens = gen.sample_tokens([10], seed=42, cfg=0.0, prologue_ids=prologue)
    assert np.array_equal(again.as_numpy("image"), gen.images_of(tokens))
    assert np.array_equal(again.as_numpy("prologue_ids"), prologue)


def _counter(metrics: str, name: str, **labels) -> int:
    """The value of one counter on Triton's /metrics (labels in any order); 0 when absent."""
    for line in metrics.splitlines():
        match = re.fullmatch(rf"{name}{{([^}}]*)}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return int(float(match.group(2)))
    return 0


@pytest.mark.parametrize("module", [http, grpc], ids=["http", "grpc"])
def test_bad_requests_get_one_line_errors_and_the_metrics_count_them(server, module):
    """Errors are one line in our words; a bad request fails alone. On /metrics, Triton's
    nv_inference_request_success counts every request the model answered, error responses included
    (Triton 2.51 counts only failures of its own as failures); our prologue_requests_total says which
    were answered with images and which with an error, and prologue_images_total counts images."""
    client = _client(module, server)
    labels = {"model": MODEL, "version": "1"}
    before = server.metrics()
    cases = [(_inputs(module, [3], [1], top_p=2.0), "sampling.top_p must be in [0, 1]"),
             (_inputs(module, [99], [1]), "class"),
             (_inputs(module, [3, 4], [1, 2], cfg_schedule="wavy"), "row 0: sampling.cfg_schedule: 'wavy' is not one of")]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, inputs)
        text = info.value.message()
        assert message in text and "\n" not in text and "Traceback" not in text, text
    wrong = module.InferInput("cfg", [1, 1], "FP32")  # Triton itself checks the config's types
    wrong.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="FP64"):
        client.infer(MODEL, _inputs(module, [3], [1]) + [wrong])
    good = client.infer(MODEL, _inputs(module, [3, 5], [1, 2]))  # the model still serves
    assert good.as_numpy("image").shape == (2, 32, 32, 1)
    want = _counter(before, "nv_inference_request_success", **labels) + len(cases) + 1
    after = _settled(server.metrics, lambda m: _counter(m, "nv_inference_request_success", **labels) >= want)

    def delta(name, **more):
        return _counter(after, name, **labels, **more) - _counter(before, name, **labels, **more)

    assert delta("prologue_requests_total", outcome="invalid") == len(cases)
    assert delta("prologue_requests_total", outcome="ok") == 1 and delta("prologue_requests_total", outcome="error") == 0
    assert delta("prologue_images_total") == 2
    assert delta("nv_inference_request_success") == len(cases) + 1  # the type check never reached the model


def _load_failure(repo, log, venv_bin=None):
    with triton_server.running_triton([repo], log, wait_ready=False, venv_bin=venv_bin) as running:
        running.proc.wait(triton_server.START_TIMEOUT_S)  # the default --exit-on-error: it stops
        assert running.proc.returncode != 0
        return running.log_text()


def test_a_bundle_that_fails_its_checks_does_not_load(runtime_fixture_root, tmp_path):
    """A file of the copied bundle changed after the repository was written: the model fails to load
    and the server's log says why in our words."""
    repo = write_repository(runtime_fixture_root / "bundle", tmp_path / "repo", RepositoryOptions(backend="cpu"))
    with open(repo / MODEL / "1" / "bundle" / "decoder.onnx", "r+b") as fh:
        fh.seek(64)
        fh.write(b"\xff\xfe")
    log = _load_failure(repo, tmp_path / "server.log")
    assert "decoder.onnx does not match the sha256 in the manifest" in log, log[-3000:]
    assert f"failed to load '{MODEL}'" in log


def test_a_referenced_bundle_that_changed_does_not_load(runtime_fixture_root, tmp_path):
    source = tmp_path / "bundle"
    shutil.copytree(runtime_fixture_root / "bundle", source)
    repo = write_repository(source, tmp_path / "repo", RepositoryOptions(backend="cpu", reference=True))
    manifest = source / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", "{ ", 1))  # same content, another digest
    log = _load_failure(repo, tmp_path / "server.log")
    assert "this is not the bundle you pinned" in log, log[-3000:]


def test_numpy_2_in_the_models_python_does_not_load(runtime_fixture_root, tmp_path):
    """The stub run by this test environment's Python (NumPy 2, the package installed): the model
    refuses to load, saying why, rather than answer every request with empty images (what the r24.10
    stub does with NumPy 2: docs/triton.md)."""
    import sys

    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has NumPy < 2")
    repo = write_repository(runtime_fixture_root / "bundle", tmp_path / "repo", RepositoryOptions(backend="cpu"))
    log = _load_failure(repo, tmp_path / "server.log", venv_bin=Path(sys.executable).parent)
    assert f"the model's Python has NumPy {numpy.__version__}" in log, log[-3000:]
