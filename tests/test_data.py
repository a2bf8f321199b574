"""Data layer: IDX parsing, Fashion-MNIST, folders, transforms and the step-indexed loader."""

import gzip
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prologue_export.train.data import (
    ArrayDataset, DataError, FolderDataset, SyntheticDataset, epoch_permutation, fashion_mnist,
    adm_random_crop, make_loader, read_idx, sample_rng, steps_per_epoch, ten_crop, to_model_input, train_transform,
)


def idx_bytes(a: np.ndarray) -> bytes:
    """Hand-written IDX encoder (independent of the reader under test)."""
    code = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
            np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}[a.dtype]
    head = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write(path: Path, a: np.ndarray) -> Path:
    data = idx_bytes(a)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def batches(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def assert_same(a, b):
    assert a["step"] == b["step"] and a["skipped"] == b["skipped"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def random_gray(n=24, side=12, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, (n, 1, side, side), dtype=np.uint8),
                        rng.integers(0, 4, n), ["a", "b", "c", "d"])


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", ["u1", "i4", "f4"])
def test_idx_round_trip(tmp_path, name, dtype):
    values = np.arange(30, dtype=np.int64).reshape(2, 3, 5) * 37 % 251
    a = values.astype(dtype) if dtype == "u1" else ((values - 100) * 1001).astype(dtype)
    b = read_idx(write(tmp_path / name, a))
    assert b.shape == (2, 3, 5) and b.dtype == np.dtype(dtype) and b.dtype.isnative
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("garble", ["truncated", "trailing", "magic", "type", "gzip"])
def test_idx_garbled_names_file(tmp_path, garble):
    data = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    name = "bad-idx3-ubyte"
    if garble == "truncated":
        data = data[:-5]
    elif garble == "trailing":
        data = data + b"\0"
    elif garble == "magic":
        data = b"\1" + data[1:]
    elif garble == "type":
        data = data[:2] + b"\x42" + data[3:]
    else:
        name += ".gz"
        data = gzip.compress(data)[:-12]  # cut inside the stream
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=name):
        read_idx(path)


def test_fashion_mnist_flat_folder(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 6, ".gz"), ("t10k", 4, "")):
        write(tmp_path / f"{prefix}-images-idx3-ubyte{gz}",
              rng.integers(0, 256, (n, 5, 7), dtype=np.uint8))
        write(tmp_path / f"{prefix}-labels-idx1-ubyte{gz}", np.arange(n, dtype=np.uint8))
    train = fashion_mnist(tmp_path)
    test = fashion_mnist(tmp_path, split="test")
    assert train.images.shape == (6, 1, 5, 7) and train.images.dtype == np.uint8
    assert test.images.shape == (4, 1, 5, 7)
    assert train.labels.dtype == np.int64 and train.labels.tolist() == list(range(6))
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(train.images[:, 0], raw)


def test_fashion_mnist_bad_labels(tmp_path):
    write(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        fashion_mnist(tmp_path)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        fashion_mnist(tmp_path / "nowhere")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data PATH" in msg
    assert "\n" not in msg


def test_fashion_mnist_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        pytest.skip(f"{root} absent (apt-get install dataset-fashion-mnist)")
    ds = fashion_mnist()
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (60000,) and ds.num_classes == 10
    assert np.bincount(ds.labels).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- folders


def make_folder(root: Path) -> Path:
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 16), (200, 10, 10)).save(root / "cat" / "a.png")
    Image.new("L", (16, 24), 90).save(root / "cat" / "b.PNG")
    Image.new("RGBA", (18, 18), (1, 2, 3, 4)).save(root / "dog" / "c.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(root / "dog" / "sub" / "d.jpg")
    Image.new("P", (17, 19), 3).save(root / "dog" / "e.gif")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "notes.txt").write_text("ignored")
    return root


def test_folder_dataset_skips_corrupt(tmp_path):
    ds = FolderDataset(make_folder(tmp_path / "imgs"))
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6
    assert Counter(ds.labels.tolist()) == {0: 2, 1: 4}
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")]
    assert ds[broken[0]] == (None, 1)
    loader = make_loader(ds, 6, seed=0, num_workers=0, image_size=12, channels=3, flip=False)
    b = next(iter(loader))  # one step = the whole (undoubled) epoch
    assert b["skipped"] == 1 and b["images"].shape == (5, 3, 12, 12)
    assert b["images"].dtype == torch.uint8 and sorted(b["labels"].tolist()) == [0, 0, 1, 1, 1]


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        FolderDataset(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "x.txt").write_text("")
    with pytest.raises(DataError, match="no images"):
        FolderDataset(tmp_path / "noimg")


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source", ["gray_array", "rgb_array", "gray_pil", "rgb_pil"])
def test_train_transform_shape(source, channels):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3 if "rgb" in source else 1, 30, 41), dtype=np.uint8)
    image = a
    if "pil" in source:
        image = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    for crop in ("random", "center"):
        out = train_transform(image, 16, channels, np.random.default_rng(1), crop=crop)
        assert out.shape == (channels, 16, 16) and out.dtype == np.uint8
        again = train_transform(image, 16, channels, np.random.default_rng(1), crop=crop)
        np.testing.assert_array_equal(out, again)
    if source == "gray_array" and channels == 3:  # gray -> RGB repeats the channel
        assert (out == out[:1]).all()


def test_train_transform_exact():
    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    same = train_transform(a, 8, 3, np.random.default_rng(0), crop="center", flip=False)
    np.testing.assert_array_equal(same, a)  # already S x S: identity
    gray = train_transform(a, 8, 1, np.random.default_rng(0), crop="center", flip=False)
    luma = np.asarray(Image.fromarray(a.transpose(1, 2, 0)).convert("L"))
    np.testing.assert_array_equal(gray[0], luma)
    # legacy coin flip (flip=True) and the deterministic mirror of the doubled data set
    flips = {train_transform(a, 8, 3, np.random.default_rng(s), crop="center", flip=True).tobytes()
             for s in range(16)}
    assert flips == {a.tobytes(), np.ascontiguousarray(a[:, :, ::-1]).tobytes()}
    mirrored = train_transform(a, 8, 3, np.random.default_rng(0), crop="center", mirror=True)
    np.testing.assert_array_equal(mirrored, a[:, :, ::-1])
    # the default draws no flip at all
    assert {train_transform(a, 8, 3, np.random.default_rng(s), crop="center").tobytes()
            for s in range(8)} == {a.tobytes()}


def adm_reference(img, S, rng):
    """OFFICIAL_TRAINING §2.2 step by step: (side s, resized image, top, left)."""
    s = int(rng.integers(S, math.ceil(S / 0.8) + 1))
    while min(img.size) >= 2 * s:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    k = s / min(img.size)
    img = img.resize((round(img.size[0] * k), round(img.size[1] * k)), resample=Image.Resampling.BICUBIC)
    top = int(rng.integers(0, img.size[1] - S + 1))
    left = int(rng.integers(0, img.size[0] - S + 1))
    return s, img, top, left


def test_adm_random_crop_sizes_offsets_and_exact_pixels():
    S = 16  # sides drawn from [16, ceil(16 / 0.8)] = [16, 20]
    src = np.random.default_rng(0).integers(0, 256, (97, 150, 3), dtype=np.uint8)  # H 97, W 150
    img = Image.fromarray(src)
    sides, tops, lefts = set(), set(), set()
    for seed in range(400):
        s, ref, top, left = adm_reference(img, S, np.random.default_rng(seed))
        resized, t, l = adm_random_crop(img, S, np.random.default_rng(seed))
        assert resized.size == ref.size and (t, l) == (top, left)
        np.testing.assert_array_equal(np.asarray(resized), np.asarray(ref))
        w, h = resized.size
        assert min(w, h) == s and 16 <= s <= 20
        # box-halved while the shorter side >= 2 s (32..40): 150x97 -> 75x48 -> 37x24, then bicubic
        assert (w, h) == (round(37 * s / 24), s)
        assert 0 <= t <= h - S and 0 <= l <= w - S
        sides.add(s)
        tops.add(t)
        lefts.add(l)
        out = train_transform(img, S, 3, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, np.asarray(ref).transpose(2, 0, 1)[:, top:top + S, left:left + S])
        mir = train_transform(img, S, 3, np.random.default_rng(seed), mirror=True)
        np.testing.assert_array_equal(mir, out[:, :, ::-1])
    assert sides == set(range(16, 21))  # every side of the inclusive range is drawn
    assert tops == set(range(0, 5))  # h = s in 16..20 -> top in [0, 4]
    assert min(lefts) == 0 and max(lefts) <= round(37 * 20 / 24) - S and len(lefts) >= 12  # [0, 15]
    # the released geometry: S = 256 draws sides 256..320
    assert (math.ceil(256 / 1.0), math.ceil(256 / 0.8)) == (256, 320)
    # an already-small image is upscaled (no halving) to the drawn side
    small = Image.fromarray(src[:20, :30])
    resized, _, _ = adm_random_crop(small, S, np.random.default_rng(1))
    assert min(resized.size) in range(16, 21) and resized.size[1] == min(resized.size)


def release_ten_crop(img, S):
    """OFFICIAL_TRAINING §3 step by step, written apart from train/data.py: the ADM centre crop
    (`center_crop_arr`) to `int(1.1 S)` in HWC numpy, then torchvision's TenCrop spelled out
    (five_crop of the square, then five_crop of its mirror). Returns (square [H, W(, C)], views)."""
    side = int(S * 1.1)
    w, h = img.size
    while min(w, h) >= 2 * side:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.Resampling.BOX)
    k = side / min(w, h)
    img = img.resize((round(w * k), round(h * k)), resample=Image.Resampling.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    sq = arr[y:y + side, x:x + side]
    d = side - S
    c = d // 2 + (d % 2) * ((d // 2) % 2)  # round((side - S) / 2) with ties to even, as Python 3 round
    views = []
    for im in (sq, np.ascontiguousarray(sq[:, ::-1])):  # torchvision hflip, then five_crop again
        tl, tr = im[:S, :S], im[:S, d:]
        bl, br = im[d:, :S], im[d:, d:]
        views += [tl, tr, bl, br, im[c:c + S, c:c + S]]
    return sq, views


def chw(v):
    return v[None] if v.ndim == 2 else v.transpose(2, 0, 1)


def noise(w, h, mode="RGB", seed=0):
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("w, h, resized, square_at", [
    (500, 375, (375, 281), (0, 47)),  # landscape: no halving (375 < 562), bicubic 375x281, left 47
    (281, 1000, (281, 1000), (359, 0)),  # shorter side already 281: same size, top (1000-281)//2
    (200, 150, (375, 281), (0, 47)),  # smaller than 281: upscaled, no halving
    (1200, 900, (375, 281), (0, 47)),  # BOX halving once (900 >= 562 -> 600x450), then bicubic
    (1125, 2251, (281, 562), (140, 0)),  # halved twice (1125 -> 562 -> 281; 562 >= 562 still halves)
])
def test_ten_crop_is_the_release_geometry(w, h, resized, square_at):
    S = 256
    img = noise(w, h, seed=w)
    sq, views = release_ten_crop(img, S)
    v = ten_crop(img, S, 3)
    assert v.shape == (10, 3, S, S) and v.dtype == np.uint8 and sq.shape == (281, 281, 3)
    for j in range(10):
        np.testing.assert_array_equal(v[j], chw(views[j]), err_msg=f"view {j}")
    # the literal boxes, in the coordinates of the resized (after halving) image
    small = img
    while min(small.size) >= 562:
        small = small.resize((small.size[0] // 2, small.size[1] // 2), resample=Image.Resampling.BOX)
    r = np.asarray(small.resize(resized, resample=Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    y, x = square_at
    boxes = [(0, 0), (0, 25), (25, 0), (25, 25), (12, 12)]  # tl, tr, bl, br, centre (round(12.5) = 12)
    for j, (t, l) in enumerate(boxes):
        np.testing.assert_array_equal(v[j], r[:, y + t:y + t + S, x + l:x + l + S])
    # mirrored square: its tl/tr/bl/br/centre are the mirrors of the square's tr/tl/br/bl and of
    # columns 13..268 (281 - 12 - 256 = 13), not of view 4's 12..267
    for j, (t, l) in enumerate([(0, 25), (0, 0), (25, 25), (25, 0), (12, 13)]):
        np.testing.assert_array_equal(v[5 + j], r[:, y + t:y + t + S, x + l:x + l + S][:, :, ::-1])


def test_ten_crop_500x375_stays_inside_the_281_square():
    """The issue's case: every view of a 500x375 image lies within columns 47..327 of the 375x281
    resize (the old geometry's corners reached columns 0..375 of a 376x282 resize)."""
    W = 500
    coords = np.broadcast_to(np.arange(W, dtype=np.float64) / (W - 1) * 255, (375, W))
    img = Image.fromarray(np.round(coords).astype(np.uint8))  # a horizontal ramp: value ~ column
    v = ten_crop(img, 256, 1).astype(int)
    col = np.round(np.arange(375) * (W / 375) + (W / 375 - 1) / 2)  # resized column -> source column
    lo, hi = col[47] / (W - 1) * 255, col[327] / (W - 1) * 255
    assert v[:, :, 128, :].min() >= lo - 2 and v[:, :, 128, :].max() <= hi + 2
    assert v[0, 0, 128, 0] <= lo + 2 and v[1, 0, 128, -1] >= hi - 2  # tl starts at 47, tr ends at 327


def test_ten_crop_exact_coordinates_without_resampling():
    """A 281 x 1000 image is not resampled: encode each pixel's (x, y) and read the boxes back."""
    w, h, S = 281, 1000, 256
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256]).astype(np.uint8)  # [3, H, W]
    v = ten_crop(img, S, 3).astype(int)
    xs = v[:, 0] + (v[:, 2] // 16) * 256  # [10, S, S] source column
    ys = v[:, 1] + (v[:, 2] % 16) * 256
    top = (1000 - 281) // 2  # 359
    lefts = [0, 25, 0, 25, 12]  # tl, tr, bl, br, centre of the square (x offset 0)
    tops = [0, 0, 25, 25, 12]
    for j in range(5):
        assert (ys[j, 0, 0], xs[j, 0, 0]) == (top + tops[j], lefts[j])
        assert (ys[j, -1, -1], xs[j, -1, -1]) == (top + tops[j] + S - 1, lefts[j] + S - 1)
    # the mirrored square: view 5 + j starts (left column) at the mirror of these columns
    for j, first_col in enumerate([280, 255, 280, 255, 268]):  # 280 - {0, 25, 0, 25, 12}
        assert (ys[5 + j, 0, 0], xs[5 + j, 0, 0]) == (top + tops[j], first_col)
        assert xs[5 + j, 0, -1] == first_col - (S - 1)
    assert np.all(np.diff(xs[5:], axis=-1) == -1) and np.all(np.diff(xs[:5], axis=-1) == 1)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "L"), (1, "RGB"), (3, "RGB")])
def test_ten_crop_small_presets_and_channels(channels, mode):
    """The tiny demo: 28x28 Fashion-MNIST at image_size 32 -> 35 square (int(35.2)), centre offset
    round(1.5) = 2 (ties to even), so the mirrored centre is columns 1..32 of the square."""
    img = noise(28, 28, mode, seed=channels)
    sq, views = release_ten_crop(img.convert("L") if channels == 1 else img, 32)
    assert sq.shape[:2] == (35, 35)
    v = ten_crop(np.asarray(img)[None] if mode == "L" else np.asarray(img).transpose(2, 0, 1), 32, channels)
    assert v.shape == (10, channels, 32, 32)
    ref = np.stack([chw(x) for x in views])
    if ref.shape[1] != channels:  # grayscale -> RGB by repetition
        ref = np.repeat(ref, channels, axis=1)
    np.testing.assert_array_equal(v, ref)
    s = np.repeat(chw(sq), channels // chw(sq).shape[0], axis=0)  # the 35 x 35 square, [C, 35, 35]
    np.testing.assert_array_equal(v[4], s[:, 2:34, 2:34])
    np.testing.assert_array_equal(v[9], s[:, 2:34, 1:33][:, :, ::-1])


def test_ten_crop_other_scales():
    a = np.random.default_rng(0).integers(0, 256, (3, 11, 13), dtype=np.uint8)
    v = ten_crop(a, 10, 3)  # side int(11.000000000000002) = 11 = the shorter side: no resampling
    np.testing.assert_array_equal(v[0], a[:, :10, 1:11])  # square at left (13 - 11) // 2 = 1
    np.testing.assert_array_equal(v[4], a[:, :10, 1:11])  # centre offset round(0.5) = 0
    np.testing.assert_array_equal(v[3], a[:, 1:, 2:12])
    np.testing.assert_array_equal(v[9], a[:, 0:10, 2:12][:, :, ::-1])
    g = ten_crop(Image.fromarray(a.transpose(1, 2, 0)), 8, 1, scale=1.25)  # side 10
    assert g.shape == (10, 1, 8, 8)
    np.testing.assert_array_equal(g[5:9], g[[1, 0, 3, 2]][..., ::-1])
    np.testing.assert_array_equal(g[9], g[4][..., ::-1])  # even margin: centre mirrors onto itself
    with pytest.raises(ValueError, match="scale"):
        ten_crop(a, 10, 3, scale=0.5)


def test_ten_crop_matches_torchvision_when_installed():
    tv = pytest.importorskip("torchvision.transforms")
    for w, h in [(500, 375), (281, 1000), (200, 150), (1200, 900)]:
        img = noise(w, h, seed=h)
        sq, _ = release_ten_crop(img, 256)
        views = tv.TenCrop(256)(Image.fromarray(sq))
        ref = np.stack([np.asarray(x).transpose(2, 0, 1) for x in views])
        np.testing.assert_array_equal(ten_crop(img, 256, 3), ref)


# ----------------------------------------------------------------------------- loader


def test_loader_follows_spec():
    ds = random_gray(n=10)
    G, seed = 4, 7
    b = batches(make_loader(ds, G, seed=seed, num_workers=0, image_size=8, channels=1, flip=False), 4)
    perm0, perm1 = epoch_permutation(seed, 0, 10), epoch_permutation(seed, 1, 10)
    assert [x["step"] for x in b] == [0, 1, 2, 3]
    assert b[0]["labels"].tolist() == ds.labels[perm0[:4]].tolist()
    assert b[1]["labels"].tolist() == ds.labels[perm0[4:8]].tolist()  # tail 8..9 dropped
    assert b[2]["labels"].tolist() == ds.labels[perm1[:4]].tolist()
    expect = np.stack([train_transform(ds.images[perm1[p]], 8, 1, sample_rng(seed, 2, p))
                       for p in range(4)])  # [4, 1, 8, 8]: each sample's own (seed, step, p)
    np.testing.assert_array_equal(b[2]["images"].numpy(), expect)
    # drop_last=False: epochs concatenate whole, a batch may straddle two
    c = batches(make_loader(ds, G, seed=seed, num_workers=0, image_size=8, channels=1,
                            drop_last=False, flip=False), 3)
    assert c[2]["labels"].tolist() == ds.labels[np.r_[perm0[8:], perm1[:2]]].tolist()
    assert steps_per_epoch(ds, G) == 2


def test_loader_deterministic_and_resumable():
    ds = SyntheticDataset(40, 12, 3, 5, seed=1)
    kw = dict(seed=3, num_workers=0, image_size=10, channels=3)
    a = batches(make_loader(ds, 8, **kw), 6)
    b = batches(make_loader(ds, 8, **kw), 6)
    for x, y in zip(a, b):
        assert_same(x, y)
    resumed = batches(make_loader(ds, 8, start_step=3, **kw), 3)
    for x, y in zip(a[3:], resumed):
        assert_same(x, y)
    assert not torch.equal(a[0]["images"], a[5]["images"])
    other = next(iter(make_loader(ds, 8, **{**kw, "seed": 4})))
    assert not torch.equal(a[0]["images"], other["images"])


def test_world_size_independent():
    ds = random_gray(n=30)
    kw = dict(seed=5, num_workers=0, image_size=8, channels=3, start_step=2)
    one = batches(make_loader(ds, 6, **kw), 5)
    r0 = batches(make_loader(ds, 6, rank=0, world_size=2, **kw), 5)
    r1 = batches(make_loader(ds, 6, rank=1, world_size=2, **kw), 5)
    for full, x, y in zip(one, r0, r1):
        assert x["images"].shape == (3, 3, 8, 8)
        assert torch.equal(torch.cat([x["images"], y["images"]]), full["images"])
        assert torch.equal(torch.cat([x["labels"], y["labels"]]), full["labels"])
    with pytest.raises(ValueError, match="divisible"):
        make_loader(ds, 6, world_size=4, **kw)


def test_workers_match_in_process():
    ds = SyntheticDataset(32, 12, 1, 4)
    kw = dict(seed=2, image_size=10, channels=1, start_step=1)
    inproc = batches(make_loader(ds, 8, num_workers=0, **kw), 5)
    workers = batches(make_loader(ds, 8, num_workers=2, **kw), 5)
    for x, y in zip(inproc, workers):
        assert_same(x, y)


def test_loader_rejects_tiny_dataset():
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_loader(random_gray(n=3), 4, seed=0, num_workers=0, image_size=8, channels=1, flip=False)
    with pytest.raises(DataError, match="fewer than one global batch"):  # doubled: 2 x 1 < 4
        make_loader(random_gray(n=1), 4, seed=0, num_workers=0, image_size=8, channels=1)
    make_loader(random_gray(n=2), 4, seed=0, num_workers=0, image_size=8, channels=1)  # 2 x 2 >= 4


def test_doubled_dataset_plain_and_mirrored_once_per_epoch():
    n, G, seed = 10, 4, 7
    ds = random_gray(n=n)
    ds.labels[:] = np.arange(n)  # label = image index, to identify samples
    k = steps_per_epoch(ds, G, doubled=True)
    assert k == 2 * n // G == 5 and steps_per_epoch(ds, G) == 2
    b = batches(make_loader(ds, G, seed=seed, num_workers=0, image_size=8, channels=1), 2 * k)
    perm0 = epoch_permutation(seed, 0, 2 * n)  # the sampler runs over 2N indices
    for e in range(2):
        perm = epoch_permutation(seed, e, 2 * n)
        ids = [i for step in range(k) for i in perm[step * G:(step + 1) * G]]
        assert sorted(ids) == list(range(2 * n))  # 20 = 2N: no tail dropped here
        got = []
        for step in range(e * k, (e + 1) * k):
            x = b[step]
            assert x["step"] == step
            for p in range(G):
                idx = int(perm[(step - e * k) * G + p])
                mirror, img = idx >= n, idx % n
                assert int(x["labels"][p]) == img
                want = train_transform(ds.images[img], 8, 1, sample_rng(seed, step, p), mirror=mirror)
                np.testing.assert_array_equal(x["images"][p].numpy(), want)
                got.append((img, mirror))
        # each image exactly once plain and once mirrored per epoch of 2N
        assert sorted(got) == sorted((i, m) for i in range(n) for m in (False, True))
    assert [int(v) for v in b[0]["labels"]] == [int(i) % n for i in perm0[:G]]


def test_doubled_loader_deterministic_resumable_world_size_independent():
    ds = SyntheticDataset(12, 20, 3, 4, seed=2)
    kw = dict(seed=9, num_workers=0, image_size=16, channels=3)
    a = batches(make_loader(ds, 6, **kw), 8)
    again = batches(make_loader(ds, 6, **kw), 8)
    resumed = batches(make_loader(ds, 6, start_step=5, **kw), 3)
    r0 = batches(make_loader(ds, 6, rank=0, world_size=3, **kw), 8)
    r1 = batches(make_loader(ds, 6, rank=1, world_size=3, **kw), 8)
    r2 = batches(make_loader(ds, 6, rank=2, world_size=3, **kw), 8)
    for i in range(8):
        assert_same(a[i], again[i])
        assert torch.equal(torch.cat([r0[i]["images"], r1[i]["images"], r2[i]["images"]]), a[i]["images"])
    for x, y in zip(a[5:], resumed):
        assert_same(x, y)
    workers = batches(make_loader(ds, 6, **{**kw, "num_workers": 2}), 8)
    for x, y in zip(a, workers):
        assert_same(x, y)


# ----------------------------------------------------------------------------- misc


def test_synthetic_dataset():
    ds = SyntheticDataset(12, 16, 3, 4, seed=0)
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8 and y == 1 and ds.num_classes == 4
    np.testing.assert_array_equal(x, SyntheticDataset(12, 16, 3, 4, seed=0)[5][0])
    assert not np.array_equal(x, SyntheticDataset(12, 16, 3, 4, seed=1)[5][0])
    # class signal: nearest class centroid of the (phase-invariant) spectrum, held-out items
    gray = SyntheticDataset(80, 16, 1, 4, seed=2)
    x = np.stack([gray[i][0][0] for i in range(80)]).astype(np.float32)  # [80, 16, 16]
    f = np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True))).reshape(80, -1)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    y, train = gray.labels, np.arange(80) < 40
    centroids = np.stack([f[train & (y == k)].mean(0) for k in range(4)])
    pred = ((f[~train, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[~train]).mean() >= 0.9
    tint = np.stack([ds[i][0].mean((1, 2)) for i in range(4)])  # [class, channel]
    assert len({tuple(t.argsort()) for t in tint}) > 1  # classes differ in colour


def test_to_model_input():
    x = torch.tensor([[[[0, 255], [127, 128]]]], dtype=torch.uint8)
    y = to_model_input(x, "cpu")
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    torch.testing.assert_close(y, x.float() / 127.5 - 1)
    with pytest.raises(ValueError):
        to_model_input(x.float(), "cpu")
