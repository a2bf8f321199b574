"""Hostile outputs and inputs (issue 15): devices, FIFOs, sockets, folders and links at an output
path, links at predictable temporary names, glob characters in checkpoint names, unwritable
folders, files in the path, full disks, and image files that are 16-bit, float, huge or broken.

Every refusal must be a one-line `PrologueError` naming the path, leave the victim untouched and
leave no temporary file behind. Torch is needed only by the checkpoint cases (importorskip inside
them), so the rest runs in the torch-free runtime environment too.
"""

import errno
import io
import json
import os
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from prologue_export.runtime import files
from prologue_export.runtime.errors import PrologueError
from prologue_export.runtime.files import OutputError, check_output_path, write_bytes_atomic, write_json_atomic
from prologue_export.runtime.images import MAX_PIXELS, ImageError, load_image, save_png

VICTIM_TEXT = b"precious victim data\n"


def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message and message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    assert isinstance(exc_info.value, PrologueError)
    return message


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _write_report(path):
    from prologue_export.train.metrics import write_report

    write_report({"fid": 1.0}, path)


WRITERS = {
    "save_png": lambda p: save_png(np.zeros((4, 4, 3), np.uint8), p),
    "write_bytes_atomic": lambda p: write_bytes_atomic(p, b"new", "output"),
    "write_json_atomic": lambda p: write_json_atomic(p, {"a": 1}, "output"),
    "metrics.write_report": _write_report,
}


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "target")
    return tmp_path / "target", "a FIFO"


def _socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "target"
    try:
        sock.bind(str(path))
    except OSError as exc:  # pragma: no cover - path too long for AF_UNIX on some systems
        pytest.skip(f"cannot bind a UNIX socket here: {exc}")
    sock.close()
    return path, "a socket"


def _folder(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "inside.txt").write_bytes(VICTIM_TEXT)
    return tmp_path / "target", "folder"


def _link_to_victim(tmp_path):
    os.symlink(tmp_path / "victim.txt", tmp_path / "target")
    return tmp_path / "target", "a symbolic link"


def _dangling_link(tmp_path):
    os.symlink(tmp_path / "would_be_created", tmp_path / "target")
    return tmp_path / "target", "a symbolic link"


def _link_to_folder(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "dir", tmp_path / "target")
    return tmp_path / "target", "a symbolic link"


def _file_in_path(tmp_path):
    (tmp_path / "some_file").write_bytes(VICTIM_TEXT)
    return tmp_path / "some_file" / "out.png", "a file, not a folder, is in its path"


TARGETS = {"fifo": _fifo, "socket": _socket, "folder": _folder, "link_to_victim": _link_to_victim,
           "dangling_link": _dangling_link, "link_to_folder": _link_to_folder, "file_in_path": _file_in_path}


def _snapshot(tmp_path):
    """Every entry under tmp_path with its kind and (for files) contents."""
    out = {}
    for root, dirs, names in os.walk(tmp_path):
        for name in dirs + names:
            p = os.path.join(root, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            out[p] = (st.st_mode, os.readlink(p) if os.path.islink(p) else None, data)
    return out


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_hostile_targets_are_refused(tmp_path, writer, target):
    (tmp_path / "victim.txt").write_bytes(VICTIM_TEXT)
    path, needle = TARGETS[target](tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError) as exc_info:
        WRITERS[writer](path)
    _one_line(exc_info, path if target != "file_in_path" else "out.png", needle)
    assert _snapshot(tmp_path) == before  # victim, link, FIFO, socket, folder: all untouched, no temp file
    assert (tmp_path / "victim.txt").read_bytes() == VICTIM_TEXT
    assert not (tmp_path / "would_be_created").exists()


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_device_nodes_are_refused_before_anything_is_written(device):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    before = os.lstat(device)
    with pytest.raises(OutputError) as exc_info:  # only the check: nothing is ever written near /dev
        check_output_path(device, "image")
    _one_line(exc_info, device, "character device")
    after = os.lstat(device)
    assert (after.st_mode, after.st_rdev, after.st_ino) == (before.st_mode, before.st_rdev, before.st_ino)


def _predictable_png(path):
    save_png(np.full((4, 4, 1), 7, np.uint8), path)


def _predictable_stats(path):
    from prologue_export.train.metrics import ReferenceStats

    ReferenceStats(path.parent).get("key", lambda: np.random.default_rng(0).normal(size=(8, 3)))


@pytest.mark.parametrize("case", [
    ("png", "out.png", lambda p: f".{p.name}.tmp-{os.getpid()}", _predictable_png),
    ("report", "report.json", lambda p: f"{p.name}.tmp-{os.getpid()}", _write_report),
    ("ref_stats", "key.npz", lambda p: f"key.tmp-{os.getpid()}.npz", _predictable_stats),
    ("pretokenize_npy", "shard_00000_ids.npy", lambda p: f"{p.name}.tmp", None),
], ids=lambda c: c[0])
def test_links_at_the_old_predictable_temp_names_are_not_followed(tmp_path, case):
    _, name, old_temp, write = case
    if write is None:
        pytest.importorskip("torch")
        from prologue_export.train.pretokenize import _add_shard

        index = {"shards": [], "num_images": 0, "skipped": 0, "complete": False}
        write = lambda p: _add_shard(p.parent, index, 0, np.zeros((5, 1, 2), np.int16), np.arange(5), 0)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_TEXT)
    path = tmp_path / name
    os.symlink(victim, tmp_path / old_temp(path))
    write(path)
    assert victim.read_bytes() == VICTIM_TEXT
    assert os.path.islink(tmp_path / old_temp(path))  # the attacker's link is left alone, not followed
    assert path.is_file() and not path.is_symlink()
    assert _temps(tmp_path) == [old_temp(path)]


def test_temporary_names_are_unpredictable_and_created_exclusively(tmp_path, monkeypatch):
    seen = []
    real_mkstemp = files.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        seen.append(os.path.basename(name))
        return fd, name

    monkeypatch.setattr(files.tempfile, "mkstemp", spy)
    for _ in range(2):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "out.png")
    assert len(set(seen)) == 2 and all(n.startswith(".out.png.tmp-") for n in seen)
    assert f".out.png.tmp-{os.getpid()}" not in seen
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_full_disk_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, writer):
    path = tmp_path / "out.file"
    path.write_bytes(VICTIM_TEXT)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as exc_info:
        WRITERS[writer](path)
    _one_line(exc_info, path, os.strerror(errno.ENOSPC))
    assert isinstance(exc_info.value, OSError)
    assert path.read_bytes() == VICTIM_TEXT and _temps(tmp_path) == []


def test_a_real_write_error_midway_keeps_the_previous_file(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write itself (EFBIG), as a full disk would."""
    path = tmp_path / "out.png"
    path.write_bytes(VICTIM_TEXT)
    code = ("import resource, signal, sys, numpy as np\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from prologue_export.runtime.images import save_png\n"
            "from prologue_export.runtime.files import OutputError\n"
            "try:\n"
            "    save_png(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8), sys.argv[1])\n"
            "except OutputError as exc:\n"
            "    print(exc); sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert res.stdout.count("\n") == 1 and str(path) in res.stdout and "cannot write image" in res.stdout
    assert path.read_bytes() == VICTIM_TEXT and _temps(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so chmod 0o500 restricts nothing")
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_unwritable_folder_is_a_one_line_error(tmp_path, writer):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "out.file").write_bytes(VICTIM_TEXT)
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError) as exc_info:
            WRITERS[writer](folder / "out.file")
        _one_line(exc_info, folder / "out.file", "not writable")
    finally:
        folder.chmod(0o700)
    assert (folder / "out.file").read_bytes() == VICTIM_TEXT and _temps(folder) == []


def test_success_replaces_a_regular_file_keeping_its_mode(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(VICTIM_TEXT)
    path.chmod(0o640)
    save_png(np.full((3, 5, 3), 9, np.uint8), path)
    assert np.asarray(Image.open(path)).shape == (3, 5, 3) and (path.stat().st_mode & 0o777) == 0o640
    fresh = tmp_path / "new" / "deeper" / "fresh.json"
    write_json_atomic(fresh, {"x": [1, 2]})
    assert json.loads(fresh.read_text()) == {"x": [1, 2]} and _temps(tmp_path) == []


def test_newline_in_a_hostile_name_stays_one_line(tmp_path):
    path = tmp_path / "evil\nname.png"
    os.mkfifo(path)
    with pytest.raises(OutputError) as exc_info:
        save_png(np.zeros((2, 2, 3), np.uint8), path)
    _one_line(exc_info, "evil\\nname.png")


def test_nan_is_refused_in_strict_json(tmp_path):
    with pytest.raises(OutputError) as exc_info:
        write_json_atomic(tmp_path / "m.json", {"x": float("nan")}, "bundle manifest")
    _one_line(exc_info, "m.json")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- checkpoints


def _pending_backup(folder, name, token="123"):
    """What a save of sibling checkpoint `name` killed between its two renames leaves: the only copy."""
    old = folder / f".{name}.old-{token}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "marker.txt").write_bytes(VICTIM_TEXT)
    return old


def _tiny_model():
    from prologue_export.config import model_preset
    from prologue_export.model import PrologueModel

    return PrologueModel(model_preset("tiny")).eval()


@pytest.mark.parametrize("name,sibling", [("ckpt[1]", "ckpt1"), ("ckpt*", "ckptX"), ("ck?pt", "ckApt"),
                                          ("ckpt[!x]", "ckpt1"), ("c", "c.old-5")])
def test_glob_characters_never_touch_a_sibling_checkpoint(tmp_path, name, sibling):
    pytest.importorskip("torch")
    from prologue_export.checkpoint import load_config, recover_interrupted, save_checkpoint

    old = _pending_backup(tmp_path, sibling)
    busy = tmp_path / f".{sibling}.tmp-abcd1234"  # a sibling's save in progress
    busy.mkdir()
    (busy / "part.safetensors").write_bytes(VICTIM_TEXT)
    model = _tiny_model()
    save_checkpoint(model, tmp_path / name)
    save_checkpoint(model, tmp_path / name)  # the second save renames the first away and back
    assert (old / "marker.txt").read_bytes() == VICTIM_TEXT and (busy / "part.safetensors").is_file()
    assert load_config(tmp_path / name) == model.config
    recover_interrupted(tmp_path / sibling)  # the sibling's own recovery still finds its backup
    assert (tmp_path / sibling / "marker.txt").read_bytes() == VICTIM_TEXT and not old.exists()


@pytest.mark.parametrize("kind", ["link_to_checkpoint", "dangling_link", "file", "fifo", "file_in_path"])
def test_hostile_checkpoint_targets_are_refused(tmp_path, kind):
    pytest.importorskip("torch")
    from prologue_export.checkpoint import CheckpointError, save_checkpoint

    model = _tiny_model()
    save_checkpoint(model, tmp_path / "real")
    target = tmp_path / "target"
    if kind == "link_to_checkpoint":
        os.symlink(tmp_path / "real", target)
    elif kind == "dangling_link":
        os.symlink(tmp_path / "nowhere", target)
    elif kind == "file":
        target.write_bytes(VICTIM_TEXT)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.write_bytes(VICTIM_TEXT)
        target = target / "ckpt"
    before = _snapshot(tmp_path)
    with pytest.raises((CheckpointError, OutputError)) as exc_info:
        save_checkpoint(model, target)
    _one_line(exc_info, "target")
    assert _snapshot(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_checkpoint_full_disk_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from prologue_export import checkpoint as ckpt_mod

    model = _tiny_model()
    ckpt_mod.save_checkpoint(model, tmp_path / "ckpt")
    before = _snapshot(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as exc_info:
        ckpt_mod.save_checkpoint(model, tmp_path / "ckpt")
    _one_line(exc_info, tmp_path / "ckpt", os.strerror(errno.ENOSPC))
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- images in


def _png(width, height, depth, color_type, raw=b""):
    """A PNG written by hand: any declared size for a few bytes (its pixel data may be missing)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _png16(values):
    """A 16-bit PNG (gray [H, W] or RGB [H, W, 3]) of uint16 `values`."""
    h, w = values.shape[:2]
    big = values.astype(">u2")
    raw = b"".join(b"\0" + big[r].tobytes() for r in range(h))
    return _png(w, h, 16, 0 if values.ndim == 2 else 2, raw)


RAMP = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472


def _save(im, fmt="PNG"):
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def _palette():
    im = Image.new("P", (32, 32), 5)
    im.putpalette([0, 0, 0] * 5 + [200, 100, 50] + [0, 0, 0] * 250)
    return _save(im)


def _raw(mode, pixel):
    return _save(Image.frombytes(mode, (32, 32), bytes(pixel) * (32 * 32)), "TIFF" if mode == "CMYK" else "PNG")


GRAY8 = (RAMP >> 8).astype(np.uint8)
GOOD_IMAGES = {  # name: (file bytes, channels, expected uint8 [32, 32, C])
    "gray16_png": (lambda: _png16(RAMP), 1, GRAY8[..., None]),
    "rgb16_png": (lambda: _png16(np.stack([RAMP] * 3, -1)), 3, np.stack([GRAY8] * 3, -1)),
    "gray16_tiff": (lambda: _save(Image.fromarray(RAMP), "TIFF"), 1, GRAY8[..., None]),
    "float_tiff": (lambda: _save(Image.fromarray((RAMP / 65535.0).astype(np.float32)), "TIFF"), 1,
                   np.rint((RAMP / 65535.0).astype(np.float32).astype(np.float64) * 255).astype(np.uint8)[..., None]),
    "gray16_to_rgb": (lambda: _png16(RAMP), 3, np.stack([GRAY8] * 3, -1)),
    "palette": (_palette, 3, np.broadcast_to(np.array([200, 100, 50], np.uint8), (32, 32, 3))),
    "la": (lambda: _raw("LA", [90, 0]), 1, np.full((32, 32, 1), 90, np.uint8)),
    "rgba": (lambda: _raw("RGBA", [60, 70, 80, 0]), 3, np.broadcast_to(np.array([60, 70, 80], np.uint8), (32, 32, 3))),
    "cmyk": (lambda: _raw("CMYK", [0, 0, 0, 0]), 3, np.full((32, 32, 3), 255, np.uint8)),
    "bilevel": (lambda: _save(Image.fromarray(np.ones((32, 32), bool))), 1, np.full((32, 32, 1), 255, np.uint8)),
    "rgb8_to_gray": (lambda: _raw("RGB", [10, 10, 10]), 1, np.full((32, 32, 1), 10, np.uint8)),
}


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_wide_and_odd_images_are_converted_not_clipped(tmp_path, name):
    data, channels, expected = GOOD_IMAGES[name]
    (tmp_path / "in").write_bytes(data())
    got = load_image(tmp_path / "in", 32, channels)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


BAD_IMAGES = {  # name: (file bytes, words the one-line message must hold)
    "float_outside_0_1": (lambda: _save(Image.fromarray(np.full((32, 32), 200.0, np.float32)), "TIFF"),
                          "outside [0, 1]"),
    "float_nan": (lambda: _save(Image.fromarray(np.full((32, 32), np.nan, np.float32)), "TIFF"), "NaN"),
    "int32_out_of_range": (lambda: _save(Image.fromarray(np.full((32, 32), 70000, np.int32)), "TIFF"), "0..65535"),
    "huge_declared": (lambda: _png(5000, 5000, 8, 0), "too large to decode safely"),
    "bomb_declared": (lambda: _png(100_000, 100_000, 8, 0), "decompression bomb"),
    "bilevel_20000": (lambda: _save(Image.new("1", (20000, 20000))), "decompression bomb"),
    "wrong_size_not_decoded": (lambda: _png(64, 64, 8, 0), "this bundle takes 32x32 images"),
    "truncated_png": (lambda: _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)))[:120],
                      "not a readable image"),
    "corrupt_idat": (lambda: _png(32, 32, 8, 0, b"\0" * 10), "not a readable image"),
    "not_an_image": (lambda: b"just some text, no image here\n" * 10, "not a readable image"),
    "gif_magic_then_text": (lambda: b"GIF89a? no, just text\n" * 10, "decompression bomb"),  # declares 8255x28526
    "empty_file": (lambda: b"", "not a readable image"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_one_line_errors(tmp_path, name, monkeypatch):
    data, needle = BAD_IMAGES[name]
    (tmp_path / "in").write_bytes(data())
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    with pytest.raises(ImageError) as exc_info:
        load_image(tmp_path / "in", 32, 1)
    _one_line(exc_info, tmp_path / "in", needle)
    if name in ("huge_declared", "bomb_declared", "bilevel_20000", "wrong_size_not_decoded", "gif_magic_then_text"):
        assert decoded == []  # refused from the header alone


def test_the_pixel_bound_is_documented_and_sane():
    assert 32 * 32 <= MAX_PIXELS <= 4096 * 4096


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing", "dev_zero"])
def test_non_regular_image_inputs_are_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "in"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading must not wait for a writer
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev_zero":
        path = "/dev/zero"  # read-only use: an endless stream must not be read
        if not os.path.exists(path):
            pytest.skip("no /dev/zero")
    with pytest.raises(ImageError) as exc_info:
        load_image(path, 32, 1)
    _one_line(exc_info, path, "does not exist" if kind == "missing" else "not a regular file")
