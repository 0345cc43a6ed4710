"""A transformers cache that writes each new token in place: what ``generate()`` uses under
``hip_attn.patch``.

transformers' ``DynamicLayer`` concatenates, so every decode step copies the layer's whole
K/V (about 1 GB per layer per token at 128K tokens of Llama-3.1-8B) before attention reads a
few thousand keys of it. :class:`PreallocatedLayer` keeps K/V in buffers with room to spare,
writes the step's tokens into them and hands attention views of the filled prefix: a decode
step writes what it adds, whatever the context. Buffers grow by half (rounded up to
``grow_tokens``) when full, so the copies a growth costs stay a constant per token, amortized;
``max_tokens`` sized for the whole generation never grows.

For a decode step captured in a CUDA graph (:func:`~hip_attn.patches.graph_generate`), the
layers go *on the device* (:meth:`HiPCache.enter_device`): the count of keys in use lives in an
int32 device tensor, each update writes at that position and advances it, and attention gets
the whole buffers with that tensor (``hip_attention(..., length=)``): shapes and host work no
longer depend on the step.
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
    attention kernels and SDPA read them in place); on the device (:meth:`enter_device`) they
    are the whole buffers and :attr:`in_use` counts the tokens in use.

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
        #: On the device: the tokens in use, an int32 tensor of one element; otherwise ``None``.
        self.in_use: torch.Tensor | None = None

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

    def enter_device(self) -> None:
        """Count the tokens in use on the device from now on; the buffers must hold the
        tokens still to come (they cannot grow: a captured graph keeps their addresses)."""
        if self._k is None or self._v is None:
            raise RuntimeError("enter_device needs a layer that holds tokens (run the prefill)")
        if self.in_use is None:
            self.in_use = torch.tensor([self.length], dtype=torch.int32, device=self._k.device)
            # attention now gets the whole buffers: what it masks out must still be finite
            # (SDPA turns a masked NaN into NaN), and torch.empty may have left NaNs there
            self._k[:, :, self.length :].zero_()
            self._v[:, :, self.length :].zero_()

    def leave_device(self) -> None:
        """Back to host-counted views: reads the device count once."""
        if self.in_use is not None:
            self.length, self.in_use = int(self.in_use), None
            self._view()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values after the cached ones; returns views of all of them
        (on the device: the whole buffers, written at :attr:`in_use`, which advances)."""
        if self.in_use is not None:
            return self._update_on_device(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        self._reserve(key_states, value_states, end)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self._view()

    def _update_on_device(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None and self.in_use is not None
        new = key_states.shape[2]
        if self.length + new > self.capacity:  # the host count is exact when not replayed
            raise RuntimeError(
                f"a layer on the device holds {self.capacity} tokens; {self.length + new} needed"
            )
        at = torch.arange(new, device=self._k.device) + self.in_use
        self._k.index_copy_(2, at, key_states)
        self._v.index_copy_(2, at, value_states)
        self.in_use += new
        self.length += new
        return self._k, self._v

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """On the device attention sees the whole buffers: the mask spans them (the ``"hip"``
        mask of an unpadded batch is ``None`` at any size)."""
        if self.in_use is not None:
            return self.capacity, 0
        sizes: tuple[int, int] = super().get_mask_sizes(*args, **kwargs)
        return sizes

    def reset(self) -> None:
        self._k = self._v = self.keys = self.values = self.in_use = None
        self.length, self.is_initialized = 0, False
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value is the length to keep,
        as transformers 5.17 still accepted); the buffers stay allocated."""
        self.leave_device()
        keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
        if self._k is None or keep >= self.length:
            return
        self.length = max(keep, 0)
        self._view()

    def _rebatch(self, pick: Any) -> None:
        if self._k is None or self._v is None:
            return
        self.leave_device()
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

    def _preallocated(self) -> list[PreallocatedLayer]:
        return [layer for layer in self.layers if isinstance(layer, PreallocatedLayer)]

    def enter_device(self) -> None:
        """Put every preallocated layer on the device (:meth:`PreallocatedLayer.enter_device`)."""
        for layer in self._preallocated():
            layer.enter_device()

    def leave_device(self) -> None:
        """Bring every layer back to host-counted views (one device read per layer)."""
        for layer in self._preallocated():
            layer.leave_device()

    def keys_in_use(self, layer_idx: int) -> torch.Tensor | None:
        """The device count of a layer on the device (what attention passes as ``length``),
        else ``None``."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer.in_use if isinstance(layer, PreallocatedLayer) else None
