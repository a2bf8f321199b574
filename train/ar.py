"""Phase 3: the class-conditional AR on pretokenized ids (LlamaGen-style next-token CE).

Per sample and step: one of the stored crops is chosen, and the class is replaced by the null
class with probability `label_drop` (for CFG); both decisions come from
`sample_rng(seed, step, position)`, so they do not depend on the number of processes. The
checkpoint holds the tokenizer copied from the shard folder plus the AR's raw (non-EMA) weights,
which is what the release samples from; the EMA is saved beside it (`train_ema_ar.safetensors`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ar import ARModel
from ..checkpoint import load_checkpoint
from ..model import PrologueModel
from ..config import ModelConfig
from .data import StepBatchSampler, sample_rng
from ..sampling import sample, split_sequence, to_host
from ..tokenizer import images_to_uint8
from . import common
from .common import CHECKPOINT_DIR, EMA, TrainError
from .configs import ARTrainConfig
from .pretokenize import TokenShards


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
    out = Path(out)
    acc = common.make_accelerator(cfg.run)
    common.prepare_out_dir(out, resume, acc.is_main_process)
    acc.wait_for_everyone()
    main = acc.is_main_process
    run = cfg.run
    world, rank = acc.num_processes, acc.process_index
    if run.batch_size % (world * run.grad_accum):
        raise TrainError(f"run.batch_size {run.batch_size} must be divisible by processes x grad_accum "
                         f"({world} x {run.grad_accum})")
    micro_bs = run.batch_size // world // run.grad_accum
    shards = TokenShards(tokens)
    base = load_checkpoint(shards.tokenizer_dir)
    model_cfg = ModelConfig(num_classes=base.config.num_classes, tokenizer=base.config.tokenizer, ar=cfg.ar).validate()
    vocab = model_cfg.vocab()
    cfg_dict = dataclasses.asdict(cfg)

    torch.manual_seed(run.seed)
    ar = ARModel(cfg.ar, vocab, model_cfg.num_classes)
    device = acc.device
    ar.to(device)
    # AdamW, decay 0.03 with the release's exclusions (train_ar.py:611-632, `common.ar_no_decay`)
    optimizer = common.make_optimizer(ar.named_parameters(), cfg.optim, no_decay=common.ar_no_decay)
    ema = EMA(ar, cfg.ema_halflife)
    modules, optimizers, emas = {"ar": ar}, {"ar": optimizer}, {"ar": ema}
    ckpt_dir = out / CHECKPOINT_DIR
    start = common.start_or_resume(out, resume, main, cfg_dict, modules, optimizers, emas, "phase 3")
    if start >= run.steps:
        return ckpt_dir

    ar_fwd = acc.prepare(common.maybe_compile(ar, run.compile))
    sampler = StepBatchSampler(len(shards), run.batch_size, seed=run.seed, rank=rank, world_size=world,
                               start_step=start)
    report = common.Reporter(out, run, start, main, "ar", run.batch_size, "sequences")
    tokenizer = base.tokenizer.to(device).eval()
    try:
        for step in range(start, run.steps):
            seq, classes = batch_sequences(shards, sampler.batch(step), vocab, cfg.label_drop,
                                           model_cfg.null_class, run.seed)
            # scheduler every step, horizon run.steps (train_ar.py:636-646); lr(0) = 0 with a warm-up
            lr = common.lr_at(step, run.steps, cfg.optim)
            common.set_lr(optimizer, lr)
            ar_fwd.train()
            total = 0.0
            for i in range(run.grad_accum):
                micro = slice(i * micro_bs, (i + 1) * micro_bs)
                s, c = seq[micro].to(device), classes[micro].to(device)
                with common.no_sync_if(acc, [ar_fwd], i < run.grad_accum - 1), acc.autocast():
                    logits = ar_fwd(s, c)  # [b, T, V]
                    # token mean over all B*T positions = per-sample sum / T, batch mean (train_ar.py:259)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), s.flatten())
                    acc.backward(loss / run.grad_accum)
                total += float(loss.detach()) / run.grad_accum
            # if lr > 0: clip to 1.0 and step; zero_grad; EMA only if that pre-step lr > 0, so step 0
            # updates neither the weights nor the EMA (train_ar.py:261-276); no NaN/inf replacement
            grad_norm = common.clip_and_step(optimizer, list(ar.parameters()), cfg.optim.grad_clip, acc)
            optimizer.zero_grad(set_to_none=True)
            if lr > 0:
                ema.update(ar)
            done = step + 1
            report.step_done(done, {"ce": total, "lr": lr, "grad_norm": grad_norm}, "ce")
            if main and report.due(done, run.image_every):
                _sample_grid(ar, tokenizer, model_cfg, cfg, out / "images" / f"samples_step{done:07d}.png")
            if report.due(done, run.checkpoint_every):
                acc.wait_for_everyone()
                if main:
                    model = PrologueModel.from_parts(model_cfg, base.tokenizer, common.unwrap(ar))
                    common.save_training_checkpoint(out, model, done, cfg_dict, modules, optimizers, emas)
                acc.wait_for_everyone()
    finally:
        report.close()
    return ckpt_dir


@torch.no_grad()
def _sample_grid(ar: ARModel, tokenizer, model_cfg: ModelConfig, cfg: ARTrainConfig, path: Path) -> None:
    """One row per class (up to `sample_classes`), 8 samples each, with the raw AR (as the release).
    Sampling and decoding run on the models' devices; only the uint8 grid comes to the host."""
    was_training = ar.training
    ar.eval()
    n_classes = min(cfg.sample_classes, model_cfg.num_classes)
    classes = np.repeat(np.arange(n_classes), 8)
    tokens = sample(ar, classes, {"cfg": cfg.sample_cfg}, seed=0)  # on the AR's device
    _, visual = split_sequence(tokens, model_cfg.vocab())
    images = images_to_uint8(tokenizer.decode(visual.to(next(tokenizer.parameters()).device)))
    common.save_grid(torch.from_numpy(to_host(images)), path, nrow=8)
    ar.train(was_training)
