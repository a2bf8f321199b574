"""`import-official --hub` against a hostile Hub cache and a hostile Hub, driving the real huggingface_hub.

The online cases run the real client against `FakeHub`: a local HTTP server that speaks the part of
the Hub API huggingface_hub 2.x calls (POST `/api/models/{repo}/paths-info/{rev}`; HEAD/GET
`/{repo}/resolve/{rev}/{path}` answering 302 to a CDN on another origin with `X-Repo-Commit`,
`X-Linked-Etag` (the LFS sha256), `X-Linked-Size` and the git `ETag`; the CDN's GET; the
user-agent registry `/api/agent-harnesses`), and counts every request. The cache cases build
the layout huggingface_hub writes (`tests/test_hub.py` `put`) and then break it.

Families: refused downloads (evicted, fetched again), blob names (offline, and online with the
Hub unreachable), special files, revisions, repo ids, the advice (shell-quoted, `hf cache rm`),
offline (no request at all), a branch that moves during an import.
"""

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from prologue_export.cli import hub, main  # noqa: E402
from prologue_export.checkpoint import load_source  # noqa: E402

from .test_hub import COMMIT, OTHER_COMMIT, REPO, closed_port, isolate_hub, put  # noqa: E402

STORAGE = "models--Zyriix--prologue"
TOK2, TOK3, AR = ("prologue-b-tokenizer/model_2.safetensors", "prologue-b-tokenizer/model_3.safetensors",
                  "ar-prologue-b-b/model.safetensors")
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def release_files(reference_dir) -> dict:
    tok, ar = reference_dir / "fixture_a" / "tokenizer", reference_dir / "fixture_a" / "ar"
    return {TOK2: (tok / "model_2.safetensors").read_bytes(), TOK3: (tok / "model_3.safetensors").read_bytes(),
            AR: (ar / "model.safetensors").read_bytes()}


def damaged(data: bytes) -> bytes:
    """The same size, one bit flipped: what only a hash can tell apart."""
    return data[:-1] + bytes([data[-1] ^ 1])


class FakeHub:
    """The Hub's answers to huggingface_hub, from `commits` {commit: {path: bytes}} and `branches`."""

    def __init__(self, files: dict):
        self.commits = {COMMIT: dict(files)}
        self.branches = {"main": COMMIT}
        self.cdn = {}  # path -> bytes the CDN sends instead of the file (a damaged download)
        self.requests = []  # (method, path) of every request, in order
        self.on_paths_info = self.on_head = None  # hooks run after those answers (a branch that moves)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path: str) -> int:
        return sum(1 for m, p in self.requests if m == "GET" and p.startswith("/cdn/") and p.endswith("/" + path))

    def _commit(self, rev: str):
        rev = unquote(rev)
        return self.branches.get(rev) or (rev if rev in self.commits else None)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", **headers):
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), str(value))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self):
                fake.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].split("/")
                if parts[1:3] == ["api", "models"] and len(parts) >= 7 and parts[5] == "paths-info":
                    return self._paths_info("/".join(parts[3:5]), parts[6])
                if len(parts) >= 6 and parts[3] == "resolve":
                    return self._resolve("/".join(parts[1:3]), parts[4], unquote("/".join(parts[5:])))
                if parts[1] == "cdn":
                    data = fake.cdn.get("/".join(parts[3:])) or fake.commits[parts[2]]["/".join(parts[3:])]
                    return self._send(200, data)
                return self._send(404, b"not found")

            def _paths_info(self, repo: str, rev: str):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                commit = fake._commit(rev)
                if repo != REPO:
                    return self._send(404, X_Error_Code="RepoNotFound")
                if commit is None:
                    return self._send(404, X_Error_Code="RevisionNotFound")
                files = fake.commits[commit]
                found = [{"type": "file", "path": p, "size": len(files[p]), "oid": git_oid(files[p]),
                          "lfs": {"oid": hashlib.sha256(files[p]).hexdigest(), "size": len(files[p]), "pointerSize": 134}}
                         for p in parse_qs(body).get("paths", []) if p in files]
                self._send(200, json.dumps(found).encode(), Content_Type="application/json")
                if fake.on_paths_info:
                    fake.on_paths_info()

            def _resolve(self, repo: str, rev: str, path: str):
                commit = fake._commit(rev)
                if repo != REPO or commit is None or path not in fake.commits[commit]:
                    return self._send(404, X_Error_Code="RepoNotFound" if repo != REPO else "EntryNotFound")
                data = fake.commits[commit][path]
                self._send(302, Location=f"http://localhost:{fake.port}/cdn/{commit}/{path}", X_Repo_Commit=commit,
                           X_Linked_Etag=f'"{hashlib.sha256(data).hexdigest()}"', X_Linked_Size=len(data),
                           ETag=f'"{git_oid(data)}"')
                if fake.on_head:
                    fake.on_head()

            do_GET = do_HEAD = do_POST = _route

        return Handler


@pytest.fixture
def files(reference_dir):
    return release_files(reference_dir)


@pytest.fixture
def fake_hub(files, monkeypatch, tmp_path):
    server = FakeHub(files)
    isolate_hub(monkeypatch, tmp_path, server.url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """The Hub unreachable (a port nothing listens on) unless a test starts `fake_hub`."""
    isolate_hub(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port()}")


@pytest.fixture
def hashed(monkeypatch):
    """Every file the import hashes."""
    seen = []
    real = hub.hub_digest
    monkeypatch.setattr(hub, "hub_digest", lambda f, *a, **kw: seen.append(str(f)) or real(f, *a, **kw))
    return seen


class Hung(Exception):
    """Not an OSError: nothing on the way may catch it as a read error."""


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """A hang (a FIFO opened, /dev/zero hashed) fails the test instead of stalling the suite."""
    def fail(*_):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli(reference_dir, tmp_path, capsys, *more, cache=None, out="ckpt", tokenizer_only=False):
    argv = ["import-official", "--hub", "--preset", "prologue-b-b", "--official-config",
            str(reference_dir / "fixture_a" / "config.json"), "--cache-dir", str(cache or tmp_path / "cache"),
            "--out", str(tmp_path / out), *(["--tokenizer-only"] if tokenizer_only else []), *more]
    with deadline():
        rc = main(argv)
    got = capsys.readouterr()
    return rc, got.err


def one_line_error(rc, err, *needles):
    assert rc == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    for needle in needles:
        assert needle in err, (needle, err)


def storage(tmp_path, cache="cache") -> Path:
    return tmp_path / cache / STORAGE


def cache_files(tmp_path, files: dict, commit: str = COMMIT, cache="cache") -> None:
    for path, data in files.items():
        put(tmp_path / cache, path, data, commit)


def blob_of(tmp_path, path: str, commit: str = COMMIT, cache="cache") -> Path:
    return Path(os.path.realpath(storage(tmp_path, cache) / "snapshots" / commit / path))


def listing(root: Path) -> dict:
    """Every entry under `root` (links not followed): path -> link target or size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else (None if p.is_dir() else p.stat().st_size)
    return out


# ---------------------------------------------------------------------------------------------
# refused downloads: evicted (the blob and its snapshot link, nothing else), fetched again


def test_online_import_through_the_real_client(reference_dir, tmp_path, capsys, fake_hub, files):
    rc, err = cli(reference_dir, tmp_path, capsys)
    assert rc == 0, err
    assert fake_hub.requests[1][0] == "POST" and "/paths-info/main" in fake_hub.requests[1][1]  # sizes first
    assert sorted(p.split("/cdn/" + COMMIT + "/")[1] for m, p in fake_hub.requests if p.startswith("/cdn/")) == sorted(files)
    assert (storage(tmp_path) / "refs" / "main").read_text() == COMMIT
    source = load_source(tmp_path / "ckpt")
    assert source["commit"] == COMMIT
    assert {f["path"]: f["sha256"] for f in source["files"]} == {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    before = len(fake_hub.requests)
    rc, err = cli(reference_dir, tmp_path, capsys, out="again")
    assert rc == 0 and not any(p.startswith("/cdn/") for _, p in fake_hub.requests[before:])  # cached: not fetched


def test_a_refused_download_is_evicted_and_fetched_again(reference_dir, tmp_path, capsys, fake_hub, files):
    fake_hub.cdn[AR] = damaged(files[AR])
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, f"refusing {AR}", "does not match the Hub's sha256", "removed from the cache")
    assert not os.path.lexists(storage(tmp_path) / "snapshots" / COMMIT / AR)
    blobs = sorted(p.name for p in (storage(tmp_path) / "blobs").iterdir())
    assert blobs == sorted(hashlib.sha256(files[p]).hexdigest() for p in (TOK2, TOK3))  # the others stay
    assert (storage(tmp_path) / "refs" / "main").read_text() == COMMIT
    assert not (tmp_path / "ckpt").exists()
    # offline, the refused file is not there to be imported
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline")
    one_line_error(rc, err, f"{AR} is not in the Hugging Face cache")
    # online again: fetched again, and imported once the download is right
    del fake_hub.cdn[AR]
    rc, err = cli(reference_dir, tmp_path, capsys)
    assert rc == 0, err
    assert fake_hub.gets(AR) == 2 and fake_hub.gets(TOK2) == 1
    assert {f["path"]: f["sha256"] for f in load_source(tmp_path / "ckpt")["files"]}[AR] == hashlib.sha256(files[AR]).hexdigest()


def test_a_cached_file_of_the_wrong_size_is_refused_online(reference_dir, tmp_path, capsys, fake_hub, files):
    cache_files(tmp_path, files)
    with open(blob_of(tmp_path, TOK3), "ab") as fh:  # one byte more than the Hub lists
        fh.write(b"\0")
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, f"refusing {TOK3}", f"has {len(files[TOK3]) + 1:,} bytes where the Hub lists "
                   f"{len(files[TOK3]):,}", "removed from the cache")
    assert not os.path.lexists(storage(tmp_path) / "snapshots" / COMMIT / TOK3)
    # huggingface_hub's own size check refuses a download of the wrong size: nothing of it enters the snapshot
    fake_hub.cdn[TOK3] = files[TOK3] + b"\0"
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, f"downloading {TOK3} from {REPO} failed")
    assert not os.path.lexists(storage(tmp_path) / "snapshots" / COMMIT / TOK3)


def test_a_hub_listing_a_file_over_the_bound_is_refused_before_downloading(reference_dir, tmp_path, capsys, fake_hub,
                                                                          monkeypatch, files):
    monkeypatch.setattr(hub, "MAX_FILE_BYTES", min(len(d) for d in files.values()) - 1)
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, "bytes, over the", "is it the Prologue release?")
    assert not any(p.startswith("/cdn/") for _, p in fake_hub.requests)


# ---------------------------------------------------------------------------------------------
# blob names: offline, and online with the Hub unreachable, each file against its blob's name


@pytest.mark.parametrize("path", [TOK2, TOK3, AR])
def test_a_blob_that_does_not_match_its_name_is_refused_offline(path, reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, files)
    blob = blob_of(tmp_path, path)
    blob.write_bytes(damaged(files[path]))
    others = {p: blob_of(tmp_path, p) for p in files if p != path}
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline")
    one_line_error(rc, err, f"refusing {path}", f"does not match its blob's name {blob.name}", "removed from the cache")
    assert not blob.exists() and not os.path.lexists(storage(tmp_path) / "snapshots" / COMMIT / path)
    assert all(b.exists() for b in others.values()) and (storage(tmp_path) / "refs" / "main").exists()
    assert not (tmp_path / "ckpt").exists()


def test_the_hub_unreachable_checks_blob_names(reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, files)
    blob_of(tmp_path, TOK2).write_bytes(damaged(files[TOK2]))
    rc, err = cli(reference_dir, tmp_path, capsys)  # not --offline: the Hub does not answer
    one_line_error(rc, err, f"refusing {TOK2}", "does not match its blob's name")
    assert not (tmp_path / "ckpt").exists()


def test_the_hub_unreachable_imports_a_sound_cache(reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, files)
    rc, err = cli(reference_dir, tmp_path, capsys)
    assert rc == 0, err
    assert load_source(tmp_path / "ckpt")["commit"] == COMMIT


def _git_blob(tmp_path, path: str, data: bytes, name: str) -> None:
    """A file as huggingface_hub stores one kept in git (not LFS): its blob named by the git blob sha1."""
    root = storage(tmp_path)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / name).write_bytes(data)
    link = root / "snapshots" / COMMIT / path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(root / "blobs" / name, link.parent))


@pytest.mark.parametrize("sound", [True, False])
def test_a_blob_named_by_its_git_sha1(sound, reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, {TOK3: files[TOK3]})
    _git_blob(tmp_path, TOK2, files[TOK2] if sound else damaged(files[TOK2]), git_oid(files[TOK2]))
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    if sound:
        assert rc == 0, err
        assert load_source(tmp_path / "ckpt")["files"][0]["sha256"] == hashlib.sha256(files[TOK2]).hexdigest()
    else:
        one_line_error(rc, err, "does not match its blob's name", "git blob sha1")
        assert not (storage(tmp_path) / "blobs" / git_oid(files[TOK2])).exists()


def _shared_store(tmp_path, path: str, data: bytes, content: bytes) -> Path:
    """huggingface_hub's shared store of Xet files: blobs/<sha256> links to <cache>/blobs/<xx>/<xet hash>."""
    xet = hashlib.sha256(b"xet" + data).hexdigest()
    store = tmp_path / "cache" / "blobs" / xet[:2] / xet
    store.parent.mkdir(parents=True)
    store.write_bytes(content)
    blob = storage(tmp_path) / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.symlink_to(os.path.relpath(store, blob.parent))
    link = storage(tmp_path) / "snapshots" / COMMIT / path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return store


@pytest.mark.parametrize("sound", [True, False])
def test_a_shared_store_blob(sound, reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, {TOK3: files[TOK3]})
    store = _shared_store(tmp_path, TOK2, files[TOK2], files[TOK2] if sound else damaged(files[TOK2]))
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    if sound:
        assert rc == 0, err
    else:
        one_line_error(rc, err, "does not match its blob's name", "removed from the cache")
        assert not store.exists() and not os.path.lexists(storage(tmp_path) / "blobs" / hashlib.sha256(files[TOK2]).hexdigest())
        assert blob_of(tmp_path, TOK3).exists()


# ---------------------------------------------------------------------------------------------
# special files: refused before anything is hashed or opened for reading


def _special(kind: str, tmp_path, files) -> Path:
    """Break the snapshot entry of TOK2 (the first file checked) the `kind` way; returns what must survive."""
    link = storage(tmp_path) / "snapshots" / COMMIT / TOK2
    blob = blob_of(tmp_path, TOK2)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files[TOK2])
    if kind.startswith("snapshot-"):
        link.unlink()
    if kind == "snapshot-fifo":
        os.mkfifo(link)
    elif kind == "snapshot-dev-zero":
        link.symlink_to("/dev/zero")
    elif kind == "snapshot-dev-null":
        link.symlink_to("/dev/null")
    elif kind == "snapshot-outside":
        link.symlink_to(outside)
    elif kind == "snapshot-folder":
        link.mkdir()
    elif kind == "snapshot-dotdot":  # a link that climbs out of blobs/ and back in under another name
        link.symlink_to(os.path.relpath(outside, link.parent))
    elif kind == "blob-fifo":
        blob.unlink()
        os.mkfifo(blob)
    elif kind == "blob-dev-zero":
        blob.unlink()
        blob.symlink_to("/dev/zero")
    elif kind == "blob-outside":
        blob.unlink()
        blob.symlink_to(outside)
    elif kind == "blob-not-a-hash":
        link.unlink()
        named = blob.with_name("model_2.safetensors")
        blob.rename(named)
        link.symlink_to(os.path.relpath(named, link.parent))
    elif kind == "blob-too-large":
        os.truncate(blob, hub.MAX_FILE_BYTES + 1)  # sparse: nothing on disk
    elif kind == "folder-outside":  # the file's folder in the snapshot is a link to a folder elsewhere
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(link.parent, elsewhere, symlinks=True)
        shutil.rmtree(link.parent)
        link.parent.symlink_to(elsewhere)
    return outside


SPECIAL = ["snapshot-fifo", "snapshot-dev-zero", "snapshot-dev-null", "snapshot-outside", "snapshot-folder",
           "snapshot-dotdot", "blob-fifo", "blob-dev-zero", "blob-outside", "blob-not-a-hash", "blob-too-large"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_file_is_refused_before_it_is_read(kind, reference_dir, tmp_path, capsys, files, no_hub, hashed):
    cache_files(tmp_path, files)
    outside = _special(kind, tmp_path, files)
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    one_line_error(rc, err, f"refusing {TOK2} from the Hugging Face cache")
    assert hashed == []  # nothing hashed, so nothing opened for reading
    assert outside.read_bytes() == files[TOK2] and os.path.exists("/dev/zero")  # nothing outside the cache touched
    assert not (tmp_path / "ckpt").exists()
    if kind != "snapshot-folder":
        assert not os.path.lexists(storage(tmp_path) / "snapshots" / COMMIT / TOK2), "not evicted"


def test_a_snapshot_folder_linked_elsewhere_is_not_used(reference_dir, tmp_path, capsys, files, no_hub, hashed):
    """A folder of the snapshot is a link to a folder outside the cache: its files are not
    used (nothing hashed or read), and the error is one line."""
    cache_files(tmp_path, files)
    _special("folder-outside", tmp_path, files)
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    one_line_error(rc, err, f"{TOK2} is not in the Hugging Face cache")
    assert hashed == [] and not (tmp_path / "ckpt").exists()
    assert os.path.lexists(tmp_path / "elsewhere" / Path(TOK2).name)  # nothing outside the cache touched


def test_a_plain_file_in_the_snapshot_cannot_be_checked_offline(reference_dir, tmp_path, capsys, files, no_hub):
    """A cache written without symbolic links has no blob name to check against: refused offline, kept."""
    cache_files(tmp_path, files)
    link = storage(tmp_path) / "snapshots" / COMMIT / TOK2
    link.unlink()
    link.write_bytes(files[TOK2])
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    one_line_error(rc, err, "cannot be checked without the Hub", "run once with network")
    assert link.read_bytes() == files[TOK2]


def test_a_plain_file_in_the_snapshot_is_checked_against_the_hub(reference_dir, tmp_path, capsys, fake_hub, files):
    cache_files(tmp_path, files)
    link = storage(tmp_path) / "snapshots" / COMMIT / TOK2
    link.unlink()
    link.write_bytes(files[TOK2])
    rc, err = cli(reference_dir, tmp_path, capsys, tokenizer_only=True)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# revisions: a commit, a branch or tag name, refs/pr/N; refs read only from inside refs/


BAD_REVISIONS = ["../../../../outside", "..", "main/../main", "a/b", "main\n", "-x", "", "main.lock", "v1.", "/etc/passwd",
                 "refs/pr/0", "refs/heads/main", "x" * 201, "ma in", "main;touch x", "$(id)", "a..b", "main\\x"]


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_that_is_not_a_name_is_refused(revision, reference_dir, tmp_path, capsys, fake_hub):
    rc, err = cli(reference_dir, tmp_path, capsys, f"--revision={revision}")
    one_line_error(rc, err, "--revision must be a commit hash")
    assert fake_hub.requests == [] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("revision", ["main", "v1.0", "release_2", "refs/pr/3", COMMIT])
def test_revision_names_accepted(revision):
    assert hub.check_revision(revision) == revision


def test_a_revision_cannot_read_a_ref_outside_the_cache(reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, files, OTHER_COMMIT)
    (tmp_path / "outside").write_text(OTHER_COMMIT)  # what ../../../outside would name from refs/
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", "--revision", "../../../outside", tokenizer_only=True)
    one_line_error(rc, err, "--revision must be")
    assert not (tmp_path / "ckpt").exists()


def test_a_pull_request_ref_online_then_offline(reference_dir, tmp_path, capsys, fake_hub, files):
    fake_hub.branches["refs/pr/3"] = COMMIT
    rc, err = cli(reference_dir, tmp_path, capsys, "--revision", "refs/pr/3", tokenizer_only=True)
    assert rc == 0, err
    assert (storage(tmp_path) / "refs" / "refs" / "pr" / "3").read_text() == COMMIT  # where huggingface_hub keeps it
    before = len(fake_hub.requests)
    rc, err = cli(reference_dir, tmp_path, capsys, "--revision", "refs/pr/3", "--offline", out="offline",
                  tokenizer_only=True)
    assert rc == 0, err
    assert len(fake_hub.requests) == before
    assert load_source(tmp_path / "offline")["revision"] == "refs/pr/3"


def _bad_ref(kind: str, tmp_path) -> None:
    ref = storage(tmp_path) / "refs" / "main"
    ref.unlink()
    if kind == "link-outside":
        (tmp_path / "elsewhere").write_text(COMMIT)
        ref.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(ref)
    elif kind == "not-a-commit":
        ref.write_text("../../../../etc")
    elif kind == "huge":
        ref.write_text(COMMIT + " " * 10_000)
    elif kind == "folder":
        ref.mkdir()


@pytest.mark.parametrize("kind", ["link-outside", "fifo", "not-a-commit", "huge", "folder"])
def test_a_ref_that_is_not_a_plain_file_holding_a_commit_is_refused(kind, reference_dir, tmp_path, capsys, files, no_hub):
    cache_files(tmp_path, files)
    _bad_ref(kind, tmp_path)
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    one_line_error(rc, err, "the cache's ref", "not a file holding a commit hash")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# repo ids: huggingface_hub's own validator, its error on one line


BAD_REPOS = ["Zyriix/prologue\n", "Zyriix/prologue.", "Zyriix/prologue-", "Zyriix/pro--logue", "Zyriix/pro..logue",
             "Zyriix/prologue.git", "prologue", "a/b/c", "Zyriix/" + "x" * 100, "Zyriix/pro logue", "Zyriix/\nx",
             ".Zyriix/prologue", "Zyriix//prologue"]


@pytest.mark.parametrize("repo", BAD_REPOS)
def test_a_repo_id_the_hub_refuses_is_one_line(repo, reference_dir, tmp_path, capsys, fake_hub):
    rc, err = main(["import-official", "--hub", repo, "--preset", "prologue-b-b", "--out", str(tmp_path / "ckpt")]), \
        capsys.readouterr().err
    one_line_error(rc, err, "--hub REPO must look like OWNER/NAME")
    assert fake_hub.requests == [] and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# the advice: shell-quoted commands that exist in the installed huggingface_hub CLI


def test_the_suggested_download_is_shell_quoted(reference_dir, tmp_path, capsys, no_hub):
    cache = tmp_path / "my cache $(touch pwned) 'x'"
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline", "--revision", "v1.0", cache=cache)
    one_line_error(rc, err, "is not in the Hugging Face cache")
    command = err.split("`")[1]
    assert shlex.split(command) == ["hf", "download", REPO, TOK2, TOK3, AR, "--revision", "v1.0", "--cache-dir", str(cache)]
    release = hub.resolve_release("prologue-b-b", tokenizer_only=True)
    assert shlex.split(hub.manual_command(REPO, release, "a b;c"))[-2:] == ["--revision", "a b;c"]


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # importing huggingface_hub's CLI asks for them
def test_the_advice_names_commands_of_the_installed_hf_cli(reference_dir, tmp_path, capsys, files, no_hub, monkeypatch):
    import inspect

    from huggingface_hub.cli import cache as cache_cli
    from huggingface_hub.cli import download

    assert {"repo_id", "filenames", "revision", "cache_dir"} <= set(inspect.signature(download.download).parameters)
    rm = cache_cli.cache_cli.commands["rm"]
    assert {"--cache-dir", "--yes"} <= {o for p in rm.params for o in p.opts}
    assert "delete" not in cache_cli.cache_cli.commands
    assert "hf cache delete" not in (REPO_ROOT / "cli" / "hub.py").read_text()
    # a refused file the import cannot remove: the advice is the `hf cache rm` line for exactly that file
    cache_files(tmp_path, files)
    blob_of(tmp_path, TOK2).write_bytes(damaged(files[TOK2]))
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        if str(tmp_path / "cache") in os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", unlink)
        rc, err = cli(reference_dir, tmp_path, capsys, "--offline", tokenizer_only=True)
    one_line_error(rc, err, "it was not removed (Permission denied)")
    command = err.split("`")[1]
    assert shlex.split(command) == ["hf", "cache", "rm", f"hf://models/{REPO}/{TOK2}", "--cache-dir", str(tmp_path / "cache")]


# ---------------------------------------------------------------------------------------------
# offline: not one request


def test_offline_makes_no_request_at_all(reference_dir, tmp_path, capsys, fake_hub, files):
    cache_files(tmp_path, files)
    rc, err = cli(reference_dir, tmp_path, capsys, "--offline")
    assert rc == 0, err
    assert fake_hub.requests == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # switched on for the import only


def test_offline_in_a_fresh_process_makes_no_request(reference_dir, tmp_path, fake_hub, files):
    """As a user runs it: HF_ENDPOINT read by huggingface_hub at its import, --offline on the command line."""
    cache_files(tmp_path, files)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    argv = [sys.executable, "-m", "prologue_export.cli", "import-official", "--hub", "--preset", "prologue-b-b",
            "--official-config", str(reference_dir / "fixture_a" / "config.json"), "--tokenizer-only",
            "--cache-dir", str(tmp_path / "cache"), "--offline", "--out", str(tmp_path / "ckpt")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert fake_hub.requests == []


# ---------------------------------------------------------------------------------------------
# a branch that moves while importing


def _second_commit(fake_hub, files) -> bytes:
    moved = dict(files)
    moved[AR] = files[AR][:-4] + b"    "  # another AR at the new commit
    fake_hub.commits[OTHER_COMMIT] = moved
    return moved[AR]


def test_a_branch_moved_after_the_sizes_were_read(reference_dir, tmp_path, capsys, fake_hub, files):
    new_ar = _second_commit(fake_hub, files)
    fake_hub.on_paths_info = lambda: fake_hub.branches.update(main=OTHER_COMMIT)
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, "the branch moved while importing; pin --revision COMMIT", OTHER_COMMIT)
    assert "damaged" not in err
    # nothing evicted: the files are sound, only newer than the sizes announced
    assert blob_of(tmp_path, AR, OTHER_COMMIT).read_bytes() == new_ar


def test_a_branch_moved_between_two_files(reference_dir, tmp_path, capsys, fake_hub, files):
    _second_commit(fake_hub, files)
    fake_hub.on_head = lambda: fake_hub.branches.update(main=OTHER_COMMIT)
    rc, err = cli(reference_dir, tmp_path, capsys)
    one_line_error(rc, err, "the branch moved while importing; pin --revision COMMIT", COMMIT, OTHER_COMMIT)


def test_a_pinned_commit_does_not_move(reference_dir, tmp_path, capsys, fake_hub, files):
    _second_commit(fake_hub, files)
    fake_hub.on_paths_info = lambda: fake_hub.branches.update(main=OTHER_COMMIT)
    rc, err = cli(reference_dir, tmp_path, capsys, "--revision", COMMIT)
    assert rc == 0, err
    assert load_source(tmp_path / "ckpt")["commit"] == COMMIT
