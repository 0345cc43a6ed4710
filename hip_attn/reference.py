"""Readable PyTorch references: the specification the Triton kernels copy.

Everything here follows DESIGN.md section 3 literally, one query block at a time, in fp32.
It is slow on purpose; tests compare the kernels against it on fresh random inputs, and it is
the fallback when neither CUDA nor the Triton interpreter is available.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from einops import repeat

from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    first_candidate_block,
    level_offset,
    level_spreads,
    node_summaries,
    pool_queries,
    query_blocks,
    saturated,
    search_levels,
    search_width,
    selection_config,
    start_level,
    tree_capacity,
    vote_shares,
)


@dataclass
class SearchStats:
    """Work done by the mask search, per ``[B, H_sel, n_query_blocks]``.

    ``scored`` counts children scored: each costs one node summary read and one estimate (two
    dot products of length ``D``) per pooled query row (and per query head of the group with
    ``head_sharing="kv_group"``); with ``leaf_scores="keys"`` a child of the last level costs
    its ``block_size_k`` keys read and as many dot products per row instead.
    ``n_candidates`` is N, the candidate blocks each search ran over.
    """

    scored: torch.Tensor
    n_candidates: torch.Tensor


def dense_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Exact causal attention; query ``i`` sits at absolute position ``Tk - Tq + i``."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    # query head h reads KV head h // group
    kf = repeat(k.float(), "b h t d -> b (h g) t d", g=group)
    vf = repeat(v.float(), "b h t d -> b (h g) t d", g=group)
    scores = q.float() @ kf.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
    scores = scores.masked_fill(torch.arange(tk, device=q.device)[None, :] > qpos, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


def _start_nodes(n: int, width: int) -> list[tuple[int, int]]:
    """The search's start partition of candidate blocks ``[0, n)`` as ``(first block, level)``
    aligned nodes: the complete ``2**L0``-block nodes, then the remainder's pieces, largest
    first (:func:`~hip_attn.geometry.start_level`)."""
    top = start_level(n, width)
    nodes = [(i << top, top) for i in range(n >> top)]
    lo = (n >> top) << top
    for level in reversed(range(top)):
        if n >> level & 1:
            nodes.append((lo, level))
            lo += 1 << level
    return nodes


@functools.cache
def _spreads(block_size_k: int, device: torch.device) -> torch.Tensor:
    """:func:`~hip_attn.geometry.level_spreads` as a tensor on ``device``, built once."""
    return torch.tensor(level_spreads(block_size_k), dtype=torch.float32, device=device)


def _search_one_block(
    rows: torch.Tensor,
    squares: torch.Tensor,
    tree: torch.Tensor,
    n: int,
    config: HiPConfig,
    scale: float,
    keys: torch.Tensor | None = None,
) -> tuple[list[int], int]:
    """The tree search for one query block. ``rows`` holds its pooled query rows ``[P, D]``
    (all heads of the group stacked), ``squares`` their elementwise squares rounded to the
    queries' dtype, ``tree`` the node summaries (:func:`node_summaries`), ``keys`` (``[T, D]``,
    with ``leaf_scores="keys"``) the keys the tree summarizes.
    Returns the selected candidate blocks (relative to the first candidate, ascending) and the
    number of children scored."""
    g = config.blocks_per_query_block
    if n <= g:
        return list(range(n)), 0
    capacity = tree_capacity(tree)
    width = search_width(n, config)
    nodes = _start_nodes(n, width)
    levels = search_levels(n, config)
    d = rows.shape[-1]
    spreads = _spreads(config.block_size_k, tree.device)
    scored = 0
    for step in range(levels):
        children: list[tuple[int, int]] = []
        for lo, level in nodes:  # a single block passes on as is
            halves = [lo, lo + (1 << level - 1)] if level else [lo]
            children += [(c, max(level - 1, 0)) for c in halves]
        if keys is not None and step == levels - 1:  # single blocks: their exact max logit
            blocks = torch.tensor([lo for lo, _ in children], device=keys.device)
            first_key = (first_candidate_block(config) + blocks)[:, None] * config.block_size_k
            pos = first_key + torch.arange(config.block_size_k, device=keys.device)
            estimate = torch.einsum("pd,ckd->pck", rows, keys[pos]).amax(dim=-1)
        else:
            summary = tree[[level_offset(lv, capacity) + (lo >> lv) for lo, lv in children]]
            spread = spreads[[lv for _, lv in children]]
            # a pair's variance serves both of its dimensions (d, d + D/2)
            variance = summary[:, d:].repeat(1, 2)
            # [P, children]: each row's estimate of its largest logit against the child's keys
            estimate = rows @ summary[:, :d].T + spread * (squares @ variance.T).sqrt()
        # each row spreads one unit of estimated attention over the children and a child
        # keeps its largest share: a child one row wants (the question's row, on the needle)
        # survives however many rows want other children (filler matching filler)
        child_scores = vote_shares(estimate, scale).amax(dim=0).tolist()
        scored += len(children)
        keep = g if step == levels - 1 else width
        best = sorted(range(len(children)), key=lambda i: (-child_scores[i], children[i][0]))
        nodes = [children[i] for i in best[:keep]]
    return sorted(lo for lo, _ in nodes), scored


def estimate_mask_reference(
    q: torch.Tensor, k: torch.Tensor, config: HiPConfig, *, scale: float | None = None
) -> tuple[torch.Tensor, SearchStats]:
    """Selected key blocks ``[B, H_sel, n_query_blocks, G]`` (int32, ascending, ``-1`` padded)
    and the work the search did."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return search_reference(q, node_summaries(k, config), k.shape[-2], config, scale, keys=k)


def search_reference(
    q: torch.Tensor,
    tree: torch.Tensor,
    tk: int,
    config: HiPConfig,
    scale: float,
    *,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SearchStats]:
    """:func:`estimate_mask_reference` from the summary tree ``tree`` of ``tk`` keys
    (:func:`~hip_attn.geometry.node_summaries`) and, with ``leaf_scores="keys"``, the keys
    ``keys`` ``[B, Hkv, >= tk, D]`` of the candidate blocks the last level ranks: the search
    reads nothing else. The selection is at most as wide as the context has candidates
    (:func:`~hip_attn.geometry.selection_config`)."""
    b, hq, tq, _ = q.shape
    leaf_keys = None
    if config.leaf_scores == "keys":
        if keys is None:
            raise ValueError("leaf_scores='keys' needs the keys the tree summarizes (keys=)")
        leaf_keys = keys.float()
    config = selection_config(tq, tk, config)
    hkv = tree.shape[1]
    group = hq // hkv
    g = config.blocks_per_query_block
    per_sel = group if config.head_sharing == "kv_group" else 1
    h_sel = hq // per_sel
    rows_per_block = config.block_size_q // config.query_pool_stride

    pooled = pool_queries(q, config)  # [B, Hq, TP, D], rounded to q's dtype
    # rounded (and capped in float16) as the kernel rounds them
    squares = saturated(pooled.float() ** 2, q.dtype).to(q.dtype).float()
    pooled = pooled.float()
    tree = tree.float()
    geo = query_blocks(tq, tk, config)
    first = first_candidate_block(config)
    n_qb = geo.start.numel()

    out = torch.full((b, h_sel, n_qb, g), -1, dtype=torch.int32)
    scored = torch.zeros((b, h_sel, n_qb), dtype=torch.int64)
    for bi in range(b):
        for hs in range(h_sel):
            heads = slice(hs * per_sel, (hs + 1) * per_sel)
            kv_head = hs * per_sel // group
            for j in range(n_qb):
                part = slice(j * rows_per_block, (j + 1) * rows_per_block)
                rows, sq = pooled[bi, heads, part], squares[bi, heads, part]
                n = int(geo.n_candidates[j])
                blocks, work = _search_one_block(
                    rows.reshape(-1, rows.shape[-1]), sq.reshape(-1, sq.shape[-1]),
                    tree[bi, kv_head], n, config, scale,
                    None if leaf_keys is None else leaf_keys[bi, kv_head],
                )  # fmt: skip
                out[bi, hs, j, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32) + first
                scored[bi, hs, j] = work
    n_cand = geo.n_candidates.expand(b, h_sel, n_qb).clone()
    return out.to(q.device), SearchStats(scored=scored, n_candidates=n_cand)


def attended_keys(
    end: int, window_start: int, selected: torch.Tensor, config: HiPConfig
) -> torch.Tensor:
    """Absolute key positions a query block ending at ``end`` attends (before causal masking
    on the diagonal): sinks, then the ``selected`` blocks, then the window from
    ``window_start``. Disjoint by construction."""
    bk = config.block_size_k
    blocks = selected[selected >= 0].long().cpu()
    chosen = (blocks[:, None] * bk + torch.arange(bk)).flatten()
    # a block ending inside the sinks has no window (window_start is at least sink_tokens)
    window = torch.arange(min(window_start, end), end)
    return torch.cat([torch.arange(min(config.sink_tokens, end)), chosen, window])


def hip_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HiPConfig,
    *,
    scale: float | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """HiP attention: each query block attends its sinks, its selected blocks (``indices``,
    estimated with :func:`estimate_mask_reference` when not given) and its causal window."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[-2]
    group = hq // hkv
    per_sel = group if config.head_sharing == "kv_group" else 1
    scale = d**-0.5 if scale is None else scale
    if indices is None:
        indices, _ = estimate_mask_reference(q, k, config, scale=scale)
    bq = config.block_size_q
    geo = query_blocks(tq, tk, config)
    out = torch.empty_like(q)
    for j in range(indices.shape[2]):
        end, w0 = int(geo.end[j]), int(geo.window_start[j])
        rows = slice(j * bq, min((j + 1) * bq, tq))
        qpos = torch.arange(tk - tq + rows.start, tk - tq + rows.stop, device=q.device)
        for bi in range(b):
            for h in range(hq):
                keys = attended_keys(end, w0, indices[bi, h // per_sel, j], config).to(q.device)
                kv = h // group
                s = q[bi, h, rows].float() @ k[bi, kv, keys].float().T * scale
                s = s.masked_fill(keys[None, :] > qpos[:, None], float("-inf"))
                out[bi, h, rows] = (s.softmax(dim=-1) @ v[bi, kv, keys].float()).to(q.dtype)
    return out
