"""Native TensorRT backend: the bundle's engines driven through cuda-python (no torch).

- Engines are refused, with how to rebuild them, when the manifest says they were built with
  another TensorRT version or for another GPU compute capability (`check_engine`).
- Device memory comes from cuda-python's runtime API. Each generation owns an execution context,
  a stream and its KV cache on the device; the graph's new K/V slice is copied into the cache in
  place (one strided device-to-device copy per step), nothing of the cache crosses to the host.
- Decode steps (one new token per row) are captured as a CUDA graph after one eager warm-up step
  and replayed; the inputs that change (ids, position, noise) live in fixed device buffers that
  are refreshed before each replay.
- Same seed, same tokens as the ONNX Runtime backend: the noise and the sampling are the graph's.

Written from the TensorRT 10 and cuda-python documentation; it runs only where both and a GPU
are present (tests marked `tensorrt`). The provenance checks are plain Python and tested on CPU.
"""

from __future__ import annotations

import threading
import typing

import numpy as np

from .bundle import Bundle, BundleError
from .contract import AR_STEP, DEFAULT_MAX_BATCH, ENGINE_GRAPHS, cache_input_names
from .cuda import DeviceBuffer, check, copy_new_kv, cudart, device_info
from .loop import InputError


def engine_file_name(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.engine"


# --------------------------------------------------------------------------- provenance


def check_engine(graph: str, meta: dict, tensorrt_version: str, compute_capability: str) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU architecture."""
    rebuild = "rebuild the engines on this machine: prologue build-engines BUNDLE"
    built_with = meta.get("tensorrt_version")
    if built_with != tensorrt_version:
        raise BundleError(f"the {graph} engine was built with TensorRT {built_with}, this machine has "
                          f"{tensorrt_version}; engines only load in the TensorRT version that built them: {rebuild}")
    built_for = meta.get("compute_capability")
    if built_for != compute_capability:
        raise BundleError(f"the {graph} engine was built for GPU compute capability {built_for} "
                          f"({meta.get('device', 'unknown GPU')}), this GPU is {compute_capability}: {rebuild}")


# --------------------------------------------------------------------------- backend


class TensorRTBackend:
    """Engines of a bundle on one GPU. Safe to share between threads: every generation gets its
    own execution context, stream and cache, and one-off graph runs are serialised by a lock."""

    def __init__(self, bundle: Bundle, device: int = 0, cuda_graphs: bool = True):
        engines = bundle.manifest.get("engines") or {}
        missing = [g for g in ENGINE_GRAPHS if g in bundle.graphs and g not in engines]
        if missing:
            raise BundleError(f"{bundle.path} has no TensorRT engine for {', '.join(missing)}; build them on this GPU "
                              f"host: prologue build-engines {bundle.path}")
        try:
            import tensorrt as trt
        except ImportError:
            raise BundleError("the tensorrt backend needs TensorRT: pip install tensorrt (on a CUDA GPU host)") from None
        self.trt, self.cudart = trt, cudart()
        check(self.cudart.cudaSetDevice(device))
        info = device_info(device)
        for graph in ENGINE_GRAPHS:
            if graph in engines:
                check_engine(graph, engines[graph], trt.__version__, info["compute_capability"])
        self.bundle, self.device, self.cuda_graphs = bundle, device, cuda_graphs
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines = {}
        for graph, meta in engines.items():
            engine = runtime.deserialize_cuda_engine((bundle.path / meta["file"]).read_bytes())
            if engine is None:
                raise BundleError(f"TensorRT could not load {meta['file']}; rebuild it: prologue build-engines {bundle.path}")
            self.engines[graph] = engine
        self.max_batch = min(int(m.get("max_batch", DEFAULT_MAX_BATCH)) for m in engines.values())
        self._lock = threading.Lock()
        self._contexts: typing.Dict[str, typing.Any] = {}
        self._stream = check(self.cudart.cudaStreamCreate())
        self.name = f"tensorrt[{info['name']}, {next(iter(engines.values()))['precision']}]"

    def _dtype(self, engine, name: str):
        return np.dtype(self.trt.nptype(engine.get_tensor_dtype(name)))

    def _io(self, engine) -> typing.Tuple[typing.List[str], typing.List[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def run(self, graph: str, feeds: typing.Dict[str, np.ndarray], outputs: typing.Optional[typing.List[str]] = None):
        """One call of a graph with host arrays in and out (decoder, prologue generator)."""
        engine = self.engines[graph]
        with self._lock:
            if graph not in self._contexts:
                self._contexts[graph] = engine.create_execution_context()
            context, stream = self._contexts[graph], self._stream
            in_names, out_names = self._io(engine)
            buffers = []
            try:
                for name in in_names:
                    array = np.ascontiguousarray(feeds[name], dtype=self._dtype(engine, name))
                    context.set_input_shape(name, array.shape)
                    buf = DeviceBuffer(array.nbytes)
                    buf.upload(array, stream)
                    context.set_tensor_address(name, buf.ptr)
                    buffers.append(buf)
                results = {}
                for name in out_names:
                    host = np.empty(tuple(context.get_tensor_shape(name)), dtype=self._dtype(engine, name))
                    buf = DeviceBuffer(host.nbytes)
                    context.set_tensor_address(name, buf.ptr)
                    buffers.append(buf)
                    results[name] = (host, buf)
                if not context.execute_async_v3(stream):
                    raise BundleError(f"TensorRT failed to run {graph}")
                for host, buf in results.values():
                    buf.download(host, stream)
                check(self.cudart.cudaStreamSynchronize(stream))
            finally:
                for buf in buffers:
                    buf.free()
        return [results[n][0] for n in (outputs or out_names)]

    def ar_state(self, rows: int, batch: int, cache_shape: typing.Tuple[int, ...]) -> "DeviceARState":
        return DeviceARState(self, rows, batch, cache_shape)


class DeviceARState:
    """One generation's `ar_step` on the device: a KV cache updated in place, CUDA-graph decode."""

    def __init__(self, backend: TensorRTBackend, rows: int, batch: int, cache_shape: typing.Tuple[int, ...]):
        if batch > backend.max_batch or rows > 2 * backend.max_batch:
            raise InputError(f"batch {batch} is larger than the engines' profile allows ({backend.max_batch}); "
                             "generate in smaller batches or rebuild with prologue build-engines --max-batch N")
        self.b, self.cudart = backend, backend.cudart
        self.engine = backend.engines[AR_STEP]
        self.context = self.engine.create_execution_context()
        self.stream = check(self.cudart.cudaStreamCreate())
        L, R, H, S, d = cache_shape
        self.shape, self.rows, self.batch = cache_shape, rows, batch
        self.cache_names = cache_input_names(L)
        self.itemsize = self.b._dtype(self.engine, self.cache_names[0][0]).itemsize
        cache_bytes = L * R * H * S * d * self.itemsize
        # one allocation per tensor [L, R, H, S, d]; layer i is the engine input k_cache_i / v_cache_i
        self.k_cache, self.v_cache = DeviceBuffer(cache_bytes), DeviceBuffer(cache_bytes)
        for buf in (self.k_cache, self.v_cache):
            check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        V = int(backend.bundle.manifest["vocab"]["vocab_size"])
        sizes = {"input_ids": R * S * 8, "start_pos": 8, "uniform": batch * V * 4, "cfg_scale": 4, "temperature": 4,
                 "top_k": 8, "top_p": 4, "next_tokens": batch * 8, "k_new": cache_bytes, "v_new": cache_bytes,
                 "logits": R * V * 4}
        self.buffers = {name: DeviceBuffer(n) for name, n in sizes.items()}
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.ptr)
        layer_bytes = R * H * S * d * self.itemsize
        for cache, names in zip((self.k_cache, self.v_cache), self.cache_names):
            for i, name in enumerate(names):
                self.context.set_tensor_address(name, cache.ptr + i * layer_bytes)
        self.graph_exec = None
        self.cuda_graph, self.capture_error = backend.cuda_graphs, None
        self.decode_steps = 0
        self.next_tokens = np.empty(batch, dtype=self.b._dtype(self.engine, "next_tokens"))  # int64, or int32

    def _set_shapes(self, n: int) -> None:
        L, R, H, S, d = self.shape
        V = int(self.b.bundle.manifest["vocab"]["vocab_size"])
        shapes = {"input_ids": (R, n), "start_pos": (1,), "uniform": (self.batch, V), "cfg_scale": (1,),
                  "temperature": (1,), "top_k": (1,), "top_p": (1,)}
        shapes.update({name: (R, H, S, d) for names in self.cache_names for name in names})
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)

    def step(self, feeds: typing.Dict[str, np.ndarray]) -> np.ndarray:
        n = int(feeds["input_ids"].shape[1])
        position = int(feeds["start_pos"][0])
        for name, value in feeds.items():
            self.buffers[name].upload(np.ascontiguousarray(value, dtype=self.b._dtype(self.engine, name)), self.stream)
        self._set_shapes(n)
        if n == 1 and self.cuda_graph and self.decode_steps >= 1 and self.graph_exec is None:
            self._capture()  # after one eager decode step with these shapes
        if n == 1 and self.graph_exec is not None:
            check(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        elif not self.context.execute_async_v3(self.stream):
            raise BundleError("TensorRT failed to run ar_step")
        if n == 1:
            self.decode_steps += 1
        for cache, new in ((self.k_cache, self.buffers["k_new"]), (self.v_cache, self.buffers["v_new"])):
            copy_new_kv(self.cudart, cache.ptr, new.ptr, self.shape, position, n, self.itemsize, self.stream)
        self.buffers["next_tokens"].download(self.next_tokens, self.stream)
        check(self.cudart.cudaStreamSynchronize(self.stream))
        return self.next_tokens.astype(np.int64)

    def _capture(self) -> None:
        """Capture one decode step as a CUDA graph; an engine that cannot be captured (TensorRT
        refuses some control flow and data-dependent shapes) keeps running eagerly."""
        cudart = self.cudart
        check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        enqueued = self.context.execute_async_v3(self.stream)
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not enqueued or int(err) != 0:
            self.cuda_graph = False
            self.capture_error = f"enqueue {'ok' if enqueued else 'failed'}, end capture: {err}"
            cudart.cudaGetLastError()  # clear the failed capture's error
            return
        self.graph_exec = check(cudart.cudaGraphInstantiate(graph, 0))

    def close(self) -> None:
        for buf in list(self.buffers.values()) + [self.k_cache, self.v_cache]:
            buf.free()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
