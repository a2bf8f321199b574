"""`prologue serve`: the torch-free runtime behind a JSON API and a local web page (the `serve`
extra: Starlette + uvicorn). See docs/serve.md."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..runtime.contract import AR_WEIGHTS
from ..runtime.generator import BACKENDS
from .checks import CLIError, bundle_dir, input_path, non_negative_float, non_negative_int, positive_int, sha256_digest

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


def gpu_list(text: str) -> tuple:
    """`--gpus 0,1`: distinct GPU indices."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be GPU indices separated by commas, such as 0,1, got {text!r}") from None
    if not values or any(v < 0 or v > 1023 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct GPU indices in [0, 1023], got {text!r}")
    return values


def _cmd_triton(args) -> int:
    from ..serve.triton import RepositoryOptions, write_repository

    bundle_dir(args.bundle, "BUNDLE")
    options = RepositoryOptions(name=args.name, backend=args.backend, kind=args.kind, instances=args.instances,
                                gpus=args.gpus or (), max_batch_size=args.max_batch_size,
                                queue_delay_us=args.queue_delay_us, dynamic_batching=not args.no_dynamic_batching,
                                threads=args.threads, ar_weights=args.ar_weights, reference=args.reference,
                                site_packages=tuple(str(Path(p).resolve()) for p in args.site_packages))
    out = write_repository(args.bundle, args.out, options, digest=args.digest, force=args.force)
    print(f"prologue triton: model repository {out} (model {args.name!r}, {args.kind} x {args.instances}, backend "
          f"{args.backend}); serve it with: tritonserver --model-repository={out}  (see docs/triton.md)",
          file=sys.stderr, flush=True)
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
    _add_triton(sub)


def _add_triton(sub) -> None:
    from ..serve.triton import DEFAULT_QUEUE_DELAY_US, MAX_INSTANCES, MODEL_NAME

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository for a bundle (docs/triton.md)",
                       description="A Python-backend Triton model that runs the bundle through the torch-free runtime: "
                       "typed inputs (class_id, seed, every sampling option, prologue_ids), a uint8 image output, "
                       "dynamic batching with per-row noise (every image equals Generator.generate for its seed), "
                       "the bundle copied in (or referenced) and pinned by its sha256.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by prologue export")
    p.add_argument("--out", required=True, metavar="REPO", help="the model repository folder to write")
    p.add_argument("--name", default=MODEL_NAME, help=f"the model's name in the repository (default {MODEL_NAME})")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="the runtime's backend inside Triton (default auto; tensorrt needs engines built on that GPU)")
    p.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="instance_group kind (default cpu)")
    p.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help=f"model instances per device (default 1, at most {MAX_INSTANCES})")
    p.add_argument("--gpus", type=gpu_list, metavar="LIST", help="with --kind gpu: the GPUs to use, such as 0,1 "
                   "(default all)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=positive_int, metavar="N",
                   help="max_batch_size: rows per execute (default the bundle's max batch)")
    p.add_argument("--queue-delay-us", dest="queue_delay_us", type=non_negative_int, default=DEFAULT_QUEUE_DELAY_US,
                   metavar="US", help=f"the dynamic batcher's max_queue_delay_microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--no-dynamic-batching", dest="no_dynamic_batching", action="store_true",
                   help="no dynamic_batching block: each request runs alone (the images are the same either way)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="ONNX Runtime intra-op threads per instance")
    p.add_argument("--ar-weights", dest="ar_weights", default="fp32", choices=AR_WEIGHTS,
                   help="AR graph: fp32 (default) or a weight-only quantized one the bundle carries")
    p.add_argument("--reference", action="store_true",
                   help="reference the bundle by its absolute path instead of copying it in (its sha256 is still "
                        "pinned and checked when the model loads)")
    p.add_argument("--site-packages", dest="site_packages", action="append", default=[], metavar="DIR",
                   help="a folder the model's Python puts first on sys.path (repeatable): the site-packages of the "
                        "environment prologue-export is installed in, when it is not the Triton Python's own")
    p.add_argument("--digest", type=sha256_digest, metavar="SHA256",
                   help="refuse the bundle unless its manifest.json has this sha256")
    p.add_argument("--force", action="store_true", help="replace --out when it is a repository prologue triton wrote")
    p.set_defaults(func=_cmd_triton)
