"""`import-official --hub`: preset -> release folders -> inference files, through huggingface_hub.

No network: a Hugging Face cache is laid out as huggingface_hub lays it out
(`models--OWNER--NAME/{refs,blobs,snapshots}`), with fixture_a's files under the release's folder
names next to pickles the importer must never request; the online path runs against fakes of
the two huggingface_hub calls it makes. The folder and slot facts are checked against
shared/reference/official_keys (listed from the authors' own classes), not against our tables.
"""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

huggingface_hub = pytest.importorskip("huggingface_hub")

from prologue_export.cli import hub  # noqa: E402
from prologue_export.checkpoint import CheckpointError, load_checkpoint, load_source  # noqa: E402
from prologue_export.cli import main  # noqa: E402
from prologue_export.official import import_official  # noqa: E402

REPO = "Zyriix/prologue"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
PICKLES = ("optimizer.bin", "optimizer_1.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "extra_state.pt")
# what official_keys/<folder>.json says each file we read holds (the authors' classes, not our tables)
HOLDS = {
    ("tokenizer", "model_2.safetensors"): "Encoder EMA",
    ("tokenizer", "model_3.safetensors"): "Decoder EMA",
    ("ar", "model.safetensors"): "ARModel (non-EMA)",
    ("onestage", "model.safetensors"): "Encoder (non-EMA)",
    ("onestage", "model_1.safetensors"): "Decoder (non-EMA)",
    ("onestage", "model_5.safetensors"): "ARModel (non-EMA)",
}


def put(cache, repo_path: str, data: bytes, commit: str = COMMIT, repo: str = REPO) -> None:
    """One file in the cache as huggingface_hub stores it: a blob named by its hash, a relative
    symlink to it from the snapshot of `commit`, and refs/main -> the first commit written."""
    root = cache / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / commit / repo_path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    ref = root / "refs" / "main"
    if not ref.exists():
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


def fixture_release(reference_dir, cache, commit: str = COMMIT) -> None:
    """fixture_a's accelerate folders under the release's names, pickles and all."""
    tok = reference_dir / "fixture_a" / "tokenizer"
    ar = reference_dir / "fixture_a" / "ar"
    for folder in ("prologue-b-tokenizer", "prologue-onestage-joint"):
        for file in sorted(tok.glob("*.safetensors")):
            put(cache, f"{folder}/{file.name}", file.read_bytes(), commit)
        for name in PICKLES:
            put(cache, f"{folder}/{name}", b"\x80\x04 not to be opened " + name.encode(), commit)
    put(cache, "prologue-onestage-joint/model_5.safetensors", (ar / "model.safetensors").read_bytes(), commit)
    for file in sorted(ar.glob("*.safetensors")):
        put(cache, f"ar-prologue-b-b/{file.name}", file.read_bytes(), commit)
    for name in PICKLES:
        put(cache, f"ar-prologue-b-b/{name}", b"\x80\x04 not to be opened", commit)


def isolate_hub(monkeypatch, tmp_path, endpoint: str) -> None:
    """huggingface_hub pointed at `endpoint` as HF_ENDPOINT would point it (read at its import), with its
    user-agent registry not yet fetched (so a stray request shows) and no progress bars on stderr."""
    import huggingface_hub.utils._detect_agent  # noqa: F401
    import huggingface_hub.utils.tqdm  # noqa: F401

    c = huggingface_hub.constants
    monkeypatch.setattr(c, "ENDPOINT", endpoint)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(c, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"))
    monkeypatch.setattr(sys.modules["huggingface_hub.utils._detect_agent"], "_registry", None)
    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", True)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _never_the_real_hub(monkeypatch, tmp_path):
    """No test here may reach huggingface.co: the client's endpoint is a local port nothing listens on."""
    isolate_hub(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port()}")


@pytest.fixture
def spy(monkeypatch):
    """Every file huggingface_hub is asked for, and every file the import opens."""
    seen = {"requested": [], "opened": []}
    real_download = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kw):
        seen["requested"].append(filename)
        return real_download(repo_id, filename, **kw)

    def no_network(*a, **kw):
        raise AssertionError("the network was asked in an offline test")

    import prologue_export.official as official

    real_read = official.read_tensors
    real_hash = hub.hub_digest
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", no_network)
    monkeypatch.setattr(official, "read_tensors", lambda f, **kw: seen["opened"].append(str(f)) or real_read(f, **kw))
    monkeypatch.setattr(hub, "hub_digest", lambda f, *a, **kw: seen["opened"].append(str(f)) or real_hash(f, *a, **kw))
    return seen


CASES = {  # name -> (resolve_release kwargs, local import kwargs relative to fixture_a)
    "pair": (dict(), dict(tokenizer_dir="tokenizer", ar_dir="ar")),
    "tokenizer-alone": (dict(tokenizer_only=True), dict(tokenizer_dir="tokenizer")),
    "onestage": (dict(onestage=True), dict(tokenizer_dir="onestage", onestage=True)),
}


def _local_import(reference_dir, tmp_path, kind: str, out):
    root = reference_dir / "fixture_a"
    local = CASES[kind][1].copy()
    if local["tokenizer_dir"] == "onestage":  # OneStage's AR is model_5 of its tokenizer folder
        folder = tmp_path / "onestage-folder"
        shutil.copytree(root / "tokenizer", folder)
        shutil.copy(root / "ar" / "model.safetensors", folder / "model_5.safetensors")
        local["tokenizer_dir"] = folder
    else:
        local["tokenizer_dir"] = root / local["tokenizer_dir"]
    if "ar_dir" in local:
        local["ar_dir"] = root / local["ar_dir"]
    return import_official(out=out, official_config=root / "config.json", **local)


# ---------------------------------------------------------------------------------------------
# resolution, against the authors' tables


def test_resolution_matches_the_release_tables(reference_dir):
    """Every folder we name is a released folder, and every file we read holds what the release's
    own table says inference uses (EMA tokenizer, non-EMA AR; OneStage's non-EMA slots)."""
    keys = reference_dir / "official_keys"
    assert set(hub.released_presets()) == {f"prologue-{t}-{a}" for t in "bl" for a in ("b", "l", "xl")} | {
        "prologue-post-b", "2d-base"}
    releases = [hub.resolve_release(p, tokenizer_only=t) for p in hub.released_presets() for t in (False, True)]
    releases.append(hub.resolve_release("prologue-b-b", onestage=True))
    for release in releases:
        for path, _holds in release.files:
            folder, name = path.split("/")
            table = json.loads((keys / f"{folder}.json").read_text())
            kind = "onestage" if release.onestage else ("ar" if folder.startswith("ar-") else "tokenizer")
            assert HOLDS[kind, name] in table["files"][name]["holds"], (path, table["files"][name]["holds"])
        assert len(release.files) == (2 if release.ar_folder is None and not release.onestage else 3)
    assert all(p.endswith(".safetensors") for p in hub.ALLOWED_PATHS)
    assert len(hub.ALLOWED_PATHS) == 2 * 4 + 8 + 3  # 4 tokenizer folders x 2, 8 AR folders, OneStage's 3


@pytest.mark.parametrize("path", [
    "prologue-b-tokenizer/optimizer.bin", "prologue-b-tokenizer/random_states_0.pkl", "ar-prologue-b-b/extra_state.pt",
    "prologue-b-tokenizer/model_4.safetensors", "ar-prologue-b-b/model_1.safetensors", "prologue-b-tokenizer/model.safetensors",
    "1d-tokenizer/model_2.safetensors", "../prologue-b-tokenizer/model_2.safetensors", "prologue-b-tokenizer/model_2.safetensors/",
])
def test_a_file_inference_does_not_read_cannot_be_requested(path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: calls.append(a))
    release = hub.resolve_release("prologue-b-b")
    with pytest.raises(hub.HubError, match="not a file the importer reads"):
        hub._download(huggingface_hub, huggingface_hub.errors, REPO, path, release, None, tmp_path, True)
    assert calls == []


@pytest.mark.parametrize("preset,kw,match", [
    ("tiny", {}, "released pair"), ("prologue-b+base", {}, "released pair"),
    ("prologue-l-b", {"onestage": True}, "sizes of --preset prologue-b-b"),
    ("prologue-b-b", {"onestage": True, "tokenizer_only": True}, "drop --tokenizer-only"),
])
def test_resolution_errors(preset, kw, match):
    with pytest.raises(hub.HubError, match=match):
        hub.resolve_release(preset, **kw)


# ---------------------------------------------------------------------------------------------
# the import: bit-identical to the local one, provenance, nothing else requested or opened


@pytest.mark.parametrize("kind", sorted(CASES))
def test_hub_import_is_bit_identical_to_the_local_import(kind, reference_dir, tmp_path, spy):
    cache = tmp_path / "hf-cache"
    fixture_release(reference_dir, cache)
    release = hub.resolve_release("prologue-b-b", **CASES[kind][0])
    lines = []
    hub.import_from_hub(tmp_path / "from-hub", release, official_config=reference_dir / "fixture_a" / "config.json",
                        cache_dir=cache, offline=True, log=lines.append)
    _local_import(reference_dir, tmp_path, kind, tmp_path / "local")
    files = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "from-hub").glob("*.safetensors"))
    assert files == (["ar.safetensors", "tokenizer.safetensors"] if release.with_ar else ["tokenizer.safetensors"])
    for name in files:
        a, b = load_file(tmp_path / "from-hub" / name), load_file(tmp_path / "local" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    hub_cfg = json.loads((tmp_path / "from-hub" / "config.json").read_text())
    local_cfg = json.loads((tmp_path / "local" / "config.json").read_text())
    assert hub_cfg.pop("source")["kind"] == "huggingface-hub" and local_cfg.pop("source")["kind"] == "folders"
    assert hub_cfg == local_cfg
    # provenance: repo, commit, each file with the sha256 of what was read
    source = load_source(tmp_path / "from-hub")
    assert (source["repo"], source["revision"], source["commit"]) == (REPO, "main", COMMIT)
    assert [f["path"] for f in source["files"]] == [p for p, _ in release.files]
    for entry in source["files"]:
        data = (cache / f"models--Zyriix--prologue/snapshots/{COMMIT}/{entry['path']}").read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert [f["sha256"] for f in source["files"]] == [f["sha256"] for f in load_source(tmp_path / "local")["files"]]
    assert load_checkpoint(tmp_path / "from-hub").config.to_dict() == load_checkpoint(tmp_path / "local").config.to_dict()
    # only the inference files were requested, and nothing else in the cache was opened
    assert spy["requested"] == [p for p, _ in release.files]
    # the hash is taken of the blob a release file's snapshot link points to: the same file
    snapshot = cache / "models--Zyriix--prologue" / "snapshots" / COMMIT
    blobs = {os.path.realpath(snapshot / p): p for p, _ in release.files}
    opened_names = {blobs.get(os.path.realpath(p)) or p.split("/")[-2] + "/" + p.split("/")[-1] for p in spy["opened"]}
    assert opened_names <= hub.ALLOWED_PATHS | {f"{d}/{n}" for d in ("tokenizer", "ar", "onestage-folder")
                                                 for n in ("model.safetensors", "model_1.safetensors", "model_2.safetensors",
                                                           "model_3.safetensors", "model_5.safetensors")}
    assert not any(p.endswith((".bin", ".pkl", ".pt")) for p in spy["opened"])
    assert lines[0].startswith("offline: reading") and all(p in "\n".join(lines) for p, _ in release.files)


def test_revision_pins_a_commit(reference_dir, tmp_path, spy):
    cache = tmp_path / "hf-cache"
    fixture_release(reference_dir, cache)  # main -> COMMIT
    tok = reference_dir / "fixture_a" / "tokenizer"
    put(cache, "prologue-b-tokenizer/model_2.safetensors", (tok / "model.safetensors").read_bytes(), OTHER_COMMIT)
    put(cache, "prologue-b-tokenizer/model_3.safetensors", (tok / "model_1.safetensors").read_bytes(), OTHER_COMMIT)
    release = hub.resolve_release("prologue-b-b", tokenizer_only=True)
    model = hub.import_from_hub(tmp_path / "pinned", release, official_config=reference_dir / "fixture_a" / "config.json",
                                cache_dir=cache, offline=True, revision=OTHER_COMMIT, log=lambda line: None)
    assert load_source(tmp_path / "pinned")["commit"] == OTHER_COMMIT
    non_ema = load_file(tok / "model_1.safetensors")
    assert torch.equal(model.tokenizer.decoder.out.weight, non_ema["dec.out.weight"])


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_one_command_offline(reference_dir, tmp_path, capsys, spy):
    cache = tmp_path / "hf-cache"
    fixture_release(reference_dir, cache)
    rc = main(["import-official", "--hub", "--preset", "prologue-b-b", "--official-config",
               str(reference_dir / "fixture_a" / "config.json"), "--cache-dir", str(cache), "--offline",
               "--out", str(tmp_path / "ckpt"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert report["source"]["commit"] == COMMIT and report["parameters"]["ar"] > 0
    assert "offline: reading 3 files" in out.err  # progress on stderr with --json


def test_offline_and_not_cached_says_what_to_run(tmp_path, capsys, spy):
    cache = tmp_path / "empty-cache"
    put(cache, "prologue-b-tokenizer/model_2.safetensors", b"partial")  # one of the three is there
    rc = main(["import-official", "--hub", "--preset", "prologue-b-b", "--offline", "--cache-dir", str(cache),
               "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "prologue-b-tokenizer/model_3.safetensors is not in the Hugging Face cache" in err
    assert "offline mode is on" in err
    assert ("hf download Zyriix/prologue prologue-b-tokenizer/model_2.safetensors "
            "prologue-b-tokenizer/model_3.safetensors ar-prologue-b-b/model.safetensors") in err
    assert not (tmp_path / "ckpt").exists()


def test_environment_offline_mode_is_honoured(tmp_path, monkeypatch, spy):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="offline mode is on"):
        hub.fetch_release(hub.resolve_release("2d-base"), cache_dir=tmp_path, log=lambda line: None)


@pytest.mark.parametrize("argv,match", [
    (["--hub", "--preset", "prologue-b-b", "--ar", "x"], "drop --ar"),
    (["--hub"], "--hub needs --preset"),
    (["--tokenizer", "x", "--preset", "prologue-b-b", "--revision", "v1"], "--revision only apply with --hub"),
    (["--hub", "../../etc", "--preset", "prologue-b-b"], "OWNER/NAME"),
    (["--hub", "--preset", "tiny"], "released pair"),
])
def test_cli_argument_errors(argv, match, tmp_path, capsys, spy):
    rc = main(["import-official", *argv, "--out", str(tmp_path / "ckpt"), "--cache-dir" if "--hub" in argv else "--json",
               *([str(tmp_path)] if "--hub" in argv else [])])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert spy["requested"] == []


@pytest.mark.parametrize("argv,match", [
    (["--preset", "prologue-b-b"], "one of the arguments --hub --tokenizer is required"),
    (["--hub", "--tokenizer", "x", "--preset", "prologue-b-b"], "not allowed with argument"),
])
def test_cli_one_source_exactly(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["import-official", *argv, "--out", str(tmp_path / "ckpt")])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_help_names_the_default_repo(capsys):
    with pytest.raises(SystemExit):
        main(["import-official", "--help"])
    assert f"REPO defaults to {hub.DEFAULT_REPO}" in " ".join(capsys.readouterr().out.split())


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match=r"pip install 'prologue-export\[hub\]'"):
        hub.fetch_release(hub.resolve_release("prologue-b-b"), log=lambda line: None)


# ---------------------------------------------------------------------------------------------
# online, against fakes of the Hub's two calls


class _Info:
    def __init__(self, path, size, sha):
        self.path, self.size, self.lfs = path, size, {"sha256": sha, "size": size}


def _fake_hub(monkeypatch, remote: dict, cache, events: list, tamper: str = ""):
    """The Hub as metadata + downloads into `cache`, recording the order of events."""
    def paths_info(self, repo_id, paths, revision=None, **kw):
        events.append(("metadata", tuple(paths)))
        return [_Info(p, len(remote[p]), hashlib.sha256(remote[p]).hexdigest()) for p in paths if p in remote]

    def download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kw):
        assert not local_files_only
        events.append(("download", filename))
        local = cache / "models--Zyriix--prologue" / "snapshots" / COMMIT / filename
        if not local.exists():  # a cached file is not fetched again
            data = remote[filename]
            put(cache, filename, data[:-1] + bytes([data[-1] ^ 1]) if filename == tamper else data)
        return str(local)

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", paths_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def _remote(reference_dir) -> dict:
    tok, ar = reference_dir / "fixture_a" / "tokenizer", reference_dir / "fixture_a" / "ar"
    return {"prologue-b-tokenizer/model_2.safetensors": (tok / "model_2.safetensors").read_bytes(),
            "prologue-b-tokenizer/model_3.safetensors": (tok / "model_3.safetensors").read_bytes(),
            "ar-prologue-b-b/model.safetensors": (ar / "model.safetensors").read_bytes()}


def test_online_prints_the_size_before_downloading(reference_dir, tmp_path, monkeypatch):
    remote, events, cache = _remote(reference_dir), [], tmp_path / "cache"
    put(cache, "prologue-b-tokenizer/model_2.safetensors", remote["prologue-b-tokenizer/model_2.safetensors"])
    _fake_hub(monkeypatch, remote, cache, events)
    fetched = hub.fetch_release(hub.resolve_release("prologue-b-b"), cache_dir=cache,
                                log=lambda line: events.append(("log", line)))
    kinds = [e[0] for e in events]
    assert kinds.index("metadata") < kinds.index("log") < kinds.index("download")
    total, cached = sum(map(len, remote.values())), len(remote["prologue-b-tokenizer/model_2.safetensors"])
    header = events[kinds.index("log")][1]
    assert f"3 files, {hub._human(total)}; to download: {hub._human(total - cached)}" in header
    assert any("model_2.safetensors" in e[1] and "cached" in e[1] for e in events if e[0] == "log")
    assert [e[1] for e in events if e[0] == "download"] == list(remote)
    assert fetched.commit == COMMIT and [f["sha256"] for f in fetched.files] == [
        hashlib.sha256(v).hexdigest() for v in remote.values()]


def test_online_damaged_download_and_missing_file(reference_dir, tmp_path, monkeypatch):
    remote, events = _remote(reference_dir), []
    _fake_hub(monkeypatch, remote, tmp_path / "c1", events, tamper="ar-prologue-b-b/model.safetensors")
    with pytest.raises(hub.HubError, match="does not match the Hub's sha256 of ar-prologue-b-b/model.safetensors"):
        hub.fetch_release(hub.resolve_release("prologue-b-b"), cache_dir=tmp_path / "c1", log=lambda line: None)
    assert not os.path.lexists(tmp_path / "c1" / "models--Zyriix--prologue" / "snapshots" / COMMIT / "ar-prologue-b-b" /
                               "model.safetensors")  # evicted: the next run downloads it again
    del remote["ar-prologue-b-b/model.safetensors"]
    _fake_hub(monkeypatch, remote, tmp_path / "c2", events)
    with pytest.raises(hub.HubError, match="has no ar-prologue-b-b/model.safetensors"):
        hub.fetch_release(hub.resolve_release("prologue-b-b"), cache_dir=tmp_path / "c2", log=lambda line: None)
    assert not (tmp_path / "c2").exists()  # refused before any download


def test_source_must_be_an_object(reference_dir, tmp_path):
    root = reference_dir / "fixture_a"
    import_official(root / "tokenizer", tmp_path / "ckpt", official_config=root / "config.json")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert [f["path"] for f in cfg["source"]["files"]] == [str((root / "tokenizer" / n).resolve())
                                                          for n in ("model_2.safetensors", "model_3.safetensors")]
    cfg["source"] = ["not", "an", "object"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'source' must be an object"):
        load_source(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt").ar is None  # the model config alone is what loads
