#!/usr/bin/env bash
# The main job: set up .venv, get Fashion-MNIST, then `prologue demo` (train phases 1-3 at demo
# scale, export + verify the ONNX bundle, and write three pictures with the torch-free runtime).
# Arguments go to `prologue demo` (e.g. --out DIR, --data PATH_TO_CLASS_FOLDERS, --scale 0.5).
# At the end it says how to reach the installed `prologue` command, and exits with the demo's code.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
need_fashion_mnist demo "$@"

# the demo's output folder, for the hint (prologue demo's default is runs/demo)
out=runs/demo
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-$out}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done

status=0
prologue demo "$@" || status=$?

venv="${VENV#"$ROOT"/}"  # env.sh: the environment (default .venv), relative to the repository root
{
  echo
  if [ "$status" -ne 0 ]; then
    echo "prologue demo ended with exit code $status (see above); rerunning scripts/demo.sh continues from the last finished stage."
  fi
  echo "The prologue command is installed in $venv/, which is not active in your shell. From $ROOT either"
  echo "  source $venv/bin/activate     # then: prologue --help"
  echo "or call it by its path, e.g."
  if [ "$status" -eq 0 ]; then
    echo "  $venv/bin/prologue generate --bundle $out/bundle --class 3 --n 8 --out grid.png"
    echo "  $venv/bin/prologue export --verify $out/bundle --checkpoint $out/ar/checkpoint"
  else
    echo "  $venv/bin/prologue demo --help"
  fi
} >&2
exit "$status"
