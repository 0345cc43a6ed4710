"""Input checks for the public API: every bad input fails here, before any kernel launches,
with an error naming the argument and what was expected."""

from __future__ import annotations

import math

import torch

from hip_attn.config import HiPConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_config(config: HiPConfig | None) -> HiPConfig:
    if config is None:
        return HiPConfig()
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or None, got {type(config).__name__}")
    return config


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions [batch, heads, tokens, head_dim], "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a unit stride on its last (head_dim) dimension, got strides "
            f"{tuple(x.stride())}; call .contiguous() first"
        )
    return x


def check_qkv(q: object, k: object, v: object | None = None) -> None:
    """Validate SDPA-layout attention inputs: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    pairs = [("k", k)]
    if v is not None:
        v = _check_tensor("v", v)
        pairs.append(("v", v))
    for name, x in pairs:
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
        if x.shape[0] != q.shape[0]:
            raise ValueError(
                f"{name} must have the batch size of q ({q.shape[0]}), got {x.shape[0]}"
            )
        if x.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"{name} must have the head_dim of q ({q.shape[-1]}), got {x.shape[-1]}"
            )
    if v is not None and (v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]):
        raise ValueError(
            f"v must have the heads and tokens of k {tuple(k.shape[1:3])}, "
            f"got {tuple(v.shape[1:3])}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"q heads ({hq}) must be a multiple of k heads ({hkv}) for grouped-query attention"
        )
    tq, tk = q.shape[2], k.shape[2]
    if tq == 0 or tk == 0:
        raise ValueError(f"q and k must hold at least one token, got Tq={tq}, Tk={tk}")
    if tq > tk:
        raise ValueError(
            f"q has more tokens ({tq}) than k ({tk}); queries sit at the last Tq key positions"
        )
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")
