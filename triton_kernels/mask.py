"""Hierarchical mask estimation: the tree search of DESIGN.md section 3 inside one Triton
program per (batch, selection head, query block).

Reference: :func:`hip_attn.reference.estimate_mask_reference`.

How the tree is held in registers: the start partition has ``width = min(beam * G, N)`` nodes
and every level halves every node (a one-block node's left half is empty and its right half is
itself, which is the spec's "passes on as is"). A node at depth ``d`` is therefore named by an
id ``start_node << d | path`` whose ``d`` path bits say left (0) or right (1); its block range is
recomputed from the id on demand. Ranking packs ``(score, -id)`` into one int64 so a single
descending ``tl.topk`` ranks by score, ties going to the lower id, which is the lower block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hip_attn.config import HiPConfig
from hip_attn.geometry import first_candidate_block
from hip_attn.triton_kernels.dtypes import TL_DTYPES, dot_operand_dtype, needs_int64


@triton.jit
def _node_bounds(ids, depth, n, width, first):
    """Block range [lo, hi) of the nodes named ``ids`` at ``depth`` (see module docstring)."""
    start = (ids >> depth).to(tl.int64)
    lo = first + start * n // width
    hi = first + (start + 1) * n // width
    for t in range(depth):
        right = ((ids >> (depth - 1 - t)) & 1) == 1
        mid = lo + (hi - lo) // 2
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo, hi


@triton.jit
def _hip_mask_kernel(
    QP,
    stride_qp_b,
    stride_qp_h,
    stride_qp_t,  # pooled queries [B, Hq, TP, D]
    R,
    stride_r_b,
    stride_r_h,
    stride_r_n,  # block representatives [B, Hkv, NB, D], any float dtype
    NCAND,  # int64 [n_query_blocks]: candidate blocks N of each query block
    OUT,
    stride_o_b,
    stride_o_h,
    stride_o_q,  # int32 [B, H_sel, n_query_blocks, G]
    SCORED,  # int32 [B, H_sel, n_query_blocks]: children scored
    n_pooled,
    h_sel,
    first,
    beam_width,
    q_per_kv,
    HEADS_PER_SEL: tl.constexpr,
    ROWS: tl.constexpr,  # pooled rows per query block
    ROWS_PAD: tl.constexpr,  # ROWS padded for tl.dot (power of two >= 16)
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    G: tl.constexpr,
    NODES: tl.constexpr,  # beam * G padded to a power of two
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (16-bit inputs: tensor cores)
    OFFSET: tl.constexpr,  # int32, or int64 when the pooled queries span 2^31 elements
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // h_sel).to(OFFSET)
    hs = bh % h_sel
    n = tl.load(NCAND + qb).to(tl.int32)
    out = OUT + b * stride_o_b + hs * stride_o_h + qb * stride_o_q
    slots = tl.arange(0, NODES)

    width = tl.minimum(beam_width, n)
    ids = slots
    valid = slots < width
    scored = 0
    if n <= G:  # every candidate is selected, already in order
        blocks = tl.where(slots < n, first + slots, -1)
    else:
        # levels = max(1, ceil(log2(ceil(N / width)))), as hip_attn.geometry.search_levels
        largest = (n + width - 1) // width
        levels = 1
        while (1 << levels) < largest:
            levels += 1
        q_head0 = (hs * HEADS_PER_SEL).to(OFFSET)
        rep = R + b * stride_r_b + (q_head0 // q_per_kv) * stride_r_h
        rows = tl.arange(0, ROWS_PAD)
        dims = tl.arange(0, D_PAD)
        row_ok = (rows < ROWS) & (qb * ROWS + rows < n_pooled)
        pair = tl.arange(0, 2)
        invalid_key = tl.full([2 * NODES], 1, tl.int64) << 63  # below every real key
        for level in range(levels):
            depth = level + 1
            child = tl.reshape(ids[:, None] * 2 + pair[None, :], [2 * NODES])
            child_ok = tl.reshape(valid[:, None] & (pair[None, :] >= 0), [2 * NODES])
            lo, hi = _node_bounds(child, depth, n, width, first)
            child_ok = child_ok & (lo < hi)
            center = lo + (hi - lo) // 2
            keys = tl.load(
                rep + center[:, None] * stride_r_n + dims[None, :],
                mask=child_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            ).to(DOT_DTYPE)
            score = tl.full([2 * NODES], float("-inf"), tl.float32)
            for j in range(HEADS_PER_SEL):
                qp = tl.load(
                    QP
                    + b * stride_qp_b
                    + (q_head0 + j) * stride_qp_h
                    + (qb * ROWS + rows).to(OFFSET)[:, None] * stride_qp_t
                    + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < D),
                    other=0.0,
                ).to(DOT_DTYPE)
                dots = tl.dot(qp, tl.trans(keys), input_precision=PRECISION)
                dots = tl.where(row_ok[:, None], dots, float("-inf"))
                score = tl.maximum(score, tl.max(dots, axis=0))
            scored += tl.sum(child_ok.to(tl.int32))

            # order-preserving int32 image of the fp32 score, then (score, -id) in one int64
            bits = score.to(tl.int32, bitcast=True)
            bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - child).to(tl.int64)
            key = tl.where(child_ok, key, invalid_key)
            top = tl.topk(key, NODES)  # the NODES best children, best first
            keep = tl.where(level == levels - 1, G, width)
            valid = (slots < keep) & (top > (tl.full([NODES], 1, tl.int64) << 63))
            ids = (0x7FFFFFFF - (top & 0x7FFFFFFF)).to(tl.int32)
        lo, _ = _node_bounds(ids, levels, n, width, first)
        blocks = tl.sort(tl.where(valid, lo, 1 << 40), descending=False)
        blocks = tl.where(blocks == 1 << 40, -1, blocks).to(tl.int32)
    tl.store(out + slots, blocks.to(tl.int32), mask=slots < G)
    tl.store(SCORED + bh * tl.num_programs(0) + qb, scored)


def estimate_mask_triton(
    pooled: torch.Tensor,
    rep: torch.Tensor,
    n_candidates: torch.Tensor,
    config: HiPConfig,
    h_sel: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the search kernel. ``pooled``: ``[B, Hq, TP, D]`` pooled queries, ``rep``:
    ``[B, Hkv, NB, D]`` representatives, ``n_candidates``: int64 ``[n_query_blocks]``.
    Scores accumulate in fp32; when both inputs share a 16-bit dtype the products run on
    tensor cores (exact, as 16-bit products are), otherwise in fp32.
    Returns the selection ``[B, h_sel, n_query_blocks, G]`` (int32) and the children scored
    per program ``[B, h_sel, n_query_blocks]`` (int32)."""
    b, hq, n_pooled, d = pooled.shape
    hkv = rep.shape[1]
    g = config.blocks_per_query_block
    n_qb = n_candidates.numel()
    rows = config.block_size_q // config.query_pool_stride
    out = torch.empty((b, h_sel, n_qb, g), dtype=torch.int32, device=pooled.device)
    scored = torch.empty((b, h_sel, n_qb), dtype=torch.int32, device=pooled.device)
    if rep.stride(-1) != 1:
        rep = rep.contiguous()
    pooled = pooled.contiguous()
    dot_dtype = dot_operand_dtype(pooled.dtype if pooled.dtype == rep.dtype else torch.float32)
    _hip_mask_kernel[(n_qb, b * h_sel)](
        pooled,
        pooled.stride(0),
        pooled.stride(1),
        pooled.stride(2),
        rep,
        rep.stride(0),
        rep.stride(1),
        rep.stride(2),
        n_candidates,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        scored,
        n_pooled,
        h_sel,
        first_candidate_block(config),
        config.beam * g,
        hq // hkv,
        HEADS_PER_SEL=hq // h_sel,
        ROWS=rows,
        ROWS_PAD=max(16, triton.next_power_of_2(rows)),
        D=d,
        D_PAD=max(16, triton.next_power_of_2(d)),
        G=g,
        NODES=max(16, triton.next_power_of_2(config.beam * g)),
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        DOT_DTYPE=TL_DTYPES[dot_dtype],
        OFFSET=tl.int64 if needs_int64(pooled, rep) else tl.int32,
    )
    return out, scored
