"""The ``--plot`` PNG: latency, speedup over SDPA and measured-over-floor versus context, measured
(solid) beside the analytic floor (dashed); for the offload mode, decode latency with and without
offload, bytes moved per step and the layer's memory. matplotlib is imported only when drawing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hip_attn.bench.report import Record
from hip_attn.perf.units import short_tokens

_HEADLINE = {"prefill": "hip", "decode": "hip_amortized", "mask": "hip_mask"}
_LABELS = {
    "hip": "HiP (mask + sparse)",
    "hip_amortized": "HiP per decode step (amortized)",
    "hip_mask": "HiP mask estimation",
    "hip_mask_kernel": "HiP search kernel",
    "hip_sparse": "HiP sparse attention",
    "sdpa": "SDPA (dense)",
    "flex": "flex_attention (same blocks)",
}
_COLORS = {
    "hip": "tab:orange",
    "hip_amortized": "tab:orange",
    "hip_mask": "tab:green",
    "hip_mask_kernel": "tab:olive",
    "hip_sparse": "tab:red",
    "sdpa": "tab:blue",
    "flex": "tab:purple",
}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _series(records: Sequence[Record], name: str, key: str = "ms") -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        value = (r.get("results") or {}).get(name, {}).get(key)
        if value:
            xs.append(int(r["context"]))
            ys.append(float(value))
    return xs, ys


def _floor(records: Sequence[Record], name: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        value = ((r.get("prediction") or {}).get("ms") or {}).get(name)
        if value:
            xs.append(int(r["context"]))
            ys.append(float(value))
    return xs, ys


def _context_axis(ax: Any, contexts: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(contexts))
    ax.set_xticklabels([short_tokens(c) for c in contexts])
    ax.set_xlim(min(contexts) / 1.5, max(contexts) * 1.5)
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def plot(records: Sequence[Record], path: str | Path) -> None:
    """Draw the PNG for ``records`` of one mode.

    Raises:
        PlotUnavailable: matplotlib is missing.
        ValueError: no records, or records of several modes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'hip-attn-kernels[plot]'"
        ) from exc
    if not records:
        raise ValueError("nothing to plot")
    modes = {r["mode"] for r in records}
    if len(modes) != 1:
        raise ValueError(f"one mode per plot, got {sorted(modes)}")
    mode = modes.pop()
    if mode == "offload":
        _plot_offload(plt, records, path)
        return
    records = sorted(records, key=lambda r: int(r["context"]))
    contexts = sorted({int(r["context"]) for r in records})
    head = _HEADLINE[mode]
    methods = {
        "prefill": ["hip", "hip_mask", "hip_sparse", "sdpa", "flex"],
        "decode": ["hip_amortized", "hip", "hip_mask", "hip_sparse", "sdpa", "flex"],
        "mask": ["hip_mask", "hip_mask_kernel", "sdpa"],
    }[mode]
    colors = dict(_COLORS, hip="tab:brown") if mode == "decode" else _COLORS
    first = records[0]
    on_cpu = first.get("device_type") != "cuda"
    gpu = (first.get("prediction") or {}).get("gpu", "?")

    panels = 2 if mode == "mask" else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6))
    ax = axes[0]
    for name in methods:
        xs, ys = _series(records, name)
        if xs:
            style = "--" if name == "hip" and mode == "decode" else "-"
            ax.plot(xs, ys, style, marker="o", color=colors[name], label=_LABELS[name])
    for name in (head, "sdpa"):
        xs, ys = _floor(records, name)
        if xs:
            ax.plot(xs, ys, ":", marker="x", color=colors[name], label=f"floor: {_LABELS[name]}")
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds (median)")
    ax.set_title("latency (solid: measured, dotted: analytic floor)", fontsize=9)
    _context_axis(ax, contexts)
    ax.legend(fontsize=7)

    if mode != "mask":
        ax = axes[1]
        xs, ys = [], []
        for r in records:
            value = (r.get("speedup") or {}).get("hip_vs_sdpa")
            if value:
                xs.append(int(r["context"]))
                ys.append(float(value))
        if xs:
            ax.plot(xs, ys, "-", marker="o", color=colors[head], label="HiP, measured")
        fx, fy = [], []
        for r in records:
            flex = (r.get("results") or {}).get("flex", {}).get("ms")
            sdpa = (r.get("results") or {}).get("sdpa", {}).get("ms")
            if flex and sdpa:
                fx.append(int(r["context"]))
                fy.append(float(sdpa) / float(flex))
        if fx:
            ax.plot(fx, fy, "-", marker="s", color=colors["flex"], label="flex (sparse only)")
        px, py = [], []
        for r in records:
            value = (r.get("prediction") or {}).get("speedup")
            if value:
                px.append(int(r["context"]))
                py.append(float(value))
        if px:
            ax.plot(px, py, ":", marker="x", color=colors[head], label=f"HiP, floors ({gpu})")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over SDPA (x)")
        ax.set_title("SDPA time / method time", fontsize=9)
        _context_axis(ax, contexts)
        ax.legend(fontsize=7)

    ax = axes[-1]
    drawn = False
    for name in methods:
        xs, ys = [], []
        for r in records:
            ratio = ((r.get("prediction") or {}).get("measured_over_floor") or {}).get(name)
            if ratio:
                xs.append(int(r["context"]))
                ys.append(float(ratio))
        if xs:
            drawn = True
            ax.plot(xs, ys, "-", marker="o", color=colors[name], label=_LABELS[name])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(3.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel(f"measured / analytic floor ({gpu})")
    ax.set_title("how far above the hardware floor (dashed: 3x)", fontsize=9)
    _context_axis(ax, contexts)
    if drawn:
        ax.legend(fontsize=7)
    else:
        reason = "CPU timings are not compared\nwith a GPU floor" if on_cpu else "no floor"
        ax.text(0.5, 0.5, reason, transform=ax.transAxes, ha="center", va="center")

    cfg = first["config"]
    settings = f"window={cfg['window']} sinks={cfg['sink_tokens']}"
    _title_and_save(plt, fig, path, mode, first, settings)


def _title_and_save(
    plt: Any, fig: Any, path: str | Path, mode: str, first: Record, settings: str
) -> None:
    """Title ``fig`` with the device, shapes, HiP k, ``settings`` and commit of ``first`` (a record
    of the run), write it to ``path`` and close it."""
    sh, cfg = first["shape"], first["config"]
    suptitle = (
        f"{mode}: {first.get('device')} ({first.get('timing')}), B={sh['batch']} "
        f"Hq={sh['heads']} Hkv={sh['kv_heads']} D={sh['head_dim']} {sh['dtype']}; HiP k={cfg['k']} "
        f"{settings}; commit {str((first.get('git') or {}).get('commit', 'unknown'))[:10]}"
    )
    if first.get("device_type") != "cuda":
        suptitle = "CPU SMOKE TEST (not GPU performance) - " + suptitle
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


_OFFLOAD_SERIES = (
    ("offload_refresh", "offload: refresh step (attend)", "tab:red", "-"),
    ("offload_reuse", "offload: reuse step (attend)", "tab:orange", "-"),
    ("offload_amortized", "offload: per step (append + attend)", "tab:brown", "-"),
    ("device_refresh", "on device: refresh step", "tab:blue", "--"),
    ("device_reuse", "on device: reuse step", "tab:cyan", "--"),
    ("device_amortized", "on device: per step", "tab:purple", "--"),
)


def _plot_offload(plt: Any, records: Sequence[Record], path: str | Path) -> None:
    """Offload: decode latency, bytes moved per step, device memory against context."""
    decode = sorted((r for r in records if r.get("part") == "decode"), key=lambda r: r["context"])
    memory = [r for r in records if r.get("part") == "memory"]
    first = (decode or memory)[0]
    fig, axes = plt.subplots(1, 3, figsize=(15.6, 4.6))

    ax = axes[0]
    for name, label, color, style in _OFFLOAD_SERIES:
        xs, ys = _series(decode, name)
        if xs:
            ax.plot(xs, ys, style, marker="o", color=color, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds per layer (median)")
    ax.set_title("decode latency, one layer", fontsize=9)
    if decode:
        _context_axis(ax, sorted({int(r["context"]) for r in decode}))
        ax.legend(fontsize=7)

    ax = axes[1]
    for name, label, color in (
        ("offload_refresh", "refresh step", "tab:red"),
        ("offload_reuse", "reuse step", "tab:orange"),
        ("offload_amortized", "mean per step", "tab:brown"),
    ):
        points = [
            (int(r["context"]), float(r["results"][name]["bytes_per_step"]))
            for r in decode
            if (r.get("results") or {}).get(name, {}).get("bytes_per_step") is not None
        ]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        if xs:
            ax.plot(xs, [y / 1e6 for y in ys], "-", marker="o", color=color, label=label)
    ax.set_ylabel("MB moved host -> device per step")
    ax.set_title("block-cache traffic (random queries: worst case)", fontsize=9)
    if decode:
        _context_axis(ax, sorted({int(r["context"]) for r in decode}))
        ax.legend(fontsize=7)

    ax = axes[2]
    if memory:
        per = sorted(memory[-1]["memory"]["per_context"], key=lambda e: e["context"])
        xs = [int(e["context"]) for e in per]
        source = memory[-1]["memory"]["source"].split(" ")[0]
        for key, label, color, style in (
            ("measured_bytes", f"device memory ({source})", "tab:red", "-"),
            ("rep_bytes", "R (search summary tree)", "tab:green", "-"),
            ("full_kv_bytes", "full K/V (held on the host instead)", "tab:blue", "--"),
        ):
            ys = [e.get(key) for e in per]
            if all(y is not None for y in ys):
                ax.plot(xs, [y / 1e9 for y in ys], style, marker="o", color=color, label=label)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("GB (linear: parallel lines grow alike)")
        ax.set_title("device memory of the layer", fontsize=9)
        _context_axis(ax, xs)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no memory part", transform=ax.transAxes, ha="center", va="center")

    offload = first.get("offload") or {}
    settings = (
        f"refresh={first['config']['refresh_interval']}; "
        f"cache_blocks={offload.get('cache_blocks')} gather={offload.get('gather')}"
    )
    _title_and_save(plt, fig, path, "offload", first, settings)
