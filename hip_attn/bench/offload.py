"""``hip-attn bench offload``: one attention layer whose KV cache lives in host memory
(:class:`hip_attn.offload.OffloadedKV`), measured in two parts, each giving records of
``"mode": "offload"``.

* ``memory`` (one record): the layer is filled (random K/V appended from the device in chunks of
  ``max_chunk`` tokens) and runs one refresh cycle of decode steps, ending at each memory
  context. Per context: the device memory it took (on CUDA ``torch.cuda.max_memory_allocated``
  over what was allocated before it; on the CPU, which has no allocator statistics, the layer's
  own ``device_bytes``), beside the bytes of ``R`` (the search's summary tree, as allocated), of
  the block table, of the host copy and of the full K/V. ``growth`` compares the last context with
  the first: the claim is that the device grows only by ``R``.
* ``decode`` (one record per context): after the fill, ``warmup_steps`` and then ``steps`` decode
  steps, each appending one random token and attending one random query through one
  :class:`HiPDecodeState`, so the selection is re-estimated every ``refresh_interval`` steps as in
  generation. Every step runs alone (synchronized before and after; the L2 cache flushed before it
  on CUDA), its ``append`` and its ``attend`` timed apart (on CUDA an append only queues its copies
  to the host on a side stream; they are timed within ``attend``, which waits for them), and it is
  classified by whether the state refreshed. Bytes moved host->device and block-cache hits come from
  the layer's counters around each step. The same steps (same K/V, same inputs) then run without
  offload, ``hip_attention`` on device-resident K/V with its own ``HiPDecodeState``, where that
  fits in device memory.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hip_attn.attention import HiPDecodeState, hip_attention
from hip_attn.bench.cases import OffloadPlan
from hip_attn.bench.runner import backend_label, failure_entry, timing_label
from hip_attn.bench.timing import L2_FLUSH_BYTES, StepClock, summarize
from hip_attn.geometry import summary_width, tree_blocks, tree_rows
from hip_attn.offload import OffloadedKV
from hip_attn.perf.units import fmt_bytes, short_tokens

Say = Callable[[str], None]
#: What the memory part measures, by device kind.
MEMORY_SOURCE = {
    "cuda": "torch.cuda.max_memory_allocated",
    "cpu": "OffloadedKV.device_bytes (the CPU has no allocator statistics)",
}
#: The results of each side: ``offload_<name>`` and ``device_<name>``.
DEVICE_RESULTS = ("refresh", "reuse", "append", "amortized")
#: Headroom asked for beyond the device-resident K/V before the baseline runs.
BASELINE_SLACK_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Step:
    """One decode step: its two calls' durations, whether the selection was re-estimated, and
    the block-cache traffic it caused (zero without offload)."""

    append_ms: float
    attend_ms: float
    refresh: bool
    bytes_moved: int = 0
    hits: int = 0
    misses: int = 0


# ---- pieces ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _dtype(plan: OffloadPlan) -> torch.dtype:
    dtype = getattr(torch, plan.shape.dtype)
    assert isinstance(dtype, torch.dtype)
    return dtype


def kv_bytes(plan: OffloadPlan, tokens: int) -> int:
    """Bytes of the full K and V of ``tokens`` tokens (what a device-resident cache holds)."""
    sh = plan.shape
    return 2 * sh.batch * sh.kv_heads * tokens * sh.head_dim * sh.element_bytes


def make_layer(plan: OffloadPlan, device: torch.device) -> OffloadedKV:
    """An empty offloaded layer with the plan's settings."""
    sh = plan.shape
    return OffloadedKV(
        plan.config,
        sh.batch,
        sh.kv_heads,
        sh.head_dim,
        _dtype(plan),
        device,
        cache_blocks=plan.cache_blocks,
        max_chunk=plan.max_chunk,
        host_chunk_tokens=plan.host_chunk_tokens,
        gather=plan.gather,
    )


def kv_chunks(
    plan: OffloadPlan, context: int, device: torch.device, seed: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, k, v)``: random K/V of ``context`` tokens in chunks of ``max_chunk``, made on
    ``device`` from one seeded generator (the same values for the layer and the baseline)."""
    sh, dtype = plan.shape, _dtype(plan)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, context, plan.max_chunk):
        shape = (sh.batch, sh.kv_heads, min(plan.max_chunk, context - start), sh.head_dim)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        yield start, k, v


def fill(
    layer: OffloadedKV, plan: OffloadPlan, context: int, device: torch.device, seed: int
) -> float:
    """Append ``context`` random tokens in chunks of ``max_chunk``; returns the seconds it took
    (making the random chunks on the device included)."""
    _sync(device)
    start = time.perf_counter()
    for _, k, v in kv_chunks(plan, context, device, seed):
        layer.append(k, v)
    _sync(device)
    return time.perf_counter() - start


class StepInputs:
    """A random query ``[B, Hq, 1, D]`` and one random token of K and V per decode step, made
    once on the device before anything is timed."""

    def __init__(self, plan: OffloadPlan, steps: int, device: torch.device, seed: int) -> None:
        sh, dtype = plan.shape, _dtype(plan)
        gen = torch.Generator(device=device).manual_seed(seed + 1)

        def rand(heads: int) -> torch.Tensor:
            shape = (steps, sh.batch, heads, 1, sh.head_dim)
            return torch.randn(shape, generator=gen, device=device, dtype=dtype)

        self.q, self.k, self.v = rand(sh.heads), rand(sh.kv_heads), rand(sh.kv_heads)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q[i], self.k[i], self.v[i]


def run_steps(
    append: Callable[[torch.Tensor, torch.Tensor], None],
    attend: Callable[[torch.Tensor], torch.Tensor],
    inputs: StepInputs,
    first: int,
    count: int,
    state: HiPDecodeState,
    device: torch.device,
    counters: Callable[[], tuple[int, int, int]] | None = None,
    flush: torch.Tensor | None = None,
) -> tuple[list[Step], torch.Tensor | None]:
    """Run decode steps ``first .. first + count - 1`` one at a time and time each; returns the
    steps and the last output. ``counters`` gives ``(bytes moved, hits, misses)`` so far."""
    clock = StepClock(device)
    marks = []
    out = None
    zero = (0, 0, 0)
    for i in range(first, first + count):
        q, k, v = inputs(i)
        refreshes = state.refreshes
        before = counters() if counters else zero
        if flush is not None:
            flush.zero_()
        _sync(device)
        m0 = clock.mark()
        append(k, v)
        m1 = clock.mark()
        out = attend(q)
        m2 = clock.mark()
        _sync(device)
        after = counters() if counters else zero
        delta = tuple(b - a for a, b in zip(before, after, strict=True))
        marks.append((m0, m1, m2, state.refreshes != refreshes, delta))
    steps = [
        Step(clock.ms(m0, m1), clock.ms(m1, m2), refresh, *delta)
        for m0, m1, m2, refresh, delta in marks
    ]
    return steps, out


def _memory(device: torch.device) -> tuple[int, int] | None:
    """``(allocated, peak)`` device bytes now, or ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def _reset_peak(device: torch.device) -> int | None:
    """Reset the CUDA peak; returns the bytes allocated now (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


# ---- summaries ---------------------------------------------------------------------------------


def _cycle_means(steps: list[Step], interval: int) -> list[float]:
    """Milliseconds per step (append + attend) of every complete refresh cycle: a refreshing
    step and the ``interval - 1`` steps reusing its selection."""
    starts = [i for i, s in enumerate(steps) if s.refresh]
    ends = [*starts[1:], len(steps)] if starts else []  # no refresh timed: no cycle
    means = []
    for a, b in zip(starts, ends, strict=True):
        cycle = steps[a:b]
        if len(cycle) == interval:
            means.append(sum(s.append_ms + s.attend_ms for s in cycle) / interval)
    return means


def _traffic(steps: list[Step]) -> dict[str, Any]:
    n = len(steps)
    hits, misses = sum(s.hits for s in steps), sum(s.misses for s in steps)
    moved = [s.bytes_moved for s in steps]
    return {
        "bytes_per_step": sum(moved) / n if n else 0.0,
        "bytes_per_step_max": max(moved, default=0),
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
    }


def summarize_steps(
    prefix: str,
    steps: list[Step],
    interval: int,
    memory: dict[str, int | None],
    traffic: bool,
) -> dict[str, dict[str, Any]]:
    """``<prefix>_refresh`` and ``<prefix>_reuse`` (the attend call of refreshing and reusing
    steps), ``<prefix>_append`` and ``<prefix>_amortized`` (append + attend per step over whole
    refresh cycles), each a median with percentiles, or ``{"skipped": reason}``."""
    out: dict[str, dict[str, Any]] = {}
    classes = {
        "refresh": [s for s in steps if s.refresh],
        "reuse": [s for s in steps if not s.refresh],
    }
    for name, chosen in classes.items():
        if not chosen:
            out[f"{prefix}_{name}"] = {"skipped": f"no {name} step among the timed steps"}
            continue
        entry = summarize([s.attend_ms for s in chosen], **memory).to_dict()
        entry["steps"] = len(chosen)
        if traffic:
            entry.update(_traffic(chosen))
        out[f"{prefix}_{name}"] = entry
    out[f"{prefix}_append"] = summarize([s.append_ms for s in steps], **memory).to_dict() | {
        "steps": len(steps)
    }
    cycles = _cycle_means(steps, interval)
    if cycles:
        entry = summarize(cycles, **memory).to_dict()
        entry.update(cycles=len(cycles), steps_per_cycle=interval)
        if traffic:
            entry.update(_traffic(steps))
        out[f"{prefix}_amortized"] = entry
    else:
        out[f"{prefix}_amortized"] = {
            "skipped": f"no complete refresh cycle ({interval} steps) among the timed steps"
        }
    return out


def _common(plan: OffloadPlan, device: torch.device) -> dict[str, Any]:
    sh = plan.shape
    return {
        "mode": "offload",
        "queries": 1,
        "shape": {
            "batch": sh.batch,
            "heads": sh.heads,
            "kv_heads": sh.kv_heads,
            "head_dim": sh.head_dim,
            "dtype": sh.dtype,
        },
        "config": plan.config.to_dict(),
        "backend": backend_label(device),
        "timing": timing_label(device),
    }


# ---- the memory part ---------------------------------------------------------------------------


def _memory_at(plan: OffloadPlan, context: int, device: torch.device, seed: int) -> dict[str, Any]:
    _clean(device)
    base = _reset_peak(device)
    start = time.perf_counter()
    layer = make_layer(plan, device)
    setup_s = time.perf_counter() - start
    steps = plan.config.refresh_interval + 1  # a refreshing step, the reuses, a refresh again
    # the steps end at exactly `context` tokens
    fill_s = fill(layer, plan, context - steps if context > steps else context, device, seed)
    inputs = StepInputs(plan, steps, device, seed)
    state = HiPDecodeState()
    for i in range(steps):
        q, k, v = inputs(i)
        layer.append(k, v)
        layer.attend(q, state=state)
    del inputs, q, k, v
    _sync(device)
    now = _memory(device)
    rep = layer.tree
    assert rep is not None  # filled past the sinks
    sh, cfg = plan.shape, plan.config
    tokens = layer.length
    rows = tree_rows(tree_blocks(tokens, cfg))
    rep_used = sh.batch * sh.kv_heads * rows * summary_width(sh.head_dim) * rep.element_size()
    entry: dict[str, Any] = {
        "context": context,
        "tokens": tokens,
        "decode_steps": steps,
        "refreshes": state.refreshes,
        "peak_bytes": None if now is None or base is None else now[1] - base,
        "allocated_bytes": None if now is None or base is None else now[0] - base,
        "device_bytes": layer.device_bytes,
        "rep_bytes": rep.numel() * rep.element_size(),
        "rep_used_bytes": rep_used,
        "table_bytes": layer.cache.table.numel() * layer.cache.table.element_size(),
        "host_bytes": layer.host_bytes,
        "full_kv_bytes": kv_bytes(plan, tokens),
        "fill_s": fill_s,
        "setup_s": setup_s,
        "gather": layer.gather_kind,
    }
    entry["measured_bytes"] = (
        entry["peak_bytes"] if device.type == "cuda" else entry["device_bytes"]
    )
    del layer, rep, state
    _clean(device)
    return entry


def _growth(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "measured_bytes",
        "peak_bytes",
        "allocated_bytes",
        "device_bytes",
        "rep_bytes",
        "rep_used_bytes",
        "table_bytes",
        "host_bytes",
        "full_kv_bytes",
    )
    growth: dict[str, Any] = {"from": first["context"], "to": last["context"]}
    for key in keys:
        a, b = first.get(key), last.get(key)
        growth[key] = None if a is None or b is None else b - a
    rep = growth["rep_bytes"]
    for key in ("measured_bytes", "peak_bytes", "allocated_bytes", "device_bytes"):
        value = growth[key]
        name = key.replace("_bytes", "") + "_over_rep"
        growth[name] = value / rep if value is not None and rep else None
    return growth


def memory_part(
    plan: OffloadPlan, device: torch.device, seed: int, say: Say | None = None
) -> dict[str, Any]:
    """The memory record's case-specific part (the caller adds the environment)."""
    log = say or (lambda _msg: None)
    warmup: dict[str, Any] | None = None
    if device.type == "cuda":  # one-time work (kernel builds, compilation) outside the numbers
        context = plan.memory_contexts[0]
        log(f"memory {short_tokens(context)}: warm-up pass (builds and compiles on first use)")
        first = _memory_at(plan, context, device, seed)
        warmup = {"context": context, "setup_s": first["setup_s"], "fill_s": first["fill_s"]}
    per = []
    for context in plan.memory_contexts:
        log(f"memory {short_tokens(context)}: fill and {plan.config.refresh_interval + 1} steps")
        per.append(_memory_at(plan, context, device, seed))
        e = per[-1]
        log(
            f"memory {short_tokens(context)}: measured {fmt_bytes(e['measured_bytes'])}, "
            f"R {fmt_bytes(e['rep_bytes'])}, host {fmt_bytes(e['host_bytes'])} "
            f"(fill {e['fill_s']:.2f} s)"
        )
    growth = _growth(per[0], per[-1])
    notes = [
        "R grows by a quarter when full: while it grows the old and the new copy coexist, so the "
        "peak may grow by up to 1.8x the growth of R (allocated_bytes is after the steps)",
        "the block table (int32 per block and KV head) grows with the context too: table_bytes",
    ]
    if device.type != "cuda":
        notes.insert(0, "CPU: measured_bytes is the layer's own device_bytes accounting")
    else:
        notes.insert(0, "a warm-up pass at the first context ran before the measured ones")
    return {
        **_common(plan, device),
        "part": "memory",
        "context": plan.memory_contexts[-1],
        "timing_settings": None,
        "results": {},
        "memory": {
            "source": MEMORY_SOURCE["cuda" if device.type == "cuda" else "cpu"],
            "contexts": list(plan.memory_contexts),
            "per_context": per,
            "growth": growth,
            "warmup": warmup,
        },
        "offload": plan.settings() | {"gather": per[-1]["gather"]},
        "prediction": None,
        "accuracy": {},
        "notes": notes,
    }


# ---- the decode part ---------------------------------------------------------------------------


def _baseline_room(plan: OffloadPlan, tokens: int, device: torch.device) -> str | None:
    """Why device-resident K/V of ``tokens`` tokens would not fit, or ``None``."""
    if device.type != "cuda":
        return None
    need = kv_bytes(plan, tokens) + L2_FLUSH_BYTES + BASELINE_SLACK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        return (
            f"device-resident K/V of {tokens} tokens needs about {fmt_bytes(need)} with "
            f"headroom, {fmt_bytes(free)} is free"
        )
    return None


def _timed(
    append: Callable[[torch.Tensor, torch.Tensor], None],
    attend: Callable[[torch.Tensor], torch.Tensor],
    plan: OffloadPlan,
    inputs: StepInputs,
    state: HiPDecodeState,
    device: torch.device,
    counters: Callable[[], tuple[int, int, int]] | None,
) -> tuple[list[Step], torch.Tensor | None, dict[str, int | None]]:
    """Warm-up steps, then the timed ones (peak memory over them, the flush buffer left out)."""
    flush = (
        torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        if device.type == "cuda"
        else None
    )
    run_steps(append, attend, inputs, 0, plan.warmup_steps, state, device, counters, flush)
    before = _reset_peak(device)
    steps, out = run_steps(
        append, attend, inputs, plan.warmup_steps, plan.steps, state, device, counters, flush
    )
    now = _memory(device)
    memory: dict[str, int | None] = {"peak_mem_bytes": None, "extra_mem_bytes": None}
    if now is not None and before is not None:
        memory = {
            "peak_mem_bytes": now[1] - L2_FLUSH_BYTES,
            "extra_mem_bytes": now[1] - before,
        }
    del flush
    return steps, out, memory


def _offload_decode(
    plan: OffloadPlan, context: int, device: torch.device, seed: int, inputs: StepInputs, say: Say
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """The decode steps through an offloaded layer filled to ``context`` tokens."""
    cfg, scale = plan.config, plan.shape.head_dim**-0.5
    start = time.perf_counter()
    layer = make_layer(plan, device)
    setup_s = time.perf_counter() - start
    say(f"filling {context} tokens (chunks of {plan.max_chunk})")
    fill_s = fill(layer, plan, context, device, seed)
    say(f"filled in {fill_s:.2f} s; {plan.decode_steps_total} decode steps")
    state = HiPDecodeState()

    def counters() -> tuple[int, int, int]:
        s = layer.cache.stats
        return s.bytes_moved, s.hits, s.misses

    def attend(q: torch.Tensor) -> torch.Tensor:
        out = layer.attend(q, scale=scale, state=state)
        if device.type == "cuda":  # the step ends when the appends' copies (a side stream) do
            layer.host.wait_appends(torch.cuda.current_stream(device))
        return out

    steps, out, memory = _timed(layer.append, attend, plan, inputs, state, device, counters)
    results = summarize_steps("offload", steps, cfg.refresh_interval, memory, traffic=True)
    info: dict[str, Any] = plan.settings() | {
        "gather": layer.gather_kind,
        "setup_s": setup_s,
        "fill_s": fill_s,
        "fill_tokens": context,
        "fill_host_gb_per_s": kv_bytes(plan, context) / fill_s / 1e9 if fill_s > 0 else None,
        "tokens_after": layer.length,
        "refreshes_timed": sum(s.refresh for s in steps),
        "host_bytes": layer.host_bytes,
        "device_bytes": layer.device_bytes,
        "rep_bytes": 0 if layer.tree is None else layer.tree.numel() * layer.tree.element_size(),
        "full_kv_bytes": kv_bytes(plan, layer.length),
        "stats": layer.stats(),
    }
    indices = None if state.indices is None else state.indices.clone()
    return results, info, out, indices


def decode_case(
    plan: OffloadPlan, context: int, device: torch.device, seed: int, say: Say | None = None
) -> dict[str, Any]:
    """One decode record's case-specific part (the caller adds the environment)."""
    log = say or (lambda _msg: None)
    cfg = plan.config
    label = f"offload decode {short_tokens(context)}"
    notes: list[str] = []
    inputs = StepInputs(plan, plan.decode_steps_total, device, seed)

    _clean(device)
    results, offload_info, out_off, indices_off = _offload_decode(
        plan, context, device, seed, inputs, lambda msg: log(f"{label}: {msg}")
    )
    _clean(device)

    accuracy: dict[str, Any] = {}
    device_info: dict[str, Any] | None = None
    total = context + plan.decode_steps_total
    skipped = "--no-baseline" if not plan.baseline else _baseline_room(plan, total, device)
    if skipped is not None:
        results.update({f"device_{name}": {"skipped": skipped} for name in DEVICE_RESULTS})
    else:
        log(f"{label}: the same steps on device-resident K/V")
        try:
            dev_results, device_info, out_dev, indices_dev = _device_decode(
                plan, context, device, seed, inputs
            )
            results.update(dev_results)
            if out_off is not None and out_dev is not None:
                diff = (out_off.float() - out_dev.float()).abs().max()
                accuracy["offload_vs_device_max_abs"] = float(diff)
            if indices_off is not None and indices_dev is not None:
                accuracy["same_selection"] = bool(torch.equal(indices_off, indices_dev))
        except Exception as exc:  # the offloaded numbers stand on their own
            results.update({f"device_{name}": failure_entry(exc) for name in DEVICE_RESULTS})
        _clean(device)
    if context <= cfg.effective_dense_threshold:
        notes.append(
            f"context <= dense_threshold ({cfg.effective_dense_threshold}): the device-resident "
            "hip_attention runs dense SDPA, the offloaded layer stays sparse"
        )
    notes.append(
        "random queries: every refresh selects unrelated blocks, the block cache's worst case "
        "(real decoding queries are correlated from step to step)"
    )

    ratios: dict[str, float] = {}
    for name in ("refresh", "reuse", "amortized"):
        a = results.get(f"offload_{name}", {}).get("ms")
        b = results.get(f"device_{name}", {}).get("ms")
        if a and b:
            ratios[name] = a / b
    return {
        **_common(plan, device),
        "part": "decode",
        "context": context,
        "timing_settings": {
            "warmup_steps": plan.warmup_steps,
            "steps": plan.steps,
            "l2_flush_bytes": L2_FLUSH_BYTES if device.type == "cuda" else None,
            "synchronized_per_step": True,
        },
        "results": results,
        "offload_vs_device": ratios,
        "offload": offload_info,
        "device_resident": device_info,
        "prediction": None,
        "accuracy": accuracy,
        "notes": notes,
    }


def _device_decode(
    plan: OffloadPlan, context: int, device: torch.device, seed: int, inputs: StepInputs
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """The decode steps with K/V resident on the device: ``hip_attention`` and a
    :class:`HiPDecodeState`, a token appended by writing it into a preallocated buffer."""
    sh, cfg, scale = plan.shape, plan.config, plan.shape.head_dim**-0.5
    total = context + plan.decode_steps_total
    shape = (sh.batch, sh.kv_heads, total, sh.head_dim)
    k_all = torch.empty(shape, dtype=_dtype(plan), device=device)
    v_all = torch.empty_like(k_all)
    _sync(device)
    start = time.perf_counter()
    for at, k, v in kv_chunks(plan, context, device, seed):
        k_all[:, :, at : at + k.shape[2]] = k
        v_all[:, :, at : at + v.shape[2]] = v
    _sync(device)
    fill_s = time.perf_counter() - start
    length = [context]
    state = HiPDecodeState()

    def append(k: torch.Tensor, v: torch.Tensor) -> None:
        t = length[0]
        k_all[:, :, t : t + 1] = k
        v_all[:, :, t : t + 1] = v
        length[0] = t + 1

    def attend(q: torch.Tensor) -> torch.Tensor:
        t = length[0]
        return hip_attention(q, k_all[:, :, :t], v_all[:, :, :t], cfg, scale=scale, state=state)

    steps, out, memory = _timed(append, attend, plan, inputs, state, device, None)
    results = summarize_steps("device", steps, cfg.refresh_interval, memory, traffic=False)
    info = {
        "kv_bytes": kv_bytes(plan, total),
        "fill_s": fill_s,
        "refreshes_timed": sum(s.refresh for s in steps),
    }
    indices = None if state.indices is None else state.indices.clone()
    return results, info, out, indices
