"""Input checks for the public API: every bad input fails here, before any kernel launches,
with an error naming the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

from hip_attn.config import HiPConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

#: ``check_qkv``'s default for ``v``: "no values" (``estimate_mask``), unlike an explicit ``None``.
_NO_VALUES: object = object()


def check_config(config: HiPConfig | None) -> HiPConfig:
    if config is None:
        return HiPConfig()
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or None, got {type(config).__name__}")
    return config


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` of at least 1; ``name`` is what the error calls it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    # numbers.Real admits Python and NumPy ints and floats; bool is an int but never a scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return value


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


def check_qkv(q: object, k: object, v: object = _NO_VALUES) -> None:
    """Validate SDPA-layout attention inputs: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``.
    Without ``v`` only ``q`` and ``k`` are checked; an explicit ``v=None`` is an error."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    pairs = [("k", k)]
    if v is not _NO_VALUES:
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
    if isinstance(v, torch.Tensor) and (v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]):
        raise ValueError(
            f"v must have the heads and tokens of k {tuple(k.shape[1:3])}, "
            f"got {tuple(v.shape[1:3])}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hq == 0 or hkv == 0:
        raise ValueError(f"q and k must have at least one head, got Hq={hq}, Hkv={hkv}")
    if hq % hkv:
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
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or d % 2:
        raise ValueError(
            f"head_dim must be even and in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (the last dimension "
            f"of q, k and v; the search's summaries pair dimensions d and d + D/2), got {d}"
        )


def check_inference_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Refuse inputs that ask for gradients where the Triton kernels would run: they have no
    backward, and returning an output detached from the graph would train silently wrong.

    ``NotImplementedError`` (a ``RuntimeError``) because the inputs are valid and the missing
    piece is the backward pass; it is what PyTorch raises for an operation without one.
    """
    if not torch.is_grad_enabled():
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad, but the Triton HiP kernels are inference-only (no "
                "backward); run under torch.no_grad() or torch.inference_mode(), or pass "
                "detached tensors"
            )


def check_device_length(q: torch.Tensor, k: torch.Tensor, length: object, state: object) -> None:
    """``hip_attention``'s ``length``: an int32 tensor on the device of ``k`` of one element
    or one per sequence (``[B]``, contiguous), with a decode state and one query token."""
    if not isinstance(length, torch.Tensor):
        raise TypeError(f"length must be a torch.Tensor or None, got {type(length).__name__}")
    batch = k.shape[0]
    shaped = length.numel() == 1 or (tuple(length.shape) == (batch,) and length.stride(0) == 1)
    if length.dtype != torch.int32 or not shaped or length.device != k.device:
        raise ValueError(
            f"length must be an int32 tensor on {k.device} of one element or [{batch}] (one "
            f"per sequence), got {length.dtype} of shape {tuple(length.shape)} on {length.device}"
        )
    if state is None or q.shape[2] != 1:
        raise ValueError(
            f"length (device decode) needs a HiPDecodeState and one query token; got "
            f"state={type(state).__name__}, {q.shape[2]} queries"
        )


def read_device_lengths(length: torch.Tensor, capacity: int) -> list[int]:
    """The values of ``hip_attention``'s ``length`` (one host read), checked against the key
    buffers' ``capacity``: the keys in use must be at least one and fit the buffers."""
    counts: list[int] = length.flatten().tolist()
    for n in counts:
        if not 1 <= n <= capacity:
            raise ValueError(f"length must be in [1, {capacity}] (the key buffers' size), got {n}")
    return counts
