"""Checks of command-line arguments, made before a command does any work. Torch-free.

- argparse `type=` functions (`positive_int`, `non_negative_float`, ...): a bad value is argparse's
  usage error (exit code 2) naming the flag (the sampling flags: `sampling_args.py`, from the
  runtime's table of sampling options);
- path checks (`output_file`, `output_dir`, `input_path`, `bundle_dir`): a `CLIError` naming
  the path, raised before anything is read at length or written;
- `json_argument`: strict JSON of an argument such as `--sampling` (an object, no NaN).
"""

from __future__ import annotations

import argparse
import math
import os
import typing
from pathlib import Path

from ..runtime.errors import PrologueError
from ..runtime.loop import MAX_IMAGES_PER_CALL, MAX_SEED



class CLIError(PrologueError, ValueError):
    """A command-line argument that cannot work; the message names it."""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text!r}")
    return value


def image_count(text: str) -> int:
    """A number of images to generate: 1 .. the runtime's MAX_IMAGES_PER_CALL."""
    value = positive_int(text)
    if value > MAX_IMAGES_PER_CALL:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_IMAGES_PER_CALL}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def sha256_digest(text: str) -> str:
    """A `--digest` value: the 64 lowercase hex digits of a bundle's manifest.json sha256 (what
    `prologue export` / `build-engines` print and `Bundle.digest` holds)."""
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"must be 64 hex digits (the sha256 of the bundle's manifest.json), got {text!r}")
    return value


def data_argument(text: str) -> str:
    """A `--data` value: `synthetic:N` needs N >= 1; names and folders are checked when opened."""
    if text.startswith("synthetic:"):
        count = text.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"synthetic:N needs an integer N >= 1, got {text!r}")
    return text


def json_argument(text: typing.Optional[str], flag: str) -> typing.Optional[dict]:
    """`text` as strict JSON (an object, no NaN or Infinity); None when the flag was not given."""
    if text is None:
        return None
    from ..runtime.files import parse_json

    return parse_json(text, flag, expect=dict)


def _writable_folder(path: Path, flag: str) -> None:
    """The nearest existing folder at or above `path` must be a folder we may write into."""
    here = path
    while not here.exists() and here != here.parent:
        if here.is_symlink():  # a dangling link: writing through it goes who knows where
            raise CLIError(f"{flag} {path}: {here} is a broken symbolic link")
        here = here.parent
    if not here.is_dir():
        raise CLIError(f"{flag} {path}: {here} is a file, not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: folder {here} is not writable")


def output_file(path, flag: str = "--out") -> Path:
    """A file the command will write: not a folder, inside a folder that exists or can be made."""
    path = Path(path)
    if str(path) in ("", "."):
        raise CLIError(f"{flag} needs a file name")
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise CLIError(f"{flag} {path} exists and is not a regular file")
    _writable_folder(path.parent, flag)
    return path


def output_dir(path, flag: str = "--out") -> Path:
    """A folder the command will write into (made when missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} exists and is not a folder")
    _writable_folder(path, flag)
    return path


def input_path(path, flag: str, kind: str = "any") -> Path:
    """An input that must exist: a file (`kind="file"`), a folder (`"dir"`) or either."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag} {path} does not exist")
    if kind == "file" and not path.is_file():
        raise CLIError(f"{flag} {path} is not a file")
    if kind == "dir" and not path.is_dir():
        raise CLIError(f"{flag} {path} is not a folder")
    return path


def bundle_dir(path, flag: str = "--bundle") -> Path:
    """A bundle folder whose manifest.json is a JSON object (the runtime checks the rest)."""
    from ..runtime.files import read_json

    path = input_path(path, flag, "dir")
    manifest = path / "manifest.json"
    if not manifest.exists():
        raise CLIError(f"{flag} {path} has no manifest.json: not a prologue-export bundle")
    read_json(manifest, f"{flag} {path}: manifest.json")
    return path
