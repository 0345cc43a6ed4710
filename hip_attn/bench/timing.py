"""Medians with warm-up, and peak memory.

CUDA (the method of ``triton.testing.do_bench``, with a floor on the run count): one call to
compile and autotune, one call under ``torch.cuda.reset_peak_memory_stats`` for the peak memory,
a short estimate of the time per call, then warm-up calls for ``warmup_ms`` and timed calls for
``rep_ms`` (at least ``min_runs``, at most ``max_runs``), each bracketed by CUDA events after the
L2 cache is flushed by writing a 256 MiB buffer. Events time the GPU's work only: the flush
queued before the start event lets the host run ahead, so a call's launch time (up to ~85 µs for
a chain of small kernels) is hidden from them. The same runs are therefore also timed on the
wall clock with the device synchronized before and after each call (``wall_ms``), which is
what a caller waiting for the result sees. The CPU uses the wall clock (``perf_counter``) over
``cpu_runs`` calls after ``cpu_warmup``.

Calls that change state (a decode step appends a token and may refresh its selection) cannot be
repeated blindly: :class:`StepClock` marks points within a sequence of such calls (CUDA events,
or the CPU clock), and :func:`summarize` turns the durations the caller picks into a
:class:`Timing`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Bytes written between timed CUDA runs to evict the L2 cache (H100/H200 L2: 50 MB).
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TimingSettings:
    """How long and how often to run each measurement.

    Attributes:
        warmup_ms: CUDA warm-up time per measurement, milliseconds.
        rep_ms: CUDA timed time per measurement, milliseconds.
        min_runs, max_runs: bounds on the CUDA timed runs.
        cpu_warmup, cpu_runs: CPU warm-up and timed calls.
    """

    warmup_ms: float = 25.0
    rep_ms: float = 200.0
    min_runs: int = 10
    max_runs: int = 1000
    cpu_warmup: int = 1
    cpu_runs: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    """A measured duration.

    Attributes:
        ms: median milliseconds per call.
        p20_ms, p80_ms: 20th and 80th percentiles.
        runs: timed calls.
        peak_mem_bytes: ``torch.cuda.max_memory_allocated`` during one call (inputs and
            everything else already allocated included); ``None`` on the CPU.
        extra_mem_bytes: that peak minus the memory allocated before the call.
        wall_ms: median wall-clock milliseconds per call between two device synchronizations
            (host launch time included); ``None`` on the CPU, where ``ms`` is already that.
    """

    ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    peak_mem_bytes: int | None = None
    extra_mem_bytes: int | None = None
    wall_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float], **extra: Any) -> Timing:
    """Median and percentiles of ``times_ms`` (and the other :class:`Timing` fields given)."""
    ordered = sorted(times_ms)
    return Timing(
        ms=statistics.median(ordered),
        p20_ms=_quantile(ordered, 0.2),
        p80_ms=_quantile(ordered, 0.8),
        runs=len(ordered),
        **extra,
    )


def time_cuda(fn: Callable[[], Any], settings: TimingSettings) -> Timing:
    """Median CUDA time of ``fn`` (see the module docstring)."""
    fn()  # compile, autotune, allocator warm-up
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, math.ceil(settings.warmup_ms / estimate_ms))):
        fn()
    runs = min(settings.max_runs, max(settings.min_runs, math.ceil(settings.rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    walls = []
    for _ in range(runs):
        flush.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    del flush
    return summarize(
        times,
        peak_mem_bytes=peak,
        extra_mem_bytes=peak - before,
        wall_ms=statistics.median(walls),
    )


def time_cpu(fn: Callable[[], Any], settings: TimingSettings) -> Timing:
    """Median wall-clock time of ``fn`` on the CPU."""
    for _ in range(max(0, settings.cpu_warmup)):
        fn()
    times = []
    for _ in range(max(1, settings.cpu_runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def measure(fn: Callable[[], Any], device: torch.device, settings: TimingSettings) -> Timing:
    """:func:`time_cuda` on a CUDA device, else :func:`time_cpu`."""
    if device.type == "cuda":
        return time_cuda(fn, settings)
    return time_cpu(fn, settings)


class StepClock:
    """Marks within a sequence of calls, read after they finished: CUDA events on a CUDA device
    (the stream's clock; synchronize before :meth:`ms`), ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A mark now (an event recorded on the current stream, or a CPU time)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3
