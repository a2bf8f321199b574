"""A fake `tensorrt` module (`fake_tensorrt`): the runtime API the native backend calls
(`Runtime`, engines, execution contexts) and the builder API `build_engines` calls (`Builder`,
`OnnxParser`, builder config, optimization profiles, timing cache), in one module object.

Like tests/fakes/cuda.py it is as strict as TensorRT about what our code relies on (sources:
TensorRT's include/NvInferRuntime.h and python/src/infer/pyCore.cpp at v10.7.0):

- a fake engine runs an ONNX graph (the `.trt.onnx` form an engine is built from, where the test
  gives one) with ONNX Runtime (CPU) on the bytes behind the addresses bound to its context (device
  memory of a `FakeCudart`), queued on the given stream, so a whole generation gives real tokens;
- `set_input_shape` returns False for a shape outside the engine's optimization profile
  (NvInferRuntime.h, IExecutionContext::setInputShape: "false if ... some other error occurred";
  TensorRT refuses dimensions outside the profile's [min, max]);
- `set_tensor_address` returns False for a pointer that is not 256-byte aligned (NvInferRuntime.h,
  setTensorAddress: "The pointer must have at least 256-byte alignment");
- `execute_async_v3` takes the stream as an int handle (pyCore.cpp: `stream_handle`); an object is
  recorded as a bad call (cuda-bindings deprecates `int(obj)`); with `fail_in_capture` set it fails
  inside a stream capture and invalidates it;
- an optimization profile is valid when `bool(profile)` (pyCore.cpp:879-880, `__bool__` ->
  isValid): every input's min <= opt <= max; there is no `is_valid`;
- the builder records what it was given (the files parsed, each profile's shapes, the network
  flags) and "builds" an engine whose bytes name the file it parsed.
"""

from __future__ import annotations

import enum
import threading
import types

import numpy as np


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

    def __init__(self, trt, graph: str, onnx_path, profile=None):
        import onnxruntime as ort

        self.trt, self.graph, self.onnx_path, self.profile = trt, graph, onnx_path, profile  # profile: {input: min/opt/max}
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
        shape = tuple(int(x) for x in shape)
        bounds = (self.engine.profile or {}).get(name)
        if bounds is not None and (len(shape) != len(bounds["min"]) or any(
                not lo <= d <= hi for d, lo, hi in zip(shape, bounds["min"], bounds["max"]))):
            self.trt.refused_shapes.append((name, shape))
            return False  # outside the optimization profile
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if self.trt.refuse.get("set_tensor_address") in (name, "*") or name not in self.engine.modes:
            return False
        if int(ptr) % 256:
            self.trt.misaligned.append((name, int(ptr)))
            return False  # TensorRT requires 256-byte aligned tensor addresses
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

    def execute_async_v3(self, stream_handle) -> bool:
        cudart, engine = self.trt.cudart, self.engine
        if isinstance(stream_handle, bool) or not isinstance(stream_handle, int):
            cudart.bad_calls.append(("execute_async_v3", f"stream {stream_handle!r} is not an int handle "
                                                         "(pass cuda.bindings.utils.get_cuda_native_handle(stream))"))
            stream_handle = int(stream_handle)
        stream = cudart.stream_of(stream_handle, "execute_async_v3")
        if self.trt.fail_in_capture and stream.capture is not None:
            cudart.fail_capture(stream)  # an operation that cannot be captured invalidates the capture
            return False
        if self.trt.refuse.get("execute_async_v3"):
            return False
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

        cudart.enqueue(stream, work, f"execute_async_v3 ({engine.graph})")
        return True


def fake_tensorrt(cudart=None, engine_graphs: dict = None, version: str = "10.7.0", timing_cache_ok: bool = True):
    """A module object standing in for `tensorrt`.

    Runtime API: `cudart` is the `FakeCudart` whose memory engines run on; `engine_graphs` maps an
    engine file's bytes to (graph name, ONNX path[, profile]). Settable: `refuse[call] = tensor name
    or "*"` (that call returns False), `io_changes[graph] = {tensor: (TensorIOMode, DataType) or
    None}`, `fail_in_capture` (execute_async_v3 fails inside a stream capture). Recorded:
    `engines` (deserialized), `refused_shapes`, `misaligned`.

    Builder API: records `parsed` (the ONNX files, in order), `shapes[file][input] = (min, opt,
    max)` and `flags` (each network's creation flags); `set_timing_cache` returns
    `timing_cache_ok`."""
    engine_graphs = {} if engine_graphs is None else engine_graphs
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.cudart, trt.refuse, trt.io_changes, trt.engines = cudart, {}, {}, []
    trt.fail_in_capture, trt.refused_shapes, trt.misaligned = False, [], []
    trt.parsed, trt.shapes, trt.timing_cache_ok, trt.flags = [], {}, timing_cache_ok, []
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
    trt.nptype = lambda dtype: NUMPY[dtype]

    class Logger:
        WARNING = 2

        def __init__(self, severity=WARNING):
            self.severity = severity

    # -- runtime -------------------------------------------------------------------------------

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if bytes(data) not in engine_graphs:
                return None
            engine = FakeEngine(trt, *engine_graphs[bytes(data)])
            trt.engines.append(engine)
            return engine

    # -- builder -------------------------------------------------------------------------------

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            trt.parsed.append(path)
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (list(lo), list(opt), list(hi))
            trt.shapes.setdefault(trt.parsed[-1], {})[name] = (list(lo), list(opt), list(hi))

        def __bool__(self):  # isValid: min <= opt <= max in every dimension of every input
            return all(len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                       for lo, opt, hi in self.shapes.values())

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            pass

        def create_timing_cache(self, data):
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return trt.timing_cache_ok

        def add_optimization_profile(self, profile):
            return 0

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.flags.append(flags)
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine:" + trt.parsed[-1].encode()

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.OnnxParser, trt.Builder = Parser, Builder
    trt.NetworkDefinitionCreationFlag = type("Flags", (), {"STRONGLY_TYPED": 5})
    trt.MemoryPoolType = type("Pools", (), {"WORKSPACE": 0})
    return trt
