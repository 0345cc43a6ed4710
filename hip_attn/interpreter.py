"""Whether Triton runs kernels in its interpreter: the one reading of ``TRITON_INTERPRET`` that
the dispatch, the kernels' dtype choices, ``hip-attn aot`` and the tests share. Torch-free."""

from __future__ import annotations

import os

# what Triton's own getenv_bool takes as set (any case, no surrounding spaces)
_SET = frozenset({"1", "true", "yes", "on", "y"})


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton for its interpreter, read as Triton reads it
    (``1``, ``true``, ``yes``, ``on`` or ``y``, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _SET
