"""Readable PyTorch references: the specification the Triton kernels copy.

Everything here follows DESIGN.md section 3 literally, one query block at a time, in fp32.
It is slow on purpose; tests compare the kernels against it on fresh random inputs, and it is
the fallback when neither CUDA nor the Triton interpreter is available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    block_representatives,
    first_candidate_block,
    pool_queries,
    query_blocks,
    search_levels,
)


@dataclass
class SearchStats:
    """Work done by the mask search, per ``[B, H_sel, n_query_blocks]``.

    ``scored`` counts children scored: each costs one representative dot product per pooled
    query row (and per query head of the group with ``head_sharing="kv_group"``).
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
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
    scores = scores.masked_fill(torch.arange(tk, device=q.device)[None, :] > qpos, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


def _search_one_block(
    score: torch.Tensor, rep: torch.Tensor, first: int, n: int, config: HiPConfig
) -> tuple[list[int], int]:
    """The tree search for one query block. ``score`` holds its pooled query rows ``[P, D]``
    (all heads of the group stacked), ``rep`` the representatives. Returns the selected block
    indices (ascending) and the number of children scored."""
    g = config.blocks_per_query_block
    if n <= g:
        return list(range(first, first + n)), 0
    width = min(config.beam * g, n)
    nodes = [(first + i * n // width, first + (i + 1) * n // width) for i in range(width)]
    levels = search_levels(n, config)
    scored = 0
    for level in range(levels):
        children: list[tuple[int, int]] = []
        for lo, hi in nodes:
            if hi - lo == 1:  # a single block passes on as is
                children.append((lo, hi))
            else:  # left half gets the floor
                mid = lo + (hi - lo) // 2
                children += [(lo, mid), (mid, hi)]
        centers = torch.tensor([lo + (hi - lo) // 2 for lo, hi in children])
        child_scores = (score @ rep[centers].T).amax(dim=0).tolist()
        scored += len(children)
        keep = g if level == levels - 1 else width
        best = sorted(range(len(children)), key=lambda i: (-child_scores[i], children[i][0]))
        nodes = [children[i] for i in best[:keep]]
    return sorted(lo for lo, _ in nodes), scored


def estimate_mask_reference(
    q: torch.Tensor, k: torch.Tensor, config: HiPConfig
) -> tuple[torch.Tensor, SearchStats]:
    """Selected key blocks ``[B, H_sel, n_query_blocks, G]`` (int32, ascending, ``-1`` padded)
    and the work the search did."""
    return search_reference(q, block_representatives(k, config), k.shape[-2], config)


def search_reference(
    q: torch.Tensor, rep: torch.Tensor, tk: int, config: HiPConfig
) -> tuple[torch.Tensor, SearchStats]:
    """:func:`estimate_mask_reference` from the block representatives ``rep``
    ``[B, Hkv, >= Tk // bk, D]`` of ``tk`` keys: the search reads nothing else."""
    b, hq, tq, _ = q.shape
    hkv = rep.shape[1]
    group = hq // hkv
    g = config.blocks_per_query_block
    per_sel = group if config.head_sharing == "kv_group" else 1
    h_sel = hq // per_sel
    rows_per_block = config.block_size_q // config.query_pool_stride

    pooled = pool_queries(q, config).float()  # [B, Hq, TP, D], rounded to q's dtype
    rep = rep.float()
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
                rows = pooled[bi, heads, j * rows_per_block : (j + 1) * rows_per_block]
                n = int(geo.n_candidates[j])
                blocks, work = _search_one_block(
                    rows.reshape(-1, rows.shape[-1]), rep[bi, kv_head], first, n, config
                )
                out[bi, hs, j, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
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
    return torch.cat(
        [torch.arange(min(config.sink_tokens, end)), chosen, torch.arange(window_start, end)]
    )


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
    if indices is None:
        indices, _ = estimate_mask_reference(q, k, config)
    scale = d**-0.5 if scale is None else scale
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
