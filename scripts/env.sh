# Sourced by the other scripts: make (once) and enter the project's virtual environment.
# VENV overrides the location (default .venv in the repository root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# CPU torch first (a bare `pip install torch` would pull a multi-GB CUDA build). A GPU host
# that already put torch >= 2.11 into this environment keeps its own.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
fi
# The dev extra brings onnxruntime (CPU); onnxruntime-gpu in the same environment would overwrite its
# files (and it would lose the CUDA provider): one ONNX Runtime per environment.
if "$VENV/bin/python" -m pip show onnxruntime-gpu >/dev/null 2>&1; then
  echo "[setup] $VENV holds onnxruntime-gpu; the dev extra installs onnxruntime (CPU) and the two overwrite each" >&2
  echo "        other's files: use another environment (VENV=...) or 'pip uninstall -y onnxruntime-gpu' first" >&2
  exit 2
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
export PATH="$VENV/bin:$PATH"

# Fashion-MNIST from Debian's dataset-fashion-mnist unless the arguments hold --data.
# Usage: need_fashion_mnist LABEL "$@"
need_fashion_mnist() {
  local label="$1"; shift
  local arg
  for arg in "$@"; do [ "$arg" = "--data" ] && return 0; done
  [ -d /usr/share/datasets/fashion-mnist ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[$label] installing Debian's dataset-fashion-mnist"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
  else
    echo "[$label] Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or pass" >&2
    echo "       --data PATH (a folder with the Fashion-MNIST IDX files, or one subfolder of images per class)" >&2
    exit 2
  fi
}
