"""What the three training phases share: accelerate set-up, schedules, EMA, exact-resume
training state (safetensors + JSON, no pickle), metrics log, progress bar, image grids.

Exact resume: every piece of randomness is either derived from `(seed, step, ...)` (data order,
augmentation, label drop, visual-input dropout) or restored from the checkpoint (torch RNG for
dropout and discriminator augmentation), and optimizer, EMA, discriminator statistics and the
step are saved with the weights. A run killed at any point resumes from its last checkpoint
and ends with the same weights as an uninterrupted run (CPU, deterministic kernels).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, read_tensors, recover_interrupted, save_checkpoint
from ..config import migrate_tokenizer
from ..model import unwrap
from ..runtime.errors import PrologueError
from ..runtime.files import FileFormatError, read_json, write_json_atomic, write_text_atomic
from ..runtime.images import grid, save_png

STATE_FILE = "train_state.json"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
MAX_STEP = 10**12
DAMAGED_HINT = "delete the run folder (or start a new --out) or restore the checkpoint from a backup"


class TrainError(PrologueError, RuntimeError):
    """A training run that cannot start or continue as asked; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# processes, devices, precision


def make_accelerator(run, log_with=None):
    """An `accelerate.Accelerator` (DDP under `accelerate launch`; CPU when there is no GPU)."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:  # pragma: no cover - the train extra installs it
        raise TrainError("training needs accelerate: pip install 'prologue-export[train]'") from None
    cuda = torch.cuda.is_available()
    precision = run.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision != "no" and not cuda:
        precision = "no"  # autocast on CPU would change numerics for no gain here
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(cpu=not cuda, mixed_precision=precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def broadcast_from_main(tensors: typing.Sequence[torch.Tensor]) -> None:
    """Overwrite `tensors` (in place) with the main process's values (torch.distributed, rank 0)."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)


def end_distributed(ok: bool) -> None:
    """Leave the torch.distributed process group, if this process joined one, before exit.

    A process that exits with its gloo group still alive can abort in the group's destructor
    ("terminate called without an active exception", SIGABRT: seen under load in CI, about 1 run in
    12 here); torch asks every process to call `destroy_process_group` before it exits. `ok`: the
    command finished, so first wait for the others (a failed process does not wait: its peers may be
    gone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(module) if enabled else module


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A torch generator that depends only on (seed, step, stream): process-count independent."""
    mixed = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(mixed[0] % (2**63)))


def rank_slice(global_tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = global_tensor.shape[0] // world
    return global_tensor[rank * n:(rank + 1) * n]


# ---------------------------------------------------------------------------------------------
# schedules and EMA


def lr_at(k: int, total: int, opt) -> float:
    """The release's `get_linear_schedule_with_warmup_peak` (utils.py:141-163; OFFICIAL_TRAINING
    §2.12) at the optimizer's own call counter `k` (0-based): `lr * k / W` for `k < W`, `lr` for
    `W <= k < W + P`, then linear to `lr_min` at `k = N` (`N = total`, the number of calls of this
    optimizer; the last call, `k = N - 1`, is one decay step above `lr_min`). `lambda(0) = 0` when
    there is a warm-up, so the first call runs at lr 0, and a call at lr 0 is skipped
    (`clip_and_step`; train_tokenizer.py:742-752, train_ar.py:261-276)."""
    W, P = opt.warmup_steps, opt.flat_steps
    if W and k < W:
        return opt.lr * k / W
    if k < W + P or total <= W + P:
        return opt.lr
    frac = min(1.0, (k - W - P) / (total - W - P))
    return opt.lr_min + (opt.lr - opt.lr_min) * (1.0 - frac)


def ar_no_decay(name: str, param: torch.Tensor) -> bool:
    """The AR optimizers' no-decay rule (train_tokenizer.py:288-296, train_ar.py:612-622;
    OFFICIAL_TRAINING §2.11): 1-D parameters and every name containing `bias`, `norm` or `adaln`
    (so adaLN affine *matrices* and `out_norm.affine` are excluded; gates, embeddings and the
    output layer are decayed). `embedding_nowd` is False in every released config."""
    return param.dim() < 2 or any(s in name for s in ("bias", "norm", "adaln"))


def make_optimizer(named_params, opt, no_decay: typing.Optional[typing.Callable[[str, torch.Tensor], bool]] = None
                   ) -> torch.optim.Optimizer:
    """AdamW (eps 1e-8, decoupled decay) over `(name, parameter)` pairs that require grad.

    no_decay None: one group decayed by `opt.weight_decay` (the release's encoder/decoder, wd 0,
    and discriminator, wd 1e-4 on every parameter: train_tokenizer.py:286, 309, 310); a rule
    `(name, p) -> bool` (e.g. `ar_no_decay`): a decay group and a no-decay group (wd 0)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if no_decay is None:
        groups = [{"params": [p for _, p in named], "weight_decay": opt.weight_decay}]
    else:
        groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": opt.weight_decay},
                  {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, betas=tuple(opt.betas), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    """`max(group lr)`, what the release tests before stepping (train_tokenizer.py:736-761)."""
    return max(group["lr"] for group in optimizer.param_groups)


def clip_and_step(optimizer, params, grad_clip: float, accelerator, fix_nonfinite: bool = False) -> float:
    """One optimizer call as the release makes it (train_tokenizer.py:736-761, train_ar.py:261-276):
    if the lr is 0 (the first call of every warm-up, §2.12) the gradients are not applied; else
    (phase 1: `fix_nonfinite`, NaN -> 0, +-inf -> +-1e5, utils.py:1021-1029) (clip) and step.
    The caller zeroes the gradients either way. Returns the global gradient norm (before clipping)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return float("nan")
    stepping = optimizer_lr(optimizer) > 0
    if stepping and fix_nonfinite:
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    if stepping and grad_clip > 0:
        norm = float(accelerator.clip_grad_norm_(params, grad_clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
    if stepping:
        optimizer.step()
    return norm


def code_usage(hist: torch.Tensor) -> typing.Tuple[int, float]:
    """(codes used, perplexity = exp(entropy of the code histogram)) of a count histogram `[K]`;
    both lie in [1, K] for a non-empty histogram."""
    hist = hist.double()
    total = float(hist.sum())
    if total <= 0:
        return 0, 0.0
    p = hist[hist > 0] / total
    return int((hist > 0).sum()), float(torch.exp(-(p * p.log()).sum()))


class EMA:
    """Exponential moving average of a module's floating state, decay `0.5 ** (1 / half_life)`
    per update (train_tokenizer.py:240-241, utils.py:965-971). The release averages parameters
    only; our tokenizer and AR have no persistent floating buffers, so the state dict is exactly
    the parameters. The shadow starts as a copy of the initial weights (train_tokenizer.py:242-244,
    train_ar.py:551-560)."""

    def __init__(self, module: nn.Module, halflife: float):
        self.decay = 0.5 ** (1.0 / halflife) if halflife > 0 else 0.0
        self.shadow = {k: v.detach().clone() for k, v in unwrap(module).state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in unwrap(module).state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> nn.Module:
        unwrap(module).load_state_dict(self.shadow, strict=True)
        return module


# ---------------------------------------------------------------------------------------------
# training state: weights + optimizers + EMA + RNG, as safetensors and JSON


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> typing.Tuple[dict, dict]:
    """(tensors, json) for an optimizer state dict, without pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: typing.Dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    _check_optimizer_state(optimizer, state)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: typing.Dict[int, dict]) -> None:
    """torch accepts a partial or misshaped optimizer state; a damaged file must not pass."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {frozenset(entry) for entry in state.values()}
    if len(names) > 1:
        raise CheckpointError("optimizer state entries differ in their fields (a tensor is missing)")
    if state and set(state) != set(range(len(params))):
        raise CheckpointError(f"optimizer state covers {len(state)} of {len(params)} parameters")
    for idx, entry in state.items():
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[idx].shape:
                raise CheckpointError(f"optimizer state {idx}.{name} has shape {list(value.shape)}, "
                                      f"the parameter {list(params[idx].shape)}")


def rng_to_files() -> typing.Tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def rng_from_files(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def save_training_checkpoint(
    out_dir: Path,
    model,
    step: int,
    train_config: dict,
    modules: typing.Dict[str, nn.Module],
    optimizers: typing.Dict[str, torch.optim.Optimizer],
    emas: typing.Dict[str, EMA],
    extra: typing.Optional[dict] = None,
) -> Path:
    """Write `out_dir/checkpoint` atomically: the inference model (loadable by
    `load_checkpoint`) plus `train_*.safetensors` and `train_state.json` for `--resume`."""
    files: typing.Dict[str, dict] = {}
    for name, module in modules.items():
        files[f"train_{name}"] = unwrap(module).state_dict()
    meta: typing.Dict[str, typing.Any] = {"step": step, "config": train_config, "optimizers": {}, "extra": extra or {}}
    for name, opt in optimizers.items():
        tensors, opt_meta = optimizer_to_files(opt)
        files[f"train_optim_{name}"] = tensors
        meta["optimizers"][name] = opt_meta
    for name, ema in emas.items():
        files[f"train_ema_{name}"] = ema.shadow
    rng_tensors, meta["rng"] = rng_to_files()
    files["train_rng"] = rng_tensors
    return save_checkpoint(model, out_dir / CHECKPOINT_DIR, extra_files=files,
                           extra_json={STATE_FILE: meta}, _test_hook=_kill_hook(step))


def load_training_state(ckpt_dir: Path) -> dict:
    """`train_state.json` of a checkpoint, its shape checked; a one-line TrainError otherwise."""
    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file():
        raise TrainError(f"{ckpt_dir} has no {STATE_FILE}: not a resumable training checkpoint; {DAMAGED_HINT}")
    try:
        meta = read_json(state_file, str(state_file))
    except FileFormatError as exc:
        raise TrainError(f"cannot resume: {exc}; {DAMAGED_HINT}") from None
    problem = _state_problem(meta)
    if problem:
        raise TrainError(f"cannot resume: {state_file} is damaged ({problem}); {DAMAGED_HINT}")
    return meta


def _state_problem(meta: dict) -> typing.Optional[str]:
    """What is wrong with the shape of a parsed `train_state.json`, or None."""
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        return f"'step' must be an integer in [0, {MAX_STEP}], got {step!r}"
    for key in ("config", "optimizers", "extra", "rng"):
        if not isinstance(meta.get(key), dict):
            return f"'{key}' must be an object, got {type(meta.get(key)).__name__}"
    for name, opt in meta["optimizers"].items():
        if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                and isinstance(opt.get("scalars"), dict)):
            return f"'optimizers.{name}' must hold 'param_groups' (a list) and 'scalars' (an object)"
    rng = meta["rng"]
    if not (isinstance(rng.get("python"), list) and len(rng["python"]) == 3 and isinstance(rng["python"][1], list)):
        return "'rng.python' must be [version, state, gauss]"
    if not (isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5 and isinstance(rng["numpy"][1], list)):
        return "'rng.numpy' must be [name, keys, pos, has_gauss, gauss]"
    return None


def restore_training_state(
    ckpt_dir: Path,
    meta: dict,
    modules: typing.Dict[str, nn.Module],
    optimizers: typing.Dict[str, torch.optim.Optimizer],
    emas: typing.Dict[str, EMA],
) -> None:
    """Load weights, optimizers, EMAs and RNG; a damaged or mismatched file is a one-line TrainError."""
    try:
        for name, module in modules.items():
            unwrap(module).load_state_dict(read_tensors(ckpt_dir / f"train_{name}.safetensors"), strict=True)
        for name, opt in optimizers.items():
            if name not in meta["optimizers"]:
                raise CheckpointError(f"{STATE_FILE} has no state for optimizer '{name}'")
            optimizer_from_files(opt, read_tensors(ckpt_dir / f"train_optim_{name}.safetensors"),
                                 meta["optimizers"][name])
        for name, ema in emas.items():
            shadow = read_tensors(ckpt_dir / f"train_ema_{name}.safetensors")
            if shadow.keys() != ema.shadow.keys() or any(shadow[k].shape != v.shape for k, v in ema.shadow.items()):
                raise CheckpointError(f"EMA '{name}' in {ckpt_dir} does not match the model")
            ema.shadow = shadow
        rng_from_files(read_tensors(ckpt_dir / "train_rng.safetensors"), meta["rng"])
    except (CheckpointError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError) as exc:
        detail = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise TrainError(f"cannot resume from {ckpt_dir}: damaged training checkpoint ({detail}); "
                         f"{DAMAGED_HINT}") from None


def start_or_resume(out: Path, resume: bool, main: bool, cfg_dict: dict, modules, optimizers, emas, phase: str) -> int:
    """Restore the run's state when resuming (returns its step), else record the config (step 0).

    `--resume` in a folder without a checkpoint (a run killed before its first one) starts
    from scratch, as does a plain start there (`prepare_out_dir`); either way the old metrics
    log is emptied. On resume the log is cut back to the checkpoint's step (`trim_metrics`)."""
    ckpt_dir = out / CHECKPOINT_DIR
    if resume and not ckpt_dir.exists():
        if main:
            print(f"[{phase}] --resume: no checkpoint in {out} yet (the run stopped before its first one): "
                  "starting from scratch", file=sys.stderr, flush=True)
        resume = False
    if not resume:
        if main:
            write_json_atomic(out / CONFIG_FILE, cfg_dict, "training config", indent=2)
            if (out / METRICS_FILE).exists():
                write_text_atomic(out / METRICS_FILE, "", "metrics log")
        return 0
    meta = load_training_state(ckpt_dir)
    check_resume_config(meta["config"], cfg_dict, ckpt_dir)
    restore_training_state(ckpt_dir, meta, modules, optimizers, emas)
    if main:
        trim_metrics(out / METRICS_FILE, meta["step"])
        print(f"[{phase}] resuming {out} at step {meta['step']}", file=sys.stderr, flush=True)
    return meta["step"]


def trim_metrics(path: Path, step: int) -> int:
    """Keep the log lines of steps <= `step` (what a resumed run would otherwise log twice) and
    drop torn or foreign lines; rewritten atomically (`write_text_atomic`). Returns the number of
    lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            logged = record.get("step") if isinstance(record, dict) else None
            if isinstance(logged, int) and not isinstance(logged, bool) and logged <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept), "metrics log")
    return dropped


def check_resume_config(saved: dict, current: dict, where: Path) -> None:
    """Resuming needs the same model and recipe; run length, logging and I/O may change. A run saved
    before the tokenizer key's rename (`migrate_tokenizer`) resumes under the new name."""
    if isinstance(saved, dict) and "tokenizer" in saved:
        saved = {**saved, "tokenizer": migrate_tokenizer(saved["tokenizer"])}
    free = {"run"}  # steps, log/checkpoint cadence, workers, compile may differ on resume
    clashes = [k for k in sorted(set(saved) | set(current))
               if k not in free and saved.get(k) != current.get(k)]
    run_keys = ("batch_size", "grad_accum", "seed")
    clashes += [f"run.{k}" for k in run_keys if saved.get("run", {}).get(k) != current.get("run", {}).get(k)]
    if clashes:
        raise TrainError(f"--resume: {where} was trained with another config (differs in: {', '.join(clashes)}); "
                         "resume with the same config, or start a new --out folder")


# ---------------------------------------------------------------------------------------------
# logging, progress, pictures


class MetricsLog:
    """JSON-lines metrics (main process only); appends, so a resumed run continues its log."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.fh = open(path, "a", buffering=1) if enabled else None

    def write(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def progress(total: int, initial: int, enabled: bool, desc: str, unit: str = "it"):
    """A tqdm bar on a terminal; where stderr is a pipe or a log file, `LineProgress` instead
    (tqdm redraws with carriage returns, which a log keeps as one long line of updates)."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial, desc, unit)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0, unit=unit)


class LineProgress:
    """Progress for logs: one plain line each time another tenth of the work is done (the
    tqdm calls the training loops make: `update`, `set_postfix`, `n`, `refresh`, `close`)."""

    PARTS = 10

    def __init__(self, total: int, initial: int, desc: str, unit: str = "it", file=None):
        self.total, self.n, self.desc, self.unit = max(1, int(total)), int(initial), desc, unit
        self.file = file if file is not None else sys.stderr
        self.postfix, self.t0, self.n0 = "", time.perf_counter(), int(initial)
        self.shown = self._part()

    def _part(self) -> int:
        return min(self.PARTS, self.n * self.PARTS // self.total)

    def update(self, k: int = 1) -> None:
        self.n += int(k)
        self.refresh()

    def set_postfix(self, values: dict, refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self) -> None:
        if self._part() > self.shown:
            self.shown = self._part()
            elapsed = time.perf_counter() - self.t0
            rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0
            extra = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%), {elapsed:.0f} s, "
                  f"{rate:.3g} {self.unit}/s{extra}", file=self.file, flush=True)

    def close(self) -> None:
        pass


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """uint8 `[N, C, H, W]` -> one PNG grid with `nrow` images per row (1-pixel gaps), written
    atomically: the runtime's `grid` and `save_png`."""
    return save_png(grid(images.cpu().permute(0, 2, 3, 1).numpy(), nrow), path)


def prepare_out_dir(out: Path, resume: bool, is_main: bool) -> None:
    """Create the run folder; refuse to reuse one that holds a run unless --resume, and `--resume`
    where there is no run (a missing or empty folder).

    A folder left by a run killed before its first checkpoint (only `partial_run_files`) is
    not a run to protect: a plain start there starts over, and so does `--resume`
    (`start_or_resume`, which says so). Only the main process checks and creates it (the others
    would race with its first files); callers synchronise with `wait_for_everyone()` afterwards.
    `folders_to_create` / `remove_created` take it away again if the run is refused before it
    starts (bad data, bad perceptual weights)."""
    if not is_main:
        return
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a folder")
    ckpt = out / CHECKPOINT_DIR
    if out.is_dir():
        recover_interrupted(ckpt)  # a save killed between its two renames: put the checkpoint back
    if resume:
        if not out.is_dir():
            raise TrainError(f"--resume: no checkpoint in {out} (the folder does not exist); "
                             "run without --resume to start a new run there")
        if not any(out.iterdir()):
            raise TrainError(f"--resume: {out} is empty: there is no run to resume; "
                             "run without --resume to start a new run there")
        if ckpt.exists() and not (ckpt / STATE_FILE).is_file():
            raise TrainError(f"--resume: {ckpt} has no {STATE_FILE}: the checkpoint is damaged; {DAMAGED_HINT}")
        return
    if out.exists() and any(out.iterdir()) and not partial_run_files(out):
        if ckpt.exists():
            raise TrainError(f"--out {out} already holds files of a run with a checkpoint; pass --resume to continue it, "
                             "or choose a new folder")
        raise TrainError(f"--out {out} already holds files; pass --resume to continue that run or choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"cannot write to --out {out}: {exc.strerror}; choose a writable folder") from None


def folders_to_create(out: Path) -> typing.List[Path]:
    """`out` and its missing parents, innermost first: what `prepare_out_dir` is about to create."""
    missing = []
    for folder in (out, *out.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing


def remove_created(folders: typing.List[Path]) -> None:
    """Remove the folders a refused run created (`folders_to_create`, innermost first), each only
    while it is empty: never a folder that existed before, never one that holds a file."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


_PARTIAL_FILES = {CONFIG_FILE, METRICS_FILE, ".write-test"}
_PARTIAL_IMAGES = ("recon_step", "samples_step")


def partial_run_files(out: Path) -> bool:
    """True if `out` holds only what a run killed before its first checkpoint leaves: its
    config, metrics log, image grids and temporary files (no checkpoint)."""
    for entry in out.iterdir():
        name = entry.name
        if name in _PARTIAL_FILES or name.startswith((f".{CHECKPOINT_DIR}.tmp-", f".{METRICS_FILE}.tmp-",
                                                      f".{CONFIG_FILE}.tmp-")):
            continue
        if name == "images" and entry.is_dir() and all(p.is_file() and _partial_image(p.name)
                                                        for p in entry.iterdir()):
            continue
        return False
    return True


def _partial_image(name: str) -> bool:
    """A grid a run writes (`recon_step*.png`, `samples_step*.png`) or the temporary file of one
    (`.NAME.png.tmp-XXXXXXXX`, `atomic_output`)."""
    if name.startswith(".") and ".png.tmp-" in name:
        name = name[1:name.index(".png.tmp-") + 4]
    return name.startswith(_PARTIAL_IMAGES) and name.endswith(".png")


class Reporter:
    """Per-step bookkeeping of a run: test kill hook, progress bar, JSON-lines log, cadences."""

    def __init__(self, out: Path, run, start: int, main: bool, desc: str, items_per_step: int, unit: str):
        self.run, self.main = run, main
        self.items, self.unit = items_per_step, unit
        self.log = MetricsLog(out / METRICS_FILE, main)
        self.bar = progress(run.steps, start, main, desc)
        self.timer = Timer()

    def step_done(self, done: int, stats: dict, shown: str, postfix: typing.Optional[dict] = None) -> None:
        """`shown`: the stat on the progress bar; `postfix`: more `{label: text}` for the bar
        (phase 1: the prologue codes used in the step's batch, so a collapse shows at once)."""
        maybe_kill_at_step(done)
        dt = self.timer.lap()
        rate = self.items / dt
        if self.main:
            self.bar.update(1)
            self.bar.set_postfix({shown: f"{stats[shown]:.4f}", **(postfix or {}), f"{self.unit}/s": f"{rate:.0f}"},
                                 refresh=False)
        if self.due(done, self.run.log_every):
            self.log.write({"step": done, "time": time.time(), **{k: round(float(v), 6) for k, v in stats.items()},
                            f"{self.unit}_per_s": rate})

    def due(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.run.steps

    def close(self) -> None:
        self.bar.close()
        self.log.close()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


# ---------------------------------------------------------------------------------------------
# fault injection for the resume tests (a real SIGKILL at a chosen point)


def _maybe_test_kill(var: str, step: int) -> None:
    if os.environ.get(var) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_hook(step: int):
    if os.environ.get("PROLOGUE_TEST_KILL_MID_WRITE") != str(step):
        return None

    def hook(tmp_dir: Path, written: typing.List[str]) -> None:
        if len(written) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def maybe_kill_at_step(step: int) -> None:
    _maybe_test_kill("PROLOGUE_TEST_KILL_AT_STEP", step)


@contextlib.contextmanager
def no_sync_if(accelerator, modules, condition: bool):
    """DDP gradient sync only on the last micro-step of an accumulation."""
    if not condition:
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(accelerator.no_sync(m))
        yield
