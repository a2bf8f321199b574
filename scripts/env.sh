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
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
export PATH="$VENV/bin:$PATH"
