"""Hostile bundles (issue 15): every malformed manifest, symlink, special file or file swapped
after loading is a one-line `BundleError` (never a KeyError / TypeError / AttributeError / a
traceback from deep inside), and a loaded Generator never runs bytes other than those checked.

Torch-free: uses the bundles of `PROLOGUE_TEST_BUNDLE_DIR` (see tests/runtime_fixture.py) when
set, else builds them with torch like tests/test_runtime.py. Every test mutates its own copy.
"""

import copy
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from prologue_export.runtime import Bundle, BundleError, Generator
from prologue_export.runtime.bundle import LIMITS, MANIFEST, check_signature
from prologue_export.runtime.files import sha256_file


@pytest.fixture(scope="module")
def source(runtime_fixture_root):
    return runtime_fixture_root


@pytest.fixture
def bundle(source, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(source / "bundle", folder)
    return folder


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def write_manifest(folder: Path, manifest) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest))


def vouch(folder: Path, manifest: dict, name: str) -> None:
    """Record `name`'s current sha256 and size in `manifest` (as a rewritten manifest would)."""
    manifest["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}


def refused(folder: Path, *words: str, check_hashes: bool = True) -> str:
    """Bundle(folder) raises a one-line BundleError naming every word in `words`; nothing else escapes."""
    with pytest.raises(BundleError) as info:
        Bundle(folder, check_hashes=check_hashes)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    for word in words:
        assert word in message, message
    return message


# --------------------------------------------------------------------------- manifest mutations


def _set(path: str, value):
    """A mutation that sets the manifest value at a dotted path (`ar.layers`); `DELETE` removes it."""
    def mutate(m):
        *parents, last = path.split(".")
        obj = m
        for key in parents:
            obj = obj[key]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = copy.deepcopy(value)
        return m
    return mutate


DELETE = object()


def _graph(name, fn):
    def mutate(m):
        fn(m["graphs"][name])
        return m
    return mutate


def _first_input(key, value):
    return _graph("decoder", lambda g: g["inputs"][0].__setitem__(key, value))


def _files(fn):
    def mutate(m):
        fn(m["files"])
        return m
    return mutate


MUTATIONS = {
    # the whole manifest
    "top_list": (lambda m: [m], "top level"),
    "top_string": (lambda m: "manifest", "top level"),
    "top_number": (lambda m: 7, "top level"),
    "top_null": (lambda m: None, "top level"),
    "format_missing": (_set("format", DELETE), "format"),
    "format_version_string": (_set("format_version", "2"), "format version"),
    "format_version_float": (_set("format_version", 2.0), "format version"),
    "format_version_bool": (_set("format_version", True), "format version"),
    "producer_list": (_set("producer", []), "producer"),
    # max_batch
    "max_batch_0": (_set("max_batch", 0), "max_batch"),
    "max_batch_-1": (_set("max_batch", -1), "max_batch"),
    "max_batch_null": (_set("max_batch", None), "max_batch"),
    "max_batch_string": (_set("max_batch", "8"), "max_batch"),
    "max_batch_1e9_float": (_set("max_batch", 1e9), "max_batch"),
    "max_batch_1e9_int": (_set("max_batch", 10**9), "max_batch"),
    "max_batch_true": (_set("max_batch", True), "max_batch"),
    "max_batch_4.0": (_set("max_batch", 4.0), "max_batch"),
    # ar
    "ar_string": (_set("ar", "ar"), "ar"),
    "ar_list": (_set("ar", []), "ar"),
    "ar_missing": (_set("ar", DELETE), "ar"),
    "ar_layers_0": (_set("ar.layers", 0), "ar.layers"),
    "ar_layers_-2": (_set("ar.layers", -2), "ar.layers"),
    "ar_layers_huge": (_set("ar.layers", 10**6), "ar.layers"),
    "ar_layers_string": (_set("ar.layers", "2"), "ar.layers"),
    "ar_layers_3": (_set("ar.layers", 3), "graphs.ar_step.inputs"),  # in range, but not the graph's contract
    "ar_heads_0": (_set("ar.heads", 0), "ar.heads"),
    "ar_heads_-1": (_set("ar.heads", -1), "ar.heads"),
    "ar_heads_float": (_set("ar.heads", 2.0), "ar.heads"),
    "ar_head_dim_0": (_set("ar.head_dim", 0), "ar.head_dim"),
    "ar_head_dim_-32": (_set("ar.head_dim", -32), "ar.head_dim"),
    "ar_head_dim_16": (_set("ar.head_dim", 16), "graphs.ar_step.inputs.k_cache_0.shape"),
    "ar_max_seq_len_1e9": (_set("ar.max_seq_len", 10**9), "ar.max_seq_len"),
    "ar_max_seq_len_0": (_set("ar.max_seq_len", 0), "ar.max_seq_len"),
    "ar_max_seq_len_other": (_set("ar.max_seq_len", 100), "ar.max_seq_len"),
    "ar_max_seq_len_null": (_set("ar.max_seq_len", None), "ar.max_seq_len"),
    # vocab
    "vocab_string": (_set("vocab", "vocab"), "vocab"),
    "vocab_missing": (_set("vocab", DELETE), "vocab"),
    "vocab_visual_-1": (_set("vocab.visual_codebook_size", -1), "vocab.visual_codebook_size"),
    "vocab_visual_0": (_set("vocab.visual_codebook_size", 0), "vocab.visual_codebook_size"),
    "vocab_visual_float": (_set("vocab.visual_codebook_size", 256.5), "vocab.visual_codebook_size"),
    "vocab_visual_huge": (_set("vocab.visual_codebook_size", 10**12), "vocab.visual_codebook_size"),
    "vocab_prologue_-1": (_set("vocab.prologue_codebook_size", -1), "vocab.prologue_codebook_size"),
    "vocab_prologue_0": (_set("vocab.prologue_codebook_size", 0), "vocab.prologue_codebook_size"),
    "vocab_Z_-8": (_set("vocab.num_prologue_tokens", -8), "vocab.num_prologue_tokens"),
    "vocab_Z_float": (_set("vocab.num_prologue_tokens", 8.0), "vocab.num_prologue_tokens"),
    "vocab_X_-64": (_set("vocab.num_visual_tokens", -64), "vocab.num_visual_tokens"),
    "vocab_X_null": (_set("vocab.num_visual_tokens", None), "vocab.num_visual_tokens"),
    "vocab_X_huge": (_set("vocab.num_visual_tokens", 10**9), "vocab.num_visual_tokens"),
    "vocab_eos_string": (_set("vocab.eos_id", "320"), "eos_id"),
    "vocab_size_float": (_set("vocab.vocab_size", 321.0), "vocab_size"),
    # image, classes
    "image_list": (_set("image", []), "image"),
    "image_size_0": (_set("image.size", 0), "image.size"),
    "image_size_-32": (_set("image.size", -32), "image.size"),
    "image_size_huge": (_set("image.size", 100000), "image.size"),
    "image_size_string": (_set("image.size", "32"), "image.size"),
    "image_size_16": (_set("image.size", 16), "graphs.decoder.outputs"),  # in range, not the graph's contract
    "image_channels_0": (_set("image.channels", 0), "image.channels"),
    "image_channels_3": (_set("image.channels", 3), "graphs.decoder.outputs"),
    "image_patch_size_0": (_set("image.patch_size", 0), "image.patch_size"),
    "num_classes_-1": (_set("num_classes", -1), "num_classes"),
    "num_classes_0": (_set("num_classes", 0), "num_classes"),
    "num_classes_huge": (_set("num_classes", 10**7), "num_classes"),
    "num_classes_string": (_set("num_classes", "10"), "num_classes"),
    "num_classes_missing": (_set("num_classes", DELETE), "num_classes"),
    "null_class_other": (_set("null_class", 3), "null_class"),
    # sampling defaults
    "sampling_list": (_set("sampling_defaults", []), "sampling_defaults"),
    "sampling_string": (_set("sampling_defaults", "greedy"), "sampling_defaults"),
    "sampling_unknown_key": (_set("sampling_defaults.bogus", 1), "sampling_defaults"),
    "sampling_temperature_string": (_set("sampling_defaults.temperature", "hot"), "sampling_defaults"),
    "sampling_temperature_0": (_set("sampling_defaults.temperature", 0), "sampling_defaults"),
    "sampling_top_k_-1": (_set("sampling_defaults.top_k", -1), "sampling_defaults"),
    "sampling_cfg_nested": (_set("sampling_defaults.cfg", {"a": [1]}), "sampling_defaults"),
    # files
    "files_list": (_set("files", []), "files"),
    "files_missing": (_set("files", DELETE), "files"),
    "files_entry_string": (_files(lambda f: f.__setitem__("decoder.onnx", "abc")), "files['decoder.onnx']"),
    "files_no_sha256": (_files(lambda f: f["decoder.onnx"].pop("sha256")), "files['decoder.onnx'].sha256"),
    "files_no_bytes": (_files(lambda f: f["decoder.onnx"].pop("bytes")), "files['decoder.onnx'].bytes"),
    "files_bytes_string": (_files(lambda f: f["decoder.onnx"].__setitem__("bytes", "863583")), "bytes"),
    "files_bytes_-1": (_files(lambda f: f["decoder.onnx"].__setitem__("bytes", -1)), "bytes"),
    "files_bytes_float": (_files(lambda f: f["decoder.onnx"].__setitem__("bytes", 1.5)), "bytes"),
    "files_sha256_number": (_files(lambda f: f["decoder.onnx"].__setitem__("sha256", 123)), "sha256"),
    "files_sha256_short": (_files(lambda f: f["decoder.onnx"].__setitem__("sha256", "abc")), "sha256"),
    "files_name_subfolder": (_files(lambda f: f.__setitem__("sub/x.onnx", {"sha256": "0" * 64, "bytes": 1})),
                             "sub-folder"),
    "files_name_absolute": (_files(lambda f: f.__setitem__("/etc/passwd", {"sha256": "0" * 64, "bytes": 1})),
                            "outside the bundle folder"),
    "files_name_dotdot": (_files(lambda f: f.__setitem__("..", {"sha256": "0" * 64, "bytes": 1})),
                          "outside the bundle folder"),
    "files_name_manifest": (_files(lambda f: f.__setitem__(MANIFEST, {"sha256": "0" * 64, "bytes": 1})),
                            "not a plain file name"),
    "files_too_many": (_files(lambda f: f.update({f"x{i}": {"sha256": "0" * 64, "bytes": 1}
                                                  for i in range(LIMITS["files"] + 1)})), "files"),
    # graphs
    "graphs_list": (_set("graphs", []), "graphs"),
    "graphs_missing": (_set("graphs", DELETE), "graphs"),
    "graphs_entry_string": (_set("graphs.decoder", "decoder.onnx"), "graphs.decoder"),
    "graphs_unknown": (_set("graphs.encoder", {"file": "decoder.onnx", "inputs": [], "outputs": []}),
                       "graphs.encoder"),
    "graphs_file_unlisted": (_graph("decoder", lambda g: g.__setitem__("file", "other.onnx")), "graphs.decoder.file"),
    "graphs_file_number": (_graph("decoder", lambda g: g.__setitem__("file", 7)), "graphs.decoder.file"),
    "graphs_inputs_string": (_graph("decoder", lambda g: g.__setitem__("inputs", "visual_ids")),
                             "graphs.decoder.inputs"),
    "graphs_inputs_of_strings": (_graph("decoder", lambda g: g.__setitem__("inputs", ["visual_ids"])),
                                 "graphs.decoder.inputs[0]"),
    "graphs_inputs_null": (_graph("decoder", lambda g: g.__setitem__("inputs", None)), "graphs.decoder.inputs"),
    "graphs_outputs_missing": (_graph("decoder", lambda g: g.pop("outputs")), "graphs.decoder.outputs"),
    "graphs_input_name_number": (_first_input("name", 1), "graphs.decoder.inputs[0].name"),
    "graphs_input_renamed": (_first_input("name", "ids"), "graphs.decoder.inputs"),
    "graphs_input_dtype_bad": (_first_input("dtype", "float128"), "graphs.decoder.inputs[0].dtype"),
    "graphs_input_dtype_other": (_first_input("dtype", "int32"), "graphs.decoder.inputs.visual_ids.dtype"),
    "graphs_input_shape_string": (_first_input("shape", "batch"), "graphs.decoder.inputs[0].shape"),
    "graphs_input_shape_-1": (_first_input("shape", ["batch", -1]), "graphs.decoder.inputs[0].shape[1]"),
    "graphs_input_shape_float": (_first_input("shape", ["batch", 64.0]), "graphs.decoder.inputs[0].shape[1]"),
    "graphs_input_shape_rank": (_first_input("shape", ["batch"]), "graphs.decoder.inputs.visual_ids.shape"),
    "graphs_input_shape_static": (_first_input("shape", ["batch", 32]), "graphs.decoder.inputs.visual_ids.shape"),
    "graphs_input_shape_deep": (_first_input("shape", [1] * 100), "graphs.decoder.inputs[0].shape"),
    "graphs_input_duplicate": (_graph("decoder", lambda g: g["inputs"].append(dict(g["inputs"][0]))),
                               "graphs.decoder.inputs[1].name"),
    "graphs_axes_list": (_graph("decoder", lambda g: g.__setitem__("dynamic_axes", [])),
                         "graphs.decoder.dynamic_axes"),
    "graphs_axes_min_gt_max": (_graph("decoder", lambda g: g["dynamic_axes"].__setitem__(
        "batch", {"min": 4, "opt": 2, "max": 1})), "graphs.decoder.dynamic_axes.batch"),
    "graphs_axes_beyond": (_graph("decoder", lambda g: g["dynamic_axes"].__setitem__(
        "batch", {"min": 1, "opt": 4, "max": 4096})), "graphs.decoder.dynamic_axes.batch"),
    "graphs_axes_unknown": (_graph("decoder", lambda g: g["dynamic_axes"].__setitem__(
        "tokens", {"min": 1, "opt": 1, "max": 2})), "graphs.decoder.dynamic_axes.tokens"),
    # engines
    "engines_list": (_set("engines", []), "engines"),
    "engines_entry_string": (_set("engines.decoder", "decoder.engine"), "engines.decoder"),
    "engines_file_unlisted": (_set("engines.decoder", {"file": "decoder.fp16.engine"}), "engines.decoder.file"),
    "engines_unknown_graph": (_set("engines.encoder", {"file": "decoder.onnx"}), "engines.encoder"),
    "engines_max_batch_0": (_set("engines.decoder", {"file": "decoder.onnx", "max_batch": 0}),
                            "engines.decoder.max_batch"),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_malformed_manifest_is_a_one_line_bundle_error(bundle, case):
    mutate, field = MUTATIONS[case]
    write_manifest(bundle, mutate(manifest_of(bundle)))
    message = refused(bundle, field)
    assert "re-export" in message


RAW_MANIFESTS = {
    "nan": lambda text: text.replace('"max_batch": 4', '"max_batch": NaN'),
    "infinity": lambda text: text.replace('"cfg": 2.0', '"cfg": Infinity'),
    "minus_infinity": lambda text: text.replace('"cfg": 2.0', '"cfg": -Infinity'),
    "deep_nesting": lambda text: text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep_objects": lambda text: text[:-1] + ', "x": ' + '{"a": ' * 50 + "1" + "}" * 50 + "}",
    "not_json": lambda text: "{not json",
    "truncated": lambda text: text[: len(text) // 2],
    "trailing_garbage": lambda text: text + " ]",
    "empty": lambda text: "",
}


@pytest.mark.parametrize("case", list(RAW_MANIFESTS))
def test_manifest_that_is_not_strict_bounded_json_is_refused(bundle, case):
    text = (bundle / MANIFEST).read_text()
    assert '"max_batch": 4' in text and '"cfg": 2.0' in text
    (bundle / MANIFEST).write_text(RAW_MANIFESTS[case](json.dumps(json.loads(text))))
    refused(bundle, MANIFEST)


def test_huge_and_binary_manifests_are_refused(bundle):
    with open(bundle / MANIFEST, "r+b") as fh:
        fh.truncate(100 * 1024**2)  # 100 MB (sparse): refused before parsing
    refused(bundle, "larger than")
    (bundle / MANIFEST).write_bytes(b"\xff\xfe{\x00")
    refused(bundle, MANIFEST)


@pytest.mark.parametrize("seed", range(8))
def test_random_manifest_mutations_never_escape_as_other_errors(bundle, seed):
    """A seeded fuzzer (hypothesis is not a dependency): each round replaces, deletes or retypes
    one random value of the manifest; Bundle must load it or raise a one-line BundleError."""
    rng = random.Random(seed)
    original = manifest_of(bundle)
    junk = [None, True, -1, 0, 1, 2**63, 1e300, -0.5, "", "x", "8", [], [1], {}, {"a": None}, "../x", "\u2028"]
    refusals = 0
    for _ in range(40):
        m = copy.deepcopy(original)
        parent, key = _random_slot(m, rng)
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = copy.deepcopy(rng.choice(junk))
        write_manifest(bundle, m)
        try:
            Bundle(bundle, check_hashes=rng.random() < 0.5)
        except BundleError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)
            refusals += 1
    assert refusals > 20


def _random_slot(m, rng):
    """(container, key or index) of a random value in the manifest."""
    parent, key = m, rng.choice(list(m))
    while isinstance(parent[key], (dict, list)) and parent[key] and rng.random() < 0.7:
        parent = parent[key]
        key = rng.choice(list(parent)) if isinstance(parent, dict) else rng.randrange(len(parent))
    return parent, key


def test_the_2d_baseline_and_an_engine_entry_are_accepted(source, tmp_path):
    shutil.copytree(source / "bundle2d", tmp_path / "b2d")
    b = Bundle(tmp_path / "b2d")
    assert b.vocab.eos_id is None and b.ar_cache_shape(2)[1] == 2
    folder = tmp_path / "b"
    shutil.copytree(source / "bundle", folder)
    m = manifest_of(folder)
    (folder / "decoder.fp32.engine").write_bytes(b"fake engine")
    vouch(folder, m, "decoder.fp32.engine")
    m["engines"] = {"decoder": {"file": "decoder.fp32.engine", "precision": "fp32", "max_batch": 4, "profile": {}}}
    write_manifest(folder, m)
    assert Bundle(folder).read_verified("decoder.fp32.engine") == b"fake engine"
    assert len(Bundle(folder).digest) == 64


def test_a_pinned_manifest_digest_pins_the_bundle(bundle):
    digest = Bundle(bundle).digest
    Bundle(bundle, digest=digest)
    m = manifest_of(bundle)
    m["sampling_defaults"]["temperature"] = 0.5
    write_manifest(bundle, m)
    with pytest.raises(BundleError, match="not the bundle you pinned"):
        Bundle(bundle, digest=digest)
    with pytest.raises(BundleError, match="not the bundle you pinned"):
        Generator.from_bundle(bundle, backend="cpu", digest=digest)


# --------------------------------------------------------------------------- the folder: symlinks, special files

needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


@needs_symlinks
def test_a_symlinked_graph_is_refused_even_with_the_same_bytes(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "decoder.onnx", outside)
    (bundle / "decoder.onnx").symlink_to(outside)
    refused(bundle, "symlink", "decoder.onnx")


@needs_symlinks
def test_a_symlinked_sub_folder_cannot_hide_an_unlisted_file(bundle, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "payload.onnx").write_bytes(b"unlisted")
    (bundle / "extra").symlink_to(hidden, target_is_directory=True)
    refused(bundle, "symlink", "extra")
    refused(bundle, "symlink", check_hashes=False)  # refused even without hashing


@needs_symlinks
def test_a_symlinked_manifest_is_refused(bundle, tmp_path):
    shutil.move(bundle / MANIFEST, tmp_path / "real_manifest.json")
    (bundle / MANIFEST).symlink_to(tmp_path / "real_manifest.json")
    refused(bundle, "symlink", MANIFEST)


@needs_symlinks
def test_a_dangling_symlink_is_refused(bundle, tmp_path):
    (bundle / "ghost").symlink_to(tmp_path / "nothing")
    refused(bundle, "symlink", "ghost")


def test_a_real_sub_folder_with_an_unlisted_file_is_refused(bundle):
    (bundle / "sub").mkdir()
    (bundle / "sub" / "payload.onnx").write_bytes(b"unlisted")
    refused(bundle, "does not vouch for", "sub/payload.onnx")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_hanging(bundle):
    os.unlink(bundle / "decoder.onnx")
    os.mkfifo(bundle / "decoder.onnx")
    refused(bundle, "not a regular file", "decoder.onnx")


def test_a_manifest_that_is_a_folder_is_refused(bundle):
    os.unlink(bundle / MANIFEST)
    (bundle / MANIFEST).mkdir()
    refused(bundle, MANIFEST)


# --------------------------------------------------------------------------- files swapped after loading

CLASSES, SEED = [1, 2, 3], 4


def _swap(folder: Path, name: str, data: bytes) -> None:
    """Replace a file's contents in place (same inode) or by rename, the way an attacker would."""
    tmp = folder / (name + ".swap")
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


@pytest.mark.parametrize("graph", ["decoder.onnx", "ar_step.onnx"])
def test_a_graph_swapped_before_its_session_exists_is_refused(source, bundle, graph):
    """decoder / ar_step of the 2d bundle: valid graphs of the same I/O, other weights."""
    gen = Generator.from_bundle(bundle, backend="cpu")  # sessions are created lazily
    other = (source / "bundle2d" / graph).read_bytes()
    assert other != (bundle / graph).read_bytes()
    if graph == "ar_step.onnx":
        return _check_refused(lambda: gen.generate(CLASSES, seed=SEED), bundle, graph, other)
    _check_refused(lambda: gen.decode(np.zeros((1, 64), dtype=np.int64)), bundle, graph, other)


def _check_refused(call, bundle, graph, other):
    _swap(bundle, graph, other)
    with pytest.raises(BundleError, match=f"{graph} (does not match the sha256|has [0-9]+ bytes)"):
        call()


def test_a_graph_swapped_after_its_session_exists_is_never_run(source, bundle):
    gen = Generator.from_bundle(bundle, backend="cpu")
    before = gen.generate(CLASSES, seed=SEED)
    for graph in ("decoder.onnx", "ar_step.onnx", "prologue_generator.onnx"):
        _swap(bundle, graph, (source / "bundle2d" / graph).read_bytes())
    np.testing.assert_array_equal(gen.generate(CLASSES, seed=SEED), before)  # the sessions hold the checked bytes
    with pytest.raises(BundleError, match="sha256|bytes"):  # and a new Generator refuses the swapped bundle
        Generator.from_bundle(bundle, backend="cpu")


def test_a_graph_swapped_to_a_symlink_after_loading_is_refused(bundle, tmp_path):
    gen = Generator.from_bundle(bundle, backend="cpu")
    if sys.platform == "win32":
        pytest.skip("symlinks need privileges on Windows")
    shutil.copy(bundle / "decoder.onnx", tmp_path / "same.onnx")
    os.unlink(bundle / "decoder.onnx")
    (bundle / "decoder.onnx").symlink_to(tmp_path / "same.onnx")
    with pytest.raises(BundleError, match="symlink"):
        gen.decode(np.zeros((1, 64), dtype=np.int64))


def test_a_swapped_graph_with_a_rewritten_manifest_must_match_the_contract(source, bundle):
    """The manifest is the root of trust: a rewritten manifest may vouch for another graph. Such a
    graph runs only when it has exactly the runtime's contract (names, dtypes, static sizes); the
    prologue generator's file in place of the decoder is refused when its session is built."""
    m = manifest_of(bundle)
    shutil.copy(bundle / "prologue_generator.onnx", bundle / "decoder.onnx")
    vouch(bundle, m, "decoder.onnx")
    write_manifest(bundle, m)
    gen = Generator.from_bundle(bundle, backend="cpu")
    with pytest.raises(BundleError, match="graph 'decoder': inputs are"):
        gen.decode(np.zeros((1, 64), dtype=np.int64))


SIGNATURE_CHANGES = {
    "renamed_input": lambda i, o: ([("ids", "int64", ["b", 64])], o),
    "other_dtype": lambda i, o: ([("visual_ids", "int32", ["b", 64])], o),
    "other_static_dim": lambda i, o: ([("visual_ids", "int64", ["b", 32])], o),
    "other_rank": lambda i, o: ([("visual_ids", "int64", ["b", 64, 1])], o),
    "missing_output": lambda i, o: (i, o[:1]),
    "extra_output": lambda i, o: (i, o + [("debug", "float32", [1])]),
    "other_output_shape": lambda i, o: (i, [("image", "uint8", ["b", 3, 32, 32]), o[1]]),
}


@pytest.mark.parametrize("case", list(SIGNATURE_CHANGES))
def test_a_graph_whose_session_differs_from_the_contract_is_refused(bundle, case):
    contract = Bundle(bundle).graphs["decoder"]
    inputs = [("visual_ids", "int64", ["b", 64])]
    outputs = [("image", "uint8", ["b", 1, 32, 32]), ("image_float", "float32", ["b", 1, 32, 32])]
    check_signature("decoder", contract, inputs, outputs)  # the real one passes (dynamic batch)
    with pytest.raises(BundleError, match="graph 'decoder'"):
        check_signature("decoder", contract, *SIGNATURE_CHANGES[case](inputs, outputs))


# --------------------------------------------------------------------------- engines (Bundle level)


@pytest.fixture
def engine_bundle(bundle):
    m = manifest_of(bundle)
    (bundle / "decoder.fp32.engine").write_bytes(b"fake engine of decoder")
    vouch(bundle, m, "decoder.fp32.engine")
    m["engines"] = {"decoder": {"file": "decoder.fp32.engine", "precision": "fp32", "max_batch": 4}}
    write_manifest(bundle, m)
    return bundle


@pytest.mark.parametrize("swap", ["same_size", "other_size", "symlink", "deleted", "folder"])
def test_an_engine_swapped_after_loading_is_refused_when_read(engine_bundle, tmp_path, swap):
    b = Bundle(engine_bundle)
    file = engine_bundle / "decoder.fp32.engine"
    assert b.read_verified("decoder.fp32.engine") == b"fake engine of decoder"
    if swap == "same_size":
        _swap(engine_bundle, file.name, b"fake engine of DECODER")
    elif swap == "other_size":
        _swap(engine_bundle, file.name, b"evil")
    elif swap == "symlink":
        if sys.platform == "win32":
            pytest.skip("symlinks need privileges on Windows")
        shutil.move(file, tmp_path / "same.engine")
        file.symlink_to(tmp_path / "same.engine")
    elif swap == "deleted":
        file.unlink()
    else:
        file.unlink()
        file.mkdir()
    with pytest.raises(BundleError) as info:
        b.read_verified("decoder.fp32.engine")
    assert "decoder.fp32.engine" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BundleError, match="not listed"):
        b.read_verified("manifest.json")


def test_the_tensorrt_backend_deserializes_the_checked_bytes(engine_bundle, monkeypatch):
    """With the fake TensorRT of tests/fakes/tensorrt.py: an engine swapped between Bundle() and the
    backend's creation is refused, not deserialized."""
    from prologue_export.runtime import cuda as runtime_cuda
    from prologue_export.runtime import tensorrt_backend

    from .fakes.cuda import FakeCudart
    from .fakes.tensorrt import fake_tensorrt

    m = manifest_of(engine_bundle)
    for graph in ("prologue_generator", "ar_step"):
        name = f"{graph}.fp32.engine"
        (engine_bundle / name).write_bytes(f"fake engine of {graph}".encode())
        vouch(engine_bundle, m, name)
        m["engines"][graph] = {"file": name, "precision": "fp32", "max_batch": 4}
    for meta in m["engines"].values():
        meta.update(tensorrt_version="10.7.0", compute_capability="9.0", device="Fake GPU")
    write_manifest(engine_bundle, m)
    cudart = FakeCudart()
    graphs = {f"fake engine of {g}".encode(): (g, engine_bundle / f"{g}.onnx")
              for g in ("decoder", "prologue_generator", "ar_step")}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cudart, graphs))
    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: cudart)
    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cudart)
    b = Bundle(engine_bundle)
    tensorrt_backend.TensorRTBackend(b).close()  # the real bytes load
    _swap(engine_bundle, "decoder.fp32.engine", b"fake engine of decodeX")
    with pytest.raises(BundleError, match="decoder.fp32.engine does not match the sha256"):
        tensorrt_backend.TensorRTBackend(b)


# --------------------------------------------------------------------------- external weights (<file>.data)


@pytest.fixture
def external_bundle(bundle):
    """The bundle with decoder.onnx's weights moved into decoder.onnx.data (as for a graph over 2 GB)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / "decoder.onnx"))
    onnx.save(model, str(bundle / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data")
    m = manifest_of(bundle)
    vouch(bundle, m, "decoder.onnx")
    vouch(bundle, m, "decoder.onnx.data")
    write_manifest(bundle, m)
    return bundle


def test_external_weights_are_checked_and_loaded_from_memory(source, external_bundle, tmp_path, monkeypatch):
    ids = np.arange(64, dtype=np.int64)[None] % 200
    want = Generator.from_bundle(source / "bundle", backend="cpu").decode(ids)
    gen = Generator.from_bundle(external_bundle, backend="cpu")
    np.testing.assert_array_equal(gen.decode(ids), want)
    gen = Generator.from_bundle(external_bundle, backend="cpu")
    data = bytearray((external_bundle / "decoder.onnx.data").read_bytes())
    data[100] ^= 0xFF
    _swap(external_bundle, "decoder.onnx.data", bytes(data))
    monkeypatch.chdir(external_bundle)  # no fallback to the working directory either
    with pytest.raises(BundleError, match="decoder.onnx.data does not match the sha256"):
        gen.decode(ids)


def test_external_weights_never_come_from_the_working_directory(source, external_bundle, tmp_path, monkeypatch):
    """A graph that refers to a `.data` file its manifest does not list gets no weights from disk."""
    folder = tmp_path / "b"
    shutil.copytree(external_bundle, folder)
    m = manifest_of(folder)
    del m["files"]["decoder.onnx.data"]
    write_manifest(folder, m)
    work = tmp_path / "cwd"
    work.mkdir()
    shutil.move(folder / "decoder.onnx.data", work / "decoder.onnx.data")
    monkeypatch.chdir(work)
    gen = Generator.from_bundle(folder, backend="cpu")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        gen.decode(np.zeros((1, 64), dtype=np.int64))
