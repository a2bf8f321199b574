"""Training data: datasets, deterministic augmentation, and a resumable step-indexed loader.

Datasets share one small interface: `len(ds)`, `ds[i] -> (image, label)` where `image` is a
uint8 array `[C, H, W]`, a PIL image, or None when the item could not be read; plus
`num_classes` and `class_names`.

- `fashion_mnist(root, split)`: the Fashion-MNIST IDX files, held in memory (`ArrayDataset`).
- `FolderDataset(root)`: ImageNet-style `root/<class>/<image>` folders, decoded lazily with PIL.
- `SyntheticDataset(...)`: deterministic class-dependent patterns for smoke tests and tiny runs.
- `open_dataset(spec)`: what the commands' `--data` names (`fashion-mnist`, `synthetic[:N]`, a path).

`make_loader` turns a dataset into an endless stream of per-step batches (phase 1 as the
release: ADM random-resize crop, x-flip by doubling the data set). Which samples a step
uses, whether each is the mirrored copy, and how each is cropped depend only on
`(seed, step, position in the global batch)`,
never on the number of processes or workers, so a run resumes exactly from any step and
`world_size` ranks together see exactly the batch one process would.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..runtime.errors import PrologueError
from ..tokenizer import uint8_to_images

__all__ = [
    "DataError", "ArrayDataset", "FolderDataset", "SyntheticDataset",
    "read_idx", "fashion_mnist", "FASHION_MNIST_CLASSES", "DEFAULT_FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS", "adm_random_crop", "adm_center_crop", "five_crop_offsets", "train_transform",
    "ten_crop", "TEN_CROP_GEOMETRY", "epoch_permutation", "sample_rng", "StepBatchSampler", "make_loader",
    "steps_per_epoch", "to_model_input", "open_dataset", "fill_skipped",
]

log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm")

ImageLike = Union[np.ndarray, Image.Image]


class DataError(PrologueError, RuntimeError):
    """Training data that is missing, malformed or unusable; the message says what to do."""


# ----------------------------------------------------------------------------- datasets


class ArrayDataset:
    """An in-memory labelled image set.

    `images`: uint8 `[N, C, H, W]`; `labels`: int64 `[N]` in `[0, num_classes)`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str]):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], "
                             f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N={len(images)}], got shape {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got [{self.labels.min()}, {self.labels.max()}]")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])  # [C, H, W] uint8 view


class FolderDataset:
    """ImageNet-style folders: `root/<class name>/.../<image>`, class index = sorted folder order.

    Files are found recursively inside each class folder by extension (case-insensitive, see
    `IMAGE_EXTENSIONS`; hidden files and folders are ignored) and decoded lazily. An image that
    cannot be read comes back as `(None, label)` with a warning; the loader drops it and counts
    it in the batch's "skipped". A class folder without images keeps its index.
    """

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} not found: pass --data PATH pointing at a "
                            f"folder with one subfolder of images per class")
        classes = sorted(e.name for e in os.scandir(self.root)
                         if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"no class folders in {self.root}: put the images in one subfolder "
                            f"per class (root/<class>/<image>.jpg)")
        samples: List[Tuple[str, int]] = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(dirpath, f), label))
        if not samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of "
                            f"{self.root}: put the images in root/<class>/")
        self.class_names = classes
        self.num_classes = len(classes)
        self.samples = samples
        self.labels = np.array([s[1] for s in samples], dtype=np.int64)  # [N]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Optional[Image.Image], int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()
                single = im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16")
                image = im.convert("L" if single else "RGB")
        except Exception as e:  # any decoder failure: PIL raises OSError, ValueError, ...
            log.warning("skipping unreadable image %s: %s", path, e)
            return None, label
        return image, label


class SyntheticDataset:
    """Deterministic class-dependent images: oriented stripes, a blob and a per-class tint.

    Item `i` has label `i % num_classes`; its stripe angle and frequency, blob width (and tint
    when `channels == 3`) are set by the class, its phase, blob position and noise by
    `PCG64([seed, i])`. Generated on access; `images` is never materialised.
    """

    def __init__(self, n: int, image_size: int, channels: int, num_classes: int, seed: int = 0):
        if n <= 0 or image_size <= 0 or num_classes <= 0 or channels not in (1, 3):
            raise ValueError(f"need n, image_size, num_classes > 0 and channels in (1, 3), got "
                             f"n={n} image_size={image_size} channels={channels} "
                             f"num_classes={num_classes}")
        self.n, self.image_size, self.channels, self.seed = n, image_size, channels, seed
        self.num_classes = num_classes
        self.class_names = [f"class_{k}" for k in range(num_classes)]
        self.labels = np.arange(n, dtype=np.int64) % num_classes  # [N]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        k, S, K = int(self.labels[i]), self.image_size, self.num_classes
        rng = np.random.Generator(np.random.PCG64([self.seed, i]))
        v, u = np.meshgrid(np.arange(S) / S, np.arange(S) / S, indexing="ij")  # [S, S] rows, cols
        theta = math.pi * k / K
        freq = 2 + k % 4
        stripes = np.sin(2 * math.pi * freq * (u * math.cos(theta) + v * math.sin(theta))
                         + rng.uniform(0, 2 * math.pi))
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        blob = np.exp(-((v - cy) ** 2 + (u - cx) ** 2) / (2 * (0.08 + 0.02 * (k % 3)) ** 2))
        base = 60.0 * stripes + 50.0 * blob  # [S, S]
        if self.channels == 3:  # class hue: per-channel offset
            offset = 40.0 * np.cos(2 * math.pi * (k / K + np.arange(3) / 3))  # [3]
        else:
            offset = np.zeros(1)
        x = 128.0 + offset[:, None, None] + base + rng.normal(0, 12.0, (self.channels, S, S))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), k  # [C, S, S]


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (gzip-compressed when named `*.gz`) into a native-endian array.

    Layout: two zero bytes, a type code, the number of dims, then each dim as big-endian uint32,
    then the big-endian data. Any mismatch (bad magic, short or overlong data, broken gzip)
    raises `DataError` naming the file.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; re-download or reinstall it") from e

    def bad(why: str) -> DataError:
        return DataError(f"{path} is not a valid IDX file ({why}); re-download or reinstall it")

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise bad("bad magic number")
    dtype = _IDX_DTYPES.get(raw[2])
    ndim = raw[3]
    if dtype is None:
        raise bad(f"unknown type code 0x{raw[2]:02x}")
    if not 1 <= ndim <= 8:
        raise bad(f"{ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad("truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise bad(f"dims {dims} need {expected} data bytes, found {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def _find_idx(folder: Path, prefix: str, kind: str) -> Optional[Path]:
    """`<prefix>-<kind>-ubyte[.gz]` (or the `<prefix>-<kind>.` spelling) in `folder`, if any."""
    stem, idx = kind.split("-")
    for name in (f"{prefix}-{stem}-{idx}-ubyte", f"{prefix}-{stem}.{idx}-ubyte"):
        for suffix in ("", ".gz"):
            p = folder / (name + suffix)
            if p.is_file():
                return p
    return None


def fashion_mnist(root: Union[str, os.PathLike, None] = None, split: str = "train") -> ArrayDataset:
    """Fashion-MNIST as an `ArrayDataset`: images uint8 `[N, 1, 28, 28]`, 10 classes.

    `root` (default `DEFAULT_FASHION_MNIST_ROOT`, where Debian's `dataset-fashion-mnist` puts
    the files) is a folder holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each plain or `.gz`; torchvision's
    `root/FashionMNIST/raw` and `root/raw` are also searched. `split` is "train" (60000) or
    "test" (10000; "t10k" also accepted).
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT)
    for folder in (base, base / "FashionMNIST" / "raw", base / "raw"):
        images_path = _find_idx(folder, prefix, "images-idx3")
        labels_path = _find_idx(folder, prefix, "labels-idx1")
        if images_path and labels_path:
            break
    else:
        raise DataError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {base}: run "
            f"`apt-get install dataset-fashion-mnist` or pass --data PATH pointing at a folder "
            f"with the IDX files")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path} holds {images.dtype} {images.shape}, expected uint8 "
                        f"[N, H, W] images; re-download or reinstall it")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path} holds {labels.shape} labels for {len(images)} images in "
                        f"{images_path}; re-download or reinstall them")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path} has label {int(labels.max())} outside [0, 10); "
                        f"re-download or reinstall it")
    return ArrayDataset(images[:, None], labels.astype(np.int64),  # [N, 1, H, W], [N]
                        FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- transforms


def _to_pil(image: ImageLike, channels: int) -> Image.Image:
    """A PIL image in mode "L" (single channel) or "RGB"; "L" stays "L" even for `channels=3`
    (the caller repeats it after resizing, which equals converting to RGB first)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(image, Image.Image):
        img = image
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {a.dtype}")
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[0] not in (1, 3):
            raise ValueError(f"image arrays must be [C, H, W] with C in (1, 3), got {a.shape}")
        hwc = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # [H, W] or [H, W, 3]
        img = Image.fromarray(np.ascontiguousarray(hwc))
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def _resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Bicubic resize so that min(width, height) == side, keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == side:
        return img
    if w <= h:
        size = (side, max(side, round(h * side / w)))
    else:
        size = (max(side, round(w * side / h)), side)
    return img.resize(size, Image.Resampling.BICUBIC)


def _to_chw(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # [c, H, W]
    if a.shape[0] != channels:  # "L" -> RGB: repeat
        a = np.repeat(a, channels, axis=0)
    return np.ascontiguousarray(a)


def _adm_resize(img: Image.Image, side: int) -> Image.Image:
    """The ADM resize shared by the release's random and centre crops: while the shorter side is
    `>= 2 * side`, halve both sides (integer division) with BOX resampling; then BICUBIC-resize so
    the shorter side is `side` (each side `round(x * side / shorter)`)."""
    while min(img.size) >= 2 * side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = side / min(img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)


def adm_random_crop(img: Image.Image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> Tuple[Image.Image, int, int]:
    """The release's phase-1 random-resize crop (ADM style; OFFICIAL_TRAINING §2.2,
    `dataset.py:242-264` of the release, re-implemented from that description).

    Draws an integer shorter side `s` uniformly from `[ceil(S / max_crop_frac),
    ceil(S / min_crop_frac)]` = `[S, ceil(S / 0.8)]`; `_adm_resize` to `s` (BOX halving while the
    shorter side is `>= 2 s`, then BICUBIC so the shorter side is `s`); returns the resized image
    and the crop offsets `(top, left)`, each uniform over all valid positions. Draws from `rng` in
    order: `s`, top, left. The caller cuts `[top:top + S, left:left + S]`.
    """
    S = image_size
    lo, hi = math.ceil(S / max_crop_frac), math.ceil(S / min_crop_frac)
    s = int(rng.integers(lo, hi + 1))
    img = _adm_resize(img, s)
    w, h = img.size
    top = int(rng.integers(0, h - S + 1))
    left = int(rng.integers(0, w - S + 1))
    return img, top, left


def adm_center_crop(img: Image.Image, side: int) -> Image.Image:
    """The release's ADM centre crop (`center_crop_arr`, `dataset.py:222-240` of the release;
    OFFICIAL_TRAINING §3): `_adm_resize` to `side`, then the `side x side` square at the floor
    offsets `((W - side) // 2, (H - side) // 2)`."""
    img = _adm_resize(img, side)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def five_crop_offsets(side: int, size: int) -> List[Tuple[int, int]]:
    """`(top, left)` of torchvision's `five_crop(img, size)` on a `side x side` image, in its order
    (top-left, top-right, bottom-left, bottom-right, centre). The centre offset is torchvision's
    `center_crop`: `int(round((side - size) / 2.0))`, Python's round half to even (12 for 281/256,
    2 for 35/32), not the floor."""
    e, c = side - size, int(round((side - size) / 2.0))
    return [(0, 0), (0, e), (e, 0), (e, e), (c, c)]


def train_transform(image: ImageLike, image_size: int, channels: int, rng: np.random.Generator,
                    crop: str = "random", flip: bool = False, *, mirror: bool = False) -> np.ndarray:
    """One training view: uint8 `[channels, image_size, image_size]`.

    `image` is a PIL image or uint8 `[C, H, W]`. `crop="random"`: the release's ADM
    random-resize crop (`adm_random_crop`: shorter side drawn in `[S, ceil(S / 0.8)]`, box
    halving, bicubic resize, uniform offsets); `"center"`: shorter side resized (bicubic) to
    `image_size`, then the centre crop (offset `(H - S) // 2`). Then `mirror=True` mirrors the
    view horizontally (the doubled data set of `make_loader`, as the release: crop first, then
    mirror). `flip=True` is a legacy p=0.5 coin flip, drawn after the crop (the release does
    not use one). Grayscale becomes RGB by repetition, RGB becomes grayscale through PIL "L".
    Draws from `rng` in order: side, crop top, crop left (random crop only), flip coin (only
    when `flip`).
    """
    if crop not in ("random", "center"):
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    S = image_size
    img = _to_pil(image, channels)
    if crop == "random":
        img, top, left = adm_random_crop(img, S, rng)
    else:
        img = _resize_shorter(img, S)
        w, h = img.size
        top, left = (h - S) // 2, (w - S) // 2
    out = _to_chw(img, channels)[:, top:top + S, left:left + S]  # [C, S, S]
    if mirror:
        out = out[:, :, ::-1]
    if flip and rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


TEN_CROP_GEOMETRY = "adm-centre-int(1.1S)+TenCrop(S)"  # recorded by pretokenize: shards of another geometry never mix


def ten_crop(image: ImageLike, image_size: int, channels: int, scale: float = 1.1) -> np.ndarray:
    """The release's phase-2 ten crops: uint8 `[10, channels, image_size, image_size]`.

    As the release (`dataset.py:475-480` -> `:222-240`, then `:269-279`; OFFICIAL_TRAINING §3):
    the ADM centre crop to a square of side `int(image_size * scale)` (281 for 256;
    `adm_center_crop`), then torchvision `TenCrop(image_size)` of that square: views 0-4 are
    `five_crop` of the square (top-left, top-right, bottom-left, bottom-right, centre), views 5-9
    `five_crop` of the horizontally mirrored square in the same order. So view 5 is the mirror of
    view 1 (not of view 0), 6 of view 0, 7 of 3, 8 of 2, and view 9 (the mirrored square's centre)
    mirrors the square's columns `[side - c - S, side - c)` (`c` the centre offset), which are
    view 4's shifted by `side - S - 2c` columns (+1 for 281/256, -1 for 35/32, 0 when even).
    """
    S = image_size
    side = int(S * scale)
    if side < S:
        raise ValueError(f"scale must make the resized side >= image_size, got scale={scale}")
    a = _to_chw(adm_center_crop(_to_pil(image, channels), side), channels)  # [C, side, side]
    boxes = five_crop_offsets(side, S)
    views = [v[:, t:t + S, l:l + S] for v in (a, a[:, :, ::-1]) for t, l in boxes]  # TenCrop order
    return np.ascontiguousarray(np.stack(views))  # [10, C, S, S]


# ----------------------------------------------------------------------------- loader


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of `epoch`: `Generator(PCG64([seed, epoch])).permutation(n)`."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def sample_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """Augmentation RNG of the sample at `position` of the global batch of `step`."""
    return np.random.Generator(np.random.PCG64([seed, step, position]))


def steps_per_epoch(dataset: Any, global_batch_size: int, doubled: bool = False) -> int:
    """Full global batches per epoch (`len(dataset) // global_batch_size`; the tail is dropped).
    `doubled`: the epoch of `make_loader(flip=True)`, `2 len(dataset)` items."""
    n = len(dataset) * (2 if doubled else 1)
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if n < global_batch_size:
        raise DataError(f"the dataset has {n} images, fewer than one global batch of "
                        f"{global_batch_size}: lower the batch size or use more data")
    return n // global_batch_size


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless per-step index lists for one rank: `[(index, step, position), ...]` of length
    `global_batch_size // world_size`, for steps `start_step, start_step + 1, ...`.

    The sample stream is the concatenation of `epoch_permutation(seed, e, N)` for e = 0, 1, ...,
    each cut to `steps_per_epoch * G` samples when `drop_last` (so no batch spans two epochs)
    or kept whole otherwise. Step s takes stream positions `[s G, (s + 1) G)`; rank r takes
    batch positions `[r b, (r + 1) b)`. `position` is the index within the global batch.
    """

    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, drop_last: bool = True):
        if global_batch_size <= 0 or world_size <= 0:
            raise ValueError(f"global_batch_size and world_size must be positive, got "
                             f"{global_batch_size} and {world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be divisible by "
                             f"world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if num_samples <= 0:
            raise DataError("the dataset is empty")
        if drop_last and num_samples < global_batch_size:
            raise DataError(f"the dataset has {num_samples} images, fewer than one global batch "
                            f"of {global_batch_size}: lower the batch size or use more data")
        self.n, self.G, self.seed = num_samples, global_batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.b = global_batch_size // world_size
        self.per_epoch = (num_samples // global_batch_size) * global_batch_size if drop_last \
            else num_samples
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._perms[epoch]

    def batch(self, step: int) -> List[Tuple[int, int, int]]:
        """This rank's `(index, step, position)` triples for `step`."""
        positions = np.arange(self.rank * self.b, (self.rank + 1) * self.b)  # [b] in the batch
        stream = step * self.G + positions  # [b] in the sample stream
        epochs, offsets = np.divmod(stream, self.per_epoch)
        indices = np.empty(self.b, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            indices[sel] = self._perm(int(e))[offsets[sel]]
        return [(int(i), step, int(p)) for i, p in zip(indices, positions)]

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class _Augmented(torch.utils.data.Dataset):
    """`(index, step, position)` -> `(step, view or None, label)` with the sample's own RNG.

    With `doubled`, indices run over `2 N`: `i < N` is image `i`, `N <= i < 2 N` is image
    `i - N` mirrored (the release's x-flip, `dataset.py:101-105, 158-160`)."""

    def __init__(self, dataset, image_size: int, channels: int, crop: str, doubled: bool, seed: int):
        self.dataset, self.image_size, self.channels = dataset, image_size, channels
        self.crop, self.doubled, self.seed = crop, doubled, seed
        self.n = len(dataset)

    def __getitem__(self, key: Tuple[int, int, int]):
        index, step, position = key
        mirror = index >= self.n
        image, label = self.dataset[index - self.n if mirror else index]
        if image is None:
            return step, None, label
        rng = sample_rng(self.seed, step, position)
        view = train_transform(image, self.image_size, self.channels, rng, self.crop, mirror=mirror)
        return step, view, label

    def __len__(self) -> int:
        return self.n * (2 if self.doubled else 1)


class _Collate:
    """Stack the readable items of one step; count the unreadable ones in "skipped"."""

    def __init__(self, image_size: int, channels: int):
        self.image_size, self.channels = image_size, channels

    def __call__(self, items) -> Dict[str, Any]:
        good = [(view, label) for _, view, label in items if view is not None]
        if good:
            images = torch.from_numpy(np.stack([v for v, _ in good]))  # [b', C, S, S] uint8
        else:
            images = torch.empty((0, self.channels, self.image_size, self.image_size),
                                 dtype=torch.uint8)
        labels = torch.tensor([label for _, label in good], dtype=torch.int64)  # [b']
        return {"step": items[0][0], "images": images, "labels": labels,
                "skipped": len(items) - len(good)}


def make_loader(dataset: Any, global_batch_size: int, *, seed: int, rank: int = 0,
                world_size: int = 1, start_step: int = 0, num_workers: int = 2,
                image_size: int, channels: int, crop: str = "random", flip: bool = True,
                pin_memory: Optional[bool] = None,
                drop_last: bool = True) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches for steps `start_step, start_step + 1, ...`.

    Yields `{"step": int, "images": uint8 [b', C, S, S], "labels": int64 [b'], "skipped": int}`
    with `b = global_batch_size // world_size` and `b' = b - skipped` (unreadable images are
    dropped). `flip=True` doubles the data set as the release does (OFFICIAL_TRAINING §2.2):
    the sampler runs over `2 N` indices, `N..2N-1` being the mirrored copies of `0..N-1`, so
    each image appears once plain and once mirrored per epoch of `2 N` (no coin flip).
    Sample order is `StepBatchSampler`'s over those indices; sample augmentation is
    `train_transform` (the ADM random-resize crop for `crop="random"`) with
    `sample_rng(seed, step, position)`. Batches are identical whatever `world_size` (ranks
    concatenated), `num_workers` or `start_step`. Has no `len`; iterating again restarts at
    `start_step`. `pin_memory` defaults to `torch.cuda.is_available()`.
    """
    if crop not in ("random", "center"):
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    if channels not in (1, 3) or image_size <= 0:
        raise ValueError(f"need channels in (1, 3) and image_size > 0, "
                         f"got {channels}, {image_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = StepBatchSampler(len(dataset) * (2 if flip else 1), global_batch_size, seed=seed, rank=rank,
                               world_size=world_size, start_step=start_step, drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        _Augmented(dataset, image_size, channels, crop, flip, seed), batch_sampler=sampler,
        num_workers=num_workers, collate_fn=_Collate(image_size, channels),
        pin_memory=pin_memory,
        # its own generator: creating the iterator must not draw from the global torch RNG,
        # whose state a resumed run restores (augmentation never uses it)
        generator=torch.Generator().manual_seed(seed), **extra)


def to_model_input(batch_images: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> float32 in [-1, 1] on `device` (`x / 127.5 - 1`), copied
    non-blocking (overlaps with compute when the batch is pinned)."""
    if batch_images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {batch_images.dtype}")
    return uint8_to_images(batch_images.to(device, non_blocking=True))


# ----------------------------------------------------------------------------- --data


def open_dataset(spec: Optional[str], image_size: int = 32, channels: int = 1, num_classes: int = 10):
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
    idx = torch.arange(expected) % n
    return images[idx], labels[idx]
