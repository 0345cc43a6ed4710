"""The ``--plot`` figure: the roofline with every operator on it, and time and memory versus
context for each attention mode. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hip_attn.perf.estimator import Estimate, Mode, Scenario, estimate
from hip_attn.perf.roofline import attainable_flops
from hip_attn.perf.units import short_tokens

_COLORS = {"dense": "tab:blue", "hip": "tab:orange", "hip+offload": "tab:green"}
_STYLES = {"dense": ("-", "o"), "hip": ("--", "s"), "hip+offload": (":", "^")}
_MATMULS = {"qkv_proj", "o_proj", "mlp_gate_up", "mlp_up", "mlp_down", "lm_head"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def context_sweep(contexts: Sequence[int], start: int = 1024) -> list[int]:
    """Powers of two from ``min(start, contexts)`` to ``max(contexts)``, plus ``contexts``."""
    lo, hi = min(min(contexts), start), max(contexts)
    points = set(contexts)
    n = 1
    while n <= hi:
        if n >= lo:
            points.add(n)
        n *= 2
    return sorted(points)


def _place_labels(
    ax: Any,
    points: list[tuple[float, float, str, str]],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
) -> None:
    """Annotate ``(x, y, text, color)`` points on log-log axes, moving labels up or down until
    their (estimated) boxes stop overlapping; a thin line joins a moved label to its point."""
    lx, ly = math.log10(xlim[1] / xlim[0]), math.log10(ylim[1] / ylim[0])
    char_w, line_h = 0.0095, 0.032  # fractions of the axes at fontsize 7 in this figure

    def where(x: float, y: float) -> tuple[float, float]:
        return math.log10(x / xlim[0]) / lx, math.log10(y / ylim[0]) / ly

    # Markers are obstacles too.
    boxes = [
        (u - 0.01, v - 0.015, u + 0.01, v + 0.015) for u, v in (where(x, y) for x, y, *_ in points)
    ]
    for x, y, text, color in sorted(points, key=lambda p: (p[0], -p[1])):
        u, v = where(x, y)
        width = len(text) * char_w
        for step in range(24):
            dv = (step + 1) // 2 * line_h * (1 if step % 2 else -1) - 0.01
            box = (u + 0.012, v + dv, u + 0.012 + width, v + dv + line_h)
            clear = all(
                box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes
            )
            if clear and box[1] >= 0.0 and box[3] <= 1.0:
                break
        boxes.append(box)
        ax.annotate(
            text,
            (x, y),
            xytext=(box[0], box[1] + 0.006),
            textcoords="axes fraction",
            fontsize=7,
            color=color,
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5} if abs(dv) > line_h else None,
        )


def _roofline_panel(ax: Any, sc: Scenario, modes: Sequence[Mode], context: int) -> None:
    peak = sc.peak
    ests = [estimate(sc, mode, context) for mode in modes]
    # Operators identical across modes (the matmuls; hip vs hip+offload on the GPU) are drawn
    # once, labelled with every mode they stand for.
    merged: dict[tuple[str, float, float], dict[str, None]] = {}
    phases: dict[tuple[str, float, float], set[str]] = {}
    for e in ests:
        for phase in (e.prefill, e.decode):
            for op in phase.operators:
                y = op.flops / op.time_s(peak)
                key = (op.name, float(f"{op.intensity:.4g}"), float(f"{y:.4g}"))
                merged.setdefault(key, {})[e.mode] = None
                phases.setdefault(key, set()).add(phase.phase)
    xs_pts = [key[1] for key in merged]
    lo = min([*xs_pts, peak.ridge_point]) / 4
    hi = max([*xs_pts, peak.ridge_point]) * 30
    ylim = (attainable_flops(lo, peak) / 3, peak.flops * 3)
    xs = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    ax.loglog(xs, [attainable_flops(x, peak) for x in xs], color="black", lw=2, label="GPU roof")
    ax.loglog(
        xs,
        [min(peak.flops, x * peak.host_link) for x in xs],
        color="gray",
        ls="--",
        lw=1,
        label=f"host-link slope ({peak.host_link / 1e9:.0f} GB/s)",
    )
    ax.axvline(peak.ridge_point, color="gray", ls=":", lw=1)
    labels: list[tuple[float, float, str, str]] = []
    for (name, x, y), mode_set in merged.items():
        op_modes = list(mode_set)
        if name in _MATMULS:
            color, text = "dimgray", name
        else:
            color = _COLORS[op_modes[0]]
            text = f"{name} ({', '.join(op_modes)})"
        for phase_name in sorted(phases[(name, x, y)]):
            marker = "o" if phase_name == "prefill" else "^"
            ax.scatter([x], [y], marker=marker, color=color, s=40, zorder=3, alpha=0.8)
        labels.append((x, y, text, color))
    ax.set_xlim(lo, hi)
    ax.set_ylim(*ylim)
    _place_labels(ax, labels, (lo, hi), ylim)
    ax.scatter([], [], marker="o", color="black", label="prefill operators")
    ax.scatter([], [], marker="^", color="black", label="decode operators")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"roofline at {short_tokens(context)} context, batch {sc.batch}")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)


def _series(
    ax: Any,
    sweep: Sequence[int],
    results: dict[Mode, list[Estimate]],
    value: Any,
    ylabel: str,
    title: str,
) -> None:
    for mode, ests in results.items():
        ls, marker = _STYLES[mode]
        ax.loglog(
            sweep,
            [value(e) for e in ests],
            ls=ls,
            marker=marker,
            ms=4,
            color=_COLORS[mode],
            label=mode,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.2)


def plot(sc: Scenario, modes: Sequence[Mode], contexts: Sequence[int], path: str | Path) -> Path:
    """Draw the roofline (operators of prefill and decode at the longest context) and prefill
    time, decode time per token and memory per request versus context; save a PNG at ``path``.

    Raises:
        PlotUnavailable: matplotlib is missing.
        OSError: the file cannot be written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install matplotlib (or hip-attn-kernels[plot])"
        ) from exc

    sweep = context_sweep(contexts)
    results: dict[Mode, list[Estimate]] = {
        mode: [estimate(sc, mode, c) for c in sweep] for mode in modes
    }
    fig = Figure(figsize=(14, 10), layout="constrained")
    axes = fig.subplots(2, 2)
    _roofline_panel(axes[0][0], sc, modes, max(contexts))
    _series(
        axes[0][1], sweep, results, lambda e: e.prefill.time_s, "seconds", "prefill time (batch)"
    )
    _series(
        axes[1][0],
        sweep,
        results,
        lambda e: e.decode.time_s * 1e3,
        "ms per token",
        "decode step at mean context",
    )
    mem = axes[1][1]
    _series(
        mem,
        sweep,
        results,
        lambda e: e.gpu_bytes_per_request / 1e9,
        "GB per request",
        "HBM per request (per GPU) and capacity",
    )
    if sc.hbm_free > 0:
        mem.axhline(sc.hbm_free / 1e9, color="black", ls="--", lw=1, label="HBM free for KV")
    if "hip+offload" in results:
        mem.loglog(
            sweep,
            [e.host_bytes_per_request / 1e9 for e in results["hip+offload"]],
            color=_COLORS["hip+offload"],
            ls=":",
            label="host RAM per request (offload)",
        )
        mem.axhline(sc.offload.host_ram / 1e9, color="gray", ls="--", lw=1, label="host RAM")
    for ax in (axes[0][1], axes[1][0], mem):
        for c in contexts:
            ax.axvline(c, color="gray", ls=":", lw=0.8)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{sc.model.name} on {sc.gpu.name} ({sc.weight_dtype} weights, {sc.kv_dtype} KV, "
        f"TP {sc.tp}, {sc.output_tokens} output tokens): peak-performance model"
    )
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
