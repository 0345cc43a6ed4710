"""``hip-attn accuracy --model``: the selection methods on a real model's queries and keys.

One passkey prompt (:func:`~hip_attn.accuracy.model_eval.passkey_prompt`) runs through the model
once with dense attention while every layer's post-RoPE ``q, k, v`` are captured. For the last
query block of each layer (where the question is, and the block whose output answers it) every
method of :data:`~hip_attn.accuracy.methods.METHODS` picks its blocks and is scored against the
layer's own dense attention (:func:`~hip_attn.accuracy.metrics.score_selection`): attention-mass
recall and needle recall, the share of the passkey sentence's tokens attended, measured on the
heads that put at least :data:`NEEDLE_HEAD_MASS` of their mass on it.

Heads are typed by where their dense mass goes in that block: ``needle`` (>= 5% on the passkey
sentence), else ``sink`` or ``recency`` (half or more on the sinks or on the window), else
``mixed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hip_attn.accuracy.harness import backend_name
from hip_attn.accuracy.methods import METHODS, QueryBlock
from hip_attn.accuracy.metrics import MethodTotals, dense_block, mass_breakdown, score_selection
from hip_attn.accuracy.model_eval import LoadedModel, passkey_digits, passkey_prompt, text_tokens
from hip_attn.config import HiPConfig
from hip_attn.geometry import query_blocks
from hip_attn.progress import progress_bar

#: Dense mass on the passkey sentence that makes a head a ``needle`` head.
NEEDLE_HEAD_MASS = 0.05

_CAPTURE = "hip_capture"


@dataclass(frozen=True)
class RealHead:
    """A head of the real model, typed by its dense attention (see the module doc)."""

    name: str

    @property
    def retrieves(self) -> bool:
        return self.name == "needle"


def head_types(parts: torch.Tensor) -> list[RealHead]:
    """Types of the heads from their dense mass on sinks / window / needle / rest ``[Hq, 4]``."""
    kinds = []
    for sinks, window, needle, _ in parts.tolist():
        if needle >= NEEDLE_HEAD_MASS:
            kinds.append(RealHead("needle"))
        elif sinks >= 0.5:
            kinds.append(RealHead("sink"))
        elif window >= 0.5:
            kinds.append(RealHead("recency"))
        else:
            kinds.append(RealHead("mixed"))
    return kinds


def capture_qkv(lm: LoadedModel, ids: torch.Tensor) -> dict[int, tuple[Any, ...]]:
    """One dense forward pass of ``ids``; per layer index ``(q, k, v, scale)`` as the model's
    attention function receives them (``[B, H, T, D]``, after RoPE)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict[int, tuple[Any, ...]] = {}

    def capture(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        scale = kwargs.get("scaling") or q.shape[-1] ** -0.5
        captured[module.layer_idx] = (q.detach(), k.detach(), v.detach(), scale)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return captured


def run_model_accuracy(
    lm: LoadedModel,
    config: HiPConfig,
    *,
    context: int,
    depth: float,
    filler: str,
    text: str | None,
    methods: Sequence[str] = tuple(METHODS),
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every method on the last query block of every layer of one passkey prompt of
    ``context`` tokens with the passkey at ``depth`` (see the module doc). Returns a JSON-ready
    dict: the prompt, per layer the head types and per method mass and needle recall, and per
    method the totals over all layers (:meth:`MethodTotals.summary`, head types pooled)."""
    from hip_attn.accuracy.checkpoints import FILLERS

    source = FILLERS.get(filler, text)
    if source is None:
        raise ValueError("--filler text needs --text")
    key = passkey_digits(seed, context, depth, 5)
    prompt = passkey_prompt(lm, text_tokens(lm, source, context, seed), context, depth, key)
    captured = capture_qkv(lm, prompt.ids)
    geo = query_blocks(context, context, config)
    j = geo.start.numel() - 1
    start, end = int(geo.start[j]), int(geo.end[j])
    w0, n_cand = int(geo.window_start[j]), int(geo.n_candidates[j])
    spans = [prompt.needle]
    layers: list[dict[str, Any]] = []
    totals: dict[str, MethodTotals] = {}
    by_type: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    for layer in progress_bar(sorted(captured), desc="layers", unit="layer", enabled=progress):
        q, k, v, scale = captured[layer]
        qb, kb, vb = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        key_mass, dense_out = dense_block(qb.float(), kb.float(), vb.float(), start, scale)
        parts = mass_breakdown(key_mass, spans, config.sink_tokens, w0)[0]
        kinds = head_types(parts)
        block = QueryBlock(qb, kb, vb, start, end, w0, n_cand, key_mass)
        exact = QueryBlock(qb.float(), kb.float(), vb.float(), start, end, w0, n_cand, key_mass)
        row: dict[str, Any] = {"layer": layer, "head_types": [h.name for h in kinds]}
        for name in methods:
            selection = METHODS[name][1](block, config)
            score = score_selection(exact, selection, dense_out, spans, kinds)
            totals.setdefault(name, MethodTotals(kinds)).add(score, selection.reads)
            for kind, mass in zip(kinds, score.mass[0].tolist(), strict=True):
                by_type[name].setdefault(kind.name, []).append(mass)
            hits = score.span_hits
            row[name] = {
                "mass_recall": float(score.mass.mean()),
                "needle_recall": sum(hits) / len(hits) if hits else None,
            }
        layers.append(row)
    return {
        "model": lm.name,
        "backend": backend_name(lm.device),
        "context": context,
        "depth": depth,
        "filler": filler,
        "needle": list(prompt.needle),
        "query_block": [start, end],
        "candidate_blocks": n_cand,
        "hip_config": config.to_dict(),
        "layers": layers,
        "methods": {
            # the head types change from layer to layer: pool them here, not in the totals
            name: totals[name].summary()
            | {"mass_recall_by_head_type": {t: sum(m) / len(m) for t, m in by_type[name].items()}}
            for name in methods
        },
    }


def format_model_accuracy(result: dict[str, Any]) -> str:
    """The per-layer table (mass recall / needle recall) and the totals."""
    methods = list(result["methods"])
    a, e = result["needle"]
    lines = [
        f"{result['model']}: passkey prompt of {result['context']:,} tokens ({result['filler']} "
        f"filler), passkey sentence at tokens {a}-{e}; last query block "
        f"{result['query_block'][0]}-{result['query_block'][1]}, "
        f"{result['candidate_blocks']} candidate blocks; selection backend: {result['backend']}",
        f"HiP {HiPConfig(**result['hip_config']).describe()}",
        "per layer: mass recall / needle recall (needle heads only; '-' when none)",
        f"{'layer':>5}  {'needle heads':>12}  " + "  ".join(f"{m:>13}" for m in methods),
    ]
    for row in result["layers"]:
        needle_heads = sum(t == "needle" for t in row["head_types"])
        cells = []
        for m in methods:
            r = row[m]
            needle = "-" if r["needle_recall"] is None else f"{r['needle_recall']:.2f}"
            cells.append(f"{r['mass_recall']:.3f} / {needle:>4}")
        lines.append(f"{row['layer']:>5}  {needle_heads:>12}  " + "  ".join(cells))
    lines.append("")
    lines.append(f"{'method':<10} {'mass recall':>11} {'needle recall':>13} {'select reads':>12}")
    for m in methods:
        s = result["methods"][m]
        needle = "-" if s["span_recall"] is None else f"{s['span_recall']:.3f}"
        lines.append(f"{m:<10} {s['mass_recall']:>11.3f} {needle:>13} {s['select_reads']:>12,.0f}")
    return "\n".join(lines)
