"""Building the search's summary tree, or extending it in place by the key blocks completed
since the last call: a prefill's whole tree in two launches (every run of ``2**CHUNK_LEVELS``
blocks up to its root in parallel, then the levels above), a decode refresh in one (or in a
column of the search kernel's programs: :func:`hip_attn.triton_kernels.mask.extends_beside`),
instead of PyTorch ops per key row and level.

Reference: :func:`hip_attn.geometry.extend_summaries` (which also builds whole trees and grows
their allocation; this kernel only fills a tree whose capacity already holds the new blocks).
Node ``i`` of level ``l`` sits at row ``level_offset(l, capacity) + i`` and holds the mean of
its keys, then one variance per dimension pair ``(d, d + D/2)``
(:func:`hip_attn.geometry.node_summaries`), computed with the reference's operations in its
order (:func:`hip_attn.geometry.leaf_moments`, :func:`hip_attn.geometry.paired`,
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
    holds_blocks,
    tree_blocks,
    tree_capacity,
)
from hip_attn.triton_kernels.dtypes import needs_int64, round_to, saturate


@triton.jit
def level_offset(levels, capacity):
    """hip_attn.geometry.level_offset, elementwise over a tensor of levels (26 levels at most).
    A loop, not the reference's closed form: with a popcount the sm_90 search and tree
    kernels spill registers (``hip-attn aot``)."""
    offset = tl.zeros_like(levels)
    for i in tl.static_range(26):
        offset += tl.where(i < levels, capacity >> i, 0)
    return offset


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store fp32 ``x`` in ``ptr``'s dtype, rounded to nearest as PyTorch rounds (the
    interpreter's bfloat16 cast would truncate)."""
    tl.store(ptr, round_to(x, ptr.dtype.element_ty).to(ptr.dtype.element_ty), mask=mask)


#: every level of a tree (more than any capacity has)
ALL_LEVELS = tl.constexpr(64)
#: nodes a program summarizes at once: one ``[TILE, D]`` tile per step
TILE = tl.constexpr(16)
#: levels ``0 .. CHUNK_LEVELS`` of a whole build are summarized by one program per
#: ``2**CHUNK_LEVELS`` blocks, in parallel; a second launch adds the levels above, one program
#: per tree (``n / 2**CHUNK_LEVELS`` nodes at most, in tiles)
CHUNK_LEVELS = 5


@triton.jit
def extend_tree(
    keys, stride_k_t, tree, stride_t_n, done, n, capacity, key0, zero, first_level, last_level,
    BK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """Summarize blocks ``done .. n - 1`` of one (batch, KV head) at levels ``first_level ..
    last_level`` (the leaves are level 0; nodes of a level covering any of those blocks, once
    complete): ``keys`` and ``tree`` point at its keys and its tree, block ``j``'s keys start
    at row ``key0 + j * BK``; ``zero`` is a 0 of the offset width. The caller's program must be
    the only one writing these nodes; it writes only nodes ending after block ``done``, so
    other programs may read those ending at or before it meanwhile. Each element is summed in
    the reference's order (:func:`hip_attn.geometry.leaf_moments`), ``TILE`` nodes at a
    time."""
    # a node's dimension pairs (d, d + D/2) side by side: two [TILE, D/2] tiles
    dims = tl.arange(0, D_PAD // 2)
    dim_ok = dims < D // 2
    nodes = tl.arange(0, TILE)
    if first_level == 0:
        for start in range(done, n, TILE):  # the leaves: one key block each
            block = start + nodes
            ok = (block < n)[:, None] & dim_ok[None, :]
            row = keys + (zero + key0 + block * BK)[:, None] * stride_k_t + dims[None, :]
            total_lo = tl.zeros([TILE, D_PAD // 2], tl.float32)
            total_hi = tl.zeros([TILE, D_PAD // 2], tl.float32)
            for i in tl.static_range(BK):  # in row order, in fp32
                total_lo += tl.load(row + i * stride_k_t, mask=ok, other=0.0).to(tl.float32)
                total_hi += tl.load(row + i * stride_k_t + D // 2, mask=ok,
                                    other=0.0).to(tl.float32)  # fmt: skip
            mean_lo = total_lo / BK  # exact on a GPU too: BK is a power of two
            mean_hi = total_hi / BK
            spread_lo = tl.zeros([TILE, D_PAD // 2], tl.float32)
            spread_hi = tl.zeros([TILE, D_PAD // 2], tl.float32)
            for i in tl.static_range(BK):
                dev = tl.load(row + i * stride_k_t, mask=ok, other=0.0).to(tl.float32) - mean_lo
                spread_lo += dev * dev
                dev = tl.load(row + i * stride_k_t + D // 2, mask=ok, other=0.0).to(tl.float32)
                dev -= mean_hi
                spread_hi += dev * dev
            node = tree + (zero + block)[:, None] * stride_t_n + dims[None, :]
            _store_rounded(node, mean_lo, ok)
            _store_rounded(node + D // 2, mean_hi, ok)
            var = (spread_lo / BK + spread_hi / BK) * 0.5  # the pair's mean variance
            _store_rounded(node + D, saturate(var, tree.dtype.element_ty), ok)
    level = tl.maximum(first_level, 1)
    # the parents of what changed: level l's nodes [done >> l, n >> l); none changed at a
    # level, none above it did (a device decode step that completed no block: no iteration)
    while (level <= last_level) & ((n >> level) > (done >> level)):
        tl.debug_barrier()  # the level below is written
        below = level_offset(level - 1, capacity)
        here = level_offset(level, capacity)
        for start in range(done >> level, n >> level, TILE):
            i = start + nodes
            ok = (i < (n >> level))[:, None] & dim_ok[None, :]
            left = tree + (zero + below + 2 * i)[:, None] * stride_t_n + dims[None, :]
            right = left + stride_t_n
            a_lo = tl.load(left, mask=ok, other=0.0).to(tl.float32)
            a_hi = tl.load(left + D // 2, mask=ok, other=0.0).to(tl.float32)
            b_lo = tl.load(right, mask=ok, other=0.0).to(tl.float32)
            b_hi = tl.load(right + D // 2, mask=ok, other=0.0).to(tl.float32)
            var_a = tl.load(left + D, mask=ok, other=0.0).to(tl.float32)
            var_b = tl.load(right + D, mask=ok, other=0.0).to(tl.float32)
            half_lo = (a_lo - b_lo) * 0.5
            half_hi = (a_hi - b_hi) * 0.5
            var = (var_a + var_b) * 0.5 + (half_lo * half_lo + half_hi * half_hi) * 0.5
            node = tree + (zero + here + i)[:, None] * stride_t_n + dims[None, :]
            _store_rounded(node, (a_lo + b_lo) * 0.5, ok)
            _store_rounded(node + D // 2, (a_hi + b_hi) * 0.5, ok)
            _store_rounded(node + D, saturate(var, tree.dtype.element_ty), ok)
        level += 1


@triton.jit
def _extend_tree_kernel(
    K, stride_k_b, stride_k_h, stride_k_t,  # keys [B, Hkv, Tk, D]
    T, stride_t_b, stride_t_h, stride_t_n,  # tree [B, Hkv, tree_rows(capacity), 1.5 * D]
    heads, done, n, capacity, key0, first_level, last_level,
    BK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
    OFFSET: tl.constexpr,
    CHUNKED: tl.constexpr,  # program (c, bh) takes the c-th run of 2**last_level blocks
):  # fmt: skip
    bh = tl.program_id(1)  # runs on axis 0: CUDA caps the others at 65535
    b = (bh // heads).to(OFFSET)
    h = (bh % heads).to(OFFSET)
    lo = done
    hi = n
    if CHUNKED:  # runs aligned to 2**last_level blocks: their nodes up to that level
        run = ((lo >> last_level) + tl.program_id(0)) << last_level
        lo = tl.maximum(lo, run)
        hi = tl.minimum(hi, run + (1 << last_level))
    extend_tree(
        K + b * stride_k_b + h * stride_k_h, stride_k_t, T + b * stride_t_b + h * stride_t_h,
        stride_t_n, lo, hi, capacity, key0, b * 0, first_level, last_level, BK, D, D_PAD, TILE,
    )  # fmt: skip


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
    _extend(tree, k, done, n, first_candidate_block(config) * config.block_size_k, config)


def append_tree_triton(
    tree: torch.Tensor, keys: torch.Tensor, done: int, config: HiPConfig
) -> None:
    """Summarize in ``tree``, which holds ``done`` blocks, the whole key blocks ``keys``
    ``[B, Hkv, whole blocks, D]`` that follow them (as
    :func:`hip_attn.geometry.extend_summaries` takes them); ``tree``'s capacity must hold them."""
    bk = config.block_size_k
    n = done + keys.shape[2] // bk
    if not holds_blocks(tree, keys, done, n):
        raise ValueError(
            f"cannot append {keys.shape[2] // bk} blocks {tuple(keys.shape)} on {keys.device} "
            f"to the tree {tuple(tree.shape)} on {tree.device} (room for "
            f"{tree_capacity(tree)} blocks, {done} done): it must be built for these keys, "
            "on their device, and both need unit stride last"
        )
    _extend(tree, keys, done, n, -done * bk, config)


def _extend(
    tree: torch.Tensor,
    k: torch.Tensor,
    done: int,
    n: int,
    key0: int,
    config: HiPConfig,
) -> None:
    """Blocks ``done .. n - 1`` (block ``j`` at row ``key0 + j * block_size_k`` of ``k``):
    within one run of ``2**CHUNK_LEVELS`` blocks (a decode refresh) one program per tree does
    every level; otherwise levels up to ``CHUNK_LEVELS`` by one program per run, then, when the
    new blocks reach a higher node, the levels above by one program per tree."""
    if n == done:
        return
    b, h, _, d = k.shape
    chunk = 1 << CHUNK_LEVELS
    runs = (n - 1) // chunk - done // chunk + 1
    args = (
        k, k.stride(0), k.stride(1), k.stride(2),
        tree, tree.stride(0), tree.stride(1), tree.stride(2),
        h, done, n, tree_capacity(tree), key0,
    )  # fmt: skip
    constants = dict(
        BK=config.block_size_k, D=d, D_PAD=max(16, triton.next_power_of_2(d)), TILE=TILE.value,
        OFFSET=tl.int64 if needs_int64(k, tree) else tl.int32,
        enable_fp_fusion=False,  # a GPU then rounds as the reference does (no fused multiply-adds)
    )  # fmt: skip
    if runs == 1:
        _extend_tree_kernel[(1, b * h)](*args, 0, ALL_LEVELS.value, CHUNKED=False, **constants)
        return
    _extend_tree_kernel[(runs, b * h)](*args, 0, CHUNK_LEVELS, CHUNKED=True, **constants)
    if done >> (CHUNK_LEVELS + 1) != n >> (CHUNK_LEVELS + 1):  # a node above the runs changed
        _extend_tree_kernel[(1, b * h)](
            *args, CHUNK_LEVELS + 1, ALL_LEVELS.value, CHUNKED=False, **constants
        )
