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
longer depend on the step. A sliding-window layer (:class:`RingWindowLayer`) keeps its last
``sliding_window`` tokens in a ring buffer there, written at ``count % sliding_window``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from hip_attn.validation import check_positive_int

#: Tokens a layer's buffers grow by at least (and round up to) when full.
GROW_TOKENS = 4096


def check_starts(starts: list[int], batch: int, tokens: int) -> None:
    """``starts`` of a left-padded batch: one first real token per sequence, within the
    ``tokens`` the prompts hold."""
    if len(starts) != batch or not all(0 <= start < tokens for start in starts):
        raise ValueError(
            f"starts must give each of the {batch} sequences' first real token in [0, "
            f"{tokens}), got {starts}"
        )


class _DeviceCount:
    """The count of a layer on the device, shared by :class:`PreallocatedLayer` and
    :class:`RingWindowLayer`: what attention reads (:attr:`in_use`) and the bookkeeping of a
    padded batch."""

    #: On the device: the tokens in use, one element (one per sequence of a left-padded
    #: batch); otherwise ``None``.
    in_use: torch.Tensor | None
    _starts: list[int] | None  # a left-padded batch's first real tokens
    _rows: torch.Tensor | None  # arange(B) on the device, to write each at its count

    def _count(self, counts: list[int], starts: list[int] | None, dtype: torch.dtype,
               device: torch.device) -> None:  # fmt: skip
        self.in_use = torch.tensor(counts, dtype=dtype, device=device)
        self._starts = starts
        if starts is not None:
            self._rows = torch.arange(len(starts), device=device)

    def _uncount(self) -> None:
        self.in_use = self._starts = self._rows = None


class PreallocatedLayer(_DeviceCount, DynamicLayer):
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
        self._uncount()  # on the device, int32 counts (see _DeviceCount)

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

    def enter_device(self, starts: list[int] | None = None) -> None:
        """Count the tokens in use on the device from now on; the buffers must hold the
        tokens still to come (they cannot grow: a captured graph keeps their addresses).

        ``starts``: each sequence's first real token in a left-padded batch. Each sequence's
        tokens then move to the front of its row and :attr:`in_use` counts them per sequence
        (``[B]``); :meth:`leave_device` pads them back."""
        if self._k is None or self._v is None:
            raise RuntimeError("enter_device needs a layer that holds tokens (run the prefill)")
        if self.in_use is not None:
            return
        rows = range(self._k.shape[0])
        if starts is not None:
            check_starts(starts, len(rows), self.length)
        firsts = [0 for _ in rows] if starts is None else starts
        # attention now gets the whole buffers: what it masks out must still be finite
        # (SDPA turns a masked NaN into NaN), and torch.empty may have left NaNs there
        for row, first in zip(rows, firsts, strict=True):
            for buf in (self._k, self._v):
                if first:
                    buf[row, :, : self.length - first] = buf[row, :, first : self.length].clone()
                buf[row, :, self.length - first :].zero_()
        counts = [self.length] if starts is None else [self.length - f for f in firsts]
        self._count(counts, starts, torch.int32, self._k.device)

    def leave_device(self) -> None:
        """Back to host-counted views (a left-padded batch padded again): reads the device
        count once."""
        if self.in_use is None or self._k is None or self._v is None:
            return
        counts, starts = self.in_use.tolist(), self._starts
        self._uncount()
        if starts is None:
            self.length = counts[0]
        else:  # every sequence advanced as many tokens: they end together again
            self.length = max(c + s for c, s in zip(counts, starts, strict=True))
            for row, (count, start) in enumerate(zip(counts, starts, strict=True)):
                for buf in (self._k, self._v):
                    buf[row, :, start : start + count] = buf[row, :, :count].clone()
                    buf[row, :, :start].zero_()
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
        if self._rows is not None:  # one token per sequence, each at its own count
            if new != 1:
                raise RuntimeError(f"a padded batch on the device takes one token, got {new}")
            self._k[self._rows, :, self.in_use] = key_states[:, :, 0]
            self._v[self._rows, :, self.in_use] = value_states[:, :, 0]
        else:
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
        self._k = self._v = self.keys = self.values = None
        self._uncount()
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


class RingWindowLayer(_DeviceCount, DynamicSlidingWindowLayer):
    """A sliding-window layer (transformers' ``DynamicSlidingWindowLayer`` on the host) that can
    go on the device: its window then lives in a ring buffer ``[B, H, sliding_window, D]``.

    Token ``p`` sits in slot ``p % sliding_window``, so after the write of token ``p`` the ring
    holds tokens ``p - sliding_window + 1 .. p``: the keys a query at ``p`` sees, in slot order
    rather than position order (the keys carry their positions in RoPE already; one query token
    attends them all). :attr:`in_use` counts the layer's tokens on the device: attention passes
    it as ``length``, and reads the first ``min(in_use, sliding_window)`` slots. Only sliding
    windows, not chunked attention (whose mask is not a window).
    """

    def __init__(self, sliding_window: int, **kwargs: Any) -> None:
        super().__init__(sliding_window, **kwargs)
        self._ring_k: torch.Tensor | None = None
        self._ring_v: torch.Tensor | None = None
        self._uncount()  # on the device, int64 counts: an index, for the next token's slot

    def _slots(self, first: int, tokens: int, device: torch.device) -> torch.Tensor:
        return torch.arange(first, first + tokens, device=device) % self.sliding_window

    def enter_device(self, starts: list[int] | None = None) -> None:
        """Move the held tokens into the ring and count on the device from now on
        (``starts``: as :meth:`PreallocatedLayer.enter_device`'s; the ring then holds each
        sequence's real tokens only, counted per sequence)."""
        if self.keys is None or self.values is None or not self.is_initialized:
            raise RuntimeError("enter_device needs a layer that holds tokens (run the prefill)")
        if self.in_use is not None:
            return
        seen, window, stored = self.cumulative_length, self.sliding_window, self.keys.shape[2]
        held = min(seen, window - 1, stored)  # record_past may store more
        b, h, _, d = self.keys.shape
        if starts is not None:
            check_starts(starts, b, seen)
        firsts = [0] * b if starts is None else starts
        counts = [seen - first for first in firsts]
        # zeros, not torch.empty: masked slots must be finite (SDPA turns a masked NaN into NaN)
        self._ring_k = self.keys.new_zeros((b, h, window, d))
        self._ring_v = self.values.new_zeros((b, h, window, self.values.shape[3]))
        for row, count in enumerate(counts):
            real = min(count, held)  # a padded sequence's last tokens: no padding
            slots = self._slots(count - real, real, self.keys.device)
            self._ring_k[row].index_copy_(1, slots, self.keys[row, :, stored - real :])
            self._ring_v[row].index_copy_(1, slots, self.values[row, :, stored - real :])
        self._count(counts[:1] if starts is None else counts, starts, torch.long, self.keys.device)

    def leave_device(self) -> None:
        """Back to transformers' layout (the last ``sliding_window - 1`` tokens in position
        order, left-padded with zeros where a sequence has fewer): reads the device count
        once."""
        if self.in_use is None or self._ring_k is None or self._ring_v is None:
            return
        ring_k, ring_v, b = self._ring_k, self._ring_v, self._ring_k.shape[0]
        counts = self.in_use.tolist() * (b if self._starts is None else 1)
        firsts = [0] * b if self._starts is None else self._starts
        seen = max(count + first for count, first in zip(counts, firsts, strict=True))
        held = min(seen, self.sliding_window - 1)
        self.keys = ring_k.new_zeros(ring_k.shape[:2] + (held, ring_k.shape[3]))
        self.values = ring_v.new_zeros(ring_v.shape[:2] + (held, ring_v.shape[3]))
        for row, count in enumerate(counts):
            real = min(count, held)
            slots = self._slots(count - real, real, ring_k.device)
            self.keys[row, :, held - real :] = ring_k[row].index_select(1, slots)
            self.values[row, :, held - real :] = ring_v[row].index_select(1, slots)
        self.cumulative_length = seen
        self._ring_k = self._ring_v = None
        self._uncount()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' update on the host; on the device, writes the new tokens into their
        slots and returns the whole ring (:attr:`in_use` says which slots count)."""
        if self.in_use is None:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys, values
        assert self._ring_k is not None and self._ring_v is not None
        new = key_states.shape[2]
        if new > 1:  # the ring's slot order is what one query token needs, not a causal block
            raise RuntimeError(f"a sliding-window layer on the device takes one token, got {new}")
        at = self.in_use % self.sliding_window
        if self._rows is not None:  # a padded batch: each sequence at its own count
            self._ring_k[self._rows, :, at] = key_states[:, :, 0]
            self._ring_v[self._rows, :, at] = value_states[:, :, 0]
        else:
            self._ring_k.index_copy_(2, at, key_states)
            self._ring_v.index_copy_(2, at, value_states)
        self.in_use += new
        self.cumulative_length += new  # exact on the host unless replayed
        return self._ring_k, self._ring_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """On the device attention masks the ring from :attr:`in_use`: the mask transformers
        builds is then no mask (one query over as many keys)."""
        if self.in_use is not None:
            return query_length, 0
        sizes: tuple[int, int] = super().get_mask_sizes(query_length)
        return sizes

    def reset(self) -> None:
        # dropped, as transformers 5.24 does (5.17 zeroes the window and appends after it)
        self._ring_k = self._ring_v = self.keys = self.values = None
        self.is_initialized = False
        self._uncount()
        super().reset()  # counts from 0 again

    def crop(self, tokens_to_remove: int) -> None:
        self.leave_device()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.leave_device()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.leave_device()
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.leave_device()
        super().reorder_cache(beam_idx)


#: The layers that can count their tokens on the device.
_MOVABLE = (PreallocatedLayer, RingWindowLayer)


class HiPCache(DynamicCache):
    """The cache ``generate()`` creates for a model under ``hip_attn.patch`` (pass one as the
    cache argument to drive it yourself): transformers' ``DynamicCache`` for ``model_config``
    with every full-attention layer a :class:`PreallocatedLayer` and every sliding-window layer
    a :class:`RingWindowLayer` (transformers' bounded layer, which can go on the device too);
    other layers (chunked attention, ...) stay transformers'.

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
        # chunked attention shares transformers' sliding layer, not its mask: go by layer type
        kinds, _ = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
        self.layers = [
            self._layer(layer, kind, max_tokens, grow_tokens)
            for layer, kind in zip(self.layers, kinds, strict=True)
        ]

    @staticmethod
    def _layer(layer: Any, kind: str, max_tokens: int | None, grow_tokens: int) -> Any:
        if type(layer) is DynamicLayer:
            return PreallocatedLayer(max_tokens, grow_tokens)
        if type(layer) is DynamicSlidingWindowLayer and kind == "sliding_attention":
            return RingWindowLayer(layer.sliding_window)
        return layer

    def host_only_layers(self) -> list[str]:
        """The types of the layers that cannot go on the device (:meth:`enter_device`)."""
        kept = {type(layer).__name__ for layer in self.layers if not isinstance(layer, _MOVABLE)}
        return sorted(kept)

    def _movable(self) -> list[PreallocatedLayer | RingWindowLayer]:
        return [layer for layer in self.layers if isinstance(layer, _MOVABLE)]

    def enter_device(self, starts: list[int] | None = None) -> None:
        """Put every preallocated and ring layer on the device
        (:meth:`PreallocatedLayer.enter_device`, :meth:`RingWindowLayer.enter_device`;
        ``starts``: each sequence's first real token in a left-padded batch, all ``0``
        meaning unpadded). Checked for every layer before any moves."""
        layers = self._movable()
        starts = starts if starts is not None and any(starts) else None
        empty = [i for i, layer in enumerate(self.layers)
                 if isinstance(layer, _MOVABLE) and layer.keys is None]  # fmt: skip
        if empty:
            raise RuntimeError(f"enter_device needs layers that hold tokens; {empty} hold none")
        if starts is not None:
            keys = layers[0].keys
            assert keys is not None  # checked above
            check_starts(starts, keys.shape[0], min(layer.get_seq_length() for layer in layers))
        moved = [layer for layer in layers if layer.in_use is not None]
        if any(layer._starts != starts for layer in moved):
            raise RuntimeError("the cache is on the device with other starts: leave_device first")
        for layer in layers:
            layer.enter_device(starts)

    def leave_device(self) -> None:
        """Bring every layer back to host-counted views (one device read per layer)."""
        for layer in self._movable():
            layer.leave_device()

    def on_device(self, layer_idx: int) -> PreallocatedLayer | RingWindowLayer | None:
        """The layer if it is on the device (its count is what attention passes as
        ``length``), else ``None``."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer if isinstance(layer, _MOVABLE) and layer.in_use is not None else None
