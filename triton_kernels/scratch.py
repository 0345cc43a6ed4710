"""Scratch tensors a caller keeps across launches (a decode step's split-K partials, the
search's counters), so that a step allocates nothing but its output."""

from __future__ import annotations

import torch


def scratch_tensor(
    scratch: dict[str, torch.Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    zeroed: bool = False,
) -> torch.Tensor:
    """``scratch[name]`` when it has this shape, dtype and device; otherwise a new tensor
    (kept in ``scratch`` when one is given), uninitialized or, with ``zeroed``, zeros (counters
    the kernels leave at zero for the next launch)."""
    held = None if scratch is None else scratch.get(name)
    if (
        held is not None
        and tuple(held.shape) == shape
        and held.dtype == dtype
        and held.device == device
    ):
        return held
    fresh = (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=device)
    if scratch is not None:
        scratch[name] = fresh
    return fresh
