"""The dtypes the kernels compute in: ``tl.dot`` operands, element offsets, rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hip_attn.interpreter import interpreting

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``tl.dot`` operands are cast to for inputs of ``dtype``: the input dtype
    (16-bit: tensor cores), except bf16 in Triton's interpreter, whose ``tl.dot``
    returns garbage in the interpreter (Triton 3.9); fp32 operands holding bf16 values give
    the same exact products there."""
    if dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return dtype


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into any of ``tensors`` can reach 2^31, so the kernel must
    compute offsets in int64 (K of a 1M-token sequence with 8 heads of 128 dims spans 2^30
    elements; a batch of three overflows int32). Otherwise int32 offsets keep registers free."""
    return any(
        t.untyped_storage().nbytes() >= 2**31 * t.element_size()  # else no offset can reach it
        and sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) >= 2**31
        for t in tensors
    )


@triton.jit
def saturate(x, dtype: tl.constexpr):
    """fp32 ``x >= 0`` capped at ``dtype``'s largest value (only float16's is within fp32's
    reach), so a square or variance stored in it is finite, not ``inf`` (whose products with
    zeros make NaN scores): :func:`hip_attn.geometry.saturated` on the host."""
    if dtype == tl.float16:
        return tl.minimum(x, 65504.0)
    else:
        return x


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even), returned in fp32. bfloat16 is
    rounded on the bits: Triton's interpreter truncates a bfloat16 cast, a GPU does not."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)
