"""The ``hip-attn`` command. Each subcommand lives beside the code it drives and registers
itself through an ``add_parser(subparsers)`` function listed in ``_SUBCOMMANDS``.

Bad input is one line on stderr and exit status 2 (:class:`~hip_attn.cli_args.ArgumentParser`
for what argparse finds, :func:`~hip_attn.cli_args.command_error` for what a command finds)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from hip_attn._version import __version__
from hip_attn.cli_args import ArgumentParser

# module path -> its add_parser registers one subcommand whose handler is set with
# ``parser.set_defaults(func=...)`` and returns a process exit code.
_SUBCOMMANDS: tuple[str, ...] = (
    "hip_attn.check",
    "hip_attn.aot",
    "hip_attn.demo",
    "hip_attn.perf.cli",
    "hip_attn.bench.cli",
    "hip_attn.accuracy.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hip-attn",
        description=(
            "HiP attention for long-context inference: hierarchical top-k attention pruning, "
            "KV offload and a peak-performance model."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def _command_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of command ``name``, or ``parser`` itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def _command_names(parser: argparse.ArgumentParser) -> list[str]:
    return [
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser: "hip-attn check: error: ..."
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        commands = ", ".join(_command_names(parser))
        parser.error(f"name a command: {commands}")
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:  # the reader left early: ``hip-attn roofline --json - | head -1``
        # point stdout at /dev/null so that its flush at exit says nothing either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process that SIGPIPE ended
    return status


if __name__ == "__main__":
    sys.exit(main())
