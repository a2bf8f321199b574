"""A fake cuda-python runtime (`FakeCudart`) and a fake `tensorrt` module (`fake_tensorrt`) for
testing the GPU backends on a CPU.

They check how the backends use the APIs (every allocation freed once, every stream / graph /
graph exec destroyed once, capture modes, return values), not how a GPU behaves:

- device memory is host `bytearray`s keyed by fake device pointers, so copies really move bytes;
- streams run their work at once, except while captured: then the work is recorded into the
  graph and runs when the graph exec is launched;
- a fake engine runs the bundle's ONNX graph with ONNX Runtime (CPU) on the bytes behind the
  addresses bound to its context, so a whole generation gives real tokens.
Every call returns cuda-python's `(error, *values)`; `fail[name] = code` makes a call fail.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import types

import numpy as np


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


# --------------------------------------------------------------------------- tensorrt


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 9


NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
         DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
ORT_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(int64)": DataType.INT64, "tensor(uint8)": DataType.UINT8,
             "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL, "tensor(float16)": DataType.HALF}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class FakeEngine:
    """An engine of one ONNX graph: its I/O from the graph, its execution by ONNX Runtime."""

    def __init__(self, trt, graph: str, onnx_path):
        import onnxruntime as ort

        self.trt, self.graph = trt, graph
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (ORT_TYPES[i.type], i.shape) for i in self.session.get_inputs()}
        self.outputs = {o.name: (ORT_TYPES[o.type], o.shape) for o in self.session.get_outputs()}
        self.modes = {**{n: TensorIOMode.INPUT for n in self.inputs}, **{n: TensorIOMode.OUTPUT for n in self.outputs}}
        self.dtypes = {n: t for n, (t, _) in {**self.inputs, **self.outputs}.items()}
        for name, change in trt.io_changes.get(graph, {}).items():  # tests that tamper with the I/O
            if change is None:
                del self.modes[name], self.dtypes[name]
            else:
                self.modes[name], self.dtypes[name] = change
        self.names = list(self.modes)
        self.contexts = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.modes.get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str):
        return self.dtypes[name]

    def create_execution_context(self):
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.trt = engine, engine.trt
        self.shapes, self.addresses = {}, {}
        self.runs = 0
        self.busy = threading.Lock()

    def set_input_shape(self, name, shape) -> bool:
        if self.trt.refuse.get("set_input_shape") in (name, "*") or name not in self.engine.inputs:
            return False
        self.shapes[name] = tuple(int(x) for x in shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if self.trt.refuse.get("set_tensor_address") in (name, "*") or name not in self.engine.modes:
            return False
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes.get(name, tuple(-1 if isinstance(d, str) else d for d in self.engine.inputs[name][1]))
        dims = {}
        for n, (_, shape) in self.engine.inputs.items():
            for d, size in zip(shape, self.shapes.get(n, ())):
                if isinstance(d, str):
                    dims[d] = size
        return tuple(dims.get(d, -1) if isinstance(d, str) else d for d in self.engine.outputs[name][1])

    def execute_async_v3(self, stream) -> bool:
        if self.trt.refuse.get("execute_async_v3"):
            return False
        cudart, engine = self.trt.cudart, self.engine
        assert set(self.shapes) == set(engine.inputs), "every input shape must be set before execution"
        assert set(self.addresses) >= set(engine.modes), "every tensor needs an address before execution"
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # a captured graph keeps these

        def work():
            assert self.busy.acquire(blocking=False), "one execution context used by two threads at once"
            try:
                feeds = {}
                for name, shape in shapes.items():
                    dtype = np.dtype(NUMPY[engine.inputs[name][0]])
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    feeds[name] = np.frombuffer(cudart.read(addresses[name], nbytes), dtype).reshape(shape)
                results = engine.session.run(list(engine.outputs), feeds)
                for name, value in zip(engine.outputs, results):
                    cudart.write(addresses[name], np.ascontiguousarray(value).tobytes())
                self.runs += 1
            finally:
                self.busy.release()

        cudart.enqueue(stream, work)
        return True


def fake_tensorrt(cudart: FakeCudart, engine_graphs: dict, version: str = "10.7.0"):
    """A module object standing in for `tensorrt`: `engine_graphs` maps an engine file's bytes to
    (graph name, ONNX path). Settable: `refuse[call] = tensor name or "*"` (that call returns
    False), `io_changes[graph] = {tensor: (TensorIOMode, DataType) or None}`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.cudart, trt.refuse, trt.io_changes, trt.engines = cudart, {}, {}, []
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
    trt.nptype = lambda dtype: NUMPY[dtype]

    class Logger:
        WARNING = 2

        def __init__(self, severity=WARNING):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if bytes(data) not in engine_graphs:
                return None
            engine = FakeEngine(trt, *engine_graphs[bytes(data)])
            trt.engines.append(engine)
            return engine

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt
