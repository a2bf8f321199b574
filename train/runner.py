"""The one phase runner of phases 1 and 3 (DESIGN.md §2): set-up, exact resume, the step loop with
its progress bar and metrics.jsonl, the image grids and the checkpoints.

`run_phase` does what every phase does, in this order: the accelerator and the run folder
(`common.make_accelerator`, `common.prepare_out_dir`), the phase's modules (a `Phase`, which checks
the batch layout and seeds torch before it builds them), the restored state on `--resume`
(`common.start_or_resume`, exact: see `train/common.py`), torch.compile and the DDP wrappers, then
one `Phase.train_step` per step with `common.Reporter` (progress bar, metrics.jsonl, the kill hook
of the resume tests), an image grid every `run.image_every` steps and a checkpoint
(`common.save_training_checkpoint`) every `run.checkpoint_every` steps and at the end. A phase
supplies only what differs: its modules, optimizers and EMAs, its data, one training step, its
grid and the inference model its checkpoint holds (`train/tokenizer.py`, `train/ar.py`).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import torch
from torch import nn

from . import common
from .common import CHECKPOINT_DIR, EMA, TrainError


class Phase:
    """What one training phase supplies to `run_phase`, for one process.

    The base checks that the global batch splits into processes x `grad_accum` micro-batches,
    keeps the process layout (`world`, `rank`, `micro_bs`, `device`) and seeds torch with
    `run.seed`; a subclass then builds its modules and fills `modules`, `optimizers` and `emas`
    (what a checkpoint saves and `--resume` restores, by name)."""

    name = "phase"  # messages: "[phase 1] ..."
    unit = "it"  # what a step's `run.batch_size` counts, for the progress bar and `<unit>_per_s`
    shown = "loss"  # the stat on the progress bar

    def __init__(self, cfg, acc, desc: str):
        self.cfg, self.acc, self.desc = cfg, acc, desc
        run = cfg.run
        self.world, self.rank = acc.num_processes, acc.process_index
        if run.batch_size % (self.world * run.grad_accum):
            raise TrainError(f"run.batch_size {run.batch_size} must be divisible by processes x grad_accum "
                             f"({self.world} x {run.grad_accum})")
        self.micro_bs = run.batch_size // self.world // run.grad_accum
        self.device = acc.device
        torch.manual_seed(run.seed)
        self.modules: typing.Dict[str, nn.Module] = {}
        self.optimizers: typing.Dict[str, torch.optim.Optimizer] = {}
        self.emas: typing.Dict[str, EMA] = {}

    def micro(self, i: int) -> slice:
        """This process's micro-batch `i` of its share of the step's batch."""
        return slice(i * self.micro_bs, (i + 1) * self.micro_bs)

    def prepare(self, module: nn.Module) -> nn.Module:
        """`module`'s forward as training runs it: torch.compile (`run.compile`) and DDP."""
        return self.acc.prepare(common.maybe_compile(module, self.cfg.run.compile))

    def wrap(self) -> None:
        """The forwards (`prepare`); called after the state is restored."""
        raise NotImplementedError

    def begin(self, start: int) -> None:
        """Open the data at step `start` (a resumed run continues the same order)."""
        raise NotImplementedError

    def train_step(self, step: int, log_due: bool) -> typing.Tuple[dict, typing.Optional[dict]]:
        """One step (`step` is 0-based); returns (stats for the log, more `{label: text}` for the
        bar or None). `log_due`: this step's stats go to metrics.jsonl."""
        raise NotImplementedError

    def save_images(self, folder: Path, done: int) -> None:
        """The grid after `done` steps, into `folder` (main process only)."""
        raise NotImplementedError

    def inference_model(self):
        """The `PrologueModel` the checkpoint holds (what `load_checkpoint` gives back)."""
        raise NotImplementedError

    def checkpoint_extra(self) -> typing.Optional[dict]:
        """More run state for `train_state.json` (`extra`)."""
        return None

    def finish(self) -> None:
        """After the last step (main and other processes)."""


def run_phase(cfg, out, resume: bool, build: typing.Callable[[typing.Any], Phase]) -> Path:
    """Run a training phase into the folder `out`; returns the checkpoint folder.

    `build(acc)` makes the phase (after the run folder is prepared; if it raises, the folders this
    run created are removed again). A run that already reached `run.steps` returns at once."""
    out = Path(out)
    created = common.folders_to_create(out)
    acc = common.make_accelerator(cfg.run)
    common.prepare_out_dir(out, resume, acc.is_main_process)
    acc.wait_for_everyone()
    main = acc.is_main_process
    cfg_dict = dataclasses.asdict(cfg)
    try:
        phase = build(acc)  # opens the data and the perceptual weights: a refusal leaves no run folder
    except BaseException:
        if main:
            common.remove_created(created)
        raise
    ckpt_dir = out / CHECKPOINT_DIR
    start = common.start_or_resume(out, resume, main, cfg_dict, phase.modules, phase.optimizers, phase.emas,
                                   phase.name)
    if start >= cfg.run.steps:
        if main:
            print(f"[{phase.name}] {out} already reached step {start} >= steps={cfg.run.steps}", file=sys.stderr,
                  flush=True)
        return ckpt_dir
    phase.wrap()
    phase.begin(start)
    _steps(phase, out, start, cfg_dict)
    phase.finish()
    return ckpt_dir


def _steps(phase: Phase, out: Path, start: int, cfg_dict: dict) -> None:
    """Steps `start` .. `run.steps - 1`: train, report, and at their cadences a grid and a checkpoint."""
    run, acc = phase.cfg.run, phase.acc
    main = acc.is_main_process
    report = common.Reporter(out, run, start, main, phase.desc, run.batch_size, phase.unit)
    try:
        for step in range(start, run.steps):
            done = step + 1
            stats, postfix = phase.train_step(step, log_due=report.due(done, run.log_every))
            report.step_done(done, stats, phase.shown, postfix=postfix)
            if main and report.due(done, run.image_every):
                phase.save_images(out / "images", done)
            if report.due(done, run.checkpoint_every):
                acc.wait_for_everyone()
                if main:
                    common.save_training_checkpoint(out, phase.inference_model(), done, cfg_dict, phase.modules,
                                                    phase.optimizers, phase.emas, extra=phase.checkpoint_extra())
                acc.wait_for_everyone()
    finally:
        report.close()
