"""The one base class of every error this package raises on purpose.

Each room derives its own errors from `PrologueError` (keeping `ValueError` for bad input and
`RuntimeError` for things that cannot be done), so a caller, the CLI included, catches one type.
It lives in the runtime because the runtime imports nothing else of ours.
"""

from __future__ import annotations


class PrologueError(Exception):
    """Base of every error prologue-export raises with a message meant for the user."""
