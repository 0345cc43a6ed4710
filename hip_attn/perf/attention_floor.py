"""The hardware floor of one attention layer: what the analytic model predicts for attention
alone, without the projections, MLP and LM head around it.

The kernel benchmarks (``hip-attn bench``) compare their measurements with this. It reuses the
estimator unchanged: a one-layer, attention-only model (no MLP, no vocabulary to speak of) goes
through :func:`hip_attn.perf.estimate`, and only the attention operators are kept
(``attention`` for dense; ``hip_search`` and ``hip_attention`` for HiP), timed together and one
by one as ``max(FLOPs / peak, bytes / bandwidth)`` plus their fixed latency (launches and
dependent round trips). Pure Python, like the rest of
:mod:`hip_attn.perf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hip_attn.config import HiPConfig
from hip_attn.perf.estimator import (
    DTYPE_BYTES,
    LAUNCH_PROFILES,
    LaunchProfile,
    OffloadConfig,
    Scenario,
    estimate,
)
from hip_attn.perf.hardware import GPUSpec
from hip_attn.perf.models import ModelSpec
from hip_attn.perf.roofline import PhaseCost, phase_cost

Phase = Literal["prefill", "decode"]
Method = Literal["dense", "hip"]

#: Operators of the estimator that belong to attention.
ATTENTION_OPERATORS = ("attention", "hip_search", "hip_representatives", "hip_attention")


@dataclass(frozen=True)
class AttentionFloor:
    """The predicted floor of one attention layer.

    Attributes:
        phase: ``"prefill"`` (the whole prompt of ``context`` tokens attends causally) or
            ``"decode"`` (one new token attends ``context`` cached tokens).
        method: ``"dense"`` or ``"hip"``.
        context: key tokens.
        total: all attention operators together (their FLOPs and bytes summed, then timed).
        parts: each operator alone, by name (``attention``, ``hip_search``, ``hip_attention``).
    """

    phase: str
    method: str
    context: int
    total: PhaseCost
    parts: dict[str, PhaseCost] = field(default_factory=dict)

    @property
    def time_s(self) -> float:
        """Predicted seconds for the whole layer's attention."""
        return self.total.time_s


def attention_only_model(heads: int, kv_heads: int, head_dim: int) -> ModelSpec:
    """A one-layer model whose only sizable part is attention with these shapes."""
    return ModelSpec(
        name="attention-only",
        layers=1,
        hidden=heads * head_dim,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=1,
        vocab=1,
    )


def attention_floor(
    method: Method,
    phase: Phase,
    context: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    gpu: GPUSpec,
    batch: int = 1,
    dtype: str = "bf16",
    config: HiPConfig | None = None,
    launches: LaunchProfile = LAUNCH_PROFILES["today"],
) -> AttentionFloor:
    """Predict one attention layer's time at peak FLOP/s and HBM bandwidth.

    Args:
        method: ``"dense"`` (FlashAttention-like causal attention) or ``"hip"``.
        phase: ``"prefill"`` (``context`` queries over ``context`` keys) or ``"decode"`` (one
            query over ``context`` keys; the HiP search is amortized over
            ``config.refresh_interval`` steps, pass ``refresh_interval=1`` for a step that
            searches).
        context: key tokens.
        heads, kv_heads, head_dim: attention shapes (``heads % kv_heads == 0``).
        gpu: the GPU (peaks as given; scale them beforehand for efficiency).
        batch: sequences.
        dtype: a key of :data:`hip_attn.perf.DTYPE_BYTES` for Q, K, V and the output.
        config: HiP settings (default ``HiPConfig()``).
        launches: kernel launches per layer (``LAUNCH_PROFILES["today"]``: the code as it is).

    Raises:
        ValueError: unknown method, phase or dtype, or shapes the model refuses.
    """
    if method not in ("dense", "hip"):
        raise ValueError(f"method must be 'dense' or 'hip', got {method!r}")
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    cfg = config or HiPConfig()
    sc = Scenario(
        model=attention_only_model(heads, kv_heads, head_dim),
        gpu=gpu,
        weight_dtype=dtype,  # sets the activation (Q, O) width: 4 bytes for fp32, else 2
        kv_dtype=dtype,
        batch=batch,
        output_tokens=1,  # decode is then timed at exactly ``context`` keys
        hip=cfg,
        offload=OffloadConfig(block_cache_tokens=max(OffloadConfig().block_cache_tokens, cfg.k)),
        launches=launches,
    )
    est = estimate(sc, method, context)
    cost = est.prefill if phase == "prefill" else est.decode
    ops = [op for op in cost.operators if op.name in ATTENTION_OPERATORS]
    return AttentionFloor(
        phase=phase,
        method=method,
        context=context,
        total=phase_cost(phase, ops, sc.peak),
        parts={op.name: phase_cost(phase, [op], sc.peak) for op in ops},
    )
