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


def test_ten_crop():
    a = np.random.default_rng(0).integers(0, 256, (3, 11, 13), dtype=np.uint8)
    v = ten_crop(a, 10, 3)  # shorter side already round(1.1 * 10) = 11: no resize
    assert v.shape == (10, 3, 10, 10) and v.dtype == np.uint8
    np.testing.assert_array_equal(v[0], a[:, :10, :10])
    np.testing.assert_array_equal(v[1], a[:, :10, 3:])
    np.testing.assert_array_equal(v[2], a[:, 1:, :10])
    np.testing.assert_array_equal(v[3], a[:, 1:, 3:])
    np.testing.assert_array_equal(v[4], a[:, 0:10, 1:11])
    np.testing.assert_array_equal(v[5:], v[:5, :, :, ::-1])
    g = ten_crop(Image.fromarray(a.transpose(1, 2, 0)), 8, 1, scale=1.25)
    assert g.shape == (10, 1, 8, 8)
    np.testing.assert_array_equal(g[5:], g[:5, :, :, ::-1])


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
