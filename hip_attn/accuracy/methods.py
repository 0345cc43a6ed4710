"""Block-selection methods compared by the accuracy harness.

Every method answers one question for one query block: *which* ``G = k / block_size_k`` key
blocks of the candidate region (DESIGN.md section 3) does it attend besides the sinks and the
window? The answer has the format of :func:`hip_attn.estimate_mask`, ``[B, H_sel, 1, G]``
int32, ascending, ``-1`` padded, so that one attention routine
(:func:`hip_attn.reference.hip_attention_reference` with ``indices=``) serves them all and the
methods differ only in the blocks they pick:

* ``dense``: every candidate block (the budget widened to cover them): exact attention.
* ``oracle``: the ``G`` blocks holding the most dense softmax mass, summed over the block's
  queries and the heads sharing the selection. It maximizes the attention-mass recall, so no
  method can beat it on that metric; it needs the full attention to choose, so it is an upper
  bound, not a method one could run.
* ``exact``: the ``G`` blocks ranked like HiP ranks children (per-row softmax, each block's
  largest share over the block's rows and sharing heads) but from each row's *exact* largest
  logit in the block rather than a bound on it, every query row unpooled. It reads every
  candidate key, so it is a reference, not a method: the gap between ``hip`` and ``exact`` is
  what the node summaries and the query pooling lose.
* ``hip``: HiP's tree search (:func:`hip_attn.estimate_mask`): aligned nodes summarized by the
  mean and variance of their keys, each row's largest logit in a child estimated from them
  (with ``leaf_scores="keys"``, on the last level read from the block's keys),
  children ranked by their largest per-row softmax share.
* ``quest``: per key block the elementwise min and max of its keys; a block scores
  ``sum_d max(q_d min_d, q_d max_d)`` (an upper bound on ``q . k`` over the block), max over
  the block's pooled query rows (and heads sharing the selection); the top ``G`` blocks.
* ``streaming``: sinks + a sliding window only (StreamingLLM-like): its ``G`` blocks are the
  most recent candidates, i.e. the window grown by ``k`` tokens.

``reads`` counts the key-sized vectors each method's *selection* reads per query block and
selection head (the attention itself reads sinks + ``k`` + window for all but ``dense``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hip_attn.config import HiPConfig
from hip_attn.geometry import first_candidate_block, pool_queries, vote_shares
from hip_attn.perf.estimator import search_vectors


@dataclass
class QueryBlock:
    """One query block and the keys it may see.

    Attributes:
        q: its queries ``[B, Hq, n, D]`` (``n <= block_size_q``), at absolute positions
            ``start .. end - 1``.
        k, v: the keys and values up to ``end``, ``[B, Hkv, end, D]``.
        start, end: absolute positions ``[s, e)`` of the queries.
        window_start: first key of its window.
        n_candidates: N, the candidate key blocks.
        key_mass: ``[B, Hq, end]`` fp32: dense softmax mass of each key, averaged over the
            block's query rows (what the oracle ranks by and the recall is measured with).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    start: int
    end: int
    window_start: int
    n_candidates: int
    key_mass: torch.Tensor


@dataclass
class Selection:
    """A method's answer for one :class:`QueryBlock`.

    Attributes:
        indices: ``[B, H_sel, 1, G]`` int32 key blocks, ascending, ``-1`` padded.
        config: the configuration ``indices`` is meant for (``dense`` widens ``k``).
        reads: key-sized vectors the selection read per selection head.
    """

    indices: torch.Tensor
    config: HiPConfig
    reads: int


SelectFn = Callable[[QueryBlock, HiPConfig], Selection]


def selection_heads(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> int:
    """H_sel: KV heads with ``head_sharing="kv_group"``, query heads with ``"head"``."""
    return k.shape[1] if config.head_sharing == "kv_group" else q.shape[1]


def _group_max(scores: torch.Tensor, h_sel: int) -> torch.Tensor:
    """``[B, Hq, N]`` -> ``[B, H_sel, N]``, max over the query heads sharing a selection."""
    b, hq, n = scores.shape
    return scores.view(b, h_sel, hq // h_sel, n).amax(dim=2)


def top_blocks(scores: torch.Tensor, config: HiPConfig, first: int) -> torch.Tensor:
    """The ``G`` best-scoring candidates of ``scores [B, H_sel, N]`` (ties: lower block) as
    ``[B, H_sel, 1, G]`` int32 block indices, ascending, ``-1`` padded."""
    g = config.blocks_per_query_block
    b, h, n = scores.shape
    out = torch.full((b, h, 1, g), -1, dtype=torch.int32, device=scores.device)
    if n == 0:
        return out
    order = torch.sort(-scores.float(), dim=-1, stable=True).indices[..., :g]
    out[..., 0, : order.shape[-1]] = (order.sort(dim=-1).values + first).to(torch.int32)
    return out


def _range_blocks(
    lo: int, hi: int, g: int, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    out = torch.full((*shape, 1, g), -1, dtype=torch.int32, device=device)
    out[..., 0, : hi - lo] = torch.arange(lo, hi, dtype=torch.int32, device=device)
    return out


def select_dense(block: QueryBlock, config: HiPConfig) -> Selection:
    """Every candidate block; the budget is widened so that the indices fit."""
    n, first = block.n_candidates, first_candidate_block(config)
    wide = config.replace(k=max(config.k, n * config.block_size_k))
    h_sel = selection_heads(block.q, block.k, config)
    shape = (block.q.shape[0], h_sel)
    indices = _range_blocks(first, first + n, wide.blocks_per_query_block, shape, block.q.device)
    return Selection(indices, wide, 0)


def select_streaming(block: QueryBlock, config: HiPConfig) -> Selection:
    """The most recent ``G`` candidate blocks: sinks + a window grown by ``k``."""
    n, first, g = block.n_candidates, first_candidate_block(config), config.blocks_per_query_block
    h_sel = selection_heads(block.q, block.k, config)
    shape = (block.q.shape[0], h_sel)
    lo = first + max(0, n - g)
    return Selection(_range_blocks(lo, first + n, g, shape, block.q.device), config, 0)


def _candidate_keys(block: QueryBlock, config: HiPConfig) -> torch.Tensor:
    """Keys of the candidate blocks as ``[B, Hkv, N, bk, D]`` (fp32)."""
    bk, first = config.block_size_k, first_candidate_block(config)
    keys = block.k[:, :, first * bk : (first + block.n_candidates) * bk].float()
    return keys.unflatten(2, (block.n_candidates, bk))


def quest_scores(block: QueryBlock, config: HiPConfig) -> torch.Tensor:
    """``[B, H_sel, N]``: per candidate block, ``sum_d max(q_d min_d, q_d max_d)`` with the
    elementwise min and max of its keys, max over the pooled query rows and sharing heads. It
    bounds every ``q . k`` of the block from above."""
    h_sel = selection_heads(block.q, block.k, config)
    keys = _candidate_keys(block, config)
    kmin, kmax = keys.amin(dim=3), keys.amax(dim=3)  # [B, Hkv, N, D]
    pooled = pool_queries(block.q, config)  # [B, Hq, P, D]
    group = block.q.shape[1] // block.k.shape[1]
    kmin, kmax = (x.repeat_interleave(group, dim=1) for x in (kmin, kmax))
    upper = pooled.clamp(min=0) @ kmax.transpose(-1, -2)
    upper += pooled.clamp(max=0) @ kmin.transpose(-1, -2)  # [B, Hq, P, N]
    return _group_max(upper.amax(dim=2), h_sel)


def select_quest(block: QueryBlock, config: HiPConfig) -> Selection:
    """Top ``G`` blocks by the min/max bound of :func:`quest_scores`."""
    first, n = first_candidate_block(config), block.n_candidates
    scores = quest_scores(block, config)
    return Selection(top_blocks(scores, config, first), config, 2 * n)


def select_oracle(block: QueryBlock, config: HiPConfig) -> Selection:
    """Top ``G`` blocks by their true dense softmax mass (summed over the sharing heads)."""
    bk, first, n = config.block_size_k, first_candidate_block(config), block.n_candidates
    h_sel = selection_heads(block.q, block.k, config)
    mass = block.key_mass[..., first * bk : (first + n) * bk].unflatten(-1, (n, bk)).sum(-1)
    b, hq, _ = mass.shape
    scores = mass.view(b, h_sel, hq // h_sel, n).sum(dim=2)
    return Selection(top_blocks(scores, config, first), config, block.end)


def select_exact(block: QueryBlock, config: HiPConfig) -> Selection:
    """Top ``G`` blocks by HiP's vote (each row's softmax at ``VOTE_SCALE`` times the
    attention scale, a block keeping its largest share over the rows and sharing heads) over
    each row's exact max logit in the block."""
    bk, first, n = config.block_size_k, first_candidate_block(config), block.n_candidates
    h_sel = selection_heads(block.q, block.k, config)
    scale = block.q.shape[-1] ** -0.5
    group = block.q.shape[1] // block.k.shape[1]
    keys = _candidate_keys(block, config).repeat_interleave(group, dim=1)  # [B, Hq, N, bk, D]
    logits = torch.einsum("bhrd,bhnkd->bhrnk", block.q.float(), keys).amax(-1)  # [B, Hq, r, N]
    votes = vote_shares(logits, scale).amax(dim=2)  # [B, Hq, N]
    b, hq, _ = votes.shape
    scores = votes.view(b, h_sel, hq // h_sel, n).amax(dim=2)
    return Selection(top_blocks(scores, config, first), config, n * bk)


def hip_search_reads(n_candidates: int, config: HiPConfig) -> int:
    """Upper bound on the key-sized vectors HiP's search reads for ``n_candidates`` blocks, in
    whole vectors: the roofline's count (:func:`hip_attn.perf.estimator.search_vectors`: 1.5
    vectors a node summary, with ``leaf_scores="keys"`` a last-level child's
    ``block_size_k`` keys)."""
    return math.ceil(search_vectors(n_candidates, config))


def select_hip(block: QueryBlock, config: HiPConfig) -> Selection:
    """HiP's selection through :func:`hip_attn.estimate_mask`."""
    from hip_attn.attention import estimate_mask

    indices = estimate_mask(block.q, block.k, config)
    return Selection(indices, config, hip_search_reads(block.n_candidates, config))


#: Method name -> (one-line description, selection function), in report order.
METHODS: dict[str, tuple[str, SelectFn]] = {
    "dense": ("exact causal attention (every key)", select_dense),
    "oracle": ("top-G blocks by true softmax mass (upper bound, needs dense)", select_oracle),
    "exact": ("top-G blocks by exact per-row max logit (reference, reads every key)", select_exact),
    "hip": ("HiP tree search over mean/variance node summaries", select_hip),
    "quest": ("top-G blocks by per-block min/max bound (Quest-like)", select_quest),
    "streaming": ("sinks + window grown by k (StreamingLLM-like)", select_streaming),
}

#: Methods that are not sparse competitors (excluded when marking the best method).
REFERENCE_METHODS = ("dense", "oracle", "exact")
