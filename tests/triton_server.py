"""A real Triton Inference Server for the tests and bench/triton_bench.py: `tritonserver` 2.51 from the
nvidia-pytriton 0.7.0 wheel that scripts/get_triton.sh unzips into .triton/ (TRITON_HOME), run on
this machine's CPU, bound to 127.0.0.1 on free ports, its models run by the Python in .triton/venv.

`running_triton(repos, log)` starts it (its own process group), waits a bounded time for
/v2/health/ready and always stops it (SIGTERM, then SIGKILL of the whole group: the Python-backend
stubs too). `triton_home()` says why the server cannot be had (None when it can)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sysconfig
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def home() -> Path:
    return Path(os.environ.get("TRITON_HOME", ROOT / ".triton"))


def why_missing() -> typing.Optional[str]:
    """None when the server and its Python are in place, else what is missing and how to get it."""
    h = home()
    server = h / "server" / "pytriton" / "tritonserver"
    if not (h / "READY").is_file():
        return f"no Triton server in {h} (run `bash scripts/get_triton.sh`: it downloads nvidia-pytriton 0.7.0)"
    for need in (server / "bin" / "tritonserver", server / "backends" / "python" / "triton_python_backend_stub",
                 h / "venv" / "bin" / "python"):
        if not need.exists():
            return f"{need} is missing (run `bash scripts/get_triton.sh` again)"
    return None


def free_ports(count: int) -> typing.List[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Triton:
    def __init__(self, proc: subprocess.Popen, http: int, grpc: int, metrics: int, log: Path):
        self.proc, self.log = proc, log
        self.http_port, self.grpc_port, self.metrics_port = http, grpc, metrics
        self.http = f"127.0.0.1:{http}"
        self.grpc = f"127.0.0.1:{grpc}"

    def get(self, path: str, port: typing.Optional[int] = None) -> typing.Tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return answer.status, answer.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")

    def metrics(self) -> str:
        return self.get("/metrics", self.metrics_port)[1]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def command(repos: typing.Sequence[Path], http: int, grpc: int, metrics: int, extra=()) -> typing.List[str]:
    server = home() / "server" / "pytriton" / "tritonserver"
    cmd = [str(server / "bin" / "tritonserver"), f"--backend-directory={server / 'backends'}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
           f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--allow-metrics=true",
           "--allow-gpu-metrics=false", "--log-verbose=0"]
    return cmd + [f"--model-repository={r}" for r in repos] + list(extra)


def environment(venv_bin: typing.Optional[Path] = None) -> dict:
    """The stub's Python: .triton/venv (or `venv_bin`'s venv) first on PATH (the stub's interpreter
    finds its venv through PATH), its libpython and the wheel's libraries on LD_LIBRARY_PATH."""
    h = home()
    venv_bin = Path(venv_bin or h / "venv" / "bin")
    venv_python = venv_bin / "python"
    libdir = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip() or sysconfig.get_config_var("LIBDIR")
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    libs = [str(h / "server" / "nvidia_pytriton.libs"), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env.pop("PYTHONPATH", None)
    return env


@contextlib.contextmanager
def running_triton(repos: typing.Sequence[Path], log: Path, extra=(), wait_ready: bool = True,
                   venv_bin: typing.Optional[Path] = None):
    """The server on free ports of 127.0.0.1 (cwd: the log's folder, never the checkout, whose
    prologue_export/ folder would shadow the installed package); stopped on exit."""
    http, grpc, metrics = free_ports(3)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(repos, http, grpc, metrics, extra), cwd=log.parent, env=environment(venv_bin),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Triton(proc, http, grpc, metrics, log)
    try:
        if wait_ready:
            wait_until_ready(server)
        yield server
    finally:
        stop(proc)


def wait_until_ready(server: Triton, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited ({server.proc.returncode}) before it was ready:\n"
                               + server.log_text()[-4000:])
        try:
            if server.get("/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"tritonserver was not ready after {timeout:.0f} s:\n" + server.log_text()[-4000:])


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the stubs, whatever the server did
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
