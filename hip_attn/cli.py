"""The ``hip-attn`` command. Each subcommand lives beside the code it drives and registers
itself through an ``add_parser(subparsers)`` function listed in ``_SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hip_attn._version import __version__

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
    parser = argparse.ArgumentParser(
        prog="hip-attn",
        description=(
            "HiP attention for long-context inference: hierarchical top-k attention pruning, "
            "KV offload and a peak-performance model."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
