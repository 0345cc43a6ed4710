"""The ``"hip"`` attention and mask functions registered with transformers.

Transformers builds one mask per mask type and hands it to the attention function of every
layer. For full-attention layers :func:`hip_mask` returns a compact padding mask, ``[B, Tk]``
booleans (``True`` = a real key) or ``None`` when nothing is padded; never a ``Tq x Tk`` matrix.
Sliding-window layers (Mistral/Phi-3 configs with ``sliding_window``, Gemma-3 and Qwen
local layers) keep transformers' own SDPA mask and attention: their cost is already bounded by
the window. On a cache on the device (``graph_generate``) they attend their ring buffer with
SDPA, masked from the device count, as dense layers attend theirs.

A padded batch runs sequence by sequence over each sequence's own keys, so every sequence gets
exactly what it would get alone (HiP's blocks and sinks count from the sequence's first token).
On a cache on the device each sequence's tokens sit first in its row, counted apart: the
kernels read each sequence's count, and the batch runs in the launches of an unpadded one.
"""

from __future__ import annotations

import weakref
from typing import Any, cast

import torch

from hip_attn.attention import HiPDecodeState, dense_attention, hip_attention
from hip_attn.config import HiPConfig

ATTN_NAME = "hip"

# What patch() attaches to a model, kept beside it rather than on transformers' objects:
# the HiPConfig of each patched attention module, the cache of the call in flight (set by the
# module's forward hooks: the attention function itself never sees the cache), and per cache
# the decode state of each layer's batch {layer_idx: state}. Entries die with their keys.
LAYER_CONFIGS: weakref.WeakKeyDictionary[torch.nn.Module, HiPConfig] = weakref.WeakKeyDictionary()
LAYER_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
_DECODE_STATES: weakref.WeakKeyDictionary[Any, dict[int, HiPDecodeState]] = (
    weakref.WeakKeyDictionary()
)


def decode_states(cache: Any) -> dict[tuple[int, int | None], HiPDecodeState]:
    """The HiP decode states held for ``cache`` (the cache of a generation), keyed by
    ``(layer_idx, sequence)``: ``sequence`` is ``None`` for the state of the layer's batch, ``b``
    for that of sequence ``b`` of a padded batch run sequence by sequence on the host
    (:meth:`~hip_attn.HiPDecodeState.sequence`; two or more sequences: a padded sequence alone
    uses the batch's state). The batch's state then only holds them: its own refresh count
    stays 0 (device steps are not counted)."""
    found: dict[tuple[int, int | None], HiPDecodeState] = {}
    for layer, state in _DECODE_STATES.get(cache, {}).items():
        found[(layer, None)] = state
        found.update({(layer, b): seq for b, seq in state.sequences.items()})
    return found


def _state(module: torch.nn.Module, sequence: int | None) -> HiPDecodeState | None:
    cache = LAYER_CACHES.get(module)
    if cache is None:
        return None
    states = _DECODE_STATES.setdefault(cache, {})
    state = states.setdefault(cast(int, module.layer_idx), HiPDecodeState())
    return state if sequence is None else state.sequence(sequence)


def _offloaded_kv(module: torch.nn.Module) -> tuple[Any, Any]:
    """The module's offloaded KV and the one it prefetches to (``None`` for none)."""
    from hip_attn.patches.offload import HiPOffloadCache  # imports transformers

    cache = LAYER_CACHES.get(module)
    if not isinstance(cache, HiPOffloadCache):
        return None, None
    layer = cast(int, module.layer_idx)
    return cache.offloaded(layer), cache.prefetch_target(layer)


def _on_device(module: torch.nn.Module) -> Any:
    """The module's cache layer when it is on the device (``HiPCache.enter_device``)."""
    from hip_attn.patches.cache import HiPCache  # imports transformers

    cache = LAYER_CACHES.get(module)
    if not isinstance(cache, HiPCache):
        return None
    return cache.on_device(cast(int, module.layer_idx))


def hip_mask(**kwargs: Any) -> torch.Tensor | None:
    """Mask builder registered as ``"hip"`` with ``AttentionMaskInterface``."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        causal_mask_function,
        prepare_padding_mask,
    )

    if kwargs.get("local_size") is not None:  # a sliding-window layer: stock SDPA
        mask: torch.Tensor | None = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**kwargs)
        return mask
    if kwargs.get("mask_function", causal_mask_function) is not causal_mask_function:
        raise ValueError(
            "hip attention supports causal attention with padding only; this model asked for a "
            "custom mask (packed sequences, bidirectional spans or an overlay)"
        )
    kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)
    padding = prepare_padding_mask(kwargs.get("attention_mask"), kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(padding.all()) else padding


def hip_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"hip"`` with ``AttentionInterface``.

    Returns the output as ``[B, Tq, Hq, D]``, as transformers expects."""
    layer = _on_device(module)  # K/V buffers counted on the device: graph-capturable
    sliding = kwargs.get("sliding_window") is not None
    if sliding and layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"hip attention does not support logit softcapping ({type(module).__name__})"
        )
    if dropout > 0 and module.training:
        raise ValueError("hip attention is for inference: attention dropout is not supported")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "hip attention takes a 2D padding mask; got a prepared mask of shape "
            f"{tuple(attention_mask.shape)}"
        )
    config = LAYER_CONFIGS.get(module) or HiPConfig()
    dense = getattr(module, "layer_idx", None) in config.dense_layers
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    offloaded, following = _offloaded_kv(module)
    if offloaded is not None:  # the keys and values live in host memory
        if attention_mask is not None:
            raise ValueError("hip attention with KV offload does not support padded batches yet")
        out = offloaded.attend(query, scale=scale, state=_state(module, None),
                               prefetch_into=following)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    if layer is not None:
        if attention_mask is not None:
            raise ValueError("hip attention over a cache on the device takes no padding mask")
        if sliding != layer.is_sliding:  # the model's layer type and the cache's must agree
            raise ValueError(
                f"layer {module.layer_idx}: the model {'passes' if sliding else 'passes no'} "
                f"sliding_window but its cache layer is a {type(layer).__name__}"
            )
        # a left-padded batch: each sequence's tokens first in its row, in_use counts them apart
        if dense or sliding:  # a sliding layer's buffers are its window's ring
            out = dense_attention(query, key, value, scale, length=layer.in_use)
        else:
            out = hip_attention(query, key, value, config, scale=scale,
                                state=_state(module, None), length=layer.in_use)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: int | None) -> torch.Tensor:
        if dense:
            return dense_attention(q, k, v, scale)
        alone = query.shape[0] == 1  # a padded sequence alone is the batch: the batch's state
        return hip_attention(q, k, v, config, scale=scale,
                             state=_state(module, None if alone else seq))  # fmt: skip

    if attention_mask is None:
        out = attend(query, key, value, None)
    else:
        out = _per_sequence(query, key, value, attention_mask, attend)
    return out.transpose(1, 2).contiguous(), None


def _per_sequence(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    attend: Any,
) -> torch.Tensor:
    """Run each sequence of a padded batch over its own keys; padded query rows get zeros."""
    tq, tk = query.shape[2], key.shape[2]
    out = torch.zeros_like(query)
    for b in range(query.shape[0]):
        keys = valid[b].nonzero().flatten()
        if keys.numel() == 0:
            continue
        lo, hi = int(keys[0]), int(keys[-1]) + 1
        if keys.numel() != hi - lo:
            raise ValueError(
                f"hip attention needs each sequence's real tokens to be contiguous (left or right "
                f"padding); sequence {b} has gaps in its attention_mask"
            )
        first = max(lo, tk - tq)  # first real query position
        if first >= hi:
            continue  # every query of this sequence is padding
        rows = slice(first - (tk - tq), hi - (tk - tq))
        k_b, v_b = key[b : b + 1, :, lo:hi], value[b : b + 1, :, lo:hi]
        out[b : b + 1, :, rows] = attend(query[b : b + 1, :, rows], k_b, v_b, b)
    return out


def register() -> None:
    """Register ``"hip"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, hip_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, hip_mask)
