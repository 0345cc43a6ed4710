"""HiP's tree search over other node summaries than max/min bounds (exploration, issue 13):
representative keys and Gaussian (mean, variance) summaries. Results merged in
``bench/results/summary-rules-smollm2-8k.json``; read in docs/accuracy.md ("Node summaries").

The library's search (:func:`hip_attn.reference._search_one_block`) is kept: the same start
partition, width ``beam * G``, number of levels, pooled query rows (``query_pool_stride``),
per-row softmax over the children summed over rows and over the query heads of the KV group
(the library's vote until session 18; ``vote=`` and ``vote_scale=`` of :func:`search_one_block`
give its largest-share vote at half the scale since), ties to the lower block. Only the node
summary and the child score change:

* a node's summary is ``r`` representative keys (full head dim, post-RoPE as stored in the KV
  cache): representative ``j`` is the node's key with the largest *pre-RoPE* projection on a
  fixed query prototype ``j``. Leaves (single blocks) take the argmax over their ``bk`` keys;
  a parent takes whichever child's representative has the larger stored projection (composed
  up the tree like a max);
* a child's score for a query row is ``max_j q . rep_j`` (a lower bound on its best logit,
  not an upper one).

Prototypes: per layer and KV head, a cosine ``r``-means of the pre-RoPE queries of all the
query heads of the group over the first ``PREFIX = 1024`` positions. Pre-RoPE vectors are the
post-RoPE ones rotated back with the model's own rotary embedding (HF Llama ``rotate_half``
convention, ``inv_freq`` from ``model.model.rotary_emb``, positions ``0 .. T-1``: one window).
Every attention call is one layer's call with all of that layer's ``q`` and ``k``, so the
per-layer state (prototypes, representative tree) is built at the start of the call from the
call's own ``q``/``k``; no layer index is needed.

Variants (registered into :data:`hip_attn.accuracy.methods.METHODS`; ``s`` is
``--query-pool-stride``; reads at 64K per query block and selection head with ``N = 8,144``,
``G = 64``, ``bk = 8``, counted as :func:`hip_attn.accuracy.methods.hip_search_reads` counted
before session 13: ``2 * min(beam * G, N)`` children per level (the library now caps the last
level at ``N``, which changes nothing at 64K's last block), a summary of ``r`` key-sized
vectors counts ``r``, an exactly scored child counts its keys; a quarter of Quest's ``2N`` is
4,072):

* ``rep2`` (V1 with ``s=2``, V2 with ``s=1``): 2 representatives, pre-RoPE 2-means (2,048).
* ``rep4`` (V3) / ``rep8``: 4 / 8 representatives (4,096 / 8,192).
* ``rep2x`` (V4) / ``rep4x`` / ``rep8x``: the last level (single blocks) scored by each row's
  exact max logit over the block's keys instead (1,792 + 1,024 / 3,584 + 1,024 /
  7,168 + 1,024).
* ``rep2xx``: ``rep2`` with the last two levels (2-block and 1-block children) exact
  (1,536 + 3,072).
* ``rep2post``, ``rep2xpost``, ``rep4post``, ``rep8xpost``: the same with prototypes and
  projections in post-RoPE space (no un-rotation).
* diagnostics: ``bnd`` (this file's search over the max/min tree: reproduced the library's
  ``hip`` before session 8), ``bndx`` (max/min tree, exact last level), ``treeexact`` (every
  child scored by its exact max logit: perfect summaries in the library's tree; a
  reference), ``treecoarse`` (exact on every level but the last, the last by 2
  representatives), ``flat2`` (no tree: every block by its 2 representatives, top ``G``;
  16,288), ``flat2r4`` (``flat2``'s top ``4G`` re-ranked exactly; 18,336).
* Gaussian summaries (no representatives, no calibration, RoPE-free): a node stores its keys'
  mean ``mu`` and per-dimension population variance ``var`` (``2 * D`` values, the size of
  the library's old max/min; composable up the tree exactly from children's counts, means and
  variances; :func:`gaussian_tree` computes each level straight from the keys, which is the
  same). A child's score for a query row ``q`` is ``q . mu + c * sqrt(sum_d q_d**2 var_d)``,
  ``c = a * sqrt(2 ln m)``, ``m = 2**level * bk`` the child's key count (the expected max of
  ``q . k`` over ``m`` Gaussian keys); search otherwise as ``bnd``. ``gauss`` (a = 1),
  ``gauss05`` / ``gauss075`` / ``gauss125`` / ``gauss15`` / ``gauss2`` (a = 0.5 / 0.75 /
  1.25 / 1.5 / 2): 2,048. ``gaussx``, ``gauss125x``, ...: the last level exact max logit
  (1,792 + 1,024). ``gaussbox`` / ``gaussbox05`` / ``gaussbox15``: ``var`` replaced by the
  box half-width squared ``(max - min)**2 / 4`` per dimension (mean kept), a = 1 / 0.5 / 1.5
  (2,048).
* Session 11 (moments at their limit, key-level leaves): ``gausspcfull`` (the exact variance
  of ``q . k``: each node's full covariance, a diagnostic), ``gausspc1`` / ``gausspc2`` /
  ``gausspc4`` (its top principal directions plus the diagonal left over; 2 + r vectors),
  ``gausspair`` / ``gausspairx`` (one variance per RoPE pair ``(d, d + D/2)``; 1.5 vectors),
  ``gaussiso`` / ``gaussisox`` (one variance per node; 1 vector), ``gausslse`` /
  ``gausslsex`` (children ranked by their estimated softmax mass
  ``q . mu + scale q**2 . var / 2 + ln m / scale``), ``gauss125l{05,075,1,15,2}`` (``a = 1.25``
  on the coarse levels, another ``a`` on single blocks), ``gauss125r{125,15,2,3}`` (the last
  level's top ``m * G`` by the estimates re-ranked by exact max logits). Results in
  docs/accuracy.md ("Moment summaries at their limit"): none of the moment variants beats
  ``gauss125`` by more than 0.2 points; ``beam = 2`` with exact leaves and unpooled rows
  reaches +2.2% to +2.3%.
* Session 12 (one selection per query head, ``--head-sharing head``): ``gauss125xg`` /
  ``gausspairxg`` (the tree searched by the KV group's rows, its reads shared by the group, the
  exact leaves ranked by each selection's own rows). Results in docs/accuracy.md ("One
  selection per query head"): ``gausspairx`` per head +0.9%, ``gausspairxg`` +2.3%.
  ``gausspairxu``: ``gausspairx`` with its reads counted per KV head (the distinct children
  its group's searches score); ``gausspairxh15``: the same with the leaves scored on half the
  dimensions and their top 1.5 G re-ranked on all.
* Session 18 (how the rows' votes combine, ``vote=`` / ``vote_scale=`` of
  :func:`search_one_block`, one search per KV head): ``gauss125xheadmax`` (``t2``, ``t05``: at
  2 / 0.5 times the attention scale), ``gauss125xroundrobin``, ``gauss125xrowmax`` (``t2``,
  ``t05``, ``t025``; ``p1375``: the level above the leaves keeps ``1.375 G`` nodes),
  ``gausspairxheadmax`` / ``gausspairxroundrobin`` / ``gausspairxrowmaxt05``, ``gauss125rowmax``
  / ``gauss125rowmaxt05`` (the default's search). Results in docs/accuracy.md ("Votes"): the
  rows' largest share at half the scale is the library's rule since (``gauss125xrowmaxt05``:
  +0.8%).

Results at 8K (SmolLM2-135M, pydoc, ``k=512``; dense 10.268; run on 2 CPU cores, one thread):

==============  ===========  ===========
variant         s=2          s=1
==============  ===========  ===========
bnd (old hip)   +10.3%       (+11.0%, docs)
rep2            +10.9%       +9.3%
rep4            +10.0%       +7.4%
rep8            +9.0%        +6.5%
rep2x           +10.0%       +7.8%
rep4x           +9.3%        +6.1%
rep8x           +8.8%        +4.1%
rep2xx          +8.8%        +6.0%
bndx            +8.9%        +8.5%
rep2post        +12.2%       +10.4%
rep2xpost       +10.7%       +7.9%
rep4post                     +8.2%
rep8xpost                    +6.5%
treeexact       +4.4%        -0.0%
treecoarse      +9.1%        +4.5%
flat2           +9.8%        +6.3%
flat2r4         +6.3%        +2.2%
gauss           +7.5%        +5.8%
gauss05                      +7.7%
gauss075                     +6.6%
gauss125        +5.8%        +5.7%
gauss15                      +6.3%
gaussx          +6.1%        +4.2%
gauss125x       +5.4%        +4.0%
gaussbox                     +6.7%
gaussbox05                   +6.0%
gaussbox15                   +8.6%
==============  ===========  ===========

Gaussian rows (files ``m`` .. ``z``): ppl gauss 10.861 (s=1) / 11.035 (s=2), gauss05 11.056,
gauss075 10.946, gauss125 10.857 / 10.864, gauss15 10.910, gaussx 10.700 (s=1) / 10.890 (s=2),
gauss125x 10.679 / 10.824, gaussbox 10.960, gaussbox05 10.886, gaussbox15 11.156 (``gauss2``
and the other ``gauss*x`` are registered but were not run).

Run (2 cores, 1-3 min per method at 8K)::

    python bench/summary_rules.py --tokens 8192 --methods dense,hip,rep2,rep2x,rep4
    python bench/summary_rules.py --tokens 8192 --methods rep2 --query-pool-stride 1
    python bench/summary_rules.py --tokens 8192 --methods gauss --query-pool-stride 1
    python bench/summary_rules.py --tokens 8192 --methods gausspairx --beam 2 \
        --query-pool-stride 1 --head-sharing head
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection_perplexity as sp  # noqa: E402

from hip_attn.accuracy.methods import METHODS, QueryBlock, Selection, selection_heads  # noqa: E402
from hip_attn.config import HiPConfig  # noqa: E402
from hip_attn.geometry import (  # noqa: E402
    first_candidate_block,
    level_offset,
    pool_queries,
    search_levels,
    search_width,
    tree_blocks,
    tree_capacity,
    tree_rows,
)
from hip_attn.reference import _start_nodes  # noqa: E402

PREFIX = 1024  # positions whose queries calibrate the prototypes


# --------------------------------------------------------------------------- RoPE and prototypes
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, inv_freq: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Undo HF Llama RoPE on ``x [..., T, D]`` at positions ``offset .. offset + T - 1``:
    ``x_pre = x cos - rotate_half(x) sin`` (the rotation by ``-theta``)."""
    t = x.shape[-2]
    pos = torch.arange(offset, offset + t, dtype=torch.float64)
    freqs = pos[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos - rotate_half(x) * sin


def cosine_kmeans(x: torch.Tensor, r: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Unit prototypes ``[r, D]`` of the unit vectors of ``x [M, D]``: spherical k-means,
    k-means++ initialization with a fixed seed."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, r):
        dist = 1 - (x @ torch.stack(centers).T).amax(dim=1)  # cosine distance to nearest
        prob = dist.clamp(min=0) ** 2
        centers.append(x[torch.multinomial(prob / prob.sum(), 1, generator=gen)].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)
        new = torch.stack(
            [x[assign == j].sum(0) if (assign == j).any() else c[j] for j in range(r)]
        )
        new = torch.nn.functional.normalize(new, dim=-1)
        if torch.allclose(new, c):
            break
        c = new
    return c.float()


# --------------------------------------------------------------------------- the summary tree
@dataclass
class LayerState:
    """What one layer's searches read: the representative tree and the keys (for V4)."""

    reps: torch.Tensor  # [B, Hkv, tree_rows(n), r, D] post-RoPE representative keys
    keys: torch.Tensor  # [B, Hkv, T, D] post-RoPE keys (exact last level only)
    n: int  # blocks the tree covers
    bound: torch.Tensor | None = None  # the library's max/min tree (``bnd`` variants only)


def representative_tree(
    k: torch.Tensor, proj: torch.Tensor, config: HiPConfig
) -> tuple[torch.Tensor, int]:
    """``[B, Hkv, tree_rows(n), r]`` absolute key index of each node's representatives, laid
    out like :func:`hip_attn.geometry.node_summaries` (capacity ``n``): representative ``j`` of
    a node is its key with the largest ``proj[..., j]`` (``proj [B, Hkv, T, r]``)."""
    bk, first = config.block_size_k, first_candidate_block(config)
    n = tree_blocks(k.shape[-2], config)
    b, h, _, r = proj.shape
    idx = torch.zeros((b, h, tree_rows(n), r), dtype=torch.long)
    val = torch.zeros((b, h, tree_rows(n), r), dtype=proj.dtype)
    leaves = proj[:, :, first * bk : (first + n) * bk].unflatten(2, (n, bk))  # [B,H,n,bk,r]
    v, a = leaves.max(dim=3)
    val[:, :, :n] = v
    idx[:, :, :n] = a + (first + torch.arange(n))[:, None] * bk
    for level in range(1, n.bit_length()):
        count = n >> level
        below, row = level_offset(level - 1, n), level_offset(level, n)
        cv = val[:, :, below : below + 2 * count].unflatten(2, (count, 2))
        ci = idx[:, :, below : below + 2 * count].unflatten(2, (count, 2))
        pick = (cv[:, :, :, 1] > cv[:, :, :, 0]).long()  # ties: the first child, like max
        val[:, :, row : row + count] = torch.gather(cv, 3, pick[:, :, :, None]).squeeze(3)
        idx[:, :, row : row + count] = torch.gather(ci, 3, pick[:, :, :, None]).squeeze(3)
    return idx, n


def _per_level(k: torch.Tensor, config: HiPConfig, summarize) -> torch.Tensor:  # noqa: ANN001
    """``[B, Hkv, tree_rows(n), 2 * D]`` laid out like
    :func:`hip_attn.geometry.node_summaries` (capacity ``n``), each node's row
    ``summarize(keys [B, Hkv, count, m, D] of one level)`` computed straight from its keys."""
    bk, first = config.block_size_k, first_candidate_block(config)
    n = tree_blocks(k.shape[-2], config)
    b, h, _, d = k.shape
    kf = k.double()[:, :, first * bk : (first + n) * bk]
    tree = torch.zeros((b, h, tree_rows(n), 2 * d), dtype=torch.float64)
    for level in range(n.bit_length()):
        count = n >> level
        x = kf[:, :, : count * (bk << level)].unflatten(2, (count, bk << level))
        row = level_offset(level, n)
        tree[:, :, row : row + count] = summarize(x)
    return tree.float()


def gaussian_tree(
    k: torch.Tensor, config: HiPConfig, box: bool = False, pair: bool = False, iso: bool = False
) -> torch.Tensor:
    """Each node's mean key, then its per-dimension (population) variance over the node's keys
    (what the library's :func:`hip_attn.geometry.node_summaries` holds since session 8, there
    composed up the tree, which is the same). ``box``: the variance replaced by
    ``(max - min)**2 / 4`` (the box half-width squared; mean kept)."""

    def summarize(x: torch.Tensor) -> torch.Tensor:
        spread = ((x.amax(3) - x.amin(3)) / 2) ** 2 if box else x.var(dim=3, unbiased=False)
        if pair:  # one variance per RoPE pair (d, d + D/2): D/2 values stored
            half = spread.shape[-1] // 2
            mean = (spread[..., :half] + spread[..., half:]) / 2
            spread = torch.cat([mean, mean], dim=-1)
        if iso:  # one variance per node (its mean over dimensions): 1 vector + 1 value stored
            spread = spread.mean(dim=-1, keepdim=True).expand_as(spread)
        return torch.cat([x.mean(dim=3), spread], dim=-1)

    return _per_level(k, config, summarize)


def factor_tree(k: torch.Tensor, config: HiPConfig, rank: int) -> torch.Tensor:
    """``[B, Hkv, tree_rows(n), (2 + rank) * D]``: each node's mean key, the diagonal of its
    keys' covariance left over by its top ``rank`` principal directions, then those
    directions scaled by the square roots of their variances, so that
    ``q^T cov q ~= sum_r (q . f_r)**2 + q**2 . residual`` (exact at ``rank = D``)."""
    bk, first = config.block_size_k, first_candidate_block(config)
    n = tree_blocks(k.shape[-2], config)
    b, h, _, d = k.shape
    kf = k.double()[:, :, first * bk : (first + n) * bk]
    tree = torch.zeros((b, h, tree_rows(n), (2 + rank) * d), dtype=torch.float64)
    for level in range(n.bit_length()):
        count = n >> level
        x = kf[:, :, : count * (bk << level)].unflatten(2, (count, bk << level))
        mu = x.mean(dim=3)
        xc = x - mu[:, :, :, None]
        cov = xc.transpose(-1, -2) @ xc / x.shape[3]  # [B, H, count, D, D]
        lam, vec = torch.linalg.eigh(cov)  # ascending
        lam, vec = lam[..., -rank:].clamp(min=0), vec[..., -rank:]  # [.., r], [.., D, r]
        factors = (vec * lam.sqrt()[..., None, :]).transpose(-1, -2)  # [.., r, D]
        residual = (torch.diagonal(cov, dim1=-2, dim2=-1) - (factors**2).sum(-2)).clamp(min=0)
        row = level_offset(level, n)
        tree[:, :, row : row + count] = torch.cat([mu, residual, factors.flatten(-2)], dim=-1)
    return tree.float()


def bound_tree(k: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """Each node's elementwise max key, then its min: the library's summaries before session 8
    (the ``bnd`` variants' tree)."""
    return _per_level(k, config, lambda x: torch.cat([x.amax(3), x.amin(3)], dim=-1))


def build_state(
    q: torch.Tensor, k: torch.Tensor, config: HiPConfig, r: int, inv_freq: torch.Tensor | None
) -> LayerState:
    """One layer's state from its post-RoPE ``q [B, Hq, T, D]`` and ``k [B, Hkv, T, D]``
    (one window: positions ``0 .. T-1``). ``inv_freq=None``: prototypes and projections in
    post-RoPE space (no un-rotation)."""
    tq, tk = q.shape[2], k.shape[2]
    qf, kf = q.float(), k.float()
    if inv_freq is not None:
        q_pre = unrotate(qf, inv_freq, tk - tq)
        k_pre = unrotate(kf, inv_freq, 0)
    else:
        q_pre, k_pre = qf, kf
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    prefix = min(PREFIX, tq)
    protos = torch.empty((b, hkv, r, d))
    for bi in range(b):
        for h in range(hkv):
            sample = q_pre[bi, h * group : (h + 1) * group, :prefix].reshape(-1, d)
            protos[bi, h] = cosine_kmeans(sample, r)
    proj = torch.einsum("bhtd,bhrd->bhtr", k_pre, protos)
    idx, n = representative_tree(kf, proj, config)
    reps = torch.gather(
        kf[:, :, None].expand(b, hkv, r, tk, d),  # [B,H,r,T,D]
        3,
        idx.transpose(2, 3)[..., None].expand(b, hkv, r, idx.shape[2], d),
    ).transpose(2, 3)  # [B, H, rows, r, D]
    return LayerState(reps.contiguous(), kf, n)


# --------------------------------------------------------------------------- the search
def search_one_block(
    rows: torch.Tensor,
    reps: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    capacity: int,
    config: HiPConfig,
    scale: float,
    exact_last: bool,
    exact_all: bool | str = False,
    exact_from: int = 0,
    bound: bool = False,
    gauss: float = 0.0,
    lse: bool = False,
    rerank: float = 0.0,
    leaf: float = 0.0,
    rank: int = 0,
    leaf_rows: torch.Tensor | None = None,
    visited: set[tuple[int, int]] | None = None,
    half: bool = False,
    pair_rows: torch.Tensor | None = None,
    heads: int = 1,
    vote: str = "sum",
    vote_scale: float = 1.0,
    penult: float = 0.0,
) -> list[int]:
    """:func:`hip_attn.reference._search_one_block` with a child scored by
    ``max_j q . rep_j`` (``reps [rows, r, D]`` of one KV head), or on the last level, with
    ``exact_last``, by the exact max logit over the block's keys (``keys [T, D]``); with
    ``exact_all`` every child is scored by the exact max logit over all of its keys (a
    reference: perfect summaries in the library's tree). ``exact_from = L``: children of level
    ``< L`` scored exactly (``L = 1`` is ``exact_last``; ``L = 2`` adds the 2-block nodes).
    ``exact_all = "coarse"``: every level but the last exact, the last by representatives.
    ``bound``: ``reps`` is the library's summary tree ``[rows, 2 * D]`` (max, min) and the
    score its bound ``relu(q) . max + min(q, 0) . min`` (reproduces ``hip``). ``gauss = a``:
    ``reps`` is the Gaussian tree ``[rows, 2 * D]`` (mean, variance; :func:`gaussian_tree`)
    and the score ``q . mu + a * sqrt(2 ln m) * sqrt(sum_d q_d**2 var_d)`` with ``m`` the
    child's key count ``2**level * bk``. ``leaf_rows``: the rows that rank the exact last
    level instead of ``rows`` (a group's search, one head's leaves). ``visited`` collects the
    children scored, as ``(level, first block)``, level ``-1`` for exact leaves (``-3``: on
    half the dimensions, ``-2``: a short list's other half). ``half``: the exact leaves are
    scored on the 16 RoPE pairs (of 32) with the largest ``sum_rows q_p**2 * E[k_p**2]`` over
    the candidates (what the summaries covering them hold), the rows being ``pair_rows`` (a KV
    group's, so that its searches read the same half) or ``rows``, and ``rerank`` re-ranks
    their short list on the other half too. ``vote`` (session 18): how the rows' softmaxes (at
    ``vote_scale`` times ``scale``) rank a child: ``"sum"`` over the rows (the library's rule
    before session 18; every result above), ``"rowmax"`` the largest over the rows (the
    library's since, with ``vote_scale = 0.5``), ``"headmax"`` the largest over the ``heads``
    query heads stacked in ``rows`` of each head's sum, ``"roundrobin"`` the heads' rankings
    by their sums taken in turns. ``penult``: the level above the leaves keeps
    ``penult * G`` nodes instead of ``beam * G`` (fewer leaves to read)."""
    g = config.blocks_per_query_block
    if n <= g:
        return list(range(n))
    bk, first = config.block_size_k, first_candidate_block(config)
    width = search_width(n, config)
    nodes = _start_nodes(n, width)
    levels = search_levels(n, config)
    for step in range(levels):
        children: list[tuple[int, int]] = []
        for lo, level in nodes:  # a single block passes on as is
            halves = [lo, lo + (1 << level - 1)] if level else [lo]
            children += [(c, max(level - 1, 0)) for c in halves]
        last = step == levels - 1
        if visited is not None:  # level -1: a block whose keys were read (exact leaves)
            leaves = last and exact_last and all(lv == 0 for _, lv in children)
            tag = (-3 if half else -1) if leaves else None
            visited.update((lv if tag is None else tag, lo) for lo, lv in children)
        if exact_all == "coarse" and last:
            summary = reps[[level_offset(lv, capacity) + (lo >> lv) for lo, lv in children]]
            score = torch.einsum("pd,crd->pcr", rows, summary).amax(-1)
        elif exact_all or (exact_from and max(lv for _, lv in children) < exact_from):
            span = max(1 << lv for _, lv in children)
            pos = torch.stack(
                [
                    (first + lo) * bk + torch.arange(span * bk).clamp(max=(1 << lv) * bk - 1)
                    for lo, lv in children
                ]
            )  # [children, span * bk] (a smaller child repeats its last key)
            score = torch.einsum("pd,ckd->pck", rows, keys[pos]).amax(-1)
        elif last and exact_last and all(lv == 0 for _, lv in children):
            blocks = torch.tensor([lo for lo, _ in children])
            pos = (first + blocks)[:, None] * bk + torch.arange(bk)
            mine = rows if leaf_rows is None else leaf_rows
            if half:
                chooser = mine if pair_rows is None else pair_rows
                dims = _top_pairs(chooser, keys[first * bk : (first + n) * bk])
                score = torch.einsum("pd,ckd->pck", mine[:, dims], keys[pos][..., dims]).amax(-1)
            else:
                score = torch.einsum("pd,ckd->pck", mine, keys[pos]).amax(-1)
        elif gauss:
            summary = reps[[level_offset(lv, capacity) + (lo >> lv) for lo, lv in children]]
            d = rows.shape[-1]
            m = torch.tensor([float((1 << lv) * bk) for _, lv in children])
            a = torch.tensor([leaf if leaf and lv == 0 else gauss for _, lv in children])
            c = a * torch.sqrt(2 * torch.log(m))
            var = ((rows * rows) @ summary[:, d : 2 * d].T).clamp(min=0)  # [P, children]
            if rank:
                factors = summary[:, 2 * d :].unflatten(1, (rank, d))  # [children, r, D]
                var = var + (torch.einsum("pd,crd->pcr", rows, factors) ** 2).sum(-1)
            if lse:  # log of the expected sum of exp(scale q.k) over m Gaussian keys, / scale
                score = rows @ summary[:, :d].T + 0.5 * scale * var + torch.log(m)[None] / scale
            else:
                score = rows @ summary[:, :d].T + c[None, :] * var.sqrt()
        elif bound:
            summary = reps[[level_offset(lv, capacity) + (lo >> lv) for lo, lv in children]]
            d = rows.shape[-1]
            score = rows.clamp(min=0) @ summary[:, :d].T + rows.clamp(max=0) @ summary[:, d:].T
        else:
            summary = reps[[level_offset(lv, capacity) + (lo >> lv) for lo, lv in children]]
            score = torch.einsum("pd,crd->pcr", rows, summary).amax(-1)  # [P, children]
        p = torch.exp((score - score.amax(dim=1, keepdim=True)) * (scale * vote_scale))
        p = p / p.sum(dim=1, keepdim=True)
        keep = g if last else width
        if penult and step == levels - 2:
            keep = min(width, int(penult * g))
        if last and rerank and all(lv == 0 for _, lv in children):
            keep = int(rerank * g)
        best = _vote(p, heads, vote, [lo for lo, _ in children])
        nodes = [children[i] for i in best[:keep]]
    if rerank and len(nodes) > g:  # the short list re-ranked by exact max logits
        if visited is not None and half:
            visited.update((-2, lo) for lo, _ in nodes)
        blocks = torch.tensor([lo for lo, _ in nodes])
        pos = (first + blocks)[:, None] * bk + torch.arange(bk)
        score = torch.einsum("pd,ckd->pck", rows, keys[pos]).amax(-1)
        p = torch.exp((score - score.amax(dim=1, keepdim=True)) * scale)
        child_scores = (p / p.sum(dim=1, keepdim=True)).sum(dim=0).tolist()
        best = sorted(range(len(nodes)), key=lambda i: (-child_scores[i], nodes[i][0]))
        nodes = [nodes[i] for i in best[:g]]
    return sorted(lo for lo, _ in nodes)


def _vote(p: torch.Tensor, heads: int, vote: str, starts: list[int]) -> list[int]:
    """The children (columns of the rows' softmaxes ``p [rows, children]``, ``heads`` query
    heads' rows stacked) best first under ``vote`` (:func:`search_one_block`); ties to the lower
    block."""
    per_head = p.unflatten(0, (heads, -1)).sum(1)  # [heads, children]
    if vote == "roundrobin":
        orders = [sorted(range(p.shape[1]), key=lambda i: (-h[i], starts[i]))
                  for h in per_head.tolist()]  # fmt: skip
        best: list[int] = []
        for turn in zip(*orders, strict=True):
            for i in turn:  # a child two heads rank alike counts once
                if i not in best:
                    best.append(i)
        return best
    if vote == "sum":
        scores = per_head.sum(0)
    elif vote == "rowmax":
        scores = p.amax(0)
    else:  # "headmax"
        scores = per_head.amax(0)
    return sorted(range(p.shape[1]), key=lambda i: (-float(scores[i]), starts[i]))


def _top_pairs(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The dimensions of the half of the RoPE pairs ``(d, d + D/2)`` with the largest
    ``sum_rows q_p**2 * mean_keys k_p**2``."""
    h = rows.shape[-1] // 2
    q2, k2 = (rows**2).sum(0), (keys**2).mean(0)
    top = ((q2[:h] + q2[h:]) * (k2[:h] + k2[h:])).topk(h // 2).indices
    return torch.cat([top, top + h])


def representative_reads(
    n: int, config: HiPConfig, r: int, exact_last: bool, exact_from: int = 0
) -> int:
    """Key-sized vectors read per query block and selection head, counted as
    :func:`hip_attn.accuracy.methods.hip_search_reads` counted before session 13:
    ``2 * min(beam * G, N)`` children per level (no cap at ``N`` on the last level), ``r``
    vectors each; with ``exact_last`` the last level reads ``bk`` keys per child (with
    ``exact_from = L`` the last ``L`` levels read all keys of their children: the children of
    the level ``L`` steps from the end hold ``2**(L-1)`` blocks)."""
    levels = search_levels(n, config)
    children = 2 * min(config.beam * config.blocks_per_query_block, n)
    if not levels:
        return 0
    if exact_from:
        exact = min(exact_from, levels)
        keys = sum(children * config.block_size_k * (1 << lv) for lv in range(exact))
        return children * r * (levels - exact) + keys
    if exact_last:
        return children * r * (levels - 1) + children * config.block_size_k
    return children * r * levels


# --------------------------------------------------------------------------- methods
_STATE: dict[str, LayerState] = {}
_INV_FREQ: list[torch.Tensor] = []


def flat_one_block(
    rows: torch.Tensor,
    reps: torch.Tensor,
    keys: torch.Tensor,
    n: int,
    config: HiPConfig,
    scale: float,
    rerank: int,
) -> list[int]:
    """No tree: every candidate block scored by ``max_j q . rep_j`` over its leaf
    representatives, per-row softmax summed over rows; the top ``G`` (or, with ``rerank > 1``,
    the top ``rerank * G`` re-ranked by the exact per-row max logit over their keys)."""
    g = config.blocks_per_query_block
    if n <= g:
        return list(range(n))
    bk, first = config.block_size_k, first_candidate_block(config)

    def ranked(score: torch.Tensor, cand: torch.Tensor, keep: int) -> torch.Tensor:
        p = torch.exp((score - score.amax(dim=1, keepdim=True)) * scale)
        s = (p / p.sum(dim=1, keepdim=True)).sum(dim=0)
        order = torch.sort(-s, stable=True).indices[:keep]  # ties: lower block (cand ascends)
        return cand[order].sort().values

    cand = torch.arange(n)
    score = torch.einsum("pd,crd->pcr", rows, reps[:n]).amax(-1)
    short = ranked(score, cand, min(n, max(1, rerank) * g))
    if rerank > 1:
        pos = (first + short)[:, None] * bk + torch.arange(bk)
        exact = torch.einsum("pd,ckd->pck", rows, keys[pos]).amax(-1)
        short = ranked(exact, short, g)
    return short.tolist()


def make_select(  # noqa: ANN201
    r: int,
    exact_last: bool,
    unrotated: bool,
    *,
    exact_all: bool | str = False,
    flat: int = 0,
    exact_from: int = 0,
    bound: bool = False,
    gauss: float = 0.0,
    box: bool = False,
    lse: bool = False,
    rerank: float = 0.0,
    leaf: float = 0.0,
    rank: int = 0,
    pair: bool = False,
    iso: bool = False,
    group_tree: bool = False,
    union: bool = False,
    half: bool = False,
    vote: str = "sum",
    vote_scale: float = 1.0,
    penult: float = 0.0,
):
    """``gauss = a``: the Gaussian (mean/variance) tree with ``c = a sqrt(2 ln m)``; ``box``:
    its variance replaced by the box half-width squared. ``flat``: 0 = the tree; 1 = every
    block by its representatives, top ``G``; ``m > 1`` = top ``m * G`` by representatives
    re-ranked exactly to ``G``."""

    def select(block: QueryBlock, config: HiPConfig) -> Selection:
        state = _STATE["layer"]
        g, first = config.blocks_per_query_block, first_candidate_block(config)
        h_sel = selection_heads(block.q, block.k, config)
        b, hq = block.q.shape[:2]
        hkv = block.k.shape[1]
        group, per_sel = hq // hkv, hq // h_sel
        scale = block.q.shape[-1] ** -0.5
        pooled = pool_queries(block.q, config).float()  # [B, Hq, P, D]
        out = torch.full((b, h_sel, 1, g), -1, dtype=torch.int32)
        # with ``union``: the children each KV head's selections score, counted once per KV head
        seen: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for bi in range(b):
            for hs in range(h_sel):
                kv = hs * per_sel // group
                rows = pooled[bi, hs * per_sel : (hs + 1) * per_sel].reshape(-1, pooled.shape[-1])
                group_rows = pooled[bi, kv * group : (kv + 1) * group].reshape(-1, rows.shape[-1])
                leaf_rows = None
                assert vote in ("sum", "rowmax") or not group_tree  # heads=per_sel: own rows
                if group_tree:  # the KV group's rows search, this selection's rank the leaves
                    leaf_rows, rows = rows, group_rows
                if gauss:
                    blocks = search_one_block(
                        rows, state.bound[bi, kv], state.keys[bi, kv],  # type: ignore[index]
                        block.n_candidates,
                        state.n, config, scale, exact_last,
                        gauss=gauss, lse=lse, rerank=rerank, leaf=leaf, rank=rank,
                        leaf_rows=leaf_rows, visited=seen.setdefault((bi, kv), set()),
                        half=half, pair_rows=group_rows if half else None,
                        heads=per_sel, vote=vote, vote_scale=vote_scale, penult=penult,
                    )  # fmt: skip
                elif bound:  # the library's max/min summaries as r = 2 "representatives"
                    tree = state.bound[bi, kv]  # type: ignore[index]
                    blocks = search_one_block(
                        rows, tree, state.keys[bi, kv], block.n_candidates,
                        state.n, config, scale, exact_last, bound=True,
                    )  # fmt: skip
                elif flat:
                    blocks = flat_one_block(
                        rows, state.reps[bi, kv], state.keys[bi, kv], block.n_candidates,
                        config, scale, flat,
                    )  # fmt: skip
                else:
                    blocks = search_one_block(
                        rows, state.reps[bi, kv], state.keys[bi, kv], block.n_candidates,
                        state.n, config, scale, exact_last, exact_all, exact_from,
                    )  # fmt: skip
                out[bi, hs, 0, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32) + first
        if union and seen:
            return Selection(out.to(block.q.device), config, union_reads(seen, config))
        return Selection(out.to(block.q.device), config, reads(block.n_candidates, config))

    def union_reads(seen: dict[tuple[int, int], set[tuple[int, int]]], config: HiPConfig) -> int:
        """Key-sized vectors per KV head (averaged) when a group's searches share their loads:
        each distinct child once, a summary (1.5 or 2 vectors) or, exact, its block's keys."""
        per_child = 1.5 if pair else 2
        keys = {-1: config.block_size_k, -2: config.block_size_k / 2, -3: config.block_size_k / 2}
        total = sum(keys[lv] if lv < 0 else per_child for nodes in seen.values() for lv, _ in nodes)
        return round(total / len(seen))

    def reads(n: int, config: HiPConfig) -> int:
        """Key-sized vectors the selection reads per query block and selection head."""
        if half:  # leaf keys on half the dimensions, then the short list's other half
            summaries = representative_reads(n, config, 1, True) - representative_reads(
                n, config, 0, True
            )
            leaves = representative_reads(n, config, 0, True)
            short = int(rerank * config.blocks_per_query_block) * config.block_size_k
            short *= search_levels(n, config) > 0
            return round((1.5 if pair else 2) * summaries + leaves / 2 + short / 2)
        if gauss and (pair or rank or iso):  # summaries of 1.5 (pair), 1 (iso), 2 + rank vectors
            per_child = 1.5 if pair else 1 if iso else 2 + rank
            summaries = representative_reads(n, config, 1, exact_last) - (
                representative_reads(n, config, 0, exact_last)
            )  # children scored by their summaries
            keys = representative_reads(n, config, 0, exact_last)
            return round(per_child * summaries) + keys
        if exact_from:
            return representative_reads(n, config, r, exact_last, exact_from)
        if rerank:
            g = config.blocks_per_query_block
            return representative_reads(n, config, r, False) + int(
                rerank * g
            ) * config.block_size_k * (search_levels(n, config) > 0)
        if exact_all:
            return n * config.block_size_k  # a reference: every candidate key, at least
        if flat:
            return n * r + (flat * config.blocks_per_query_block * config.block_size_k
                            if flat > 1 else 0)  # fmt: skip
        return representative_reads(n, config, r, exact_last)

    select.r, select.exact_last, select.unrotated = r, exact_last, unrotated  # type: ignore[attr-defined]
    select.reads = reads  # type: ignore[attr-defined]
    select.bound = bound  # type: ignore[attr-defined]
    select.gauss, select.box = gauss, box  # type: ignore[attr-defined]
    select.rank, select.pair, select.iso = rank, pair, iso  # type: ignore[attr-defined]
    return select


_GAUSS_A = (("", 1.0), ("05", 0.5), ("075", 0.75), ("125", 1.25), ("15", 1.5), ("2", 2.0))

VARIANTS = {
    "rep2": ("2 representatives (pre-RoPE 2-means prototypes)", make_select(2, False, False)),
    "rep4": ("4 representatives (pre-RoPE 4-means prototypes)", make_select(4, False, False)),
    "rep2x": ("rep2, last level exact max logit", make_select(2, True, False)),
    "rep4x": ("rep4, last level exact max logit", make_select(4, True, False)),
    "rep2post": ("rep2 with post-RoPE prototypes/projections", make_select(2, False, True)),
    "rep2xpost": ("rep2x with post-RoPE prototypes/projections", make_select(2, True, True)),
    "rep4xpost": ("rep4x with post-RoPE prototypes/projections", make_select(4, True, True)),
    "rep8": ("8 representatives (pre-RoPE 8-means prototypes)", make_select(8, False, False)),
    "rep8x": ("rep8, last level exact max logit", make_select(8, True, False)),
    "rep4post": ("rep4 with post-RoPE prototypes/projections", make_select(4, False, True)),
    "rep8xpost": ("rep8x with post-RoPE prototypes/projections", make_select(8, True, True)),
    "rep2xx": (
        "rep2, the last two levels (2-block and 1-block children) exact",
        make_select(2, False, False, exact_from=2),
    ),
    # diagnostics (references or non-tree rules, to locate the loss)
    "bnd": (
        "this file's search over the library's max/min summaries (must reproduce hip)",
        make_select(2, False, False, bound=True),
    ),
    "bndx": (
        "the library's max/min tree, last level exact max logit",
        make_select(2, True, False, bound=True),
    ),
    "treecoarse": (
        "the library's tree, exact max logit on every level but the last; last by 2 reps",
        make_select(2, False, False, exact_all="coarse"),
    ),
    "treeexact": (
        "the library's tree, every child scored by its exact max logit (reference)",
        make_select(2, False, False, exact_all=True),
    ),
    "flat2": (
        "no tree: every block by its 2 representatives, top G",
        make_select(2, False, False, flat=1),
    ),
    "flat2r4": (
        "no tree: every block by its 2 representatives, top 4G, exact re-rank to G",
        # (reads at 64K: N * 2 + 4 * G * bk)
        make_select(2, False, False, flat=4),
    ),
    # Gaussian summaries: per node the mean key and per-dimension variance (2 * D values)
    **{
        f"gauss{tag}": (
            f"mean/variance tree, q.mu + {a} sqrt(2 ln m) sqrt(q^2 . var)",
            make_select(2, False, False, gauss=a),
        )
        for tag, a in _GAUSS_A
    },
    **{
        f"gauss{tag}x": (
            f"gauss a={a}, last level exact max logit",
            make_select(2, True, False, gauss=a),
        )
        for tag, a in _GAUSS_A
    },
    **{
        f"gaussbox{tag}": (
            f"gauss a={a} with var = (max - min)^2 / 4 per dim",
            make_select(2, False, False, gauss=a, box=True),
        )
        for tag, a in (("", 1.0), ("05", 0.5), ("15", 1.5))
    },
    **{
        f"gauss125r{tag}": (
            f"gauss a=1.25, the last level's top {m} G re-ranked by exact max logits",
            make_select(2, False, False, gauss=1.25, rerank=m),
        )
        for tag, m in (("125", 1.25), ("15", 1.5), ("2", 2.0), ("3", 3.0))
    },
    **{
        f"gauss125l{tag}": (
            f"gauss a=1.25 on the coarse levels, a={a} on single blocks",
            make_select(2, False, False, gauss=1.25, leaf=a),
        )
        for tag, a in (("05", 0.5), ("075", 0.75), ("1", 1.0), ("15", 1.5), ("2", 2.0))
    },
    **{
        f"gausspc{tag}": (
            f"gauss a=1.25 with the variance of q.k from the top {r} principal directions of "
            "each node's keys plus the diagonal left over (64: the exact q^T cov q)",
            make_select(2, False, False, gauss=1.25, rank=r),
        )
        for tag, r in (("1", 1), ("2", 2), ("4", 4), ("full", 64))
    },
    **{
        f"gauss{tag}{'x' if exact else ''}": (
            what + (", last level exact max logit" if exact else ""),
            make_select(2, exact, False, **rule),  # type: ignore[arg-type]
        )
        for tag, what, rule in (
            (
                "pair",
                "gauss a=1.25 with one variance per RoPE pair (1.5 vectors a node)",
                {"gauss": 1.25, "pair": True},
            ),
            (
                "iso",
                "gauss a=1.25 with one variance per node, the mean over dimensions "
                "(1 vector a node)",
                {"gauss": 1.25, "iso": True},
            ),
            (
                "lse",
                "mean/variance tree, children ranked by estimated softmax mass "
                "(q.mu + scale q^2.var / 2 + ln m / scale)",
                {"gauss": 1.0, "lse": True},
            ),
        )
        for exact in (False, True)
    },  # fmt: skip
    **{
        f"{base}g": (
            f"{base} whose tree is searched by the KV group's rows (its reads shared by the "
            "group) and whose exact leaves are ranked by each selection's own rows (with "
            "--head-sharing head: per query head)",
            make_select(2, True, False, gauss=1.25, pair=pair, group_tree=True),
        )
        for base, pair in (("gauss125x", False), ("gausspairx", True))
    },
    "gausspairxh15": (
        "gausspairxu with the leaves scored on half the dimensions (the RoPE pairs that matter "
        "most for the KV group's rows) and their top 1.5 G re-ranked on all of them",
        make_select(2, True, False, gauss=1.25, pair=True, union=True, half=True, rerank=1.5),
    ),
    "gausspairxu": (
        "gausspairx whose reads are counted per KV head: the distinct children its group's "
        "selections score (with --head-sharing head, what a kernel sharing the group's loads "
        "would read)",
        make_select(2, True, False, gauss=1.25, pair=True, union=True),
    ),
    # session 18: how the rows' votes combine (``vote``) and at which softmax scale
    **{
        f"{base}{tag}": (
            f"{base} ranked by {vote} votes at {vote_scale} x the attention scale"
            + (f", {penult} G nodes above the leaves" if penult else ""),
            make_select(
                2,
                base.endswith("x"),
                False,
                gauss=1.25,
                pair="pair" in base,
                vote=vote,
                vote_scale=vote_scale,
                penult=penult,
            ),
        )
        for base, tag, vote, vote_scale, penult in (
            ("gauss125x", "headmax", "headmax", 1.0, 0.0),
            ("gauss125x", "headmaxt2", "headmax", 2.0, 0.0),
            ("gauss125x", "headmaxt05", "headmax", 0.5, 0.0),
            ("gauss125x", "roundrobin", "roundrobin", 1.0, 0.0),
            ("gausspairx", "headmax", "headmax", 1.0, 0.0),
            ("gausspairx", "roundrobin", "roundrobin", 1.0, 0.0),
            ("gauss125x", "rowmax", "rowmax", 1.0, 0.0),
            ("gauss125x", "rowmaxt2", "rowmax", 2.0, 0.0),
            ("gauss125x", "rowmaxt05", "rowmax", 0.5, 0.0),
            ("gauss125x", "rowmaxt025", "rowmax", 0.25, 0.0),
            ("gauss125x", "rowmaxp1375", "rowmax", 1.0, 1.375),
            ("gauss125", "rowmax", "rowmax", 1.0, 0.0),
            ("gauss125", "rowmaxt05", "rowmax", 0.5, 0.0),
            ("gausspairx", "rowmaxt05", "rowmax", 0.5, 0.0),
        )
    },  # fmt: skip
}
METHODS.update(VARIANTS)

_original_method_attention = sp.method_attention


def method_attention(name: str):  # noqa: ANN201
    """The harness's drop-in, preceded for our variants by building this layer's tree."""
    attend = _original_method_attention(name)
    if name not in VARIANTS:
        return attend
    select = VARIANTS[name][1]

    def attend_with_state(q, k, v, config, *, scale=None, state=None):  # noqa: ANN001
        if select.gauss:  # type: ignore[attr-defined]
            if select.rank:  # type: ignore[attr-defined]
                tree = factor_tree(k, config, select.rank)  # type: ignore[attr-defined]
            else:
                tree = gaussian_tree(k, config, box=select.box, pair=select.pair, iso=select.iso)  # type: ignore[attr-defined]
            n = tree_blocks(k.shape[-2], config)
            _STATE["layer"] = LayerState(torch.empty(0), k.float(), n, tree)
            try:
                return attend(q, k, v, config, scale=scale, state=state)
            finally:
                _STATE.clear()
        inv_freq = None if select.unrotated else _INV_FREQ[0]  # type: ignore[attr-defined]
        _STATE["layer"] = build_state(q, k, config, select.r, inv_freq)  # type: ignore[attr-defined]
        if select.bound:  # type: ignore[attr-defined]
            tree = bound_tree(k, config)
            assert tree_capacity(tree) == _STATE["layer"].n
            _STATE["layer"].bound = tree
        try:
            return attend(q, k, v, config, scale=scale, state=state)
        finally:
            _STATE.clear()

    return attend_with_state


sp.method_attention = method_attention

_original_load_model = sp.load_model


def load_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """The harness's loader; also records the model's RoPE ``inv_freq`` (with the rotary's
    attention scaling checked to be 1, so that un-rotating is the exact inverse)."""
    lm = _original_load_model(*args, **kwargs)
    rotary = lm.model.model.rotary_emb
    assert float(getattr(rotary, "attention_scaling", 1.0)) == 1.0
    _INV_FREQ.append(rotary.inv_freq.detach().float().cpu())
    return lm


sp.load_model = load_model


if __name__ == "__main__":
    torch.set_num_threads(1)
    from hip_attn.geometry import query_blocks

    cfg = HiPConfig()
    n64k = int(query_blocks(65536, 65536, cfg).n_candidates[-1])
    print(f"reads at 64K (N = {n64k}):", {
        "hip": 4 * min(cfg.beam * cfg.blocks_per_query_block, n64k) * search_levels(n64k, cfg),
        **{m: f.reads(n64k, cfg) for m, (_, f) in VARIANTS.items()},
    }, flush=True)  # fmt: skip
    sys.exit(sp.main())
