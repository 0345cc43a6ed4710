"""Parsing and printing of the quantities the analytic model talks about.

Conventions (used everywhere in :mod:`hip_attn.perf`):

* context lengths: ``k`` = 1024 and ``m`` = 1024**2 tokens (``4k`` = 4096, ``128k`` = 131072,
  ``1m`` = 1048576); a plain integer is taken as is (``50000``).
* memory sizes: ``GB``/``TB`` are decimal (1e9, 1e12 bytes), ``GiB``/``TiB`` binary; a plain
  number is GB.
* bandwidths are decimal GB/s, compute is TFLOP/s (1e12 FLOP/s); printed sizes are decimal GB.
"""

from __future__ import annotations

import math
import re

_TOKEN_SUFFIX = {"": 1, "k": 1024, "m": 1024**2}
_SIZE_SUFFIX = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_NUMBER_UNIT = re.compile(
    r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE
)


def parse_tokens(text: str) -> int:
    """Parse one token count: ``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"50000"`` -> 50000.

    Raises:
        ValueError: the text is not a positive whole number of tokens.
    """
    match = _NUMBER_UNIT.match(text.replace("_", ""))
    suffix = match.group(2).lower() if match else ""
    if match is None or suffix not in _TOKEN_SUFFIX:
        raise ValueError(f"not a token count: {text!r} (use e.g. 4096, 4k, 128k, 1m)")
    value = float(match.group(1)) * _TOKEN_SUFFIX[suffix]
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"token count must be a positive whole number, got {text!r}")
    return int(value)


def parse_token_list(text: str) -> list[int]:
    """Parse a comma-separated list of token counts (``"4k,32k,128k,1m"``), order kept."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("empty list of context lengths")
    return [parse_tokens(item) for item in items]


def parse_size(text: str) -> int:
    """Parse a memory size into bytes: ``"80GiB"``, ``"141GB"``, ``"512"`` (= 512 GB).

    Raises:
        ValueError: unknown unit, or a size that is not positive.
    """
    match = _NUMBER_UNIT.match(text.replace("_", ""))
    suffix = (match.group(2).lower() or "gb") if match else ""
    if match is None or suffix not in _SIZE_SUFFIX:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 80GiB, 141GB, 512)")
    value = float(match.group(1)) * _SIZE_SUFFIX[suffix]
    if not value >= 1 or not math.isfinite(value):
        raise ValueError(f"memory size must be at least one byte, got {text!r}")
    return int(value)


def short_tokens(n: int) -> str:
    """``131072`` -> ``"128k"``, ``1048576`` -> ``"1m"``, ``50000`` -> ``"50000"``."""
    if n % 1024**2 == 0:
        return f"{n // 1024**2}m"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def fmt_bytes(n: float) -> str:
    """Decimal units: ``12288000000`` -> ``"12.3 GB"``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(t: float) -> str:
    """``0.925`` -> ``"925 ms"``, ``14.1`` -> ``"14.1 s"``, ``3e-5`` -> ``"30 us"``."""
    if not math.isfinite(t):
        return "inf"
    if t >= 1.0:
        return f"{t:.3g} s" if t < 1000 else f"{t:.0f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"
