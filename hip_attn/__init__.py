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
    from hip_attn.patches import patch, unpatch

__all__ = [
    "HiPConfig",
    "HiPDecodeState",
    "__version__",
    "estimate_mask",
    "hip_attention",
    "patch",
    "unpatch",
]

# public name -> the module that defines it, imported on first use
_LAZY = {
    "HiPDecodeState": "hip_attn.attention",
    "estimate_mask": "hip_attn.attention",
    "hip_attention": "hip_attn.attention",
    "patch": "hip_attn.patches",
    "unpatch": "hip_attn.patches",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hip_attn' has no attribute {name!r}")
