#!/usr/bin/env bash
# The test suite, in two environments:
#  1. .venv: CPU torch + this package with the dev extra; the whole suite;
#  2. .venv-runtime: `pip install .[cpu,serve]` only (numpy, pillow, onnxruntime, starlette, uvicorn;
#     no torch): the runtime and server tests again, against a bundle that environment 1 prepares.
# Extra arguments go to the first pytest run only (e.g. `bash scripts/test.sh -k fixture`), and
# then the second environment is skipped.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# the real Triton Inference Server of tests/test_triton_server.py (.triton/; .ci/run gets it first, and
# in CI those tests fail without it; elsewhere they skip, saying why)
bash "$ROOT/scripts/get_triton.sh" || echo "[test] no Triton server (scripts/get_triton.sh failed): its tests will skip" >&2
python -m pytest -q "$@"
if [ "$#" -gt 0 ]; then
  exit 0
fi

echo "[test] runtime-only environment (no torch)"
FIXTURE="$ROOT/build/runtime-fixture"
rm -rf "$FIXTURE"
python -m tests.runtime_fixture "$FIXTURE" > /dev/null
RT_VENV="${RT_VENV:-$ROOT/.venv-runtime}"
if [ ! -x "$RT_VENV/bin/python" ]; then
  python3 -m venv "$RT_VENV"
fi
"$RT_VENV/bin/pip" install -q --disable-pip-version-check --upgrade "$ROOT[cpu,serve]" pytest httpx
if "$RT_VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[test] error: torch is importable in the runtime-only environment $RT_VENV" >&2
  exit 1
fi
cd "$ROOT/build"
# the runtime's tests (the noise stream, the Generator, the rest of the runtime), its hostile-input
# matrix, the GPU backends against fakes and the HTTP server and its hostile clients (`pip install .[cpu,serve]`),
# without torch
PROLOGUE_TEST_BUNDLE_DIR="$FIXTURE" "$RT_VENV/bin/python" -m pytest -q -p no:cacheprovider \
  --import-mode=importlib --rootdir "$ROOT" "$ROOT/tests/test_noise.py" "$ROOT/tests/test_generator.py" \
  "$ROOT/tests/test_runtime.py" "$ROOT/tests/test_gpu_backends.py" \
  "$ROOT/tests/test_hostile_runtime.py" "$ROOT/tests/test_hostile_bundle.py" "$ROOT/tests/test_hostile_outputs.py" \
  "$ROOT/tests/test_serve.py" "$ROOT/tests/test_hostile_serve.py" "$ROOT/tests/test_triton.py"
