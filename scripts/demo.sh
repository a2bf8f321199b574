#!/usr/bin/env bash
# The main job: set up .venv, get Fashion-MNIST, then `prologue demo` (train phases 1-3 at demo
# scale, export + verify the ONNX bundle, and write three pictures with the torch-free runtime).
# Arguments go to `prologue demo` (e.g. --out DIR, --data PATH_TO_CLASS_FOLDERS, --scale 0.5).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
need_fashion_mnist demo "$@"
exec prologue demo "$@"
