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

from typing import NamedTuple

import torch

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


def search_levels(n_candidates: int, config: HiPConfig) -> int:
    """Levels of the tree search over ``n_candidates`` blocks (0 when all are selected).

    The search starts from ``width = min(beam * G, N)`` nodes of ``ceil(N / width)`` blocks at
    most and halves them until they are single blocks: ``ceil(log2(ceil(N / width)))`` levels,
    and at least one (when every start node is already a single block, one level ranks them).
    """
    g = config.blocks_per_query_block
    if n_candidates <= g:
        return 0
    width = min(config.beam * g, n_candidates)
    largest = -(-n_candidates // width)
    return max(1, (largest - 1).bit_length())


def block_representatives(k: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """``R``: one key per *full* key block, ``[B, Hkv, Tk // bk, D]`` in the dtype of ``k``.

    ``"center"`` takes the key of the block's middle token (index ``bk // 2``): a strided view of
    ``k``, nothing is copied. ``"mean"`` is the mean of its ``bk`` keys (summed in fp32). Only
    full blocks can be candidates, so a trailing partial block has no representative.
    """
    bk = config.block_size_k
    n_blocks = k.shape[-2] // bk
    blocks = k[..., : n_blocks * bk, :].unflatten(-2, (n_blocks, bk))
    if config.representative == "center":
        return blocks[..., bk // 2, :]
    return blocks.float().mean(dim=-2).to(k.dtype)


def pool_queries(q: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """Mean-pool consecutive query rows in groups of ``query_pool_stride``:
    ``[B, Hq, ceil(Tq / stride), D]`` in the dtype of ``q``. Groups never straddle query blocks
    (the stride divides ``block_size_q``); the last group may be partial and is averaged over
    the rows it has. Means are taken in fp32 and rounded once to ``q``'s dtype, so that the
    search's dot products with the (same-dtype) representatives run on tensor cores; the
    products of two 16-bit floats are exact in the fp32 accumulator."""
    stride = config.query_pool_stride
    tq = q.shape[-2]
    full = tq // stride
    # sum in fp32 without an fp32 copy of q (at 128K tokens that copy alone would be GBs)
    pooled = q[..., : full * stride, :].unflatten(-2, (full, stride)).sum(-2, dtype=torch.float32)
    pooled = pooled / stride
    if tq % stride:
        tail = q[..., full * stride :, :].sum(-2, keepdim=True, dtype=torch.float32)
        pooled = torch.cat([pooled, tail / (tq % stride)], dim=-2)
    return pooled.to(q.dtype)
