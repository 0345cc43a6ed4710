"""Hierarchical mask estimation: the tree search of the reference inside one Triton program per
(batch, selection head, query block).

Reference: :func:`hip_attn.reference.estimate_mask_reference`.

How the tree is held in registers: a node is ``(lo, level)``, the aligned candidate-area blocks
``[lo, lo + 2**level)``; its summary (the mean of its keys, then one variance per dimension
pair ``(d, d + D/2)``, loaded once for each of the pair's dimensions) sits at row
``level_offset(level, capacity) + (lo >> level)`` of the summary tree
(:func:`hip_attn.geometry.level_offset`). Every level splits each
node into its two aligned halves (a one-block node has only itself), estimates each child's
largest logit for every pooled query row (``q . mean + spread(level) * sqrt(q**2 . var)``: two
tensor-core dots), turns each row's estimates into a softmax over the children (at
``scale * VOTE_SCALE``) and ranks the children by their largest probability over the rows.
Ranking packs ``(score, lower block first, level)`` into one int64 so a single descending
``tl.topk`` ranks them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    VOTE_SCALE,
    first_candidate_block,
    level_spreads,
    most_candidates,
    num_query_blocks,
    tree_blocks,
    tree_capacity,
)
from hip_attn.triton_kernels.dtypes import (
    TL_DTYPES,
    dot_operand_dtype,
    needs_int64,
    round_to,
    saturate,
)
from hip_attn.triton_kernels.lengths import count_stride, keys_in_use, refresh_due
from hip_attn.triton_kernels.scratch import scratch_tensor
from hip_attn.triton_kernels.tree import (
    ALL_LEVELS,
    TILE,
    check_extension,
    extend_tree,
    extend_tree_triton,
    level_offset,
)


@triton.jit
def _pooled_rows(
    q, stride_q_h, stride_q_t, qb, tq, tile, dims, BLOCK_Q, STRIDE, ROWS, ROW_TILE, HEADS, D,
    D_PAD, OFFSET,
):  # fmt: skip
    """Tile ``tile`` (``ROW_TILE`` rows) of query block ``qb``'s pooled rows of ``HEADS`` heads
    (``q`` points at the first), stacked head by head (row ``r`` is row ``r % ROWS`` of head
    ``r // ROWS``: a decode step's one row per head shares one tile), in fp32, and its row
    mask: as :func:`hip_attn.geometry.pool_queries` pools, an fp32 sum in row order divided by
    the rows present, rounded once to q's dtype."""
    stacked = tile * ROW_TILE + tl.arange(0, ROW_TILE)
    head = stacked // ROWS
    first_row = qb * BLOCK_Q + (stacked % ROWS) * STRIDE
    row_ok = (head < HEADS) & (first_row < tq)
    head_off = head.to(OFFSET) * stride_q_h
    total = tl.zeros([ROW_TILE, D_PAD], tl.float32)
    for i in tl.static_range(STRIDE):
        t = first_row + i
        total += tl.load(
            q + (head_off + t.to(OFFSET) * stride_q_t)[:, None] + dims[None, :],
            mask=(row_ok & (t < tq))[:, None] & (dims[None, :] < D),
            other=0.0,
        ).to(tl.float32)
    present = tl.minimum(STRIDE, tq - first_row).to(tl.float32)
    pooled = round_to(total / tl.where(row_ok, present, 1.0)[:, None], q.dtype.element_ty)
    return pooled, row_ok


@triton.jit
def _row_votes(best, child_ok, row_ok, scale):
    """Each row's softmax over the children of its estimates ``best`` ``[rows, children]``,
    its largest over the rows present: each child's vote (see the reference). Votes of row
    tiles combine by ``tl.maximum``; they are >= 0, so a zero start is neutral."""
    best = tl.where(child_ok[None, :], best, float("-inf"))
    p = tl.exp((best - tl.max(best, axis=1)[:, None]) * scale)
    p = p / tl.sum(p, axis=1)[:, None]
    return tl.max(tl.where(row_ok[:, None], p, 0.0), axis=0)


@triton.jit
def _children(lo, lvl, valid, NODES: tl.constexpr):
    """The ``2 * NODES`` children of nodes ``(lo, lvl)``: each node's two aligned halves (a
    one-block node has only itself), as ``(lo, level, present)``."""
    pair = tl.arange(0, 2)
    c_lvl = tl.reshape(tl.maximum(lvl - 1, 0)[:, None] + pair[None, :] * 0, [2 * NODES])
    c_lo = tl.reshape(
        lo[:, None] + pair[None, :] * tl.where(lvl > 0, 1 << tl.maximum(lvl - 1, 0), 0)[:, None],
        [2 * NODES],
    )
    child_ok = tl.reshape(valid[:, None] & ((pair[None, :] == 0) | (lvl[:, None] > 0)),
                          [2 * NODES])  # fmt: skip
    return c_lo, c_lvl, child_ok


@triton.jit
def _leaf_votes(
    q_head,
    stride_q_h,
    stride_q_t,
    qb,
    tq,
    leaf_keys,
    key_row,
    stride_k_t,
    child_ok,
    dims,
    scale,
    BLOCK_Q,
    STRIDE,
    ROWS,
    ROW_TILE,
    ROW_TILES,
    HEADS_PER_SEL,
    BK,
    D,
    D_PAD,
    NODES,
    PRECISION,
    DOT_DTYPE,
    OFFSET,
):
    """The children's share of the vote when each row ranks single blocks by its largest logit
    over their keys (``key_row``: each child's first key, an offset from ``leaf_keys``)."""
    load_ok = child_ok[:, None] & (dims[None, :] < D)
    score = tl.zeros([2 * NODES], tl.float32)
    for t in range(ROW_TILES):
        qp, row_ok = _pooled_rows(
            q_head, stride_q_h, stride_q_t, qb, tq, t, dims, BLOCK_Q, STRIDE, ROWS, ROW_TILE,
            HEADS_PER_SEL, D, D_PAD, OFFSET,
        )  # fmt: skip
        # each row's largest logit over the block's keys, one key at a time
        best = tl.full([ROW_TILE, 2 * NODES], float("-inf"), tl.float32)
        for i in range(BK):
            key = tl.load(leaf_keys + (key_row + i * stride_k_t)[:, None] + dims[None, :],
                          mask=load_ok, other=0.0)  # fmt: skip
            logit = tl.dot(qp.to(DOT_DTYPE), tl.trans(key.to(DOT_DTYPE)),
                           input_precision=PRECISION)  # fmt: skip
            best = tl.maximum(best, logit)
        score = tl.maximum(score, _row_votes(best, child_ok, row_ok, scale))
    return score


@triton.jit
def _ranked(score, c_lo, c_lvl, child_ok, keep, NODES: tl.constexpr):
    """The ``keep`` best children by ``score`` (ties: the lower block first) as ``NODES`` slots
    ``(lo, level, valid)``, best first. ``(score, lower block first, level)`` pack into one
    int64 (26 bits of node start: 64M candidate blocks); scores are >= 0, so their fp32 bits
    order as integers."""
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (
        (((0x3FFFFFF - c_lo) << 5) | c_lvl).to(tl.int64)
    )
    key = tl.where(child_ok, key, tl.full([2 * NODES], 1, tl.int64) << 63)  # below every key
    best = tl.topk(key, NODES)
    valid = (tl.arange(0, NODES) < keep) & (best > (tl.full([NODES], 1, tl.int64) << 63))
    lo = (0x3FFFFFF - ((best >> 5) & 0x3FFFFFF)).to(tl.int32)
    lvl = (best & 31).to(tl.int32)
    return lo, lvl, valid


@triton.jit
def _hip_mask_kernel(
    Q,
    stride_q_b,
    stride_q_h,
    stride_q_t,  # queries [B, Hq, Tq, D], pooled here
    S,
    stride_s_b,
    stride_s_h,
    stride_s_n,  # node summaries [B, Hkv, tree_rows(capacity), 1.5 * D]: mean, pair variances
    SPREADS,  # fp32 [MAX_LEVELS]: hip_attn.geometry.level_spreads
    OUT,
    stride_o_b,
    stride_o_h,
    stride_o_q,  # int32 [B, H_sel, n_query_blocks, G]
    SCORED,  # int32 [B, H_sel, n_query_blocks]: children scored
    K,
    stride_k_b,
    stride_k_h,
    stride_k_t,  # with EXTEND or EXACT_LEAVES: the keys [B, Hkv, Tk, D] the tree summarizes
    # (with EXTEND, its blocks after `done` join the tree); with LEAVES_IN, the block
    # cache's slots [B, Hkv, slots * BK, D]
    done,  # blocks the tree holds; with ON_DEVICE: int32 [B, Hkv] in device memory, updated
    anchor,  # with ON_DEVICE: int32 in device memory, one per count of tk, see refresh_due
    interval,
    CAND,
    stride_c_b,
    stride_c_h,
    stride_c_q,  # int32 [B, H_sel, n_query_blocks, 2 * NODES]: the last level's children,
    # written with CANDIDATES_OUT, read with LEAVES_IN (-1 padded)
    TABLE,
    stride_tab,  # with LEAVES_IN: int32 [B * Hkv, blocks], the slot in K holding each block
    qb0,  # the first query block of this launch
    zero,  # 0, a value the compiler does not know (see RELOAD_VARIANCES)
    h_sel,
    tq,
    tk,
    stride_tk,  # with ON_DEVICE: 0 for one count shared by the batch, 1 for one per sequence
    window,
    first,
    beam_width,
    q_per_kv,
    capacity,
    scale,
    BLOCK_Q: tl.constexpr,  # block_size_q
    BK: tl.constexpr,  # block_size_k
    HEADS_PER_SEL: tl.constexpr,
    STRIDE: tl.constexpr,  # query_pool_stride
    ROWS: tl.constexpr,  # pooled rows per head of a query block (a power of two)
    ROW_TILE: tl.constexpr,  # pooled rows scored at a time (power of two >= 16, for tl.dot)
    ROW_TILES: tl.constexpr,  # tiles covering the HEADS_PER_SEL * ROWS stacked rows
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    G: tl.constexpr,
    NODES: tl.constexpr,  # the search width bound (beam * G, >= 32) padded to a power of two
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (16-bit inputs: tensor cores)
    OFFSET: tl.constexpr,  # int32, or int64 when the queries span 2^31 elements
    EXTEND: tl.constexpr,  # a last column of programs summarizes the new key blocks
    ON_DEVICE: tl.constexpr,  # a decode step reading tk (and done) from device memory, which
    # searches only when refresh_due says so and leaves the selection in place otherwise
    EXACT_LEAVES: tl.constexpr,  # leaf_scores="keys": the last level reads the blocks' keys
    CANDIDATES_OUT: tl.constexpr,  # stop before the last level, writing its children to CAND
    LEAVES_IN: tl.constexpr,  # rank only the children in CAND, by their keys through TABLE
    # load the children's variances once per row tile instead of once per level: loaded once
    # per level they sit in shared memory beside the means ([2 * NODES, D] each, 128 KB
    # together at beam 2, G 64, D 128 in 16 bits: more than sm_86/sm_89/sm_120 have); reloaded,
    # only the means stay
    RELOAD_VARIANCES: tl.constexpr,
):
    bh = tl.program_id(1)
    # the launch's last column summarizes the blocks completed since `done` into the tree,
    # one program per (batch, KV head), every step, beside the search: the search reads only
    # nodes the tree held before (its candidates end at or before `done`, see extends_beside)
    # and this writes only nodes after them
    if EXTEND and tl.program_id(0) == tl.num_programs(0) - 1:
        hkv = h_sel * HEADS_PER_SEL // q_per_kv
        if bh < tl.num_programs(1) // h_sel * hkv:  # rows (b, kv), b * Hkv + kv of done
            b = (bh // hkv).to(OFFSET)
            kv = (bh % hkv).to(OFFSET)
            n_tree = tl.maximum(keys_in_use(tk, ON_DEVICE, b * stride_tk) // BK - first, 0)
            n_tree = tl.minimum(n_tree, capacity)  # a count past the buffer writes no further
            extend_tree(K + b * stride_k_b + kv * stride_k_h, stride_k_t,
                        S + b * stride_s_b + kv * stride_s_h, stride_s_n,
                        keys_in_use(done, ON_DEVICE, bh), n_tree, capacity, first * BK, b * 0,
                        0, ALL_LEVELS, BK, D, D_PAD, TILE)  # fmt: skip
            if ON_DEVICE:
                tl.store(done + bh, n_tree)
        return
    qb = qb0 + tl.program_id(0)
    b = (bh // h_sel).to(OFFSET)
    hs = bh % h_sel
    tk = keys_in_use(tk, ON_DEVICE, b * stride_tk)
    if ON_DEVICE:  # noqa: SIM102 (one `and` would compile refresh_due without a pointer)
        if not refresh_due(tk, anchor + b * stride_tk, interval):
            return
    # hip_attn.geometry.query_blocks: the candidates end at the block boundary at or before
    # s - window (s: the block's first query) and start after the sinks
    n = tl.maximum((tl.maximum(tk - tq + qb * BLOCK_Q - window, 0) // BK) - first, 0)
    out = OUT + b * stride_o_b + hs * stride_o_h + qb * stride_o_q
    slots = tl.arange(0, NODES)

    scored = 0
    cand = CAND + b * stride_c_b + hs * stride_c_h + qb * stride_c_q
    pairs = tl.arange(0, 2 * NODES)
    if n <= G:  # every candidate is selected, already in order
        blocks = tl.where(slots < n, first + slots, -1)
        if CANDIDATES_OUT:  # nothing to rank
            tl.store(cand + pairs, tl.full([2 * NODES], -1, tl.int32))
    else:
        q_head0 = (hs * HEADS_PER_SEL).to(OFFSET)
        q_head = Q + b * stride_q_b + q_head0 * stride_q_h
        kv = q_head0 // q_per_kv
        summ = S + b * stride_s_b + kv * stride_s_h
        leaf_keys = K + b * stride_k_b + kv * stride_k_h
        dims = tl.arange(0, D_PAD)
        if LEAVES_IN:  # the children the CANDIDATES_OUT launch wrote, their keys in the cache
            c_lo = tl.load(cand + pairs) - first
            child_ok = c_lo >= 0
            hkv = h_sel * HEADS_PER_SEL // q_per_kv
            slot = tl.load(TABLE + (b * hkv + kv) * stride_tab + first + c_lo, mask=child_ok,
                           other=0)  # fmt: skip
            score = _leaf_votes(
                q_head, stride_q_h, stride_q_t, qb, tq, leaf_keys,
                (slot * BK).to(OFFSET) * stride_k_t, stride_k_t, child_ok, dims, scale, BLOCK_Q,
                STRIDE, ROWS, ROW_TILE, ROW_TILES, HEADS_PER_SEL, BK, D, D_PAD, NODES, PRECISION,
                DOT_DTYPE, OFFSET,
            )  # fmt: skip
            scored += tl.sum(child_ok.to(tl.int32))
            lo, lvl, valid = _ranked(score, c_lo, c_lo * 0, child_ok, G, NODES)
        else:
            # hip_attn.geometry.search_width, then start_level: complete 2**top nodes, then the
            # remainder's set bits, largest first
            bits = 0
            rest = n
            while rest > 0:
                bits += rest & 1
                rest = rest >> 1
            width = tl.minimum(tl.maximum(beam_width, bits), n)
            top = 0
            pieces = 0
            while (n >> top) + pieces > width:
                pieces += (n >> top) & 1
                top += 1
            full = n >> top
            lo = slots << top
            lvl = tl.full([NODES], 0, tl.int32) + top
            start = full << top
            piece = 0
            for i in range(top):
                bit = top - 1 - i
                has = (n >> bit) & 1
                hit = (slots - full == piece) & (has == 1)
                lo = tl.where(hit, start, lo)
                lvl = tl.where(hit, bit, lvl)
                start += has << bit
                piece += has
            valid = slots < full + piece
            levels = tl.maximum(top, 1)
            for level in range(levels - CANDIDATES_OUT):
                c_lo, c_lvl, child_ok = _children(lo, lvl, valid, NODES)
                node = (level_offset(c_lvl, capacity) + (c_lo >> c_lvl)).to(OFFSET)
                leaves = False
                if EXACT_LEAVES:  # the last level's children are single blocks (search_levels)
                    leaves = level == levels - 1
                # ROW_TILE of the group's (head, row) pairs at a time (each row's softmax is its
                # own): a tile of every row of the group's heads needs 257 KB of shared memory
                # for Llama-8B shapes on sm_90 (hip-attn aot). Two branches, so that the
                # summaries are not held in registers while the leaves' keys are scored.
                if leaves:
                    score = _leaf_votes(
                        q_head, stride_q_h, stride_q_t, qb, tq, leaf_keys,
                        ((first + c_lo) * BK).to(OFFSET) * stride_k_t, stride_k_t, child_ok,
                        dims, scale, BLOCK_Q, STRIDE, ROWS, ROW_TILE, ROW_TILES, HEADS_PER_SEL,
                        BK, D, D_PAD, NODES, PRECISION, DOT_DTYPE, OFFSET,
                    )  # fmt: skip
                else:
                    load_ok = child_ok[:, None] & (dims[None, :] < D)
                    row_ptr = summ + node[:, None] * stride_s_n + dims[None, :]
                    k_mean = tl.load(row_ptr, mask=load_ok, other=0.0).to(DOT_DTYPE)
                    # a pair's variance serves both of its dimensions (d, d + D/2)
                    var_ptr = summ + node[:, None] * stride_s_n + D + (dims % (D // 2))[None, :]
                    if not RELOAD_VARIANCES:
                        k_var = tl.load(var_ptr, mask=load_ok, other=0.0).to(DOT_DTYPE)
                    spread = tl.load(SPREADS + c_lvl)
                    score = tl.zeros([2 * NODES], tl.float32)
                    # from `zero`: a loop the compiler keeps when ROW_TILES is 1 (a decode
                    # step's group in one tile); without it, the summaries moved from shared
                    # memory into registers and spilled on sm_90 (hip-attn aot)
                    for t in range(zero, ROW_TILES):
                        qp, row_ok = _pooled_rows(
                            q_head, stride_q_h, stride_q_t, qb, tq, t, dims, BLOCK_Q, STRIDE,
                            ROWS, ROW_TILE, HEADS_PER_SEL, D, D_PAD, OFFSET,
                        )  # fmt: skip
                        # squares rounded to q's dtype, as the reference rounds them: 16-bit
                        # operands
                        sq = round_to(saturate(qp * qp, Q.dtype.element_ty), Q.dtype.element_ty)
                        if RELOAD_VARIANCES:  # `t * zero`: an address the compiler cannot hoist
                            k_var = tl.load(var_ptr + t * zero, mask=load_ok,
                                            other=0.0).to(DOT_DTYPE)  # fmt: skip
                        var = tl.dot(sq.to(DOT_DTYPE), tl.trans(k_var), input_precision=PRECISION)
                        best = tl.dot(qp.to(DOT_DTYPE), tl.trans(k_mean),
                                      input_precision=PRECISION)  # fmt: skip
                        best = best + spread[None, :] * tl.sqrt_rn(var)
                        score = tl.maximum(score, _row_votes(best, child_ok, row_ok, scale))
                scored += tl.sum(child_ok.to(tl.int32))
                keep = tl.where(level == levels - 1, G, width)
                lo, lvl, valid = _ranked(score, c_lo, c_lvl, child_ok, keep, NODES)
            if CANDIDATES_OUT:  # the last level's children: single blocks (search_levels)
                c_lo, _, child_ok = _children(lo, lvl, valid, NODES)
                tl.store(cand + pairs, tl.where(child_ok, first + c_lo, -1))
        blocks = tl.sort(tl.where(valid, first + lo, 1 << 30), descending=False)
        blocks = tl.where(blocks == 1 << 30, -1, blocks)
    if not CANDIDATES_OUT:
        tl.store(out + slots, blocks.to(tl.int32), mask=slots < G)
    tl.store(SCORED + bh * tl.cdiv(tq, BLOCK_Q) + qb, scored)


def estimate_mask_triton(
    q: torch.Tensor,
    tree: torch.Tensor,
    tk: int,
    config: HiPConfig,
    h_sel: int,
    scale: float,
    *,
    keys: torch.Tensor | None = None,
    done: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the search kernel for queries ``q`` ``[B, Hq, Tq, D]`` (pooled inside the kernel,
    as :func:`hip_attn.geometry.pool_queries` pools them) over the ``[B, Hkv, rows, 1.5 * D]``
    summary tree ``tree`` (:func:`hip_attn.geometry.node_summaries`) of ``tk`` keys; the kernel
    derives each query block's candidates from ``Tq`` and ``tk``
    (:func:`hip_attn.geometry.query_blocks`). Bounds accumulate in fp32; when both inputs
    share a 16-bit dtype the products run on tensor cores (exact, as 16-bit products are),
    otherwise in fp32.
    With ``keys`` (the ``[B, Hkv, >= tk, D]`` keys of a tree whose first ``done`` blocks are
    summarized, a decode refresh; only the first ``tk`` are read), the blocks completed since
    are summarized into ``tree`` (:func:`~hip_attn.triton_kernels.tree.extend_tree_triton`):
    in this launch, beside the search, where :func:`extends_beside` (one query block whose
    candidates the tree holds already), else by a launch before it. With
    ``leaf_scores="keys"`` the last level reads the candidate blocks' keys: ``keys`` is required
    (``done`` = the tree's blocks when it is complete).
    Returns the selection ``[B, h_sel, n_query_blocks, G]`` (int32) and the children scored
    per program ``[B, h_sel, n_query_blocks]`` (int32)."""
    b, _, tq, _ = q.shape
    n_qb = num_query_blocks(tq, config)
    out = torch.empty((b, h_sel, n_qb, config.blocks_per_query_block), dtype=torch.int32,
                      device=q.device)  # fmt: skip
    exact = config.leaf_scores == "keys"
    if exact and keys is None:
        raise ValueError("leaf_scores='keys' ranks the last level by the blocks' keys: pass keys=")
    if keys is not None:  # the tree covers the first tk keys; the leaves read nothing past them
        if keys.shape[2] < tk:
            raise ValueError(f"keys has {keys.shape[2]} keys, fewer than tk={tk}")
        keys = keys[:, :, :tk]
    extend = keys is not None and check_extension(tree, keys, done, config) > done
    beside = extend and extends_beside(tq, tk, done, config)
    if extend and not beside:
        extend_tree_triton(tree, keys, done, config)
    if tree.stride(-1) != 1:
        tree = tree.contiguous()
    k_args = (
        (keys, *keys.stride()[:3], done)
        if keys is not None and (beside or exact)
        else (tree, 0, 0, 0, 0)
    )
    scored = _launch(q, tree, tk, out, k_args, (0, 1), config, scale, beside, on_device=False)
    return out, scored


def leaf_candidates_triton(
    q: torch.Tensor, tree: torch.Tensor, tk: int, config: HiPConfig, h_sel: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step of a ``leaf_scores="keys"`` search whose keys are not on the device (the
    offloaded path): the search of :func:`estimate_mask_triton` up to its last level, returning
    that level's children ``[B, h_sel, n_query_blocks, C]`` (int32 key blocks, ``-1`` padded;
    all ``-1`` where a query block selects every candidate without a search) and the children
    scored so far. Their keys are what :func:`rank_leaves_triton` reads."""
    if tree.stride(-1) != 1:
        tree = tree.contiguous()
    b, n_qb = q.shape[0], num_query_blocks(q.shape[2], config)
    cand = torch.empty((b, h_sel, n_qb, 2 * _nodes(config)), dtype=torch.int32, device=q.device)
    out = torch.empty(
        (b, h_sel, n_qb, config.blocks_per_query_block), dtype=torch.int32, device=q.device
    )  # its shape sets the launch; not written
    scored = _launch(q, tree, tk, out, (tree, 0, 0, 0, 0), (0, 1), config, scale, False,
                     on_device=False, leaves=(cand, None, None))  # fmt: skip
    return cand, scored


def rank_leaves_triton(
    q: torch.Tensor,
    candidates: torch.Tensor,
    keys: torch.Tensor,
    table: torch.Tensor,
    tk: int,
    config: HiPConfig,
    scale: float,
    out: torch.Tensor,
    query_blocks: range | None = None,
) -> torch.Tensor:
    """The second step: rank :func:`leaf_candidates_triton`'s ``candidates`` by their keys and
    write the selection of ``query_blocks`` (all by default) into ``out`` ``[B, h_sel,
    n_query_blocks, G]``, as :func:`estimate_mask_triton` selects with every key on the device.
    ``keys`` ``[B, Hkv, slots * block_size_k, D]`` holds block ``j`` of row ``(b, h)`` at slot
    ``table[b * Hkv + h, j]`` (a :class:`~hip_attn.offload.BlockCache`); every candidate of the
    launched query blocks must be resident. Returns the children scored ``[B, h_sel, n_qb]``
    (zero outside ``query_blocks``)."""
    n_qb = num_query_blocks(q.shape[2], config)
    blocks = range(n_qb) if query_blocks is None else query_blocks
    if keys.stride(-1) != 1 or table.stride(-1) != 1:
        raise ValueError("keys and table need unit stride in their last dimension")
    k_args = (keys, *keys.stride()[:3], 0)
    # the tree is not read: the children come from `candidates`
    return _launch(q, keys, tk, out, k_args, (0, 1), config, scale, False, on_device=False,
                   leaves=(candidates, table, blocks))  # fmt: skip


def extends_beside(tq: int, tk: int, done: int, config: HiPConfig) -> bool:
    """Whether the search launch can summarize the blocks completed since the tree's ``done``
    in a column of programs of its own, beside the search programs: ``tq`` queries make one
    query block whose candidates end at or before those ``done`` blocks (a decode refresh
    within ``window`` tokens of the last one), so the search reads none of the nodes the
    extension writes (those ending after ``done``). A device decode step always can: it
    extends the tree at every step."""
    return num_query_blocks(tq, config) == 1 and most_candidates(tq, tk, config) <= done


def decode_search_triton(
    q: torch.Tensor,
    tree: torch.Tensor,
    keys: torch.Tensor,
    tk: torch.Tensor,
    done: torch.Tensor,
    anchor: torch.Tensor,
    config: HiPConfig,
    scale: float,
    out: torch.Tensor,
    scratch: dict[str, torch.Tensor] | None = None,
) -> None:
    """One decode step's search with every length in device memory, so that its launches do not
    depend on the step (a CUDA graph replays them): ``tk`` (int32, one element) keys of the
    ``[B, Hkv, capacity, D]`` buffer ``keys`` are in use, or with ``tk`` and ``anchor`` of
    ``B`` elements, ``tk[b]`` of sequence ``b``'s; ``tree`` (room for the buffer's blocks)
    holds ``done[b, h]`` (int32 ``[B, Hkv]``) blocks of each row. One launch: at every step a
    column of its programs summarizes the blocks completed since into ``tree`` (updating
    ``done``; the tree then holds the candidates of the next step, see
    :func:`extends_beside`); when ``refresh_due`` (the first step after ``anchor`` keys and
    every ``refresh_interval`` steps after) the others write the selection of the one-token
    ``q`` into ``out`` (``[B, H_sel, 1, G]``, ``-1`` padded), otherwise they return at once and
    leave it as it is. The count must grow by at most ``window`` keys from one step to the next
    (one token a step does): the search reads the nodes of the blocks before its candidates'
    end, which the steps before summarized, while the extension writes the nodes after them.
    ``scratch`` keeps the kernel's counters between steps
    (:func:`~hip_attn.triton_kernels.scratch.scratch_tensor`). Reference: the host-side rule of
    :class:`hip_attn.HiPDecodeState` with :func:`estimate_mask_triton`."""
    b = tree.shape[0]
    h_sel = out.shape[1]
    if q.shape[2] != 1 or tuple(out.shape) != (b, h_sel, 1, config.blocks_per_query_block):
        raise ValueError(
            f"a device decode step takes one query token and a [B, H_sel, 1, G] selection; got "
            f"q {tuple(q.shape)}, out {tuple(out.shape)}"
        )
    if tree_capacity(tree) < tree_blocks(keys.shape[2], config) or tree.stride(-1) != 1:
        raise ValueError("the tree needs room for every block of the key buffer, unit stride")
    if anchor.numel() != tk.numel() or count_stride(anchor, b) != count_stride(tk, b):
        raise ValueError(f"anchor must hold one phase per count of tk ({tk.numel()}), laid out "
                         f"as tk; got {anchor.numel()}")  # fmt: skip
    k_args = (keys, *keys.stride()[:3], done)
    _launch(q, tree, tk, out, k_args, (anchor, config.refresh_interval), config, scale, True,
            on_device=True, scratch=scratch)  # fmt: skip


#: Elements of the search's ``[rows, children]`` fp32 score tiles (see ``_launch``).
MAX_TILE = 4096

#: Search kernel variants (device, input dtypes, launch constants) with 16-bit operands that
#: needed more shared memory than their device has: they launch with
#: :func:`reloading_variances` (``hip-attn aot --arch 89 --quick``: the defaults' search at
#: D = 128 takes 80 KB instead of 132 KB in bf16).
_RELOADING: set[tuple[object, ...]] = set()


@functools.cache  # never evicted: a captured graph may point at it
def _spread_table(block_size_k: int, device: torch.device) -> torch.Tensor:
    """:func:`~hip_attn.geometry.level_spreads` on ``device``, allocated once (a captured
    decode step must not allocate)."""
    return torch.tensor(level_spreads(block_size_k), dtype=torch.float32, device=device)


def reloading_variances(meta: dict[str, object]) -> dict[str, object] | None:
    """The search's launch constants ``meta`` for a device whose shared memory does not hold
    them: the variances reloaded per row tile (80 KB on sm_89 at beam 2, G 64, D 128, in the
    search's one stage: two would double-buffer the reloaded operand). ``None`` for fp32
    operands, which reloaded take more shared memory, not less."""
    if str(meta["DOT_DTYPE"]) == "fp32":
        return None
    return {**meta, "RELOAD_VARIANCES": True}


def _reload_key(q: torch.Tensor, tree: torch.Tensor, meta: dict[str, object]) -> tuple[object, ...]:
    """What :data:`_RELOADING` remembers a refused launch by."""
    return (q.device, q.dtype, tree.dtype, *map(str, meta.values()))


def _nodes(config: HiPConfig) -> int:
    """The search width bound ``beam * G`` padded to a power of two, at least 32 (the search
    keeps at least as many nodes as N has set bits)."""
    return max(32, triton.next_power_of_2(config.beam * config.blocks_per_query_block))


def _launch(
    q: torch.Tensor,
    tree: torch.Tensor,
    tk: int | torch.Tensor,
    out: torch.Tensor,
    k_args: tuple[object, ...],
    gate: tuple[object, int],
    config: HiPConfig,
    scale: float,
    extend: bool,
    *,
    on_device: bool,
    scratch: dict[str, torch.Tensor] | None = None,
    leaves: tuple[torch.Tensor, torch.Tensor | None, range | None] | None = None,
) -> torch.Tensor:
    """The search kernel over ``q``'s query blocks into ``out``; returns the children scored.
    ``leaves`` splits a search whose leaves' keys are not on the device in two launches:
    ``(candidates, None, None)`` writes the last level's children into ``candidates``,
    ``(candidates, table, query_blocks)`` ranks them by the keys ``k_args`` holds at the slots
    ``table`` names (``tree`` then only sets the KV heads)."""
    b, hq, tq, d = q.shape
    hkv = tree.shape[1]
    h_sel, n_qb, g = out.shape[1:]
    # pooled rows a head of a query block has at most (fewer in one short block: a decode
    # step's one), to a power of two so that short chunks share few compiled variants
    rows = min(
        triton.next_power_of_2(-(-min(tq, config.block_size_q) // config.query_pool_stride)),
        config.block_size_q // config.query_pool_stride,
    )
    stacked = hq // h_sel * rows  # the group's heads' rows, one after another
    scored = scratch_tensor(scratch, "scored", (b, h_sel, n_qb), torch.int32, q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    dot_dtype = dot_operand_dtype(q.dtype if q.dtype == tree.dtype else torch.float32)
    nodes = _nodes(config)
    # [rows, children] fp32 tiles of at most 4,096 elements (16 x 256 with the defaults, the
    # lighter search's 32 x 128): more rows take several tiles instead of spilling
    row_tile = max(16, min(triton.next_power_of_2(stacked), MAX_TILE // (2 * nodes)))
    cand, table, blocks = leaves if leaves is not None else (out, None, None)
    if blocks is not None and len(blocks) < n_qb:
        scored.zero_()
    launched = range(n_qb) if blocks is None else blocks
    args = (
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        tree,
        tree.stride(0),
        tree.stride(1),
        tree.stride(2),
        _spread_table(config.block_size_k, q.device),
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        scored,
        *k_args,
        *gate,
        cand,
        cand.stride(0),
        cand.stride(1),
        cand.stride(2),
        out if table is None else table,
        0 if table is None else table.stride(0),
        launched.start,
        0,  # zero
        h_sel,
        tq,
        tk,
        count_stride(tk, b),
        config.window,
        first_candidate_block(config),
        config.beam * g,
        hq // hkv,
        tree_capacity(tree),
        scale * VOTE_SCALE,  # the votes' softmax scale (the reference's)
    )
    meta = dict(
        BLOCK_Q=config.block_size_q,
        BK=config.block_size_k,
        HEADS_PER_SEL=hq // h_sel,
        STRIDE=config.query_pool_stride,
        ROWS=rows,
        ROW_TILE=row_tile,
        ROW_TILES=-(-stacked // row_tile),
        D=d,
        D_PAD=max(16, triton.next_power_of_2(d)),
        G=g,
        NODES=nodes,
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        DOT_DTYPE=TL_DTYPES[dot_dtype],
        OFFSET=tl.int64 if needs_int64(q, tree, k_args[0]) else tl.int32,  # type: ignore[arg-type]
        EXTEND=extend,
        ON_DEVICE=on_device,
        EXACT_LEAVES=config.leaf_scores == "keys",
        CANDIDATES_OUT=leaves is not None and table is None,
        LEAVES_IN=table is not None,
        num_warps=8,
        # 16-bit operands in 1 stage: a level's loads wait for the last level's ranking,
        # nothing to pipeline, and 2 spilled 8-32 bytes in decode once a group's rows shared a
        # tile (1: 229 registers, no stack); fp32 in 2 (1 takes 272 KB of shared memory at
        # D = 128, over sm_90's 227; 2: 152 KB; hip-attn aot). Beam 2 at G = 64 in 16 bits
        # needs 132-136 KB at D = 128, its [2 * NODES, D] means and variances: where a device
        # has less (sm_89's 99 KB), the launch is refused and runs reloading_variances
        num_stages=2 if dot_dtype == torch.float32 else 1,
        # no fused multiply-adds: the summaries it extends and its estimates round as the
        # reference's, so a GPU selects the blocks the reference and the offloaded path select
        enable_fp_fusion=False,
        RELOAD_VARIANCES=False,
    )
    grid = (len(launched) + extend, b * h_sel)  # the extension's column last
    # nothing more on the way of a launch no device refused (never on H100/H200)
    if not (_RELOADING and _reload_key(q, tree, meta) in _RELOADING):
        try:
            _hip_mask_kernel[grid](*args, **meta)
            return scored
        except OutOfResources:  # refused before it ran: nothing was written
            if reloading_variances(meta) is None:
                raise
            _RELOADING.add(_reload_key(q, tree, meta))
    reload = reloading_variances(meta)
    assert reload is not None  # only 16-bit launches are remembered
    _hip_mask_kernel[grid](*args, **reload)
    return scored
