"""`prologue_export.runtime.Generator` and the `Generation` it starts, on the CPU backend: the
same tokens and images as the torch reference (`start(...).run()`, `generate`, stepwise
`Generation.step`), variations and reconstruction, settings merged over the bundle's defaults,
2d bundles, one Generator shared by threads, `sample_tokens` run `max_batch` images at a time
with the one-batch noise stream, and generations closing their state.

Bad arguments to every method: tests/test_hostile_runtime.py; the noise stream itself:
tests/test_noise.py; the native TensorRT backend behind a Generator: tests/test_gpu_backends.py.
Torch-free: runs against PROLOGUE_TEST_BUNDLE_DIR (`python -m tests.runtime_fixture DIR`) or
builds that bundle with torch when it is there.
"""

import threading

import numpy as np
import pytest

from prologue_export.runtime import BundleError, Generator, InputError
from prologue_export.runtime.loop import Noise

from .conftest import CASES, pixels_match

SPLIT = CASES["cfg_split"][1]  # split CFG: constant for the prologue, cosine for the visual tokens


@pytest.fixture(scope="module")
def gen(prepared):
    with Generator.from_bundle(prepared[0] / "bundle", backend="cpu") as g:
        yield g


# --------------------------------------------------------------------------- the torch reference


@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_and_images_as_torch(gen, prepared, case):
    ref = prepared[1]
    classes, settings, seed = CASES[case]
    run = gen.start(classes, seed=seed, sampling=settings).run()
    np.testing.assert_array_equal(run.tokens, ref[f"{case}_tokens"])
    images = run.images()
    assert images.dtype == np.uint8 and images.shape == (len(classes), 32, 32, 1)
    pixels_match(images, ref[f"{case}_images"], ref[f"{case}_images_float"])
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


def test_2d_bundle_generates_and_refuses_variations(prepared):
    gen2 = Generator.from_bundle(prepared[0] / "bundle2d")
    images = gen2.generate([1, 2], seed=0, cfg=3.0)
    assert images.shape == (2, 32, 32, 1)
    with pytest.raises(BundleError, match="no prologue"):
        gen2.variations(images[0], n=2, seed=0)


# --------------------------------------------------------------------------- settings


def test_settings_merge_over_the_bundle_defaults(gen):
    defaults = gen.bundle.sampling_defaults
    merged = gen.settings({"temperature": 0.7}, top_k=5)
    assert (merged.temperature, merged.top_k, merged.cfg) == (0.7, 5, defaults.cfg)
    official = gen.settings({"semantic_temperature": 0.5, "topK": 3.0})  # the release's names; topK as float
    assert (official.prologue_temperature, official.top_k, official.cfg) == (0.5, 3, defaults.cfg)
    assert gen.settings() == defaults


# --------------------------------------------------------------------------- threads


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


# --------------------------------------------------------------------------- max_batch images at a time


def _unchunked(gen, classes, **kwargs):
    """The reference: one TokenLoop over the whole batch (ONNX Runtime graphs take any batch)."""
    settings = gen.settings(kwargs.pop("sampling", None), **kwargs.pop("overrides", {}))
    v = gen.bundle.vocab
    noise = Noise(len(classes), v.seq_len, v.vocab_size, seed=kwargs.pop("seed", None), uniform=kwargs.pop("uniform", None))
    with gen.generation(classes, noise, settings, **kwargs) as run:
        return run.run().tokens


@pytest.mark.parametrize("case", ["split_cfg", "no_cfg_topk", "fixed_prologue", "uniform"])
def test_chunked_tokens_equal_one_batch(gen, case, monkeypatch):
    n = 2 * gen.max_batch + 1  # three chunks, the last one short
    classes = np.arange(n) % 11
    v = gen.bundle.vocab
    kwargs = {"split_cfg": dict(seed=3, sampling=SPLIT),
              "no_cfg_topk": dict(seed=9, overrides={"cfg": 0.0, "top_k": 20, "top_p": 0.9, "prologue_temperature": 0.8}),
              "fixed_prologue": dict(seed=5, prologue_ids=np.arange(n * 8).reshape(n, 8) % 64, overrides={"cfg": 0.0}),
              "uniform": dict(uniform=np.random.default_rng(1).uniform(0.01, 0.99, (n, v.seq_len, v.vocab_size)),
                              sampling=SPLIT)}[case]
    expected = _unchunked(gen, classes, **dict(kwargs))
    batches = []
    make_state = gen._ar_state
    monkeypatch.setattr(gen, "_ar_state", lambda rows, batch: batches.append(batch) or make_state(rows, batch))
    got = gen.sample_tokens(classes, sampling=kwargs.get("sampling"), seed=kwargs.get("seed"),
                            uniform=kwargs.get("uniform"), prologue_ids=kwargs.get("prologue_ids"),
                            **kwargs.get("overrides", {}))
    np.testing.assert_array_equal(got, expected)
    assert batches == [gen.max_batch, gen.max_batch, 1]  # memory: one chunk's KV cache at a time


def test_generate_and_variations_chunk(gen):
    n = gen.max_batch + 2
    done = []
    images = gen.generate(list(range(n)), seed=0, progress=lambda d, t: done.append((d, t)))
    assert images.shape == (n, 32, 32, 1) and images.dtype == np.uint8
    T = gen.bundle.vocab.seq_len
    assert done[-1] == (2 * T, 2 * T) and [d for d, _ in done] == sorted(d for d, _ in done)
    tokens = gen.sample_tokens(list(range(n)), seed=0)
    np.testing.assert_array_equal(images, gen.decode(tokens[:, gen.bundle.vocab.visual_start:]))
    variations = gen.variations(images[0], n=n, seed=1)
    assert variations.shape == (n, 32, 32, 1)


# --------------------------------------------------------------------------- closing


def test_cpu_generations_close_their_host_state(prepared, monkeypatch):
    gen = Generator.from_bundle(prepared[0] / "bundle", backend="cpu")
    states = []
    make = gen.backend.ar_state
    monkeypatch.setattr(gen.backend, "ar_state", lambda *a: states.append(make(*a)) or states[-1])
    gen.generate([1], seed=0)
    with pytest.raises(InputError):
        gen.generate([1], seed=0, progress=lambda d, t: (_ for _ in ()).throw(InputError("stop")))
    run = gen.start([1], seed=0)
    run.step()
    assert len(states) == 3 and states[0].closed and states[1].closed and not states[2].closed
    with run:
        pass
    assert states[2].closed and states[2].k_cache is None
    with pytest.raises(InputError, match="closed"):
        states[2].step({})


# --------------------------------------------------------------------------- the calls the server shares


def test_generation_with_joined_noise_equals_each_request_alone(gen):
    """`generation` with rows of two requests' streams side by side (what `prologue serve`'s batcher
    runs) gives each request the tokens `sample_tokens` gives it alone."""
    v = gen.bundle.vocab
    settings = gen.settings(cfg=1.5)
    requests = [(np.array([1, 2, 3]), 11), (np.array([4, 4]), 12)]
    parts = [Noise(len(c), v.seq_len, v.vocab_size, seed=seed) for c, seed in requests]

    class Joined:
        def at(self, step):
            return np.concatenate([p.at(step) for p in parts])

    with gen.generation(np.concatenate([c for c, _ in requests]), Joined(), settings) as run:
        tokens = run.run().tokens
    assert run.loop.closed
    np.testing.assert_array_equal(tokens[:3], gen.sample_tokens(requests[0][0], seed=11, cfg=1.5))
    np.testing.assert_array_equal(tokens[3:], gen.sample_tokens(requests[1][0], seed=12, cfg=1.5))
    with pytest.raises(InputError, match="SamplingConfig"):
        gen.generation([1], parts[0], {"cfg": 1.5})
    with gen.generation([1, 2], Noise(3, v.seq_len, v.vocab_size, seed=0), settings) as run:  # 3 rows of noise for 2
        with pytest.raises(InputError, match="noise source gave shape"):
            run.step()


def test_variation_settings_is_the_one_policy(gen):
    """Without a class: the null class and CFG off unless `cfg` is given; `variations` follows it."""
    null = gen.bundle.null_class
    class_id, settings = gen.variation_settings()
    assert class_id == null and settings.cfg == 0.0
    class_id, settings = gen.variation_settings(None, cfg=2.5)
    assert class_id == null and settings.cfg == 2.5
    class_id, settings = gen.variation_settings(3, temperature=0.9)
    assert class_id == 3 and settings.cfg == gen.bundle.sampling_defaults.cfg and settings.temperature == 0.9
    for bad in (True, -1, null + 1, "1"):
        with pytest.raises(InputError, match="class_id must be an integer"):
            gen.variation_settings(bad)
    image = gen.generate([5], seed=2)[0]
    prologue = gen.encode(image[None])[0]
    expected = gen.sample_tokens(np.full(2, null), seed=4, prologue_ids=np.repeat(prologue, 2, axis=0), cfg=0.0)
    np.testing.assert_array_equal(gen.variations(image, 2, seed=4), gen.images_of(expected))


def test_token_split(gen):
    tokens = gen.sample_tokens([1, 2], seed=0)
    v = gen.bundle.vocab
    np.testing.assert_array_equal(gen.prologue_of(tokens), tokens[:, :v.num_prologue_tokens] - v.prologue_offset)
    np.testing.assert_array_equal(gen.images_of(tokens), gen.decode(tokens[:, v.visual_start:]))
