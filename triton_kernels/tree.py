"""Extending the search's summary tree in place by the key blocks completed since the last call:
one launch per decode refresh instead of two reductions and copies per level.

Reference: :func:`hip_attn.geometry.extend_summaries` (which also builds whole trees and grows
their allocation; this kernel only fills a tree whose capacity already holds the new blocks).
Node ``i`` of level ``l`` sits at row ``level_offset(l, capacity) + i`` and holds the mean of
its keys, then their per-dimension variance (:func:`hip_attn.geometry.node_summaries`), computed
with the reference's operations in its order (:func:`hip_attn.geometry.leaf_moments`,
:func:`hip_attn.geometry.merged_moments`) so that both round alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    extends_in_place,
    first_candidate_block,
    tree_blocks,
    tree_capacity,
)
from hip_attn.triton_kernels.dtypes import needs_int64, round_to, saturate
from hip_attn.triton_kernels.lengths import keys_in_use, refresh_due


@triton.jit
def level_offset(levels, capacity):
    """hip_attn.geometry.level_offset, elementwise over a tensor of levels (26 levels at most)."""
    offset = tl.zeros_like(levels)
    for i in tl.static_range(26):
        offset += tl.where(i < levels, capacity >> i, 0)
    return offset


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store fp32 ``x`` in ``ptr``'s dtype, rounded to nearest as PyTorch rounds (the
    interpreter's bfloat16 cast would truncate)."""
    tl.store(ptr, round_to(x, ptr.dtype.element_ty).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def extend_tree(
    keys, stride_k_t, tree, stride_t_n, done, n, capacity, first_key, zero,
    BK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Summarize blocks ``done .. n - 1`` of one (batch, KV head): ``keys`` and ``tree`` point at
    its keys and its tree; ``zero`` is a 0 of the offset width. The caller's program must be the
    only one writing this tree; its later loads of the tree may follow a ``tl.debug_barrier``."""
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    for block in range(done, n):  # the leaves: one key block each
        row = keys + (zero + first_key + block * BK) * stride_k_t + dims
        total = tl.zeros([D_PAD], tl.float32)
        for i in tl.static_range(BK):  # in row order, in fp32
            total += tl.load(row + i * stride_k_t, mask=dim_ok).to(tl.float32)
        mean = total / BK
        spread = tl.zeros([D_PAD], tl.float32)
        for i in tl.static_range(BK):
            dev = tl.load(row + i * stride_k_t, mask=dim_ok).to(tl.float32) - mean
            spread += dev * dev
        node = tree + (zero + block) * stride_t_n
        _store_rounded(node + dims, mean, dim_ok)
        _store_rounded(node + D + dims, saturate(spread / BK, tree.dtype.element_ty), dim_ok)
    level = 1
    while (n >> level) > 0:  # the parents of what changed, level by level
        tl.debug_barrier()  # the level below is written
        below = level_offset(level - 1, capacity)
        here = level_offset(level, capacity)
        for i in range(done >> level, n >> level):
            left = tree + (zero + below + 2 * i) * stride_t_n
            right = left + stride_t_n
            node = tree + (zero + here + i) * stride_t_n
            mean_a = tl.load(left + dims, mask=dim_ok).to(tl.float32)
            mean_b = tl.load(right + dims, mask=dim_ok).to(tl.float32)
            var_a = tl.load(left + D + dims, mask=dim_ok).to(tl.float32)
            var_b = tl.load(right + D + dims, mask=dim_ok).to(tl.float32)
            half = (mean_a - mean_b) * 0.5
            var = (var_a + var_b) * 0.5 + half * half
            _store_rounded(node + dims, (mean_a + mean_b) * 0.5, dim_ok)
            _store_rounded(node + D + dims, saturate(var, tree.dtype.element_ty), dim_ok)
        level += 1


@triton.jit
def _extend_tree_kernel(
    K, stride_k_b, stride_k_h, stride_k_t,  # keys [B, Hkv, Tk, D]
    T, stride_t_b, stride_t_h, stride_t_n,  # tree [B, Hkv, tree_rows(capacity), 2 * D]
    heads, done, tk, capacity, first, anchor, interval,
    BK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, OFFSET: tl.constexpr,
    ON_DEVICE: tl.constexpr,  # tk and done point at device memory, done per (batch, KV head)
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // heads).to(OFFSET)
    h = (bh % heads).to(OFFSET)
    tk = keys_in_use(tk, ON_DEVICE)
    n = tl.maximum(tk // BK - first, 0)
    if ON_DEVICE:  # noqa: SIM108 (a decode step summarizes only when it searches)
        due = refresh_due(tk, anchor, interval)
    else:
        due = True
    if due:
        extend_tree(
            K + b * stride_k_b + h * stride_k_h, stride_k_t, T + b * stride_t_b + h * stride_t_h,
            stride_t_n, keys_in_use(done, ON_DEVICE, bh), n, capacity, first * BK, b * 0,
            BK, D, D_PAD,
        )  # fmt: skip
        if ON_DEVICE:
            tl.store(done + bh, n)


def check_extension(tree: torch.Tensor, k: torch.Tensor, done: int, config: HiPConfig) -> int:
    """The blocks ``tree`` will hold once extended from ``done`` by the keys ``k``; raises
    ``ValueError`` unless it can (:func:`~hip_attn.geometry.extends_in_place`)."""
    n = tree_blocks(k.shape[2], config)
    if not extends_in_place(tree, k, done, config):
        raise ValueError(
            f"cannot extend the tree {tuple(tree.shape)} (room for {tree_capacity(tree)} blocks, "
            f"{done} done) to the {n} blocks of keys {tuple(k.shape)} on {k.device}: it must "
            "be built for these keys, hold them, and both need unit stride last"
        )
    return n


def extend_tree_triton(tree: torch.Tensor, k: torch.Tensor, done: int, config: HiPConfig) -> None:
    """Summarize in ``tree`` the blocks of ``k`` ``[B, Hkv, Tk, D]`` after the first ``done``,
    up to the last complete one; ``tree``'s capacity must hold them (else use
    :func:`hip_attn.geometry.node_summaries`, which grows it)."""
    n = check_extension(tree, k, done, config)
    if n == done:
        return
    b, h, _, d = k.shape
    _extend_tree_kernel[(b * h,)](
        k, k.stride(0), k.stride(1), k.stride(2),
        tree, tree.stride(0), tree.stride(1), tree.stride(2),
        h, done, k.shape[2], tree_capacity(tree), first_candidate_block(config), 0, 1,
        BK=config.block_size_k, D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        OFFSET=tl.int64 if needs_int64(k, tree) else tl.int32, ON_DEVICE=False,
        enable_fp_fusion=False,  # a GPU then rounds as the reference does (no fused multiply-adds)
    )  # fmt: skip


def extend_tree_device(
    tree: torch.Tensor,
    k: torch.Tensor,
    tk: torch.Tensor,
    done: torch.Tensor,
    anchor: torch.Tensor,
    config: HiPConfig,
) -> None:
    """:func:`extend_tree_triton` for a decode step with its lengths in device memory (see
    :func:`hip_attn.triton_kernels.mask.decode_search_triton`): on a step that searches, row
    ``(b, h)`` of ``tree`` is extended from ``done[b, h]`` blocks to those of the first ``tk``
    keys of the buffer ``k``; other steps launch and return at once."""
    b, h, _, d = k.shape
    _extend_tree_kernel[(b * h,)](
        k, k.stride(0), k.stride(1), k.stride(2),
        tree, tree.stride(0), tree.stride(1), tree.stride(2),
        h, done, tk, tree_capacity(tree), first_candidate_block(config), anchor,
        config.refresh_interval,
        BK=config.block_size_k, D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        OFFSET=tl.int64 if needs_int64(k, tree) else tl.int32, ON_DEVICE=True,
        enable_fp_fusion=False,
    )  # fmt: skip
