"""`prologue serve`: the torch-free runtime behind a JSON API and a local web page (the `serve`
extra: Starlette + uvicorn). See docs/serve.md."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..runtime.contract import AR_WEIGHTS
from ..runtime.generator import BACKENDS
from .checks import CLIError, bundle_dir, input_path, non_negative_float, positive_int, sha256_digest

HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?")


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {text!r}")
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """`--threads`: at most the CPUs this process may use; more intra-op threads than CPUs only
    contend for them, and thousands of them stall ONNX Runtime's first call (its pool starts them all)."""
    value, cpus = positive_int(text), usable_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be at most {cpus} (the CPUs this process may use), got {text!r}")
    return value


def allowed_host(text: str) -> str:
    """`--allow-host`: a DNS name this server is reached by (no port, no scheme), or `*` for any."""
    value = text.strip().lower()
    if value != "*" and (len(value) > 253 or not HOST_NAME.fullmatch(value)):
        raise argparse.ArgumentTypeError(f"must be a host name such as images.example.org (no scheme or port), "
                                         f"or * for any, got {text!r}")
    return value


def class_names(path, num_classes: int) -> list:
    """One name a line (a JSON list of strings works too), exactly one per class of the bundle."""
    from ..runtime.files import parse_json

    file = input_path(path, "--class-names", "file")
    if file.stat().st_size > 16 * 1024**2:
        raise CLIError(f"--class-names {file} is larger than 16 MiB")
    text = file.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        names = parse_json(text, f"--class-names {file}", expect=list)
        if not all(isinstance(n, str) for n in names):
            raise CLIError(f"--class-names {file}: a JSON list must hold only strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise CLIError(f"--class-names {file} has {len(names)} names; the bundle has {num_classes} classes")
    return [" ".join(n.split())[:200] for n in names]


def check_listen(host: str, port: int) -> None:
    """Bind and release `host:port` once, so that a port in use or a bad address is one line before
    the bundle is loaded (uvicorn binds again when it starts)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _cmd_serve(args) -> int:
    from ..runtime.generator import Generator
    from ..serve.app import LOOPBACK_HOSTS, ServeOptions, require_serve, serve

    require_serve()  # before the bundle is loaded: a missing extra is one line naming the install
    bundle_dir(args.bundle)
    if args.class_names:
        input_path(args.class_names, "--class-names", "file")
    check_listen(args.host, args.port)
    options = ServeOptions(batch_window_ms=args.batch_window_ms, batching=not args.no_batching,
                           max_queue=args.max_queue, max_images=args.max_images).validate()
    gen = Generator.from_bundle(args.bundle, backend=args.backend, threads=args.threads, ar_weights=args.ar_weights,
                                digest=args.digest)
    if args.class_names:
        options.class_names = class_names(args.class_names, gen.bundle.num_classes)
    batching = f"batching {options.batch_window_ms:g} ms" if options.batching else "no batching"
    hosts = "any Host (DNS rebinding is possible)" if "*" in args.allow_host else (
        "Host: IP addresses, " + ", ".join(LOOPBACK_HOSTS + tuple(args.allow_host)))
    print(f"prologue serve: {args.bundle} (sha256 {gen.bundle.digest}) on http://{args.host}:{args.port}/ "
          f"({gen.backend_name}, {batching}, max batch {gen.max_batch}; {hosts}); Ctrl-C stops after the running "
          "requests", file=sys.stderr, flush=True)
    try:
        serve(gen, args.host, args.port, options, log_level=args.log_level, allow_hosts=args.allow_host)
    finally:
        gen.close()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP: a JSON API and a web page (needs the serve extra)")
    p.add_argument("--bundle", required=True, metavar="DIR", help="a bundle written by `prologue export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-host", dest="allow_host", type=allowed_host, action="append", default=[], metavar="NAME",
                   help="a DNS name clients reach this server by (repeatable); IP addresses and localhost always "
                        "work, other names are refused (DNS rebinding); * allows any (see docs/serve.md)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="execution backend (default auto: the best ONNX Runtime provider available)")
    p.add_argument("--ar-weights", dest="ar_weights", default="fp32", choices=AR_WEIGHTS,
                   help="AR graph: fp32 (default) or a weight-only quantized one the bundle carries")
    p.add_argument("--digest", type=sha256_digest, metavar="SHA256",
                   help="refuse the bundle unless its manifest.json has this sha256 (pins every file of it)")
    p.add_argument("--threads", type=thread_count,
                   help="ONNX Runtime intra-op threads, at most this machine's CPUs (default: per graph size)")
    p.add_argument("--batch-window-ms", dest="batch_window_ms", type=non_negative_float, default=10.0,
                   help="how long an idle server waits for more requests to share one AR loop (default 10)")
    p.add_argument("--no-batching", dest="no_batching", action="store_true",
                   help="run each request in its own loops (the images are the same either way)")
    p.add_argument("--max-queue", dest="max_queue", type=positive_int, default=64,
                   help="requests that may wait; beyond, 503 with Retry-After (default 64)")
    p.add_argument("--max-images", dest="max_images", type=positive_int, default=64,
                   help="images per request (default 64, at most 1024)")
    p.add_argument("--class-names", dest="class_names", metavar="FILE",
                   help="the page's class names: one per line (or a JSON list), one per class")
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's log level")
    p.set_defaults(func=_cmd_serve)
