"""Writing a bundle's manifest (torch-free): the one place export and build-engines serialize it,
and the digest they report (the sha256 of the bytes written: what `--digest` pins, `Bundle.digest`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..runtime.files import shown, write_text_atomic
from .errors import ExportError


class Published(dict):
    """What a command that wrote a bundle's manifest returns (the manifest, its `tensorrt` section
    or its engines), with `digest`: the sha256 of the manifest.json it wrote."""

    def __init__(self, value: dict, digest: str):
        super().__init__(value)
        self.digest = digest


def manifest_text(manifest: dict, path: Path) -> str:
    """The manifest as the strict JSON that is written (NaN / Infinity refused, as the runtime would)."""
    try:
        return json.dumps(manifest, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"cannot write the bundle manifest {shown(path)}: {exc}") from None


def write_manifest(path: Path, manifest: dict) -> str:
    """Write `manifest` to `path` atomically (`write_text_atomic`: mkstemp, never through a link);
    returns its digest, the sha256 of exactly the bytes written."""
    text = manifest_text(manifest, path)
    write_text_atomic(path, text, "bundle manifest")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
