"""Roofline arithmetic: operators, their arithmetic intensity and bound, and phase totals.

An operator is a (FLOPs, HBM bytes) pair. Its time on a GPU is
``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` and its bound is whichever term wins.
A phase (prefill or decode step) sums its operators' FLOPs and bytes and applies the same rule
to the totals, adding host-link traffic (overlapped: one more term of the max),
tensor-parallel all-reduce time and the operators' fixed latency (kernel launches and dependent
memory round trips: on the critical path, added).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from hip_attn.perf.hardware import GPUSpec


def attainable_flops(intensity: float, gpu: GPUSpec) -> float:
    """The roofline: FLOP/s reachable at ``intensity`` FLOP/byte, ``min(peak, AI x bandwidth)``."""
    return min(gpu.flops, intensity * gpu.hbm_bandwidth)


@dataclass(frozen=True)
class Operator:
    """One operator of a phase, summed over layers (and the batch).

    Attributes:
        name: e.g. ``qkv_proj``, ``attention``, ``hip_search``.
        phase: ``"prefill"`` or ``"decode"``.
        flops: floating-point operations (a multiply-add counts 2).
        hbm_bytes: device-memory traffic: weights, KV cache and activations read and written
            (gathers counted at their effective size, see ``gather_efficiency``).
        latency_s: fixed seconds that no bandwidth hides: kernel launches and dependent memory
            round trips (0 for the matmuls, see docs/roofline.md "Latency floors").
        kernels: kernel launches, summed over layers.
    """

    name: str
    phase: str
    flops: float
    hbm_bytes: float
    latency_s: float = 0.0
    kernels: float = 0.0

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

    def time_s(self, gpu: GPUSpec) -> float:
        """``max(flops / peak, bytes / bandwidth) + latency_s`` in seconds."""
        return max(self.flops / gpu.flops, self.hbm_bytes / gpu.hbm_bandwidth) + self.latency_s

    def bound(self, gpu: GPUSpec) -> str:
        """``"compute"``, ``"memory"`` or ``"latency"``: the largest of the three terms."""
        compute, memory = self.flops / gpu.flops, self.hbm_bytes / gpu.hbm_bandwidth
        if self.latency_s > max(compute, memory):
            return "latency"
        return "compute" if compute >= memory else "memory"

    def to_dict(self, gpu: GPUSpec) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            intensity=self.intensity,
            time_s=self.time_s(gpu),
            bound=self.bound(gpu),
            attained_flops=self.flops / self.time_s(gpu) if self.time_s(gpu) else 0.0,
        )
        return data


@dataclass(frozen=True)
class PhaseCost:
    """Totals of one phase and the time they cost.

    Attributes:
        phase: ``"prefill"`` (whole prompt) or ``"decode"`` (one step of the batch).
        flops, hbm_bytes: sums over the operators.
        host_bytes: bytes over the host link (the larger direction).
        gpu_link_bytes: bytes each GPU sends for tensor-parallel collectives.
        compute_s, memory_s, host_s, gpu_link_s: the four bandwidth terms.
        time_s: ``max(compute_s, memory_s, host_s) + gpu_link_s + latency_s``.
        bound: ``"compute"``, ``"memory"``, ``"host-link"``, ``"gpu-link"`` or ``"latency"``.
        operators: the operators summed.
        latency_s: the operators' fixed latency, summed (launches, dependent round trips).
        kernels: kernel launches of the operators, summed.
    """

    phase: str
    flops: float
    hbm_bytes: float
    host_bytes: float
    gpu_link_bytes: float
    compute_s: float
    memory_s: float
    host_s: float
    gpu_link_s: float
    time_s: float
    bound: str
    operators: tuple[Operator, ...]
    latency_s: float = 0.0
    kernels: float = 0.0

    def to_dict(self, gpu: GPUSpec) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "operators"}
        data["operators"] = [op.to_dict(gpu) for op in self.operators]
        return data


def phase_cost(
    phase: str,
    operators: Iterable[Operator],
    gpu: GPUSpec,
    host_bytes: float = 0.0,
    gpu_link_bytes: float = 0.0,
) -> PhaseCost:
    """Sum ``operators`` and time the phase on ``gpu`` (peaks already scaled by efficiency)."""
    ops = tuple(operators)
    flops = sum(op.flops for op in ops)
    hbm_bytes = sum(op.hbm_bytes for op in ops)
    terms = {
        "compute": flops / gpu.flops,
        "memory": hbm_bytes / gpu.hbm_bandwidth,
        "host-link": host_bytes / gpu.host_link,
    }
    gpu_link_s = gpu_link_bytes / gpu.gpu_link
    latency_s = sum(op.latency_s for op in ops)
    overlapped = max(terms.values())
    bound = max(terms, key=lambda key: terms[key])
    if gpu_link_s > overlapped:
        bound = "gpu-link"
    if latency_s > max(overlapped, gpu_link_s):
        bound = "latency"
    return PhaseCost(
        phase=phase,
        flops=flops,
        hbm_bytes=hbm_bytes,
        host_bytes=host_bytes,
        gpu_link_bytes=gpu_link_bytes,
        compute_s=terms["compute"],
        memory_s=terms["memory"],
        host_s=terms["host-link"],
        gpu_link_s=gpu_link_s,
        time_s=overlapped + gpu_link_s + latency_s,
        bound=bound,
        operators=ops,
        latency_s=latency_s,
        kernels=sum(op.kernels for op in ops),
    )
