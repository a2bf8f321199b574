"""A fake cuda-python runtime (`FakeCudart`) for testing the GPU backends on a CPU.

It checks how the backends use the API (every allocation freed once, every stream / graph /
graph exec destroyed once, capture modes, return values), not how a GPU behaves:

- device memory is host `bytearray`s keyed by fake device pointers, so copies really move bytes;
- streams run their work at once, except while captured: then the work is recorded into the
  graph and runs when the graph exec is launched.
Every call returns cuda-python's `(error, *values)`; `fail[name] = code` makes a call fail.
The fake `tensorrt` module that runs engines on this memory is tests/fakes/tensorrt.py.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import types


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900


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


class FakeCudart:
    """The cuda-python runtime functions the backends call, with bookkeeping for the tests."""

    cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode

    def __init__(self):
        self.lock = threading.RLock()
        self.memory = {}  # device pointer -> bytearray
        self.next_ptr = 0x7F0000000000
        self.mallocs = self.frees = 0
        self.streams, self.graphs, self.execs = {}, set(), {}  # live handles
        self.created = {"stream": 0, "graph": 0, "exec": 0}
        self.destroyed = {"stream": 0, "graph": 0, "exec": 0}
        self.bad_calls = []  # (call, why): double frees, unknown handles, ...
        self.capture_modes = []
        self.fail = {}  # call name -> error code it returns from now on
        self.handles = 0

    # -- helpers -------------------------------------------------------------------------------

    def _failing(self, name):
        return self.fail.get(name)

    def _handle(self) -> int:
        self.handles += 1
        return self.handles

    def _bad(self, call, why):
        self.bad_calls.append((call, why))
        return (BAD,)

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

    def enqueue(self, stream, work) -> None:
        """Run `work` on `stream`: now, or into the graph being captured on it."""
        if stream not in self.streams:
            raise AssertionError(f"work enqueued on an unknown or destroyed stream {stream!r}")
        capture = self.streams[stream]
        if capture is not None:
            capture.append(work)
        else:
            work()

    @property
    def live_allocations(self) -> int:
        return len(self.memory)

    # -- the cuda-python API -------------------------------------------------------------------

    def cudaSetDevice(self, device):
        return (OK,)

    def cudaGetDeviceProperties(self, device):
        return OK, types.SimpleNamespace(name=b"Fake GPU\x00\x00", major=9, minor=0)

    def cudaGetLastError(self):
        return (OK,)

    def cudaMalloc(self, nbytes):
        if self._failing("cudaMalloc"):
            return self.fail["cudaMalloc"], 0
        with self.lock:
            ptr = self.next_ptr
            self.next_ptr += (int(nbytes) + 511) // 256 * 256  # a gap: overruns are caught
            self.memory[ptr] = bytearray(b"\xab" * int(nbytes))  # garbage, like real fresh memory
            self.mallocs += 1
        return OK, ptr

    def cudaFree(self, ptr):
        with self.lock:
            if ptr not in self.memory:
                return self._bad("cudaFree", f"{ptr:#x} is not a live allocation")
            del self.memory[ptr]
            self.frees += 1
        return (self.fail.get("cudaFree", OK),)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if self._failing("cudaMemcpyAsync"):
            return (self.fail["cudaMemcpyAsync"],)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            data = ctypes.string_at(src, nbytes)  # copied now: the caller's array may go away
            self.enqueue(stream, lambda: self.write(dst, data))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.enqueue(stream, lambda: ctypes.memmove(dst, self.read(src, nbytes), nbytes))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            self.enqueue(stream, lambda: self.write(dst, self.read(src, nbytes)))
        else:
            return self._bad("cudaMemcpyAsync", f"kind {kind}")
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if kind != cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            return self._bad("cudaMemcpy2DAsync", f"kind {kind}")
        if width > dpitch or width > spitch:
            return self._bad("cudaMemcpy2DAsync", "width larger than a pitch")

        def copy():
            for row in range(height):
                self.write(dst + row * dpitch, self.read(src + row * spitch, width))

        self.enqueue(stream, copy)
        return (OK,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self.enqueue(stream, lambda: self.write(ptr, bytes([value]) * nbytes))
        return (OK,)

    def cudaStreamCreate(self):
        with self.lock:
            stream = ("stream", self._handle())
            self.streams[stream] = None
            self.created["stream"] += 1
        return OK, stream

    def cudaStreamDestroy(self, stream):
        with self.lock:
            if stream not in self.streams:
                return self._bad("cudaStreamDestroy", f"{stream} is not a live stream")
            del self.streams[stream]
            self.destroyed["stream"] += 1
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        if stream not in self.streams:
            return self._bad("cudaStreamSynchronize", f"{stream} is not a live stream")
        if self.streams[stream] is not None:
            return self._bad("cudaStreamSynchronize", "synchronize during capture")
        return (self.fail.get("cudaStreamSynchronize", OK),)

    def cudaStreamBeginCapture(self, stream, mode):
        if self.streams.get(stream, 0) is not None:
            return self._bad("cudaStreamBeginCapture", f"{stream} is unknown or already capturing")
        self.capture_modes.append(mode)
        self.streams[stream] = []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        if self.streams.get(stream) is None:
            return self._bad("cudaStreamEndCapture", f"{stream} is not capturing") + (None,)
        work, self.streams[stream] = self.streams[stream], None
        if self._failing("cudaStreamEndCapture"):
            return self.fail["cudaStreamEndCapture"], None
        graph = ("graph", self._handle(), tuple(work))
        self.graphs.add(graph)
        self.created["graph"] += 1
        return OK, graph

    def cudaGraphInstantiate(self, graph, flags):
        if graph not in self.graphs:
            return self._bad("cudaGraphInstantiate", "unknown graph") + (None,)
        graph_exec = ("exec", self._handle())
        self.execs[graph_exec] = graph[2]
        self.created["exec"] += 1
        return OK, graph_exec

    def cudaGraphLaunch(self, graph_exec, stream):
        if graph_exec not in self.execs:
            return self._bad("cudaGraphLaunch", "unknown graph exec")
        if self._failing("cudaGraphLaunch"):
            return (self.fail["cudaGraphLaunch"],)
        for work in self.execs[graph_exec]:
            self.enqueue(stream, work)
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
