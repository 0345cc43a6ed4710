"""Peak-performance analytic model of long-context inference (``hip-attn roofline``).

Predicts, for a model x GPU x context x attention mode (``dense``, ``hip``, ``hip+offload``):
memory per request, whether it fits and how many requests fit, prefill time, decode time per
token, context-switch time, and every operator's place on the roofline. Pure Python: importing
it pulls in neither torch nor triton (matplotlib only when plotting).

Example::

    from hip_attn.perf import Scenario, estimate, get_gpu, get_model

    sc = Scenario(get_model("yi-34b"), get_gpu("a100-80g"))
    est = estimate(sc, "dense", 4096)
    print(est.prefill.time_s, est.decode_total_s)
"""

from hip_attn.perf.estimator import (
    DTYPE_BYTES,
    MODES,
    Estimate,
    Mode,
    OffloadConfig,
    Scenario,
    estimate,
    gpu_bytes_per_request,
    hip_decode_counts,
    hip_prefill_counts,
    max_context,
)
from hip_attn.perf.hardware import GPU_PRESETS, Efficiency, GPUSpec, get_gpu, override_gpu
from hip_attn.perf.models import MODEL_PRESETS, ModelSpec, get_model, load_hf_config
from hip_attn.perf.roofline import Operator, PhaseCost, attainable_flops

__all__ = [
    "DTYPE_BYTES",
    "GPU_PRESETS",
    "MODEL_PRESETS",
    "MODES",
    "Efficiency",
    "Estimate",
    "GPUSpec",
    "Mode",
    "ModelSpec",
    "OffloadConfig",
    "Operator",
    "PhaseCost",
    "Scenario",
    "attainable_flops",
    "estimate",
    "get_gpu",
    "get_model",
    "gpu_bytes_per_request",
    "hip_decode_counts",
    "hip_prefill_counts",
    "load_hf_config",
    "max_context",
    "override_gpu",
]
