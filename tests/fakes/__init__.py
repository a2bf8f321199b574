"""Fakes of the GPU APIs our code calls, for tests on a CPU: `cuda` (cuda-python's runtime,
`FakeCudart`) and `tensorrt` (one fake `tensorrt` module, runtime and builder API:
`fake_tensorrt`). They check how our code calls the APIs, not how a GPU behaves."""
