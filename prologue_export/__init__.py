"""prologue-export: the Prologue AR image generator (arXiv 2605.06137), trainable and exportable.

The model lives here, defined once for training, export and checkpoint import. The torch-free
runtime is `prologue_export.runtime`; importing this top-level package does not import torch
until a model attribute is used, so the runtime stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "config", "TokenizerConfig": "config", "ARConfig": "config",
    "SamplingConfig": "config", "TransformerSize": "config", "VocabLayout": "config",
    "ConfigError": "config", "model_preset": "config", "tokenizer_preset": "config",
    "ar_preset": "config",
    "PrologueModel": "model", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "Tokenizer": "tokenizer", "ARModel": "ar",
    "sample": "sampling", "split_tokens": "runtime.loop",
    "import_official": "official", "PrologueError": "runtime.errors",
}  # name -> the module that defines it

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prologue_export' has no attribute {name!r}")
