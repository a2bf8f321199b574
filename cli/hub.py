"""The authors' checkpoints from the Hugging Face Hub: preset -> release folders -> the few files
inference reads, downloaded through `huggingface_hub` (the optional extra `hub`), then imported.

The release (`Zyriix/prologue`, about 63 GB) is 15 accelerate save_state folders
(OFFICIAL_MODEL.md §1): safetensors next to pickled optimizer, RNG and scheduler state. A preset
names one tokenizer folder and one `ar-*` folder (OneStage: its AR is `model_5` of its own
tokenizer folder); `official.inference_slots` names the files of each that the importer reads.
Every repo path requested here is built from those two tables and checked against
`ALLOWED_PATHS` (all such paths of every release) before any request: a pickle, an optimizer
file or another folder cannot be asked for.

`huggingface_hub` brings its cache (`HF_HUB_CACHE`, `--cache-dir`), token (`HF_TOKEN` or
`hf auth login`), offline mode (`HF_HUB_OFFLINE=1`, `--offline`) and progress bars.

Nothing in the cache is trusted. Its layout (`models--OWNER--NAME/`): `refs/<branch>` holds a
commit hash, `snapshots/<commit>/<repo path>` is a relative link to `blobs/<etag>`, and the etag
names the content: the LFS sha256 (64 hex digits) for LFS files, which every released safetensors
is, or the git blob sha1 (40 hex digits) of a file stored in git (`hf_hub_download`'s docstring;
`X-Linked-Etag`). Before a file is used, its snapshot entry must be a link to a regular file
named so in the repo's `blobs/` (or, for Xet files, huggingface_hub's shared store
`<cache>/blobs/<xx>/<hash>` that such a blob links to), within the size bound: lstat and realpath
only, so a FIFO, a device or a link out of the cache is refused before anything is opened. Its
content is then checked against the Hub's sha256 (online) and against its blob's name (always);
a refused file is evicted (its snapshot link and its blob, nothing else) so that the next run
downloads it again. Refs are read only from regular files inside `refs/`; `--offline` turns on
huggingface_hub's own offline switch so that no request leaves the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import MODEL_PRESETS
from ..official import OfficialImportError, inference_slots
from ..runtime.errors import short_repr
from ..runtime.files import _kind, _reason, shown

DEFAULT_REPO = "Zyriix/prologue"
HUB_EXTRA_HINT = "pip install 'prologue-export[hub]'"
# our tokenizer preset -> its release folder (the folders are listed in OFFICIAL_MODEL.md §1 and
# shared/reference/official_keys/*.json, one file per folder)
TOKENIZER_FOLDERS = {
    "prologue-b": "prologue-b-tokenizer",
    "prologue-l": "prologue-l-tokenizer",
    "post": "prologue-post-tokenizer",
    "2d": "2d-tokenizer",
}
ONESTAGE_FOLDER = "prologue-onestage-joint"
ONESTAGE_PRESET = "prologue-b-b"  # its tokenizer is prologue-b, its AR the base size (OFFICIAL_MODEL.md §3)
# The largest released inference file is the XL AR's float32 weights (about 2.8 GB): a cached file
# over this bound is refused before it is hashed (online, its size must also be the Hub's).
MAX_FILE_BYTES = 8 * 1024 ** 3
MAX_REF_BYTES = 4096
_COMMIT = re.compile(r"[0-9a-f]{40}")  # huggingface_hub's REGEX_COMMIT_HASH (file_download.py)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# a branch or tag name: git's check-ref-format rules narrowed to one path component (no "/", no "..",
# not ending in "." or ".lock"); the Hub's pull-request refs are the one form with separators
_BRANCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
_PR_REF = re.compile(r"refs/pr/[1-9][0-9]{0,8}")


class HubError(OfficialImportError):
    """The release's files cannot be resolved or fetched from the Hub (or its cache)."""


def released_presets() -> typing.List[str]:
    """Model presets that are released pairs (a tokenizer folder and an `ar-PRESET` folder)."""
    return [name for name, (tok, _ar) in MODEL_PRESETS.items() if tok in TOKENIZER_FOLDERS]


@dataclass(frozen=True)
class Release:
    """What one `--hub --preset` names: repo paths of the files to read, and how to import them."""

    preset: str
    tokenizer_folder: str
    ar_folder: typing.Optional[str]  # None: tokenizer only, or OneStage (its AR is in the tokenizer folder)
    onestage: bool
    files: typing.Tuple[typing.Tuple[str, str], ...]  # (repo path, what it holds)

    @property
    def with_ar(self) -> bool:
        return self.onestage or self.ar_folder is not None


def resolve_release(preset: str, onestage: bool = False, tokenizer_only: bool = False) -> Release:
    """The release folders and files for a model preset (a released pair such as `prologue-b-b`)."""
    known = released_presets()
    if preset not in known:
        raise HubError(f"--hub needs a released pair as --preset, one of: {', '.join(known)} "
                       f"(got {preset!r}; other presets have no released weights)")
    if onestage:
        if preset != ONESTAGE_PRESET:
            raise HubError(f"the OneStage release ({ONESTAGE_FOLDER}) has the sizes of --preset {ONESTAGE_PRESET}, "
                           f"not {preset}")
        if tokenizer_only:
            raise HubError("--onestage imports the OneStage tokenizer with its AR; the OneStage tokenizer alone "
                           "is not a released configuration (drop --tokenizer-only)")
    tok_folder = ONESTAGE_FOLDER if onestage else TOKENIZER_FOLDERS[MODEL_PRESETS[preset][0]]
    ar_folder = None if (onestage or tokenizer_only) else f"ar-{preset}"
    folders = {"tokenizer": tok_folder, "ar": ar_folder}
    files = tuple((f"{folders[folder]}/{name}", meaning)
                  for folder, name, _component, meaning in inference_slots(not tokenizer_only, onestage))
    return Release(preset, tok_folder, ar_folder, onestage, files)


def _all_paths() -> typing.FrozenSet[str]:
    paths = set()
    for preset in released_presets():
        for tokenizer_only in (False, True):
            paths.update(p for p, _ in resolve_release(preset, tokenizer_only=tokenizer_only).files)
    paths.update(p for p, _ in resolve_release(ONESTAGE_PRESET, onestage=True).files)
    return frozenset(paths)


# Every file this module may ever request from the Hub: inference safetensors of release folders.
ALLOWED_PATHS = _all_paths()


def check_allowed(path: str) -> str:
    """`path` if it is an inference file of a release folder; anything else is refused before any request."""
    if path not in ALLOWED_PATHS or not path.endswith(".safetensors"):
        raise HubError(f"refusing to fetch {path!r}: not a file the importer reads "
                       "(only the release's inference safetensors are ever downloaded)")
    return path


def check_repo_id(repo) -> str:
    """`repo` if it is OWNER/NAME and huggingface_hub's own validator accepts it; else one line saying why."""
    _hub()
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    wanted = f"--hub REPO must look like OWNER/NAME (e.g. {DEFAULT_REPO}), got {short_repr(repo)}"
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise HubError(wanted)
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        text = str(exc)
        cut = text.find(f": '{repo}'")  # its message ends with the id itself, which may hold a newline
        rule = " ".join((text[:cut] if cut >= 0 else text).split())[:200]
        raise HubError(f"{wanted}: {rule}") from None
    return repo


def check_revision(revision: typing.Optional[str]) -> typing.Optional[str]:
    """`revision` if it is a commit hash, a branch or tag name, or a pull-request ref; never a path."""
    if revision is None:
        return None
    ok = isinstance(revision, str) and bool(
        _COMMIT.fullmatch(revision) or _PR_REF.fullmatch(revision)
        or (_BRANCH.fullmatch(revision) and ".." not in revision and not revision.endswith((".", ".lock"))))
    if not ok:
        raise HubError("--revision must be a commit hash (40 hex digits), a branch or tag name (letters, digits, "
                       f"'.', '_', '-'; no '..', no path separator) or refs/pr/N, got {short_repr(revision)}")
    return revision


# ---------------------------------------------------------------------------------------------


@dataclass
class Fetched:
    """Local copies of a release's files, with where they came from."""

    release: Release
    repo: str
    revision: typing.Optional[str]
    commit: typing.Optional[str]
    tokenizer_dir: Path
    ar_dir: typing.Optional[Path]
    files: typing.List[dict] = field(default_factory=list)  # {"path", "holds", "bytes", "sha256"}

    def source(self) -> dict:
        """The provenance recorded in the checkpoint's config.json."""
        return {"kind": "huggingface-hub", "repo": self.repo, "revision": self.revision or "main",
                "commit": self.commit, "files": self.files}


class Remote(typing.NamedTuple):
    """What the Hub says of one file: its size, LFS sha256 (None for a file stored in git) and git blob id."""

    size: typing.Optional[int]
    sha256: typing.Optional[str]
    oid: typing.Optional[str] = None


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 -- binds `huggingface_hub.constants` (lazy module)
        import huggingface_hub.file_download  # noqa: F401
        from huggingface_hub import errors
    except ImportError:
        raise HubError(f"--hub needs the huggingface_hub package: {HUB_EXTRA_HINT}") from None
    return huggingface_hub, errors


@contextlib.contextmanager
def _offline_mode(hf, offline: bool):
    """huggingface_hub's own offline switch, on while the import runs. It reads `constants.HF_HUB_OFFLINE`
    at every call (its request hook, and the user-agent registry fetch that `hf_hub_download` makes even
    with `local_files_only`), so setting the constant before the first call keeps every request in."""
    if not offline:
        yield
        return
    before = hf.constants.HF_HUB_OFFLINE
    hf.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf.constants.HF_HUB_OFFLINE = before


@dataclass(frozen=True)
class _Cache:
    """One repo's folder in the Hugging Face cache, found as huggingface_hub finds it."""

    root: Path  # the cache folder, resolved
    storage: Path  # root / models--OWNER--NAME
    given: typing.Optional[str]  # --cache-dir as given: what the commands we suggest pass on

    @classmethod
    def of(cls, hf, repo: str, cache_dir) -> "_Cache":
        root = Path(_cache_dir(hf, cache_dir)).expanduser().resolve()
        folder = hf.file_download.repo_folder_name(repo_id=repo, repo_type="model")
        return cls(root, root / folder, None if cache_dir is None else str(cache_dir))

    def pointer(self, commit: str, path: str) -> Path:
        return self.storage / "snapshots" / commit / path


def _within(path, folder) -> bool:
    """Whether `path`, links resolved, lies strictly inside `folder` (links resolved too)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real != top and os.path.commonpath([real, top]) == top


def _read_small(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, never following a link, never blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{shown(path)} is not a regular file")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def cached_commit(cache: _Cache, revision: typing.Optional[str]) -> typing.Optional[str]:
    """The commit `revision` names in the cache: itself when it is a commit hash, else what `refs/<revision>`
    holds, read only from a regular file inside the repo's `refs/` folder; None when there is no such ref."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return revision
    refs = cache.storage / "refs"
    ref = refs / (revision or "main")
    try:
        st = os.lstat(ref)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise HubError(f"cannot read the cache's ref {shown(ref)}: {_reason(exc)}") from None
    inside = _within(ref, refs) and os.path.realpath(refs) == os.path.join(os.path.realpath(cache.storage), "refs")
    why = _kind(st.st_mode) or (None if inside else "outside the cache's refs folder")
    why = why or (f"{st.st_size:,} bytes" if st.st_size > MAX_REF_BYTES else None)
    text = ""
    if why is None:
        try:
            text = _read_small(ref, MAX_REF_BYTES).decode("ascii", "replace").strip()
        except OSError as exc:
            why = _reason(exc)
    if why is None and not _COMMIT.fullmatch(text):
        why = f"a file holding {short_repr(text)}"
    if why is not None:
        raise HubError(f"the cache's ref {shown(ref)} is {why}, not a file holding a commit hash: refusing it; "
                       "delete it (or pin --revision COMMIT) and run again")
    return text


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _cache_dir(hf, cache_dir) -> str:
    return str(cache_dir) if cache_dir is not None else str(hf.constants.HF_HUB_CACHE)


def _shell(words: typing.List[str], cache_dir=None) -> str:
    """A command line quoted for a POSIX shell (on one line: control characters escaped)."""
    words = words + (["--cache-dir", str(cache_dir)] if cache_dir is not None else [])
    return shown(" ".join(shlex.quote(word) for word in words))


def manual_command(repo: str, release: Release, revision: typing.Optional[str], cache_dir=None) -> str:
    """The `hf download` line that fetches exactly the files an import reads (into the same cache)."""
    pin = ["--revision", revision] if revision else []
    return _shell(["hf", "download", repo, *(p for p, _ in release.files), *pin], cache_dir)


def remove_command(repo: str, path: str, cache_dir=None) -> str:
    """The `hf cache rm` line that removes one file of the repo from the cache."""
    return _shell(["hf", "cache", "rm", f"hf://models/{repo}/{path}"], cache_dir)


def remote_metadata(hf, errors, repo: str, release: Release, revision) -> typing.Optional[typing.Dict[str, Remote]]:
    """{repo path: Remote} from the Hub, or None when it cannot be reached."""
    paths = [p for p, _ in release.files]
    try:
        infos = hf.HfApi().get_paths_info(repo, paths, revision=revision)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise _access_error(errors, exc, repo, revision) from None
    except Exception:  # noqa: BLE001 -- offline, no network, a proxy: the size is unknown, the cache may serve
        return None
    found = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        found[info.path] = Remote(getattr(info, "size", None), sha, getattr(info, "blob_id", None))
    missing = [p for p in paths if p not in found]
    if missing:
        raise HubError(f"{repo} at revision {revision or 'main'} has no {', '.join(missing)}: "
                       "is it the Prologue release (OFFICIAL_MODEL.md §1 layout)?")
    big = [p for p in paths if (found[p].size or 0) > MAX_FILE_BYTES]
    if big:
        raise HubError(f"{repo} lists {big[0]} at {found[big[0]].size:,} bytes, over the {MAX_FILE_BYTES:,} of any "
                       "released file: is it the Prologue release?")
    return found


def _access_error(errors, exc, repo: str, revision) -> HubError:
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{repo} is gated and this account has not been granted access: accept its terms on the Hub, "
                        "then log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"repository {repo} not found, or private without a token (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo} (a branch, tag or commit hash)")
    return HubError(f"{repo}: {_first_line(exc)}")


def announce(log, repo: str, release: Release, revision, meta: typing.Optional[dict], cached: set, cache: str,
             offline: bool) -> None:
    """Say what will be downloaded, and how much, before anything is."""
    where = f"{repo}@{revision or 'main'}"
    if offline:
        log(f"offline: reading {len(release.files)} files of {where} from the Hugging Face cache {shown(cache)}")
    elif meta is None:
        log(f"the Hub could not be reached: download size unknown; reading the Hugging Face cache {shown(cache)} only")
    else:
        total = sum(meta[p][0] or 0 for p, _ in release.files)
        todo = sum(meta[p][0] or 0 for p, _ in release.files if p not in cached)
        log(f"{where}: {len(release.files)} files, {_human(total)}; to download: {_human(todo)} "
            f"(the rest is in the cache {shown(cache)})")
    for path, holds in release.files:
        size = f"{_human(meta[path][0])}" if meta and meta[path][0] is not None else "size unknown"
        log(f"  {path}  ({holds}; {size}{', cached' if path in cached else ''})")


def _not_cached(hf, repo: str, path: str, release: Release, revision, cache_dir, offline: bool) -> HubError:
    why = "offline mode is on" if offline else "the Hub could not be reached"
    return HubError(
        f"{path} is not in the Hugging Face cache {shown(_cache_dir(hf, cache_dir))} and {why}. Run this command "
        f"once with network, or fetch exactly the files an import reads with "
        f"`{manual_command(repo, release, revision, cache_dir)}`")


def _download(hf, errors, repo: str, path: str, release: Release, revision, cache_dir, offline: bool,
              pin: typing.Optional[str] = None) -> Path:
    """The snapshot path of one file (downloaded if needed); `pin`: the commit to read from the cache."""
    check_allowed(path)
    try:
        return Path(hf.hf_hub_download(repo, path, revision=pin or revision, cache_dir=cache_dir,
                                       local_files_only=offline))
    except errors.LocalEntryNotFoundError:
        raise _not_cached(hf, repo, path, release, revision, cache_dir, offline) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise _access_error(errors, exc, repo, revision) from None
    except errors.EntryNotFoundError:
        raise HubError(f"{repo} at revision {revision or 'main'} has no {path}: is it the Prologue release?") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"downloading {path} from {repo} failed: {_first_line(exc)}") from None


def _snapshot_commit(cache: _Cache, local: Path, repo_path: str) -> str:
    """The commit of a file huggingface_hub returned: it must be `snapshots/<commit>/<repo path>` of the cache."""
    snapshots = cache.storage / "snapshots"
    rel = Path(os.path.relpath(os.path.abspath(local), os.path.abspath(snapshots)))
    commit = rel.parts[0] if rel.parts else ""
    if not _COMMIT.fullmatch(commit) or rel.as_posix() != f"{commit}/{repo_path}":
        raise HubError(f"huggingface_hub gave {shown(local)} for {repo_path}, not a file of the cache's snapshots "
                       f"{shown(snapshots)}")
    return commit


# ---------------------------------------------------------------------------------------------
# every cached file checked before use


class _Refused(Exception):
    """A cache entry that is not used: what is wrong, what to evict, and whether it differs from the Hub's word."""

    def __init__(self, what: str, evict=(), against_hub: bool = False, advice: typing.Optional[str] = None):
        super().__init__(what)
        self.what, self.evict, self.against_hub, self.advice = what, list(evict), against_hub, advice


@dataclass
class _Entry:
    blob: typing.Optional[Path]  # blobs/<etag>, the name being the content's hash; None: a file in the snapshot
    content: Path  # the regular file read: the blob, or the shared-store file it links to
    stat: os.stat_result
    evict: typing.List[Path]


def _lstat(path: Path, evict) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise _Refused(f"links to {shown(path)}, which does not exist", evict) from None
    except OSError as exc:
        raise _Refused(f"cannot be inspected ({_reason(exc)})", evict) from None


def _shared_store_file(cache: _Cache, blob: Path) -> typing.Optional[Path]:
    """The file of huggingface_hub's shared blob store (`<cache>/blobs/<xx>/<hash>`) a blob links to, if it does."""
    real = Path(os.path.realpath(blob))
    store = os.path.realpath(cache.root / "blobs")
    ok = str(real.parent.parent) == store and _SHA256.fullmatch(real.name) and real.parent.name == real.name[:2]
    return real if ok else None


def _locate(cache: _Cache, pointer: Path, hub_checked: bool) -> _Entry:
    """The regular file a snapshot entry stands for, found with lstat and readlink only (nothing opened)."""
    st = _lstat(pointer, ())
    if not _within(pointer.parent, cache.storage / "snapshots"):
        raise _Refused("is not inside the cache's snapshots folder (a snapshot folder that is a link out of it)",
                       advice=f"remove {shown(cache.storage / 'snapshots')} (huggingface_hub downloads it again), "
                       "then run again")
    evict = [pointer]
    if stat.S_ISREG(st.st_mode):  # a cache written without symbolic links: only the Hub's sha256 can vouch for it
        if not hub_checked:
            raise _Refused("is a plain file, not a link to a blob named by its hash, so it cannot be checked without "
                           "the Hub", advice="run once with network (it is then checked against the Hub's sha256)")
        return _Entry(None, pointer, st, evict)
    if not stat.S_ISLNK(st.st_mode):
        raise _Refused(f"is {_kind(st.st_mode)}, not a link to a blob", evict)
    blob = Path(os.path.normpath(pointer.parent / os.readlink(pointer)))
    if os.path.realpath(blob.parent) != os.path.realpath(cache.storage / "blobs") or not (
            _SHA256.fullmatch(blob.name) or _COMMIT.fullmatch(blob.name)):
        raise _Refused(f"links to {shown(blob)}, not to a blob of the cache named by its hash", evict)
    content, cst = blob, _lstat(blob, evict)
    evict.append(blob)
    if stat.S_ISLNK(cst.st_mode):  # huggingface_hub's shared store of Xet files
        content = _shared_store_file(cache, blob)
        if content is None:
            raise _Refused(f"links to {shown(blob)}, which links out of the cache's blob stores", evict)
        cst = _lstat(content, evict)
        evict.append(content)
    if not stat.S_ISREG(cst.st_mode):
        raise _Refused(f"links to {_kind(cst.st_mode)}, not to a regular file", evict)
    if os.path.realpath(pointer) != os.path.realpath(content):  # a linked folder on the way: not what we checked
        raise _Refused(f"does not resolve to its blob {shown(blob)}", evict)
    return _Entry(blob, content, cst, evict)


def hub_digest(path: Path, checked: os.stat_result, git: bool = False) -> typing.Tuple[str, typing.Optional[str]]:
    """(sha256, git blob sha1 when `git`) of a cache file, read through one descriptor that must be the very
    file `checked` describes (no link followed, no FIFO waited on)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
            raise _Refused("changed while it was being checked")
        sha = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % st.st_size) if git else None
        read = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            read += len(chunk)
            if read > checked.st_size:
                raise _Refused("grew while it was being checked")
            sha.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha.hexdigest(), (sha1.hexdigest() if sha1 is not None else None)


def _verify(cache: _Cache, path: str, pointer: Path, remote: typing.Optional[Remote]) -> dict:
    """{"path", "bytes", "sha256"} of one cached file once its entry, size and content are checked."""
    hub_sha = remote.sha256 if remote else None
    entry = _locate(cache, pointer, bool(hub_sha))
    size, name = entry.stat.st_size, (entry.blob.name if entry.blob else None)
    if remote is not None and remote.size is not None and size != remote.size:
        raise _Refused(f"has {size:,} bytes where the Hub lists {remote.size:,}", entry.evict, against_hub=True)
    if size > MAX_FILE_BYTES:
        raise _Refused(f"is {size:,} bytes, over the {MAX_FILE_BYTES:,} of any released file", entry.evict)
    git_oid = remote.oid if remote is not None and hub_sha is None else None
    sha, sha1 = hub_digest(entry.content, entry.stat, git=bool(git_oid or (name and _COMMIT.fullmatch(name))))
    if (hub_sha and sha != hub_sha) or (git_oid and sha1 != git_oid):
        raise _Refused(f"does not match the Hub's {'sha256' if hub_sha else 'git blob id'} of {path} "
                       f"({hub_sha or git_oid}): a damaged download", entry.evict, against_hub=True)
    kind, digest = ("sha256", sha) if name is not None and _SHA256.fullmatch(name) else ("git blob sha1", sha1)
    if name is not None and name != digest:
        raise _Refused(f"does not match its blob's name {name} (its {kind} is {digest}): a damaged cache entry",
                       entry.evict)
    return {"path": path, "bytes": size, "sha256": sha}


def _evict(cache: _Cache, paths: typing.Sequence[Path]) -> typing.Optional[str]:
    """Unlink a refused entry's snapshot link and blob (never what a link points to, never outside the cache);
    None when done, else why not."""
    for path in paths:
        if not (_within(path.parent, cache.storage) or _within(path.parent, cache.root / "blobs")):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return _reason(exc)
    return None


def _refusal(cache: _Cache, repo: str, path: str, pointer: Path, refused: _Refused, online: bool) -> str:
    head = f"refusing {path} from the Hugging Face cache: {shown(pointer)} {refused.what}"
    if refused.advice or not refused.evict:
        return f"{head}; {refused.advice or 'nothing was used; run again'}"
    failed = _evict(cache, refused.evict)
    if failed:
        rm = remove_command(repo, path, cache.given)
        return f"{head}; it was not removed ({failed}): remove it with `{rm}`, then run again"
    again = "downloads" if online else "with network downloads"
    return f"{head}; removed from the cache, so that the next run {again} it again"


def _moved_message(repo: str, revision, commits: typing.Sequence[str]) -> str:
    return (f"{repo}: the branch moved while importing; pin --revision COMMIT ({revision or 'main'} gave the files "
            f"of {', '.join(commits)}, not of the commit whose sizes were read first; e.g. --revision {commits[-1]})"
            if len(commits) == 1 else
            f"{repo}: the branch moved while importing; pin --revision COMMIT (the files of {revision or 'main'} "
            f"came from {', '.join(commits)}; e.g. --revision {commits[-1]})")


def _branch_moved(hf, errors, repo: str, release: Release, revision, commit: str, meta: dict, path: str) -> bool:
    """Whether the Hub's word on `path` at the downloaded commit differs from what it said of the branch."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return False
    try:
        again = remote_metadata(hf, errors, repo, release, commit)
    except HubError:
        return False
    return again is not None and again[path] != meta[path]


def _checked_files(hf, errors, cache: _Cache, release: Release, repo: str, revision, commit: str,
                   local: typing.Dict[str, Path], meta: typing.Optional[dict]) -> typing.List[dict]:
    files = []
    for path, holds in release.files:
        try:
            record = _verify(cache, path, local[path], meta[path] if meta else None)
        except _Refused as refused:
            if refused.against_hub and _branch_moved(hf, errors, repo, release, revision, commit, meta, path):
                raise HubError(_moved_message(repo, revision, [commit])) from None
            raise HubError(_refusal(cache, repo, path, local[path], refused, meta is not None)) from None
        files.append({"path": path, "holds": holds, **record})
    return files


def fetch_release(release: Release, repo: str = DEFAULT_REPO, revision: typing.Optional[str] = None,
                  cache_dir=None, offline: bool = False, log=print) -> Fetched:
    """Download (or find in the cache) the release's inference files, each checked before use; nothing else is
    requested. Offline (`offline` or HF_HUB_OFFLINE), no request leaves the process."""
    hf, errors = _hub()
    check_repo_id(repo)
    check_revision(revision)
    offline = offline or bool(getattr(hf.constants, "HF_HUB_OFFLINE", False))
    with _offline_mode(hf, offline):
        return _fetch(hf, errors, release, repo, revision, cache_dir, offline, log)


def _fetch(hf, errors, release: Release, repo: str, revision, cache_dir, offline: bool, log) -> Fetched:
    cache = _Cache.of(hf, repo, cache_dir)
    at = cached_commit(cache, revision)  # the cache's word, read before huggingface_hub reads or writes the ref
    meta = None if offline else remote_metadata(hf, errors, repo, release, revision)
    local_only = meta is None  # offline, or the Hub unreachable: the cache alone, each file against its blob's name
    cached = {p for p, _ in release.files if at is not None and os.path.lexists(cache.pointer(at, p))}
    announce(log, repo, release, revision, meta, cached, str(cache.root), offline)
    if local_only and at is None:
        raise _not_cached(hf, repo, release.files[0][0], release, revision, cache_dir, offline)
    local = {path: _download(hf, errors, repo, path, release, revision, cache_dir, local_only,
                             pin=at if local_only else None) for path, _ in release.files}
    commits = list(dict.fromkeys(_snapshot_commit(cache, file, path) for path, file in local.items()))  # in order
    if len(commits) != 1:
        raise HubError(_moved_message(repo, revision, commits))
    files = _checked_files(hf, errors, cache, release, repo, revision, commits[0], local, meta)
    tokenizer_dir = local[release.files[0][0]].parent
    ar_dir = local[release.files[-1][0]].parent if release.ar_folder else None
    return Fetched(release, repo, revision, commits[0], tokenizer_dir, ar_dir, files)


def import_from_hub(out, release: Release, *, official_config=None, preset: typing.Optional[str] = None,
                    repo: str = DEFAULT_REPO, revision: typing.Optional[str] = None, cache_dir=None,
                    offline: bool = False, log=print):
    """Fetch the release's files and import them as `official.import_official` does; returns the model.

    The sizes come from `official_config` and/or `preset` exactly as for a local import (the CLI
    passes the release's preset).
    """
    from ..official import import_official

    if official_config is None and preset is None:
        preset = release.preset
    fetched = fetch_release(release, repo=repo, revision=revision, cache_dir=cache_dir, offline=offline, log=log)
    return import_official(fetched.tokenizer_dir, out, ar_dir=fetched.ar_dir, official_config=official_config,
                           preset=preset, onestage=release.onestage, source=fetched.source())


__all__ = ["DEFAULT_REPO", "ALLOWED_PATHS", "MAX_FILE_BYTES", "HubError", "Release", "Fetched", "Remote",
           "resolve_release", "fetch_release", "import_from_hub", "check_allowed", "check_repo_id", "check_revision",
           "released_presets"]
