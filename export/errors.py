"""The export room's error (torch-free, so the CLI can name it without loading torch)."""

from __future__ import annotations

from ..runtime.errors import PrologueError


class ExportError(PrologueError, RuntimeError):
    """An export that cannot be done as asked; the message says what to do."""
