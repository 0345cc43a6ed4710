"""A transformers cache that writes each new token in place: what ``generate()`` uses under
``hip_attn.patch``.

transformers' ``DynamicLayer`` concatenates, so every decode step copies the layer's whole
K/V (about 1 GB per layer per token at 128K tokens of Llama-3.1-8B) before attention reads a
few thousand keys of it. :class:`PreallocatedLayer` keeps K/V in buffers with room to spare,
writes the step's tokens into them and hands attention views of the filled prefix: a decode
step writes what it adds, whatever the context. Buffers grow by half (rounded up to
``grow_tokens``) when full, so the copies a growth costs stay a constant per token, amortized;
``max_tokens`` sized for the whole generation never grows.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from hip_attn.validation import check_positive_int

#: Tokens a layer's buffers grow by at least (and round up to) when full.
GROW_TOKENS = 4096


class PreallocatedLayer(DynamicLayer):
    """One full-attention layer's K/V in preallocated buffers ``[B, H, capacity, D]``.

    ``keys`` and ``values`` are views of the first ``get_seq_length()`` tokens (strided: the
    attention kernels and SDPA read them in place).

    Args:
        max_tokens: the initial capacity (``None``: the first update's tokens rounded up to a
            multiple of ``grow_tokens``).
        grow_tokens: the least a full buffer grows by; capacities are multiples of it once grown.
    """

    def __init__(self, max_tokens: int | None = None, grow_tokens: int = GROW_TOKENS) -> None:
        super().__init__()
        self.max_tokens, self.grow_tokens = max_tokens, grow_tokens
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they grow."""
        return 0 if self._k is None else self._k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _allocate(self, like: torch.Tensor, tokens: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return torch.empty((b, h, tokens, d), dtype=like.dtype, device=like.device)

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if needed <= self.capacity:
            return
        if self._k is None and self.max_tokens is not None and needed <= self.max_tokens:
            tokens = self.max_tokens
        else:
            grown = max(needed, self.capacity + self.capacity // 2, self.capacity + 1)
            tokens = -(-grown // self.grow_tokens) * self.grow_tokens
        k, v = self._allocate(key_states, tokens), self._allocate(value_states, tokens)
        if self._k is not None and self._v is not None:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        keys, values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values after the cached ones; returns views of all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self._reserve(key_states, value_states, end)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self._view()

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._k = self._v = self.keys = self.values = None
        self.length, self.is_initialized = 0, False
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value is the length to keep,
        as transformers 5.17 still accepted); the buffers stay allocated."""
        keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
        if self._k is None or keep >= self.length:
            return
        self.length = max(keep, 0)
        self._view()

    def _rebatch(self, pick: Any) -> None:
        if self._k is None or self._v is None:
            return
        self._k, self._v = pick(self._k), pick(self._v)
        self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebatch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebatch(lambda x: x[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebatch(lambda x: x.index_select(0, beam_idx.to(x.device)))


class HiPCache(DynamicCache):
    """The cache ``generate()`` creates for a model under ``hip_attn.patch`` (pass one as the
    cache argument to drive it yourself): transformers' ``DynamicCache`` for ``model_config``
    with every full-attention layer a :class:`PreallocatedLayer`; sliding-window layers keep
    their own bounded layers.

    Args:
        model_config: the model's transformers config.
        max_tokens: tokens to preallocate per layer (prompt plus new tokens: then nothing grows
            during the generation); ``None`` sizes each layer at its first update.
        grow_tokens: the least a full layer grows by.
    """

    def __init__(
        self, model_config: Any, *, max_tokens: int | None = None, grow_tokens: int = GROW_TOKENS
    ) -> None:
        if max_tokens is not None:
            check_positive_int("max_tokens", max_tokens)
        check_positive_int("grow_tokens", grow_tokens)
        super().__init__(config=model_config)
        self.layers = [
            PreallocatedLayer(max_tokens, grow_tokens) if type(layer) is DynamicLayer else layer
            for layer in self.layers
        ]
