"""The torch-free runtime: same tokens and images as the torch reference, the stepwise API,
thread safety, the CLI, and a clear error for every kind of bad input.

Runs in the full environment (building its bundle with torch) and in a runtime-only environment
(`pip install .`, no torch) against a bundle prepared by `python -m tests.runtime_fixture DIR`
and named in PROLOGUE_TEST_BUNDLE_DIR.
"""

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from prologue_export.runtime import Bundle, BundleError, Generator, ImageError, InputError

CASES = {
    "cfg_split": ([1, 2, 3, 10], {"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7,
                                  "visual_cfg_schedule": "cosine", "visual_cfg_scale": 3.0,
                                  "visual_cfg_power": 0.5}, 0),
    "no_cfg": ([4, 5], {"cfg": 0.0, "semantic_temperature": 0.8, "temperature": 0.9, "topK": 30, "topP": 0.95}, 7),
}


@pytest.fixture(scope="module")
def prepared(runtime_fixture_root):
    root = runtime_fixture_root
    if not os.environ.get("PROLOGUE_TEST_BUNDLE_DIR"):
        from tests.runtime_fixture import CASES as BUILT_CASES

        assert BUILT_CASES == CASES
    return root, np.load(root / "reference.npz")


@pytest.fixture(scope="module")
def gen(prepared):
    return Generator.from_bundle(prepared[0] / "bundle", backend="cpu")


def _pixels_match(got, ref_u8, ref_float):
    diff = np.abs(got.astype(int) - ref_u8.astype(int))
    y = 127.5 * ref_float.astype(np.float64) + 128
    near = np.abs(y - np.round(y)) < 1e-3
    assert diff.max() <= 1 and np.all(near[diff == 1])


@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_and_images_as_torch(gen, prepared, case):
    ref = prepared[1]
    classes, settings, seed = CASES[case]
    run = gen.start(classes, seed=seed, sampling=settings).run()
    np.testing.assert_array_equal(run.tokens, ref[f"{case}_tokens"])
    images = run.images()
    assert images.dtype == np.uint8 and images.shape == (len(classes), 32, 32, 1)
    _pixels_match(images, ref[f"{case}_images"], ref[f"{case}_images_float"])
    np.testing.assert_array_equal(gen.generate(classes, seed=seed, sampling=settings), images)


def test_stepwise_interface(gen, prepared):
    classes, settings, seed = CASES["cfg_split"]
    run = gen.start(classes, seed=seed, sampling=settings)
    steps = 0
    while not run.done:
        tokens = run.step()
        assert tokens.shape == (len(classes),)
        steps += 1
    assert steps == gen.bundle.vocab.seq_len
    np.testing.assert_array_equal(run.tokens, prepared[1]["cfg_split_tokens"])
    with pytest.raises(InputError, match="finished"):
        run.step()


def test_variations_and_reconstruct(gen, prepared):
    ref = prepared[1]
    source = ref["cfg_split_images"][0]
    prologue, visual = gen.encode(source[None])
    np.testing.assert_array_equal(prologue, ref["source_prologue"])
    np.testing.assert_array_equal(visual, ref["source_visual"])
    run = gen.start([10] * 3, seed=5, prologue_ids=np.repeat(prologue, 3, 0), cfg=0.0).run()
    np.testing.assert_array_equal(run.tokens, ref["variations_tokens"])
    images = gen.variations(source, n=3, seed=5)
    np.testing.assert_array_equal(images, run.images())
    assert (run.tokens[:, :8] - 256 == prologue).all()
    recon = gen.reconstruct(np.stack([source, source]))
    np.testing.assert_array_equal(recon, gen.decode(np.repeat(visual, 2, 0)))


def test_thread_safety(gen, prepared):
    """One Generator shared by 4 threads gives each call the same result as alone."""
    classes, settings, _ = CASES["cfg_split"]
    expected = {seed: gen.generate(classes[:2], seed=seed, sampling=settings) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = gen.generate(classes[:2], seed=seed, sampling=settings)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in range(4):
        np.testing.assert_array_equal(results[seed], expected[seed])

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



def test_2d_bundle_generates_and_refuses_variations(prepared):
    gen2 = Generator.from_bundle(prepared[0] / "bundle2d")
    images = gen2.generate([1, 2], seed=0, cfg=3.0)
    assert images.shape == (2, 32, 32, 1)
    with pytest.raises(BundleError, match="no prologue"):
        gen2.variations(images[0], n=2, seed=0)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda g: g.generate([11], seed=0), InputError, r"class ids must lie in \[0, 10\]"),
        (lambda g: g.generate([1.5], seed=0), InputError, "1-D integer"),
        (lambda g: g.generate([1], seed=1.5), InputError, "seed must be a non-negative integer"),
        (lambda g: g.generate([1], seed="7"), InputError, "seed must be a non-negative integer"),
        (lambda g: g.generate([1], seed=0, temperature=0.0), InputError, "temperature must be a finite number > 0"),
        (lambda g: g.generate([1], seed=0, temperature=float("nan")), InputError, "temperature must be a finite"),
        (lambda g: g.generate([1], seed=0, cfg=float("nan")), InputError, "cfg must be a finite number >= 0"),
        (lambda g: g.generate([1], seed=0, cfg=-1.0), InputError, "cfg must be a finite number >= 0"),
        (lambda g: g.generate([1], seed=0, top_k=65), InputError, "top_k 65 is larger than the smallest segment"),
        (lambda g: g.generate([1], seed=0, top_p=1.5), InputError, "top_p must be in"),
        (lambda g: g.generate([1], seed=0, sampling={"cfg_scale": 2}), InputError, "not an official sampling option"),
        (lambda g: g.variations(np.zeros((32, 32, 1), np.uint8), n=0, seed=0), InputError, "n must be an integer >= 1"),
        (lambda g: g.reconstruct(np.zeros((1, 28, 28, 1), np.uint8)), ImageError, r"\[B, 32, 32, 1\]"),
        (lambda g: g.reconstruct(np.zeros((1, 32, 32, 1), np.float32)), ImageError, "uint8"),
        (lambda g: g.decode(np.full((1, 64), 256)), InputError, r"visual ids must lie in \[0, 256\)"),
    ],
)
def test_bad_input_raises_specific_errors(gen, call, error, message):
    with pytest.raises(error, match=message):
        call(gen)


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


def test_settings_merge_over_the_bundle_defaults(gen):
    defaults = gen.bundle.sampling_defaults
    merged = gen.settings({"temperature": 0.7}, top_k=5)
    assert (merged.temperature, merged.top_k, merged.cfg) == (0.7, 5, defaults.cfg)
    official = gen.settings({"semantic_temperature": 0.5, "topK": 3.0})  # the release's names; topK as float
    assert (official.prologue_temperature, official.top_k, official.cfg) == (0.5, 3, defaults.cfg)
    assert gen.settings() == defaults


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
    _pixels_match(tiles[..., None], ref, prepared[1]["cfg_split_images_float"])


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
