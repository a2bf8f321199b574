"""Phase 2: encode a data set with the (EMA) tokenizer into shards of integer ids.

Output folder:
  index.json                      layout, counts, shard list, `complete`
  tokenizer/                      a copy of the tokenizer checkpoint (the folder is self-contained)
  shard_00000_ids.npy             int16/int32 [n, crops, Z + X]: `[prologue ids (raw) | visual ids]`
  shard_00000_labels.npy          int64 [n]
Shard k holds data-set items [k*S, (k+1)*S) in order (unreadable images skipped and counted).
Each shard is written to a temporary name and renamed, then listed in index.json (also
replaced atomically), so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..model import PrologueModel
from ..config import ModelConfig
from .data import TEN_CROP_GEOMETRY, open_dataset, ten_crop, to_model_input, train_transform
from ..runtime.files import atomic_output, sha256_file, write_json_atomic
from .common import TrainError, progress

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


class _Crops(torch.utils.data.Dataset):
    def __init__(self, dataset, indices, image_size, channels, crops):
        self.dataset, self.indices = dataset, indices
        self.image_size, self.channels, self.crops = image_size, channels, crops

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.dataset[self.indices[i]]
        if image is None:
            return None, label
        if self.crops == "ten":
            views = ten_crop(image, self.image_size, self.channels)  # [10, C, S, S]
        else:
            rng = np.random.default_rng(0)  # unused: centre crop without flip is deterministic
            views = train_transform(image, self.image_size, self.channels, rng, crop="center", flip=False)[None]
        return views, label


def _collate(items):
    good = [(v, l) for v, l in items if v is not None]
    views = torch.from_numpy(np.stack([v for v, _ in good])) if good else None  # [b, crops, C, S, S]
    labels = torch.tensor([l for _, l in good], dtype=torch.int64)
    return views, labels, len(items) - len(good)


@torch.no_grad()
def pretokenize(checkpoint, data: typing.Optional[str], out, crops: str = "ten", batch_size: int = 256,
                shard_size: int = 8192, num_workers: int = 2, device: typing.Optional[str] = None,
                limit: typing.Optional[int] = None) -> dict:
    """Encode `data` (its first `limit` items, when given) into id shards in `out`; resumes an
    interrupted run of the same inputs. Returns the index (see the module docstring).

    Stages: load the tokenizer and the data, open the index (new, or the interrupted run's), encode
    and add each shard not yet listed, then mark the index complete."""
    if batch_size < 1 or shard_size < 1:
        raise TrainError("--batch-size and --shard-size must be >= 1")
    model, device = _load_model(checkpoint, device)
    dataset = _open_data(data, model)
    out = Path(out)
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    source = {"data": str(data), "num_items": n, "tokenizer_sha256": sha256_file(Path(checkpoint) / "tokenizer.safetensors"),
              "crops": crops, "shard_size": shard_size}
    if crops == "ten":  # a folder begun with the earlier ten-crop geometry is not resumed with this one
        source["ten_crop"] = TEN_CROP_GEOMETRY
    index = _open_index(out, source, model, dataset)
    vocab = model.config.vocab()
    encoder = _ShardEncoder(model.tokenizer, dataset, crops, batch_size, num_workers, device, _id_dtype(vocab),
                            (index["crops_per_image"], vocab.num_prologue_tokens + vocab.num_visual_tokens))
    done = {s["index"] for s in index["shards"]}
    num_shards = (n + shard_size - 1) // shard_size
    bar = progress(n, sum(min(shard_size, n - k * shard_size) for k in done), True, "pretokenize")
    try:
        for k in range(num_shards):
            if k not in done:
                ids, labels, skipped = encoder.encode(range(k * shard_size, min(n, (k + 1) * shard_size)), bar)
                _add_shard(out, index, k, ids, labels, skipped)
    finally:
        bar.close()
    return _finish(out / INDEX_FILE, index)


def _load_model(checkpoint, device: typing.Optional[str]) -> typing.Tuple[PrologueModel, torch.device]:
    """The checkpoint's model with its tokenizer on `device` (default: cuda when present) in eval mode."""
    model = load_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.tokenizer.to(device).eval()
    return model, device


def _open_data(data: typing.Optional[str], model: PrologueModel):
    """The data set at the tokenizer's image size and channels; refuses more classes than the model has."""
    tcfg = model.tokenizer.cfg
    dataset = open_dataset(data, tcfg.image_size, tcfg.channels, model.config.num_classes)
    if dataset.num_classes > model.config.num_classes:
        raise TrainError(f"the data set has {dataset.num_classes} classes, the tokenizer was built for "
                         f"{model.config.num_classes}")
    return dataset


def _id_dtype(vocab) -> np.dtype:
    """int16 when every prologue and visual id fits, else int32."""
    max_id = max(vocab.visual_codebook_size, vocab.prologue_codebook_size)
    return np.dtype(np.int16 if max_id <= np.iinfo(np.int16).max else np.int32)


def _open_index(out: Path, source: dict, model: PrologueModel, dataset) -> dict:
    """The index of `out`: the one already there when it was made from the same `source` (a resume),
    else a new empty one in a new folder that also gets a copy of the tokenizer."""
    index_path = out / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("source") != source:
            raise TrainError(f"{out} holds shards of other inputs ({index.get('source')}); use a new --out folder")
        return index
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"--out {out} already holds files and no {INDEX_FILE}; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    tok, num_classes = model.tokenizer, model.config.num_classes
    save_checkpoint(PrologueModel.from_parts(ModelConfig(num_classes=num_classes, tokenizer=tok.cfg, ar=None), tok),
                    out / "tokenizer")
    vocab = model.config.vocab()
    index = {
        "format_version": FORMAT_VERSION, "source": source, "complete": False,
        "num_classes": num_classes, "class_names": list(getattr(dataset, "class_names", [])),
        "num_prologue_tokens": vocab.num_prologue_tokens, "num_visual_tokens": vocab.num_visual_tokens,
        "crops_per_image": 10 if source["crops"] == "ten" else 1, "dtype": _id_dtype(vocab).name,
        "shards": [], "num_images": 0, "skipped": 0,
    }
    write_json_atomic(index_path, index, "pretokenized index", indent=1)
    return index


@dataclasses.dataclass
class _ShardEncoder:
    """Encodes data-set items into `[prologue ids | visual ids]` rows, one per crop."""

    tok: torch.nn.Module
    dataset: typing.Any
    crops: str
    batch_size: int
    num_workers: int
    device: torch.device
    dtype: np.dtype
    item_shape: typing.Tuple[int, int]  # (crops, Z + X): the ids of one item

    @torch.no_grad()
    def encode(self, items: typing.Sequence[int], bar) -> typing.Tuple[np.ndarray, np.ndarray, int]:
        """ids `[n, crops, Z+X]` (`dtype`) and labels int64 `[n]` of the readable `items`, and how many
        were unreadable (skipped); advances `bar` by every item read."""
        tcfg = self.tok.cfg
        loader = torch.utils.data.DataLoader(
            _Crops(self.dataset, list(items), tcfg.image_size, tcfg.channels, self.crops), batch_size=self.batch_size,
            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.device.type == "cuda")
        ids_parts, label_parts, skipped = [], [], 0
        for views, labels, n_skipped in loader:
            skipped += n_skipped
            if views is not None:
                b, c = views.shape[:2]
                x = to_model_input(views.flatten(0, 1), self.device)  # [b*crops, C, S, S]
                prologue_ids, visual_ids = self.tok.encode(x)
                ids = torch.cat([prologue_ids, visual_ids], dim=1).view(b, c, -1)  # [b, crops, Z+X]
                ids_parts.append(ids.cpu().numpy().astype(self.dtype))
                label_parts.append(labels.numpy())
            bar.update(views.shape[0] + n_skipped if views is not None else n_skipped)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, *self.item_shape), self.dtype)
        labels = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int64)
        return ids, labels, skipped


def _add_shard(out: Path, index: dict, k: int, ids: np.ndarray, labels: np.ndarray, skipped: int) -> None:
    """Write shard `k` (each file atomically), then list it in `index` and rewrite index.json."""
    ids_name, labels_name = f"shard_{k:05d}_ids.npy", f"shard_{k:05d}_labels.npy"
    for name, array in ((ids_name, ids), (labels_name, labels)):
        with atomic_output(out / name, "pretokenized shard", "wb") as fh:  # exclusive temp file, fsync, rename
            np.save(fh, array)
    index["shards"].append({"index": k, "ids": ids_name, "labels": labels_name, "count": int(len(labels)),
                            "skipped": skipped})
    index["shards"].sort(key=lambda s: s["index"])
    index["num_images"] = sum(s["count"] for s in index["shards"])
    index["skipped"] = sum(s["skipped"] for s in index["shards"])
    write_json_atomic(out / INDEX_FILE, index, "pretokenized index", indent=1)


def _finish(index_path: Path, index: dict) -> dict:
    """Mark the index complete (every shard is written) and report unreadable images."""
    index["complete"] = True
    write_json_atomic(index_path, index, "pretokenized index", indent=1)
    if index["skipped"]:
        print(f"[pretokenize] skipped {index['skipped']} unreadable images", file=sys.stderr, flush=True)
    return index


class TokenShards:
    """Read-only view of a shard folder: `ids` [N, crops, Z+X] (memory-mapped), `labels` [N]."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise TrainError(f"--tokens {folder}: no {INDEX_FILE}; run `prologue train pretokenize` first")
        self.index = json.loads(index_path.read_text())
        if not self.index.get("complete"):
            raise TrainError(f"--tokens {folder}: pretokenization did not finish; rerun the same "
                             "`prologue train pretokenize` command to complete it")
        self.ids = [np.load(self.folder / s["ids"], mmap_mode="r") for s in self.index["shards"]]
        self.labels = np.concatenate([np.load(self.folder / s["labels"]) for s in self.index["shards"]])
        self.offsets = np.cumsum([0] + [len(a) for a in self.ids])
        if len(self.labels) == 0:
            raise TrainError(f"--tokens {folder} holds no images")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def rows(self, indices: np.ndarray, crop: np.ndarray) -> np.ndarray:
        """ids `[len(indices), Z+X]` of the chosen crop of each item."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.ids[0].shape[-1]), dtype=np.int64)
        for j, (s, i, c) in enumerate(zip(shard, indices, crop)):
            out[j] = self.ids[s][i - self.offsets[s], c]
        return out


