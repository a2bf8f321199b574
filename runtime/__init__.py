"""Torch-free generation from an exported bundle (numpy, onnxruntime, pillow).

    from prologue_export.runtime import Generator
    gen = Generator.from_bundle("bundle/")
    images = gen.generate([1, 2, 3], seed=0)      # uint8 [B, H, W, C]

This subpackage never imports torch, nor anything from the rest of prologue_export.
"""

from __future__ import annotations

_LAZY = {
    "Generator": "generator", "Generation": "generator",
    "Bundle": "bundle", "BundleError": "bundle",
    "InputError": "loop", "TokenLoop": "loop", "Noise": "loop",
    "ImageError": "images", "OutputError": "files", "FileFormatError": "files",
    "SamplingConfig": "settings", "ConfigError": "settings", "PrologueError": "errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prologue_export.runtime' has no attribute {name!r}")
