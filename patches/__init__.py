"""Hugging Face integration of hip_attn (installed as ``hip_attn.patches``).

``patch(model)`` registers a ``"hip"`` attention function and mask with transformers'
``AttentionInterface`` / ``AttentionMaskInterface`` and switches the model to it.
"""

from hip_attn.patches.attention import decode_states, hip_attention_forward, hip_mask
from hip_attn.patches.graph_generate import graph_generate
from hip_attn.patches.model import is_patched, patch, unpatch

__all__ = [
    "decode_states",
    "graph_generate",
    "hip_attention_forward",
    "hip_mask",
    "is_patched",
    "patch",
    "unpatch",
]
