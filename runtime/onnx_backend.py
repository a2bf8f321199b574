"""ONNX Runtime execution of a bundle's graphs (CPU here; CUDA/TensorRT providers where
onnxruntime-gpu is installed).

On the CPU provider the KV cache is a host array (`HostKVState`). On the CUDA or TensorRT
provider, with cuda-python installed, each generation keeps its cache on the GPU as ONNX Runtime
`OrtValue`s bound through IO binding (`OrtDeviceState`): the small inputs are bound from host
memory, the new K/V slice stays on the device and is copied into the cache in place, and only the
sampled tokens come back. Without cuda-python the GPU providers fall back to the host cache.
"""

from __future__ import annotations

import os
import threading
import typing
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError, check_signature
from .contract import AR_STEP, cache_feeds, cache_input_names, profile_shapes
from .cuda import CudaUnavailable, check, copy_new_kv, cudart, layer_stride, release_all
from .errors import PrologueError
from .loop import HostKVState, InputError

ORT_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(uint8)": "uint8",
             "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(bool)": "bool"}
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


ORT_INSTALL_HINT = ("pip install 'prologue-export[cpu]' (CPU), or on a GPU host 'prologue-export[gpu-cu12]' "
                    "(nvidia-smi shows CUDA 12.x) or 'prologue-export[gpu-cu13]' (CUDA 13.x); exactly one of them per "
                    "environment (onnxruntime and onnxruntime-gpu overwrite each other's files)")


def run_failed(bundle: Bundle, graph: str, exc: BaseException) -> BundleError:
    """An ONNX Runtime failure while running `graph` (a node that fails on these inputs, a shape the
    graph cannot take) as one line naming the graph: the graph does not do what its manifest says."""
    message = " ".join(str(exc).split())[:300] or type(exc).__name__
    return BundleError(f"the {graph} graph of {bundle.path} failed in ONNX Runtime: {message}; the graph does not "
                       "do what its manifest says (re-export the bundle)")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BundleError(f"ONNX Runtime is not installed: {ORT_INSTALL_HINT}") from None
    return onnxruntime


ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_PRELOADED: typing.List[bool] = []


def preload_gpu_libraries(ort) -> None:
    """`onnxruntime.preload_dlls()` once per process before the first GPU session (ONNX Runtime >=
    1.21): it loads the CUDA and cuDNN libraries of the nvidia-* pip packages, which the CUDA provider
    does not find by itself unless torch was imported first (its docstring). Missing cuDNN is ignored
    there; anything else it cannot load shows when the session's providers are checked."""
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED.append(True)
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - best effort; the provider check after loading reports what is missing
        pass


def available_providers() -> typing.List[str]:
    return list(_ort().get_available_providers())


# provider aliases; `tensorrt` keeps CUDA behind TensorRT so that the nodes TensorRT rejects run on
# the GPU rather than on the CPU with host copies
PROVIDER_ALIASES = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"],
                    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}


def resolve_providers(providers: typing.Union[str, typing.Sequence[str], None]) -> typing.List[str]:
    """`auto`/None: the best available of CUDA, CPU (TensorRT only when asked for);
    `cpu` / `cuda` / `tensorrt` (= TensorRT, CUDA); or a list of names or aliases, kept in the
    order given. The CPU provider is appended last when missing, for ops no accelerator has."""
    available = available_providers()
    if providers in (None, "auto"):
        chosen = [p for p in PROVIDER_ORDER if p in available and p != "TensorrtExecutionProvider"]
        return chosen or ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    chosen = []
    for p in providers:
        for name in PROVIDER_ALIASES.get(p, [p]):
            if name not in chosen:
                chosen.append(name)
    missing = [p for p in chosen if p not in available]
    if missing:
        raise BundleError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here (available: "
                          f"{', '.join(available)}); on a GPU host use onnxruntime-gpu instead of onnxruntime: pip uninstall -y "
                          "onnxruntime, then pip install 'prologue-export[gpu-cu12]' (or [gpu-cu13])")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return chosen


def tensorrt_cache_dir(bundle: Bundle) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps this bundle's engines and timing cache:
    `$PROLOGUE_TRT_CACHE` or `$XDG_CACHE_HOME/prologue-export/ort-tensorrt` (`~/.cache/...`), one folder
    per bundle manifest (its sha256): engines built for another bundle are never picked up."""
    base = os.environ.get("PROLOGUE_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "prologue-export" / "ort-tensorrt"
    folder = Path(base) / bundle.digest[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


SMALL_GRAPH_BYTES = 8 * 1024**2
# the one in-memory "external data file" handed to ONNX Runtime for a graph without external weights: with
# any table given, ONNX Runtime takes external data only from it, never from the working directory
NO_EXTERNAL_DATA = "<prologue-export: no external data>"


def default_threads(graph_bytes: int) -> int:
    """One intra-op thread for a graph under 8 MB of weights, all logical CPUs above.

    A small graph's nodes are too small to split: a second thread adds a hand-over per node and,
    when the OS puts both threads on one core, doubles the step time (the tiny AR step measured
    0.14 ms with one thread, 0.16-0.40 ms with two on this project's 2-core CPU). Larger graphs
    are bound by their matmuls, which scale with threads (ONNX Runtime's own default counts only
    physical cores; all logical CPUs measured faster here)."""
    return 1 if graph_bytes < SMALL_GRAPH_BYTES else (os.cpu_count() or 1)


class OrtBackend:
    """Lazily created, signature-checked sessions, one per graph. Sessions are thread safe
    (ONNX Runtime allows concurrent `run` calls), and creation is guarded by a lock."""

    def __init__(self, bundle: Bundle, providers=None, intra_op_threads: typing.Optional[int] = None,
                 ar_graph: str = AR_STEP):
        self.bundle = bundle
        self.ar_graph = ar_graph  # "ar_step" or a weight-only quantized variant ("ar_step_int4", ...)
        self.explicit = providers not in (None, "auto")  # a GPU provider the user asked for must load
        self.providers = resolve_providers(providers)
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 1):
            raise InputError(f"threads must be an integer >= 1 (or None for the default), got {intra_op_threads!r}")
        self.intra_op_threads = intra_op_threads  # None: chosen per graph (`default_threads`)
        self._sessions: typing.Dict[str, typing.Any] = {}
        self._external: typing.Dict[str, list] = {}  # graph -> its in-memory external weights, kept with the session
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"onnxruntime[{self.providers[0]}]"

    def threads_for(self, graph: str) -> int:
        """Intra-op threads of one graph's session: the `threads` given, else `default_threads`."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        file = self.bundle.graphs[graph]["file"]  # and its external weights, `<file>.data`, if any
        return default_threads(sum(int(f["bytes"]) for n, f in self.bundle.files.items() if n.startswith(file)))

    def session(self, graph: str):
        with self._lock:
            if graph not in self._sessions:
                sess = self._create_session(graph)
                check_signature(graph, self.bundle.graphs[graph],
                                [(i.name, ORT_TYPES.get(i.type, i.type), i.shape) for i in sess.get_inputs()],
                                [(o.name, ORT_TYPES.get(o.type, o.type), o.shape) for o in sess.get_outputs()])
                self._sessions[graph] = sess
            return self._sessions[graph]

    def _create_session(self, graph: str):
        """A session built from the graph's bytes as they were checked against the manifest
        (`Bundle.read_verified`): a file swapped after the bundle was loaded is refused, never run,
        and the graph is read once. The bytes are dropped once ONNX Runtime has parsed them.

        External weights (`<file>.data`, graphs over 2 GB) are read and checked the same way and
        handed to ONNX Runtime in memory (`add_external_initializers_from_files_in_memory`, kept
        alive with the session: ONNX Runtime may point into them); a graph never gets weights from
        the process's working directory. An ONNX Runtime without that API (older than this
        project's tested versions) loads such a graph from its path after checking both files: the
        weights are then read again by ONNX Runtime, after the check (a documented limitation)."""
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads_for(graph)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        file = self.bundle.graphs[graph]["file"]
        model = self.bundle.read_verified(file)
        external = [n for n in (file + ".data",) if n in self.bundle.files]
        in_memory = hasattr(options, "add_external_initializers_from_files_in_memory")
        if in_memory:
            names = external or [NO_EXTERNAL_DATA]
            buffers = ([np.frombuffer(self.bundle.read_verified(n), dtype=np.uint8) for n in external]
                       or [np.zeros(1, dtype=np.uint8)])
            options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
            self._external[graph] = buffers if external else []
        elif external:
            for name in external:
                self.bundle.read_verified(name)
            model = str(self.bundle.graph_file(graph))
        if any(p in ACCELERATORS for p in self.providers):
            preload_gpu_libraries(ort)
        try:
            session = ort.InferenceSession(model, options, providers=self.provider_list(graph))
        except Exception as exc:  # ORT raises its own exception types
            message = " ".join(str(exc).split())[:300]
            raise BundleError(f"ONNX Runtime cannot load {self.bundle.path / file}: {message}") from None
        self._check_loaded(session)
        return session

    def provider_list(self, graph: str) -> list:
        """The providers handed to ONNX Runtime for `graph`: TensorRT with its options (below)."""
        return [(p, self.tensorrt_options(graph)) if p == "TensorrtExecutionProvider" else p for p in self.providers]

    def tensorrt_options(self, graph: str) -> typing.Dict[str, str]:
        """ONNX Runtime's TensorRT provider options for one graph (its docs, "Configurations"): engines
        and timing cache kept on disk per bundle (`tensorrt_cache_dir`), so a process does not rebuild
        them on first use, and one explicit profile from the contract (`profile_shapes`: batch 1 ..
        the bundle's max batch, prefill up to the whole sequence), so every batch size, prefill and
        decode share one engine instead of one build per new shape."""
        cache = str(tensorrt_cache_dir(self.bundle))
        profile = profile_shapes(self.bundle.graphs[graph], self.bundle.max_batch)

        def shapes(key: str) -> str:
            return ",".join(f"{name}:{'x'.join(str(d) for d in dims[key])}" for name, dims in profile.items())

        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache, "trt_profile_min_shapes": shapes("min"),
                "trt_profile_opt_shapes": shapes("opt"), "trt_profile_max_shapes": shapes("max")}

    def _check_loaded(self, session) -> None:
        """A GPU provider that ONNX Runtime lists but cannot load (CUDA or cuDNN libraries missing, a
        driver too old) is left out of the session, which then runs on the CPU (or the Python API falls
        back to it): `get_available_providers` names what the package was built with, the session's
        `get_providers` what it loaded. Asked for explicitly: a one-line error; with `auto`: the
        backend says CPU from now on (its name, its host KV cache) and warns once."""
        loaded = list(session.get_providers())
        missing = [p for p in self.providers if p in ACCELERATORS and p not in loaded]
        if not missing:
            return
        what = f"ONNX Runtime could not load {', '.join(missing)} (loaded: {', '.join(loaded) or 'none'})"
        if self.explicit:
            raise BundleError(f"{what}: its CUDA/cuDNN libraries are missing or do not match the driver; "
                              f"{ORT_INSTALL_HINT}, or use --backend cpu")
        import warnings

        warnings.warn(f"{what}; running on the CPU", RuntimeWarning, stacklevel=4)
        self.providers = [p for p in self.providers if p not in missing] or ["CPUExecutionProvider"]

    def run(self, graph: str, feeds: typing.Dict[str, np.ndarray], outputs: typing.Optional[typing.List[str]] = None):
        session = self.session(graph)
        try:
            return session.run(outputs, feeds)
        except Exception as exc:  # ONNX Runtime raises its own types (Fail, RuntimeException, InvalidArgument, ...)
            if isinstance(exc, PrologueError):
                raise
            raise run_failed(self.bundle, graph, exc) from None

    def ar_step(self, feeds: typing.Dict[str, np.ndarray], k_cache, v_cache):
        """One `ar_step` call with host caches `[L, rows, H, S, d]` (fed per layer, without copies);
        its outputs checked against the contract (`Bundle.check_outputs`, `check_tokens`) before the
        host writes the new slice into the cache."""
        next_tokens, k_new, v_new = self.run(self.ar_graph, {**feeds, **cache_feeds(k_cache, v_cache)},
                                             ["next_tokens", "k_new", "v_new"])
        sizes = step_sizes(feeds)
        self.bundle.check_outputs(self.ar_graph, {"k_new": k_new, "v_new": v_new}, sizes)
        self.bundle.check_tokens(self.ar_graph, next_tokens, sizes["batch"])
        return next_tokens, k_new, v_new

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"

    def ar_state(self, rows: int, batch: int, cache_shape: tuple):
        """The KV cache of one generation: on the GPU (IO binding) when possible, else on the host."""
        self.session(self.ar_graph)  # loaded first: a GPU provider that fails to load means the CPU
        if self.device == "cuda":
            try:
                return OrtDeviceState(self, cache_shape)
            except CudaUnavailable:
                pass
        return HostKVState(self.ar_step, cache_shape)


def step_sizes(feeds: typing.Dict[str, np.ndarray]) -> typing.Dict[str, int]:
    """The axis sizes of one ar_step call (`rows`, `new_tokens`, `batch`) from its step feeds."""
    rows, n = feeds["input_ids"].shape
    return {"rows": int(rows), "new_tokens": int(n), "batch": int(feeds["uniform"].shape[0])}


class OrtDeviceState:
    """`ar_step` through IO binding with the KV cache kept on the GPU (CUDA/TensorRT providers).

    The cache is one device allocation per tensor, `[L, ...]`, layer i at `i * stride` (its size
    rounded up to TensorRT's 256-byte address alignment, `cuda.layer_stride`: the TensorRT provider
    hands these addresses to TensorRT); layer i is bound as the graph input `k_cache_i` / `v_cache_i`
    by its address, so nothing is copied per step except the new slice. ONNX Runtime runs on streams
    of its own, created non-blocking (onnxruntime/core/providers/cuda/cuda_stream_handle.cc), and
    synchronizes them before `run_with_iobinding` returns (the run option
    `disable_synchronize_execution_providers` defaults to off,
    include/onnxruntime/core/session/onnxruntime_run_options_config_keys.h); the new slice is then
    copied on this state's own stream, which is synchronized before the step returns: the next run
    reads a complete cache, and `k_new` / `v_new` go back to ONNX Runtime's pool only once the copy
    has read them. (A copy on the legacy default stream, as before, is not ordered with ONNX
    Runtime's non-blocking streams: CUDA Runtime API, "Stream synchronization behavior".)
    Written from the ONNX Runtime IO-binding and CUDA documentation; it runs only where
    onnxruntime-gpu, cuda-python and a GPU are present; tests/fakes/ model those rules on a CPU.

    `close()` (idempotent; also `with state:`) synchronizes and destroys the stream and drops the
    cache `OrtValue`s and the IO binding, which frees their device memory; `TokenLoop` calls it when
    the generation ends."""

    def __init__(self, backend: OrtBackend, cache_shape: tuple):
        self.cudart = cudart()  # CudaUnavailable without cuda-python
        ort = _ort()
        self.session = backend.session(backend.ar_graph)
        self.bundle, self.graph = backend.bundle, backend.ar_graph  # outputs checked against its contract
        self.shape, self.stride = cache_shape, layer_stride(cache_shape, 4)
        self.names = cache_input_names(cache_shape[0])
        self.k_cache = self.v_cache = self.binding = self.stream = None
        self.closed = False
        zeros = np.zeros(cache_shape[0] * self.stride // 4, dtype=np.float32)  # stale slots are masked, but not NaN
        self.k_cache = ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0)
        self.v_cache = ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0)
        self.binding = self.session.io_binding()
        rt = self.cudart
        self.stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        rt, stream = self.cudart, self.stream
        if self.binding is not None:
            self.binding.clear_binding_inputs()
            self.binding.clear_binding_outputs()
        self.binding = self.stream = None
        steps = [] if stream is None else [lambda: check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize"),
                                           lambda: check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")]
        try:
            release_all(steps)
        finally:
            self.k_cache = self.v_cache = None

    def __enter__(self) -> "OrtDeviceState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, feeds: typing.Dict[str, np.ndarray]) -> np.ndarray:
        if self.closed:
            raise InputError("this generation's device state is closed (the generation ended or was closed)")
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        L, R, H, S, d = self.shape
        for cache, names in zip((self.k_cache, self.v_cache), self.names):
            for i, name in enumerate(names):
                io.bind_input(name, "cuda", 0, np.float32, [R, H, S, d], cache.data_ptr() + i * self.stride)
        io.bind_output("next_tokens", "cpu")
        for name in ("k_new", "v_new", "logits"):
            io.bind_output(name, "cuda", 0)
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # ONNX Runtime's own types
            raise run_failed(self.bundle, self.graph, exc) from None
        next_tokens, k_new, v_new = io.get_outputs()[:3]
        sizes = step_sizes(feeds)
        for name, value in (("k_new", k_new), ("v_new", v_new)):  # before the device copy reads them
            self.bundle.check_output(self.graph, name, value.shape(), None, sizes)
        next_tokens = next_tokens.numpy()
        self.bundle.check_tokens(self.graph, next_tokens, sizes["batch"])
        n, position = int(feeds["input_ids"].shape[1]), int(feeds["start_pos"][0])
        for cache, new in ((self.k_cache, k_new), (self.v_cache, v_new)):
            copy_new_kv(self.cudart, cache.data_ptr(), new.data_ptr(), self.shape, position, n, 4, self.stream,
                        stride=self.stride)
        check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize (the new K/V in the cache)")
        return next_tokens
