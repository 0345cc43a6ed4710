"""A transformers ``Cache`` whose HiP layers keep their K/V in host memory.

Each full-attention layer gets an :class:`OffloadedLayer` around a
:class:`hip_attn.offload.OffloadedKV`: ``update`` appends the new keys and values to it and
hands back only those, and the ``"hip"`` attention function then attends through the offloaded
layer. Sliding-window layers keep transformers' own sliding cache; ``dense_layers`` keep a
plain dynamic layer on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from hip_attn.config import HiPConfig
from hip_attn.offload import OffloadedKV


class OffloadedLayer(CacheLayerMixin):
    """One layer's cache: an :class:`OffloadedKV`, created on the first ``update``."""

    is_compileable = False
    is_sliding = False

    def __init__(self, config: HiPConfig, options: dict[str, Any]) -> None:
        super().__init__()
        self.hip_config, self.options = config, options
        self.kv: OffloadedKV | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv = OffloadedKV(self.hip_config, b, hkv, d, key_states.dtype, key_states.device,
                              **self.options)  # fmt: skip
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys and values to host memory; returns them (and only them)."""
        if self.kv is None:
            self.lazy_initialization(key_states, value_states)
        assert self.kv is not None
        step = self.kv.max_chunk
        for start in range(0, key_states.shape[2], step):
            self.kv.append(key_states[:, :, start : start + step],
                           value_states[:, :, start : start + step])  # fmt: skip
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.kv is None else self.kv.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self.is_initialized = None, False


class HiPOffloadCache(Cache):
    """The cache ``generate()`` uses after ``hip_attn.patch(model, config, offload=True)``; pass
    one as ``past_key_values`` to drive it yourself.

    Args:
        model_config: the model's transformers config (its layer types decide each layer).
        config: the HiP configuration (``dense_layers`` stay on the device).
        prefetch: when a decode step (or a prompt's last chunk of at most ``block_size_q``
            tokens) re-estimates an offloaded layer's selection, the layer starts bringing it
            into the next offloaded layer's block cache (:meth:`OffloadedKV.prefetch`), ahead
            of that layer's own search.
        **options: :class:`OffloadedKV` options: ``cache_blocks``, ``max_chunk``,
            ``host_chunk_tokens``, ``gather``.
    """

    def __init__(
        self, model_config: Any, config: HiPConfig, *, prefetch: bool = False, **options: Any
    ) -> None:
        text = model_config.get_text_config()
        kinds = getattr(text, "layer_types", None)
        if kinds is None:
            if getattr(text, "sliding_window", None) is not None:
                raise ValueError(
                    f"{type(model_config).__name__} uses a sliding window in every layer; "
                    "there is no full-attention layer to offload"
                )
            kinds = ["full_attention"] * text.num_hidden_layers
        layers: list[Any] = []
        for i, kind in enumerate(kinds):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text.sliding_window))
            elif i in config.dense_layers:
                layers.append(DynamicLayer())
            else:
                layers.append(OffloadedLayer(config, options))
        super().__init__(layers=layers)
        self.prefetching = prefetch  # (Cache.prefetch is transformers' own offloading)

    def offloaded(self, layer_idx: int) -> OffloadedKV | None:
        """The offloaded KV of layer ``layer_idx`` (``None`` for a layer kept on the device)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer.kv if isinstance(layer, OffloadedLayer) else None

    def prefetch_target(self, layer_idx: int) -> OffloadedKV | None:
        """Where layer ``layer_idx`` prefetches to: the next offloaded layer, with ``prefetch``
        (else ``None``)."""
        if not self.prefetching:
            return None
        following = (layer for layer in self.layers[layer_idx + 1 :]
                     if isinstance(layer, OffloadedLayer))  # fmt: skip
        return next((layer.kv for layer in following), None)

    def stats(self) -> dict[int, dict[str, Any]]:
        """Per offloaded layer: hits, misses, bytes moved (prefetched too), device and host
        bytes held."""
        return {
            i: layer.kv.stats()
            for i, layer in enumerate(self.layers)
            if isinstance(layer, OffloadedLayer) and layer.kv is not None
        }
