"""CUDA through cuda-python for the GPU backends: the import, checked calls, device buffers.

Both device backends (native TensorRT, ONNX Runtime's CUDA/TensorRT providers with IO binding)
use this module; neither reaches into the other. A machine without cuda-python raises
`CudaUnavailable`, which callers may catch to fall back to host memory.
"""

from __future__ import annotations

import numpy as np

from .bundle import BundleError


class CudaUnavailable(BundleError):
    """cuda-python (or a CUDA device) is not available on this machine."""


class CudaError(BundleError):
    """A CUDA runtime call returned an error."""


def cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise CudaUnavailable("the GPU backends need cuda-python: pip install cuda-python") from None
    return runtime


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


def copy_new_kv(rt, cache_ptr: int, new_ptr: int, shape, position: int, n: int, itemsize: int, stream=None) -> None:
    """Write a step's new K/V slice `[L, R, H, n, d]` into the device cache `[L, R, H, S, d]` at
    `position`: L*R*H rows of n*d elements, one strided device-to-device copy."""
    L, R, H, S, d = shape
    row = d * itemsize
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    if stream is None:
        check(rt.cudaMemcpy2D(cache_ptr + position * row, S * row, new_ptr, n * row, n * row, L * R * H, kind),
              "cudaMemcpy2D (new K/V into the cache)")
    else:
        check(rt.cudaMemcpy2DAsync(cache_ptr + position * row, S * row, new_ptr, n * row, n * row, L * R * H, kind,
                                   stream), "cudaMemcpy2DAsync (new K/V into the cache)")
