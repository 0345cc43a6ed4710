"""FLOPs and bytes of the work each method does in one case: what achieved TFLOP/s and GB/s are
computed from.

HiP is counted from the selection it actually made (not from the budget): for every query block
and selection head, the sinks it sees, its selected blocks and its causal window, and for the
search the children the tree search actually scored. The byte counts are the necessary HBM
traffic under the analytic model's conventions (``docs/roofline.md``): each query block loads
the keys and values it attends once per selection head (per KV head with
``head_sharing="kv_group"``), queries are read and outputs written once; the search reads one
node summary (``1.5 * D`` values in the keys' dtype: the mean, one variance per dimension
pair) per scored child and
scores it with two dot products of length ``D`` per pooled row (with ``leaf_scores="keys"``, a
child of the last level reads its ``block_size_k`` keys and takes as many dot products instead,
counted for at most ``2 * search_width`` such children per search, the bound, since the kernel
counts children, not levels); building the summary tree reads the keys once and writes about
two summaries per block. A multiply-add counts two FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from hip_attn.bench.cases import BenchCase
from hip_attn.geometry import query_blocks, search_width, summary_width
from hip_attn.perf.estimator import DENSE_QUERY_TILE


@dataclass(frozen=True)
class Work:
    """FLOPs and HBM bytes of one operation."""

    flops: float
    bytes: float

    def rates(self, ms: float) -> tuple[float, float]:
        """Achieved ``(TFLOP/s, GB/s)`` when the operation takes ``ms`` milliseconds."""
        seconds = ms * 1e-3
        return self.flops / seconds / 1e12, self.bytes / seconds / 1e9

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class HipWork:
    """What HiP did in one case.

    Attributes:
        sparse: the sparse attention over sinks + selected blocks + window.
        search: the tree-search kernel (estimates from the node summaries).
        mask: the whole mask estimation: the search plus pooling the queries and building the
            summary tree from the keys.
        key_visits: (query row, key) pairs attended, summed over query heads and the batch.
        keys_per_query: mean keys a query row attends.
        search_dots: estimates computed (one per scored child and pooled row, ``2 * D``
            multiply-adds each), summed over query heads and pooled rows.
        selected_blocks: mean key blocks selected per query block and selection head.
    """

    sparse: Work
    search: Work
    mask: Work
    key_visits: int
    keys_per_query: float
    search_dots: int
    selected_blocks: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparse": self.sparse.to_dict(),
            "search": self.search.to_dict(),
            "mask": self.mask.to_dict(),
            "key_visits": self.key_visits,
            "keys_per_query": self.keys_per_query,
            "search_dots": self.search_dots,
            "selected_blocks": self.selected_blocks,
        }


def _tri(n: torch.Tensor) -> torch.Tensor:
    """``1 + 2 + ... + n`` (0 for n <= 0)."""
    n = n.clamp(min=0)
    return n * (n + 1) // 2


def hip_work(case: BenchCase, indices: torch.Tensor, scored: torch.Tensor) -> HipWork:
    """Count HiP's work from its selection.

    Args:
        case: the case.
        indices: the selection ``[B, H_sel, n_query_blocks, G]`` (``-1`` padded).
        scored: children scored by the search per program, ``[B, H_sel, n_query_blocks]``.
    """
    cfg, sh = case.config, case.shape
    tq, tk, d, eb = case.queries, case.context, sh.head_dim, sh.element_bytes
    geo = query_blocks(tq, tk, cfg)
    s, e, ws = geo.start, geo.end, geo.window_start
    sink = cfg.sink_tokens
    n_sel = (indices >= 0).sum(dim=-1).to("cpu", torch.int64)  # [B, H_sel, nQB]
    h_sel = indices.shape[1]
    heads_per_sel = sh.heads // h_sel
    rows = e - s

    sink_sink = torch.full_like(s, sink)
    sink_visits = (
        _tri(torch.minimum(e, sink_sink))
        - _tri(torch.minimum(s, sink_sink))
        + sink * (e - torch.maximum(s, sink_sink)).clamp(min=0)
    )
    window_visits = _tri(e - ws) - _tri(s - ws)
    visits = sink_visits + window_visits + rows * n_sel * cfg.block_size_k  # [B, H_sel, nQB]
    key_visits = int(visits.sum()) * heads_per_sel
    reads = torch.minimum(e, sink_sink) + n_sel * cfg.block_size_k + (e - ws).clamp(min=0)
    qo_bytes = 2 * sh.batch * sh.heads * tq * d * eb
    index_bytes = indices.numel() * 4
    sparse = Work(
        4.0 * d * key_visits, float(int(reads.sum()) * 2 * d * eb + qo_bytes + index_bytes)
    )

    pooled_rows = -(-rows // cfg.query_pool_stride)  # [nQB]
    n_pooled = -(-tq // cfg.query_pool_stride)
    scored64 = scored.to("cpu", torch.int64)
    leaves = torch.zeros_like(scored64)  # children scored by their keys
    if cfg.leaf_scores == "keys":
        g = cfg.blocks_per_query_block
        n_cand = geo.n_candidates.tolist()
        bound = [min(n, 2 * search_width(n, cfg)) if n > g else 0 for n in n_cand]
        leaves = torch.minimum(scored64, torch.tensor(bound, dtype=torch.int64))
    search_dots = int((scored64 * pooled_rows).sum()) * heads_per_sel
    leaf_dots = int((leaves * pooled_rows).sum()) * heads_per_sel
    bk = cfg.block_size_k
    search = Work(
        4.0 * d * (search_dots - leaf_dots) + 2.0 * d * bk * leaf_dots,
        float(
            int((scored64 - leaves).sum()) * summary_width(d) * eb  # a summary per child
            + int(leaves.sum()) * bk * d * eb  # a block of keys per exactly scored child
            + sh.batch * sh.heads * n_pooled * d * eb  # each program reads its pooled rows
            + index_bytes  # the selection written
        ),
    )
    pool_adds = sh.batch * sh.heads * tq * d
    pool_bytes = sh.batch * sh.heads * (tq + n_pooled) * d * eb  # read q, write pooled
    # the summary tree: every key read once (its mean, then its squared deviation: 4 FLOPs an
    # element), ~2 summaries zeroed (the allocation), then written, per block
    n_blocks = tk // cfg.block_size_k
    tree_ops = sh.batch * sh.kv_heads * n_blocks * cfg.block_size_k * 4 * d
    tree_elems = n_blocks * (cfg.block_size_k * d + 4 * summary_width(d))
    tree_bytes = sh.batch * sh.kv_heads * tree_elems * eb
    prep = Work(float(pool_adds + tree_ops), float(pool_bytes + tree_bytes))
    return HipWork(
        sparse=sparse,
        search=search,
        mask=search + prep,
        key_visits=key_visits,
        keys_per_query=key_visits / (sh.batch * sh.heads * tq),
        search_dots=search_dots,
        selected_blocks=float(n_sel.float().mean()),
    )


def dense_work(case: BenchCase) -> Work:
    """Causal dense attention of the case's queries over its keys, flash style: every tile of
    ``DENSE_QUERY_TILE`` query rows loads the keys it sees once per KV head."""
    sh = case.shape
    tq, tk, d, eb = case.queries, case.context, sh.head_dim, sh.element_bytes
    offset = tk - tq
    visits = (tk * (tk + 1) - offset * (offset + 1)) // 2  # query at p sees p + 1 keys
    tile_ends = torch.clamp(
        torch.arange(1, -(-tq // DENSE_QUERY_TILE) + 1, dtype=torch.int64) * DENSE_QUERY_TILE,
        max=tq,
    )
    key_reads = int((offset + tile_ends).sum())
    return Work(
        4.0 * d * visits * sh.batch * sh.heads,
        float(
            sh.batch * sh.kv_heads * key_reads * 2 * d * eb + 2 * sh.batch * sh.heads * tq * d * eb
        ),
    )
