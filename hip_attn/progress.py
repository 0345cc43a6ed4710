"""Progress bars of the long ``hip-attn`` runs (accuracy, eval, demo, aot, bench): tqdm on
stderr with rate and ETA, silent when stderr is not a terminal (logs and pipes stay clean).

tqdm is imported on first use: it would triple the start-up time of ``hip-attn --help``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
) -> Any:
    """A :class:`tqdm.tqdm` over ``iterable`` (or updated by hand up to ``total``) on stderr.

    It draws only with ``enabled`` and a terminal on stderr; otherwise its ``update``,
    ``set_postfix_str`` and iteration still work and print nothing. It clears itself when
    closed, so the results printed after it stand alone.
    """
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
    )


def say(message: str, file: IO[str] | None = None) -> None:
    """Print ``message`` as a line on ``file`` (default stdout) above any progress bar shown
    (a plain ``print`` to the same terminal would break the bar), and flush it, so that a long
    run's lines reach a log as they come."""
    from tqdm import tqdm

    out = file if file is not None else sys.stdout
    tqdm.write(message, file=out)
    out.flush()
