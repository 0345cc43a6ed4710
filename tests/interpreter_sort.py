"""``tl.sort`` and ``tl.topk`` for the Triton interpreter, by NumPy.

Triton builds both from a bitonic network of ``log2(n)**2 / 2`` compare-and-swap stages; the
interpreter runs each stage as a dozen NumPy calls on a ``[2] * log2(n)`` view, so the search
kernel's one ``tl.topk`` per level was about half of the CPU suite's time. Under the
interpreter the tests sort with NumPy instead: the same contract for the integer keys the
kernels sort (the last dimension sorted, or its ``k`` largest, largest first), checked against
Triton's own network on random keys by
``tests/test_kernels.py::test_numpy_sort_is_tritons_sort``; floats may order NaN and signed
zeros differently. A GPU compiles Triton's."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import TensorHandle

_TRITON = {"sort": tl.sort, "topk": tl.topk}


def _value(x: Any) -> Any:
    return getattr(x, "value", x)  # constexpr arguments arrive wrapped


def _sorted(x: tl.tensor, k: Any, dim: Any, descending: Any) -> tl.tensor:
    dim, k, descending = _value(dim), _value(k), bool(_value(descending))
    n = _value(x.shape[-1])
    if dim not in (None, len(x.shape) - 1):  # what Triton's static asserts accept
        raise ValueError(f"sort: only the last dimension is supported, got dim={dim}")
    if k is not None and not (0 < k <= n and k & (k - 1) == 0):
        raise ValueError(f"topk: k must be a power of two in [1, {n}], got {k}")
    data = np.sort(x.handle.data, axis=-1, kind="stable")
    if descending:
        data = data[..., ::-1]
    if k is not None:
        data = data[..., :k]
    data = np.ascontiguousarray(data)
    return tl.tensor(TensorHandle(data, x.handle.dtype), tl.block_type(x.dtype, list(data.shape)))


def numpy_sort(x: tl.tensor, dim: Any = None, descending: Any = False) -> tl.tensor:
    """``tl.sort``: ``x`` sorted along its last dimension."""
    return _sorted(x, None, dim, descending)


def numpy_topk(x: tl.tensor, k: Any, dim: Any = None, descending: Any = True) -> tl.tensor:
    """``tl.topk``: the ``k`` largest of the last dimension, largest first."""
    return _sorted(x, k, dim, descending)


def use_numpy_sort() -> None:
    """Interpreted kernels that call ``tl.sort``/``tl.topk`` get the NumPy versions."""
    tl.sort, tl.topk = numpy_sort, numpy_topk


def active() -> bool:
    """Whether interpreted kernels sort by NumPy now."""
    return tl.topk is numpy_topk


def use_tritons_sort() -> None:
    """Back to Triton's bitonic network (to compare the two)."""
    tl.sort, tl.topk = _TRITON["sort"], _TRITON["topk"]
