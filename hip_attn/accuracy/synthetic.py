"""Synthetic attention inputs with the structure real attention has.

Real attention is not random: keys drift slowly along the sequence (text has topics), a few
tokens soak up a large share of the mass (attention sinks), many heads look mostly at recent
tokens, and retrieval heads put their mass on a few short spans far back in the context. Random
Gaussian ``q, k`` have none of this, which makes every sparse method look equally bad (nothing
is worth selecting). :func:`make_inputs` builds ``q, k, v`` with all four, controlled by a seed.

Construction, per KV head, in a basis that is rotated by a random orthogonal matrix at the end
(so that no method profits from structure sitting on coordinate axes):

* one *sink* direction and one direction per planted *span*; the remaining ``D - 1 - spans``
  dimensions are the *content* subspace;
* content keys ``= sqrt(0.45) topic + sqrt(0.35) drift + sqrt(0.2) noise``: ``topic`` is
  constant over segments of random length (mean ``segment`` tokens), ``drift`` an AR(1) process
  with correlation length ``correlation`` tokens; unit variance per dimension;
* the first ``sink_keys`` keys carry the sink direction (norm ``sqrt(D)``); the keys of span ``i``
  carry span direction ``i`` with a per-token weight in ``[0.6, 1]`` (spans of 16-256 tokens,
  log-uniform, planted in the first 70% of the context);
* values: a topic part and noise, unit variance.

Query heads take one of the :data:`PROFILES` in turn. A query ``q_t`` is made of logits, not
vectors: the sink coordinate is ``sink`` (the logit sink keys get), each span coordinate is
``span`` (all spans are relevant to every later query), the content part is ``noise`` times
white noise plus a multiple of the key's own topic and drift at ``t`` whose logit at distance 0
is ``recency``. Sink and span logits grow by ``log(T / 1024)``, so each head type keeps about the
same share of its mass on them at every context length instead of drowning in the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Context length at which the profile logits apply as written.
BASE_CONTEXT = 1024


@dataclass(frozen=True)
class HeadProfile:
    """What one query head attends to, in logits (at ``BASE_CONTEXT`` tokens).

    Attributes:
        name: short label used in reports.
        sink: logit of the sink keys.
        span: logit of planted span tokens (times their weight in ``[0.6, 1]``).
        recency: logit of the key at the query's own position through the shared topic and
            drift; it decays with distance as the topic and drift decorrelate.
        noise: standard deviation of the diffuse background logits.
    """

    name: str
    sink: float
    span: float
    recency: float
    noise: float

    @property
    def retrieves(self) -> bool:
        """Whether the planted spans matter to this head (span recall is measured on it)."""
        return self.span >= 4.0


#: The head types, assigned to query heads in turn (head ``i`` gets ``PROFILES[i % 4]``).
PROFILES: tuple[HeadProfile, ...] = (
    HeadProfile("retrieval", sink=6.5, span=5.5, recency=4.0, noise=1.0),
    HeadProfile("sink", sink=9.0, span=2.0, recency=4.0, noise=1.0),
    HeadProfile("recency", sink=5.0, span=2.0, recency=10.0, noise=0.7),
    HeadProfile("mixed", sink=6.0, span=4.5, recency=7.0, noise=1.0),
)


@dataclass
class SyntheticInputs:
    """One generated attention layer (batch 1).

    Attributes:
        q: ``[1, Hq, T, D]`` queries (float32 on CPU).
        k: ``[1, Hkv, T, D]`` keys.
        v: ``[1, Hkv, T, D]`` values.
        spans: planted spans ``(start, end)``, ascending; the same positions in every KV head.
        profiles: the :class:`HeadProfile` of each query head.
        sink_keys: how many leading keys carry the sink direction.
        seed: the seed everything was drawn from.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    spans: list[tuple[int, int]]
    profiles: tuple[HeadProfile, ...]
    sink_keys: int
    seed: int

    @property
    def context(self) -> int:
        return self.k.shape[2]


def _ar1(shape: tuple[int, ...], rho: float, gen: torch.Generator) -> torch.Tensor:
    """A stationary unit-variance AR(1) process along dim -2 (a log-depth prefix scan)."""
    eps = torch.randn(shape, generator=gen)
    eps[..., 1:, :] *= math.sqrt(1.0 - rho * rho)
    z, shift, t = eps, 1, shape[-2]
    while shift < t:
        decay = rho**shift
        if decay < 1e-12:
            break
        nxt = z.clone()
        nxt[..., shift:, :] += decay * z[..., :-shift, :]
        z, shift = nxt, shift * 2
    return z


def _segments(t: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """Segment id of every position; segment lengths are exponential with ``mean`` (>= 8)."""
    lengths = (-mean * torch.log(torch.rand(t // 8 + 2, generator=gen))).clamp(min=8).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return ids[:t]


def plant_spans(
    context: int, n_spans: int, gen: torch.Generator, *, low: int = 16, high: int = 256
) -> list[tuple[int, int]]:
    """``n_spans`` disjoint spans of ``low..high`` tokens (log-uniform) in ``[T/32, 0.7 T)``:
    the region is cut into equal slots, one span at a random place in each."""
    if n_spans <= 0:
        return []
    lo_pos, hi_pos = max(16, context // 32), int(0.7 * context)
    slot = (hi_pos - lo_pos) // n_spans
    if slot < 2 * low:
        raise ValueError(f"context {context} is too short to plant {n_spans} spans")
    spans = []
    for i in range(n_spans):
        u = float(torch.rand((), generator=gen))
        length = int(round(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
        length = min(length, slot // 2)
        offset = int(torch.randint(0, slot - length + 1, (), generator=gen))
        start = lo_pos + i * slot + offset
        spans.append((start, start + length))
    return spans


def make_inputs(
    context: int,
    *,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_spans: int = 4,
    seed: int = 0,
    sink_keys: int = 4,
    segment: float = 128.0,
    correlation: float = 16.0,
    span_halo: int = 0,
    profiles: tuple[HeadProfile, ...] = PROFILES,
) -> SyntheticInputs:
    """Generate one attention layer of ``context`` tokens (see the module docstring).

    Args:
        context: T, the number of tokens (queries and keys).
        heads, kv_heads: query and key/value heads (``heads % kv_heads == 0``).
        head_dim: D; needs ``D > n_spans + 8`` so that the content subspace is not empty.
        n_spans: planted spans (16-256 tokens each, in the first 70% of the context).
        seed: everything is drawn from ``torch.Generator().manual_seed(seed)``.
        sink_keys: leading keys that carry the sink direction.
        segment: mean topic segment length in tokens.
        correlation: correlation length of the key drift in tokens.
        span_halo: tokens on each side of a span that carry its direction too, with half the
            span's weight fading linearly to zero (text related to the span around it); 0
            plants sharp spans, the hardest case for a search that samples one key per node.
        profiles: head types, assigned to query heads in turn.

    Returns:
        :class:`SyntheticInputs` with float32 CPU tensors.
    """
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < n_spans + 9:
        raise ValueError(f"head_dim ({head_dim}) must exceed n_spans + 8 ({n_spans + 8})")
    if context < 256:
        raise ValueError(f"context must be >= 256 tokens, got {context}")
    gen = torch.Generator().manual_seed(seed)
    t, d, s = context, head_dim, n_spans
    dc = d - 1 - s  # content dimensions
    group = heads // kv_heads
    spans = plant_spans(t, s, gen)
    grow = math.log(t / BASE_CONTEXT)
    rho = math.exp(-1.0 / correlation)

    q = torch.empty(1, heads, t, d)
    k = torch.zeros(1, kv_heads, t, d)
    v = torch.empty(1, kv_heads, t, d)
    assigned = tuple(profiles[i % len(profiles)] for i in range(heads))
    for h in range(kv_heads):
        seg = _segments(t, segment, gen)
        topics = torch.randn(int(seg.max()) + 1, dc, generator=gen)
        semantic = math.sqrt(0.45) * topics[seg] + math.sqrt(0.35) * _ar1((t, dc), rho, gen)
        k[0, h, :, 1 + s :] = semantic + math.sqrt(0.2) * torch.randn(t, dc, generator=gen)
        k[0, h, :sink_keys, 0] = math.sqrt(d)
        for i, (a, b) in enumerate(spans):
            weight = 0.6 + 0.4 * torch.rand(b - a, generator=gen)
            k[0, h, a:b, 1 + i] = math.sqrt(d) * weight
            if span_halo > 0:  # related text around the span: half its weight, fading out
                fade = 0.5 * (1.0 - torch.arange(1, span_halo + 1) / (span_halo + 1))
                before = fade[: a - max(0, a - span_halo)].flip(0)
                after = fade[: min(t, b + span_halo) - b]
                k[0, h, a - before.numel() : a, 1 + i] = math.sqrt(d) * before
                k[0, h, b : b + after.numel(), 1 + i] = math.sqrt(d) * after
        v_topics = torch.randn(int(seg.max()) + 1, d, generator=gen)
        v[0, h] = math.sqrt(0.5) * v_topics[seg] + math.sqrt(0.5) * torch.randn(t, d, generator=gen)

        # q . k * D**-0.5 = logit: a coordinate of c on a direction keys carry with norm sqrt(D)
        # adds c to the logit. The semantic part has variance 0.8 per dimension.
        for j in range(group):
            p = assigned[h * group + j]
            qh = torch.zeros(t, d)
            qh[:, 0] = p.sink + grow
            qh[:, 1 : 1 + s] = p.span + grow
            recency = (p.recency + grow) * math.sqrt(d) / (0.8 * dc)
            qh[:, 1 + s :] = p.noise * math.sqrt(d / dc) * torch.randn(t, dc, generator=gen)
            qh[:, 1 + s :] += recency * semantic
            q[0, h * group + j] = qh

        rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        k[0, h] = k[0, h] @ rot
        q[0, h * group : (h + 1) * group] = q[0, h * group : (h + 1) * group] @ rot
    return SyntheticInputs(q, k, v, spans, assigned, sink_keys, seed)
