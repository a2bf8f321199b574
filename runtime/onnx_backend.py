"""ONNX Runtime execution of a bundle's graphs (CPU here; CUDA/TensorRT providers where
onnxruntime-gpu is installed)."""

from __future__ import annotations

import os
import threading
import typing

import numpy as np

from .bundle import Bundle, BundleError, check_signature

ORT_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(uint8)": "uint8",
             "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(bool)": "bool"}
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a base dependency
        raise BundleError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def available_providers() -> typing.List[str]:
    return list(_ort().get_available_providers())


def resolve_providers(providers: typing.Union[str, typing.Sequence[str], None]) -> typing.List[str]:
    """`auto`/None: the best available of TensorRT, CUDA, CPU; `cpu`/`cuda`/`tensorrt` or a list."""
    available = available_providers()
    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    if providers in (None, "auto"):
        chosen = [p for p in PROVIDER_ORDER if p in available and p != "TensorrtExecutionProvider"]
        return chosen or ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    chosen = [aliases.get(p, p) for p in providers]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise BundleError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return chosen


class OrtBackend:
    """Lazily created, signature-checked sessions, one per graph. Sessions are thread safe
    (ONNX Runtime allows concurrent `run` calls), and creation is guarded by a lock."""

    def __init__(self, bundle: Bundle, providers=None, intra_op_threads: typing.Optional[int] = None,
                 ar_graph: str = "ar_step"):
        self.bundle = bundle
        self.ar_graph = ar_graph  # "ar_step" or a weight-only quantized variant ("ar_step_int4", ...)
        self.providers = resolve_providers(providers)
        # ONNX Runtime's default counts physical cores; all logical CPUs measured faster here
        self.intra_op_threads = (os.cpu_count() or 1) if intra_op_threads is None else intra_op_threads
        self._sessions: typing.Dict[str, typing.Any] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"onnxruntime[{self.providers[0]}]"

    def session(self, graph: str):
        with self._lock:
            if graph not in self._sessions:
                ort = _ort()
                options = ort.SessionOptions()
                if self.intra_op_threads:
                    options.intra_op_num_threads = self.intra_op_threads
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                path = self.bundle.graph_file(graph)
                try:
                    sess = ort.InferenceSession(str(path), options, providers=self.providers)
                except Exception as exc:  # ORT raises its own exception types
                    raise BundleError(f"ONNX Runtime cannot load {path}: {exc}") from None
                check_signature(graph, self.bundle.graphs[graph],
                                [(i.name, ORT_TYPES.get(i.type, i.type), i.shape) for i in sess.get_inputs()],
                                [(o.name, ORT_TYPES.get(o.type, o.type), o.shape) for o in sess.get_outputs()])
                self._sessions[graph] = sess
            return self._sessions[graph]

    def run(self, graph: str, feeds: typing.Dict[str, np.ndarray], outputs: typing.Optional[typing.List[str]] = None):
        return self.session(graph).run(outputs, feeds)

    def ar_step(self, **feeds):
        next_tokens, k_new, v_new = self.run(self.ar_graph, feeds, ["next_tokens", "k_new", "v_new"])
        return next_tokens, k_new, v_new
