"""Reading what users and other processes hand us, and writing what we produce, safely. Torch-free.

- `read_json` / `parse_json`: strict JSON (no NaN / Infinity), bounded in bytes and nesting depth,
  with the top-level type checked; a one-line `FileFormatError` naming the file otherwise.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

from .errors import PrologueError

MAX_JSON_BYTES = 16 * 1024**2  # manifests, configs, run state: far below this
MAX_JSON_DEPTH = 32


class FileFormatError(PrologueError, ValueError):
    """A file (or a JSON argument) that is not what it must be; the message names it."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (strict JSON has no NaN or Infinity)")


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, without recursion (a 100,000-deep list must not crash us)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json(text: typing.Union[str, bytes], what: str, expect: type = dict, max_depth: int = MAX_JSON_DEPTH):
    """Strict JSON from `text` (a file's contents or a command-line argument) whose top level is
    an `expect` (dict by default; None for any)."""
    if len(text) > MAX_JSON_BYTES:
        raise FileFormatError(f"{what} is larger than {MAX_JSON_BYTES // 1024**2} MiB; refusing to parse it")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FileFormatError(f"{what} is nested too deeply (limit {max_depth})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise FileFormatError(f"{what} is not valid JSON: {exc}") from None
    if _depth(value, max_depth) > max_depth:
        raise FileFormatError(f"{what} is nested too deeply (limit {max_depth})")
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise FileFormatError(f"{what} must be {kind} at the top level, got {type(value).__name__}")
    return value


def read_json(path, what: typing.Optional[str] = None, expect: type = dict, max_depth: int = MAX_JSON_DEPTH):
    """`parse_json` of the file at `path`, refusing anything but a regular file of bounded size."""
    path = Path(path)
    what = what or str(path)
    try:
        if not path.is_file():
            raise FileFormatError(f"{what} is missing or not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FileFormatError(f"{what} is larger than {MAX_JSON_BYTES // 1024**2} MiB; refusing to parse it")
        data = path.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"cannot read {what}: {exc.strerror or exc}") from None
    return parse_json(data, what, expect, max_depth)
