"""`prologue serve` over real HTTP: a uvicorn server on a free 127.0.0.1 port (in a thread, stopped
by the test), httpx clients. Each request's images must equal `Generator.generate` / `variations`
for its seed, with batching on and off and with concurrent clients; bad input is a 4xx with a
one-line JSON error; a full queue is 503 with Retry-After; a client that goes away frees its slot;
shutdown finishes the requests that are running.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from prologue_export.runtime import Generator  # noqa: E402
from prologue_export.runtime.loop import split_tokens  # noqa: E402
from prologue_export.serve.app import ServeOptions, create_app, png_bytes  # noqa: E402

TIMEOUT = 30  # seconds: no request, server start or stop may hang a test longer


@contextlib.contextmanager
def running_server(generator, options=None, **app_kw):
    """(base url, app, server) of a uvicorn server on a free 127.0.0.1 port, configured as `prologue
    serve` configures it (`guard.server_config`: the guarded protocol and its limits), stopped
    (gracefully) on exit."""
    import uvicorn

    from prologue_export.serve.guard import server_config

    app = create_app(generator, options, **app_kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, app.state.service.options.limits(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app, server
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def gen(runtime_fixture_root):
    return Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu")


@pytest.fixture(scope="module")
def server(gen):
    options = ServeOptions(batch_window_ms=30, max_images=16, max_body_bytes=256 * 1024)
    with running_server(gen, options) as (url, app, _):
        yield url, app


def png(b64: str) -> bytes:
    return base64.b64decode(b64)


def post(url: str, path: str, body, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return httpx.post(url + path, json=body, **kw)


def expected_generate(gen, body):
    classes = np.repeat(body["class_ids"], body.get("n", 1))
    overrides = {k: body[k] for k in ("cfg", "temperature", "top_k", "top_p") if k in body}
    tokens = gen.sample_tokens(classes, seed=body["seed"], **overrides)
    images = gen.generate(classes, seed=body["seed"], **overrides)
    return tokens, [png_bytes(im) for im in images]


REQUESTS = [  # concurrent clients: equal settings merge into shared loops, the cfg 0 one runs apart
    {"class_ids": [1], "seed": 3}, {"class_ids": [2, 3], "seed": 4}, {"class_ids": [5], "seed": 11, "n": 3},
    {"class_ids": [0, 9], "seed": 2}, {"class_ids": [7], "seed": 8, "n": 5}, {"class_ids": [4], "seed": 0},
    {"class_ids": [6, 10], "seed": 5, "cfg": 0.0}, {"class_ids": [8], "seed": 2**64 - 1, "top_k": 20},
]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_clients_get_exactly_their_own_images(gen, batching):
    """8 clients at once; every response equals `Generator.generate` for its seed, token for token
    and PNG byte for byte, whether the server merges the requests into shared loops or not."""
    options = ServeOptions(batch_window_ms=50, batching=batching)
    with running_server(gen, options) as (url, _, _):
        barrier = threading.Barrier(len(REQUESTS))

        def client(body):
            barrier.wait(TIMEOUT)
            return post(url, "/v1/generate", {**body, "tokens": True})

        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            responses = list(pool.map(client, REQUESTS))
    shared = []
    for body, response in zip(REQUESTS, responses):
        assert response.status_code == 200, response.text
        data = response.json()
        tokens, pngs = expected_generate(gen, body)
        np.testing.assert_array_equal(np.array(data["tokens"]), tokens)
        assert [png(b) for b in data["images"]] == pngs
        assert data["seed"] == body["seed"] and data["timing"]["total_ms"] > 0
        shared.append(data["timing"]["batch_images"] > len(tokens))
    assert any(shared) == batching  # with batching some loops held other requests' rows, without none did


def test_variations_of_a_kept_result_and_of_an_image(gen, server):
    url, _ = server
    first = post(url, "/v1/generate", {"class_ids": [3, 4], "seed": 1, "tokens": True}).json()
    prologue = split_tokens(np.array(first["tokens"]), gen.bundle.vocab)[0]
    bodies = [{"result_id": first["id"], "index": 1, "n": 3, "seed": 9},
              {"result_id": first["id"], "index": 0, "n": 2, "seed": 10}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # equal settings: these share a prefilled loop
        kept = list(pool.map(lambda b: post(url, "/v1/variations", b), bodies))
    null = gen.bundle.null_class
    for body, response in zip(bodies, kept):
        assert response.status_code == 200, response.text
        n, index = body["n"], body["index"]
        tokens = gen.sample_tokens(np.full(n, null), seed=body["seed"], cfg=0.0,
                                   prologue_ids=np.repeat(prologue[index:index + 1], n, axis=0))
        expected = gen.decode(split_tokens(tokens, gen.bundle.vocab)[1])
        assert [png(b) for b in response.json()["images"]] == [png_bytes(im) for im in expected]
    image = gen.generate([3], seed=1)[0]
    uploaded = post(url, "/v1/variations", {"image": base64.b64encode(png_bytes(image)).decode(), "n": 2, "seed": 4,
                                            "class_id": 3, "cfg": 1.5})
    assert uploaded.status_code == 200, uploaded.text
    expected = gen.variations(image, 2, seed=4, class_id=3, cfg=1.5)
    assert [png(b) for b in uploaded.json()["images"]] == [png_bytes(im) for im in expected]
    again = post(url, "/v1/variations", {"result_id": uploaded.json()["id"], "index": 1, "n": 1, "seed": 0})
    assert again.status_code == 200 and len(again.json()["images"]) == 1


def test_reconstruct_grid_info_and_health(gen, server):
    url, _ = server
    images = gen.generate([1, 2], seed=0)
    body = {"images": [base64.b64encode(png_bytes(im)).decode() for im in images], "format": "both"}
    data = post(url, "/v1/reconstruct", body).json()
    assert [png(b) for b in data["images"]] == [png_bytes(im) for im in gen.reconstruct(images)]
    grid = post(url, "/v1/generate", {"class_ids": [1], "n": 3, "seed": 0, "format": "grid", "nrow": 3}).json()
    assert "images" not in grid and png(grid["grid"]).startswith(b"\x89PNG")
    info = httpx.get(url + "/v1/info", timeout=TIMEOUT).json()
    assert info["classes"]["num_classes"] == 10 and info["classes"]["null_class"] == 10
    assert info["defaults"]["cfg"] == gen.bundle.sampling_defaults.cfg and info["backend"] == gen.backend_name
    assert info["bundle"]["max_batch"] == gen.max_batch and info["limits"]["max_images"] == 16
    assert httpx.get(url + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    page = httpx.get(url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<body>")[1]
    assert "default-src 'none'" in page.headers["content-security-policy"]


BAD = [
    ("/v1/generate", b'{"class_ids": [1],', 400, "not valid JSON"),
    ("/v1/generate", b"", 400, "empty"),
    ("/v1/generate", b"[1, 2]", 400, "must be an object"),
    ("/v1/generate", b'{"class_ids": [1], "seed": NaN}', 400, "NaN"),
    ("/v1/generate", b'{"a":' * 40 + b"1" + b"}" * 40, 400, "nested too deeply"),
    ("/v1/generate", b'{"class_ids": [1], "colour": 3}', 422, "unknown field(s) 'colour'"),
    ("/v1/generate", b'{"seed": 1}', 422, "class_ids is required"),
    ("/v1/generate", b'{"class_ids": [11]}', 422, "class ids must lie in [0, 10]"),
    ("/v1/generate", b'{"class_ids": ["cat"]}', 422, "integer"),
    ("/v1/generate", b'{"class_ids": [true]}', 422, "integer"),
    ("/v1/generate", b'{"class_ids": [1], "n": 17}', 422, "limit of 16 images"),
    ("/v1/generate", b'{"class_ids": [1, 2], "n": 9}', 422, "limit of 16 images"),
    ("/v1/generate", b'{"class_ids": [1], "n": 0}', 422, "n must be an integer >= 1"),
    ("/v1/generate", b'{"class_ids": [1], "seed": -1}', 422, "seed must be a non-negative integer"),
    ("/v1/generate", b'{"class_ids": [1], "seed": 18446744073709551616}', 422, "below 2**64"),
    ("/v1/generate", b'{"class_ids": [1], "cfg": -1}', 422, "sampling.cfg"),
    ("/v1/generate", b'{"class_ids": [1], "temperature": 0}', 422, "sampling.temperature"),
    ("/v1/generate", b'{"class_ids": [1], "top_k": 1e9}', 422, "top_k"),
    ("/v1/generate", b'{"class_ids": [1], "sampling": {"topK": 500}}', 422, "top_k 500 is larger"),
    ("/v1/generate", b'{"class_ids": [1], "sampling": 3}', 422, "sampling must be an object"),
    ("/v1/generate", b'{"class_ids": [1], "format": "gif"}', 422, "format must be one of"),
    ("/v1/variations", b'{"n": 2}', 422, "exactly one of result_id"),
    ("/v1/variations", b'{"result_id": "nope", "n": 2}', 404, "no kept result"),
    ("/v1/variations", b'{"image": "###", "n": 2}', 422, "not valid base64"),
    ("/v1/variations", b'{"image": "aGVsbG8=", "n": 2}', 422, "not a readable image"),
    ("/v1/reconstruct", b'{"images": []}', 422, "non-empty list"),
    ("/v1/reconstruct", b'{"images": [3]}', 422, "base64 string"),
    # found by an attack review: numpy would read [1, true] as [1, 1]; the server's own limit first;
    # a long list refused before numpy sees it; a class_id string; tokens that reconstruct ignores
    ("/v1/generate", b'{"class_ids": [1, true]}', 422, "not true/false"),
    ("/v1/generate", b'{"class_ids": [1], "n": 5000}', 422, "limit of 16 images"),
    ("/v1/generate", b'{"class_ids": [' + b"1," * 40 + b'1]}', 422, "41 class ids is more than"),
    ("/v1/variations", b'{"result_id": "x", "class_id": "1"}', 422, "class_id must be an integer"),
    ("/v1/reconstruct", b'{"images": ["x"], "tokens": true}', 422, "unknown field(s) 'tokens'"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{p}-{m}" for p, _, _, m in BAD])
def test_bad_requests_are_4xx_with_one_line(server, path, body, status, message):
    url, _ = server
    response = httpx.post(url + path, content=body, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and len(error) < 300


def test_size_limits_and_methods(gen, server):
    url, _ = server
    big = httpx.post(url + "/v1/generate", content=b"{" + b" " * 300_000 + b"}", timeout=TIMEOUT)
    assert big.status_code == 413 and "larger than" in big.json()["error"]
    wrong_size = np.zeros((16, 16), dtype=np.uint8)[..., None]
    body = {"image": base64.b64encode(png_bytes(wrong_size)).decode(), "n": 1}
    small = post(url, "/v1/variations", body)
    assert small.status_code == 422 and "this bundle takes 32x32" in small.json()["error"]
    wrong_method = httpx.get(url + "/v1/generate", timeout=TIMEOUT)
    assert wrong_method.status_code == 405 and "Method Not Allowed: GET /v1/generate" in wrong_method.json()["error"]
    missing = httpx.get(url + "/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found: GET /nothing"}


def test_only_png_is_decoded_and_grids_are_bounded(gen, server):
    """Uploads are PNG only (Pillow's other readers, EPS with Ghostscript among them, never see a
    client's bytes); base64 with line breaks is fine; nrow beyond the image count does not widen a
    grid; a random seed is exact in JavaScript (< 2**53)."""
    from PIL import Image

    url, _ = server
    image = gen.generate([3], seed=0)[0]
    for fmt in ("GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buf, format=fmt)
        response = post(url, "/v1/variations", {"image": base64.b64encode(buf.getvalue()).decode(), "n": 1, "seed": 0})
        assert response.status_code == 422 and "only PNG is accepted" in response.json()["error"], fmt
    wrapped = base64.encodebytes(png_bytes(image)).decode()  # 76-character lines, as the base64 tool writes
    assert "\n" in wrapped
    assert post(url, "/v1/reconstruct", {"images": [wrapped]}).status_code == 200
    data = post(url, "/v1/generate", {"class_ids": [1], "format": "grid", "nrow": 1024}).json()
    with Image.open(io.BytesIO(png(data["grid"]))) as grid_png:
        assert grid_png.size[0] < 2 * image.shape[1] + 3  # one column, not 1024
    assert 0 <= data["seed"] < 2**53


def test_slow_or_abandoned_bodies_do_not_hold_the_server(gen, capfd):
    """A body that never completes is answered 408 after the body timeout; one abandoned mid-way is
    dropped without a traceback in the log; the server keeps answering others meanwhile."""
    options = ServeOptions(body_timeout_s=0.5)
    with running_server(gen, options) as (url, _, _):
        host, port = url.removeprefix("http://").split(":")
        head = f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as slow:
            slow.sendall(head.encode() + b'{"class_ids": [1]')
            assert httpx.get(url + "/healthz", timeout=TIMEOUT).status_code == 200
            answer = b""
            while b"}" not in answer.partition(b"\r\n\r\n")[2]:  # headers and body may come in two packets
                chunk = slow.recv(4096)
                if not chunk:
                    break
                answer += chunk
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer
        gone = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        gone.sendall(head.encode() + b'{"class')
        gone.close()
        time.sleep(0.3)
        assert post(url, "/v1/generate", {"class_ids": [2], "seed": 1}).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "127.0.0.2", "::"])
def test_serve_guards_every_bind_address(gen, monkeypatch, host):
    """`serve` gives uvicorn the guarded protocol (head timeout, connection bound, 16 KiB heads, no
    websockets, uvicorn's own connection-counting limit off), a bounded shutdown and, whatever the
    bind address, the Host allowlist of the loopback names plus --allow-host (0.0.0.0 does not
    mean any Host). The guards themselves: tests/test_hostile_serve.py."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from prologue_export.serve import app as serve_module
    from prologue_export.serve.guard import LOOPBACK_HOSTS, MAX_HEAD_BYTES, Guard

    seen = {}
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: seen.update(kw, app=app) or kw)
    monkeypatch.setattr(uvicorn, "Server", lambda config: type("S", (), {"run": lambda self: None})())
    serve_module.serve(gen, host=host, options=ServeOptions(max_queue=10), allow_hosts=["images.example.org"])
    assert seen["host"] == host and seen["timeout_graceful_shutdown"] == serve_module.GRACEFUL_S
    assert "limit_concurrency" not in seen and seen["ws"] == "none"
    assert seen["h11_max_incomplete_event_size"] == MAX_HEAD_BYTES and issubclass(seen["http"], H11Protocol)
    guard = next(m for m in seen["app"].user_middleware if m.cls is Guard)
    assert guard.kwargs["allowed_hosts"] == LOOPBACK_HOSTS + ("images.example.org",)
    assert guard.kwargs["max_requests"] == 10 + serve_module.REQUESTS_OVER_QUEUE


class GatedGenerator:
    """A Generator whose AR loops wait for `gate`: requests pile up in the queue while it is shut."""

    def __init__(self, generator):
        self.generator, self.gate, self.entered = generator, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generation(self, *args, **kwargs):  # what the batcher runs for each AR loop
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        return self.generator.generation(*args, **kwargs)


def wait_for(condition, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_full_queue_disconnect_and_graceful_shutdown(gen):
    """Queue of one: a running request, a queued one, then 503 + Retry-After. A queued client that
    disconnects frees its slot. Shutting down while a request runs still answers it."""
    gated = GatedGenerator(gen)
    options = ServeOptions(batch_window_ms=0, max_queue=1)
    pool = concurrent.futures.ThreadPoolExecutor(4)
    with running_server(gated, options) as (url, app, server):
        batcher = app.state.service.batcher
        running = pool.submit(post, url, "/v1/generate", {"class_ids": [1], "seed": 0})
        assert gated.entered.wait(TIMEOUT)
        impatient = pool.submit(post, url, "/v1/generate", {"class_ids": [2], "seed": 0}, timeout=0.5)
        wait_for(lambda: batcher.queued() == 1, "the second request to queue")
        full = post(url, "/v1/generate", {"class_ids": [3], "seed": 0})
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "queue is full" in full.json()["error"]
        with pytest.raises(httpx.TimeoutException):
            impatient.result(TIMEOUT)
        wait_for(lambda: batcher.queued() == 0, "the disconnected client's slot to be freed")
        queued = pool.submit(post, url, "/v1/generate", {"class_ids": [4], "seed": 0})
        wait_for(lambda: batcher.queued() == 1, "the slot to be taken again")
        server.should_exit = True  # shutdown starts while one request runs and one waits
        time.sleep(0.2)
        gated.gate.set()
        for future, classes in ((running, [1]), (queued, [4])):
            response = future.result(TIMEOUT)
            assert response.status_code == 200, response.text
            assert [png(b) for b in response.json()["images"]] == [png_bytes(im) for im in gen.generate(classes, seed=0)]
    pool.shutdown()


def test_missing_extra_is_one_line(runtime_fixture_root, tmp_path):
    """Without starlette, `prologue serve` says which install to run (before loading the bundle),
    and the rest of the runtime, prologue_export.serve.app included, still imports."""
    code = ("import sys; sys.modules['starlette'] = None\n"
            "import prologue_export.serve.app\n"
            "from prologue_export.cli import main\n"
            f"sys.exit(main(['serve', '--bundle', {str(runtime_fixture_root / 'bundle')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("prologue serve: error: prologue serve needs starlette: "
                                   "pip install 'prologue-export[serve]'")
    assert "torch" not in done.stdout


def test_server_never_imports_torch(runtime_fixture_root, tmp_path):
    code = ("import sys, base64\n"
            "from prologue_export.runtime import Generator\n"
            "from prologue_export.serve.app import Service, create_app\n"
            f"gen = Generator.from_bundle({str(runtime_fixture_root / 'bundle')!r}, backend='cpu')\n"
            "service = Service(gen)\n"
            "app = create_app(gen, service=service)\n"
            "job, meta = service.generate_job({'class_ids': [1], 'seed': 0})\n"
            "result = service.batcher.submit(job).result(30)\n"
            "assert service.response(meta, result, 0.1)['images']\n"
            "service.close()\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_cli_arguments_are_checked():
    from prologue_export.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--bundle", "x", "--port", "70000"])
    assert exc.value.code == 2
    assert main(["serve", "--bundle", "/nonexistent/bundle"]) == 2


def test_the_command_serves_and_stops_on_sigterm(runtime_fixture_root, tmp_path):
    """`prologue serve` end to end (the bundle pinned with --digest): a process that answers, then
    shuts down gracefully on SIGTERM."""
    import signal

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {k}\n" for k in range(10)))
    digest = Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu").bundle.digest
    cmd = [sys.executable, "-m", "prologue_export.cli", "serve", "--bundle", str(runtime_fixture_root / "bundle"),
           "--port", str(port), "--backend", "cpu", "--class-names", str(names), "--log-level", "info",
           "--digest", digest]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                return False

        wait_for(up, "prologue serve to answer")
        assert httpx.get(url + "/v1/info", timeout=TIMEOUT).json()["classes"]["names"][3] == "thing 3"
        assert post(url, "/v1/generate", {"class_ids": [2], "seed": 0}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        err = proc.stderr.read()
        assert "prologue serve:" in err and "Finished server process" in err and "Traceback" not in err
        assert f"sha256 {digest}" in err  # the bundle was pinned to this digest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


def test_batcher_survives_clients_that_leave(gen):
    """A job cancelled in the batching window, and a running loop whose only request left (it stops
    at its next step), leave the worker serving the next request."""
    from prologue_export.serve.batch import Batcher, Job

    gated = GatedGenerator(gen)
    gated.gate.set()
    batcher = Batcher(gated, window_s=0.2)
    try:
        job = Job(classes=np.array([1]), seed=0, settings=gen.settings())
        batcher.submit(job)
        batcher.cancel(job)
        gated.gate.clear()
        gated.entered.clear()
        running = Job(classes=np.array([2, 3]), seed=0, settings=gen.settings())
        batcher.submit(running)
        assert gated.entered.wait(TIMEOUT)
        batcher.cancel(running)  # its loop is being set up: it stops before its first step
        gated.gate.set()
        after = Job(classes=np.array([4]), seed=1, settings=gen.settings())
        result = batcher.submit(after).result(TIMEOUT)
        np.testing.assert_array_equal(result.images, gen.generate([4], seed=1))
        assert not running.future.done() or running.future.cancelled()
        assert running.rows_done == 0
    finally:
        batcher.close(TIMEOUT)
    assert not batcher.thread.is_alive()
