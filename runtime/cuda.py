"""CUDA through cuda-python for the GPU backends: the import, checked calls, device buffers.

Both device backends (native TensorRT, ONNX Runtime's CUDA/TensorRT providers with IO binding)
use this module; neither reaches into the other. A machine without cuda-python raises
`CudaUnavailable`, which callers may catch to fall back to host memory.
"""

from __future__ import annotations

import typing

import numpy as np

from .bundle import BundleError


class CudaUnavailable(BundleError):
    """cuda-python (or a CUDA device) is not available on this machine."""


class CudaError(BundleError):
    """A CUDA runtime call returned an error."""


def cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6),
    once checked against the driver (`check_driver`)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise CudaUnavailable("the GPU backends need cuda-python matched to the driver's CUDA: pip install "
                                  "'cuda-python>=12.6.1,<13' (CUDA 12) or 'cuda-python>=13,<14' (CUDA 13); the "
                                  "gpu-cu* and tensorrt-cu* extras include it") from None
    if id(runtime) not in _DRIVER_CHECKED:
        check_driver(runtime)
        _DRIVER_CHECKED.add(id(runtime))
    return runtime


GPU_EXTRA_HINT = ("the extras for a CUDA 12 driver are gpu-cu12 / tensorrt-cu12 (cuda-python 12), for CUDA 13 "
                  "gpu-cu13 / tensorrt-cu13")
_DRIVER_CHECKED: set = set()


def check_driver(rt) -> None:
    """Refuse a cuda-python built for a newer CUDA major than the driver supports: its first
    `cudaSetDevice` / `cudaMalloc` fails with cudaErrorInsufficientDriver (cuda-python 13.x is built
    against the CUDA 13 runtime, which a CUDA 12 driver (< 580) cannot run; cuda-bindings 13.2.0
    release notes: it only warns). `cudaDriverGetVersion` / `cudaRuntimeGetVersion` give
    1000 * major + 10 * minor (CUDA Runtime API, Version Management)."""
    if not (hasattr(rt, "cudaDriverGetVersion") and hasattr(rt, "cudaRuntimeGetVersion")):
        return
    err, driver = rt.cudaDriverGetVersion()
    if int(err) != 0 or not driver:
        raise CudaUnavailable(f"no usable CUDA driver on this machine (cudaDriverGetVersion: {err}, {driver}); the GPU "
                              "backends need an NVIDIA GPU and its driver")
    err, runtime_version = rt.cudaRuntimeGetVersion()
    if int(err) == 0 and int(driver) // 1000 < int(runtime_version) // 1000:
        raise CudaUnavailable(f"cuda-python here is built for CUDA {_version(runtime_version)}, but the driver supports "
                              f"CUDA {_version(driver)}: install the cuda-python that matches the driver; "
                              f"{GPU_EXTRA_HINT}")


def _version(number) -> str:
    number = int(number)
    return f"{number // 1000}.{number % 1000 // 10}"


def check(result, call: str = "CUDA call"):
    """cuda-python calls return `(error, *values)`; raise on an error (naming `call`), return the
    values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise CudaError(f"{call} failed: {err}")
    return values[0] if len(values) == 1 else (values or None)


def release_all(steps) -> None:
    """Run every release step (callables), even after one fails; then raise the first error.

    Teardown must not stop at the first failed free and leak the rest."""
    first = None
    for step in steps:
        try:
            step()
        except Exception as exc:  # re-raised below, after the other steps ran
            first = first or exc
    if first is not None:
        raise first


def device_info(device: int = 0, rt=None) -> dict:
    rt = rt or cudart()
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


class DeviceBuffer:
    """One device allocation; `free()` (idempotent, checked) releases it. `rt`: the cuda-python
    runtime module to use (default: `cudart()`)."""

    def __init__(self, nbytes: int, rt=None):
        self.cudart = rt or cudart()
        self.nbytes = max(1, int(nbytes))
        self.ptr = 0
        self.ptr = int(check(self.cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))

    def upload(self, array: np.ndarray, stream) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise BundleError(f"device buffer of {self.nbytes} bytes is too small for {array.nbytes}")
        check(self.cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync (host to device)")

    def download(self, array: np.ndarray, stream) -> np.ndarray:
        if array.nbytes > self.nbytes:
            raise BundleError(f"device buffer of {self.nbytes} bytes is smaller than the {array.nbytes} asked for")
        check(self.cudart.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync (device to host)")
        return array

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0  # never freed twice, even when cudaFree fails
            check(self.cudart.cudaFree(ptr), "cudaFree")

    def __del__(self):  # pragma: no cover - GPU only
        try:
            self.free()
        except Exception:
            pass


# TensorRT requires every tensor address to be 256-byte aligned (NvInferRuntime.h, TensorRT 10.7,
# IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment"); cudaMalloc
# returns at least that. The per-layer KV-cache inputs point inside one allocation, so each layer starts
# at a multiple of TENSOR_ALIGNMENT (a layer of R*H*S*d float32 is such a multiple only when the model
# width, or R*S, makes it so).
TENSOR_ALIGNMENT = 256


def layer_stride(shape, itemsize: int) -> int:
    """Bytes from one layer's cache `[R, H, S, d]` to the next inside `[L, ...]`: its size, rounded up
    to TENSOR_ALIGNMENT."""
    _, R, H, S, d = shape
    size = R * H * S * d * itemsize
    return -(-size // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


def copy_new_kv(rt, cache_ptr: int, new_ptr: int, shape, position: int, n: int, itemsize: int, stream,
                stride: typing.Optional[int] = None) -> None:
    """Enqueue on `stream` the write of a step's new K/V slice `[L, R, H, n, d]` into the device
    cache `[L, R, H, S, d]` at `position` (layer i at `cache_ptr + i * stride`, default the dense
    layout): per layer, R*H rows of n*d elements, one strided device-to-device copy
    (`cudaMemcpy2DAsync`; one copy for all layers when the layers are dense). The caller orders the
    stream against whoever reads the cache or reuses `new_ptr` (`cudaStreamSynchronize`): a
    device-to-device copy does not synchronize with the host (CUDA Runtime API, "API
    synchronization behavior")."""
    L, R, H, S, d = shape
    row = d * itemsize
    dense = R * H * S * row
    stride = dense if stride is None else stride
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    layers = [(cache_ptr, new_ptr, L * R * H)] if stride == dense else \
        [(cache_ptr + i * stride, new_ptr + i * R * H * n * row, R * H) for i in range(L)]
    for dst, src, rows in layers:
        check(rt.cudaMemcpy2DAsync(dst + position * row, S * row, src, n * row, n * row, rows, kind, stream),
              "cudaMemcpy2DAsync (new K/V into the cache)")


def native_handle(obj) -> int:
    """The address behind a cuda-python object (a stream) as an int, for APIs that take one
    (TensorRT's `execute_async_v3`). cuda-bindings 12.9.1 / 13.0.0 deprecate `int(obj)` for this in
    favour of `cuda.bindings.utils.get_cuda_native_handle` (release notes)."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9.1
        return int(obj)
    return int(get_cuda_native_handle(obj))
