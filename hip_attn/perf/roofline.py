"""Roofline arithmetic: operators, their arithmetic intensity and bound, and phase totals.

An operator is a (FLOPs, HBM bytes) pair. Its time on a GPU is
``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` and its bound is whichever term wins.
A phase (prefill or decode step) sums its operators' FLOPs and bytes and applies the same rule
to the totals, adding host-link traffic (overlapped: one more term of the max) and
tensor-parallel all-reduce time (on the critical path: added).
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
        hbm_bytes: device-memory traffic: weights, KV cache and activations read and written.
    """

    name: str
    phase: str
    flops: float
    hbm_bytes: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

    def time_s(self, gpu: GPUSpec) -> float:
        """``max(flops / peak, bytes / bandwidth)`` in seconds."""
        return max(self.flops / gpu.flops, self.hbm_bytes / gpu.hbm_bandwidth)

    def bound(self, gpu: GPUSpec) -> str:
        """``"compute"`` or ``"memory"``: the term of the max that wins."""
        return (
            "compute" if self.flops / gpu.flops >= self.hbm_bytes / gpu.hbm_bandwidth else "memory"
        )

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
        gpu_link_bytes: bytes each GPU sends for tensor-parallel all-reduce.
        compute_s, memory_s, host_s, gpu_link_s: the four terms.
        time_s: ``max(compute_s, memory_s, host_s) + gpu_link_s``.
        bound: ``"compute"``, ``"memory"``, ``"host-link"`` or ``"gpu-link"``.
        operators: the operators summed.
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
    overlapped = max(terms.values())
    bound = max(terms, key=lambda key: terms[key])
    if gpu_link_s > overlapped:
        bound = "gpu-link"
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
        time_s=overlapped + gpu_link_s,
        bound=bound,
        operators=ops,
    )
