"""A fake `onnxruntime` with a GPU (`fake_onnxruntime`): the device API `runtime/onnx_backend.py`
uses (providers, `OrtValue`s on "cuda", IO binding), on the device memory of a `FakeCudart`, as
strict as ONNX Runtime about what our code relies on. Graphs really run, on the real ONNX Runtime's
CPU provider, so a generation gives real tokens. Sources (microsoft/onnxruntime):

- `get_available_providers()` lists what the package was built with; a provider that cannot load
  (CUDA / cuDNN libraries missing) is left out of the session, whose `get_providers()` says what it
  loaded (python/onnxruntime_inference_collection.py: `_create_inference_session` /
  `_bind_session`; the Python API falls back to the CPU on an EP error): settable `unloadable`.
- The CUDA provider runs a session's work on a stream of its own created non-blocking
  (onnxruntime/core/providers/cuda/cuda_stream_handle.cc): a run reads device inputs as they are,
  without waiting for work queued on the legacy stream or on any other stream of ours.
- `run_with_iobinding` synchronizes its stream before it returns (run option
  `disable_synchronize_execution_providers`, default off:
  include/onnxruntime/core/session/onnxruntime_run_options_config_keys.h), so its outputs are complete.
- Outputs bound to "cuda" come from ONNX Runtime's arena: when the last reference to an output
  goes (the `OrtValue`s returned, the binding until `clear_binding_outputs`), its memory goes back
  to the arena, without a cudaFree, and the next run may reuse it at once.
- `OrtValue.ortvalue_from_numpy(array, "cuda", 0)` copies synchronously into its own allocation.
- `preload_dlls()` (ONNX Runtime >= 1.21) is recorded in `preload_calls`; provider options passed as
  `(name, dict)` are recorded in each session's `provider_options`.
"""

from __future__ import annotations

import types

import numpy as np

ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def fake_onnxruntime(cudart, available=("CUDAExecutionProvider", "CPUExecutionProvider"), unloadable=()):
    """A module object standing in for `onnxruntime` (onnxruntime-gpu) on the fake device `cudart`."""
    import onnxruntime as real

    ort = types.ModuleType("onnxruntime")
    ort.__version__ = real.__version__
    ort.SessionOptions, ort.GraphOptimizationLevel = real.SessionOptions, real.GraphOptimizationLevel
    ort.available, ort.unloadable = list(available), set(unloadable)
    ort.sessions, ort.preload_calls = [], []
    ort.get_available_providers = lambda: list(ort.available)
    ort.preload_dlls = lambda **kwargs: ort.preload_calls.append(kwargs)
    arena = Arena(cudart)
    ort.arena = arena

    class OrtValue:
        """A tensor in host memory (`array`) or device memory (`ptr`, owned by `owner`)."""

        def __init__(self, shape, dtype, device, array=None, ptr=0, owner=None):
            self._shape, self.dtype, self.device = tuple(shape), np.dtype(dtype), device
            self.array, self.ptr, self.owner = array, ptr, owner

        @classmethod
        def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
            array = np.ascontiguousarray(array)
            if device_type == "cpu":
                return cls(array.shape, array.dtype, "cpu", array=array)
            ptr = _check(cudart.cudaMalloc(max(1, array.nbytes)))
            cudart.write(ptr, array.tobytes())  # a synchronous copy into its own allocation
            return cls(array.shape, array.dtype, "cuda", ptr=ptr, owner=_Allocation(cudart, ptr))

        def data_ptr(self) -> int:
            return self.ptr if self.device == "cuda" else self.array.ctypes.data

        def shape(self):
            return list(self._shape)

        def device_name(self) -> str:
            return self.device

        def numpy(self) -> np.ndarray:
            if self.device != "cpu":
                raise RuntimeError("numpy() of a CUDA OrtValue: bind the output to 'cpu' or copy it")
            return self.array

    class IOBinding:
        def __init__(self, session):
            self.session, self.inputs, self.outputs, self.results = session, {}, [], []

        def bind_cpu_input(self, name, array):
            self.inputs[name] = np.ascontiguousarray(array)

        def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
            assert device_type == "cuda", device_type
            self.inputs[name] = (np.dtype(element_type), tuple(int(d) for d in shape), int(buffer_ptr))

        def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
            self.outputs.append((name, device_type))

        def clear_binding_inputs(self):
            self.inputs = {}

        def clear_binding_outputs(self):
            self.outputs, self.results = [], []  # the binding's references to its outputs go

        def get_outputs(self):
            return list(self.results)

    class InferenceSession:
        def __init__(self, model, options=None, providers=None):
            names = [p[0] if isinstance(p, tuple) else p for p in providers or ["CPUExecutionProvider"]]
            unknown = [n for n in names if n not in ort.available]
            if unknown:
                raise ValueError(f"{unknown} not in available providers {ort.available}")
            self.requested = names
            self.provider_options = {p[0]: dict(p[1]) for p in providers or [] if isinstance(p, tuple)}
            self.loaded = [n for n in names if n not in ort.unloadable]
            self.real = real.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self.runs = 0
            ort.sessions.append(self)

        def get_providers(self):
            return list(self.loaded)

        def get_inputs(self):
            return self.real.get_inputs()

        def get_outputs(self):
            return self.real.get_outputs()

        def run(self, output_names, feeds, run_options=None):
            return self.real.run(output_names, feeds)

        def io_binding(self):
            return IOBinding(self)

        def run_with_iobinding(self, io, run_options=None):
            """Reads device inputs as they are now (ONNX Runtime's stream is non-blocking: nothing queued
            elsewhere is waited for), runs, writes device outputs into arena memory, and returns with
            its stream synchronized."""
            feeds = {}
            for name, value in io.inputs.items():
                if isinstance(value, np.ndarray):
                    feeds[name] = value
                else:
                    dtype, shape, ptr = value
                    feeds[name] = np.frombuffer(cudart.read(ptr, int(np.prod(shape)) * dtype.itemsize),
                                                dtype).reshape(shape)
            names = [name for name, _ in io.outputs]
            results = self.real.run(names, feeds)
            io.results = []
            for (name, device), value in zip(io.outputs, results):
                value = np.ascontiguousarray(value)
                if device == "cpu":
                    io.results.append(OrtValue(value.shape, value.dtype, "cpu", array=value))
                else:
                    block = arena.take(value.nbytes)
                    cudart.write(block.ptr, value.tobytes())
                    io.results.append(OrtValue(value.shape, value.dtype, "cuda", ptr=block.ptr, owner=block))
            self.runs += 1

    ort.OrtValue, ort.InferenceSession, ort.IOBinding = OrtValue, InferenceSession, IOBinding
    return ort


def _check(result):
    err, value = result
    assert int(err) == 0, err
    return value


class _Allocation:
    """Device memory of an `OrtValue` made from numpy: freed (cudaFree) with its last reference."""

    def __init__(self, cudart, ptr):
        self.cudart, self.ptr = cudart, ptr

    def __del__(self):
        self.cudart.cudaFree(self.ptr)


class _Block:
    """Arena memory: back to the arena's free list with its last reference, never cudaFree'd there."""

    def __init__(self, arena, ptr, nbytes):
        self.arena, self.ptr, self.nbytes = arena, ptr, nbytes

    def __del__(self):
        self.arena.free.setdefault(self.nbytes, []).append(self.ptr)


class Arena:
    """ONNX Runtime's device arena: freed blocks are reused at once (last freed, first reused)."""

    def __init__(self, cudart):
        self.cudart, self.free, self.owned = cudart, {}, []

    def take(self, nbytes: int) -> _Block:
        nbytes = max(1, int(nbytes))
        reuse = self.free.get(nbytes)
        if reuse:
            return _Block(self, reuse.pop(), nbytes)
        ptr = _check(self.cudart.cudaMalloc(nbytes))
        self.owned.append(ptr)
        return _Block(self, ptr, nbytes)

    def release(self) -> None:
        """What ending the process does to the arena (tests call it before `assert_all_released`)."""
        for ptr in self.owned:
            self.cudart.cudaFree(ptr)
        self.owned, self.free = [], {}
