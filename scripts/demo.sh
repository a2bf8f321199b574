#!/usr/bin/env bash
# The main job. Today: sets up the environment and lists the model presets. The full demo
# (train a small Prologue on Fashion-MNIST, export it, generate with the torch-free runtime)
# replaces this when the training, export and runtime work lands (issues 3-6).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo
echo "prologue-export $(python -c 'import prologue_export as p; print(p.__version__)') is installed in $VENV."
echo "Model presets (parameter counts computed from the model definition):"
prologue presets
echo
echo "Not yet here: training on Fashion-MNIST, export and torch-free generation."
echo "Available now: 'prologue import-official' to convert the authors' released checkpoints (see README)."
