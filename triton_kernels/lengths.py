"""Lengths a kernel reads either as a launch argument or from device memory.

A decode step replayed from a CUDA graph launches every kernel with the arguments it was
captured with, so what changes from step to step (the keys in use) must come from device
memory, as FlashInfer's decode kernels read their sequence lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def count_stride(tk: int | torch.Tensor, batch: int) -> int:
    """How a kernel steps from one sequence's count ``tk`` to the next: 0 for one count shared
    by the batch (an int, or a device tensor of one element), 1 for an int32 device tensor
    holding each of the ``batch`` sequences' own (a left-padded batch, each sequence's keys
    first in its row)."""
    if not isinstance(tk, torch.Tensor) or tk.numel() == 1:
        return 0
    if tuple(tk.shape) != (batch,) or tk.stride(0) != 1:
        raise ValueError(
            f"a count per sequence must be a contiguous [{batch}] tensor, got shape "
            f"{tuple(tk.shape)}"
        )
    return 1


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
