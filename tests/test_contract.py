"""The contract between export and the runtime (`runtime/contract.py`): the `ar_step` step inputs
are declared once (`STEP_INPUTS`) and everything else is derived from them; the batch-like axes
have one owner (`batch_ranges`) that the TensorRT profile follows. Torch-free except where marked."""

import numpy as np
import pytest

from prologue_export.runtime import contract
from prologue_export.runtime.bundle import Bundle
from prologue_export.runtime.contract import (STEP_INPUT_NAMES, STEP_INPUTS, ar_step_axes, ar_step_io, batch_axes,
                                              batch_ranges, resolve_shape, step_feeds)

VALUES = dict(input_ids=[[5, 6], [7, 8]], start_pos=3, uniform=np.full((1, 4), 0.5), cfg_scale=2.0, temperature=0.5,
              top_k=7, top_p=0.25)


def test_step_feeds_are_keyed_by_the_contract_names_and_dtypes():
    feeds = step_feeds(**VALUES)
    assert list(feeds) == list(STEP_INPUT_NAMES)
    for spec in STEP_INPUTS:
        array = feeds[spec.name]
        assert array.dtype == np.dtype(spec.dtype) and array.flags["C_CONTIGUOUS"], spec.name
        if spec.shape == (1,):  # a per-call scalar is a [1] tensor (a Python int would be baked into the graph)
            assert array.shape == (1,) and array[0] == np.asarray(VALUES[spec.name], dtype=spec.dtype), spec.name
    assert feeds["input_ids"].shape == (2, 2) and feeds["uniform"].shape == (1, 4)


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_step_feeds_refuse_anything_but_the_contract_inputs(change):
    values = dict(VALUES)
    if change == "missing":
        values.pop("top_p")
    else:
        values["min_p"] = 0.1
    with pytest.raises(TypeError, match="top_p" if change == "missing" else "min_p"):
        step_feeds(**values)


def test_every_step_input_is_declared_with_a_meaning():
    assert len(set(STEP_INPUT_NAMES)) == len(STEP_INPUTS)
    for spec in STEP_INPUTS:
        assert spec.meaning and np.dtype(spec.dtype)
        assert all(isinstance(d, int) or d in ("rows", "batch", "new_tokens", "vocab") for d in spec.shape)
        assert (spec.example is not None) == (spec.shape == (1,)), spec.name  # scalars have a trace value


def test_ar_step_io_takes_the_step_inputs_in_order_then_the_caches():
    inputs, outputs = ar_step_io(layers=2, heads=3, head_dim=4, seq_len=9, vocab_size=11)
    assert [s.name for s in inputs] == [*STEP_INPUT_NAMES, "k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    by_name = {s.name: s for s in inputs}
    for spec in STEP_INPUTS:
        assert by_name[spec.name].dtype == spec.dtype
        assert by_name[spec.name].shape == [11 if d == "vocab" else d for d in spec.shape]
    assert [s.name for s in outputs] == ["next_tokens", "k_new", "v_new", "logits"]


def test_resolve_shape():
    assert resolve_shape(["rows", 3, "new_tokens"], {"rows": 4, "new_tokens": 1}) == (4, 3, 1)
    with pytest.raises(ValueError, match="'batch'"):
        resolve_shape(["batch", 2], {"rows": 4})


@pytest.mark.parametrize("max_batch, opt", [(1, None), (3, None), (8, None), (32, None), (32, 4)])
def test_batch_axes_have_one_owner(max_batch, opt):
    ranges = batch_ranges(max_batch, opt)
    want_opt = min(contract.OPT_BATCH, max_batch) if opt is None else opt
    assert (ranges["batch"].min, ranges["batch"].opt, ranges["batch"].max) == (1, want_opt, max_batch)
    assert (ranges["rows"].min, ranges["rows"].opt, ranges["rows"].max) == (1, 2 * want_opt, 2 * max_batch)
    if opt is None:
        assert batch_axes(max_batch)["batch"] == ranges["batch"]
        axes = ar_step_axes(max_batch, seq_len=17)
        assert axes["batch"] == ranges["batch"] and axes["rows"] == ranges["rows"]
        assert (axes["new_tokens"].min, axes["new_tokens"].opt, axes["new_tokens"].max) == (1, 1, 17)


def test_tensorrt_profile_takes_the_contract_batch_ranges(runtime_fixture_root):
    pytest.importorskip("onnx")
    from prologue_export.export.tensorrt import engine_profile

    bundle = Bundle(runtime_fixture_root / "bundle")
    for max_batch, opt in ((8, None), (6, 2), (1, None)):
        profile = engine_profile(bundle.graphs["ar_step"], max_batch, opt)
        r = batch_ranges(max_batch, opt)
        assert profile["input_ids"]["min"][0] == r["rows"].min and profile["input_ids"]["max"][0] == r["rows"].max
        assert profile["input_ids"]["opt"][0] == r["rows"].opt
        assert [profile["uniform"][k][0] for k in ("min", "opt", "max")] == [r["batch"].min, r["batch"].opt,
                                                                             r["batch"].max]


def test_bundle_specs_are_the_contract(runtime_fixture_root):
    """The manifest's ar_step inputs are the contract's, so the TensorRT backend can size from them."""
    bundle = Bundle(runtime_fixture_root / "bundle")
    specs = {s["name"]: s for s in bundle.graphs["ar_step"]["inputs"]}
    V = bundle.vocab.vocab_size
    for spec in STEP_INPUTS:
        assert specs[spec.name]["dtype"] == spec.dtype
        assert specs[spec.name]["shape"] == [V if d == "vocab" else d for d in spec.shape]


def test_export_traces_with_the_contract_inputs():
    """The graph's sample inputs come from STEP_INPUTS: same names, dtypes and (resolved) shapes."""
    torch = pytest.importorskip("torch")
    from prologue_export.config import model_preset
    from prologue_export.export.graphs import ARStepContract
    from prologue_export.model import PrologueModel

    model = PrologueModel(model_preset("tiny").validate()).eval()
    c = ARStepContract(model, max_batch=4)
    sample = c.sample_inputs(torch.Generator().manual_seed(0))
    assert len(sample) == len(c.inputs)
    B, R = c.sample_batch, 2 * c.sample_batch
    sizes = {"batch": B, "rows": R, "new_tokens": 3}
    for spec, tensor in zip(c.inputs, sample):
        assert str(tensor.dtype).removeprefix("torch.") == spec.dtype, spec.name
        assert tuple(tensor.shape) == resolve_shape(spec.shape, sizes), spec.name
    for spec, tensor in zip(STEP_INPUTS, sample):
        if spec.example is not None:
            assert tensor.item() == spec.example
    dynamic = c.export_dynamic_shapes()
    assert list(dynamic) == ["inputs"] and len(dynamic["inputs"]) == len(c.inputs)
    with torch.no_grad():
        next_tokens, k_new, v_new, logits = c.module()(*sample)
    assert next_tokens.shape == (B,) and logits.shape == (R, model.config.vocab().vocab_size)
