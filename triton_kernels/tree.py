"""Extending the search's summary tree in place by the key blocks completed since the last call:
one launch per decode refresh instead of two reductions and copies per level.

Reference: :func:`hip_attn.geometry.extend_summaries` (which also builds whole trees and grows
their allocation; this kernel only fills a tree whose capacity already holds the new blocks).
Node ``i`` of level ``l`` sits at row ``level_offset(l, capacity) + i`` and holds the
elementwise max of its keys, then their min (:func:`hip_attn.geometry.node_summaries`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hip_attn.config import HiPConfig
from hip_attn.geometry import first_candidate_block, tree_capacity
from hip_attn.triton_kernels.dtypes import needs_int64


@triton.jit
def level_offset(levels, capacity):
    """hip_attn.geometry.level_offset, elementwise over a tensor of levels (26 levels at most)."""
    offset = tl.zeros_like(levels)
    for i in tl.static_range(26):
        offset += tl.where(i < levels, capacity >> i, 0)
    return offset


@triton.jit
def _extend_tree_kernel(
    K, stride_k_b, stride_k_h, stride_k_t,  # keys [B, Hkv, Tk, D]
    T, stride_t_b, stride_t_h, stride_t_n,  # tree [B, Hkv, tree_rows(capacity), 2 * D]
    heads, done, n, capacity, first_key,
    BK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // heads).to(OFFSET)
    h = (bh % heads).to(OFFSET)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    keys = K + b * stride_k_b + h * stride_k_h
    tree = T + b * stride_t_b + h * stride_t_h
    rows = tl.arange(0, BK)
    zero = b * 0  # loop counters are added to it: offsets in OFFSET's width
    for block in range(done, n):  # the leaves: one key block each
        t = zero + first_key + block * BK + rows
        # compared in fp32 (exact: every value is one of the keys), stored in the tree's dtype
        k = tl.load(keys + t[:, None] * stride_k_t + dims[None, :], mask=dim_ok[None, :])
        k = k.to(tl.float32)
        node = tree + (zero + block) * stride_t_n
        tl.store(node + dims, tl.max(k, axis=0).to(T.dtype.element_ty), mask=dim_ok)
        tl.store(node + D + dims, tl.min(k, axis=0).to(T.dtype.element_ty), mask=dim_ok)
    level = 1
    while (n >> level) > 0:  # the parents of what changed, level by level
        tl.debug_barrier()  # the level below is written
        below = level_offset(level - 1, capacity)
        here = level_offset(level, capacity)
        for i in range(done >> level, n >> level):
            left = tree + (zero + below + 2 * i) * stride_t_n
            right = left + stride_t_n
            node = tree + (zero + here + i) * stride_t_n
            hi = tl.maximum(
                tl.load(left + dims, mask=dim_ok).to(tl.float32),
                tl.load(right + dims, mask=dim_ok).to(tl.float32),
            )
            lo = tl.minimum(
                tl.load(left + D + dims, mask=dim_ok).to(tl.float32),
                tl.load(right + D + dims, mask=dim_ok).to(tl.float32),
            )
            tl.store(node + dims, hi.to(T.dtype.element_ty), mask=dim_ok)
            tl.store(node + D + dims, lo.to(T.dtype.element_ty), mask=dim_ok)
        level += 1


def extend_tree_triton(tree: torch.Tensor, k: torch.Tensor, done: int, config: HiPConfig) -> None:
    """Summarize in ``tree`` the blocks of ``k`` ``[B, Hkv, Tk, D]`` after the first ``done``,
    up to the last complete one; ``tree``'s capacity must hold them (else use
    :func:`hip_attn.geometry.node_summaries`, which grows it)."""
    bk, first = config.block_size_k, first_candidate_block(config)
    b, h, tk, d = k.shape
    if tree.shape[:2] != (b, h) or tree.shape[-1] != 2 * d:
        raise ValueError(
            f"the tree {tuple(tree.shape)} was built for other keys than {tuple(k.shape)}"
        )
    n = max(0, tk // bk - first)
    capacity = tree_capacity(tree)
    if not done <= n <= capacity:
        raise ValueError(f"the tree holds {capacity} blocks and {done} done; cannot extend to {n}")
    if n == done:
        return
    if k.stride(-1) != 1 or tree.stride(-1) != 1:
        raise ValueError("keys and tree need unit stride on the last dimension")
    _extend_tree_kernel[(b * h,)](
        k, k.stride(0), k.stride(1), k.stride(2),
        tree, tree.stride(0), tree.stride(1), tree.stride(2),
        h, done, n, capacity, first * bk,
        BK=bk, D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        OFFSET=tl.int64 if needs_int64(k, tree) else tl.int32,
    )  # fmt: skip
