"""The graphs TensorRT builds from, checked on the CPU against what we did not write: onnx-tensorrt's
operator table for TensorRT 10 (export/trt_support.py), at a released vocabulary size (V = 17409,
as prologue-b; narrow widths keep it cheap), and the torch reference sampler's tokens."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from prologue_export.export.errors import ExportError  # noqa: E402
from prologue_export.export.tensorrt import (  # noqa: E402
    cap_topk, prepare_tensorrt, tensorrt_model, trtexec_commands)
from prologue_export.export.trt_support import TOPK_MAX_K, check_model  # noqa: E402
from prologue_export.runtime import Generator  # noqa: E402
from prologue_export.runtime.bundle import Bundle  # noqa: E402
from prologue_export.runtime.contract import ENGINE_GRAPHS, cache_feeds, step_feeds  # noqa: E402
from prologue_export.runtime.files import sha256_file  # noqa: E402
from prologue_export.runtime.loop import InputError  # noqa: E402

from .fakes.tensorrt import fake_tensorrt  # noqa: E402

RELEASED_V = 17409  # prologue-b: 16384 visual + 1024 prologue codes + EOS


@pytest.fixture(scope="module")
def released_vocab(tmp_path_factory):
    """(model, bundle) of a tiny-width model with prologue-b's vocabulary, exported unverified
    (the tests below compare what they need)."""
    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.model import PrologueModel

    from .conftest import randomize_

    cfg = model_preset("tiny")
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, visual_codebook_size=16384, prologue_codebook_size=1024)
    model = randomize_(PrologueModel(cfg.validate()), seed=3).eval()
    assert model.config.vocab().vocab_size == RELEASED_V
    root = tmp_path_factory.mktemp("released_vocab")
    pe.save_checkpoint(model, root / "ckpt")
    export_bundle(root / "ckpt", root / "bundle", max_batch=4, verify=False, log=lambda m: None)
    return model, root / "bundle"


def _load(bundle, graph):
    return onnx.load(str(Bundle(bundle).graph_file(graph)))


# --------------------------------------------------------------------------- the check


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_released_vocab_engine_graphs_pass_the_tensorrt_check(released_vocab, precision):
    _, bundle = released_vocab
    for graph in ENGINE_GRAPHS:
        model, facts = tensorrt_model(_load(bundle, graph), precision, RELEASED_V)
        assert check_model(model) == [], graph
        if graph == "ar_step":
            assert facts["inlined_ifs"] == 2 and facts["top_k_max"] == 1024 and not facts["top_k_capped"]
            assert not [n for n in model.graph.node if n.op_type == "If"]
    # the ONNX Runtime form too (the check walks the If branches)
    assert check_model(_load(bundle, "ar_step")) == []


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    domains = [helper.make_opsetid("com.microsoft", 1)] if any(n.domain for n in nodes) else []
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + domains)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _old_forms():
    """The forms of our earlier graphs that TensorRT 10 cannot build (issue 14), one each."""
    V = RELEASED_V
    f, b, i64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64
    scatter = helper.make_node("ScatterElements", ["mask", "order", "upd"], ["out"], axis=-1, name="top_p_scatter")
    yield "ScatterElements", _model([scatter], [_vi("mask", b, [2, V]), _vi("order", i64, [2, V]),
                                              _vi("upd", b, [2, V])], [_vi("out", b, [2, V])])
    k = numpy_helper.from_array(np.array([V], np.int64), "k")
    topk = helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=-1, name="full_sort")
    yield "K = 17409", _model([topk], [_vi("x", f, [2, V])], [_vi("vals", f, [2, V]), _vi("idx", i64, [2, V])], [k])
    lo, hi = numpy_helper.from_array(np.array(0, np.int64), "lo"), numpy_helper.from_array(np.array(9, np.int64), "hi")
    clip = helper.make_node("Clip", ["ids", "lo", "hi"], ["clamped"], name="clamp_ids")
    yield "Clip", _model([clip], [_vi("ids", i64, [2, 3])], [_vi("clamped", i64, [2, 3])], [lo, hi])
    shape = helper.make_node("Shape", ["image"], ["s"], name="shape_of_uint8")
    yield "Shape", _model([shape], [_vi("image", TensorProto.UINT8, [2, 1, 4, 4])], [_vi("s", i64, [4])])
    nbits = helper.make_node("MatMulNBits", ["a", "w", "scales"], ["y"], domain="com.microsoft", K=4, N=4, bits=4,
                             block_size=32)
    yield "not ONNX standard", _model([nbits], [_vi("a", f, [2, 4]), _vi("w", TensorProto.UINT8, [4, 1, 16]),
                                                _vi("scales", f, [4])], [_vi("y", f, [2, 4])])
    then = helper.make_graph([helper.make_node("ScatterElements", ["mask", "order", "upd"], ["t_out"], axis=-1)],
                             "then", [], [_vi("t_out", b, [2, V])])
    other = helper.make_graph([helper.make_node("Identity", ["mask"], ["e_out"])], "else", [], [_vi("e_out", b, [2, V])])
    branch = helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other, name="top_p_if")
    yield "ScatterElements", _model([branch], [_vi("c", b, []), _vi("mask", b, [2, V]), _vi("order", i64, [2, V]),
                                             _vi("upd", b, [2, V])], [_vi("out", b, [2, V])])
    shape_k = helper.make_node("Shape", ["x"], ["dims"])
    last = numpy_helper.from_array(np.array([-1], np.int64), "last")
    gather = helper.make_node("Gather", ["dims", "last"], ["kk"])
    topk = helper.make_node("TopK", ["x", "kk"], ["vals", "idx"], axis=-1)
    yield "K is computed", _model([shape_k, gather, topk], [_vi("x", f, [2, V])],
                                  [_vi("vals", f, [2, V]), _vi("idx", i64, [2, V])], [last])


@pytest.mark.parametrize("what,model", list(_old_forms()))
def test_the_old_graph_forms_fail_the_check(what, model):
    problems = check_model(model)
    assert len(problems) == 1 and what in problems[0], problems


def test_topk_above_the_tensorrt_limit_is_capped():
    """A 2d model's ar_step keeps up to 16384 (its top_k limit); the TensorRT copy keeps 3839."""
    V = 16384
    k = numpy_helper.from_array(np.array([V], np.int64), "k")
    topk = helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=-1, name="best")
    model = _model([topk], [_vi("x", TensorProto.FLOAT, [2, V])],
                   [_vi("vals", TensorProto.FLOAT, [2, "k"]), _vi("idx", TensorProto.INT64, [2, "k"])], [k])
    assert check_model(model)
    capped, cap, changed = cap_topk(model)
    assert (cap, changed) == (TOPK_MAX_K, True) and check_model(capped) == []
    x = np.random.default_rng(0).standard_normal((2, V)).astype(np.float32)
    full = ort.InferenceSession(model.SerializeToString()).run(["vals"], {"x": x})[0]
    cut = ort.InferenceSession(capped.SerializeToString()).run(["vals"], {"x": x})[0]
    assert cut.shape == (2, TOPK_MAX_K) and np.array_equal(cut, full[:, :TOPK_MAX_K])


# --------------------------------------------------------------------------- same tokens


MODES = {
    "cfg": {"cfg": 2.0},
    "no_cfg_temperatures": {"cfg": 0.0, "semantic_temperature": 0.8, "temperature": 1.3},
    "top_k": {"cfg": 1.5, "top_k": 40},
    "top_k_at_the_cap": {"cfg": 0.0, "top_k": 1024},
    "top_p": {"cfg": 2.0, "top_p": 0.9},
    "top_p_small": {"cfg": 0.0, "top_p": 0.3, "temperature": 0.7},
    "top_k_top_p": {"cfg": 3.0, "top_k": 300, "top_p": 0.95},
    "greedy": {"cfg": 2.0, "top_k": 1},
    "split_cfg": {"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7, "visual_cfg_schedule": "cosine",
                  "visual_cfg_scale": 3.0, "visual_cfg_power": 0.5, "topP": 0.8},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_sampling_mode_gives_the_torch_tokens_at_released_vocab(released_vocab, mode):
    import prologue_export as pe

    model, bundle = released_vocab
    classes = [1, 7, 3]
    ref = pe.sample(model.ar, classes, MODES[mode], seed=11)
    got = Generator.from_bundle(bundle, backend="cpu").start(classes, sampling=MODES[mode], seed=11).run().tokens
    assert np.array_equal(np.asarray(ref.cpu()), got), f"{mode}: {(np.asarray(ref.cpu()) != got).sum()} tokens differ"


def test_the_tensorrt_form_of_ar_step_samples_what_the_bundle_graph_samples(released_vocab, tmp_path):
    """The file an engine is built from (Ifs inlined: both branches run, a Where picks), run by
    ONNX Runtime on the CPU, against the bundle's graph, for each top-k/top-p setting."""
    model, bundle = released_vocab
    trt_form, _ = tensorrt_model(_load(bundle, "ar_step"), "fp32", RELEASED_V)
    a = ort.InferenceSession(str(Bundle(bundle).graph_file("ar_step")), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(trt_form.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg, rng = model.config, np.random.default_rng(0)
    L, H, d, S = cfg.ar.layers, cfg.ar.heads, cfg.ar.head_dim, cfg.vocab().seq_len
    cache = np.zeros((L, 4, H, S, d), np.float32)
    ids = np.array([[RELEASED_V + 1], [RELEASED_V + 2], [RELEASED_V + 10], [RELEASED_V + 10]])
    for top_k, top_p in ((0, 0.0), (50, 0.0), (0, 0.9), (200, 0.5), (1024, 0.99)):
        for position in (0, 9, 40):
            feeds = {**step_feeds(input_ids=ids, start_pos=position, uniform=rng.random((2, RELEASED_V), dtype=np.float32),
                                  cfg_scale=2.0, temperature=1.0, top_k=top_k, top_p=top_p),
                     **cache_feeds(cache + rng.standard_normal(cache.shape).astype(np.float32), cache)}
            want, got = a.run(["next_tokens"], feeds)[0], b.run(["next_tokens"], feeds)[0]
            assert np.array_equal(want, got), (top_k, top_p, position)


# --------------------------------------------------------------------------- the bundle's tensorrt section


def test_prepare_writes_checked_files_and_trtexec_commands(released_vocab, tmp_path):
    from prologue_export.cli import main

    _, source = released_vocab
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    section = prepare_tensorrt(bundle, "fp16", log=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tensorrt"]["fp16"] == section
    for graph, entry in section["graphs"].items():
        assert entry["onnx"] == f"{graph}.fp16.trt.onnx" and entry["onnx"] in manifest["files"]
        assert check_model(bundle / entry["onnx"]) == []
    Bundle(bundle)  # every new file is vouched for
    fp32 = prepare_tensorrt(bundle, "fp32", max_batch=2, log=lambda m: None)
    assert fp32["graphs"]["decoder"]["onnx"] == "decoder.onnx"  # nothing to rewrite: built from the bundle's own file
    assert fp32["graphs"]["ar_step"]["onnx"] == "ar_step.fp32.trt.onnx"
    lines = trtexec_commands(bundle, "fp32")
    assert len(lines) == 3 and all("--stronglyTyped" in line and "--saveEngine=" in line for line in lines)
    ar_line = next(line for line in lines if "ar_step.fp32.trt.onnx" in line)
    assert "--maxShapes=input_ids:4x73," in ar_line and "uniform:2x17409" in ar_line
    assert main(["build-engines", str(bundle), "--precision", "fp32", "--print-trtexec", "--max-batch", "2"]) == 0
    Bundle(bundle)
    with pytest.raises(ExportError, match="no TensorRT bf16 files"):
        trtexec_commands(bundle, "bf16")


# --------------------------------------------------------------------------- --max-batch 1


def test_max_batch_one_exports_a_static_batch(tmp_path):
    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.model import PrologueModel

    from .conftest import randomize_

    model = randomize_(PrologueModel(model_preset("tiny").validate()), seed=5).eval()
    pe.save_checkpoint(model, tmp_path / "ckpt")
    manifest = export_bundle(tmp_path / "ckpt", tmp_path / "b1", max_batch=1, log=lambda m: None)
    assert manifest["verification"]["passed"]  # ONNX Runtime vs torch, batch 1
    assert manifest["graphs"]["decoder"]["inputs"][0]["shape"][0] == 1 and "batch" not in manifest["graphs"]["decoder"]["dynamic_axes"]
    assert manifest["graphs"]["ar_step"]["dynamic_axes"]["rows"]["max"] == 2  # CFG: cond + uncond
    ref = pe.sample(model.ar, [4], {"cfg": 2.0}, seed=3)
    got = Generator.from_bundle(tmp_path / "b1", backend="cpu").start([4], seed=3, cfg=2.0).run().tokens
    assert np.array_equal(np.asarray(ref.cpu()), got)
    gen = Generator.from_bundle(tmp_path / "b1", backend="cpu")
    assert gen.generate([1, 2], seed=0).shape[0] == 2  # generate runs one image at a time here
    with pytest.raises(InputError, match="--max-batch 1"):  # a stepwise generation holds the whole batch
        gen.start([1, 2], seed=0)
    profile = prepare_tensorrt(tmp_path / "b1", "fp32", log=lambda m: None)["graphs"]["decoder"]["profile"]
    assert profile["visual_ids"] == {"min": [1, 64], "opt": [1, 64], "max": [1, 64]}


# --------------------------------------------------------------------------- build_engines with a fake builder


def test_build_engines_builds_from_the_checked_files(released_vocab, tmp_path, monkeypatch):
    import sys

    from prologue_export.export import tensorrt as export_trt

    _, source = released_vocab
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    monkeypatch.setattr(export_trt, "device_info", lambda: {"name": "Fake GPU", "compute_capability": "9.0"})
    refusing = fake_tensorrt(timing_cache_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", refusing)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    with pytest.raises(ExportError, match="timing cache"):
        export_trt.build_engines(bundle, "fp16", timing_cache=tmp_path / "cache", log=lambda m: None)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before  # nothing half-installed: all or nothing
    trt, parsed = fake_tensorrt(), []

    class Recording(trt.OnnxParser):  # what TensorRT reads, at the moment it reads it
        def parse_from_file(self, path):
            parsed.append(sha256_file(path))
            return super().parse_from_file(path)

    trt.OnnxParser = Recording
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engines = export_trt.build_engines(bundle, "fp16", timing_cache=tmp_path / "cache", log=lambda m: None)
    b = Bundle(bundle)  # engines and ONNX copies are vouched for
    manifest = b.manifest
    assert engines.digest == b.digest  # what build-engines reports is the manifest it wrote
    section = manifest["tensorrt"]["fp16"]["graphs"]
    assert parsed == [manifest["files"][section[g]["onnx"]]["sha256"] for g in section]  # exactly the checked files
    assert set(trt.flags) == {1 << 5}  # strongly typed networks
    ar = trt.shapes[trt.parsed[list(section).index("ar_step")]]
    assert ar["input_ids"] == ([1, 1], [8, 1], [8, 73])  # rows up to 2 x max batch 4; new tokens 1..T
    assert engines["ar_step"]["top_k_max"] == 1024 and engines["ar_step"]["onnx"] == "ar_step.fp16.trt.onnx"
    assert (tmp_path / "cache").read_bytes() == b"timing-cache"
    export_trt.build_engines(bundle, "fp32", timing_cache=tmp_path / "cache", log=lambda m: None)
    manifest = Bundle(bundle).manifest
    assert {m["precision"] for m in manifest["engines"].values()} == {"fp32"}
    assert not (bundle / "ar_step.fp16.engine").exists() and "ar_step.fp16.engine" not in manifest["files"]


def test_an_invalid_profile_is_refused_before_building(tmp_path):
    """The Python IOptimizationProfile has no `is_valid`: its validity is `bool(profile)` (`__bool__`
    -> isValid, TensorRT python/src/infer/pyCore.cpp:879-880 at v10.7.0). A check through
    `hasattr(profile, "is_valid")` was always True and let an invalid profile reach the builder."""
    from prologue_export.export import tensorrt as export_trt

    trt = fake_tensorrt()
    onnx_file = tmp_path / "g.onnx"
    onnx_file.write_bytes(b"")
    bad = {"x": {"min": [1, 4], "opt": [8, 4], "max": [4, 4]}}  # opt above max
    with pytest.raises(ExportError, match="the profile of decoder"):
        export_trt._build_one(trt, trt.Logger(), onnx_file, bad, tmp_path / "cache", 1.0, "decoder")
    good = {"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}
    engine, cache = export_trt._build_one(trt, trt.Logger(), onnx_file, good, tmp_path / "cache", 1.0, "decoder")
    assert engine == b"engine:" + str(onnx_file).encode() and cache == b"timing-cache"
