"""Reading what users and other processes hand us, and writing what we produce, safely. Torch-free.

- `read_json` / `parse_json`: strict JSON (no NaN / Infinity), bounded in bytes and nesting depth,
  with the top-level type checked; a one-line `FileFormatError` naming the file otherwise.
- `check_output_path` / `atomic_output` / `write_bytes_atomic` / `write_text_atomic` /
  `write_json_atomic`: outputs are written to an exclusively created temporary file in the
  target's folder, fsynced and renamed into place; symlinks, devices, FIFOs, sockets and folders at
  the target are refused, and every failure is a one-line `OutputError` naming the path.
- `temp_folder` / `publish_folder` / `recover_folder` / `leftover_folders`: outputs that are folders
  (checkpoints, bundles) are built in an exclusively created `.NAME.tmp-XXXXXXXX` sibling and renamed
  onto their name; an existing folder is first moved aside to `.NAME.old-XXXXXXXX` and put back if
  the swap fails (or by `recover_folder` after a crash between the two renames). `fsync_file` makes a
  file that a library wrote by name (safetensors' `save_file`) durable before its folder is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
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


# --------------------------------------------------------------------------- writing


class OutputError(PrologueError, OSError):
    """An output path we refuse to write to, or a write that failed (disk full, no permission, a file
    in the way); the message names the path. An `OSError` too, so `except OSError` still catches it."""


def shown(path) -> str:
    """`path` for a one-line message: control characters (a newline in a hostile name) escaped."""
    text = str(path)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split()) or type(exc).__name__


def _kind(mode: int) -> typing.Optional[str]:
    """What a non-regular file is, for a message; None for a regular file."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _ensure_folder(folder: Path, what: str, path: Path, create: bool) -> None:
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.exists():
            raise OutputError(f"cannot write {what} {shown(path)}: its folder {shown(folder)} does not exist")
    except OutputError:
        raise
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot write {what} {shown(path)}: a file, not a folder, is in its path") from None
    except OSError as exc:
        raise OutputError(f"cannot create the folder of {what} {shown(path)}: {_reason(exc)}") from None
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {shown(path)}: a file, not a folder, is in its path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {shown(path)}: its folder is not writable")


def check_output_path(path, what: str = "output", folder: bool = False, create_parent: bool = True) -> Path:
    """Refuse an output target we must not replace, before anything is written.

    Refused: an existing symbolic link (never followed), a device, FIFO, socket or other non-regular
    file, an existing folder (`folder=False`) or an existing non-folder (`folder=True`, for outputs
    that are folders), a file in the middle of the path, and a missing (`create_parent=False`) or
    unwritable parent folder. Returns `path` as a Path; raises `OutputError`."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{what} {shown(path)} is not a file name")
    _ensure_folder(path.parent, what, path, create_parent)
    _check_target(path, what, folder)
    return path


def _check_target(path: Path, what: str, folder: bool) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot write {what} {shown(path)}: {_reason(exc)}") from None
    kind = _kind(mode)
    if folder and stat.S_ISDIR(mode):
        return
    if kind is None and not folder:
        return
    kind = kind or "a file, not a folder"
    raise OutputError(f"{what} {shown(path)} exists and is {kind}; refusing to replace it")


def fsync_dir(folder) -> None:
    """Make a rename inside `folder` durable, where the platform allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _new_file_mode(path: Path) -> int:
    """The permissions `open(path, "w")` would leave: those of the file replaced, else 0o666 - umask."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_output(path, what: str = "output", mode: str = "wb", create_parent: bool = True):
    """Write `path` all or nothing: yields the file object of a temporary file created exclusively
    (`mkstemp`: O_CREAT | O_EXCL, never through a link, unpredictable name) in the target's folder;
    on success it is flushed, fsynced and renamed onto `path` (then the folder is fsynced), on any
    failure it is removed and the previous `path` is left as it was. Write errors (disk full, ...)
    become a one-line `OutputError` naming `path`."""
    path = check_output_path(path, what, create_parent=create_parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.tmp-", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {shown(path)}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))
        _check_target(path, what, folder=False)  # again: something may have appeared meanwhile
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {what} {shown(path)}: {_reason(exc)}") from None
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path, data: bytes, what: str = "output") -> Path:
    """`data` to `path` with `atomic_output`."""
    with atomic_output(path, what, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path, text: str, what: str = "output") -> Path:
    """UTF-8 `text` to `path` with `atomic_output`."""
    with atomic_output(path, what, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path, obj, what: str = "output", indent: typing.Optional[int] = 2,
                      allow_nan: bool = False) -> Path:
    """`obj` as JSON to `path` with `atomic_output`; strict (NaN / Infinity refused, as `read_json`
    would refuse them) unless `allow_nan`."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=allow_nan)
    except ValueError as exc:
        raise OutputError(f"cannot write {what} {shown(path)}: {exc}") from None
    return write_text_atomic(path, text, what)


def sha256_file(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (what a bundle's manifest records)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path) -> None:
    """Make a file that a library wrote by name durable (safetensors' `save_file`, inside a folder
    that `publish_folder` renames later); an `OSError` (disk full) is raised as it is, for the caller
    to name its output."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- folders


def temp_folder(dest, what: str = "output") -> Path:
    """An exclusively created, empty, owner-only `.NAME.tmp-XXXXXXXX` folder beside `dest`
    (`mkdtemp`), to build the folder `dest` in before `publish_folder` renames it into place."""
    dest = Path(dest)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {what} {shown(dest)}: {_reason(exc)}") from None


def apply_umask(folder) -> None:
    """Give `folder` and the files in it the permissions a plain `open` / `mkdir` would have given
    them (0o666 / 0o777 less the umask): `mkdtemp` and some writers create owner-only files."""
    folder, umask = Path(folder), _umask()
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def publish_folder(tmp, dest, what: str = "output",
                   check: typing.Optional[typing.Callable[[Path], None]] = None) -> Path:
    """Rename the finished folder `tmp` (from `temp_folder`) onto `dest`, all or nothing.

    `tmp` is fsynced, then `dest` is checked again right before the swap (something may have
    appeared meanwhile): `check(dest)`, the caller's own test, may raise to refuse it, and anything
    but a folder (a link, a file, a device) is refused here. A missing `dest` is one rename. An
    existing one is first renamed onto an exclusively created, empty `.NAME.old-XXXXXXXX`
    placeholder in the same folder (`mkdtemp`: a folder renamed onto an empty folder replaces it),
    then `tmp` onto `dest`; if either rename fails the previous folder is put back (after a crash
    between the two, `recover_folder` does it on the next run). The parent is fsynced, and the old
    folder is removed only once `dest` is the new one. On failure `tmp` is left for the caller to
    remove; an `OSError` becomes a one-line `OutputError` naming `dest`."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_dir(tmp)
    if check is not None:
        check(dest)
    _check_target(dest, what, folder=True)
    old = None
    try:
        if os.path.lexists(dest):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))  # exclusive and empty
            _swap(tmp, dest, old)
        else:
            os.replace(tmp, dest)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write {what} {shown(dest)}: {_reason(exc)}") from None
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _swap(tmp: Path, dest: Path, old: Path) -> None:
    """`dest` -> the empty placeholder `old`, then `tmp` -> `dest`; on failure the previous state back."""
    moved = False
    try:
        os.replace(dest, old)
        moved = True
        os.replace(tmp, dest)
    except BaseException:
        try:
            if not moved:
                os.rmdir(old)  # still the empty placeholder
            elif not os.path.lexists(dest):
                os.replace(old, dest)  # put the previous folder back (else recover_folder will)
        except OSError:
            pass
        raise


def leftover_folders(dest, kind: str) -> typing.List[Path]:
    """Exact names of `dest`'s leftover `.NAME.tmp-XXXXXXXX` (`kind` "tmp") or `.NAME.old-XXXXXXXX`
    ("old") folders, from a `temp_folder` / `publish_folder` that was interrupted.

    The folder is listed and each name compared with the literal prefix (no glob pattern: `ckpt[1]`
    or `ckpt*` in NAME must not match a sibling's files); the rest of the name must be what
    `mkdtemp` makes (no dot), so a sibling named `NAME.old-5` (whose backups start with the same
    prefix) is never taken for ours. Only real folders count, never links."""
    dest = Path(dest)
    prefix = f".{dest.name}.{kind}-"
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_")  # mkdtemp's letters (older saves: a pid)
    found = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return []
    for entry in entries:
        rest = entry.name[len(prefix):]
        if (entry.name.startswith(prefix) and rest and set(rest) <= allowed
                and entry.is_dir(follow_symlinks=False)):
            found.append(Path(entry.path))
    return found


def recover_folder(dest, marker: str) -> None:
    """If a `publish_folder` of `dest` was killed between its two renames, put the previous folder
    back: when `dest` is missing, the newest `.NAME.old-XXXXXXXX` holding the file `marker` (what
    makes it a complete output: a checkpoint's config.json) is renamed to `dest`. Other backups are
    removed."""
    dest = Path(dest)
    olds = sorted(leftover_folders(dest, "old"), key=lambda p: p.lstat().st_mtime)
    if not olds:
        return
    if not os.path.lexists(dest) and (olds[-1] / marker).is_file():
        os.replace(olds[-1], dest)
        olds = olds[:-1]
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)
