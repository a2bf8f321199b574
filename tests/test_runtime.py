"""The torch-free runtime around the Generator: bundles and their refusals, the ONNX Runtime
backend's thread count, the error types, image loading, and the `generate` / `variations` /
`reconstruct` commands (the torch reference's images, one-line errors, never importing torch).
The Generator itself: tests/test_generator.py; its bad arguments: tests/test_hostile_runtime.py.

Runs in the full environment (building its bundle with torch) and in a runtime-only environment
(`pip install .`, no torch) against a bundle prepared by `python -m tests.runtime_fixture DIR`
and named in PROLOGUE_TEST_BUNDLE_DIR.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from prologue_export.runtime import Bundle, BundleError, Generator, ImageError, InputError

from .conftest import CASES, pixels_match


def test_intra_op_threads(prepared):
    """Small graphs get one intra-op thread by default, an explicit count is honoured, and the
    same seed gives the same images whatever the count."""
    from prologue_export.runtime.onnx_backend import SMALL_GRAPH_BYTES, default_threads

    assert default_threads(SMALL_GRAPH_BYTES - 1) == 1
    assert default_threads(SMALL_GRAPH_BYTES) == (os.cpu_count() or 1)
    auto = Generator.from_bundle(prepared[0] / "bundle", backend="cpu")
    two = Generator.from_bundle(prepared[0] / "bundle", backend="cpu", threads=2)
    images = [g.generate([1, 3], seed=5) for g in (auto, two)]
    np.testing.assert_array_equal(images[0], images[1])
    for graph in ("ar_step", "decoder"):  # the test bundle's graphs are all small
        assert auto.backend.session(graph).get_session_options().intra_op_num_threads == 1
        assert two.backend.session(graph).get_session_options().intra_op_num_threads == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="threads must be an integer"):
            Generator.from_bundle(prepared[0] / "bundle", backend="cpu", threads=bad)


def test_bad_bundles(prepared, tmp_path):
    src = prepared[0] / "bundle"
    with pytest.raises(BundleError, match="does not exist"):
        Bundle(tmp_path / "nowhere")
    copy = tmp_path / "b"
    shutil.copytree(src, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    bad = dict(manifest, format_version=99)
    (copy / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        Bundle(copy)
    outside = json.loads(json.dumps(manifest))
    outside["files"]["../secret"] = {"sha256": "0", "bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(outside))
    with pytest.raises(BundleError, match="outside the bundle folder"):
        Bundle(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with open(copy / "ar_step.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="ar_step.onnx does not match the sha256"):
        Generator.from_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle(copy)
    for field, value in (("eos_id", 5), ("vocab_size", 320), ("seq_len", None)):
        contradicting = json.loads(json.dumps(manifest))
        if value is None:
            del contradicting["vocab"][field]
        else:
            contradicting["vocab"][field] = value
        (copy / "manifest.json").write_text(json.dumps(contradicting))
        with pytest.raises(BundleError, match=f"vocab fields contradict the layout: {field}"):
            Bundle(copy, check_hashes=False)


def test_every_error_is_a_prologue_error():
    from prologue_export.runtime import ConfigError, PrologueError
    from prologue_export.runtime.images import ImageError as ImgError

    for error in (BundleError, InputError, ImgError, ConfigError):
        assert issubclass(error, PrologueError)
    assert issubclass(InputError, ValueError) and issubclass(BundleError, RuntimeError)


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "prologue_export.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_generate_grid_never_imports_torch(prepared, tmp_path):
    bundle = prepared[0] / "bundle"
    out = tmp_path / "grid.png"
    code = ("import runpy, sys; sys.argv = ['prologue'] + sys.argv[1:]; "
            "from prologue_export.cli import main; rc = main(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "generate", "--bundle", str(bundle), "--class", "1", "2", "3",
                          "10", "--n", "1", "--nrow", "2", "--seed", "0", "--out", str(out), "--json", "--sampling",
                          json.dumps(CASES["cfg_split"][1])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["images"] == 4 and report["out"] == str(out)
    from PIL import Image

    grid = np.asarray(Image.open(out))
    ref = prepared[1]["cfg_split_images"]
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1)
    tiles = np.stack([grid[1 + r * 33:1 + r * 33 + 32, 1 + c * 33:1 + c * 33 + 32] for r in range(2) for c in range(2)])
    pixels_match(tiles[..., None], ref, prepared[1]["cfg_split_images_float"])


def test_cli_errors_are_one_line(prepared, tmp_path):
    bundle = prepared[0] / "bundle"
    res = _cli(["generate", "--bundle", bundle, "--class", "99", "--out", tmp_path / "x.png"])
    assert res.returncode == 2 and "class ids must lie in" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = _cli(["variations", "--bundle", bundle, "--image", tmp_path / "bad.png", "--out", tmp_path / "v.png"])
    assert res.returncode == 2 and "not a readable image" in res.stderr and "Traceback" not in res.stderr
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    res = _cli(["reconstruct", "--bundle", bundle, "--image", tmp_path / "small.png", "--out", tmp_path / "r.png"])
    assert res.returncode == 2 and "this bundle takes 32x32 images" in res.stderr
    res = _cli(["generate", "--bundle", tmp_path / "nope", "--class", "1", "--out", tmp_path / "x.png"])
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not any(p.name.endswith(".png") and p.name.startswith(("x", ".x")) for p in tmp_path.iterdir())


def test_decompression_bomb_is_refused(prepared, tmp_path, monkeypatch):
    from PIL import Image

    from prologue_export.runtime import images as images_mod

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large to decode safely"):
        images_mod.load_image(tmp_path / "big.png", 32, 1)


def test_cli_variations_and_reconstruct(prepared, tmp_path):
    from PIL import Image

    bundle = prepared[0] / "bundle"
    source = prepared[1]["cfg_split_images"][0][..., 0]
    Image.fromarray(source).save(tmp_path / "src.png")
    res = _cli(["variations", "--bundle", bundle, "--image", tmp_path / "src.png", "--n", "3", "--seed", "5",
                "--out", tmp_path / "v.png", "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] == 3
    res = _cli(["reconstruct", "--bundle", bundle, "--image", tmp_path / "src.png", tmp_path / "src.png",
                "--out", tmp_path / "r.png"])
    assert res.returncode == 0, res.stderr
    assert np.asarray(Image.open(tmp_path / "r.png")).shape == (2 * 33 + 1, 2 * 33 + 1)
