"""A fake cuda-python runtime (`FakeCudart`) for testing the GPU backends on a CPU, as strict as the
CUDA runtime about what our code relies on. Each rule cites its source:

- Streams do not run work when it is enqueued: work runs only when the host waits for it
  (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, a device-to-host copy into pageable memory,
  which "will return only once the copy has completed", `cudaFree`), in stream order. [1, 2]
- The legacy default stream (0 / None) orders with blocking streams (`cudaStreamCreate`) both ways,
  never with streams created `cudaStreamNonBlocking` (ONNX Runtime's are: its
  cuda_stream_handle.cc). [3]
- `cudaMemcpy2D` from device to device "performs no host-side synchronization": it is queued on
  the legacy stream. Host-to-device copies from pageable memory take the host data at the call. [1]
- A stream is bound to the device current when it was created; work on it from a thread whose
  current device (per thread, `cudaSetDevice`) is another is an error recorded in `bad_calls`. [4]
- Capture records the stream's work into a graph that runs when launched; anything that fails
  inside a capture invalidates it (`cudaStreamEndCapture` then returns
  cudaErrorStreamCaptureInvalidated). [5]
- `cudaDriverGetVersion` / `cudaRuntimeGetVersion` (1000 * major + 10 * minor) are settable: a
  runtime newer than the driver is what cuda-python 13 on a CUDA 12 driver looks like. [6]
- `int(stream)` is deprecated in cuda-bindings (12.9.1 / 13.0.0 release notes): it is recorded as a
  bad call; `get_cuda_native_handle` (the fake `cuda.bindings.utils`, `fake_cuda_modules`) is the way.

Device memory is host `bytearray`s keyed by fake device pointers (256-byte aligned, as cudaMalloc's
are), so copies really move bytes; freshly allocated memory holds garbage. Every call returns
cuda-python's `(error, *values)`; `fail[name] = code` makes a call fail. The fake `tensorrt` module
that runs engines on this memory is tests/fakes/tensorrt.py; the fake ONNX Runtime device API is
tests/fakes/onnxruntime.py.

[1] CUDA Runtime API, "API synchronization behavior" (docs.nvidia.com/cuda/cuda-runtime-api/api-sync-behavior.html)
[2] CUDA C++ Programming Guide, "Streams" / "Implicit Synchronization"
[3] CUDA Runtime API, "Stream synchronization behavior" (.../stream-sync-behavior.html)
[4] CUDA Runtime API, cudaSetDevice: "sets device as the current device for the calling host thread"
[5] CUDA Runtime API, cudaStreamEndCapture / Graph management
[6] CUDA Runtime API, Version Management; cuda-bindings 13.2.0 release notes (driver check)
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import sys
import threading
import types


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


OK = cudaError_t.cudaSuccess
BAD = cudaError_t.cudaErrorInvalidValue
HANDLE = cudaError_t.cudaErrorInvalidResourceHandle


class cudaStream_t:
    """A stream handle as cuda-bindings returns it: compares equal by address; `int()` on it is the
    deprecated path (recorded as a bad call)."""

    def __init__(self, cudart: "FakeCudart", handle: int):
        self._cudart, self.handle = cudart, handle

    def __eq__(self, other):
        return isinstance(other, cudaStream_t) and other.handle == self.handle

    def __hash__(self):
        return hash(self.handle)

    def __int__(self):
        self._cudart.bad_calls.append(("int(stream)", "deprecated in cuda-bindings 12.9.1/13.0: use "
                                                      "cuda.bindings.utils.get_cuda_native_handle"))
        return self.handle

    def __repr__(self):
        return f"<cudaStream_t {self.handle:#x}>"


class _Stream:
    def __init__(self, handle: int, blocking: bool, device):
        self.handle, self.blocking, self.device = handle, blocking, device
        self.pending = []  # queued, not yet run: [_Op]
        self.capture = None  # the work recorded while capturing
        self.capture_failed = False


class _Op:
    def __init__(self, seq: int, stream: _Stream, work, deps):
        self.seq, self.stream, self.work, self.deps, self.done = seq, stream, work, deps, False


class FakeCudart:
    """The cuda-python runtime functions the backends call, with bookkeeping for the tests."""

    cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode, cudaStream_t = (cudaError_t, cudaMemcpyKind,
                                                                         cudaStreamCaptureMode, cudaStream_t)
    cudaStreamDefault, cudaStreamNonBlocking = 0, 1

    def __init__(self, devices: int = 1, driver_version: int = 13000, runtime_version: int = 13000):
        self.lock = threading.RLock()
        self.memory = {}  # device pointer -> bytearray
        self.next_ptr = 0x7F0000000000
        self.mallocs = self.frees = 0
        self.devices, self.driver_version, self.runtime_version = devices, driver_version, runtime_version
        self.local = threading.local()  # the current device of each thread (0 until cudaSetDevice)
        self.legacy = _Stream(0, True, None)
        self.streams = {}  # live handle -> _Stream
        self.graphs, self.execs = set(), {}  # live handles
        self.created = {"stream": 0, "graph": 0, "exec": 0}
        self.destroyed = {"stream": 0, "graph": 0, "exec": 0}
        self.bad_calls = []  # (call, why): double frees, unknown handles, wrong device, ...
        self.capture_modes = []
        self.fail = {}  # call name -> error code it returns from now on
        self.handles = itertools.count(0x1000, 0x10)
        self.seq = itertools.count()

    # -- helpers -------------------------------------------------------------------------------

    def _failing(self, name):
        return self.fail.get(name)

    def _bad(self, call, why):
        self.bad_calls.append((call, why))
        return (BAD,)

    def current_device(self) -> int:
        return getattr(self.local, "device", 0)

    def stream_of(self, stream, call: str = "call") -> _Stream:
        """The stream behind a handle (`cudaStream_t`, a native int handle, or 0 / None: legacy)."""
        handle = stream.handle if isinstance(stream, cudaStream_t) else (0 if stream is None else stream)
        if handle == 0:
            return self.legacy
        if handle not in self.streams:
            raise AssertionError(f"{call}: {stream!r} is not a live stream")
        return self.streams[handle]

    def locate(self, ptr: int, nbytes: int):
        """(allocation, offset) of `nbytes` at device address `ptr`; AssertionError outside one."""
        with self.lock:
            for base, mem in self.memory.items():
                if base <= ptr and ptr + nbytes <= base + len(mem):
                    return mem, ptr - base
        raise AssertionError(f"device access of {nbytes} bytes at {ptr:#x} is outside every live allocation")

    def read(self, ptr: int, nbytes: int) -> bytes:
        mem, off = self.locate(ptr, nbytes)
        return bytes(mem[off:off + nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        mem, off = self.locate(ptr, len(data))
        mem[off:off + len(data)] = data

    def enqueue(self, stream, work, call: str = "work"):
        """Queue `work` on `stream` (or record it into the graph being captured there); it runs when
        the host waits for it. Returns the queued op (None while capturing)."""
        with self.lock:
            s = stream if isinstance(stream, _Stream) else self.stream_of(stream, call)
            if s.device is not None and s.device != self.current_device():
                self.bad_calls.append((call, f"a stream of device {s.device} used while device "
                                             f"{self.current_device()} is current in this thread"))
            if s.capture is not None:
                s.capture.append(work)
                return None
            if s is self.legacy:  # the legacy stream waits for every blocking stream's queued work
                deps = [op for t in self.streams.values() if t.blocking for op in t.pending]
            elif s.blocking:  # and blocking streams wait for the legacy stream's
                deps = list(self.legacy.pending)
            else:
                deps = []
            op = _Op(next(self.seq), s, work, deps)
            s.pending.append(op)
            return op

    def _run(self, op: _Op) -> None:
        if op.done:
            return
        for dep in op.deps:
            self._run(dep)
        for earlier in [o for o in op.stream.pending if o.seq < op.seq]:
            self._run(earlier)
        op.done = True
        op.stream.pending.remove(op)
        op.work()

    def synchronize(self, stream) -> None:
        with self.lock:
            s = stream if isinstance(stream, _Stream) else self.stream_of(stream)
            for op in list(s.pending):
                self._run(op)

    def synchronize_device(self) -> None:
        with self.lock:
            pending = sorted((op for s in [self.legacy, *self.streams.values()] for op in s.pending), key=lambda o: o.seq)
            for op in pending:
                self._run(op)

    @property
    def queued(self) -> int:
        """Work queued on any stream that has not run yet."""
        return sum(len(s.pending) for s in [self.legacy, *self.streams.values()])

    @property
    def live_allocations(self) -> int:
        return len(self.memory)

    # -- the cuda-python API -------------------------------------------------------------------

    def cudaSetDevice(self, device):
        if not 0 <= int(device) < self.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        if self.runtime_version // 1000 > self.driver_version // 1000:
            return (cudaError_t.cudaErrorInsufficientDriver,)
        self.local.device = int(device)
        return (OK,)

    def cudaGetDevice(self):
        return OK, self.current_device()

    def cudaDriverGetVersion(self):
        return OK, self.driver_version

    def cudaRuntimeGetVersion(self):
        return OK, self.runtime_version

    def cudaGetDeviceProperties(self, device):
        if not 0 <= int(device) < self.devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        return OK, types.SimpleNamespace(name=b"Fake GPU\x00\x00", major=9, minor=0)

    def cudaGetLastError(self):
        return (OK,)

    def cudaMalloc(self, nbytes):
        if self._failing("cudaMalloc"):
            return self.fail["cudaMalloc"], 0
        if self.runtime_version // 1000 > self.driver_version // 1000:
            return cudaError_t.cudaErrorInsufficientDriver, 0
        with self.lock:
            ptr = self.next_ptr
            self.next_ptr += (int(nbytes) + 511) // 256 * 256  # 256-aligned, with a gap: overruns are caught
            self.memory[ptr] = bytearray(b"\xab" * int(nbytes))  # garbage, like real fresh memory
            self.mallocs += 1
        return OK, ptr

    def cudaFree(self, ptr):
        with self.lock:
            if ptr not in self.memory:
                return self._bad("cudaFree", f"{ptr:#x} is not a live allocation")
            self.synchronize_device()  # cudaFree waits for the device's queued work [2]
            del self.memory[ptr]
            self.frees += 1
        return (self.fail.get("cudaFree", OK),)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if self._failing("cudaMemcpyAsync"):
            return (self.fail["cudaMemcpyAsync"],)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            data = ctypes.string_at(src, nbytes)  # pageable host memory is staged at the call [1]
            self.enqueue(stream, lambda: self.write(dst, data), "cudaMemcpyAsync")
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            s = self.stream_of(stream, "cudaMemcpyAsync")
            if s.capture is not None:  # a copy into pageable memory cannot be captured
                s.capture_failed = True
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            op = self.enqueue(s, lambda: ctypes.memmove(dst, self.read(src, nbytes), nbytes), "cudaMemcpyAsync")
            with self.lock:
                self._run(op)  # into pageable memory: returns once the copy has completed [1]
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            self.enqueue(stream, lambda: self.write(dst, self.read(src, nbytes)), "cudaMemcpyAsync")
        else:
            return self._bad("cudaMemcpyAsync", f"kind {kind}")
        return (OK,)

    def _copy_2d(self, call, dst, dpitch, src, spitch, width, height, kind, stream):
        if kind != cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            return self._bad(call, f"kind {kind}")
        if width > dpitch or width > spitch:
            return self._bad(call, "width larger than a pitch")

        def copy():
            for row in range(height):
                self.write(dst + row * dpitch, self.read(src + row * spitch, width))

        self.enqueue(stream, copy, call)
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        return self._copy_2d("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind, stream)

    def cudaMemcpy2D(self, dst, dpitch, src, spitch, width, height, kind):
        """Device to device: queued on the legacy stream, no host synchronization [1]."""
        return self._copy_2d("cudaMemcpy2D", dst, dpitch, src, spitch, width, height, kind, None)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self.enqueue(stream, lambda: self.write(ptr, bytes([value]) * nbytes), "cudaMemsetAsync")
        return (OK,)

    def _new_stream(self, blocking: bool):
        with self.lock:
            handle = next(self.handles)
            self.streams[handle] = _Stream(handle, blocking, self.current_device())
            self.created["stream"] += 1
        return OK, cudaStream_t(self, handle)

    def cudaStreamCreate(self):
        return self._new_stream(blocking=True)

    def cudaStreamCreateWithFlags(self, flags):
        return self._new_stream(blocking=not int(flags) & self.cudaStreamNonBlocking)

    def cudaStreamDestroy(self, stream):
        with self.lock:
            handle = getattr(stream, "handle", None)
            if handle not in self.streams:
                return self._bad("cudaStreamDestroy", f"{stream} is not a live stream")
            if self.streams[handle].pending:
                self.synchronize(self.streams[handle])  # queued work still completes [5]
            del self.streams[handle]
            self.destroyed["stream"] += 1
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        try:
            s = self.stream_of(stream, "cudaStreamSynchronize")
        except AssertionError as exc:
            return self._bad("cudaStreamSynchronize", str(exc))
        if s.capture is not None:
            return self._bad("cudaStreamSynchronize", "synchronize during capture")
        if s.device is not None and s.device != self.current_device():
            self.bad_calls.append(("cudaStreamSynchronize", f"a stream of device {s.device} while device "
                                                            f"{self.current_device()} is current"))
        self.synchronize(s)
        return (self.fail.get("cudaStreamSynchronize", OK),)

    def cudaDeviceSynchronize(self):
        self.synchronize_device()
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        s = self.streams.get(getattr(stream, "handle", None))
        if s is None or s.capture is not None:
            return self._bad("cudaStreamBeginCapture", f"{stream} is unknown or already capturing")
        self.capture_modes.append(mode)
        s.capture, s.capture_failed = [], False
        return (OK,)

    def fail_capture(self, stream) -> None:
        """What an operation that cannot be captured does: the capture is invalidated [5]."""
        (stream if isinstance(stream, _Stream) else self.stream_of(stream)).capture_failed = True

    def cudaStreamEndCapture(self, stream):
        s = self.streams.get(getattr(stream, "handle", None))
        if s is None or s.capture is None:
            return self._bad("cudaStreamEndCapture", f"{stream} is not capturing") + (None,)
        work, failed, s.capture, s.capture_failed = s.capture, s.capture_failed, None, False
        if failed:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        if self._failing("cudaStreamEndCapture"):
            return self.fail["cudaStreamEndCapture"], None
        graph = ("graph", next(self.handles), tuple(work))
        self.graphs.add(graph)
        self.created["graph"] += 1
        return OK, graph

    def cudaGraphInstantiate(self, graph, flags):
        if graph not in self.graphs:
            return self._bad("cudaGraphInstantiate", "unknown graph") + (None,)
        graph_exec = ("exec", next(self.handles))
        self.execs[graph_exec] = graph[2]
        self.created["exec"] += 1
        return OK, graph_exec

    def cudaGraphLaunch(self, graph_exec, stream):
        if graph_exec not in self.execs:
            return self._bad("cudaGraphLaunch", "unknown graph exec")
        if self._failing("cudaGraphLaunch"):
            return (self.fail["cudaGraphLaunch"],)
        works = self.execs[graph_exec]
        self.enqueue(stream, lambda: [work() for work in works], "cudaGraphLaunch")
        return (OK,)

    def cudaGraphDestroy(self, graph):
        if graph not in self.graphs:
            return self._bad("cudaGraphDestroy", "unknown graph")
        self.graphs.remove(graph)
        self.destroyed["graph"] += 1
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec):
        if graph_exec not in self.execs:
            return self._bad("cudaGraphExecDestroy", "unknown graph exec")
        del self.execs[graph_exec]
        self.destroyed["exec"] += 1
        return (OK,)

    def assert_all_released(self) -> None:
        assert not self.bad_calls, self.bad_calls
        assert self.live_allocations == 0 and self.mallocs == self.frees, (self.mallocs, self.frees)
        assert not self.graphs and not self.execs
        assert self.created["graph"] == self.destroyed["graph"] and self.created["exec"] == self.destroyed["exec"]


def fake_cuda_modules(monkeypatch, cudart: FakeCudart) -> None:
    """Install `cuda.bindings.runtime` (this fake) and `cuda.bindings.utils.get_cuda_native_handle`
    where `import` finds them, for code that imports cuda-python itself."""
    cuda, bindings, utils = (types.ModuleType(n) for n in ("cuda", "cuda.bindings", "cuda.bindings.utils"))
    utils.get_cuda_native_handle = lambda obj: obj.handle if isinstance(obj, cudaStream_t) else int(obj)
    bindings.runtime, bindings.utils, cuda.bindings = cudart, utils, bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.utils", utils),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
