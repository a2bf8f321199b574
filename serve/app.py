"""`prologue serve`: the runtime behind a JSON API and one local web page (Starlette + uvicorn, the
`serve` extra; never torch). See docs/serve.md.

    POST /v1/generate     {"class_ids": [3, 3], "n": 1, "seed": 0, "cfg": 2.0, ...} -> base64 PNGs (or a grid)
    POST /v1/variations   {"result_id": ..., "index": 0 | "image": base64 PNG, "n": 8, "seed": 1}
    POST /v1/reconstruct  {"images": [base64 PNG, ...]}
    GET  /v1/info         bundle, classes, sampling defaults, backend, limits
    GET  /healthz         liveness and queue length
    GET  /                the page (inline HTML, CSS and JS; nothing from elsewhere)

Every model call runs in one worker thread (`batch.Batcher`), which merges requests with
equal settings arriving within `--batch-window-ms` into one AR loop; each request still gets
exactly the images `Generator.generate` / `variations` give it alone for its seed. Starlette and
uvicorn are imported only when a server is built, so the rest of the runtime works without them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import importlib.util
import io
import secrets
import sys
import threading
import time
import typing

import numpy as np

from ..runtime.bundle import BundleError
from ..runtime.errors import PrologueError, one_line, short_repr
from ..runtime.files import FileFormatError, parse_json
from ..runtime.images import ImageError, grid, grid_columns
from ..runtime.loop import MAX_IMAGES_PER_CALL, InputError, check_class_ids, check_count, check_seed
from ..runtime.settings import DIRECT_OPTIONS, ConfigError
from .batch import Batcher, Job, QueueFull, ServerClosed
from .guard import HEAD_TIMEOUT_S, IDLE_CONNECTIONS, LOOPBACK_HOSTS, REQUESTS_OVER_QUEUE, Guard, Limits

SERVE_EXTRA = "pip install 'prologue-export[serve]'"
OVERRIDES = tuple(o.name for o in DIRECT_OPTIONS)  # request fields that set one sampling option (runtime/settings.py)
COMMON_KEYS = ("seed", "sampling", "format", "nrow", "tokens") + OVERRIDES
FORMATS = ("images", "grid", "both")
RANDOM_SEED_LIMIT = 2**53  # JavaScript numbers are exact integers below this
SMALL_BODY = 64 * 1024  # bodies up to this size (every request without an image) need no slot below
BIG_BODIES = 4  # larger bodies held at once, from their first byte until parsed (each up to max_body_bytes)
PARSERS = 2  # larger bodies parsed at once, off the event loop (small ones are parsed without waiting)
MAX_JSON_VALUES = 10_000  # commas, colons and brackets in a body: no request needs more (1024 images: ~2100)
BODY_TIMEOUT_S = 30.0  # a body that takes longer to arrive (waiting for a slot included) is answered 408
GRACEFUL_S = 60  # on SIGTERM/SIGINT, requests still running after this are dropped
MAX_LISTED_CLASSES = 2000  # /v1/info lists class names up to this many classes
FD_HEADROOM = 128  # file descriptors kept for the model, logs and the listening socket


class ServeUnavailable(PrologueError, RuntimeError):
    """The `serve` extra (Starlette, uvicorn) is not installed."""


class RequestError(PrologueError, ValueError):
    """A request the server refuses; `status` is its HTTP status code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def require_serve() -> None:
    """A one-line `ServeUnavailable` naming the extra when Starlette or uvicorn is missing."""
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeUnavailable(f"prologue serve needs {' and '.join(missing)}: {SERVE_EXTRA}")


@dataclasses.dataclass
class ServeOptions:
    batch_window_ms: float = 10.0  # how long an idle worker waits for more requests to join a loop
    batching: bool = True
    max_queue: int = 64  # requests waiting; beyond: 503 with Retry-After
    max_images: int = 64  # images per request (at most the runtime's MAX_IMAGES_PER_CALL)
    max_body_bytes: int = 8 * 1024**2
    max_results: int = 256  # results kept for /v1/variations {"result_id"} (least recently used dropped)
    body_timeout_s: float = BODY_TIMEOUT_S  # a request body that takes longer to arrive: 408
    head_timeout_s: float = HEAD_TIMEOUT_S  # a request head that takes longer: the connection is closed
    max_connections: typing.Optional[int] = None  # None: the requests in flight + IDLE_CONNECTIONS
    class_names: typing.Optional[typing.List[str]] = None

    def validate(self) -> "ServeOptions":
        for name in ("body_timeout_s", "head_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise InputError(f"{name} must be in (0, 3600] s, got {value!r}")
        if not (0 <= self.batch_window_ms <= 10_000):
            raise InputError(f"batch window must be in [0, 10000] ms, got {self.batch_window_ms!r}")
        for name, hi in (("max_queue", 100_000), ("max_images", MAX_IMAGES_PER_CALL), ("max_results", 1_000_000),
                         ("max_body_bytes", 1024**3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise InputError(f"{name} must be an integer in [1, {hi}], got {value!r}")
        if self.max_connections is not None and (isinstance(self.max_connections, bool) or not isinstance(
                self.max_connections, int) or not 1 <= self.max_connections <= 1_000_000):
            raise InputError(f"max_connections must be an integer in [1, 1000000], got {self.max_connections!r}")
        return self

    def limits(self) -> Limits:
        """The connection-level limits: POST requests in flight (--max-queue + REQUESTS_OVER_QUEUE),
        connections (those + IDLE_CONNECTIONS, within this process's file descriptor limit), the
        head timeout, and the body timeout again for a client that stops reading its answer."""
        requests = self.max_queue + REQUESTS_OVER_QUEUE
        connections = self.max_connections or requests + IDLE_CONNECTIONS
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                connections = min(connections, max(16, soft - FD_HEADROOM))
        except (ImportError, OSError, ValueError):
            pass
        return Limits(max_requests=requests, max_connections=connections, head_timeout_s=self.head_timeout_s,
                      write_timeout_s=self.body_timeout_s)


# ------------------------------------------------------------------------------- encoding


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 `[H, W, C]` -> PNG bytes (deterministic: same pixels, same bytes)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
    return out.getvalue()


def b64_png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def decode_b64_image(text, size: int, channels: int, what: str) -> np.ndarray:
    """A base64 PNG (optionally a `data:` URL; line breaks allowed) -> uint8 `[H, W, C]` of the
    bundle's geometry, with the runtime's image rules (size checked before decoding). PNG only:
    Pillow's other readers (EPS runs Ghostscript on temporary files) never see a client's bytes."""
    from ..runtime.images import decode_image

    if not isinstance(text, str):
        raise RequestError(f"{what} must be a base64 string (a PNG), got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    return decode_image(io.BytesIO(data), what, size, channels, formats=("PNG",))


# ------------------------------------------------------------------------------- the service


class Service:
    """What the HTTP handlers call: request parsing (a `RequestError` / `PrologueError` for bad
    input), the batcher, and the results kept for variations. Web-framework free."""

    def __init__(self, generator, options: typing.Optional[ServeOptions] = None):
        self.generator = generator
        self.options = (options or ServeOptions()).validate()
        self.batcher = Batcher(generator, self.options.batch_window_ms / 1000, self.options.batching,
                               self.options.max_queue)
        self.results: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
        self.lock = threading.Lock()
        self.started = time.time()

    def close(self) -> None:
        """Finish what is queued and running, then stop the worker."""
        self.batcher.close()

    # -- parsing ------------------------------------------------------------------------------

    @staticmethod
    def check_keys(body: dict, allowed: typing.Iterable[str]) -> None:
        allowed = tuple(allowed)
        unknown = sorted(map(str, set(body) - set(allowed)))
        if unknown:
            shown = ", ".join(short_repr(k, 40) for k in unknown[:5])
            shown += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise RequestError(f"unknown field(s) {shown}; known: {', '.join(allowed)}")

    def sampling_of(self, body: dict) -> typing.Tuple[typing.Optional[dict], dict]:
        """A request's `sampling` object (our or the release's names) and its direct option fields."""
        sampling = body.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise RequestError(f"sampling must be an object, got {type(sampling).__name__}")
        return sampling, {k: body[k] for k in OVERRIDES if k in body and body[k] is not None}

    def seed_of(self, body: dict) -> int:
        seed = body.get("seed")
        # a random seed stays below 2**53: the page's JavaScript shows (and sends back) it exactly
        return secrets.randbelow(RANDOM_SEED_LIMIT) if seed is None else check_seed(seed)

    def count(self, value, what: str) -> int:
        limit = self.options.max_images
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > limit:
            raise RequestError(f"{what} {short_repr(value, 40)} is more than this server's limit of {limit} images a request")
        n = check_count(value, what)
        if n > limit:
            raise RequestError(f"{what} {n} is more than this server's limit of {self.options.max_images} images a request")
        return n

    def output_of(self, body: dict) -> typing.Tuple[str, typing.Optional[int], bool]:
        fmt = body.get("format", "images")
        if fmt not in FORMATS:
            raise RequestError(f"format must be one of {', '.join(FORMATS)}, got {short_repr(fmt)}")
        nrow = body.get("nrow")
        if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or not 1 <= nrow <= 1024):
            raise RequestError(f"nrow must be an integer in [1, 1024], got {short_repr(nrow)}")
        tokens = body.get("tokens", False)
        if not isinstance(tokens, bool):
            raise RequestError(f"tokens must be true or false, got {short_repr(tokens)}")
        return fmt, nrow, tokens

    def generate_job(self, body: dict) -> typing.Tuple[Job, dict]:
        self.check_keys(body, ("class_ids", "n") + COMMON_KEYS)
        if "class_ids" not in body:
            raise RequestError("class_ids is required: a list of class ids (the null class gives unconditional samples)")
        raw = body["class_ids"]
        if isinstance(raw, list) and len(raw) > self.options.max_images:  # before numpy sees a long list
            raise RequestError(f"{len(raw)} class ids is more than this server's limit of "
                               f"{self.options.max_images} images a request")
        classes = check_class_ids(raw if isinstance(raw, list) else [raw], self.generator.bundle.num_classes)
        n = self.count(body.get("n", 1), "n")
        self.count(len(classes) * n, "class_ids x n =")
        classes = np.repeat(classes, n)
        sampling, overrides = self.sampling_of(body)
        settings = self.generator.settings(sampling, **overrides)
        seed = self.seed_of(body)
        job = Job(classes=classes, seed=seed, settings=settings)
        return job, {"kind": "generate", "seed": seed, "class_ids": classes.tolist(), "output": self.output_of(body)}

    def variations_job(self, body: dict) -> typing.Tuple[Job, dict]:
        """Same prologue, new visual tokens: of a kept result's image (`result_id`, `index`; its
        sampled prologue) or of an uploaded `image` (its encoded prologue, as `Generator.variations`)."""
        self.check_keys(body, ("result_id", "index", "image", "n", "class_id") + COMMON_KEYS)
        bundle = self.generator.bundle
        if ("result_id" in body) == ("image" in body):
            raise RequestError("give exactly one of result_id (with index) or image (a base64 PNG)")
        n = self.count(body.get("n", 8), "n")
        sampling, overrides = self.sampling_of(body)
        class_id, settings = self.generator.variation_settings(body.get("class_id"), sampling, **overrides)
        seed = self.seed_of(body)
        job = Job(classes=np.full(n, class_id, dtype=np.int64), seed=seed, settings=settings)
        if "image" in body:
            job.image = decode_b64_image(body["image"], bundle.image_size, bundle.channels, "image")
        else:
            job.prologue_ids = np.repeat(self.kept_prologue(body.get("result_id"), body.get("index", 0)), n, axis=0)
        return job, {"kind": "variations", "seed": seed, "class_ids": job.classes.tolist(),
                     "output": self.output_of(body)}

    def reconstruct_job(self, body: dict) -> typing.Tuple[Job, dict]:
        self.check_keys(body, ("images", "format", "nrow"))
        images = body.get("images")
        if not isinstance(images, list) or not images:
            raise RequestError("images must be a non-empty list of base64 PNGs of the bundle's size")
        self.count(len(images), "images:")
        bundle = self.generator.bundle
        array = np.stack([decode_b64_image(im, bundle.image_size, bundle.channels, f"images[{i}]")
                          for i, im in enumerate(images)])
        return Job(call=lambda gen: gen.reconstruct(array)), {"kind": "reconstruct", "output": self.output_of(body)}

    # -- results ------------------------------------------------------------------------------

    def keep(self, tokens: typing.Optional[np.ndarray], classes) -> typing.Optional[str]:
        """An id for `/v1/variations` (None when there is no prologue to keep: a '2d' bundle)."""
        if tokens is None or not self.generator.bundle.vocab.has_prologue:
            return None
        result_id = secrets.token_hex(8)
        prologue = self.generator.prologue_of(tokens)
        with self.lock:
            self.results[result_id] = {"prologue_ids": prologue, "class_ids": classes}
            while len(self.results) > self.options.max_results:
                self.results.popitem(last=False)
        return result_id

    def kept_prologue(self, result_id, index) -> np.ndarray:
        if not isinstance(result_id, str):
            raise RequestError(f"result_id must be a string, got {short_repr(result_id)}")
        with self.lock:
            entry = self.results.get(result_id)
            if entry is not None:
                self.results.move_to_end(result_id)
        if entry is None:
            raise RequestError(f"no kept result {short_repr(result_id)} (results expire; send the image instead)", 404)
        rows = len(entry["prologue_ids"])
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < rows:
            raise RequestError(f"index must be an integer in [0, {rows}) for result {result_id}, got {short_repr(index)}")
        return entry["prologue_ids"][index:index + 1]

    def response(self, meta: dict, result, total_s: float) -> dict:
        fmt, nrow, with_tokens = meta["output"]
        images = result.value if result.images is None else result.images
        out = {"kind": meta["kind"], "backend": self.generator.backend_name}
        if meta["kind"] != "reconstruct":
            out.update(id=self.keep(result.tokens, meta["class_ids"]), seed=meta["seed"], class_ids=meta["class_ids"])
        if fmt in ("images", "both"):
            out["images"] = [b64_png(im) for im in images]
        if fmt in ("grid", "both"):
            columns = grid_columns(len(images), None if nrow is None else min(nrow, len(images)))
            out["grid"] = b64_png(grid(images, columns))
        if with_tokens and result.tokens is not None:
            out["tokens"] = result.tokens.tolist()
        out["timing"] = {"queued_ms": round(result.queued_s * 1e3, 3), "run_ms": round(result.run_s * 1e3, 3),
                         "total_ms": round(total_s * 1e3, 3), "batch_images": result.shared_rows}
        return out

    def info(self) -> dict:
        gen, bundle, opts = self.generator, self.generator.bundle, self.options
        names = opts.class_names or ([f"class {k}" for k in range(bundle.num_classes)]
                                     if bundle.num_classes <= MAX_LISTED_CLASSES else None)  # the page then lists the first
        return {"bundle": {"name": bundle.path.name, "digest": bundle.digest, "image_size": bundle.image_size,
                           "channels": bundle.channels, "max_batch": gen.max_batch,
                           "has_prologue": bundle.vocab.has_prologue},
                "classes": {"num_classes": bundle.num_classes, "null_class": bundle.null_class, "names": names},
                "defaults": vars(bundle.sampling_defaults), "backend": gen.backend_name,
                # the request fields that set one sampling option, with this bundle's defaults: the page's form
                "options": [o.to_json(getattr(bundle.sampling_defaults, o.name)) for o in DIRECT_OPTIONS],
                "batching": {"enabled": opts.batching, "window_ms": opts.batch_window_ms, "max_queue": opts.max_queue},
                "limits": {"max_images": opts.max_images, "max_body_bytes": opts.max_body_bytes,
                           "body_timeout_s": opts.body_timeout_s, "head_timeout_s": opts.head_timeout_s,
                           "max_requests": opts.limits().max_requests}}


# ------------------------------------------------------------------------------- HTTP


def error_status(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, FileFormatError):
        return 400
    if isinstance(exc, (QueueFull, ServerClosed)):
        return 503
    if isinstance(exc, (InputError, ConfigError, ImageError, BundleError)):
        return 422
    return 500


async def read_body(request, limit: int, deadline: float, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The request's body, at most `limit` bytes (413 beyond), all of it by `deadline` (the event
    loop's clock; 408 after, naming the body `timeout`)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(f"the request body is larger than {limit} bytes", 413)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body is larger than {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    body = await until(deadline, timeout, read())
    if not body:
        raise RequestError("the request body is empty: send a JSON object", 400)
    return body


async def until(deadline: float, timeout: float, awaitable):
    """`awaitable`'s result, or 408 (the body `timeout`) once the loop's clock passes `deadline`."""
    try:
        return await asyncio.wait_for(awaitable, max(deadline - asyncio.get_running_loop().time(), 0.001))
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", 408) from None


def parse_body(body: bytes) -> dict:
    """The body as a strict JSON object, its size in values bounded before it is parsed (a body of
    small values costs ~10x its size in Python objects and seconds of parsing)."""
    values = sum(body.count(c) for c in (b",", b":", b"[", b"{"))
    if values > MAX_JSON_VALUES:
        raise RequestError(f"the request body holds more than {MAX_JSON_VALUES} JSON values (commas, colons, "
                           "brackets); no request needs that many", 413)
    try:
        return parse_json(body, "the request body", expect=dict)
    except FileFormatError as exc:
        if "integer string conversion" in str(exc):  # json's int() under Python's int-string limit
            raise RequestError(f"the request body is not valid JSON: a number has more than "
                               f"{sys.get_int_max_str_digits()} digits", 400) from None
        raise


async def wait_disconnect(request) -> None:
    """Returns when the client goes away (after the body was read, uvicorn's next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def receive_job(request, service: Service, make_job, big_bodies, parsers):
    """(job, meta) of a request: its body read, parsed and checked. A body over SMALL_BODY (or of no
    declared size) first takes one of the `big_bodies` slots, held until it is parsed (waiting
    counts against the body timeout), and is parsed in one of the `parsers` slots; small bodies wait
    for neither, so big ones never stall them."""
    timeout = service.options.body_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout
    declared = request.headers.get("content-length")
    big = not (declared is not None and declared.isdigit() and int(declared) <= SMALL_BODY)
    async with contextlib.AsyncExitStack() as held:
        if big:
            await until(deadline, timeout, big_bodies.acquire())
            held.callback(big_bodies.release)
        body = await read_body(request, service.options.max_body_bytes, deadline, timeout)
        if big:
            await held.enter_async_context(parsers)
        return await asyncio.to_thread(lambda: make_job(parse_body(body)))


async def run_job(request, service: Service, job: Job):
    """The job's result, or None when the client disconnected first (its queued work is then dropped)."""
    future = asyncio.wrap_future(service.batcher.submit(job))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        service.batcher.cancel(job)
        return None
    finally:
        gone.cancel()


def create_app(generator, options: typing.Optional[ServeOptions] = None, service: typing.Optional[Service] = None,
               allowed_hosts: typing.Sequence[str] = LOOPBACK_HOSTS):
    """The Starlette app of a Generator, behind `guard.Guard`. Its shutdown (uvicorn finishes the
    running requests first) stops the worker after the queue is done. `allowed_hosts`: the Host
    names it answers besides IP literals (`"*"`: any; see `guard.Guard`)."""
    require_serve()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from .page import PAGE, PAGE_HEADERS

    service = service or Service(generator, options)

    def fail(exc: BaseException):
        status = error_status(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else (
            {"Retry-After": "5"} if isinstance(exc, ServerClosed) else None)
        message = one_line(exc) if status != 500 else f"internal error ({type(exc).__name__}); see the server's log"
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    big_bodies, parsers = asyncio.Semaphore(BIG_BODIES), asyncio.Semaphore(PARSERS)

    def endpoint(make_job):
        async def handle(request):
            t0 = time.perf_counter()
            try:
                job, meta = await receive_job(request, service, make_job, big_bodies, parsers)
                result = await run_job(request, service, job)
                if result is None:
                    return Response(status_code=499)  # nobody is listening; what uvicorn does with it does not matter
                out = await asyncio.to_thread(service.response, meta, result, time.perf_counter() - t0)
            except ClientDisconnect:
                return Response(status_code=499)  # the client left while sending its body
            except Exception as exc:
                if error_status(exc) == 500:
                    import traceback

                    traceback.print_exc()
                return fail(exc)
            return JSONResponse(out)

        return handle

    async def info(request):
        return JSONResponse(service.info())

    async def health(request):
        return JSONResponse({"status": "ok", "queued": service.batcher.queued(), "running": service.batcher.busy,
                             "uptime_s": round(time.time() - service.started, 3)})

    async def page(request):
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.close)

    routes = [Route("/", page), Route("/healthz", health), Route("/v1/info", info),
              Route("/v1/generate", endpoint(service.generate_job), methods=["POST"]),
              Route("/v1/variations", endpoint(service.variations_job), methods=["POST"]),
              Route("/v1/reconstruct", endpoint(service.reconstruct_job), methods=["POST"])]
    async def http_error(request, exc):  # unknown route, wrong method: JSON like every other answer
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error},
                    middleware=[Middleware(Guard, allowed_hosts=allowed_hosts,
                                           max_requests=service.options.limits().max_requests)])
    app.state.service = service
    return app


def serve(generator, host: str = "127.0.0.1", port: int = 8000, options: typing.Optional[ServeOptions] = None,
          log_level: str = "info", allow_hosts: typing.Sequence[str] = ()) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn then finishes the requests in flight (at most
    GRACEFUL_S). Whatever the bind address, the Host header must be an IP literal, a loopback name
    or one of `allow_hosts` (`"*"`: any), against DNS rebinding."""
    require_serve()
    import uvicorn

    from .guard import server_config

    options = (options or ServeOptions()).validate()
    app = create_app(generator, options, allowed_hosts=LOOPBACK_HOSTS + tuple(allow_hosts))
    config = server_config(app, options.limits(), host=host, port=port, log_level=log_level,
                           timeout_graceful_shutdown=GRACEFUL_S)
    uvicorn.Server(config).run()
