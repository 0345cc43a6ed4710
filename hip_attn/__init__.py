"""hip_attn: hierarchical top-k attention pruning (HiP) for long-context inference."""

from hip_attn._version import __version__
from hip_attn.attention import HiPDecodeState, estimate_mask, hip_attention
from hip_attn.config import HiPConfig

__all__ = ["HiPConfig", "HiPDecodeState", "__version__", "estimate_mask", "hip_attention"]
