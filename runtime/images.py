"""Image input and output for the runtime (Pillow + numpy only)."""

from __future__ import annotations

import math
import os
import stat
import typing
import warnings
from pathlib import Path

import numpy as np

from .errors import PrologueError
from .files import OutputError, _reason, atomic_output, shown

MAX_PIXELS = 4096 * 4096  # largest declared input image we decode at all (checked before decoding)
MAX_INPUT_PIXELS = MAX_PIXELS
MAX_INPUT_BYTES = 256 * 1024**2  # largest input image file we open

# How input images become uint8 (documented in docs/runtime.md):
# - 8-bit L / RGB, palette (P), 1-bit, LA / RGBA / PA (alpha dropped), CMYK, YCbCr: Pillow's `convert`;
# - 16-bit (PNG / TIFF modes I;16*, and I with values in 0..65535): the high byte (x >> 8), the same
#   as Pillow's own decoding of 16-bit RGB PNGs;
# - float (TIFF mode F) with every value in [0, 1]: round(x * 255); other floats (NaN, 0..255 data) are
#   refused with a message, never clipped.


class ImageError(PrologueError, ValueError):
    """An input image that cannot be used; the message says what was expected."""


def _open_regular(path: Path):
    """A binary file object of the regular file `path` (a FIFO or device never blocks or streams us)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror or exc})"
        raise ImageError(f"image {shown(path)} {reason}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INPUT_BYTES:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"image {shown(path)} is not a regular file")
        raise ImageError(f"image {shown(path)} is larger than {MAX_INPUT_BYTES // 1024**2} MiB; refusing to read it")
    return os.fdopen(fd, "rb")


def _to_uint8(im, path: Path) -> np.ndarray:
    """A decoded Pillow image -> uint8 `[H, W]` or `[H, W, C]`, converting 16-bit and float data
    (never clipping them)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im)
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise ImageError(f"{shown(path)} has 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit image")
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ImageError(f"{shown(path)} has floating-point pixels outside [0, 1] (or NaN); only float images "
                             "scaled to [0, 1] are accepted: save it as an 8-bit image")
        return np.rint(values * 255.0).astype(np.uint8)
    return np.asarray(im)


def _decode(fh, path, size: int, channels: int, formats=None) -> np.ndarray:
    from PIL import Image

    with Image.open(fh, formats=formats) as im:  # lazy: only the header is read here
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"{shown(path)} is {width}x{height}: too large to decode safely "
                             f"(limit {MAX_PIXELS} pixels)")
        if (width, height) != (size, size):
            raise ImageError(f"{shown(path)} is {width}x{height}, this bundle takes {size}x{size} images "
                             "(resize or crop it first)")
        im.load()
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return np.asarray(Image.fromarray(_to_uint8(im, path)).convert("L" if channels == 1 else "RGB"))
        return np.asarray(im.convert("L" if channels == 1 else "RGB"))


def load_image(path, size: int, channels: int) -> np.ndarray:
    """A file -> uint8 `[H, W, C]` of the bundle's geometry (exact size required, no resizing).

    The declared size is checked (against `MAX_PIXELS` and the bundle's size) before anything is
    decoded; 16-bit and float images are converted as described above, never clipped."""
    path = Path(path)
    with _open_regular(path) as fh:
        return decode_image(fh, path, size, channels)


def decode_image(fh, what, size: int, channels: int, formats=None) -> np.ndarray:
    """`load_image` of an open binary file (`what` names it in errors); `formats`: the Pillow
    formats accepted (None: any Pillow reads; `prologue serve` takes PNG only)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            array = _decode(fh, what, size, channels, formats)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{shown(what)} looks like a decompression bomb (too many pixels); refusing to decode it") from None
    except MemoryError:
        raise ImageError(f"{shown(what)}: not enough memory to decode it") from None
    except Exception as exc:  # Pillow raises several types for unreadable, truncated or corrupt files
        only = f"; only {'/'.join(formats)} is accepted" if formats else ""
        raise ImageError(f"{shown(what)} is not a readable image ({type(exc).__name__}: {_reason(exc)}){only}") from None
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape != (size, size, channels):
        raise ImageError(f"{shown(what)} decoded to {list(array.shape)}, expected [{size}, {size}, {channels}]")
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
    """uint8 `[N, H, W, C]` -> one `[rows*(H+1)+1, nrow*(W+1)+1, C]` grid with white gaps; `nrow`
    (columns) is at most N, so the canvas never outgrows the images (`--nrow 100000`)."""
    n, h, w, c = images.shape
    nrow = max(1, min(int(nrow), n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    return canvas


def save_png(array: np.ndarray, path) -> Path:
    """Write `[H, W, C]` uint8 as PNG atomically (`files.atomic_output`: an exclusively created
    temporary file, fsynced and renamed): never half a file, never through a link or onto a device,
    FIFO, socket or folder; a failure is a one-line `OutputError` and leaves the old file as it was."""
    from PIL import Image

    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"--out {shown(path)} is a folder; give a .png file name")
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_output(path, "image", "wb") as fh:
        image.save(fh, format="PNG")
    return path


def as_hwc(images_nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


def as_nchw(images_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))


def grid_columns(n: int, requested: typing.Optional[int] = None) -> int:
    """Columns of a grid of `n` images: `requested` (at most n), else about sqrt(n)."""
    if requested:
        return max(1, min(int(requested), n))
    return min(n, max(1, int(math.ceil(math.sqrt(n)))))
