"""Lengths a kernel reads either as a launch argument or from device memory.

A decode step replayed from a CUDA graph launches every kernel with the arguments it was
captured with, so what changes from step to step (the keys in use) must come from device
memory, as FlashInfer's decode kernels read their sequence lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keys_in_use(tk, ON_DEVICE: tl.constexpr, offset=0):
    """``tk`` itself, or with ``ON_DEVICE`` the int32 at ``tk + offset`` (a count of a row)."""
    if ON_DEVICE:
        return tl.load(tk + offset)
    else:
        return tk


@triton.jit
def refresh_due(tk, anchor, interval):
    """Whether a one-token decode step over ``tk`` keys re-estimates its selection: every step
    up to ``*anchor + 1`` keys, then every ``interval`` steps (the rule
    :class:`hip_attn.HiPDecodeState` applies on the host, its phase set by ``*anchor``)."""
    since = tk - tl.load(anchor) - 1
    return (since <= 0) | (since % interval == 0)
