#!/usr/bin/env bash
# The test suite: sets up .venv (CPU torch + this package with the dev extra) and runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k fixture`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
