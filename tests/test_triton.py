"""The Triton model repository (`prologue triton`, serve/triton.py) without a server: the shared
batcher run in the caller's thread, the request parsing, config.pbtxt, the repository writer and
its refusals. Torch-free (also run in the runtime-only environment). The real tritonserver and
tritonclient: tests/test_triton_server.py."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from prologue_export.cli import main
from prologue_export.runtime import Generator
from prologue_export.runtime.bundle import BundleError
from prologue_export.runtime.files import _umask
from prologue_export.runtime.loop import MAX_SEED, InputError
from prologue_export.runtime.settings import SAMPLING_OPTIONS
from prologue_export.serve import triton
from prologue_export.serve.batch import Batcher, Job
from prologue_export.serve.triton import (MARKER, RepositoryOptions, TritonError, check_stub_numpy, config_pbtxt,
                                          gpu_visible, inputs, request_jobs, write_repository)


@pytest.fixture(scope="module")
def gen(runtime_fixture_root):
    return Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu")


def _one_line_error(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err


# -- the batcher in the caller's thread ------------------------------------------------------------

def test_batcher_run_merges_rows_and_each_equals_generate(gen):
    """`Batcher.run` (what Triton's execute calls): rows of requests with equal settings share loops of
    up to max_batch rows, yet every request's image is Generator.generate's for its own seed."""
    cases = [(1, 3, {}), (2, 4, {}), (3, 5, {"top_k": 7}), (4, 6, {}), (5, 7, {"top_k": 7}), (6, 2**64 - 1, {}),
             (10, 8, {"cfg": 0.0, "temperature": 0.7})]
    jobs = [Job(classes=np.array([c]), seed=s, settings=gen.settings(**o)) for c, s, o in cases]
    batcher = Batcher(gen, start=False)
    futures = batcher.run(jobs)
    assert all(f.done() for f in futures)
    for (c, s, o), future in zip(cases, futures):
        result = future.result()
        assert np.array_equal(result.images, gen.generate([c], seed=s, **o)), (c, s, o)
    shared = [f.result().shared_rows for f in futures]
    assert shared[0] == 4 and shared[2] == 2 and shared[6] == 1  # 5 default rows: a loop of 4, then 1
    with pytest.raises(RuntimeError, match="start=False"):
        Batcher(gen, window_s=0).run(jobs)  # a batcher with its worker thread


def test_batcher_run_answers_a_failing_job_and_goes_on(gen):
    bad = Job(classes=np.array([1]), seed=1, settings=gen.settings(), prologue_ids=np.full((1, 8), 10**6))
    good = Job(classes=np.array([2]), seed=2, settings=gen.settings())
    futures = Batcher(gen, start=False).run([bad, good])
    assert futures[0].exception() is not None
    assert np.array_equal(futures[1].result().images, gen.generate([2], seed=2))


# -- a request's rows ------------------------------------------------------------------------------

def _arrays(rows=1, **values):
    out = {"class_id": np.array([[3]] * rows, dtype=np.int64)}
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, str):
            out[name] = np.array([[value.encode()]] * rows, dtype=object)
        elif isinstance(value, int):
            out[name] = np.array([[value]] * rows, dtype=np.uint64 if name == "seed" else np.int64)
        else:
            out[name] = np.array([[value]] * rows, dtype=np.float64)
    return out


def test_request_rows_become_jobs_with_their_settings(gen):
    jobs = request_jobs(gen, _arrays(rows=2, seed=9, cfg=1.5, cfg_schedule="cosine", top_k=20, top_p=0.9,
                                     prologue_temperature=0.5))
    assert len(jobs) == 2 and all(j.seed == 9 and j.rows == 1 for j in jobs)
    s = jobs[0].settings
    assert (s.cfg, s.cfg_schedule, s.top_k, s.top_p, s.prologue_temperature) == (1.5, "cosine", 20, 0.9, 0.5)
    assert jobs[0].settings == gen.settings(cfg=1.5, cfg_schedule="cosine", top_k=20, top_p=0.9,
                                            prologue_temperature=0.5)
    random_seeds = [job.seed for job in request_jobs(gen, _arrays(rows=3))]
    assert all(0 <= s <= MAX_SEED for s in random_seeds) and len(set(random_seeds)) == 3
    fixed = request_jobs(gen, _arrays(seed=1, prologue_ids=np.arange(8, dtype=np.int64)[None]))[0]
    assert fixed.fixed and fixed.prologue_ids.tolist() == [list(range(8))]


@pytest.mark.parametrize("values, message", [
    ({"top_p": 2.0}, "sampling.top_p must be in [0, 1]"),
    ({"cfg_schedule": "wavy"}, "'wavy' is not one of constant, linear, cosine"),
    ({"temperature": 0.0}, "sampling.temperature must be a finite number > 0"),
    ({"cfg": float("nan")}, "sampling.cfg must be a finite number"),
    ({"top_k": -1}, "sampling.top_k must be an integer >= 0"),
    ({"class_id": np.array([[11]], dtype=np.int64)}, "class"),
    ({"prologue_ids": np.full((1, 8), 64, dtype=np.int64)}, "prologue"),
    ({"prologue_ids": np.zeros((1, 7), dtype=np.int64)}, "prologue_ids must have shape [batch, 8]"),
    ({"cfg": np.array([[1.0]], dtype=np.float32)}, "cfg must be FP64, got float32"),
    ({"seed": np.array([[1], [2]], dtype=np.uint64)}, "seed must have shape [batch, 1] (batch >= 1, the same"),
    ({"class_id": np.zeros((0, 1), dtype=np.int64)}, "batch >= 1"),
    ({"bogus": np.zeros((1, 1))}, "unknown input 'bogus'"),
])
def test_bad_rows_are_one_line_input_errors(gen, values, message):
    with pytest.raises(InputError) as info:
        request_jobs(gen, _arrays(**values))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_row_is_named(gen):
    arrays = _arrays(rows=3, seed=1)
    arrays["top_p"] = np.array([[0.5], [7.0], [0.5]])
    with pytest.raises(InputError, match=r"^row 1: sampling\.top_p must be in \[0, 1\]"):
        request_jobs(gen, arrays)
    with pytest.raises(InputError, match="class_id is required"):
        request_jobs(gen, {"seed": np.array([[1]], dtype=np.uint64)})


# -- config.pbtxt -----------------------------------------------------------------------------------

def test_config_has_every_sampling_option_typed_and_optional(gen):
    bundle = gen.bundle
    text = config_pbtxt(bundle, RepositoryOptions(threads=2).validate(), "bundle")
    assert text.startswith(MARKER) and bundle.digest in text
    for option in SAMPLING_OPTIONS:
        kind = {float: "TYPE_FP64", int: "TYPE_INT64", str: "TYPE_STRING"}[option.type]
        assert f'{{ name: "{option.name}" data_type: {kind} dims: [ 1 ] optional: true }}' in text
    assert '{ name: "class_id" data_type: TYPE_INT64 dims: [ 1 ] }' in text
    assert '{ name: "image" data_type: TYPE_UINT8 dims: [ 32, 32, 1 ] }' in text
    assert '{ name: "prologue_ids" data_type: TYPE_INT64 dims: [ 8 ] optional: true }' in text
    assert f"max_batch_size: {bundle.max_batch}" in text and "kind: KIND_CPU" in text
    assert "dynamic_batching { max_queue_delay_microseconds: 10000 }" in text
    assert re.search(r'key: "threads" value: \{ string_value: "2" \}', text)
    gpu = config_pbtxt(bundle, RepositoryOptions(kind="gpu", backend="tensorrt", instances=2, gpus=(0, 1),
                                                 dynamic_batching=False, max_batch_size=16).validate(), "/b")
    assert "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]" in gpu
    assert "dynamic_batching" not in gpu and "max_batch_size: 16" in gpu
    assert [t.name for t in inputs(bundle)][:2] == ["class_id", "seed"]


def test_a_2d_bundle_has_no_prologue_tensors(runtime_fixture_root):
    bundle = Generator.from_bundle(runtime_fixture_root / "bundle2d", backend="cpu").bundle
    text = config_pbtxt(bundle, RepositoryOptions().validate(), "bundle")
    assert "prologue_ids" not in text


@pytest.mark.parametrize("options, message", [
    ({"name": "../x"}, "model name"), ({"name": ""}, "model name"), ({"backend": "gpu"}, "backend must be one of"),
    ({"kind": "tpu"}, "kind must be one of"), ({"instances": 0}, "instances"), ({"max_batch_size": 2000}, "max_batch"),
    ({"queue_delay_us": -1}, "queue_delay_us"), ({"gpus": (0,)}, "gpus need kind gpu"),
    ({"kind": "gpu", "gpus": (1, 1)}, "distinct"), ({"kind": "gpu", "backend": "cpu"}, "kind gpu with backend cpu"),
    ({"site_packages": ("relative/dir",)}, "absolute folder"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(TritonError, match=re.escape(message)):
        RepositoryOptions(**options).validate()


# -- the repository ---------------------------------------------------------------------------------

def test_the_repository_holds_a_verified_copy(runtime_fixture_root, tmp_path):
    source = runtime_fixture_root / "bundle"
    repo = write_repository(source, tmp_path / "repo")
    model = repo / "prologue"
    assert sorted(p.name for p in repo.iterdir()) == ["prologue"]
    assert sorted(p.name for p in model.iterdir()) == ["1", "config.pbtxt"]
    assert (model / "1" / "model.py").read_bytes() == triton.ENTRY_FILE.read_bytes()
    copy = Generator.from_bundle(model / "1" / "bundle", backend="cpu")
    assert copy.bundle.digest == Generator.from_bundle(source, backend="cpu").bundle.digest
    assert 'key: "bundle" value: { string_value: "bundle" }' in (model / "config.pbtxt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no temporary folder left


def test_reference_pins_the_bundle_by_path_and_digest(runtime_fixture_root, tmp_path):
    source = runtime_fixture_root / "bundle"
    repo = write_repository(source, tmp_path / "repo", RepositoryOptions(reference=True, name="gen"))
    text = (repo / "gen" / "config.pbtxt").read_text()
    assert f'string_value: "{source.resolve()}"' in text
    assert not (repo / "gen" / "1" / "bundle").exists()


def test_a_tampered_bundle_is_not_copied(runtime_fixture_root, tmp_path):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(runtime_fixture_root / "bundle", bad)
    with open(bad / "decoder.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="does not match the sha256"):
        write_repository(bad, tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no repository, no temporary folder
    with pytest.raises(BundleError, match="not the expected"):
        write_repository(runtime_fixture_root / "bundle", tmp_path / "repo", digest="0" * 64)


def test_an_existing_folder_is_replaced_only_when_ours(runtime_fixture_root, tmp_path):
    source = runtime_fixture_root / "bundle"
    write_repository(source, tmp_path / "repo")
    with pytest.raises(TritonError, match="exists; pass --force"):
        write_repository(source, tmp_path / "repo")
    write_repository(source, tmp_path / "repo", RepositoryOptions(name="other"), force=True)
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["other"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_repository(source, empty)  # an empty folder is no one's data
    assert [p.name for p in empty.iterdir()] == ["prologue"]
    assert oct(empty.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TritonError, match="not a model repository written by prologue triton"):
        write_repository(source, foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "repo" / "other"  # a repository we wrote, with files a user added: not replaced
    for added in (ours / "labels.txt", ours / "2" / "model.py", ours / "1" / "notes.txt",
                  ours / "1" / "bundle" / "extra.bin"):
        added.parent.mkdir(exist_ok=True)
        added.write_text("the user's")
        with pytest.raises(TritonError, match="not a model repository written by prologue triton"):
            write_repository(source, tmp_path / "repo", force=True)
        assert added.read_text() == "the user's"
        added.unlink()
        if added.parent.name == "2":
            added.parent.rmdir()
    write_repository(source, tmp_path / "repo", force=True)  # as written again: replaced


def test_the_repository_and_the_bundle_stay_apart(runtime_fixture_root, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(runtime_fixture_root / "bundle", bundle)
    for out in (bundle / "repo", bundle, tmp_path):
        with pytest.raises(TritonError, match="must not be inside one another"):
            write_repository(bundle, out, RepositoryOptions(reference=True), force=True)
    repo = write_repository(bundle, tmp_path / "repo")  # the copy, then a reference to the copy in it
    with pytest.raises(TritonError, match="must not be inside one another"):
        write_repository(repo / "prologue" / "1" / "bundle", repo, RepositoryOptions(reference=True), force=True)
    assert Generator.from_bundle(repo / "prologue" / "1" / "bundle", backend="cpu")  # still there, still valid
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in (runtime_fixture_root / "bundle").iterdir())


def test_the_command_writes_a_repository_and_refuses_in_one_line(runtime_fixture_root, tmp_path, capsys):
    source = str(runtime_fixture_root / "bundle")
    assert main(["triton", source, "--out", str(tmp_path / "repo"), "--instances", "2", "--threads", "1",
                 "--queue-delay-us", "500", "--site-packages", str(tmp_path)]) == 0
    text = (tmp_path / "repo" / "prologue" / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in text and "max_queue_delay_microseconds: 500" in text
    assert f'key: "site_packages" value: {{ string_value: "{tmp_path.resolve()}" }}' in text
    capsys.readouterr()
    for argv in (["triton", source, "--out", str(tmp_path / "repo")],
                 ["triton", source, "--out", str(tmp_path / "r2"), "--gpus", "0"],
                 ["triton", str(tmp_path / "missing"), "--out", str(tmp_path / "r3")],
                 ["triton", source, "--out", str(tmp_path / "r4"), "--name", "a/b"]):
        rc = main(argv)
        _one_line_error(rc, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["triton", source, "--out", str(tmp_path / "r5"), "--gpus", "0,0"])
    assert "distinct GPU indices" in capsys.readouterr().err


# -- in the stub process ----------------------------------------------------------------------------

def test_each_gpu_instance_sees_only_its_gpu():
    env = {}
    gpu_visible(1, env, maps="")
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    gpu_visible(1, env, maps="")
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(BundleError, match="lists 2"):
        gpu_visible(2, {"CUDA_VISIBLE_DEVICES": "4,6"}, maps="")
    with pytest.raises(BundleError, match="CUDA started in this process"):
        gpu_visible(1, {}, maps="7f00-7f01 r-xp 0 0:0 0 /usr/lib/x86_64-linux-gnu/libcuda.so.1\n")
    env = {}
    gpu_visible(0, env, maps="... libcuda.so.1")  # GPU 0 is GPU 0 either way
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_numpy_2_is_refused_unless_the_config_allows_it(monkeypatch):
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(BundleError, match="outputs arrive empty"):
        check_stub_numpy({})
    check_stub_numpy({"allow_numpy2": "true"})
    monkeypatch.setattr(np, "__version__", "1.26.4")
    check_stub_numpy({})


def test_the_entry_file_imports_only_the_standard_library_before_the_path_is_set():
    text = triton.ENTRY_FILE.read_text()
    head = text.split("class TritonPythonModel")[0]
    assert re.findall(r"^import (\w+)", head, re.M) == ["json", "os", "site", "sys"]
    assert "from " not in head.replace('"""', "").split("\n\n", 1)[1]
    assert os.path.basename(str(triton.ENTRY_FILE)) == "triton_entry.py"


def test_the_docs_name_every_input_output_and_flag(gen):
    from pathlib import Path

    from prologue_export.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "triton.md").read_text()
    for tensor in inputs(gen.bundle) + triton.outputs(gen.bundle):
        assert f"`{tensor.name}`" in text, tensor.name
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "triton" in a.choices)
    flags = [f for action in sub.choices["triton"]._actions for f in action.option_strings if f.startswith("--")]
    for flag in flags:
        assert flag == "--help" or f"`{flag}" in text, flag
