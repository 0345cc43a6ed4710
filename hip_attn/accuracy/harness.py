"""The attention-level accuracy harness behind ``hip-attn accuracy``.

For each context length: generate one attention layer (:mod:`hip_attn.accuracy.synthetic`),
sample query blocks, compute their dense attention, let every method
(:mod:`hip_attn.accuracy.methods`) pick its blocks, and score the picks
(:mod:`hip_attn.accuracy.metrics`). Only the sampled query blocks are evaluated: each one
costs O(T) memory and time, so 64K-token contexts run on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hip_attn.accuracy.methods import METHODS, REFERENCE_METHODS, QueryBlock
from hip_attn.accuracy.metrics import MethodTotals, dense_block, mass_breakdown, score_selection
from hip_attn.accuracy.synthetic import SyntheticInputs, make_inputs
from hip_attn.config import HiPConfig
from hip_attn.geometry import num_query_blocks, query_blocks
from hip_attn.progress import progress_bar

#: Metrics shown in the table: JSON key, column title, higher is better.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("mass_recall", "mass recall", True),
    ("span_recall", "span recall", True),
    ("out_rel_err", "out rel err", False),
)


def sample_query_blocks(
    context: int, config: HiPConfig, *, last: int = 2, spread: int = 6
) -> tuple[list[int], str]:
    """Query blocks to evaluate and a sentence saying how they were chosen.

    The ``last`` final blocks (the longest prefixes, what decode sees) plus ``spread`` evenly
    spaced among the other blocks whose candidate region exceeds the budget (where methods can
    differ); among all other blocks when no block's candidates exceed the budget.
    """
    n_qb = num_query_blocks(context, config)
    geo = query_blocks(context, context, config)
    tail = list(range(max(0, n_qb - last), n_qb))
    over = [j for j in range(n_qb) if int(geo.n_candidates[j]) > config.blocks_per_query_block]
    where = "the other blocks with more candidate blocks than the budget"
    if not over:
        where = "the other blocks (the budget covers every candidate in all of them)"
        over = list(range(n_qb))
    pool = [j for j in over if j not in tail]
    count = min(spread, len(pool))
    picks = [pool[round(i * (len(pool) - 1) / max(1, count - 1))] for i in range(count)]
    chosen = sorted(set(tail + picks))
    text = f"{len(chosen)} of {n_qb} query blocks: the last {len(tail)}"
    if count:
        text += f" and {count} evenly spaced among {where}"
    return chosen, text


def backend_name(device: torch.device) -> str:
    """Which implementation :func:`hip_attn.estimate_mask` runs on ``device``."""
    from hip_attn.attention import uses_triton

    if not uses_triton(device):
        return "PyTorch reference"
    return "Triton" if device.type == "cuda" else "Triton (interpreter)"


@dataclass(frozen=True)
class _Setup:
    """The settings of :func:`run_accuracy` that every context shares."""

    methods: Sequence[str]
    heads: int
    kv_heads: int
    head_dim: int
    n_spans: int
    span_halo: int
    seeds: Sequence[int]
    sample_last: int
    sample_spread: int
    device: torch.device
    dtype: torch.dtype
    bar: Any  # a progress_bar counting the sampled query blocks


def _evaluate_context(context: int, config: HiPConfig, setup: _Setup) -> dict[str, Any]:
    """Generate one layer of ``context`` tokens per seed and score every method on the sampled
    query blocks; metrics pool the blocks of all seeds.

    Returns a JSON-ready dict: the context, seeds, planted spans per seed, sampled blocks, the
    dense mass breakdown per head type, and per method the :meth:`MethodTotals.summary` metrics.
    """
    methods, seeds, bar = setup.methods, setup.seeds, setup.bar
    blocks, sampling = sample_query_blocks(
        context, config, last=setup.sample_last, spread=setup.sample_spread
    )
    geo = query_blocks(context, context, config)
    totals: dict[str, MethodTotals] = {}
    breakdown = []
    spans: dict[str, list[list[int]]] = {}
    for seed in seeds:
        data = make_inputs(
            context,
            heads=setup.heads,
            kv_heads=setup.kv_heads,
            head_dim=setup.head_dim,
            n_spans=setup.n_spans,
            span_halo=setup.span_halo,
            seed=seed,
        )
        spans[str(seed)] = [list(span) for span in data.spans]
        for name in methods:
            totals.setdefault(name, MethodTotals(data.profiles))
        q, k, v = (x.to(device=setup.device, dtype=setup.dtype) for x in (data.q, data.k, data.v))
        bar.set_description_str(f"context {context}, seed {seed}")
        for j in blocks:
            s, e = j * config.block_size_q, int(geo.end[j])
            window = (int(geo.window_start[j]), int(geo.n_candidates[j]))
            qkv = (q[:, :, s:e], k[:, :, :e], v[:, :, :e])
            breakdown.append(_score_block(qkv, (s, e), window, data, config, totals))
            bar.update()
    parts = torch.stack(breakdown).mean(dim=(0, 1))  # [Hq, 4]
    profiles = totals[methods[0]].profiles
    dense_mass: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(p.name for p in profiles):
        idx = [h for h, p in enumerate(profiles) if p.name == name]
        share = parts[idx].mean(dim=0).tolist()
        dense_mass[name] = dict(zip(("sinks", "window", "spans", "rest"), share, strict=True))
    return {
        "context": context,
        "seeds": list(seeds),
        "spans": spans,
        "query_blocks": blocks,
        "sampling": sampling,
        "dense_mass": dense_mass,
        "methods": {m: totals[m].summary() for m in methods},
    }


def _score_block(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    span: tuple[int, int],
    window: tuple[int, int],
    data: SyntheticInputs,
    config: HiPConfig,
    totals: dict[str, MethodTotals],
) -> torch.Tensor:
    """Dense attention of one query block (``qkv`` its queries and the keys and values up to
    its end, ``span`` its ``(start, end)``, ``window`` its ``(window_start, n_candidates)``),
    every method's selection and its score (added to ``totals``); returns the block's dense
    mass breakdown. Methods select from ``qkv`` as given (the run's dtype); scores use fp32."""
    (start, end), (w0, n_cand) = span, window
    q, k, v = qkv
    qf, kf, vf = q.float(), k.float(), v.float()
    key_mass, dense_out = dense_block(qf, kf, vf, start)
    block = QueryBlock(q, k, v, start, end, w0, n_cand, key_mass)
    exact_block = QueryBlock(qf, kf, vf, start, end, w0, n_cand, key_mass)
    for name, total in totals.items():
        selection = METHODS[name][1](block, config)
        score = score_selection(exact_block, selection, dense_out, data.spans, data.profiles)
        total.add(score, selection.reads)
    return mass_breakdown(key_mass, data.spans, config.sink_tokens, w0)


def run_accuracy(
    contexts: Sequence[int],
    config: HiPConfig,
    *,
    methods: Sequence[str] = tuple(METHODS),
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_spans: int = 4,
    span_halo: int = 0,
    seeds: Sequence[int] = (0,),
    sample_last: int = 2,
    sample_spread: int = 6,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every method on each context length (the same seeds for all); ``progress``: a
    progress bar of the sampled query blocks on stderr (when it is a terminal).

    Returns a JSON-ready dict with the setup (config, backend, shapes, seed, methods) and a
    ``"contexts"`` list of per-context results.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not methods:
        raise ValueError("methods must name at least one method")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    device = torch.device(device)
    total = len(seeds) * sum(
        len(sample_query_blocks(t, config, last=sample_last, spread=sample_spread)[0])
        for t in contexts
    )
    with progress_bar(total=total, unit="block", enabled=progress) as bar:
        setup = _Setup(
            methods=methods,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            n_spans=n_spans,
            span_halo=span_halo,
            seeds=seeds,
            sample_last=sample_last,
            sample_spread=sample_spread,
            device=device,
            dtype=dtype,
            bar=bar,
        )
        results = [_evaluate_context(t, config, setup) for t in contexts]
    return {
        "config": config.to_dict(),
        "backend": backend_name(device) if any(m.startswith("hip") for m in methods) else None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "spans_per_context": n_spans,
        "span_halo": span_halo,
        "seeds": list(seeds),
        "methods": {m: METHODS[m][0] for m in methods},
        "contexts": results,
    }


def best_methods(methods: dict[str, dict[str, Any]], key: str, higher: bool) -> set[str]:
    """The sparse methods (not the references: dense, oracle, exact) with the best ``key``
    (ties: all)."""
    values = {
        m: r[key] for m, r in methods.items() if m not in REFERENCE_METHODS and r[key] is not None
    }
    if len(values) < 2:
        return set()
    best = max(values.values()) if higher else min(values.values())
    tol = 5e-4 if key != "out_rel_err" else 5e-5
    return {m for m, x in values.items() if abs(x - best) <= tol}


def _cell(value: float | None, fmt: str, mark: bool) -> str:
    return ("-" if value is None else format(value, fmt)) + ("*" if mark else " ")


def format_table(result: dict[str, Any]) -> str:
    """The per-context tables of :func:`run_accuracy`'s result, as plain text."""
    cfg = result["config"]
    lines = [
        f"HiP {HiPConfig(**cfg).describe()}; selection backend: {result['backend'] or '-'}",
        f"inputs: synthetic, {result['heads']} query heads / {result['kv_heads']} KV heads, "
        f"head dim {result['head_dim']}, {result['spans_per_context']} planted spans"
        + (f" (halo {result['span_halo']})" if result.get("span_halo") else "")
        + ", "
        f"seeds {', '.join(map(str, result['seeds']))}, {result['dtype']} on {result['device']}",
        "* = best sparse method in this context (dense, oracle and exact excluded)",
    ]
    header = (
        f"{'method':<12}{'mass recall':>13}{'(worst)':>9}{'span recall':>13}{'out rel err':>13}"
        f"{'keys/query':>12}{'select reads':>14}"
    )
    for ctx in result["contexts"]:
        methods = ctx["methods"]
        marks = {key: best_methods(methods, key, hi) for key, _, hi in COLUMNS}
        spans = "; ".join(
            f"seed {seed}: " + ", ".join(f"{a}-{e}" for a, e in found)
            for seed, found in ctx["spans"].items()
        )
        lines += [
            "",
            f"context {ctx['context']:,} tokens (planted spans, {spans})",
            f"  sampled {ctx['sampling']}",
            "  dense mass on sinks/window/spans/rest: "
            + "; ".join(
                f"{name} " + "/".join(f"{100 * share:.0f}" for share in parts.values()) + "%"
                for name, parts in ctx["dense_mass"].items()
            ),
            header,
        ]
        for name, r in methods.items():
            lines.append(
                f"{name:<12}"
                f"{_cell(r['mass_recall'], '12.3f', name in marks['mass_recall'])}"
                f"{r['mass_recall_min']:9.3f}"
                f"{_cell(r['span_recall'], '12.3f', name in marks['span_recall'])}"
                f"{_cell(r['out_rel_err'], '12.4f', name in marks['out_rel_err'])}"
                f"{r['keys_per_query']:12,.0f}{r['select_reads']:14,.0f}"
            )
    return "\n".join(lines)


def format_by_head_type(result: dict[str, Any]) -> str:
    """Mass recall per head type and method, one table per context."""
    lines: list[str] = []
    for ctx in result["contexts"]:
        methods = ctx["methods"]
        types = list(next(iter(methods.values()))["mass_recall_by_head_type"])
        lines += ["", f"context {ctx['context']:,}: mass recall by head type"]
        lines.append(f"{'method':<12}" + "".join(f"{t:>11}" for t in types))
        for name, r in methods.items():
            by = r["mass_recall_by_head_type"]
            lines.append(f"{name:<12}" + "".join(f"{by[t]:11.3f}" for t in types))
    return "\n".join(lines)
