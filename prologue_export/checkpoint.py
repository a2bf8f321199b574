"""The checkpoint folder of a `PrologueModel` (DESIGN.md §3): save and load.

A checkpoint is a folder: `config.json` (the full, versioned ModelConfig), `tokenizer.safetensors`
and, when the model has one, `ar.safetensors`. It is written into a temporary sibling folder,
fsynced and renamed into place (`runtime.files.temp_folder` / `publish_folder`, the one folder
publish the bundle uses too), so a crash never leaves a half checkpoint that loads. Loading is
strict: a missing, unexpected or misshaped tensor is an error that names it.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ModelConfig
from .model import PrologueModel, unwrap
from .runtime.errors import PrologueError
from .runtime.files import (FileFormatError, OutputError, apply_umask, check_output_path, fsync_file,
                            leftover_folders, publish_folder, read_json, recover_folder, shown, temp_folder)

CONFIG_FILE = "config.json"
SOURCE_KEY = "source"  # provenance beside the model config in config.json (not part of ModelConfig)
COMPONENT_FILES = {"tokenizer": "tokenizer.safetensors", "ar": "ar.safetensors"}


class CheckpointError(PrologueError, RuntimeError):
    """A checkpoint folder that cannot be loaded as it is."""


def _check_target(path: Path) -> None:
    """Refuse a checkpoint target that is a link or not a folder (never followed, never replaced), or
    whose folder cannot be written (`OutputError`: a file in the path, no permission)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "not a folder"
        raise CheckpointError(f"{shown(path)} exists and is {kind}, not a checkpoint folder; refusing to replace it")
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{shown(path)} exists and is not a checkpoint folder; refusing to overwrite it")
    check_output_path(path, "checkpoint", folder=True)


def save_checkpoint(
    model: PrologueModel,
    path,
    extra_files: typing.Optional[typing.Dict[str, typing.Any]] = None,
    extra_json: typing.Optional[typing.Dict[str, typing.Any]] = None,
    source: typing.Optional[typing.Dict[str, typing.Any]] = None,
    _test_hook=None,
) -> Path:
    """Write `model` to the folder `path` atomically (replacing an existing checkpoint there).

    extra_files: more `{name: state_dict}` tensor files saved beside (training state, EMA);
    extra_json: more `{filename: object}` JSON files. Leftover temporary folders of an
    earlier, interrupted save are removed.
    source: where the weights came from (`import-official`: repo, revision, files, sha256), kept
    in config.json under the key `source`; `load_source` reads it back.
    """
    model = unwrap(model)
    path = Path(path)
    _check_target(path)
    recover_interrupted(path)
    _check_target(path)
    for stale in leftover_folders(path, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed mid-write
    tmp = temp_folder(path, "checkpoint")
    try:
        _write_files(tmp, model, extra_files, extra_json, source, _test_hook)
        apply_umask(tmp)  # mkdtemp and safetensors create owner-only files
        publish_folder(tmp, path, "checkpoint", check=_check_target)  # re-checks the target right before
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, PrologueError):
            raise OutputError(f"cannot write checkpoint {shown(path)}: {exc.strerror or exc}") from None
        raise
    return path


def _write_files(tmp: Path, model: PrologueModel, extra_files, extra_json, source, _test_hook) -> None:
    """The checkpoint's files into the temporary folder `tmp`, each fsynced (`publish_folder` then
    makes the folder durable and renames it into place)."""
    tensors = {name: unwrap(m).state_dict() for name, m in model.components().items()}
    tensors = {COMPONENT_FILES[k]: v for k, v in tensors.items()}
    for name, state in (extra_files or {}).items():
        tensors[name if name.endswith(".safetensors") else f"{name}.safetensors"] = state
    written: typing.List[str] = []
    for filename, state in tensors.items():
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(tmp / filename), metadata={"format": "pt"})
        fsync_file(tmp / filename)
        written.append(filename)
        if _test_hook is not None:
            _test_hook(tmp, written)
    config = model.config.to_dict()
    if source is not None:
        config[SOURCE_KEY] = source
    texts = {CONFIG_FILE: json.dumps(config, indent=2)}
    texts.update({name: json.dumps(obj) for name, obj in (extra_json or {}).items()})
    for filename, text in texts.items():
        (tmp / filename).write_text(text)
        fsync_file(tmp / filename)


def recover_interrupted(path) -> None:
    """If a save was killed between its two renames, put the previous checkpoint back
    (`runtime.files.recover_folder`: a `.NAME.old-XXXXXXXX` backup holding config.json)."""
    recover_folder(path, CONFIG_FILE)


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
        recover_interrupted(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a prologue-export checkpoint "
                              "(convert the authors' folders with `prologue import-official`)")
    try:
        data = _read_config_json(cfg_file)
        data.pop(SOURCE_KEY, None)
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def _read_config_json(cfg_file: Path) -> dict:
    try:
        return read_json(cfg_file, "config")  # strict: no NaN / Infinity, bounded size and depth
    except FileFormatError as exc:
        raise ConfigError(str(exc)) from None


def load_source(path) -> typing.Optional[dict]:
    """The provenance a checkpoint's config.json records (None for trained checkpoints)."""
    cfg_file = Path(path) / CONFIG_FILE
    try:
        source = _read_config_json(cfg_file).get(SOURCE_KEY)
    except (ConfigError, OSError) as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None
    if source is not None and not isinstance(source, dict):
        raise CheckpointError(f"{cfg_file}: {SOURCE_KEY!r} must be an object")
    return source


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
