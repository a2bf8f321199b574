"""The checkpoint folder of a `PrologueModel` (DESIGN.md §3): save and load.

A checkpoint is a folder: `config.json` (the full, versioned ModelConfig), `tokenizer.safetensors`
and, when the model has one, `ar.safetensors`. It is written into a temporary sibling folder,
fsynced and renamed into place (`runtime.files.temp_folder` / `publish_folder`, the one folder
publish the bundle uses too), so a crash never leaves a half checkpoint that loads. Loading is
strict and reads the safetensors header first (`read_header`: bounded, every byte range checked
against the file): a missing, unexpected, misshaped or non-float32 tensor is an error that names
it, raised before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import typing
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ModelConfig
from .model import PrologueModel, unwrap
from .runtime.errors import PrologueError, short_repr
from .runtime.files import (FileFormatError, OutputError, apply_umask, check_output_path, fsync_file,
                            leftover_folders, parse_json, publish_folder, read_json, recover_folder, shown,
                            temp_folder)

CONFIG_FILE = "config.json"
SOURCE_KEY = "source"  # provenance beside the model config in config.json (not part of ModelConfig)
COMPONENT_FILES = {"tokenizer": "tokenizer.safetensors", "ar": "ar.safetensors"}

# safetensors headers (docs/model.md, "Reading a safetensors file"): a released file's header is
# about 100 KB (a thousand tensors), its metadata `{"format": "pt"}`
MAX_HEADER_BYTES = 8 * 1024**2
MAX_METADATA_BYTES = 64 * 1024
MAX_RANK = 8
# the dtypes read at all (safetensors name -> torch dtype); others are refused
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
OUR_DTYPES = (torch.float32,)  # what `save_checkpoint` writes and `load_checkpoint` accepts as weights


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


class TensorInfo(typing.NamedTuple):
    """One tensor of a safetensors header: dtype, shape and byte range (after the header)."""

    dtype: torch.dtype
    shape: typing.Tuple[int, ...]
    begin: int
    end: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _named(key: str) -> str:
    """A tensor name for a one-line message (a hostile name is escaped and cut)."""
    return key if key.isprintable() and len(key) <= 200 else short_repr(key, 80)


def _open_regular(file: Path):
    """`file` opened for reading if it is a regular file (a FIFO or a device is never opened)."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise CheckpointError(f"{shown(file)} is not a regular file")
        return open(file, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read {shown(file)}: {exc.strerror or exc}") from None


def _parse_header(fh, file: Path) -> typing.Dict[str, TensorInfo]:
    """The tensor table of the open safetensors file `fh`, checked before any tensor data is read."""
    def bad(problem: str):
        return CheckpointError(f"{shown(file)}: not a readable safetensors file ({problem})")

    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise bad(f"{size} bytes, shorter than a header")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
        raise bad(f"it declares a {n}-byte header; at most {MAX_HEADER_BYTES // 1024**2} MiB, inside the file")
    try:
        table = parse_json(fh.read(n), "its header", max_depth=4)
    except FileFormatError as exc:
        raise bad(str(exc)) from None
    meta = table.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(x, str) for item in meta.items() for x in item):
        raise bad("__metadata__ must map strings to strings")
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES:
        raise bad(f"its metadata holds more than {MAX_METADATA_BYTES // 1024} KiB")
    infos = {name: _tensor_info(name, entry, bad) for name, entry in table.items()}
    end = 0
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != end:
            raise bad(f"tensor {_named(name)} starts at byte {info.begin}, not {end}: tensors overlap or leave gaps")
        end = info.end
    if 8 + n + end != size:
        raise bad(f"its tensors take {end} bytes but the file holds {size - 8 - n} after the header")
    return infos


def _tensor_info(name: str, entry, bad) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {_named(name)} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in TORCH_DTYPES:
        raise bad(f"tensor {_named(name)} has the unsupported dtype {short_repr(dtype, 20)}")
    ints = [x for x in (shape, offsets) if isinstance(x, list) and all(type(v) is int and v >= 0 for v in x)]
    if len(ints) != 2 or len(shape) > MAX_RANK or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise bad(f"tensor {_named(name)}: shape must be at most {MAX_RANK} sizes >= 0, data_offsets [begin, end]")
    if offsets[1] - offsets[0] != math.prod(shape) * TORCH_DTYPES[dtype].itemsize:
        raise bad(f"tensor {_named(name)}: bytes {offsets} do not hold {dtype} {shape}")
    return TensorInfo(TORCH_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])


def read_header(file) -> typing.Dict[str, TensorInfo]:
    """Name -> `TensorInfo` of a safetensors file, read without any tensor data: the header is
    bounded (`MAX_HEADER_BYTES`, metadata `MAX_METADATA_BYTES`), every dtype known, every tensor's
    byte range its shape x dtype, the ranges back to back and ending where the file ends."""
    with _open_regular(Path(file)) as fh:
        return _parse_header(fh, Path(file))


def read_tensors(file, check: typing.Optional[typing.Callable[[dict], None]] = None) -> typing.Dict[str, torch.Tensor]:
    """The tensors of a safetensors file. Its header is read and checked first (`read_header`), then
    `check(table)` (it raises to refuse), and only then is any tensor data read, from the same open
    file: each tensor into its own aligned buffer (BLAS kernels chosen by alignment would otherwise
    make a loaded model differ from the saved one in the last bits)."""
    file = Path(file)
    with _open_regular(file) as fh:
        table = _parse_header(fh, file)
        if check is not None:
            check(table)
        return _read_data(fh, file, table)


def _read_data(fh, file: Path, table: typing.Dict[str, TensorInfo]) -> typing.Dict[str, torch.Tensor]:
    """The tensors of `table` from `fh` (at the end of its header): the only read of tensor data."""
    start, out = fh.tell(), {}
    for name, info in table.items():
        raw = torch.empty(info.end - info.begin, dtype=torch.uint8)
        fh.seek(start + info.begin)
        if raw.numel() and fh.readinto(raw.numpy()) != raw.numel():
            raise CheckpointError(f"{shown(file)}: not a readable safetensors file (it changed while read)")
        out[name] = raw.view(info.dtype).reshape(info.shape)
    return out


def check_state(module: nn.Module, table: typing.Mapping[str, typing.Any], source: str,
                dtypes: typing.Sequence[torch.dtype] = OUR_DTYPES) -> None:
    """`table` (name -> `TensorInfo`, or tensors) against `module`'s state: any missing, unexpected,
    misshaped tensor, or one whose dtype is not in `dtypes`, is named in a one-line error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(table))
    unexpected = sorted(map(_named, set(table) - set(expected)))
    common = sorted(set(expected) & set(table))
    misshaped = [f"{k}: file {list(table[k].shape)} vs model {list(expected[k].shape)}"
                 for k in common if tuple(table[k].shape) != tuple(expected[k].shape)]
    mistyped = [f"{k}: {dtype_name(table[k].dtype)}" for k in common if table[k].dtype not in dtypes]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_clip(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_clip(unexpected))}")
    if misshaped:
        problems.append(f"wrong shapes: {'; '.join(_clip(misshaped))}")
    if mistyped:
        accepted = " or ".join(map(dtype_name, dtypes))
        problems.append(f"wrong dtypes (the weights are {accepted}): {'; '.join(_clip(mistyped))}")
    if problems:
        raise CheckpointError(f"{source} does not match the model its config describes: " + " | ".join(problems))


def load_state_strict(module: nn.Module, state: typing.Dict[str, torch.Tensor], source: str,
                      dtypes: typing.Sequence[torch.dtype] = OUR_DTYPES) -> None:
    """Load `state` into `module` after `check_state`."""
    check_state(module, state, source, dtypes)
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
        state = read_tensors(file, check=lambda table: check_state(module, table, str(file)))
        module.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
