"""The one folder publish (`runtime.files.publish_folder`, issue 22): checkpoints and bundles are
built in a `.NAME.tmp-XXXXXXXX` sibling and renamed onto their name; an existing folder is moved
aside to `.NAME.old-XXXXXXXX` first and put back when the swap fails, or by `recover_folder` after a
crash between the two renames. Torch-free, like the runtime."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prologue_export.runtime import files
from prologue_export.runtime.errors import PrologueError
from prologue_export.runtime.files import (OutputError, leftover_folders, publish_folder, recover_folder,
                                           temp_folder)

MARKER = "manifest.json"


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / MARKER).write_text(text)
    return path


def _built(dest: Path, text: str) -> Path:
    tmp = temp_folder(dest, "bundle")
    (tmp / MARKER).write_text(text)
    return tmp


def _names(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message and isinstance(exc_info.value, PrologueError)
    for needle in needles:
        assert str(needle) in message, (needle, message)


def test_a_new_folder_is_one_rename(tmp_path):
    dest = tmp_path / "out"
    tmp = _built(dest, "new")
    assert tmp.name.startswith(".out.tmp-") and tmp.parent == tmp_path
    assert publish_folder(tmp, dest, "bundle") == dest
    assert (dest / MARKER).read_text() == "new" and _names(tmp_path) == ["out"]


def test_an_existing_folder_is_replaced_and_its_backup_removed(tmp_path):
    dest = _folder(tmp_path / "out", "old")
    publish_folder(_built(dest, "new"), dest, "bundle")
    assert (dest / MARKER).read_text() == "new" and _names(tmp_path) == ["out"]


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "out", "old")
    tmp = _built(dest, "new")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src) == tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OutputError) as exc_info:
        publish_folder(tmp, dest, "bundle")
    _one_line(exc_info, "cannot write bundle", dest, os.strerror(errno.ENOSPC))
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-")  # moved aside, then put back
    assert calls[-1] == (calls[0][1], "out")
    assert (dest / MARKER).read_text() == "old"
    assert _names(tmp_path) == sorted(["out", tmp.name])  # the temporary folder is the caller's to remove


def test_a_failed_first_rename_leaves_no_placeholder(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "out", "old")
    tmp = _built(dest, "new")

    def failing(src, dst):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OutputError):
        publish_folder(tmp, dest, "bundle")
    assert (dest / MARKER).read_text() == "old" and _names(tmp_path) == sorted(["out", tmp.name])


@pytest.mark.parametrize("kind", ["link", "file", "check"])
def test_the_target_is_checked_again_right_before_the_swap(tmp_path, kind):
    real = _folder(tmp_path / "real", "precious")
    dest = tmp_path / "out"
    tmp = _built(dest, "new")
    check = None
    if kind == "link":
        os.symlink(real, dest)
    elif kind == "file":
        dest.write_text("precious")
    else:
        _folder(dest, "old")

        def check(path):
            raise OutputError(f"{path} changed meanwhile")

    with pytest.raises(OutputError) as exc_info:
        publish_folder(tmp, dest, "bundle", check=check)
    _one_line(exc_info, dest)
    assert (real / MARKER).read_text() == "precious"
    if kind == "link":
        assert dest.is_symlink()
    elif kind == "file":
        assert dest.read_text() == "precious"
    else:
        assert (dest / MARKER).read_text() == "old"
    assert not leftover_folders(dest, "old")


CRASH = """
import os, sys
from pathlib import Path
from prologue_export.runtime import files
tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
real = os.replace
def crash(src, dst):
    if Path(src) == tmp:
        os._exit(9)  # killed between the two renames
    return real(src, dst)
files.os.replace = crash
files.publish_folder(tmp, dest, "bundle")
"""


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    dest = _folder(tmp_path / "out", "old")
    tmp = _built(dest, "new")
    res = subprocess.run([sys.executable, "-c", CRASH, str(tmp), str(dest)], capture_output=True, timeout=120)
    assert res.returncode == 9, res.stderr
    assert not dest.exists() and len(leftover_folders(dest, "old")) == 1  # the only copy of the old folder
    recover_folder(dest, MARKER)
    assert (dest / MARKER).read_text() == "old" and not leftover_folders(dest, "old")
    assert leftover_folders(dest, "tmp") == [tmp]


def test_recovery_leaves_a_present_folder_and_other_names_alone(tmp_path):
    dest = _folder(tmp_path / "out", "current")
    stale = _folder(tmp_path / ".out.old-abc_123", "stale")
    sibling = _folder(tmp_path / ".out.old-5.old-xyz", "a sibling's")  # backup of a folder named `out.old-5`
    link = tmp_path / ".out.old-link"
    os.symlink(stale, link)
    assert leftover_folders(dest, "old") == [stale]
    recover_folder(dest, MARKER)
    assert (dest / MARKER).read_text() == "current" and not stale.exists()
    assert (sibling / MARKER).read_text() == "a sibling's" and link.is_symlink()


def test_a_backup_without_its_marker_is_not_put_back(tmp_path):
    dest = tmp_path / "out"
    (tmp_path / ".out.old-abc").mkdir()  # the empty placeholder of a publish killed before its first rename
    recover_folder(dest, MARKER)
    assert not dest.exists() and _names(tmp_path) == []
