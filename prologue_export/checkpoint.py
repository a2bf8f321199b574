"""The whole model object and its checkpoint folder (DESIGN.md §3).

A checkpoint is a folder: `config.json` (the full, versioned ModelConfig), `tokenizer.safetensors`
and, when the model has one, `ar.safetensors`. It is written into a temporary sibling folder,
fsynced and renamed into place, so a crash never leaves a half checkpoint that loads. Loading is
strict: a missing, unexpected or misshaped tensor is an error that names it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .ar import ARModel
from .config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
COMPONENT_FILES = {"tokenizer": "tokenizer.safetensors", "ar": "ar.safetensors"}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as it is."""


class PrologueModel(nn.Module):
    """`tokenizer` + optional `ar`, built from one ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from .tokenizer import Tokenizer

        config.validate()
        self.config = config
        self.tokenizer = Tokenizer(config.tokenizer, config.num_classes)
        self.ar = ARModel(config.ar, config.vocab(), config.num_classes) if config.ar is not None else None

    def components(self) -> typing.Dict[str, nn.Module]:
        out = {"tokenizer": self.tokenizer}
        if self.ar is not None:
            out["ar"] = self.ar
        return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module under torch.compile / DDP wrappers, so saved keys carry no `_orig_mod.`/`module.`."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model: PrologueModel, path, extra_files: typing.Optional[typing.Dict[str, typing.Any]] = None) -> Path:
    """Write `model` to the folder `path` atomically (replacing an existing checkpoint there).

    extra_files: more `{name: state_dict}` tensors files (e.g. a joint AR, EMA) saved beside.
    """
    model = unwrap(model)
    path = Path(path)
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} exists and is not a checkpoint folder; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {name: unwrap(m).state_dict() for name, m in model.components().items()}
        tensors = {COMPONENT_FILES[k]: v for k, v in tensors.items()}
        for name, state in (extra_files or {}).items():
            tensors[name if name.endswith(".safetensors") else f"{name}.safetensors"] = state
        for filename, state in tensors.items():
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, str(tmp / filename), metadata={"format": "pt"})
            with open(tmp / filename, "rb") as fh:
                os.fsync(fh.fileno())
        with open(tmp / CONFIG_FILE, "w") as fh:
            fh.write(model.config.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_tensors(file: Path) -> typing.Dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as fh:
            # clone: safetensors' buffers are not 64-byte aligned, and BLAS kernels chosen by
            # alignment would make a loaded model differ from the saved one in the last bits
            return {k: fh.get_tensor(k).clone() for k in fh.keys()}
    except Exception as exc:  # safetensors raises several error types for a damaged file
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def load_state_strict(module: nn.Module, state: typing.Dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`; any missing, unexpected or misshaped tensor is named in the error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_clip(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_clip(unexpected))}")
    if misshaped:
        problems.append(f"wrong shapes: {'; '.join(_clip(misshaped))}")
    if problems:
        raise CheckpointError(f"{source} does not match the model its config describes: " + " | ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)


def _clip(items: typing.List[str], n: int = 8) -> typing.List[str]:
    return items if len(items) <= n else items[:n] + [f"... ({len(items) - n} more)"]


def load_config(path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a prologue-export checkpoint "
                              "(convert the authors' folders with `prologue import-official`)")
    try:
        return ModelConfig.from_json(cfg_file.read_text())
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def load_checkpoint(path, device: typing.Union[str, torch.device] = "cpu") -> PrologueModel:
    """Load a checkpoint folder into a PrologueModel (eval mode) with `.tokenizer`, `.ar`, `.config`."""
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):  # parameters cost nothing until the file's tensors are assigned
        model = PrologueModel(config)
    for name, module in model.components().items():
        file = path / COMPONENT_FILES[name]
        if not file.is_file():
            raise CheckpointError(f"{path} is missing {COMPONENT_FILES[name]} (its config has a {name})")
        load_state_strict(module, read_tensors(file), str(file))
    return model.to(device).eval()
