#!/usr/bin/env bash
# A real Triton Inference Server for the tests and bench/triton_bench.py, on this CPU machine, in
# .triton/ (git-ignored; TRITON_HOME overrides), idempotent:
#  - server/: the nvidia-pytriton 0.7.0 wheel unzipped (not installed: its numpy<2 pin stays out of our
#    environments): bin/tritonserver 2.51, the Python backend (python_backend r24.10), its libraries, and
#    the Python-backend stub for this Python copied into backends/python/ (the wheel ships one per
#    Python 3.8-3.13 under python_backend_stubs/);
#  - venv/: the Python the stub runs models in (tritonserver started with venv/bin first on PATH):
#    numpy<2 (the r24.10 stub passes arrays through the NumPy 1 API; with NumPy 2 outputs arrive
#    empty, see docs/triton.md), ONNX Runtime (CPU) and this checkout: `pip install -e .[cpu,triton]`.
# Usage: bash scripts/get_triton.sh   (exit 0 and .triton/READY when done)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${TRITON_HOME:-$ROOT/.triton}"
PY="${PYTHON:-python3}"
VERSION=0.7.0
if [ -f "$HOME_DIR/READY" ] && [ "$(cat "$HOME_DIR/READY")" = "$VERSION $("$PY" -c 'import sys; print(sys.version.split()[0])')" ]; then
  exit 0
fi
mkdir -p "$HOME_DIR"
rm -f "$HOME_DIR/READY"
WHEEL_DIR="$HOME_DIR/wheel"
if ! ls "$WHEEL_DIR"/nvidia_pytriton-$VERSION-*.whl >/dev/null 2>&1; then
  echo "[triton] downloading nvidia-pytriton==$VERSION (55 MB)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$WHEEL_DIR" \
    "nvidia-pytriton==$VERSION"
fi
echo "[triton] unzipping the wheel into $HOME_DIR/server"
rm -rf "$HOME_DIR/server" "$HOME_DIR/server.tmp"
"$PY" - "$WHEEL_DIR" "$HOME_DIR/server.tmp" <<'PYEOF'
import glob, os, shutil, stat, sys, zipfile
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "nvidia_pytriton-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2])
root = sys.argv[2]
stub = os.path.join(root, "pytriton", "tritonserver", "python_backend_stubs",
                    f"{sys.version_info.major}.{sys.version_info.minor}", "triton_python_backend_stub")
if not os.path.isfile(stub):
    sys.exit(f"[triton] the wheel has no Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}")
target = os.path.join(root, "pytriton", "tritonserver", "backends", "python", "triton_python_backend_stub")
shutil.copyfile(stub, target)
for path in (target, os.path.join(root, "pytriton", "tritonserver", "bin", "tritonserver")):
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF
mv "$HOME_DIR/server.tmp" "$HOME_DIR/server"
echo "[triton] the model's Python: $HOME_DIR/venv (numpy<2, onnxruntime, this checkout)"
if [ ! -x "$HOME_DIR/venv/bin/python" ]; then
  "$PY" -m venv "$HOME_DIR/venv"
fi
"$HOME_DIR/venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[cpu,triton]"
"$HOME_DIR/venv/bin/python" -c "import numpy, onnxruntime, prologue_export.serve.triton" 
echo "$VERSION $("$PY" -c 'import sys; print(sys.version.split()[0])')" > "$HOME_DIR/READY"
echo "[triton] ready: $HOME_DIR"
