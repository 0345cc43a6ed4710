"""Hugging Face integration of hip_attn (installed as ``hip_attn.patches``)."""
