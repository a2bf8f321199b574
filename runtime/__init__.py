"""Torch-free generation from an exported bundle. Lands with the runtime issue.

This subpackage must never import torch (nor anything from the rest of prologue_export).
"""
