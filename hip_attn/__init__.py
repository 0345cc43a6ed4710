"""hip_attn: hierarchical top-k attention pruning (HiP) for long-context inference.

The attention API imports torch; it is loaded on first use so that torch-free parts (the
``hip-attn roofline`` model) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hip_attn._version import __version__
from hip_attn.config import HiPConfig

if TYPE_CHECKING:
    from hip_attn.attention import HiPDecodeState, estimate_mask, hip_attention

__all__ = ["HiPConfig", "HiPDecodeState", "__version__", "estimate_mask", "hip_attention"]

_LAZY = {"HiPDecodeState", "estimate_mask", "hip_attention"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from hip_attn import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'hip_attn' has no attribute {name!r}")
