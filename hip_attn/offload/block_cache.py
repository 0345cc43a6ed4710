"""A fixed number of GPU slots for key blocks, a block -> slot table and LRU eviction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: gather(rows, blocks, k_slots, v_slots): copy host blocks' keys into the cache slots
#: ``k_slots`` and their values into ``v_slots``; a slot of -1 is not written
GatherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class CacheStats:
    """Counters of a :class:`BlockCache` (blocks of one batch row and KV head). A prefetch
    (:meth:`BlockCache.ensure` with ``prefetch``) counts in ``evictions``, ``steps``,
    ``bytes_moved`` and ``prefetched_bytes`` only."""

    hits: int = 0
    misses: int = 0  # blocks brought in: their keys, and their values unless keys_only
    evictions: int = 0
    bytes_moved: int = 0  # host -> GPU, keys and values
    last_step_bytes: int = 0  # host -> GPU by the last step's own fetches
    steps: int = 0  # calls of ensure
    keys_only: int = 0  # misses that brought in only the keys (a search's leaf candidates)
    value_fills: int = 0  # hits that brought in the values of a block held without them
    prefetched_bytes: int = 0  # host -> GPU by prefetches (in bytes_moved too)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class BlockCache:
    """``slots`` key/value blocks per (batch, KV head) row on the device.

    ``k``/``v`` are ``[B, Hkv, slots * block_size, D]``: slot ``s`` of a row holds tokens
    ``[s * block_size, (s + 1) * block_size)`` of that row, which is how the attention kernel
    addresses it. ``table[row, block]`` is the slot holding ``block`` or ``-1``.

    A slot may hold a block's keys without its values (:meth:`ensure` with ``values=False``:
    the candidates a search ranks by their keys); ``has_values`` says which do.

    The bookkeeping (lookup, LRU, eviction, counters) is device tensors of fixed shapes: a
    lookup reads nothing back to the host (see :meth:`ensure`). ``table`` and the slot arrays
    carry one spare column each that entries with nothing to write write to, so every update
    is one scatter over the whole request.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        slots: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if slots < 1:
            raise ValueError(f"the block cache needs at least one slot, got {slots}")
        self.rows, self.slots, self.block_size = batch * kv_heads, slots, block_size
        shape = (batch, kv_heads, slots * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.full((self.rows, 1), -1, dtype=torch.int32, device=device)
        # per slot (and the spare column): the block it holds, -1 if none; when last used
        self.slot_block = torch.full((self.rows, slots + 1), -1, dtype=torch.int64, device=device)
        self.last_used = torch.zeros((self.rows, slots + 1), dtype=torch.int64, device=device)
        self.has_values = torch.zeros((self.rows, slots + 1), dtype=torch.bool, device=device)
        self._step = torch.zeros(1, dtype=torch.int64, device=device)
        # hits, misses, evictions, keys-only misses, value fills, last step's K and V blocks,
        # prefetched K and V blocks
        self._counters = torch.zeros(8, dtype=torch.int64, device=device)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K plus V."""
        return 2 * self.block_size * self.k.shape[-1] * self.k.element_size()

    @property
    def stats(self) -> CacheStats:
        """The counters so far (reads them from the device)."""
        hits, misses, evictions, keys_only, fills, last_k, last_v, ahead = self._counters.tolist()
        half = self.block_bytes // 2  # the keys or the values of a block
        moved = (2 * misses - keys_only + fills + ahead) * half
        return CacheStats(hits, misses, evictions, moved, (last_k + last_v) * half,
                          int(self._step), keys_only, fills, ahead * half)  # fmt: skip

    def slot_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, slots, block_size, D]`` views of the K and V slots."""
        shape = (self.rows, self.slots, self.block_size, self.k.shape[-1])
        return self.k.view(shape), self.v.view(shape)

    def _grow_table(self, n_blocks: int) -> None:
        width = self.table.shape[1] - 1  # the last column is the spare one
        if n_blocks > width:
            grown = torch.full((self.rows, max(n_blocks, 2 * width) + 1), -1,
                               dtype=torch.int32, device=self.table.device)  # fmt: skip
            grown[:, :width] = self.table[:, :width]
            if grown.is_cuda:  # freed to the stream that allocated it: kept until this one
                # (a prefetch's, maybe) has copied it
                self.table.record_stream(torch.cuda.current_stream(grown.device))
            self.table = grown

    def ensure(
        self,
        requested: torch.Tensor,
        n_blocks: int,
        gather: GatherFn,
        *,
        values: bool = True,
        same_step: bool = False,
        count_hits: torch.Tensor | None = None,
        prefetch: bool = False,
    ) -> None:
        """Make the blocks listed in ``requested`` resident: their keys, and their values
        unless ``values`` is false.

        Args:
            requested: ``[rows, L]`` block indices per (batch, KV head) row, ``-1`` for none;
                repeats count once.
            n_blocks: the blocks the keys have so far (every index is below it).
            gather: copies the missing blocks in; it gets ``[rows * L]`` lists whose entries
                with slot ``-1`` are not to be copied.
            values: bring the values in too (to the missing blocks and to the resident ones
                held without them); without, the misses bring only their keys, half the bytes.
            same_step: count the misses into the last step's (``CacheStats.last_step_bytes``)
                instead of starting a new one: one attention call that ensures several times.
            count_hits: ``[rows, L]`` bool, the entries whose hits count in the statistics
                (default: all): not those sure to hit, such as a selection among candidates
                just fetched.
            prefetch: a guess ahead of a step rather than a step's need: its copies count as
                ``prefetched_bytes`` (and in ``bytes_moved``), not as hits, misses or the last
                step's.

        Missing blocks go to free slots or evict the least recently used blocks that this step
        does not need (in ascending block order; empty slots count as used at step 0). All of
        it runs on the device; only when ``L`` exceeds the slots does one host read check that
        no row needs more blocks than there are slots (``ValueError`` naming ``cache_blocks``).
        """
        rows, width = requested.shape
        self._grow_table(n_blocks)
        spare_block, spare_slot = self.table.shape[1] - 1, self.slots
        blocks, by_block = requested.long().sort(dim=1)
        repeat = torch.zeros_like(blocks, dtype=torch.bool)
        repeat[:, 1:] = blocks[:, 1:] == blocks[:, :-1]
        wanted = (blocks >= 0) & ~repeat
        if width > self.slots:
            need = int(wanted.sum(dim=1).max())
            if need > self.slots:
                raise ValueError(
                    f"cache_blocks={self.slots} is too small: one step needs {need} key blocks "
                    f"of a (batch, KV head) row in the block cache at once; use cache_blocks "
                    f">= {need}"
                )
        slot = self.table.gather(1, torch.where(wanted, blocks, spare_block)).long()
        hit, miss = wanted & (slot >= 0), wanted & (slot < 0)
        self._step += 1
        step = self._step.expand(rows, width)
        hit_slots = torch.where(hit, slot, spare_slot)
        self.last_used.scatter_(1, hit_slots, step)
        in_use = torch.zeros_like(self.last_used, dtype=torch.bool).scatter_(1, hit_slots, True)
        # the least recently used first among the slots this step does not need
        age = torch.where(in_use, torch.iinfo(torch.int64).max, self.last_used)[:, : self.slots]
        order = torch.sort(age, dim=1, stable=True).indices
        rank = (miss.cumsum(dim=1) - 1).clamp(0, self.slots - 1)
        victims = torch.where(miss, order.gather(1, rank), spare_slot)
        old = self.slot_block.gather(1, victims)  # the spare column holds -1
        evicted = old >= 0
        self.table.scatter_(1, torch.where(evicted, old, spare_block), -1)
        new_slot = torch.where(miss, victims, -1)
        self.table.scatter_(1, torch.where(miss, blocks, spare_block), new_slot.int())
        self.slot_block.scatter_(1, victims, torch.where(miss, blocks, -1))
        self.last_used.scatter_(1, victims, step)
        self.has_values.scatter_(1, victims, values)  # the spare column takes the rest
        misses = miss.sum()
        if values:  # and the hits held without their values get them
            fill = hit & ~self.has_values.gather(1, hit_slots)
            value_slot = torch.where(fill, slot, new_slot)
            self.has_values.scatter_(1, torch.where(fill, slot, spare_slot), True)
            fills, keys_only = fill.sum(), torch.zeros_like(misses)
        else:
            value_slot, fills, keys_only = torch.full_like(new_slot, -1), misses * 0, misses
        moved = torch.stack([misses, misses - keys_only + fills])
        if prefetch:
            self._counters[2] += evicted.sum()
            self._counters[7] += moved.sum()
        else:
            hits = (hit if count_hits is None else hit & count_hits.gather(1, by_block)).sum()
            self._counters[:5] += torch.stack([hits, misses, evicted.sum(), keys_only, fills])
            if same_step:
                self._counters[5:7] += moved
            else:
                self._counters[5:7] = moved  # the last step's
        row_ids = torch.arange(rows, device=blocks.device)[:, None].expand(rows, width)
        gather(row_ids.flatten(), blocks.clamp(min=0).flatten(), new_slot.flatten(),
               value_slot.flatten())  # fmt: skip

    def slots_of(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Slots of the selected blocks ``indices`` (``[B, H_sel, n_qb, G]``, ``-1`` padded)
        whose (batch, KV head) rows are ``rows`` (broadcastable to ``indices``)."""
        blocks = indices.clamp(min=0).long()
        return torch.where(indices >= 0, self.table[rows, blocks], 0).to(torch.int32)

    @property
    def nbytes(self) -> int:
        """Device bytes held: the slots and the bookkeeping."""
        tensors = (self.k, self.v, self.table, self.slot_block, self.last_used, self.has_values)
        return sum(t.numel() * t.element_size() for t in tensors)
