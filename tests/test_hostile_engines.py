"""Hostile input, round 2 (issue 24, items 6-11 and 17's generate/variations part): `build-engines`
and `export` that touch nothing outside the bundle and install all or nothing, graphs whose
outputs break the contract, a KV cache that multiplies past its bound, verification of a model
with a 16-code codebook, `--digest` on every command that loads a bundle, and the CLI's `--class`,
`--out` and `--nrow`.

Every refusal is a one-line `PrologueError` (a `BundleError` naming the graph or the manifest
field where the bundle is at fault); the CLI cases use tests/test_hostile_cli.py's helpers (exit
code 2, one line on stderr, nothing written). The bundles are those of tests/runtime_fixture.py
(`PROLOGUE_TEST_BUNDLE_DIR`, or built with torch); cases that write ONNX need `onnx`, those that
export need torch.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from prologue_export.runtime import Bundle, BundleError, Generator, InputError, PrologueError
from prologue_export.runtime.bundle import MANIFEST, MAX_KV_CACHE_BYTES
from prologue_export.runtime.files import sha256_file

from .test_gpu_backends import engine_bundle, fakes, ort_gpu, plain_bundle, trt_generator  # noqa: F401 (fixtures)
from .test_hostile_bundle import bundle, manifest_of, source  # noqa: F401 (fixtures)
from .test_hostile_cli import (_fill, _paths, _snapshot, assert_one_line_error, run_both, run_cli,  # noqa: F401
                               work)

ZERO_DIGEST = "0" * 64


@pytest.fixture
def trt_bundle(source, tmp_path):
    """The bundle with its fp32 TensorRT ONNX forms (a `tensorrt` section)."""
    folder = tmp_path / "bundle_trt"
    shutil.copytree(source / "bundle_trt", folder)
    return folder



def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest))


def contents(folder: Path) -> dict:
    """Every entry of a folder: name -> bytes (None for anything but a regular file)."""
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else None) for p in folder.iterdir()}


def one_line(error: BaseException, *words: str) -> str:
    message = str(error)
    assert isinstance(error, PrologueError) and "\n" not in message and len(message) < 1000, message
    for word in words:
        assert word in message, message
    return message


def after_verification(monkeypatch, action):
    """Run `action(bundle)` right after export/tensorrt.py's `Bundle(...)` has verified the bundle:
    the window an attacker has between the check and the use."""
    from prologue_export.export import tensorrt as export_trt

    class Hooked(Bundle):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            action(self)

    monkeypatch.setattr(export_trt, "Bundle", Hooked)


# =========================================================================== item 6: the manifest's temporary name


@pytest.mark.parametrize("planted", [0, 1, 2])
def test_a_link_planted_at_a_temporary_name_cannot_redirect_the_manifest(bundle, tmp_path, monkeypatch, planted):
    """The manifest is written through `mkstemp` (O_EXCL, never through a link): links planted at
    the old predictable name and at the first `planted` names mkstemp tries are skipped, never followed."""
    pytest.importorskip("onnx")
    from prologue_export.export.tensorrt import prepare_tensorrt

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    names = [f"cand{i:04d}" for i in range(200)]
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(names))
    links = [bundle / f".{MANIFEST}.tmp-{os.getpid()}"] + [bundle / f".{MANIFEST}.tmp-{n}" for n in names[:planted]]
    after_verification(monkeypatch, lambda b: [os.symlink(victim, link) for link in links])
    section = prepare_tensorrt(bundle, "fp32", log=lambda m: None)
    assert victim.read_text() == "precious" and not (bundle / MANIFEST).is_symlink()
    assert all(link.is_symlink() for link in links)
    for link in links:
        link.unlink()
    assert Bundle(bundle).digest == section.digest and "fp32" in Bundle(bundle).tensorrt


# =========================================================================== item 7: what _install deletes


def test_a_manifest_swapped_after_verification_deletes_nothing_outside(trt_bundle, tmp_path, monkeypatch):
    """`_install` works from the manifest `Bundle` verified, never the file read again: a manifest
    swapped in after the check, listing `../elsewhere/prod.engine` as an engine to drop, is overwritten
    and the file outside survives."""
    pytest.importorskip("onnx")
    from prologue_export.export.tensorrt import prepare_tensorrt

    prod = tmp_path / "elsewhere" / "prod.engine"
    prod.parent.mkdir()
    prod.write_bytes(b"production engine")
    evil = manifest_of(trt_bundle)
    evil["files"]["../elsewhere/prod.engine"] = {"sha256": sha256_file(prod), "bytes": prod.stat().st_size}
    evil["files"]["/etc/hostile.engine"] = {"sha256": "0" * 64, "bytes": 1}
    after_verification(monkeypatch, lambda b: write_manifest(trt_bundle, evil))
    prepare_tensorrt(trt_bundle, "fp16", log=lambda m: None)
    assert prod.read_bytes() == b"production engine"
    b = Bundle(trt_bundle)
    assert set(b.tensorrt) == {"fp32", "fp16"} and all("/" not in name for name in b.files)


def _fake_engines(folder: Path, precision: str) -> dict:
    from prologue_export.runtime.tensorrt_backend import engine_file_name

    meta = {"tensorrt_version": "10.7.0", "compute_capability": "9.0", "device": "test", "precision": precision,
            "max_batch": 4, "profile": {}}
    engines = {}
    for graph in ("decoder", "ar_step"):
        name = engine_file_name(graph, precision)
        (folder / name).write_bytes(f"{precision} engine of {graph}".encode())
        engines[graph] = dict(meta, file=name)
    return engines


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_stale_engine_swapped_for_a_link_is_left_alone(bundle, tmp_path, kind):
    """Replacing engines drops the old files only where they are plain files in the bundle folder:
    an old engine swapped for a link (or a folder) after verification is neither followed nor removed."""
    from prologue_export.export.tensorrt import install_engines

    staging = tmp_path / "staging"
    staging.mkdir()
    install_engines(bundle, staging, _fake_engines(staging, "fp16"))
    target = tmp_path / "prod.engine"
    target.write_bytes(b"production")
    b = Bundle(bundle)  # verified: the fp16 engines are listed
    stale = bundle / "ar_step.fp16.engine"
    stale.unlink()
    if kind == "symlink":
        stale.symlink_to(target)
    else:
        stale.mkdir()
        (stale / "inside").write_bytes(b"kept")
    install_engines(b, staging, _fake_engines(staging, "fp32"))
    assert target.read_bytes() == b"production"
    assert stale.is_symlink() if kind == "symlink" else (stale / "inside").read_bytes() == b"kept"
    assert "ar_step.fp16.engine" not in manifest_of(bundle)["files"]
    assert not (bundle / "decoder.fp16.engine").exists()  # the plain stale file is gone


# =========================================================================== item 8: the tensorrt section and staging


def test_a_graph_swapped_after_verification_is_refused_not_vouched_for(bundle, monkeypatch):
    """The `.trt.onnx` forms are made from `Bundle.read_verified`'s bytes: a graph swapped between the
    check and the read is refused, and nothing is moved in; restored, the bundle is as it was."""
    pytest.importorskip("onnx")
    from prologue_export.export.tensorrt import prepare_tensorrt

    before = contents(bundle)
    original = before["ar_step.onnx"]
    after_verification(monkeypatch, lambda b: (bundle / "ar_step.onnx").write_bytes(before["decoder.onnx"]))
    with pytest.raises(BundleError) as info:
        prepare_tensorrt(bundle, "fp32", log=lambda m: None)
    one_line(info.value, "ar_step.onnx", "modified")
    (bundle / "ar_step.onnx").write_bytes(original)
    assert contents(bundle) == before and not Bundle(bundle).tensorrt
    assert not [p for p in bundle.parent.iterdir() if ".tensorrt-" in p.name]  # no staging folder left


def test_a_graph_swapped_after_it_was_read_does_not_reach_the_trt_onnx(bundle, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from prologue_export.export.tensorrt import prepare_tensorrt

    clean = tmp_path / "clean"
    shutil.copytree(bundle, clean)
    prepare_tensorrt(clean, "fp32", log=lambda m: None)
    decoy = (bundle / "decoder.onnx").read_bytes()

    def hook(b):
        read = b.read_verified

        def read_then_swap(name):
            data = read(name)
            if name == "ar_step.onnx":
                (bundle / name).write_bytes(decoy)  # swapped once the checked bytes are in memory
            return data

        b.read_verified = read_then_swap

    after_verification(monkeypatch, hook)
    prepare_tensorrt(bundle, "fp32", log=lambda m: None)
    assert (bundle / "ar_step.fp32.trt.onnx").read_bytes() == (clean / "ar_step.fp32.trt.onnx").read_bytes()
    with pytest.raises(BundleError, match="modified"):  # the swapped graph itself is still refused
        Bundle(bundle)


def _external(bundle: Path, location: str = "decoder.onnx.data") -> None:
    """decoder.onnx with its weights in decoder.onnx.data, vouched for (as for a graph over 2 GB)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / "decoder.onnx"))
    onnx.save(model, str(bundle / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
              size_threshold=0)
    if location != "decoder.onnx.data":
        model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (bundle / "decoder.onnx").write_bytes(model.SerializeToString())
    m = manifest_of(bundle)
    for name in ("decoder.onnx", "decoder.onnx.data"):
        m["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    write_manifest(bundle, m)


def test_external_weights_come_from_the_verified_bytes(source, bundle):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from prologue_export.export.tensorrt import verified_model

    _external(bundle)
    b = Bundle(bundle)
    model = verified_model(b, "decoder")
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source / "bundle" / "decoder.onnx")).graph.initializer}
    got = {t.name: t for t in model.graph.initializer}
    assert not any(uses_external_data(t) for t in got.values())
    for name, array in want.items():
        np.testing.assert_array_equal(numpy_helper.to_array(got[name]), array)
    data = bytearray((bundle / "decoder.onnx.data").read_bytes())
    data[7] ^= 0xFF
    (bundle / "decoder.onnx.data").write_bytes(bytes(data))  # tampered after Bundle()
    with pytest.raises(BundleError) as info:
        verified_model(b, "decoder")
    one_line(info.value, "decoder.onnx.data", "sha256")


def test_external_weights_named_elsewhere_are_refused(bundle):
    pytest.importorskip("onnx")
    from prologue_export.export.errors import ExportError
    from prologue_export.export.tensorrt import verified_model

    _external(bundle, location="../elsewhere.data")
    with pytest.raises(ExportError) as info:
        verified_model(Bundle(bundle), "decoder")
    one_line(info.value, "points outside the checked decoder.onnx.data")


def _section(fn):
    def mutate(m):
        fn(m["tensorrt"]["fp32"])
        return m
    return mutate


def _entry(graph, fn):
    return _section(lambda s: fn(s["graphs"][graph]))


def _profile(graph, fn):
    return _entry(graph, lambda e: fn(e["profile"]))


TENSORRT_MUTATIONS = {
    "section_number": (lambda m: m["tensorrt"].__setitem__("fp32", 5) or m, "tensorrt.fp32"),
    "section_list": (lambda m: m.__setitem__("tensorrt", []) or m, "tensorrt"),
    "precision_unknown": (lambda m: m["tensorrt"].__setitem__("int3", m["tensorrt"]["fp32"]) or m, "int3"),
    "graphs_missing": (_section(lambda s: s.pop("graphs")), "tensorrt.fp32.graphs"),
    "graphs_empty": (_section(lambda s: s.__setitem__("graphs", {})), "tensorrt.fp32.graphs"),
    "graphs_list": (_section(lambda s: s.__setitem__("graphs", ["ar_step"])), "tensorrt.fp32.graphs"),
    "graph_unknown": (_section(lambda s: s["graphs"].__setitem__("encoder", s["graphs"]["decoder"])), "encoder"),
    "entry_string": (_section(lambda s: s["graphs"].__setitem__("decoder", "decoder.onnx")), "graphs.decoder"),
    "onnx_traversal": (_entry("ar_step", lambda e: e.__setitem__("onnx", "../elsewhere.onnx")), "graphs.ar_step.onnx"),
    "onnx_other_graph": (_entry("ar_step", lambda e: e.__setitem__("onnx", "decoder.onnx")), "graphs.ar_step.onnx"),
    "onnx_unlisted": (_entry("decoder", lambda e: e.__setitem__("onnx", "decoder.fp32.trt.onnx")), "not listed"),
    "onnx_number": (_entry("ar_step", lambda e: e.__setitem__("onnx", 5)), "graphs.ar_step.onnx"),
    "source_other": (_entry("decoder", lambda e: e.__setitem__("source", "ar_step.onnx")), "graphs.decoder.source"),
    "source_missing": (_entry("decoder", lambda e: e.pop("source")), "graphs.decoder.source"),
    "inlined_ifs_negative": (_entry("ar_step", lambda e: e.__setitem__("inlined_ifs", -1)), "inlined_ifs"),
    "inlined_ifs_string": (_entry("ar_step", lambda e: e.__setitem__("inlined_ifs", "2")), "inlined_ifs"),
    "reduced_matmuls_bool": (_entry("ar_step", lambda e: e.__setitem__("reduced_matmuls", True)), "reduced_matmuls"),
    "top_k_max_zero": (_entry("ar_step", lambda e: e.__setitem__("top_k_max", 0)), "top_k_max"),
    "top_k_capped_string": (_entry("ar_step", lambda e: e.__setitem__("top_k_capped", "yes")), "top_k_capped"),
    "max_batch_zero": (_section(lambda s: s.__setitem__("max_batch", 0)), "tensorrt.fp32.max_batch"),
    "max_batch_string": (_section(lambda s: s.__setitem__("max_batch", "8")), "tensorrt.fp32.max_batch"),
    "operators_table_number": (_section(lambda s: s.__setitem__("operators_table", 5)), "operators_table"),
    "profile_missing": (_entry("decoder", lambda e: e.pop("profile")), "graphs.decoder.profile"),
    "profile_list": (_entry("decoder", lambda e: e.__setitem__("profile", [])), "graphs.decoder.profile"),
    "profile_missing_input": (_profile("ar_step", lambda p: p.pop("input_ids")), "input_ids"),
    "profile_extra_input": (_profile("decoder", lambda p: p.__setitem__("bogus", p["visual_ids"])), "bogus"),
    "profile_not_object": (_profile("decoder", lambda p: p.__setitem__("visual_ids", [1, 64])), "visual_ids"),
    "profile_missing_opt": (_profile("decoder", lambda p: p["visual_ids"].pop("opt")), "visual_ids"),
    "profile_min_above_max": (_profile("ar_step", lambda p: p["input_ids"].__setitem__("min", [99, 1])), "input_ids"),
    "profile_rank": (_profile("decoder", lambda p: p["visual_ids"].__setitem__("max", [4])), "visual_ids.max"),
    "profile_static_changed": (_profile("ar_step", lambda p: p["uniform"].__setitem__("max", [4, 7])), "uniform"),
    "profile_float": (_profile("decoder", lambda p: p["visual_ids"].__setitem__("min", [1.5, 64])), "visual_ids.min"),
    "profile_zero": (_profile("decoder", lambda p: p["visual_ids"].__setitem__("min", [0, 64])), "visual_ids.min"),
    "profile_huge": (_profile("decoder", lambda p: p["visual_ids"].__setitem__("max", [2**40, 64])), "visual_ids.max"),
}


@pytest.mark.parametrize("case", list(TENSORRT_MUTATIONS))
def test_a_malformed_tensorrt_section_is_refused_when_loaded(trt_bundle, case):
    mutate, field = TENSORRT_MUTATIONS[case]
    write_manifest(trt_bundle, mutate(manifest_of(trt_bundle)))
    with pytest.raises(BundleError) as info:
        Bundle(trt_bundle, check_hashes=False)
    one_line(info.value, field)


@pytest.mark.parametrize("case", ["section_number", "graph_unknown", "onnx_traversal", "profile_min_above_max"])
@pytest.mark.parametrize("build", [False, True], ids=["print_trtexec", "build"])
def test_build_engines_refuses_a_malformed_section_before_moving_anything(trt_bundle, tmp_path, monkeypatch, capsys,
                                                                        case, build):
    mutate, field = TENSORRT_MUTATIONS[case]
    write_manifest(trt_bundle, mutate(manifest_of(trt_bundle)))
    before = contents(trt_bundle)
    if build:
        _fake_builder(monkeypatch)
    argv = ["build-engines", trt_bundle, "--precision", "fp32", "--timing-cache", tmp_path / "cache"]
    rc, err = run_cli(argv + ([] if build else ["--print-trtexec"]), capsys)
    assert_one_line_error(rc, err)
    assert field in err and contents(trt_bundle) == before


def _fake_builder(monkeypatch, fail_graph=None):
    """The fake TensorRT builder of tests/fakes/tensorrt.py; `fail_graph`: the engine it cannot build."""
    from prologue_export.export import tensorrt as export_trt

    from .fakes.tensorrt import fake_tensorrt

    trt = fake_tensorrt()

    class Builder(trt.Builder):
        def build_serialized_network(self, network, config):
            if fail_graph and Path(trt.parsed[-1]).name.startswith(fail_graph):
                return None
            return super().build_serialized_network(network, config)

    trt.Builder = Builder
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(export_trt, "device_info", lambda: {"name": "Fake GPU", "compute_capability": "9.0"})
    return trt


@pytest.mark.parametrize("fail_graph", ["decoder", "prologue_generator", "ar_step"])
def test_build_engines_is_all_or_nothing(bundle, tmp_path, monkeypatch, fail_graph):
    pytest.importorskip("onnx")
    from prologue_export.export.errors import ExportError
    from prologue_export.export.tensorrt import build_engines

    _fake_builder(monkeypatch, fail_graph)
    before = contents(bundle)
    with pytest.raises(ExportError) as info:
        build_engines(bundle, "fp16", timing_cache=tmp_path / "cache", log=lambda m: None)
    one_line(info.value, fail_graph)
    assert contents(bundle) == before
    assert sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(".")) == []  # no staging left
    Bundle(bundle)


@pytest.mark.parametrize("second", ["fp32", "fp16"])
def test_a_failed_manifest_write_puts_every_file_back(bundle, tmp_path, monkeypatch, second):
    """Rebuilding the same precision (files replaced by name) or another (old engines dropped): when
    the manifest cannot be written, the files moved aside come back and the new ones go."""
    pytest.importorskip("onnx")
    from prologue_export.export import tensorrt as export_trt
    from prologue_export.runtime.files import OutputError

    _fake_builder(monkeypatch)
    first = export_trt.build_engines(bundle, "fp32", timing_cache=tmp_path / "cache", log=lambda m: None)
    assert Bundle(bundle).digest == first.digest
    before = contents(bundle)

    def full_disk(path, manifest):
        raise OutputError(f"cannot write bundle manifest {path}: No space left on device")

    monkeypatch.setattr(export_trt, "write_manifest", full_disk)
    with pytest.raises(OutputError):
        export_trt.build_engines(bundle, second, timing_cache=tmp_path / "cache", log=lambda m: None)
    assert contents(bundle) == before
    assert Bundle(bundle).digest == first.digest


# =========================================================================== item 9: outputs against the contract


def _decoder_graph(tile: int, shape):
    """A decoder that takes `visual_ids` [batch, 64] and declares `image` uint8 / `image_float` float
    [batch, 1, 32, 32] (the tiny bundle's contract) but returns Reshape(Tile(ids, tile), shape)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper

    nodes = [helper.make_node("Cast", ["visual_ids"], ["f"], to=T.FLOAT),
             helper.make_node("Tile", ["f", "reps"], ["t"]),
             helper.make_node("Reshape", ["t", "shape"], ["image_float"]),
             helper.make_node("Cast", ["image_float"], ["image"], to=T.UINT8)]
    inits = [helper.make_tensor("reps", T.INT64, [2], [1, tile]), helper.make_tensor("shape", T.INT64, [4], shape)]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("visual_ids", T.INT64, ["batch", 64])],
                              [helper.make_tensor_value_info("image", T.UINT8, ["batch", 1, 32, 32]),
                               helper.make_tensor_value_info("image_float", T.FLOAT, ["batch", 1, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


DECODERS = {
    "wrong_shape": ((16, [-1, 1, 16, 64]), "returned image [2, 1, 16, 64] uint8"),
    "fails_at_run_time": ((16, [5, -1, 32, 32]), "failed in ONNX Runtime"),
    "wrong_batch": ((32, [-1, 1, 32, 32]), "returned image [4, 1, 32, 32] uint8"),
}


def _swap_graph(folder: Path, name: str, model) -> None:
    (folder / name).write_bytes(model.SerializeToString())
    m = manifest_of(folder)
    m["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    write_manifest(folder, m)


@pytest.mark.parametrize("case", list(DECODERS))
def test_a_decoder_that_breaks_its_contract_is_one_line(bundle, case):
    (tile, shape), words = DECODERS[case]
    _swap_graph(bundle, "decoder.onnx", _decoder_graph(tile, shape))
    gen = Generator.from_bundle(bundle, backend="cpu")
    with pytest.raises(BundleError) as info:
        gen.decode(np.zeros((2, 64), dtype=np.int64))
    one_line(info.value, "decoder", words)


@pytest.mark.parametrize("case", ["wrong_shape", "fails_at_run_time"])
def test_generate_with_a_broken_decoder_writes_nothing(bundle, work, case, capsys):
    (tile, shape), _ = DECODERS[case]
    _swap_graph(bundle, "decoder.onnx", _decoder_graph(tile, shape))
    rc, err = run_cli(["generate", "--bundle", bundle, "--class", "1", "--n", "2", "--out", work / "o.png"], capsys)
    progress, _, err = err.rpartition(" steps\n")  # the AR loop ran; the decoder failed after it
    assert progress.startswith("\rgenerate [")
    assert_one_line_error(rc, err)
    assert "decoder" in err and not (work / "o.png").exists()


class _Session:
    """A loaded ONNX Runtime session whose results pass through `change(outputs, results)`."""

    def __init__(self, real, change):
        self.real, self.change = real, change

    def run(self, outputs, feeds):
        return self.change(list(outputs or []), self.real.run(outputs, feeds))

    def __getattr__(self, name):
        return getattr(self.real, name)


def _changed_generator(source, graph: str, change) -> Generator:
    """A CPU Generator of the fixture bundle whose `graph` session passes its results through `change`."""
    gen = Generator.from_bundle(source / "bundle", backend="cpu")
    gen.backend._sessions[graph] = _Session(gen.backend.session(graph), change)
    return gen


def _changed(index, fn):
    def change(outputs, results):
        results = list(results)
        results[index] = fn(results[index])
        return results
    return change


AR_OUTPUTS = {
    "k_new_rows": (_changed(1, lambda k: np.concatenate([k, k], axis=1)), "returned k_new"),
    "k_new_tokens": (_changed(1, lambda k: np.concatenate([k, k], axis=3)), "returned k_new"),
    "v_new_float64": (_changed(2, lambda v: v.astype(np.float64)), "returned v_new"),
    "v_new_list": (_changed(2, lambda v: v.tolist()), "v_new as list"),
    "tokens_batch": (_changed(0, lambda t: np.concatenate([t, t])), "returned next_tokens"),
    "tokens_float": (_changed(0, lambda t: t.astype(np.float32)), "returned next_tokens"),
    "tokens_2d": (_changed(0, lambda t: t[:, None]), "returned next_tokens"),
    "tokens_vocab": (_changed(0, lambda t: t * 0 + 321), "outside the vocabulary [0, 321)"),
    "tokens_negative": (_changed(0, lambda t: t * 0 - 1), "outside the vocabulary"),
    "tokens_huge": (_changed(0, lambda t: t * 0 + 2**62), "outside the vocabulary"),
}


@pytest.mark.parametrize("case", list(AR_OUTPUTS))
def test_ar_step_outputs_are_checked_before_the_cache_is_written(source, case):
    change, words = AR_OUTPUTS[case]
    gen = _changed_generator(source, "ar_step", change)
    with pytest.raises(BundleError) as info:
        gen.generate([1, 2], seed=0, cfg=2.0)
    one_line(info.value, "ar_step", words)


ENCODER_OUTPUTS = {
    "prologue_out_of_range": (_changed(0, lambda p: p * 0 + 64), "prologue_ids outside [0, 64)"),
    "visual_negative": (_changed(1, lambda v: v * 0 - 3), "visual_ids outside [0, 256)"),
    "visual_short": (_changed(1, lambda v: v[:, :10]), "returned visual_ids [1, 10]"),
    "prologue_int32": (_changed(0, lambda p: p.astype(np.int32)), "returned prologue_ids [1, 8] int32"),
}


@pytest.mark.parametrize("case", list(ENCODER_OUTPUTS))
def test_prologue_generator_outputs_are_checked(source, case):
    change, words = ENCODER_OUTPUTS[case]
    gen = _changed_generator(source, "prologue_generator", change)
    with pytest.raises(BundleError) as info:
        gen.variations(np.zeros((32, 32, 1), np.uint8), n=2, seed=0)
    one_line(info.value, "prologue_generator", words)


KV_CACHES = {
    "wide": {"ar": {"layers": 1024, "heads": 1024, "head_dim": 4096}},
    "deep_and_batched": {"ar": {"layers": 512, "heads": 64, "head_dim": 512}, "max_batch": 4096},
    "just_over": {"ar": {"layers": 2, "heads": 2, "head_dim": 4096}, "max_batch": 4096},
}


@pytest.mark.parametrize("case", list(KV_CACHES))
def test_a_kv_cache_beyond_the_bound_is_refused_before_any_allocation(bundle, case):
    """Each dimension within its bound, their product (the K and V caches of the max batch) beyond
    MAX_KV_CACHE_BYTES: refused when the manifest is read, never a MemoryError."""
    m = manifest_of(bundle)
    change = KV_CACHES[case]
    m["ar"].update(change["ar"])
    m["max_batch"] = change.get("max_batch", m["max_batch"])
    write_manifest(bundle, m)
    with pytest.raises(BundleError) as info:
        Bundle(bundle, check_hashes=False)
    one_line(info.value, "manifest field ar", "KV cache", f"{MAX_KV_CACHE_BYTES // 1024**3} GiB")


def test_a_stepwise_batch_beyond_the_bound_is_refused_before_its_cache(source, monkeypatch):
    from prologue_export.runtime import generator

    gen = Generator.from_bundle(source / "bundle", backend="cpu")
    monkeypatch.setattr(generator, "MAX_KV_CACHE_BYTES", 1024**2)
    monkeypatch.setattr(gen.backend, "ar_state", lambda *a: pytest.fail("a cache was allocated"))
    with pytest.raises(InputError) as info:
        gen.start(list(range(10)) * 10, seed=0, cfg=2.0)
    one_line(info.value, "KV cache")


def test_a_cache_within_the_bound_but_beyond_this_machine_is_one_line(source, monkeypatch):
    """Under the 64 GiB bound but more than the host has: numpy's MemoryError becomes one line."""
    gen = Generator.from_bundle(source / "bundle", backend="cpu")

    def out_of_memory(*a):
        raise MemoryError("Unable to allocate 60.0 GiB for an array")

    monkeypatch.setattr(gen.backend, "ar_state", out_of_memory)
    with pytest.raises(InputError) as info:
        gen.generate([1], seed=0)
    one_line(info.value, "KV cache", "smaller batches")


def test_a_tensorrt_engine_whose_outputs_outgrow_their_buffers_is_refused(fakes, engine_bundle, monkeypatch):
    """The native backend sizes its output buffers from the contract: an engine whose `k_new` for this
    step is larger would write past them; it is refused before it runs, and the state is freed."""
    from .fakes.tensorrt import FakeContext
    from .test_gpu_backends import streams_left

    cudart, _ = fakes
    real = FakeContext.get_tensor_shape

    def larger(self, name):
        shape = real(self, name)
        return (shape[0], shape[1] + 1, *shape[2:]) if name == "k_new" else shape

    monkeypatch.setattr(FakeContext, "get_tensor_shape", larger)
    gen = trt_generator(engine_bundle)
    with pytest.raises(BundleError) as info:
        gen.start([1, 2], seed=0, cfg=2.0).run()
    one_line(info.value, "ar_step", "returned k_new")
    assert streams_left(cudart) == 1  # only the backend's own stream: the generation's state was freed
    gen.close()


def test_the_onnxruntime_device_state_checks_outputs_before_copying(ort_gpu, plain_bundle, monkeypatch):
    """With the KV cache on the device, `k_new` is copied by its address: a slice of another shape
    would be read past its end. Checked from the OrtValue's shape before the copy."""
    cudart, ort = ort_gpu
    monkeypatch.setattr(ort.OrtValue, "shape", lambda self: [1, 2, 3])
    with Generator.from_bundle(plain_bundle, backend="cuda") as gen:
        with pytest.raises(BundleError) as info:
            gen.start([1], seed=0, cfg=2.0).run()
    one_line(info.value, "ar_step", "returned k_new [1, 2, 3]")


# =========================================================================== item 10: a small codebook


def test_export_verifies_a_model_whose_smallest_codebook_is_under_20(tmp_path):
    """Verification's `no_cfg_temperatures_topk` case asks for top_k 20, at most what the graph
    keeps (`max_top_k`: the smallest codebook, here a 16-code prologue codebook)."""
    pytest.importorskip("torch")
    import prologue_export as pe
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from prologue_export.export.verify import generation_cases
    from prologue_export.model import PrologueModel

    from .conftest import randomize_

    cfg = model_preset("tiny")
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, prologue_codebook_size=16)
    model = randomize_(PrologueModel(cfg.validate()), seed=4).eval()
    assert dict((n, s) for n, s, _ in generation_cases(model))["no_cfg_temperatures_topk"]["topK"] == 16
    pe.save_checkpoint(model, tmp_path / "ckpt")
    manifest = export_bundle(tmp_path / "ckpt", tmp_path / "b", max_batch=2, log=lambda m: None)
    case = manifest["verification"]["generation"]["no_cfg_temperatures_topk"]
    assert case["identical"] == case["sequences"] and case["settings"]["topK"] == 16
    assert Bundle(tmp_path / "b").digest == manifest.digest


# =========================================================================== item 11: --digest


FB = ["--bundle", "{t}/fakebundle"]
DIGEST_ARGS = {
    "generate": ["generate", *FB, "--class", "1", "--out", "{t}/o.png"],
    "variations": ["variations", *FB, "--image", "{t}/img.png", "--out", "{t}/o.png"],
    "reconstruct": ["reconstruct", *FB, "--image", "{t}/img.png", "--out", "{t}/o.png"],
    "gfid": ["eval", "gfid", *FB, "--data", "synthetic:8", "--stats-dir", "{t}/st"],
    "build-engines": ["build-engines", "{t}/fakebundle", "--print-trtexec"],
    "export-verify": ["export", "--checkpoint", "{t}/fakeckpt", "--verify", "{t}/fakebundle"],
}
BAD_DIGESTS = {"short": "abc123", "not_hex": "g" * 64, "long": "0" * 65, "empty": "", "spaced": "0" * 32 + " " + "0" * 31}


@pytest.mark.parametrize("command", list(DIGEST_ARGS))
@pytest.mark.parametrize("digest", list(BAD_DIGESTS))
def test_a_malformed_digest_is_a_usage_error(work, capsys, command, digest):
    before = _snapshot(work)
    rc, err = run_cli(_fill([*DIGEST_ARGS[command], "--digest", BAD_DIGESTS[digest]], _paths(work)), capsys)
    assert_one_line_error(rc, err)
    assert "argument --digest: must be 64 hex digits" in err and _snapshot(work) == before


@pytest.mark.parametrize("argv", [
    ["export", "--checkpoint", "{t}/fakeckpt", "--out", "{t}/b", "--digest", ZERO_DIGEST],
    ["eval", "gfid", "--checkpoint", "{t}/fakeckpt", "--data", "synthetic:8", "--digest", ZERO_DIGEST],
], ids=["export_without_verify", "gfid_with_a_checkpoint"])
def test_a_digest_without_a_bundle_to_pin_is_refused(work, capsys, argv):
    before = _snapshot(work)
    rc, err = run_cli(_fill(argv, _paths(work)), capsys)
    assert_one_line_error(rc, err)
    assert "--digest" in err and _snapshot(work) == before


RB = ["--bundle", "{bundle}"]
PINNED = {
    "generate": ["generate", *RB, "--class", "1", "--n", "1", "--out", "{t}/o.png"],
    "variations": ["variations", *RB, "--image", "{t}/img32.png", "--n", "1", "--out", "{t}/o.png"],
    "reconstruct": ["reconstruct", *RB, "--image", "{t}/img32.png", "--out", "{t}/o.png"],
    "gfid": ["eval", "gfid", *RB, "--data", "synthetic:8", "--n", "2", "--stats-dir", "{t}/st"],
    "build-engines": ["build-engines", "{bundle}", "--print-trtexec", "--precision", "fp32"],
    "export-verify": ["export", "--checkpoint", "{ckpt}", "--verify", "{bundle}"],
}


def _image32(work: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(work / "img32.png")


@pytest.mark.parametrize("command", list(PINNED))
def test_a_wrong_digest_refuses_the_bundle(source, bundle, work, capsys, command):
    if command == "export-verify":
        pytest.importorskip("torch")
    _image32(work)
    before, bundle_before = _snapshot(work), contents(bundle)
    paths = _paths(work, bundle=bundle, ckpt=source / "ckpt_bundle")
    rc, err = run_cli(_fill([*PINNED[command], "--digest", ZERO_DIGEST], paths), capsys)
    assert_one_line_error(rc, err)
    assert "not the expected" in err and "pinned" in err, err
    assert _snapshot(work) == before and contents(bundle) == bundle_before


@pytest.mark.parametrize("command", ["generate", "variations", "reconstruct"])
def test_the_right_digest_runs_and_is_reported(source, work, capsys, command):
    _image32(work)
    digest = Bundle(source / "bundle").digest
    argv = _fill([*PINNED[command], "--digest", digest.upper(), "--json"], _paths(work, bundle=source / "bundle"))
    rc, out, err = run_both(argv, capsys)
    assert rc == 0, err
    assert json.loads(out)["bundle_digest"] == digest and (work / "o.png").is_file()


def test_build_engines_prints_the_new_digest_and_takes_the_old_one(bundle, capsys):
    pytest.importorskip("onnx")
    from prologue_export.cli import main

    old = Bundle(bundle).digest
    assert main(["build-engines", str(bundle), "--print-trtexec", "--precision", "fp32", "--json",
                 "--digest", old]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["digest"] == Bundle(bundle).digest != old and len(report["commands"]) == 3
    assert main(["build-engines", str(bundle), "--print-trtexec", "--precision", "fp16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"# bundle digest (sha256 of manifest.json): {Bundle(bundle).digest}"
    assert main(["build-engines", str(bundle), "--print-trtexec", "--digest", old]) == 2  # no longer this bundle
    assert "pinned" in capsys.readouterr().err


def test_build_engines_reports_the_digest_of_what_it_built(bundle, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    from prologue_export.cli import main

    _fake_builder(monkeypatch)
    before = contents(bundle)
    assert main(["build-engines", str(bundle), "--precision", "fp32", "--digest", ZERO_DIGEST]) == 2
    assert "pinned" in capsys.readouterr().err and contents(bundle) == before
    assert main(["build-engines", str(bundle), "--precision", "fp32", "--timing-cache", str(tmp_path / "c"),
                 "--json", "--digest", Bundle(bundle).digest]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["digest"] == Bundle(bundle).digest and set(report["engines"]) == {
        "decoder", "prologue_generator", "ar_step"}


def test_export_prints_the_digest_of_the_bundle_it_wrote(source, tmp_path, capsys):
    pytest.importorskip("torch")
    from prologue_export.cli import main

    out = tmp_path / "b"
    assert main(["export", "--checkpoint", str(source / "ckpt_bundle"), "--out", str(out), "--no-verify",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == Bundle(out).digest
    assert main(["export", "--checkpoint", str(source / "ckpt_bundle"), "--out", str(out), "--no-verify",
                 "--force"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"digest {Bundle(out).digest}" in line


# =========================================================================== item 17: --class, --out, --nrow


@pytest.mark.parametrize("classes, want", [
    (["--class", "1", "--class", "2"], [1, 2]),
    (["--class", "1", "2", "--class", "3"], [1, 2, 3]),
    (["--class", "4", "--class", "4"], [4, 4]),
])
def test_repeated_class_flags_add_up(source, work, capsys, classes, want):
    argv = ["generate", "--bundle", source / "bundle", *classes, "--n", "1", "--out", work / "o.png", "--json"]
    rc, out, err = run_both(argv, capsys)
    assert rc == 0, err
    assert json.loads(out)["classes"] == want


def test_repeated_classes_count_towards_the_image_limit(work, capsys):
    before = _snapshot(work)
    argv = ["generate", "--bundle", work / "fakebundle", "--class", "1", "--class", "2", "--n", "1000",
            "--out", work / "o.png"]
    rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err)
    assert "2 classes" in err and _snapshot(work) == before


@pytest.mark.parametrize("name", ["a\nb.png", "a\rb.png", "a\x1b[2Kb.png", "a\tb.png"],
                         ids=["newline", "carriage_return", "escape", "tab"])
@pytest.mark.parametrize("command", ["generate", "variations"])
def test_a_control_character_in_out_cannot_split_the_wrote_line(source, work, capsys, name, command):
    _image32(work)
    source_args = ["--class", "1"] if command == "generate" else ["--image", work / "img32.png"]
    argv = [command, "--bundle", source / "bundle", *source_args, "--n", "1", "--out", work / name]
    rc, out, err = run_both(argv, capsys)
    assert rc == 0, err
    assert out.count("\n") == 1 and out.endswith("\n") and out.startswith("wrote ")
    assert out[:-1].isprintable() and (work / name).is_file()


@pytest.mark.parametrize("command", ["generate", "variations"])
def test_a_huge_nrow_is_bounded_by_the_image_count(source, work, capsys, command):
    from PIL import Image

    _image32(work)
    source_args = ["--class", "1"] if command == "generate" else ["--image", work / "img32.png"]
    argv = [command, "--bundle", source / "bundle", *source_args, "--n", "2", "--nrow", "100000",
            "--out", work / "o.png"]
    rc, out, err = run_both(argv, capsys)
    assert rc == 0, err
    with Image.open(work / "o.png") as im:
        assert im.size == (2 * 33 + 1, 33 + 1)  # two columns, one row


def test_grid_columns_never_exceed_the_images():
    from prologue_export.runtime.images import grid, grid_columns

    assert grid_columns(3, 100000) == 3 and grid_columns(3, None) == 2 and grid_columns(5, 2) == 2
    assert grid(np.zeros((2, 4, 4, 1), np.uint8), 10**9).shape == (6, 11, 1)


def test_from_bundle_takes_a_loaded_bundle_and_its_pin(source):
    b = Bundle(source / "bundle")
    assert Generator.from_bundle(b, backend="cpu").bundle is b
    Generator.from_bundle(b, backend="cpu", digest=b.digest)
    with pytest.raises(BundleError) as info:
        Generator.from_bundle(b, backend="cpu", digest=ZERO_DIGEST)
    one_line(info.value, "pinned")
