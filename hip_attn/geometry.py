"""Where each query block's keys come from: the block layout shared by the reference and the
kernels, so that both read one definition (DESIGN.md section 3).

Query block ``j`` covers query rows ``[j * bq, min((j + 1) * bq, Tq))``, i.e. absolute positions
``[s, e)`` with ``s = Tk - Tq + j * bq``. Key block ``b`` covers keys ``[b * bk, (b + 1) * bk)``.

* sinks: keys ``[0, sink_tokens)`` (causally masked, so a query before the end of the sinks sees
  only the sinks up to itself);
* candidates: the key blocks fully inside ``[sink_tokens, s - window)``, i.e. blocks
  ``first_candidate .. first_candidate + n_candidates - 1``;
* window: keys ``[window_start, e)`` with
  ``window_start = max(sink_tokens, bk * floor((s - window) / bk))``.

The window start is rounded down to a block boundary so that the partial key block straddling
``s - window`` belongs to the window: sinks, candidates and window are then disjoint *and* cover
``[0, e)``, which is what makes HiP exact when the budget covers every candidate.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from einops import rearrange

from hip_attn.config import HiPConfig


class QueryBlocks(NamedTuple):
    """Per query block geometry, each an int64 tensor of shape ``[n_query_blocks]``."""

    start: torch.Tensor  # absolute position of the block's first query (s)
    end: torch.Tensor  # one past its last query (e)
    n_candidates: torch.Tensor  # N: candidate key blocks
    window_start: torch.Tensor  # first key of the window


def num_query_blocks(tq: int, config: HiPConfig) -> int:
    return -(-tq // config.block_size_q)


def first_candidate_block(config: HiPConfig) -> int:
    """Index of the first key block after the sinks (sink_tokens is a multiple of bk)."""
    return config.sink_tokens // config.block_size_k


def query_blocks(
    tq: int, tk: int, config: HiPConfig, device: torch.device | str = "cpu"
) -> QueryBlocks:
    """The geometry of every query block for ``tq`` queries ending at key ``tk``."""
    bq, bk = config.block_size_q, config.block_size_k
    rows = torch.arange(num_query_blocks(tq, config), device=device, dtype=torch.int64) * bq
    start = tk - tq + rows
    end = tk - tq + torch.clamp(rows + bq, max=tq)
    candidate_end = torch.div(torch.clamp(start - config.window, min=0), bk, rounding_mode="floor")
    n_candidates = torch.clamp(candidate_end - first_candidate_block(config), min=0)
    window_start = torch.clamp(candidate_end * bk, min=config.sink_tokens)
    return QueryBlocks(start, end, n_candidates, window_start)


def first_window_start(tq: int, tk: int, config: HiPConfig) -> int:
    """The first key of the window of the first of ``tq`` queries ending at key ``tk`` (the
    earliest any of them reads there), as :func:`query_blocks` places it, from host ints."""
    candidate_end = max(tk - tq - config.window, 0) // config.block_size_k
    return max(candidate_end * config.block_size_k, config.sink_tokens)


def search_width(n_candidates: int, config: HiPConfig) -> int:
    """Nodes the levels before the last keep: ``beam * G``, but never fewer than the set bits
    of ``N`` (the aligned pieces of ``N`` blocks, so a start partition always exists) nor more
    than ``N``."""
    wanted = max(config.beam * config.blocks_per_query_block, n_candidates.bit_count())
    return min(n_candidates, wanted)


def most_candidates(tq: int, tk: int, config: HiPConfig) -> int:
    """N of the last query block, the largest of all (candidates only grow with the position),
    from host integers: no device read."""
    last_start = tk - tq + (num_query_blocks(tq, config) - 1) * config.block_size_q
    end = max(0, last_start - config.window) // config.block_size_k
    return max(0, end - first_candidate_block(config))


def selection_config(tq: int, tk: int, config: HiPConfig) -> HiPConfig:
    """``config`` with ``k`` narrowed to the most candidate blocks any query block has (at
    least one block): a larger budget selects every candidate all the same, and the
    selection's width, its memory, must not grow with ``k`` beyond the context."""
    n_max = most_candidates(tq, tk, config)
    if n_max >= config.blocks_per_query_block:
        return config
    return config.replace(k=max(1, n_max) * config.block_size_k)


def start_level(n_candidates: int, width: int) -> int:
    """``L0``: the smallest level whose aligned nodes cover ``n_candidates`` blocks in at most
    ``width`` (>= the set bits of ``n_candidates``) nodes: the complete ``2**L0``-block nodes,
    then one node per set bit of the remainder, largest first."""
    level, pieces = 0, 0  # pieces: set bits of n below `level`
    while (n_candidates >> level) + pieces > width:
        pieces += (n_candidates >> level) & 1
        level += 1
    return level


def search_levels(n_candidates: int, config: HiPConfig) -> int:
    """Levels of the tree search over ``n_candidates`` blocks (0 when all are selected): every
    level halves each node of the start partition (:func:`start_level`) until all are single
    blocks, and at least one level ranks them."""
    if n_candidates <= config.blocks_per_query_block:
        return 0
    return max(1, start_level(n_candidates, search_width(n_candidates, config)))


def level_offset(level: int, capacity: int) -> int:
    """Row of the first node of ``level`` in a summary tree allocated for ``capacity`` blocks:
    level ``l`` has ``capacity >> l`` rows, after those of the levels below it (the rows of
    the levels from ``level`` up are the tree of ``capacity >> level`` blocks)."""
    return tree_rows(capacity) - tree_rows(capacity >> level)


def tree_rows(capacity: int) -> int:
    """Rows of a summary tree allocated for ``capacity`` blocks (all levels):
    ``sum(capacity >> l for l >= 0)``, which is ``2 * capacity - popcount(capacity)`` (a set
    bit of weight ``2^j`` contributes ``2^(j+1) - 1``). Decode calls this every step: O(1)."""
    return 2 * capacity - capacity.bit_count()


def tree_blocks(tk: int, config: HiPConfig) -> int:
    """Full key blocks after the sinks among ``tk`` keys: the blocks a summary tree covers."""
    return max(0, tk // config.block_size_k - first_candidate_block(config))


def node_summaries(
    k: torch.Tensor,
    config: HiPConfig,
    tree: torch.Tensor | None = None,
    done: int = 0,
    *,
    min_capacity: int = 0,
) -> torch.Tensor:
    """The summary tree the search reads: ``[B, Hkv, tree_rows(capacity), summary_width(D)]``
    in ``k``'s dtype, which is ``1.5 * D`` values per block and level: about 3/8 the size of
    ``k``.

    Node ``i`` of level ``l`` covers the candidate-area blocks ``[i * 2**l, (i + 1) * 2**l)``
    (block 0 is the first block after the sinks). Its row ``level_offset(l, capacity) + i``
    (``capacity`` is the last dimension's allocation in blocks, see :func:`extend_summaries`)
    holds the mean of the node's keys (``D`` values), then one variance per dimension pair
    ``(d, d + D/2)``, the pair RoPE rotates together (``D/2`` values: the mean of the two
    dimensions' population variances, :func:`paired`). The search estimates the largest logit
    of a query row ``q`` over the node's ``m`` keys as ``q . mean + spread(l) * sqrt(q**2 .
    [var, var])`` (:func:`level_spreads`), what the largest of ``m`` Gaussian logits with that
    mean and variance would be. Only complete nodes are written (the search reads no others),
    so a node's summary never depends on keys after it.

    Why pairs: as a node's keys sit at different positions, RoPE turns each pair's energy
    between its two dimensions, so the pair's mean variance estimates either better than the
    dimension's own, and costs a quarter less to read (docs/accuracy.md, "Pair variances").

    ``tree`` with ``done`` blocks already summarized is extended (see :func:`extend_summaries`;
    a new allocation holds at least ``min_capacity`` blocks: room to extend in place).
    """
    keys, done = blocks_after(k, config, tree, done)
    return extend_summaries(tree, keys, done, config, min_capacity=min_capacity)


def blocks_after(
    k: torch.Tensor, config: HiPConfig, tree: torch.Tensor | None, done: int
) -> tuple[torch.Tensor, int]:
    """The whole key blocks of ``k`` a tree holding ``done`` of them lacks, and the blocks it
    keeps: ``done``, or 0 when there is no tree or ``k`` has fewer blocks (a new sequence)."""
    bk, first = config.block_size_k, first_candidate_block(config)
    n = tree_blocks(k.shape[-2], config)
    if tree is None or done > n:
        done = 0
    return k[..., (first + done) * bk : (first + n) * bk, :], done


def extends_in_place(tree: torch.Tensor, k: torch.Tensor, done: int, config: HiPConfig) -> bool:
    """Whether ``tree``, holding its first ``done`` blocks, can take every complete block of
    the keys ``k`` ``[B, Hkv, Tk, D]`` in its own allocation (:func:`holds_blocks`)."""
    return holds_blocks(tree, k, done, tree_blocks(k.shape[-2], config))


def holds_blocks(tree: torch.Tensor, keys: torch.Tensor, done: int, n: int) -> bool:
    """Whether ``tree``, holding its first ``done`` blocks, can take blocks ``done .. n - 1``
    of keys like ``keys`` ``[B, Hkv, T, D]`` in its own allocation: built for their batch,
    heads and head dim on their device, room for ``n`` blocks, unit stride on the last
    dimension of both."""
    b, h, _, d = keys.shape
    return (
        tuple(tree.shape[:2]) == (b, h)
        and tree.shape[-1] == summary_width(d)
        and tree.device == keys.device
        and done <= n <= tree_capacity(tree)
        and keys.stride(-1) == 1
        and tree.stride(-1) == 1
    )


def tree_capacity(tree: torch.Tensor | None) -> int:
    """The blocks ``tree`` was allocated for (the largest capacity with its row count)."""
    return 0 if tree is None else _capacity_of_rows(tree.shape[-2])


@functools.lru_cache(maxsize=256)
def _capacity_of_rows(rows: int) -> int:
    lo, hi = 0, rows  # tree_rows is increasing: binary search its inverse
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tree_rows(mid) <= rows:
            lo = mid
        else:
            hi = mid - 1
    return lo


def extend_summaries(
    tree: torch.Tensor | None,
    keys: torch.Tensor,
    done: int,
    config: HiPConfig,
    *,
    min_capacity: int = 0,
) -> torch.Tensor:
    """A summary tree of ``done`` blocks (``None`` when ``done`` is 0) extended by ``keys``
    ``[B, Hkv, whole blocks, D]``, the blocks that follow them. A new tree is allocated for
    its blocks, or ``min_capacity`` when that is more (a tree that decode will extend:
    its first refresh then extends in place); a tree that grows (decode and offload append a
    block at a time) is extended in place while its capacity holds the blocks, else copied
    into one with a quarter more room, so appending costs O(1) amortized per block."""
    bk, d = config.block_size_k, keys.shape[-1]
    n = done + keys.shape[-2] // bk
    tree = with_room(tree, keys, done, config, min_capacity=min_capacity)
    capacity = tree_capacity(tree)
    blocks = rearrange(keys, "b h (n t) d -> b h n t d", t=bk)  # the leaves: one block each
    mean, var = leaf_moments(blocks)
    tree[..., done:n, :d] = mean
    tree[..., done:n, d:] = saturated(paired(var), tree.dtype)
    for level in range(1, n.bit_length()):
        lo, hi = done >> level, n >> level
        if lo == hi:
            continue
        below = level_offset(level - 1, capacity)
        children = tree[..., below + 2 * lo : below + 2 * hi, :].float()
        halves = rearrange(children, "b h (n two) c -> b h n two c", two=2)  # a node's halves
        mean, var = merged_moments(halves[..., 0, :d], halves[..., 0, d:], halves[..., 1, :d],
                                   halves[..., 1, d:])  # fmt: skip
        row = level_offset(level, capacity)
        tree[..., row + lo : row + hi, :d] = mean
        tree[..., row + lo : row + hi, d:] = saturated(var, tree.dtype)
    return tree


def with_room(
    tree: torch.Tensor | None,
    keys: torch.Tensor,
    done: int,
    config: HiPConfig,
    *,
    min_capacity: int = 0,
) -> torch.Tensor:
    """``tree`` (``done`` blocks summarized) when its allocation holds the blocks of ``keys``
    too (see :func:`extend_summaries`), else a new one with its ``done`` blocks' nodes copied
    over (zeros elsewhere): room for those blocks, or ``min_capacity``, and a quarter more when
    an existing tree grows."""
    b, h, new_keys, d = keys.shape
    n = done + new_keys // config.block_size_k
    capacity = tree_capacity(tree)
    if tree is not None and capacity >= n:
        return tree
    grown_capacity = max(n if tree is None else n + n // 4, min_capacity)
    grown = keys.new_zeros(b, h, tree_rows(grown_capacity), summary_width(d))
    if tree is not None and done:  # copy the old levels to their new rows
        for level in range(done.bit_length()):
            count = done >> level
            src, dst = level_offset(level, capacity), level_offset(level, grown_capacity)
            grown[..., dst : dst + count, :] = tree[..., src : src + count, :]
    return grown


def leaf_moments(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and population variance over dim ``-2`` of ``blocks`` (one key block each), in
    fp32, summed in row order (the order the tree kernel sums in, so both round alike)."""
    rows = blocks.shape[-2]
    total = blocks[..., 0, :].float()
    for i in range(1, rows):
        total = total + blocks[..., i, :].float()
    mean = total / rows
    spread = (blocks[..., 0, :].float() - mean) ** 2
    for i in range(1, rows):
        spread = spread + (blocks[..., i, :].float() - mean) ** 2
    return mean, spread / rows


def saturated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x >= 0`` capped at float16's largest value when it is to be stored in float16,
    so squares and variances stay finite there (``inf`` times a zero makes a NaN score, and one
    NaN row ties every child); other dtypes hold every fp32 value the search makes."""
    return x.clamp(max=torch.finfo(dtype).max) if dtype == torch.float16 else x


def summary_width(head_dim: int) -> int:
    """Values per node of a summary tree over keys of ``head_dim`` (even) dimensions: the
    mean, then one variance per dimension pair (:func:`node_summaries`)."""
    if head_dim % 2:
        raise ValueError(
            f"the head dim must be even (the summaries pair dimensions d and d + D/2, as RoPE "
            f"does), got {head_dim}"
        )
    return head_dim + head_dim // 2


def paired(x: torch.Tensor) -> torch.Tensor:
    """The mean of dimensions ``d`` and ``d + D/2`` of ``x`` ``[..., D]``: ``[..., D/2]``."""
    half = x.shape[-1] // 2
    return (x[..., :half] + x[..., half:]) * 0.5


def merged_moments(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and pair variances (:func:`node_summaries`) of the union of two equally large sets
    of keys, from theirs (exact): the mean of the means, and the mean of the pair variances
    plus each pair's mean squared half-difference of the means."""
    half = (mean_a - mean_b) * 0.5
    return (mean_a + mean_b) * 0.5, (var_a + var_b) * 0.5 + paired(half * half)


#: ``a`` in a node's spread ``a * sqrt(2 ln m)`` (:func:`level_spreads`): 1.25 ranked best among
#: 0.5-1.5 on SmolLM2 at 8K with unpooled rows, and beat 1 with the default pooled rows
#: (docs/accuracy.md, "Node summaries"). It is the asymptotic expected maximum of ``m``
#: independent Gaussians (``sqrt(2 ln m)``) inflated by a quarter, not a derived constant.
SPREAD = 1.25
#: The ranking's per-row softmax runs at this multiple of the attention scale: softer than the
#: attention itself, so a row's vote reaches the children close to its best. 0.5 ranked best
#: among 0.25-2 on SmolLM2 at 8K with each child keeping its largest vote over the rows
#: (docs/accuracy.md, "Votes"); an empirical constant like SPREAD.
VOTE_SCALE = 0.5
#: levels of the summary tree a spread table covers (26 bits of node start in the mask kernel)
MAX_LEVELS = 32


@functools.lru_cache(maxsize=16)
def level_spreads(block_size_k: int) -> tuple[float, ...]:
    """Per tree level ``l``, the multiple of a node's logit standard deviation its largest
    logit is estimated at: ``SPREAD * sqrt(2 ln m)`` for its ``m = block_size_k * 2**l`` keys
    (the expected largest of ``m`` Gaussian samples, in standard deviations), each rounded to
    fp32 once, so the reference and the kernels scale by the same numbers."""
    spreads = [SPREAD * math.sqrt(2 * math.log(block_size_k << lv)) for lv in range(MAX_LEVELS)]
    return tuple(torch.tensor(spreads, dtype=torch.float32).tolist())


def vote_shares(estimates: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's softmax over the last dimension of ``estimates`` (its estimated logits of
    the children) at ``scale * VOTE_SCALE``: the shares of which a child keeps the largest over
    the rows. Written as the mask kernel's ``_row_votes`` computes it (the exponent of each
    estimate's difference to the row's largest, then normalized)."""
    if estimates.shape[-1] == 0:  # no children: no row has a largest estimate
        return estimates.clone()
    p = torch.exp((estimates - estimates.amax(dim=-1, keepdim=True)) * (scale * VOTE_SCALE))
    return p / p.sum(dim=-1, keepdim=True)


def pool_queries(q: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """Mean-pool consecutive query rows in groups of ``query_pool_stride``:
    ``[B, Hq, ceil(Tq / stride), D]`` in the dtype of ``q``. Groups never straddle query blocks
    (the stride divides ``block_size_q``); the last group may be partial and is averaged over
    the rows it has. Means are taken in fp32 (a sum in row order, the order the search kernel
    adds them in, so both round alike) and rounded once to ``q``'s dtype, so that the search's
    dot products with the (same-dtype) node summaries run on tensor cores; the products of two
    16-bit floats are exact in the fp32 accumulator."""
    stride = config.query_pool_stride
    tq = q.shape[-2]
    groups = -(-tq // stride)
    # one fp32 group-sized accumulator, never an fp32 copy of q (GBs at 128K tokens)
    total = q.new_zeros((*q.shape[:-2], groups, q.shape[-1]), dtype=torch.float32)
    for i in range(stride):
        rows = q[..., i::stride, :]
        total[..., : rows.shape[-2], :] += rows
    present = torch.full((groups, 1), stride, dtype=torch.float32, device=q.device)
    if tq % stride:
        present[-1] = tq % stride
    return (total / present).to(q.dtype)
