"""`--data` for the training commands: Fashion-MNIST (default), `synthetic[:N]`, or a path
(a folder of IDX files, or ImageNet-style class folders)."""

from __future__ import annotations

import typing
from pathlib import Path

from ..data import DataError, FolderDataset, SyntheticDataset, fashion_mnist


def open_dataset(spec: typing.Optional[str], image_size: int = 32, channels: int = 1, num_classes: int = 10):
    """`None`/`fashion-mnist` -> Debian's Fashion-MNIST; `synthetic[:N]` -> N generated images
    (the given geometry); a folder with IDX files -> Fashion-MNIST from there; any other
    folder -> one subfolder of images per class."""
    if spec in (None, "", "fashion-mnist"):
        return fashion_mnist()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 2048
        return SyntheticDataset(n, image_size, channels, num_classes)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder (give a folder of class subfolders, "
                        "a folder with the Fashion-MNIST IDX files, 'fashion-mnist' or 'synthetic')")
    if any(path.glob("*-ubyte*")) or (path / "FashionMNIST").is_dir():
        return fashion_mnist(path)
    return FolderDataset(path)


def fill_skipped(images, labels, expected: int):
    """Keep batch shapes static when unreadable images were dropped: repeat readable ones."""
    n = images.shape[0]
    if n == expected:
        return images, labels
    if n == 0:
        raise DataError("a whole batch of images was unreadable: check the data set")
    import torch

    idx = torch.arange(expected) % n
    return images[idx], labels[idx]
