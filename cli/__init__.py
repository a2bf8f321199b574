"""prologue: import, train, export and run the Prologue autoregressive image generator.

The `prologue` command, one module per group of subcommands (model, train, export, runtime,
eval, recipes). This room may import every other; each command imports what it needs when it
runs, so `prologue generate` never loads torch and `prologue presets` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from ..runtime.errors import PrologueError
from . import eval as eval_commands
from . import export, model, recipes, runtime, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prologue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (model, train, export, runtime, recipes, eval_commands):
        group.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrologueError as exc:  # every error meant for the user: one line, exit code 2
        print(f"prologue {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prologue {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
