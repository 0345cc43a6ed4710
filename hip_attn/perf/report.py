"""Text and JSON renderings of a set of estimates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hip_attn.perf.estimator import MODES, Estimate, Mode, Scenario, max_context
from hip_attn.perf.units import fmt_bytes, fmt_seconds, short_tokens

_COLUMNS = (
    ("mode", 12, "<"),
    ("KV/req", 8, ">"),
    ("HBM/req", 8, ">"),
    ("act", 8, ">"),
    ("fits", 4, ">"),
    ("max conc", 8, ">"),
    ("max ctx", 10, ">"),
    ("prefill", 9, ">"),
    ("bound", 9, "<"),
    ("decode/tok", 10, ">"),
    ("bound", 9, "<"),
    ("tok/s", 8, ">"),
    ("{out} tok", 9, ">"),
    ("switch", 9, ">"),
)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(
        f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True)
    )


def header_lines(sc: Scenario, modes: Sequence[Mode]) -> list[str]:
    """Lines describing the scenario: model, GPU, dtypes, memory budget, HiP/offload settings."""
    m, g, peak = sc.model, sc.gpu, sc.peak
    eff = sc.efficiency
    lines = [
        f"{m.name} on {g.name}: {sc.weight_dtype} weights, {sc.kv_dtype} KV, batch {sc.batch}, "
        f"{sc.output_tokens} output tokens, TP {sc.tp}",
        f"GPU: {peak.flops / 1e12:.0f} TFLOP/s, HBM {peak.hbm_bandwidth / 1e9:.0f} GB/s and "
        f"{fmt_bytes(g.hbm)}, host link {peak.host_link / 1e9:.0f} GB/s, "
        f"ridge {peak.ridge_point:.0f} FLOP/B"
        + (
            f" (efficiency: compute {eff.compute:g}, HBM {eff.hbm:g}, host {eff.host_link:g}, "
            f"GPU link {eff.gpu_link:g})"
            if eff.compute != 1.0 or eff.hbm != 1.0 or eff.host_link != 1.0 or eff.gpu_link != 1.0
            else ""
        ),
        f"weights {fmt_bytes(sc.weight_bytes)} per GPU, {fmt_bytes(max(0.0, sc.hbm_free))} of HBM "
        f"left for KV; KV {sc.kv_bytes_per_token:,.0f} B/token",
    ]
    if sc.hbm_free <= 0:
        lines.append(
            f"WARNING: the weights ({fmt_bytes(sc.weight_bytes)}) do not fit in one GPU's HBM "
            f"({fmt_bytes(g.hbm)}); nothing fits. Try --tp or a smaller --weight-dtype."
        )
    if any(mode != "dense" for mode in modes):
        h = sc.hip
        lines.append(f"HiP: {h.describe()}, refresh every {h.refresh_interval} steps")
    lp = sc.launches
    lines.append(
        f"latency: {peak.launch_latency * 1e6:.3g} us a launch, {peak.memory_latency * 1e6:.3g} us "
        f"a dependent round trip; launches per layer ({lp.name}): dense {lp.dense_decode}, HiP "
        f"decode {lp.hip_decode_reuse} ({lp.hip_decode_refresh} refreshing), prefill "
        f"{lp.hip_prefill}"
        + (f"; prefill in chunks of {short_tokens(sc.prefill_chunk)}" if sc.prefill_chunk else "")
    )
    if "hip+offload" in modes:
        o = sc.offload
        lines.append(
            f"offload: host RAM {fmt_bytes(o.host_ram)}, block cache "
            f"{short_tokens(o.block_cache_tokens)} tokens/request, miss rate {o.miss_rate:.0%}"
        )
    return lines


def table(sc: Scenario, estimates: Sequence[Estimate]) -> str:
    """A readable table: one block per context, one row per mode."""
    modes = [mode for mode in MODES if any(e.mode == mode for e in estimates)]
    out = header_lines(sc, modes)
    titles = [title.format(out=sc.output_tokens) for title, _, _ in _COLUMNS]
    trained = sc.model.max_context
    for context in dict.fromkeys(e.context for e in estimates):
        noun = "token" if context == 1 else "tokens"
        out += ["", f"context {short_tokens(context)} ({context:,} {noun})"]
        if any(e.beyond_trained_context for e in estimates if e.context == context):
            out.append(
                f"WARNING: {short_tokens(context)} + {sc.output_tokens} output tokens exceeds "
                f"{sc.model.name}'s trained context ({trained:,} tokens, "
                "max_position_embeddings): quality is not predicted"
            )
        out.append(_row(titles))
        for e in (e for e in estimates if e.context == context):
            out.append(
                _row(
                    [
                        e.mode,
                        fmt_bytes(e.kv_bytes),
                        fmt_bytes(e.gpu_bytes_per_request),
                        fmt_bytes(e.activation_bytes),
                        "yes" if e.fits else "NO",
                        f"{e.max_concurrency:,}",
                        f"{e.max_context:,}",
                        fmt_seconds(e.prefill.time_s),
                        e.prefill.bound,
                        fmt_seconds(e.decode.time_s),
                        e.decode.bound,
                        f"{e.decode_tokens_per_s:,.0f}",
                        fmt_seconds(e.decode_total_s),
                        fmt_seconds(e.context_switch_s),
                    ]
                )
            )
    out += [
        "",
        "KV/req: KV cache of one request at the context; HBM/req: what one request holds on each",
        "GPU once its outputs are added; act: peak prefill activations of the batch (fits: weights",
        "+ HBM/req + act within HBM); max conc: requests that fit at once; max ctx: longest",
        "prompt one request can have; prefill: the batch's prompts; decode/tok: one step at the",
        "mean context; switch: moving one request's GPU state over the host link.",
    ]
    return "\n".join(out)


def to_json(sc: Scenario, estimates: Sequence[Estimate]) -> dict[str, Any]:
    """Everything the table shows and more, as plain data (bytes, seconds, FLOPs, FLOP/s)."""
    modes = list(dict.fromkeys(e.mode for e in estimates))
    return {
        "model": sc.model.to_dict(),
        "gpu": sc.gpu.to_dict(),
        "efficiency": sc.efficiency.to_dict(),
        "settings": {
            "weight_dtype": sc.weight_dtype,
            "kv_dtype": sc.kv_dtype,
            "batch": sc.batch,
            "output_tokens": sc.output_tokens,
            "tp": sc.tp,
            "modes": modes,
            "contexts": list(dict.fromkeys(e.context for e in estimates)),
            "hip": sc.hip.to_dict(),
            "offload": {
                "host_ram": sc.offload.host_ram,
                "block_cache_tokens": sc.offload.block_cache_tokens,
                "miss_rate": sc.offload.miss_rate,
            },
        },
        "derived": {
            "weight_bytes_per_gpu": sc.weight_bytes,
            "hbm_free_per_gpu": sc.hbm_free,
            "weights_fit": sc.hbm_free > 0,
            "kv_bytes_per_token": sc.kv_bytes_per_token,
            "matmul_params_per_gpu": sc.matmul_params_per_gpu,
            "ridge_point": sc.peak.ridge_point,
            "max_context": {mode: max_context(sc, mode) for mode in MODES},
        },
        "results": [e.to_dict(sc.peak) for e in estimates],
    }
