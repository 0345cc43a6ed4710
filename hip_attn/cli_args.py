"""Command-line pieces shared by the ``hip-attn`` subcommands: the argument parser, one-line
errors, argparse value types, the :class:`HiPConfig` flags, the device flags and a wall-clock
timer.

Torch-free at import (``hip-attn --help`` and ``hip-attn roofline`` never load it); the device
checks and :func:`wall_time` import torch when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from hip_attn.config import HiPConfig

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def one_line(message: object) -> str:
    """``message`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """The parser of ``hip-attn`` and (through ``add_subparsers``) of every subcommand: an error
    is one line on stderr, ``PROG: error: MESSAGE (see PROG --help)``, and exit status 2,
    instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def command_error(prog: str, error: object) -> int:
    """Say ``error`` as one line on stderr, ``PROG: error: ...``; returns exit status 2."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


def arg_type(parse: Callable[[str], T], what: str) -> Callable[[str], T]:
    """Wrap ``parse`` so that its ValueError becomes a one-line argparse error (exit 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except (ValueError, OverflowError) as exc:  # OverflowError: int() of an infinity
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def comma_list(parse: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse type for ``A,B,C``: each item through ``parse``, order kept. An empty item
    (``4k,,8k``) is an error, not skipped: it is usually a typo for a missing value."""

    def convert(text: str) -> list[T]:
        items = [item.strip() for item in text.split(",")]
        if "" in items:
            raise ValueError(f"empty item in the comma-separated list of {what} {text!r}")
        return [parse(item) for item in items]

    return arg_type(convert, f"list of {what}")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _whole_number(text, 0)


def seed_int(text: str) -> int:
    """A random seed: a whole number in [-2**63, 2**63 - 1] (``torch.manual_seed`` takes up to
    2**64 - 1; a few commands also seed with ``seed + 1``)."""
    value = _whole_number(text, -(2**63))
    if value >= 2**63:
        raise ValueError(f"must be < 2**63, got {value}")
    return value


def file_path(text: str) -> str:
    """A file's path: not empty, not an existing folder (the file itself may not exist)."""
    if not text.strip():
        raise ValueError("expected a file path, got an empty string")
    if os.path.isdir(text):
        raise ValueError(f"{text!r} is a folder, not a file")
    return text


def directory(text: str) -> str:
    """An existing folder."""
    if not os.path.isdir(text):
        raise ValueError(f"no such folder: {text!r}")
    return text


def model_source(text: str) -> str:
    """A known model name (``hip_attn.accuracy.checkpoints.KNOWN_MODELS``) or an existing
    folder."""
    from hip_attn.accuracy.checkpoints import KNOWN_MODELS

    if text in KNOWN_MODELS:
        return text
    if not os.path.isdir(text):
        raise ValueError(f"no such folder: {text!r} (or a known model: {', '.join(KNOWN_MODELS)})")
    return text


def torch_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine (imports torch)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{text!r}, but CUDA is not available on this machine")
    if device.index is not None and device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"{text!r}, but this machine has {count} CUDA device(s)")
    return text


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number, got {text}")
    return value


# flag, HiPConfig field, value type (or choices), metavar, help
_HIP_FLAGS: tuple[tuple[str, str, Callable[[str], int] | tuple[str, ...], str | None, str], ...] = (
    ("--hip-k", "k", positive_int, "TOKENS", "key tokens selected per query block"),
    ("--block-size-q", "block_size_q", positive_int, "N", "queries sharing one selection"),
    ("--block-size-k", "block_size_k", positive_int, "N", "tokens per key block"),
    ("--query-pool-stride", "query_pool_stride", positive_int, "N",
     "query rows mean-pooled before scoring"),
    ("--window", "window", positive_int, "TOKENS", "recent tokens always attended"),
    ("--sinks", "sink_tokens", non_negative_int, "TOKENS", "first tokens always attended"),
    ("--head-sharing", "head_sharing", ("kv_group", "head"), None,
     "one selection per KV head or per query head"),
    ("--beam", "beam", positive_int, "N", "search width multiplier"),
    ("--leaf-scores", "leaf_scores", ("summary", "keys"), None,
     "rank the last level's blocks by their summaries or by their keys' exact logits"),
    ("--refresh-interval", "refresh_interval", positive_int, "STEPS",
     "decode steps between re-estimations of the selection"),
    ("--dense-threshold", "dense_threshold", non_negative_int, "TOKENS",
     "dense attention at or below this many keys, 0: never"),
)  # fmt: skip


def add_hip_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    title: str | None = None,
    defaults: HiPConfig | None = None,
) -> None:
    """Add the :class:`HiPConfig` flags (``--hip-k``, ``--block-size-q``, ...) as an argument
    group titled ``title`` (an argument group given is filled directly: it has its title).

    Every flag defaults to ``None`` in the namespace, meaning "the value of the base config"
    (see :func:`hip_config_from_args`); the help text shows the value from ``defaults``
    (``HiPConfig()`` when omitted), which should be that base config.
    """
    shown = defaults if defaults is not None else HiPConfig()
    group = (
        parser.add_argument_group(title or "HiP configuration (defaults from HiPConfig)")
        if isinstance(parser, argparse.ArgumentParser)
        else parser
    )
    for flag, field, kind, metavar, text in _HIP_FLAGS:
        default = getattr(shown, field)
        if default is None:  # dense_threshold derived from the others
            default = f"sinks + k + window = {shown.effective_dense_threshold}"
        value: dict[str, Any] = (
            {"choices": kind}
            if isinstance(kind, tuple)
            else {"type": arg_type(kind, field), "metavar": metavar}
        )
        group.add_argument(flag, help=f"{text} (default {default})", **value)


def hip_config_from_args(args: argparse.Namespace, base: HiPConfig | None = None) -> HiPConfig:
    """``base`` (``HiPConfig()`` when omitted) with every HiP flag given on the command line.

    Raises:
        ValueError, TypeError: the result breaks a :class:`HiPConfig` rule (the message names
            the field, e.g. ``HiPConfig.k must be a positive multiple of block_size_k=8``).
    """
    given = (
        (field, getattr(args, flag[2:].replace("-", "_"), None)) for flag, field, *_ in _HIP_FLAGS
    )
    changes = {field: value for field, value in given if value is not None}
    return (base if base is not None else HiPConfig()).replace(**changes)


def add_device_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, seed: bool = True
) -> None:
    """Add ``--device``, ``--dtype`` and (with ``seed``) ``--seed``; ``--device`` and ``--dtype``
    default to ``None``: cuda when available, bfloat16 on CUDA and float32 elsewhere."""
    parser.add_argument(
        "--device",
        type=arg_type(torch_device, "device"),
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="torch dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    if seed:
        parser.add_argument(
            "--seed", type=arg_type(seed_int, "seed"), default=0, help="random seed (default: 0)"
        )


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` and ``--dtype`` of :func:`add_device_arguments`, defaults resolved."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return device, dtype


def wall_time(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall-clock seconds; on CUDA the device is synchronized before and after,
    so that the time covers the kernels the call launched."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start
