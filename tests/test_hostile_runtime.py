"""Hostile input to the runtime (issue 15): every bad argument is a one-line `PrologueError`
subclass (mostly `InputError`), never a numpy / Python traceback; a request over
`MAX_IMAGES_PER_CALL` is refused before any work. How a good request runs (`max_batch` images at
a time with the one-batch noise stream): tests/test_generator.py and tests/test_noise.py.

Torch-free: runs against PROLOGUE_TEST_BUNDLE_DIR (`python -m tests.runtime_fixture DIR`) or
builds that bundle with torch when it is there.
"""


import numpy as np
import pytest

from prologue_export.runtime import Generator, ImageError, InputError, PrologueError
from prologue_export.runtime.bundle import BundleError
from prologue_export.runtime.loop import MAX_IMAGES_PER_CALL
from prologue_export.runtime.settings import MAX_CFG_VALUE, MAX_TEMPERATURE, MIN_TEMPERATURE


@pytest.fixture(scope="module")
def root(runtime_fixture_root):
    return runtime_fixture_root


@pytest.fixture(scope="module")
def gen(root):
    with Generator.from_bundle(root / "bundle", backend="cpu") as g:
        yield g


@pytest.fixture(scope="module")
def gen2d(root):
    with Generator.from_bundle(root / "bundle2d", backend="cpu") as g:
        yield g


def refused(call, error=InputError, match=None):
    """`call()` raises `error` (a PrologueError) with a one-line message; nothing else escapes."""
    with pytest.raises(PrologueError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    assert message and "\n" not in message and len(message) < 400, message
    if match is not None:
        assert match in message, message
    return message


# -- one bad argument per method, with its error type and message ------------------------------


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


# -- class ids ---------------------------------------------------------------------------------

BAD_CLASS_IDS = {
    "ragged": [[1, 2], [3]],
    "nested": [[1, 2], [3, 4]],
    "float": [1.5],
    "float_array": np.array([1.0, 2.0]),
    "string": "3",
    "strings": ["a", "b"],
    "none": None,
    "none_in_list": [1, None],
    "object_array": np.array([1, 2], dtype=object),
    "bool_array": np.array([True, False]),
    "bools": [True],
    "bool": True,
    "huge_int": [2**70],
    "huge_uint": np.array([2**64 - 1], dtype=np.uint64),
    "negative": [-1],
    "above_null": [11],
    "empty": [],
    "empty_array": np.zeros(0, dtype=np.int64),
    "dict": {1: 2},
    "generator": (c for c in [1, 2]),
    "over_limit": [0] * (MAX_IMAGES_PER_CALL + 1),
    "ten_thousand": np.zeros(10_000, dtype=np.int64),
    "complex": np.array([1 + 0j]),
}


@pytest.mark.parametrize("name", list(BAD_CLASS_IDS))
def test_bad_class_ids(gen, name):
    refused(lambda: gen.generate(BAD_CLASS_IDS[name], seed=0))


@pytest.mark.parametrize("name", ["ragged", "huge_int", "over_limit", "object_array"])
def test_bad_class_ids_stepwise(gen, name):
    refused(lambda: gen.start(BAD_CLASS_IDS[name], seed=0))


# -- seeds -------------------------------------------------------------------------------------

BAD_SEEDS = {"negative": -1, "numpy_negative": np.int64(-3), "float": 1.5, "numpy_float": np.float64(1.0),
             "huge": 2**70, "just_above_64_bits": 2**64, "bool": True, "string": "7", "list": [1], "missing": None}


@pytest.mark.parametrize("name", list(BAD_SEEDS))
def test_bad_seed(gen, name):
    refused(lambda: gen.generate([1], seed=BAD_SEEDS[name]))


def test_largest_seed_is_accepted(gen):
    assert gen.generate([1], seed=2**64 - 1).shape == (1, 32, 32, 1)


# -- sampling settings: checked in the type and range the float32 graph uses -------------------

BAD_SETTINGS = {
    "cfg_1e300": {"cfg": 1e300},
    "cfg_above_bound": {"cfg": MAX_CFG_VALUE * 10},
    "cfg_inf": {"cfg": float("inf")},
    "cfg_negative": {"cfg": -1.0},
    "cfg_bool": {"cfg": True},
    "cfg_string": {"cfg": "3.0"},
    "cfg_none": {"cfg": None},
    "cfg_huge_int": {"cfg": 2**2000},
    "cfg_list": {"cfg": [3.0]},
    "temperature_underflows_float32": {"temperature": 1e-46},
    "temperature_below_minimum": {"temperature": MIN_TEMPERATURE / 10},
    "temperature_1e300": {"temperature": 1e300},
    "temperature_zero": {"temperature": 0.0},
    "temperature_nan": {"temperature": float("nan")},
    "temperature_none": {"temperature": None},
    "prologue_temperature_negative": {"prologue_temperature": -1.0},
    "prologue_temperature_zero": {"prologue_temperature": 0.0},
    "prologue_temperature_string": {"prologue_temperature": "0.5"},
    "top_k_bool": {"top_k": True},
    "top_k_negative": {"top_k": -1},
    "top_k_float": {"top_k": 1.5},
    "top_k_string": {"top_k": "3"},
    "top_k_huge": {"top_k": 2**70},
    "top_k_above_vocab": {"top_k": 65},
    "top_p_nan": {"top_p": float("nan")},
    "top_p_above_one": {"top_p": 1.5},
    "top_p_negative": {"top_p": -0.1},
    "top_p_underflows_float32": {"top_p": 1e-300},
    "top_p_rounds_to_one": {"top_p": 1 - 1e-10},
    "top_p_bool": {"top_p": False},
    "schedule_unknown": {"cfg_schedule": "exp"},
    "schedule_number": {"cfg_schedule": 3},
    "schedule_list": {"visual_cfg_schedule": ["constant"]},
    "power_inf": {"cfg_power": float("inf")},
    "power_negative": {"cfg_power": -1.0},
    "power_huge": {"visual_cfg_power": 1e300},
    "start_nan": {"visual_cfg_start": float("nan")},
    "segment_scale_huge": {"prologue_cfg_scale": 1e300},
    "unknown_field": {"cfg_scale": 2.0},
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_setting_as_keyword(gen, name):
    refused(lambda: gen.generate([1], seed=0, **BAD_SETTINGS[name]))


@pytest.mark.parametrize("name", ["cfg_1e300", "temperature_underflows_float32", "top_k_bool", "cfg_string",
                                  "prologue_temperature_negative", "schedule_list"])
def test_bad_setting_in_sampling_dict(gen, name):
    refused(lambda: gen.settings(sampling=BAD_SETTINGS[name]))


BAD_SAMPLING = {"list": [1, 2], "string": "x", "number": 3, "int_keys": {1: 2}, "official_bool_topk": {"topK": True},
                "official_string": {"semantic_temperature": "1"}, "official_nan": {"semantic_cfg_scale": float("nan")},
                "unknown": {"bogus": 1}}


@pytest.mark.parametrize("name", list(BAD_SAMPLING))
def test_bad_sampling_argument(gen, name):
    refused(lambda: gen.generate([1], seed=0, sampling=BAD_SAMPLING[name]))


def test_bounds_themselves_are_accepted(gen):
    for overrides in ({"temperature": MIN_TEMPERATURE}, {"temperature": MAX_TEMPERATURE}, {"cfg": MAX_CFG_VALUE},
                      {"top_p": 1.0}, {"top_p": 1e-6}, {"top_k": 0}, {"top_k": 64}, {"prologue_temperature": None},
                      {"cfg": np.float32(2.5)}, {"top_k": np.int64(3)}, {"cfg_power": 0.0}):
        gen.settings(**overrides)


# -- explicit uniform noise --------------------------------------------------------------------


def _uniform(gen, batch=1, value=0.5, dtype=np.float32):
    v = gen.bundle.vocab
    return np.full((batch, v.seq_len, v.vocab_size), value, dtype=dtype)


BAD_UNIFORM = {
    "wrong_shape": lambda g: _uniform(g)[:, :-1],
    "int_dtype": lambda g: _uniform(g).astype(np.int64),
    "bool_dtype": lambda g: _uniform(g) > 0,
    "complex": lambda g: _uniform(g).astype(np.complex64),
    "object": lambda g: _uniform(g).astype(object),
    "nan": lambda g: _uniform(g, value=float("nan")),
    "inf": lambda g: _uniform(g, value=float("inf")),
    "one": lambda g: _uniform(g, value=1.0),
    "zero": lambda g: _uniform(g, value=0.0),
    "negative": lambda g: _uniform(g, value=-0.5),
    "rounds_to_one_in_float32": lambda g: _uniform(g, value=1 - 1e-9, dtype=np.float64),
    "underflows_in_float32": lambda g: _uniform(g, value=1e-300, dtype=np.float64),
    "ragged": lambda g: [[[0.5]], [[0.5, 0.5]]],
    "string": lambda g: "noise",
}


@pytest.mark.parametrize("name", list(BAD_UNIFORM))
def test_bad_uniform(gen, name):
    refused(lambda: gen.generate([1], uniform=BAD_UNIFORM[name](gen)))


def test_seed_and_uniform_together(gen):
    refused(lambda: gen.generate([1], seed=0, uniform=_uniform(gen)), match="exactly one")


# -- variations, decode, encode / reconstruct, prologue ids, progress ----------------------------

BAD_VARIATIONS = {
    "n_zero": {"n": 0}, "n_negative": {"n": -1}, "n_huge": {"n": 10**9}, "n_over_limit": {"n": MAX_IMAGES_PER_CALL + 1},
    "n_string": {"n": "3"}, "n_float": {"n": 1.5}, "n_bool": {"n": True}, "n_none": {"n": None},
    "class_huge": {"n": 1, "class_id": 2**70}, "class_string": {"n": 1, "class_id": "x"},
    "class_out_of_range": {"n": 1, "class_id": 11}, "class_bool": {"n": 1, "class_id": True},
    "class_list": {"n": 1, "class_id": [1]}, "seed_negative": {"n": 1, "seed": -1},
    "setting_bad": {"n": 1, "temperature": 1e-46}, "progress_not_callable": {"n": 1, "progress": 3},
}


@pytest.mark.parametrize("name", list(BAD_VARIATIONS))
def test_bad_variations(gen, name):
    kwargs = {"seed": 0, **BAD_VARIATIONS[name]}
    refused(lambda: gen.variations(np.zeros((32, 32, 1), np.uint8), **kwargs))


BAD_VARIATION_IMAGES = {"float": np.zeros((32, 32, 1)), "ragged": [[[0]], [[0, 0]]], "wrong_size": np.zeros((8, 8, 1), np.uint8),
                        "none": None, "empty_batch": np.zeros((0, 32, 32, 1), np.uint8)}


@pytest.mark.parametrize("name", list(BAD_VARIATION_IMAGES))
def test_bad_variation_image(gen, name):
    refused(lambda: gen.variations(BAD_VARIATION_IMAGES[name], n=1, seed=0), error=(InputError, ImageError))


BAD_VISUAL_IDS = {
    "zero_rows": np.zeros((0, 64), np.int64), "float": np.zeros((1, 64)), "bool": np.zeros((1, 64), bool),
    "object": np.zeros((1, 64), object), "strings": np.full((1, 64), "a"), "out_of_range": np.full((1, 64), 256),
    "negative": np.full((1, 64), -1), "huge_uint": np.full((1, 64), 2**64 - 1, np.uint64), "three_d": np.zeros((1, 64, 1), int),
    "wrong_length": np.zeros((1, 63), int), "one_d": np.zeros(64, int), "ragged": [[0] * 64, [0]], "none": None,
    "huge_int_list": [[2**70] * 64], "over_limit": np.zeros((MAX_IMAGES_PER_CALL + 1, 64), np.int64),
}


@pytest.mark.parametrize("name", list(BAD_VISUAL_IDS))
def test_bad_decode(gen, name):
    refused(lambda: gen.decode(BAD_VISUAL_IDS[name]))


BAD_IMAGES = {"empty_batch": np.zeros((0, 32, 32, 1), np.uint8), "empty_list": [], "float": np.zeros((1, 32, 32, 1)),
              "ragged": [[[[0]]], [[[0, 0]]]], "none": None, "wrong_channels": np.zeros((1, 32, 32, 3), np.uint8),
              "over_limit": np.zeros((MAX_IMAGES_PER_CALL + 1, 32, 32, 1), np.uint8)}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_reconstruct(gen, name):
    refused(lambda: gen.reconstruct(BAD_IMAGES[name]), error=(InputError, ImageError))


BAD_PROLOGUE_IDS = {"wrong_shape": np.zeros((1, 7), np.int64), "wrong_batch": np.zeros((2, 8), np.int64),
                    "float": np.zeros((1, 8)), "bool": np.zeros((1, 8), bool), "out_of_range": np.full((1, 8), 64),
                    "negative": np.full((1, 8), -1), "ragged": [[0] * 8, [0]], "huge": [[2**70] * 8], "none_list": [None]}


@pytest.mark.parametrize("name", list(BAD_PROLOGUE_IDS))
def test_bad_prologue_ids(gen, name):
    refused(lambda: gen.start([1], seed=0, prologue_ids=BAD_PROLOGUE_IDS[name]))


def test_prologue_ids_on_a_2d_bundle(gen2d):
    refused(lambda: gen2d.start([1], seed=0, prologue_ids=np.zeros((1, 8), np.int64)))
    refused(lambda: gen2d.variations(np.zeros((32, 32, 1), np.uint8), n=1, seed=0), error=BundleError)


@pytest.mark.parametrize("progress", [3, "x", object()])
def test_progress_not_callable(gen, progress):
    refused(lambda: gen.generate([1], seed=0, progress=progress))
    refused(lambda: gen.start([1], seed=0).run(progress))


# -- bounded requests --------------------------------------------------------------------------


def test_over_limit_refused_before_any_work(gen, monkeypatch):
    monkeypatch.setattr(gen, "_ar_state", lambda rows, batch: pytest.fail("a state was made"))
    message = refused(lambda: gen.generate([0] * (MAX_IMAGES_PER_CALL + 1), seed=0))
    assert str(MAX_IMAGES_PER_CALL) in message
    refused(lambda: gen.generate([0] * 5, seed=0, temperature=1e-46))
