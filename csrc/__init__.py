"""CUDA sources of hip_attn (installed as ``hip_attn.csrc``), built on first use by
:mod:`hip_attn.offload.gather`; the package works without them."""
