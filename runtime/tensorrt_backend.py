"""Native TensorRT backend: the bundle's engines driven through cuda-python (no torch).

- Engines are refused, with how to rebuild them, when the manifest says they were built with
  another TensorRT version or for another GPU compute capability (`check_engine`).
- Device memory comes from cuda-python's runtime API. Each generation borrows an execution
  context from the backend's per-engine pool (a new one only when the pool is empty, so
  concurrent generations never share one) and owns a stream and its KV cache on the device; the
  graph's new K/V slice is copied into the cache in place (one strided device-to-device copy per
  step), nothing of the cache crosses to the host. `DeviceARState.close()` frees all of it
  (idempotent; `TokenLoop` calls it when the generation ends) and gives the context back.
- Decode steps (one new token per row) are captured as a CUDA graph (thread-local capture mode,
  so other threads' CUDA calls are not affected) after one eager warm-up step and replayed; the
  inputs that change (ids, position, noise) live in fixed device buffers that are refreshed
  before each replay.
- At load, each engine's tensor names, directions and dtypes are compared with the bundle's
  contract (`check_engine_io`). Every TensorRT call that reports failure by returning False and
  every CUDA call's error code is checked; a failure is a `BundleError` / `CudaError` naming the
  tensor or the call.
- Same seed, same tokens as the ONNX Runtime backend: the noise and the sampling are the graph's.

Written from the TensorRT 10 and cuda-python documentation; it runs only where both and a GPU
are present (tests marked `tensorrt`); on CPU it is tested with a fake cudart and a fake
tensorrt (tests/test_gpu_backends.py), which say nothing about real GPU behaviour.
"""

from __future__ import annotations

import math
import threading
import typing

import numpy as np

from .bundle import Bundle, BundleError
from .contract import AR_STEP, ENGINE_GRAPHS, cache_input_names, resolve_shape
from .cuda import DeviceBuffer, check, copy_new_kv, cudart, device_info, layer_stride, native_handle, release_all
from .loop import InputError, close_after_error


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


def check_engine_io(graph: str, contract: dict, actual: typing.Dict[str, typing.Tuple[str, str]],
                    bundle_path="BUNDLE") -> None:
    """Refuse an engine whose tensors differ from the bundle's contract for `graph`.

    contract: the manifest's `{"inputs": [...], "outputs": [...]}` specs (name, numpy dtype name);
    actual: the engine's `{name: ("input" | "output", numpy dtype name)}`."""
    want = {spec["name"]: ("input", spec["dtype"]) for spec in contract["inputs"]}
    want.update({spec["name"]: ("output", spec["dtype"]) for spec in contract["outputs"]})
    rebuild = f"the engine does not match this bundle; rebuild it: prologue build-engines {bundle_path}"
    for name in sorted(set(want) | set(actual)):
        if name not in actual:
            raise BundleError(f"the {graph} engine has no {want[name][0]} {name!r} ({want[name][1]}), which the "
                              f"bundle's contract declares: {rebuild}")
        if name not in want:
            raise BundleError(f"the {graph} engine has an {actual[name][0]} {name!r} that the bundle's contract "
                              f"does not declare: {rebuild}")
        if actual[name] != want[name]:
            raise BundleError(f"the {graph} engine's tensor {name!r} is an {actual[name][0]} of {actual[name][1]}, the "
                              f"bundle's contract says an {want[name][0]} of {want[name][1]}: {rebuild}")


# --------------------------------------------------------------------------- checked TensorRT calls


def set_shape(context, graph: str, name: str, shape) -> None:
    """`IExecutionContext.set_input_shape`, which returns False for a shape it refuses."""
    shape = tuple(int(x) for x in shape)
    if not context.set_input_shape(name, shape):
        raise BundleError(f"TensorRT refused shape {list(shape)} for input {name!r} of the {graph} engine (outside its "
                          "optimisation profile?); use smaller batches or rebuild: prologue build-engines --max-batch N")


def set_address(context, graph: str, name: str, ptr: int) -> None:
    """`IExecutionContext.set_tensor_address`, which returns False for an address it refuses."""
    if not context.set_tensor_address(name, int(ptr)):
        raise BundleError(f"TensorRT refused the device address of tensor {name!r} of the {graph} engine "
                          "(an unknown name, or a misaligned address); the TensorRT log says why")


def execute(context, graph: str, stream) -> None:
    """`IExecutionContext.execute_async_v3(stream_handle: int)`, which returns False when it cannot
    enqueue; the stream goes as its native handle (`cuda.native_handle`)."""
    try:
        ok = context.execute_async_v3(native_handle(stream))
    except Exception as exc:  # the binding raises for some failures instead of returning False
        raise BundleError(f"TensorRT failed to run the {graph} engine: {' '.join(str(exc).split())[:300]}") from None
    if not ok:
        raise BundleError(f"TensorRT failed to run the {graph} engine (execute_async_v3 returned False); "
                          "the TensorRT log above says why")


# --------------------------------------------------------------------------- backend

CONTEXT_POOL_SIZE = 4  # idle execution contexts kept per engine (each holds device activation memory)


class TensorRTBackend:
    """Engines of a bundle on one GPU. Safe to share between threads: every generation borrows an
    execution context of its own from a per-engine pool and owns its stream and cache; one-off
    graph runs (`run`) share one stream and are serialised by a lock. `close()` (or `with`) frees
    the shared stream and the idle contexts; generations still running keep theirs until they end."""

    def __init__(self, bundle: Bundle, device: int = 0, cuda_graphs: bool = True):
        engines = bundle.engines
        missing = [g for g in ENGINE_GRAPHS if g in bundle.graphs and g not in engines]
        if missing:
            raise BundleError(f"{bundle.path} has no TensorRT engine for {', '.join(missing)}; build them on this GPU "
                              f"host: prologue build-engines {bundle.path}")
        try:
            import tensorrt as trt
        except ImportError:
            raise BundleError("the tensorrt backend needs TensorRT: pip install 'prologue-export[tensorrt-cu12]' (CUDA 12 "
                              "driver) or 'prologue-export[tensorrt-cu13]' (CUDA 13), on a GPU host") from None
        self.trt, self.cudart = trt, cudart()
        self.bundle, self.device, self.cuda_graphs = bundle, device, cuda_graphs
        self.use_device()
        info = device_info(device, self.cudart)
        for graph in ENGINE_GRAPHS:
            if graph in engines:
                check_engine(graph, engines[graph], trt.__version__, info["compute_capability"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines = {}
        for graph, meta in engines.items():
            engine = runtime.deserialize_cuda_engine(bundle.read_verified(meta["file"]))  # the checked bytes
            if engine is None:
                raise BundleError(f"TensorRT could not load {meta['file']}; rebuild it: prologue build-engines {bundle.path}")
            self._check_io(graph, engine)
            self.engines[graph] = engine
        self.max_batch = bundle.engine_max_batch
        # the ar_step engine's TopK bound (TensorRT's TopK takes K < 3840): Generator refuses a larger top_k
        self.top_k_max = engines.get(AR_STEP, {}).get("top_k_max")
        self._lock = threading.Lock()  # serialises `run` (one shared stream)
        self._pool_lock = threading.Lock()
        self._pools: typing.Dict[str, typing.List[typing.Any]] = {}  # graph -> idle execution contexts
        self._stream = check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.name = f"tensorrt[{info['name']}, {next(iter(engines.values()))['precision']}]"

    def use_device(self) -> None:
        """Make this backend's GPU current in the calling thread (CUDA's current device is per thread)."""
        check(self.cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def _dtype(self, engine, name: str):
        return np.dtype(self.trt.nptype(engine.get_tensor_dtype(name)))

    def _io(self, engine) -> typing.Tuple[typing.List[str], typing.List[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def _check_io(self, graph: str, engine) -> None:
        if graph not in self.bundle.graphs:
            raise BundleError(f"{self.bundle.path} has a TensorRT engine for {graph!r} but no such graph; rebuild the "
                              f"engines: prologue build-engines {self.bundle.path}")
        inputs, outputs = self._io(engine)
        actual = {n: ("input", self._dtype(engine, n).name) for n in inputs}
        actual.update({n: ("output", self._dtype(engine, n).name) for n in outputs})
        check_engine_io(graph, self.bundle.graphs[graph], actual, self.bundle.path)

    # -- execution contexts --------------------------------------------------------------------

    def borrow_context(self, graph: str):
        """An idle execution context of `graph`'s engine, created only when the pool has none: two
        callers never hold the same context. Give it back with `return_context`."""
        with self._pool_lock:
            pool = self._pools.setdefault(graph, [])
            if pool:
                return pool.pop()
        context = self.engines[graph].create_execution_context()
        if context is None:
            raise BundleError(f"TensorRT could not create an execution context for the {graph} engine "
                              "(out of device memory?); run fewer generations at once")
        return context

    def return_context(self, graph: str, context) -> None:
        with self._pool_lock:
            pool = self._pools.setdefault(graph, [])
            if len(pool) < CONTEXT_POOL_SIZE and all(c is not context for c in pool):
                pool.append(context)

    def idle_contexts(self, graph: str) -> int:
        with self._pool_lock:
            return len(self._pools.get(graph, ()))

    # -- graph runs ----------------------------------------------------------------------------

    def run(self, graph: str, feeds: typing.Dict[str, np.ndarray], outputs: typing.Optional[typing.List[str]] = None):
        """One call of a graph with host arrays in and out (decoder, prologue generator)."""
        engine = self.engines[graph]
        in_names, out_names = self._io(engine)
        with self._lock:
            if self._stream is None:
                raise BundleError("this TensorRT backend is closed")
            self.use_device()
            context, stream, buffers = self.borrow_context(graph), self._stream, []
            try:
                results = self._run(graph, context, stream, buffers, feeds, in_names, out_names)
            except BaseException:  # the stream may still hold queued copies into these buffers: finish them first
                try:
                    release_all([lambda: self.cudart.cudaStreamSynchronize(stream), *[buf.free for buf in buffers]])
                except Exception:  # the error on its way out is the one to report
                    pass
                raise
            else:
                release_all([buf.free for buf in buffers])  # `_run` synchronized the stream
            finally:
                self.return_context(graph, context)
        return [results[n] for n in (outputs or out_names)]

    def _run(self, graph, context, stream, buffers, feeds, in_names, out_names) -> typing.Dict[str, np.ndarray]:
        engine = self.engines[graph]
        for name in in_names:
            array = np.ascontiguousarray(feeds[name], dtype=self._dtype(engine, name))
            set_shape(context, graph, name, array.shape)
            buffers.append(DeviceBuffer(array.nbytes, self.cudart))
            buffers[-1].upload(array, stream)
            set_address(context, graph, name, buffers[-1].ptr)
        results = {}
        for name in out_names:
            shape = tuple(int(x) for x in context.get_tensor_shape(name))
            if any(x < 0 for x in shape):
                raise BundleError(f"TensorRT cannot tell the shape of output {name!r} of the {graph} engine ({list(shape)}) "
                                  "from the input shapes")
            results[name] = np.empty(shape, dtype=self._dtype(engine, name))
            buffers.append(DeviceBuffer(results[name].nbytes, self.cudart))
            set_address(context, graph, name, buffers[-1].ptr)
        execute(context, graph, stream)
        for name, buf in zip(out_names, buffers[len(in_names):]):
            buf.download(results[name], stream)
        check(self.cudart.cudaStreamSynchronize(stream), f"cudaStreamSynchronize (after {graph})")
        return results

    def ar_state(self, rows: int, batch: int, cache_shape: typing.Tuple[int, ...]) -> "DeviceARState":
        return DeviceARState(self, rows, batch, cache_shape)

    def close(self) -> None:
        """Destroy the shared stream and drop the idle contexts (idempotent)."""
        with self._lock:
            stream, self._stream = self._stream, None
            with self._pool_lock:
                self._pools.clear()
            if stream is not None:
                check(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceARState:
    """One generation's `ar_step` on the device: a borrowed execution context, a stream, a KV
    cache updated in place, CUDA-graph decode steps.

    `close()` (idempotent; also `with state:`) synchronises the stream, destroys the CUDA graph
    exec and the stream, frees every device buffer and gives the context back to the backend's
    pool. `TokenLoop` closes its state when the generation ends."""

    def __init__(self, backend: TensorRTBackend, rows: int, batch: int, cache_shape: typing.Tuple[int, ...]):
        if batch > backend.max_batch or rows > 2 * backend.max_batch:
            raise InputError(f"batch {batch} is larger than the engines' profile allows ({backend.max_batch}); "
                             "generate in smaller batches or rebuild with prologue build-engines --max-batch N")
        self.b, self.cudart = backend, backend.cudart
        self.engine = backend.engines[AR_STEP]
        self.shape, self.rows, self.batch = cache_shape, rows, batch
        self.cache_names = cache_input_names(cache_shape[0])
        self.cache_inputs = set(self.cache_names[0] + self.cache_names[1])
        graph = backend.bundle.graphs[AR_STEP]
        self.specs = graph["inputs"] + graph["outputs"]
        self.context = self.stream = self.graph_exec = self.k_cache = self.v_cache = None
        self.buffers: typing.Dict[str, DeviceBuffer] = {}
        self.cuda_graph, self.capture_error = backend.cuda_graphs, None
        self.decode_steps = 0
        self.closed = False
        try:
            self._allocate()
        except BaseException:
            close_after_error(self)  # the allocation's error is the one to report
            raise

    def _allocate(self) -> None:
        L, R, H, S, d = self.shape
        self.b.use_device()
        self.context = self.b.borrow_context(AR_STEP)
        self.stream = check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.itemsize = self.b._dtype(self.engine, self.cache_names[0][0]).itemsize
        # one allocation per tensor [L, R, H, S, d]; layer i, the engine input k_cache_i / v_cache_i, starts
        # at i * stride: its size rounded up to TensorRT's 256-byte address alignment (cuda.layer_stride)
        self.stride = layer_stride(self.shape, self.itemsize)
        cache_bytes = L * self.stride
        self.k_cache = DeviceBuffer(cache_bytes, self.cudart)
        self.v_cache = DeviceBuffer(cache_bytes, self.cudart)
        for buf in (self.k_cache, self.v_cache):  # stale slots are masked, but must not hold NaN
            check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream), "cudaMemsetAsync (KV cache)")
        # every other input and output of the graph at its largest (a prefill of the whole sequence),
        # sized from the bundle's specs of ar_step (runtime/contract.py STEP_INPUTS and ar_step_io)
        largest = {"rows": R, "batch": self.batch, "new_tokens": S}
        for spec in self.specs:
            if spec["name"] not in self.cache_inputs:
                nbytes = math.prod(resolve_shape(spec["shape"], largest)) * self.b._dtype(self.engine, spec["name"]).itemsize
                self.buffers[spec["name"]] = DeviceBuffer(nbytes, self.cudart)
                set_address(self.context, AR_STEP, spec["name"], self.buffers[spec["name"]].ptr)
        for cache, names in zip((self.k_cache, self.v_cache), self.cache_names):
            for i, name in enumerate(names):
                set_address(self.context, AR_STEP, name, cache.ptr + i * self.stride)
        self.next_tokens = np.empty(self.batch, dtype=self.b._dtype(self.engine, "next_tokens"))

    def _set_shapes(self, n: int) -> None:
        sizes = {"rows": self.rows, "batch": self.batch, "new_tokens": n}
        for spec in self.b.bundle.graphs[AR_STEP]["inputs"]:
            set_shape(self.context, AR_STEP, spec["name"], resolve_shape(spec["shape"], sizes))

    def step(self, feeds: typing.Dict[str, np.ndarray]) -> np.ndarray:
        if self.closed:
            raise InputError("this generation's device state is closed (the generation ended or was closed)")
        self.b.use_device()  # CUDA's current device is per thread: a generation may step from any thread
        n = int(feeds["input_ids"].shape[1])
        position = int(feeds["start_pos"][0])
        for name, value in feeds.items():
            self.buffers[name].upload(np.ascontiguousarray(value, dtype=self.b._dtype(self.engine, name)), self.stream)
        self._set_shapes(n)
        self._check_output_shapes(n)
        if n == 1 and self.cuda_graph and self.decode_steps >= 1 and self.graph_exec is None:
            self._capture()  # after one eager decode step with these shapes
        if n == 1 and self.graph_exec is not None:
            check(self.cudart.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch (ar_step decode)")
        else:
            execute(self.context, AR_STEP, self.stream)
        if n == 1:
            self.decode_steps += 1
        for cache, new in ((self.k_cache, self.buffers["k_new"]), (self.v_cache, self.buffers["v_new"])):
            copy_new_kv(self.cudart, cache.ptr, new.ptr, self.shape, position, n, self.itemsize, self.stream,
                        stride=self.stride)
        self.buffers["next_tokens"].download(self.next_tokens, self.stream)
        check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize (after ar_step)")
        self.b.bundle.check_tokens(AR_STEP, self.next_tokens, self.batch)
        return self.next_tokens.astype(np.int64)

    def _check_output_shapes(self, n: int) -> None:
        """The engine's output shapes for this step must be the contract's: the buffers were sized
        from it, so a larger output would be written past them."""
        sizes = {"rows": self.rows, "batch": self.batch, "new_tokens": n}
        for spec in self.b.bundle.graphs[AR_STEP]["outputs"]:
            shape = self.context.get_tensor_shape(spec["name"])
            self.b.bundle.check_output(AR_STEP, spec["name"], tuple(shape), None, sizes)

    def _capture(self) -> None:
        """Capture one decode step as a CUDA graph; an engine that cannot be captured (TensorRT
        refuses some control flow and data-dependent shapes) keeps running eagerly, and says why
        in `capture_error`. Thread-local mode: only this thread's unsafe CUDA calls break the capture,
        other threads' generations are unaffected. The captured graph is destroyed once
        instantiated (the exec does not need it)."""
        rt = self.cudart
        check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            failure = None if self.context.execute_async_v3(native_handle(self.stream)) else "execute_async_v3 returned False"
        except Exception as exc:  # the capture must still be ended; the eager step will raise it again
            failure = f"execute_async_v3 raised {exc!r}"
        err, graph = rt.cudaStreamEndCapture(self.stream)
        if int(err) != 0:  # a failure inside the capture invalidates it: keep that first reason
            failure = f"{failure}; cudaStreamEndCapture: {err}" if failure else f"cudaStreamEndCapture: {err}"
        else:
            try:
                if failure is None:
                    err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
                    if int(err) != 0:
                        failure = f"cudaGraphInstantiate: {err}"
                    else:
                        self.graph_exec = graph_exec
            finally:
                check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        if failure is not None:
            self.cuda_graph, self.capture_error = False, failure
            rt.cudaGetLastError()  # clears the failed capture's error (the call returns that error)

    def close(self) -> None:
        """Free everything this generation holds (idempotent); raises the first failed call's error
        after attempting every release."""
        if self.closed:
            return
        self.closed = True
        rt, stream, graph_exec, context = self.cudart, self.stream, self.graph_exec, self.context
        buffers = [b for b in [*self.buffers.values(), self.k_cache, self.v_cache] if b is not None]
        self.stream = self.graph_exec = self.context = self.k_cache = self.v_cache = None
        self.buffers = {}
        finished = [stream is None]

        def synchronize():  # the stream's work must finish before its memory and context go
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            finished[0] = True

        def give_back():  # a context whose stream could not finish is dropped, not reused
            if finished[0]:
                self.b.return_context(AR_STEP, context)

        steps = [self.b.use_device] + ([synchronize] if stream is not None else [])  # this thread may be another
        if graph_exec is not None:
            steps.append(lambda: check(rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy"))
        steps += [buf.free for buf in buffers]
        if stream is not None:
            steps.append(lambda: check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy"))
        if context is not None:
            steps.append(give_back)
        release_all(steps)

    def __enter__(self) -> "DeviceARState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
