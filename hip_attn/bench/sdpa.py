"""Dense causal attention through ``torch.nn.functional.scaled_dot_product_attention``.

The flash backend is asked for first, with GQA read in place (``enable_gqa=True``). When it
refuses, cuDNN and memory-efficient attention are tried, then the same backends with K/V repeated
per query head (more memory and bytes; said in the note), and the math backend only where its
``Tq x Tk`` score matrix stays small: at long contexts it is skipped with the reason instead.
Queries sit at the last ``Tq`` key positions (``causal_lower_right`` when ``1 < Tq < Tk``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

#: The math backend is used only when its score matrices stay below this many bytes.
MATH_BACKEND_MAX_BYTES = 2**30


@dataclass(frozen=True)
class SdpaRunner:
    """A ready SDPA call: ``fn()`` returns ``[B, Hq, Tq, D]``.

    Attributes:
        fn: the call.
        backend: ``"flash"``, ``"cudnn"``, ``"efficient"`` or ``"math"``.
        note: why it is not the flash backend with GQA in place, else ``None``.
    """

    fn: Callable[[], torch.Tensor]
    backend: str
    note: str | None


class SdpaUnavailable(RuntimeError):
    """No acceptable SDPA backend runs this case; the message is the reason."""


_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.MATH: "math",
}


def _call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: SDPBackend
) -> Callable[[], torch.Tensor]:
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if 1 < tq < tk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(tq, tk)

        def chunk() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
                )

        return chunk

    causal = tq == tk and tq > 1

    def full() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
            )

    return full


def _try(fn: Callable[[], torch.Tensor]) -> str | None:
    """Run ``fn`` once; ``None`` when it works, else why not (with the backend's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except RuntimeError as exc:
            reasons = [str(w.message).splitlines()[0] for w in caught]
            return "; ".join([str(exc).splitlines()[0], *reasons])[:400]
    return None


def _free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 2**62
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def prepare_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> SdpaRunner:
    """Find the backend that runs this case (see the module docstring).

    Raises:
        SdpaUnavailable: nothing acceptable runs it; the message says why.
    """
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if q.device.type != "cuda":
        fused = [SDPBackend.FLASH_ATTENTION]  # the CPU has a flash kernel and math
    refusals: list[str] = []
    for backend in fused:
        fn = _call(q, k, v, scale, backend)
        why = _try(fn)
        if why is None:
            note = (
                None if backend == SDPBackend.FLASH_ATTENTION else "flash refused: " + refusals[0]
            )
            return SdpaRunner(fn, _NAMES[backend], note)
        refusals.append(f"{_NAMES[backend]}: {why}")

    group = q.shape[1] // k.shape[1]
    if group > 1:
        repeat_bytes = 2 * k.numel() * group * k.element_size()
        if repeat_bytes * 3 < _free_bytes(q.device):
            k_rep = k.repeat_interleave(group, dim=1)
            v_rep = v.repeat_interleave(group, dim=1)
            for backend in fused:
                fn = _call(q, k_rep, v_rep, scale, backend)
                why = _try(fn)
                if why is None:
                    note = (
                        f"K/V repeated {group}x per query head ({'; '.join(refusals)}): reads "
                        f"{group}x the KV bytes of GQA in place"
                    )
                    return SdpaRunner(fn, _NAMES[backend], note)
            del k_rep, v_rep

    score_bytes = 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4
    if score_bytes > MATH_BACKEND_MAX_BYTES:
        raise SdpaUnavailable(
            f"no fused SDPA backend runs this case ({'; '.join(refusals)}); the math backend "
            f"would materialize {score_bytes / 1e9:.1f} GB of scores, so it is not used"
        )
    fn = _call(q, k, v, scale, SDPBackend.MATH)
    why = _try(fn)
    if why is not None:
        raise SdpaUnavailable(f"no SDPA backend runs this case ({'; '.join(refusals)}; {why})")
    return SdpaRunner(fn, "math", "fused backends refused: " + "; ".join(refusals))
