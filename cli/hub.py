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
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import MODEL_PRESETS
from ..official import OfficialImportError, inference_slots
from ..runtime.files import sha256_file, shown

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
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


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


def check_repo_id(repo: str) -> str:
    if not isinstance(repo, str) or not _REPO_ID.match(repo) or ".." in repo:
        raise HubError(f"--hub REPO must look like OWNER/NAME (e.g. {DEFAULT_REPO}), got {repo!r}")
    return repo


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


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 -- binds `huggingface_hub.constants` (lazy module)
        from huggingface_hub import errors
    except ImportError:
        raise HubError(f"--hub needs the huggingface_hub package: {HUB_EXTRA_HINT}") from None
    return huggingface_hub, errors


def hub_sha256(path: Path) -> str:
    """sha256 of a fetched file (its own name, so tests can watch every file the import opens)."""
    return sha256_file(path)


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


def manual_command(repo: str, release: Release, revision: typing.Optional[str]) -> str:
    """The `hf download` line that fetches exactly the files an import reads (into the same cache)."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo} {' '.join(p for p, _ in release.files)}{rev}"


def remote_metadata(hf, errors, repo: str, release: Release, revision) -> typing.Optional[dict]:
    """{repo path: (bytes, sha256 or None)} from the Hub, or None when it cannot be reached."""
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
        found[info.path] = (getattr(info, "size", None), sha)
    missing = [p for p in paths if p not in found]
    if missing:
        raise HubError(f"{repo} at revision {revision or 'main'} has no {', '.join(missing)}: "
                       "is it the Prologue release (OFFICIAL_MODEL.md §1 layout)?")
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
        log(f"offline: reading {len(release.files)} files of {where} from the Hugging Face cache {cache}")
    elif meta is None:
        log(f"the Hub could not be reached: download size unknown; trying the Hugging Face cache {cache}")
    else:
        total = sum(meta[p][0] or 0 for p, _ in release.files)
        todo = sum(meta[p][0] or 0 for p, _ in release.files if p not in cached)
        log(f"{where}: {len(release.files)} files, {_human(total)}; to download: {_human(todo)} "
            f"(the rest is in the cache {cache})")
    for path, holds in release.files:
        size = f"{_human(meta[path][0])}" if meta and meta[path][0] is not None else "size unknown"
        log(f"  {path}  ({holds}; {size}{', cached' if path in cached else ''})")


def _download(hf, errors, repo: str, path: str, release: Release, revision, cache_dir, offline: bool) -> Path:
    check_allowed(path)
    try:
        return Path(hf.hf_hub_download(repo, path, revision=revision, cache_dir=cache_dir, local_files_only=offline))
    except errors.LocalEntryNotFoundError:
        why = "offline mode is on" if offline else "the Hub could not be reached"
        raise HubError(
            f"{path} is not in the Hugging Face cache {_cache_dir(hf, cache_dir)} and {why}. Run this command "
            f"once with network, or fetch exactly the files an import reads with `{manual_command(repo, release, revision)}` "
            f"(same cache; set HF_HUB_CACHE or --cache-dir if it lives elsewhere)") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise _access_error(errors, exc, repo, revision) from None
    except errors.EntryNotFoundError:
        raise HubError(f"{repo} at revision {revision or 'main'} has no {path}: is it the Prologue release?") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"downloading {path} from {repo} failed: {_first_line(exc)}") from None


def _snapshot_commit(local: Path, repo_path: str) -> typing.Optional[str]:
    """The commit of a file in the Hub cache layout `.../snapshots/<commit>/<repo path>`."""
    snapshot = local.parents[len(Path(repo_path).parts) - 1]
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def fetch_release(release: Release, repo: str = DEFAULT_REPO, revision: typing.Optional[str] = None,
                  cache_dir=None, offline: bool = False, log=print) -> Fetched:
    """Download (or find in the cache) the release's inference files; nothing else is requested."""
    check_repo_id(repo)
    hf, errors = _hub()
    offline = offline or bool(getattr(hf.constants, "HF_HUB_OFFLINE", False))
    meta = None if offline else remote_metadata(hf, errors, repo, release, revision)
    cached = {p for p, _ in release.files
              if isinstance(hf.try_to_load_from_cache(repo, p, cache_dir=cache_dir, revision=revision), str)}
    announce(log, repo, release, revision, meta, cached, _cache_dir(hf, cache_dir), offline)
    local = {path: _download(hf, errors, repo, path, release, revision, cache_dir, offline) for path, _ in release.files}
    commits = {_snapshot_commit(file, path) for path, file in local.items()}
    if len(commits) != 1:
        raise HubError(f"the files of {repo}@{revision or 'main'} came from different commits ({sorted(map(str, commits))}): "
                       "the branch moved during the download; pin one with --revision COMMIT")
    files = []
    for path, holds in release.files:
        digest = hub_sha256(local[path])
        if meta and meta[path][1] and meta[path][1] != digest:
            raise HubError(f"{shown(local[path])} does not match the Hub's sha256 of {path} ({meta[path][1]}): "
                           "a damaged cache entry; delete it (`hf cache delete`) and run again")
        files.append({"path": path, "holds": holds, "bytes": local[path].stat().st_size, "sha256": digest})
    tokenizer_dir = local[release.files[0][0]].parent
    ar_dir = local[release.files[-1][0]].parent if release.ar_folder else None
    return Fetched(release, repo, revision, commits.pop(), tokenizer_dir, ar_dir, files)


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


__all__ = ["DEFAULT_REPO", "ALLOWED_PATHS", "HubError", "Release", "Fetched", "resolve_release", "fetch_release",
           "import_from_hub", "check_allowed", "released_presets"]
