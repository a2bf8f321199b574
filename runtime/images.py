"""Image input and output for the runtime (Pillow + numpy only)."""

from __future__ import annotations

import math
import os
import typing
import warnings
from pathlib import Path

import numpy as np

from .errors import PrologueError

MAX_PIXELS = 64 * 1024 * 1024  # refuse larger decodes (decompression bombs)


class ImageError(PrologueError, ValueError):
    """An input image that cannot be used; the message says what was expected."""


def load_image(path, size: int, channels: int) -> np.ndarray:
    """A file -> uint8 `[H, W, C]` of the bundle's geometry (exact size required, no resizing)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{path} is {im.width}x{im.height}: too large to decode safely")
                im.load()
                image = im.convert("L" if channels == 1 else "RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path} looks like a decompression bomb (too many pixels); refusing to decode it") from None
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise ImageError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[:2] != (size, size):
        raise ImageError(f"{path} is {array.shape[1]}x{array.shape[0]}, this bundle takes {size}x{size} images "
                         "(resize or crop it first)")
    return array


def check_images(images, size: int, channels: int) -> np.ndarray:
    """uint8 `[B, H, W, C]` (or one `[H, W, C]`) with the bundle's geometry -> `[B, H, W, C]`."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8:
        raise ImageError(f"images must be uint8 pixels [B, H, W, C], got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[1:] != (size, size, channels):
        raise ImageError(f"images must be uint8 [B, {size}, {size}, {channels}] for this bundle, got {list(array.shape)}")
    if array.shape[0] < 1:
        raise ImageError("no images given")
    return array


def grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> one `[rows*(H+1)+1, nrow*(W+1)+1, C]` grid with white gaps."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    return canvas


def save_png(array: np.ndarray, path) -> Path:
    """Write `[H, W, C]` uint8 as PNG atomically (temporary file + rename): never half a file."""
    from PIL import Image

    path = Path(path)
    if path.exists() and path.is_dir():
        raise ImageError(f"--out {path} is a folder; give a .png file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def as_hwc(images_nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


def as_nchw(images_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))


def grid_columns(n: int, requested: typing.Optional[int] = None) -> int:
    return requested or min(n, max(1, int(math.ceil(math.sqrt(n)))))
