"""prologue: import, train, export and run the Prologue autoregressive image generator.

The `prologue` command, one module per group of subcommands (model, train, export, generate,
serve, eval, recipes). This room may import every other; each command imports what it needs when it
runs, so `prologue generate` never loads torch and `prologue presets` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from ..runtime.errors import PrologueError
from . import eval as eval_commands
from . import export, generate, model, recipes, serve, train


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as argparse's own)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prologue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (model, train, export, generate, serve, recipes, eval_commands):
        group.add_parsers(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_message(exc: OSError) -> str:
    """An OSError (ENOSPC, EACCES, ...) as one line naming the path when it has one."""
    what = exc.strerror or _one_line(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {what}" if paths else what


def main(argv=None) -> int:
    """Run one command. Every error meant for the user (PrologueError), and any OSError the
    environment raises (disk full, permission denied), is one line on stderr and exit code 2;
    Ctrl-C is one line and 130; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)  # usage errors: one line, exit code 2
    name = f"prologue {args.command}"  # tests and scripts match this prefix
    ok = False
    try:
        code = args.func(args)
        ok = not code
        return code
    except PrologueError as exc:
        print(f"{name}: error: {_one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:  # last resort: the environment (disk full, permission denied), not our code
        print(f"{name}: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a training command under `accelerate launch`
            from ..train.common import end_distributed

            end_distributed(ok)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
