"""Phase 1: the tokenizer with the joint AR (DESIGN.md §1).

Each step alternates, on the same batch:
  A) tokenizer update (encoder, quantizers, decoder) on L1 (+L2) + perceptual + GAN generator
     + VQ + weighted CE of the frozen joint AR; the CE reaches the encoder only through the
     straight-through prologue one-hots;
  B) discriminator update (+LeCam, R1) on real vs detached reconstructions, and joint-AR update
     on the detached (hard) tokens.
For half the rows (`visual_input_dropout`) every visual *input* of the AR is EOS, in both A and
B, so the prologue alone must predict the image. Variants: `2d` (no prologue, no joint AR),
`post` (a trained 2d tokenizer frozen; a separate prologue encoder + joint AR trained).

Step counting: one of our steps (`run.steps`, `step` in metrics.jsonl and checkpoints) is one
A/B *pair*, i.e. two of the release's global steps (`g = 2 * step` is A, `2 * step + 1` is B;
utils.py:111-134, OFFICIAL_TRAINING §2.1). Every optimizer is called once per pair, so its own
call counter, which the release's schedulers count (train_tokenizer.py:392-395, :742-752), is our
step, and the scheduler horizon `total_global_steps / 2` is `run.steps`. The released 2M global
steps are therefore `run.steps = 1_000_000` (`train/configs.py`). A checkpoint always lands after
a whole pair, so nothing of step A has to be carried over to resume.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

from ..ar import ARModel
from ..checkpoint import load_checkpoint
from ..model import PrologueModel
from ..config import ModelConfig
from .data import fill_skipped, make_loader, open_dataset, to_model_input
from .losses import GANLoss, PerceptualLoss, PerceptualWeightsError, load_perceptual
from ..tokenizer import images_to_uint8
from . import common
from .common import EMA, TrainError
from .configs import TokenizerTrainConfig
from .runner import Phase, run_phase


def segment_ce(logits: torch.Tensor, seq: torch.Tensor, num_prologue: int):
    """The release's segment CE (train_tokenizer.py:663-690, :714-724; OFFICIAL_TRAINING §2.8):
    each sample's per-token CE *summed* over a segment and divided by the whole length
    `T = Z + 1 + X`, then the batch mean; full vocabulary, fp32 logits, no mask.

    Returns `(prologue + EOS term, visual term, per-token CE [B, T])`; the two terms add up to the
    token mean over all T positions (step B's AR loss, :663-690)."""
    B, T = seq.shape
    ce = F.cross_entropy(logits.float().flatten(0, 1), seq.flatten(), reduction="none").view(B, T)
    Z1 = num_prologue + 1
    return ce[:, :Z1].sum(1).mean() / T, ce[:, Z1:].sum(1).mean() / T, ce


def joint_ce(ar, vocab, prologue_ids, visual_ids, onehot, drop_rows, null_class):
    """Segment CE (`segment_ce`) of the unconditional joint AR on `[prologue ; EOS ; visual]`."""
    B = visual_ids.shape[0]
    seq = torch.cat([prologue_ids + vocab.prologue_offset,
                     torch.full((B, 1), vocab.eos_id, device=visual_ids.device), visual_ids], dim=1)  # [B, T]
    classes = torch.full((B,), null_class, device=visual_ids.device)
    logits = ar(seq, classes, prologue_onehot=onehot, drop_visual_inputs=drop_rows)  # [B, T, V]
    return segment_ce(logits, seq, vocab.num_prologue_tokens)


def _drop_rows(cfg, step: int, stream: int, rank: int, world: int, micro: slice, device) -> torch.Tensor:
    g = common.step_generator(cfg.run.seed, step, stream)
    rows = torch.rand(cfg.run.batch_size, generator=g) < cfg.visual_input_dropout  # [G] global
    return common.rank_slice(rows, rank, world)[micro].to(device)


class TokenizerTrainer(Phase):
    """Modules, optimizers, EMAs and the two alternating updates of phase 1 for one process.

    `dataset`: the images `run_phase` trains on (tests that call `step_a` / `step_b` directly
    pass none)."""

    name, unit, shown = "phase 1", "images", "l1"

    def __init__(self, cfg: TokenizerTrainConfig, acc, dataset=None):
        super().__init__(cfg, acc, f"tokenizer[{cfg.tokenizer.variant}]")
        tcfg, self.dataset = cfg.tokenizer, dataset
        self.model_cfg = ModelConfig(num_classes=cfg.num_classes, tokenizer=tcfg, ar=None).validate()
        self.vocab = self.model_cfg.vocab()
        self.tok = PrologueModel(self.model_cfg).tokenizer
        if tcfg.variant == "post":
            _load_frozen_2d(self.tok, cfg.init_from)
        self.joint = ARModel(cfg.joint_ar, self.vocab, cfg.num_classes) if cfg.joint_ar is not None else None
        self.gan = None
        if tcfg.variant != "post" and cfg.gan_weight > 0:
            g = cfg.gan
            self.gan = GANLoss(tcfg.channels, base_channels=g.base_channels, num_layers=g.num_layers, loss=g.loss,
                               lecam_weight=g.lecam_weight, r1_weight=g.r1_weight)
        self.perceptual = load_perceptual_loss(cfg)
        if self.perceptual is None and tcfg.variant != "post" and cfg.perceptual_weight > 0 and acc.is_main_process:
            why = ("perceptual_weights=none" if cfg.perceptual_weights else "no perceptual weights given "
                   "(perceptual_weights=PATH to a local LPIPS-VGG16 or ConvNeXt-S file, or none)")
            print(f"[phase 1] {why}: training without the perceptual loss", file=sys.stderr, flush=True)
        for m in (self.tok, self.joint, self.gan, self.perceptual):
            if m is not None:
                m.to(self.device)
        self.tok_params = [p for p in self.tok.parameters() if p.requires_grad]
        # encoder/decoder: one group, wd 0 (train_tokenizer.py:286, 309); joint AR: decay / no-decay
        # groups (:287-306, `common.ar_no_decay`); discriminator: wd 1e-4 on every parameter (:310)
        self.optimizers = {"tokenizer": common.make_optimizer(
            [(n, p) for n, p in self.tok.named_parameters() if p.requires_grad], cfg.optim_tokenizer)}
        self.modules: typing.Dict[str, torch.nn.Module] = {"tokenizer": self.tok}
        # EMA half-lives: encoder/decoder 1000, joint AR 2500 updates (default.yaml:71-72)
        self.emas = {"tokenizer": EMA(self.tok, cfg.ema_halflife)}
        if self.joint is not None:
            self.optimizers["joint_ar"] = common.make_optimizer(self.joint.named_parameters(), cfg.optim_ar,
                                                                no_decay=common.ar_no_decay)
            self.modules["joint_ar"] = self.joint
            self.emas["joint_ar"] = EMA(self.joint, cfg.ar_ema_halflife)
        if self.gan is not None:
            self.optimizers["disc"] = common.make_optimizer(self.gan.named_parameters(), cfg.optim_disc)
            self.modules["gan"] = self.gan
        self._kept: list = []
        K_v = self.model_cfg.tokenizer.visual_codebook_size
        K_p = self.model_cfg.tokenizer.prologue_codebook_size if self.model_cfg.tokenizer.has_prologue else 0
        self.codebook_sizes = {"visual": K_v, **({"prologue": K_p} if K_p else {})}
        self._window = {k: torch.zeros(n, dtype=torch.long) for k, n in self.codebook_sizes.items()}
        self._step_hist: typing.Dict[str, torch.Tensor] = {}

    def wrap(self) -> None:
        """torch.compile (optional) and DDP wrappers for the forwards; call after restoring state."""
        self.tok_fwd = self.prepare(self.tok)
        self.joint_fwd = self.prepare(self.joint) if self.joint is not None else None
        if self.gan is not None:
            self.gan.discriminator = self.acc.prepare(self.gan.discriminator)
            if self.world > 1:  # the release's buffers come from rank 0 at every loss forward (GANLoss.sync_buffers)
                self.gan.sync_buffers = common.broadcast_from_main
        self.synced = [m for m in (self.tok_fwd, self.joint_fwd, self.gan.discriminator if self.gan else None)
                       if m is not None]

    def set_lr(self, step: int) -> float:
        """Each optimizer's lr at its own call counter (= our pair step, see the module doc);
        horizon `run.steps` = the release's `total_global_steps / 2` (train_tokenizer.py:392-395)."""
        names = {"tokenizer": "optim_tokenizer", "joint_ar": "optim_ar", "disc": "optim_disc"}
        lrs = {n: common.lr_at(step, self.cfg.run.steps, getattr(self.cfg, names[n])) for n in self.optimizers}
        for n, opt in self.optimizers.items():
            common.set_lr(opt, lrs[n])
        return lrs["tokenizer"]

    def gan_on(self, step: int) -> bool:
        return self.gan is not None and step >= self.cfg.gan_start

    def step_a(self, images: torch.Tensor, step: int) -> dict:
        """Update the tokenizer; the joint AR and discriminator only pass gradients through."""
        cfg, run, acc = self.cfg, self.cfg.run, self.acc
        stats: typing.Dict[str, float] = {}
        self._kept = []
        for i in range(run.grad_accum):
            micro = self.micro(i)
            x = to_model_input(images[micro], self.device)  # [b, C, H, W] in [-1, 1]
            with common.no_sync_if(acc, self.synced, i < run.grad_accum - 1), acc.autocast():
                outs = self.tok_fwd(x)
                rec = outs["reconstruction"].float()
                parts = {"l1": (rec - x).abs().mean(), "vq": outs["vq_loss"]}
                loss = cfg.l1_weight * parts["l1"] + cfg.vq_weight * parts["vq"]
                if cfg.l2_weight:
                    parts["l2"] = (rec - x).square().mean()
                    loss = loss + cfg.l2_weight * parts["l2"]
                if self.perceptual is not None:
                    parts["perceptual"] = self.perceptual(rec, x).mean()
                    loss = loss + cfg.perceptual_weight * parts["perceptual"]
                if self.gan_on(step):
                    parts["gan_g"] = self.gan.generator_loss(rec)
                    loss = loss + cfg.gan_weight * parts["gan_g"]
                if self.joint is not None:
                    drop = _drop_rows(cfg, step, 1, self.rank, self.world, micro, self.device)
                    ce_p, ce_v, ce = joint_ce(self.joint_fwd, self.vocab, outs["prologue_ids"], outs["visual_ids"],
                                              outs["prologue_onehot"], drop, cfg.num_classes)
                    # prior->encoder: 3 (prologue + EOS) + 3 visual, each sum/T (train_tokenizer.py:714-731)
                    parts["prior_enc"] = cfg.ce_weight_prologue * ce_p + cfg.ce_weight_visual * ce_v
                    loss = loss + parts["prior_enc"]
                    Z1 = self.vocab.num_prologue_tokens + 1  # logged: per-token means, for reading
                    parts["ce_prologue"], parts["ce_visual"] = ce[:, :Z1].mean(), ce[:, Z1:].mean()
                acc.backward(loss / run.grad_accum)
            _accumulate(stats, parts, run.grad_accum)
            self._count_codes(outs, i == 0)
            self._kept.append((x, rec.detach(), outs.get("prologue_ids"), outs["visual_ids"].detach(), micro))
        stats["grad_norm_tokenizer"] = common.clip_and_step(
            self.optimizers["tokenizer"], self.tok_params, cfg.optim_tokenizer.grad_clip, acc, fix_nonfinite=True)
        for opt in self.optimizers.values():  # AR / discriminator gradients of step A are discarded
            opt.zero_grad(set_to_none=True)
        return stats

    def step_b(self, step: int) -> dict:
        """Update the discriminator (real vs detached reconstructions) and the joint AR (hard tokens)."""
        cfg, run, acc = self.cfg, self.cfg.run, self.acc
        stats: typing.Dict[str, float] = {}
        gan_on = self.gan_on(step)
        if not gan_on and self.joint is None:
            return stats
        for i, (x, rec, prologue_ids, visual_ids, micro) in enumerate(self._kept):
            with common.no_sync_if(acc, self.synced, i < run.grad_accum - 1), acc.autocast():
                loss = torch.zeros((), device=self.device)
                parts = {}
                if gan_on:
                    d = self.gan.discriminator_loss(x, rec, new_update=(i == 0))  # one R1 decision per update
                    parts.update({k: d[k] for k in ("d_loss", "lecam", "r1", "logits_real", "logits_fake")})
                    loss = loss + d["loss"]
                if self.joint is not None:
                    drop = _drop_rows(cfg, step, 2, self.rank, self.world, micro, self.device)
                    ce_p, ce_v, _ = joint_ce(self.joint_fwd, self.vocab, prologue_ids.detach(), visual_ids, None,
                                             drop, cfg.num_classes)
                    parts["ar_ce"] = ce_p + ce_v  # token mean over all T positions, weight 1 (:663-690)
                    loss = loss + parts["ar_ce"]
                acc.backward(loss / run.grad_accum)
            _accumulate(stats, parts, run.grad_accum)
        if gan_on:
            stats["grad_norm_disc"] = common.clip_and_step(
                self.optimizers["disc"], list(self.gan.parameters()), cfg.optim_disc.grad_clip, acc, fix_nonfinite=True)
        if self.joint is not None:
            stats["grad_norm_joint_ar"] = common.clip_and_step(
                self.optimizers["joint_ar"], list(self.joint.parameters()), cfg.optim_ar.grad_clip, acc,
                fix_nonfinite=True)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._kept = []
        return stats

    def update_emas(self) -> None:
        """After every pair, also the first (skipped) one: the release tests the lr *after* the
        scheduler step in phase 1 (train_tokenizer.py:755-761), so its EMAs update every A / B step."""
        for name, ema in self.emas.items():
            ema.update(self.modules[name])

    def begin(self, start: int) -> None:
        run, tcfg = self.cfg.run, self.cfg.tokenizer
        loader = make_loader(self.dataset, run.batch_size, seed=run.seed, rank=self.rank, world_size=self.world,
                             start_step=start, num_workers=run.num_workers, image_size=tcfg.image_size,
                             channels=tcfg.channels)
        self.skipped_total, self._batches = 0, iter(loader)

    def train_step(self, step: int, log_due: bool):
        """One A/B pair on the next batch (unreadable images replaced, `fill_skipped`); the bar shows
        the codes used of the prologue codebook (the visual one for `2d`)."""
        batch = next(self._batches)
        self.skipped_total += batch["skipped"]
        images, _ = fill_skipped(batch["images"], batch["labels"], self.cfg.run.batch_size // self.world)
        lr = self.set_lr(step)
        stats = self.step_a(images, step)
        stats.update(self.step_b(step))
        self.update_emas()
        stats.update(self.code_stats(window_end=log_due))
        book = "prologue" if "prologue" in self.codebook_sizes else "visual"
        codes = {f"{book[0]}_codes": f"{stats[f'{book}_used']}/{self.codebook_sizes[book]}"}
        self._shown_images = images[:8]
        return {**stats, "lr": lr, "skipped_total": self.skipped_total}, codes

    def save_images(self, folder: Path, done: int) -> None:
        _recon_grid(self.emas["tokenizer"], self.model_cfg, self._shown_images, folder / f"recon_step{done:07d}.png",
                    self.device)

    def inference_model(self) -> PrologueModel:
        return _inference_model(self.model_cfg, self.emas["tokenizer"])

    def checkpoint_extra(self) -> dict:
        return {"skipped_total": self.skipped_total}

    def finish(self) -> None:
        if self.acc.is_main_process and self.skipped_total:
            print(f"[phase 1] skipped {self.skipped_total} unreadable images", file=sys.stderr, flush=True)

    @torch.no_grad()
    def _count_codes(self, outs: dict, first_micro: bool) -> None:
        """Histogram of this step's code ids per codebook (all micro-batches)."""
        if first_micro:
            self._step_hist = {}
        for name, K in self.codebook_sizes.items():
            ids = outs.get(f"{name}_ids")
            if ids is None:
                continue
            h = torch.bincount(ids.detach().flatten().long(), minlength=K)[:K].cpu()
            self._step_hist[name] = self._step_hist.get(name, 0) + h

    @torch.no_grad()
    def code_stats(self, window_end: bool) -> dict:
        """Codebook usage: `<book>_used` (codes used of K in the step's global batch), `<book>_ppl`
        (perplexity, exp of the entropy of the code histogram), and over the log window
        (`<book>_used_window`, `<book>_ppl_window`, when `window_end`; then the window restarts).
        Logging only: it does not touch the run's state, so resume stays exact."""
        stats = {}
        for name, hist in self._step_hist.items():
            if self.world > 1:
                hist = self.acc.reduce(hist.to(self.device), reduction="sum").cpu()
            self._window[name] += hist
            stats[f"{name}_used"], stats[f"{name}_ppl"] = common.code_usage(hist)
            if window_end:
                stats[f"{name}_used_window"], stats[f"{name}_ppl_window"] = common.code_usage(self._window[name])
                self._window[name].zero_()
        return stats


def train_tokenizer(cfg: TokenizerTrainConfig, data: typing.Optional[str], out, resume: bool = False) -> Path:
    """Run phase 1 into the folder `out`; returns the checkpoint folder."""
    def build(acc) -> TokenizerTrainer:
        tcfg = cfg.tokenizer
        dataset = open_dataset(data, tcfg.image_size, tcfg.channels, cfg.num_classes)
        if dataset.num_classes > cfg.num_classes:
            raise TrainError(f"the data set has {dataset.num_classes} classes but num_classes={cfg.num_classes}: "
                             f"pass num_classes={dataset.num_classes}")
        return TokenizerTrainer(cfg, acc, dataset)

    return run_phase(cfg, out, resume, build)


def _accumulate(stats: dict, parts: dict, n: int) -> None:
    for k, v in parts.items():
        stats[k] = stats.get(k, 0.0) + float(v.detach()) / n


def _inference_model(model_cfg: ModelConfig, ema: EMA) -> PrologueModel:
    """The checkpoint's model: the EMA tokenizer (what the release reconstructs and tokenizes with)."""
    with torch.device("meta"):
        model = PrologueModel(model_cfg)
    model.tokenizer.load_state_dict({k: v.detach().cpu() for k, v in ema.shadow.items()}, strict=True, assign=True)
    return model


@torch.no_grad()
def _recon_grid(ema: EMA, model_cfg: ModelConfig, images_u8: torch.Tensor, path: Path, device) -> None:
    model = _inference_model(model_cfg, ema).to(device).eval()
    x = to_model_input(images_u8, device)
    _, visual_ids = model.tokenizer.encode(x)
    rec = images_to_uint8(model.tokenizer.decode(visual_ids)).cpu()
    common.save_grid(torch.cat([images_u8.cpu(), rec]), path, nrow=images_u8.shape[0])


def load_perceptual_loss(cfg: TokenizerTrainConfig):
    """Phase 1's perceptual loss, or None when `cfg` turns it off (`TokenizerTrainConfig.perceptual_file`).

    VGG16 weights must carry the LPIPS heads (`lin0..4.model.1.weight`): without them
    `PerceptualLoss` is a plain channel-normalised VGG distance, not the release's LPIPS
    (OFFICIAL_TRAINING.md:226-232), so they are refused here."""
    path = cfg.perceptual_file()
    if path is None:
        return None
    loss = load_perceptual(path)
    if isinstance(loss, PerceptualLoss) and not loss.has_lpips_weights:
        raise PerceptualWeightsError(
            f"{path}: VGG16 weights without the LPIPS heads (lin0..lin4.model.1.weight), which the LPIPS loss needs: "
            "add the heads of LPIPS vgg.pth (recipe in train/losses.py), give a ConvNeXt-S file, or "
            "perceptual_weights=none")
    return loss


def _load_frozen_2d(tok, init_from: typing.Optional[str]) -> None:
    """`post`: copy a trained 2d tokenizer's encoder, visual quantizer and decoder; freeze them."""
    if not init_from or init_from == "REQUIRED":
        raise TrainError("variant 'post' needs init_from=PATH: the checkpoint of a trained 2d tokenizer "
                         "(phase 1 with the 2d variant)")
    base = load_checkpoint(init_from).tokenizer
    if base.cfg.variant != "2d":
        raise TrainError(f"init_from {init_from} is a '{base.cfg.variant}' tokenizer; 'post' needs a '2d' one")
    for name in ("encoder", "visual_quantizer", "decoder"):
        mine, theirs = getattr(tok, name), getattr(base, name)
        try:
            mine.load_state_dict(theirs.state_dict(), strict=True)
        except RuntimeError as exc:
            raise TrainError(f"init_from {init_from}: its {name} does not fit this config ({exc})") from None
        mine.requires_grad_(False)


