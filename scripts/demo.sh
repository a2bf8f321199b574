#!/usr/bin/env bash
# The main job: set up .venv, get Fashion-MNIST, then `prologue demo` (train phases 1-3 at demo
# scale, export + verify the ONNX bundle, and write three pictures with the torch-free runtime).
# Arguments go to `prologue demo` (e.g. --out DIR, --data PATH_TO_CLASS_FOLDERS, --scale 0.5).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
data_given=0
for arg in "$@"; do [ "$arg" = "--data" ] && data_given=1; done
if [ "$data_given" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[demo] installing Debian's dataset-fashion-mnist"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
  else
    echo "[demo] Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or pass" >&2
    echo "       --data PATH (a folder with the Fashion-MNIST IDX files, or one subfolder of images per class)" >&2
    exit 2
  fi
fi
exec prologue demo "$@"
