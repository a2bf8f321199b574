"""The one base class of every error this package raises on purpose.

Each room derives its own errors from `PrologueError` (keeping `ValueError` for bad input and
`RuntimeError` for things that cannot be done), so a caller, the CLI included, catches one type.
It lives in the runtime because the runtime imports nothing else of ours.
"""

from __future__ import annotations


class PrologueError(Exception):
    """Base of every error prologue-export raises with a message meant for the user."""


def short_repr(value, limit: int = 80) -> str:
    """`repr(value)` on one line, cut to `limit` characters: how error messages show what they got."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


MAX_ERROR_CHARS = 400  # an error message a server answers is cut to this (a bounded excerpt of the input)


def one_line(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """The error on one line, cut to `limit` characters: never more than an excerpt of the input
    (what `prologue serve` and the Triton model answer a bad request with)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
