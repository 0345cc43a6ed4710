"""What the harness measures for one query block and one selection, and how it adds up.

Dense attention of a query block is computed row block by row block against the keys it can
see (``n x end`` scores for ``n <= block_size_q`` queries: memory O(T * block), never T x T).
From it: each key's softmax mass averaged over the block's rows (``key_mass``) and the dense
output. A selection is then scored by

* **attention-mass recall**: the share of the dense softmax mass that falls on the keys the
  method attends (sinks + selected blocks + window, causally masked), mean over rows and heads;
* **span recall**: the share of each planted span's tokens the method attends, over the spans
  only the selection can reach (after the sinks, before the window) and the heads the spans
  matter to (:attr:`HeadKind.retrieves`);
* **output relative error**: ``||o - o_dense|| / ||o_dense||`` over all sampled rows and heads,
  with ``o`` from :func:`hip_attn.reference.hip_attention_reference` given the selection;
* **keys per query**: keys in each query's softmax, mean over rows and heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hip_attn.accuracy.methods import QueryBlock, Selection
from hip_attn.reference import attended_keys, hip_attention_reference


class HeadKind(Protocol):
    """What the metrics need to know of a head: a report label, and whether the relevant spans
    matter to it (span recall is measured on those heads only)."""

    @property
    def name(self) -> str: ...

    @property
    def retrieves(self) -> bool: ...


def dense_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention for queries ``q [B, Hq, n, D]`` at ``start .. start + n - 1``
    over ``k, v [B, Hkv, end, D]``, one head at a time in fp32.

    Returns:
        ``key_mass [B, Hq, end]`` (softmax mass per key, mean over the rows) and the dense
        output ``[B, Hq, n, D]`` (fp32).
    """
    b, hq, n, d = q.shape
    end = k.shape[2]
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    future = (
        torch.arange(end, device=q.device)[None, :]
        > (torch.arange(start, start + n, device=q.device)[:, None])
    )
    mass = torch.empty(b, hq, end, device=q.device)
    out = torch.empty(b, hq, n, d, device=q.device)
    for bi in range(b):
        for h in range(hq):
            kv = h // group
            s = (q[bi, h].float() @ k[bi, kv].float().T) * scale
            p = s.masked_fill(future, float("-inf")).softmax(dim=-1)
            mass[bi, h] = p.mean(dim=0)
            out[bi, h] = p @ v[bi, kv].float()
    return mass, out


@dataclass
class BlockScore:
    """One selection scored on one query block; tensors are ``[B, Hq]``.

    Attributes:
        mass: attention-mass recall of each head.
        keys_read: keys in each query's softmax, mean over the rows.
        err_sq, ref_sq: ``||o - o_dense||^2`` and ``||o_dense||^2`` of each head.
        span_hits: the attended share of each (batch, retrieval head, reachable span).
    """

    mass: torch.Tensor
    keys_read: torch.Tensor
    err_sq: torch.Tensor
    ref_sq: torch.Tensor
    span_hits: list[float]


def reachable_spans(
    spans: Sequence[tuple[int, int]], sink_tokens: int, window_start: int
) -> list[tuple[int, int]]:
    """The spans only a selection can reach: after the sinks and before the window."""
    return [(a, e) for a, e in spans if a >= sink_tokens and e <= window_start]


def score_selection(
    block: QueryBlock,
    selection: Selection,
    dense_out: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    profiles: Sequence[HeadKind],
) -> BlockScore:
    """Score ``selection`` on ``block`` against its dense attention (see the module doc)."""
    cfg = selection.config
    b, hq, n, _ = block.q.shape
    per_sel = hq // selection.indices.shape[1]
    out = hip_attention_reference(
        block.q.float(), block.k.float(), block.v.float(), cfg, indices=selection.indices
    ).float()
    pos = torch.arange(block.start, block.start + n)
    far = reachable_spans(spans, cfg.sink_tokens, block.window_start)
    mass = torch.empty(b, hq)
    keys_read = torch.empty(b, hq)
    hits: list[float] = []
    for bi in range(b):
        for h in range(hq):
            selected = selection.indices[bi, h // per_sel, 0]
            keys = attended_keys(block.end, block.window_start, selected, cfg)
            mass[bi, h] = block.key_mass[bi, h, keys.to(block.key_mass.device)].sum().cpu()
            keys_read[bi, h] = torch.searchsorted(keys, pos, right=True).float().mean()
            if profiles[h].retrieves and far:
                inside = torch.zeros(block.end, dtype=torch.bool)
                inside[keys] = True
                hits += [float(inside[a:e].float().mean()) for a, e in far]
    diff = (out - dense_out).pow(2).sum(dim=(-1, -2)).cpu()
    ref = dense_out.pow(2).sum(dim=(-1, -2)).cpu()
    return BlockScore(mass, keys_read, diff, ref, hits)


@dataclass
class MethodTotals:
    """Running totals of one method over the sampled query blocks of one context."""

    profiles: Sequence[HeadKind]
    mass: list[torch.Tensor] = field(default_factory=list)
    keys_read: list[torch.Tensor] = field(default_factory=list)
    err_sq: float = 0.0
    ref_sq: float = 0.0
    span_hits: list[float] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)

    def add(self, score: BlockScore, reads: int) -> None:
        self.mass.append(score.mass)
        self.keys_read.append(score.keys_read)
        self.err_sq += float(score.err_sq.sum())
        self.ref_sq += float(score.ref_sq.sum())
        self.span_hits += score.span_hits
        self.reads.append(reads)

    def summary(self) -> dict[str, object]:
        """Means over blocks, rows and heads (JSON-ready)."""
        mass = torch.stack(self.mass)  # [blocks, B, Hq]
        by_profile: dict[str, float] = {}
        for name in dict.fromkeys(p.name for p in self.profiles):
            heads = [i for i, p in enumerate(self.profiles) if p.name == name]
            by_profile[name] = float(mass[..., heads].mean())
        hits = self.span_hits
        return {
            "mass_recall": float(mass.mean()),
            "mass_recall_min": float(mass.amin()),
            "mass_recall_by_head_type": by_profile,
            "span_recall": sum(hits) / len(hits) if hits else None,
            "span_cases": len(hits),
            "out_rel_err": (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0,
            "keys_per_query": float(torch.stack(self.keys_read).mean()),
            "select_reads": sum(self.reads) / len(self.reads),
        }


def mass_breakdown(
    key_mass: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    sink_tokens: int,
    window_start: int,
) -> torch.Tensor:
    """Dense mass of each head ``[B, Hq, 4]`` on: sinks, window, planted spans (outside both),
    the rest."""
    end = key_mass.shape[-1]
    where = torch.full((end,), 3, dtype=torch.long)
    for a, e in spans:
        where[a:e] = 2
    where[window_start:] = 1
    where[: min(sink_tokens, end)] = 0
    out = torch.zeros(*key_mass.shape[:-1], 4)
    out.index_add_(-1, where, key_mass.cpu())
    return out
