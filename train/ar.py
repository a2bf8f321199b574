"""Phase 3: the class-conditional AR on pretokenized ids (LlamaGen-style next-token CE).

Per sample and step: one of the stored crops is chosen, and the class is replaced by the null
class with probability `label_drop` (for CFG); both decisions come from
`sample_rng(seed, step, position)`, so they do not depend on the number of processes. The
checkpoint holds the tokenizer copied from the shard folder plus the AR's raw (non-EMA) weights,
which is what the release samples from; the EMA is saved beside it (`train_ema_ar.safetensors`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ar import ARModel
from ..checkpoint import load_checkpoint
from ..model import PrologueModel
from ..config import ModelConfig
from .data import StepBatchSampler, sample_rng
from ..runtime.loop import split_tokens
from ..sampling import sample, to_host
from ..tokenizer import images_to_uint8
from . import common
from .common import EMA
from .configs import ARTrainConfig
from .pretokenize import TokenShards
from .runner import Phase, run_phase


def batch_sequences(shards: TokenShards, triples, vocab, label_drop: float, null_class: int, seed: int):
    """AR sequences `[b, T]` and classes `[b]` for this rank's `(index, step, position)` triples."""
    indices = np.array([t[0] for t in triples])
    crops = np.empty(len(triples), dtype=np.int64)
    classes = shards.labels[indices].copy()
    n_crops = shards.index["crops_per_image"]
    for j, (_, step, position) in enumerate(triples):
        rng = sample_rng(seed, step, position)
        crops[j] = rng.integers(n_crops)
        if rng.random() < label_drop:
            classes[j] = null_class
    ids = torch.from_numpy(shards.rows(indices, crops))  # [b, Z+X] raw prologue | visual
    Z = vocab.num_prologue_tokens
    if vocab.has_prologue:
        seq = torch.cat([ids[:, :Z] + vocab.prologue_offset, torch.full((len(ids), 1), vocab.eos_id), ids[:, Z:]], 1)
    else:
        seq = ids
    return seq, torch.from_numpy(classes)


def train_ar(cfg: ARTrainConfig, tokens, out, resume: bool = False) -> Path:
    """Run phase 3 into the folder `out`; returns the checkpoint folder."""
    return run_phase(cfg, out, resume, lambda acc: ARTrainer(cfg, acc, tokens))


class ARTrainer(Phase):
    """Phase 3 for one process: the AR on the shards' ids, its optimizer and EMA, one CE step."""

    name, unit, shown = "phase 3", "sequences", "ce"

    def __init__(self, cfg: ARTrainConfig, acc, tokens):
        super().__init__(cfg, acc, "ar")
        self.shards = TokenShards(tokens)
        self.base = load_checkpoint(self.shards.tokenizer_dir)
        self.model_cfg = ModelConfig(num_classes=self.base.config.num_classes, tokenizer=self.base.config.tokenizer,
                                     ar=cfg.ar).validate()
        self.vocab = self.model_cfg.vocab()
        self.ar = ARModel(cfg.ar, self.vocab, self.model_cfg.num_classes)
        self.ar.to(self.device)
        # AdamW, decay 0.03 with the release's exclusions (train_ar.py:611-632, `common.ar_no_decay`)
        optimizer = common.make_optimizer(self.ar.named_parameters(), cfg.optim, no_decay=common.ar_no_decay)
        self.modules, self.optimizers = {"ar": self.ar}, {"ar": optimizer}
        self.emas = {"ar": EMA(self.ar, cfg.ema_halflife)}

    def wrap(self) -> None:
        self.ar_fwd = self.prepare(self.ar)

    def begin(self, start: int) -> None:
        run = self.cfg.run
        self.sampler = StepBatchSampler(len(self.shards), run.batch_size, seed=run.seed, rank=self.rank,
                                        world_size=self.world, start_step=start)
        self.tokenizer = self.base.tokenizer.to(self.device).eval()

    def train_step(self, step: int, log_due: bool):
        cfg, run, acc = self.cfg, self.cfg.run, self.acc
        optimizer = self.optimizers["ar"]
        seq, classes = batch_sequences(self.shards, self.sampler.batch(step), self.vocab, cfg.label_drop,
                                       self.model_cfg.null_class, run.seed)
        # scheduler every step, horizon run.steps (train_ar.py:636-646); lr(0) = 0 with a warm-up
        lr = common.lr_at(step, run.steps, cfg.optim)
        common.set_lr(optimizer, lr)
        self.ar_fwd.train()
        total = 0.0
        for i in range(run.grad_accum):
            micro = self.micro(i)
            s, c = seq[micro].to(self.device), classes[micro].to(self.device)
            with common.no_sync_if(acc, [self.ar_fwd], i < run.grad_accum - 1), acc.autocast():
                logits = self.ar_fwd(s, c)  # [b, T, V]
                # token mean over all B*T positions = per-sample sum / T, batch mean (train_ar.py:259)
                loss = F.cross_entropy(logits.float().flatten(0, 1), s.flatten())
                acc.backward(loss / run.grad_accum)
            total += float(loss.detach()) / run.grad_accum
        # if lr > 0: clip to 1.0 and step; zero_grad; EMA only if that pre-step lr > 0, so step 0
        # updates neither the weights nor the EMA (train_ar.py:261-276); no NaN/inf replacement
        grad_norm = common.clip_and_step(optimizer, list(self.ar.parameters()), cfg.optim.grad_clip, acc)
        optimizer.zero_grad(set_to_none=True)
        if lr > 0:
            self.emas["ar"].update(self.ar)
        return {"ce": total, "lr": lr, "grad_norm": grad_norm}, None

    def save_images(self, folder: Path, done: int) -> None:
        _sample_grid(self.ar, self.tokenizer, self.model_cfg, self.cfg, folder / f"samples_step{done:07d}.png")

    def inference_model(self) -> PrologueModel:
        """The tokenizer copied from the shard folder and the AR's raw (non-EMA) weights."""
        return PrologueModel.from_parts(self.model_cfg, self.base.tokenizer, common.unwrap(self.ar))


@torch.no_grad()
def _sample_grid(ar: ARModel, tokenizer, model_cfg: ModelConfig, cfg: ARTrainConfig, path: Path) -> None:
    """One row per class (up to `sample_classes`), 8 samples each, with the raw AR (as the release).
    Sampling and decoding run on the models' devices; only the uint8 grid comes to the host."""
    was_training = ar.training
    ar.eval()
    n_classes = min(cfg.sample_classes, model_cfg.num_classes)
    classes = np.repeat(np.arange(n_classes), 8)
    tokens = sample(ar, classes, {"cfg": cfg.sample_cfg}, seed=0)  # on the AR's device
    _, visual = split_tokens(tokens, model_cfg.vocab())
    images = images_to_uint8(tokenizer.decode(visual.to(next(tokenizer.parameters()).device)))
    common.save_grid(torch.from_numpy(to_host(images)), path, nrow=8)
    ar.train(was_training)
