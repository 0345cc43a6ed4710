"""A fixed number of GPU slots for key blocks, a block -> slot table and LRU eviction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: gather(rows, blocks, slots): copy host blocks into the given cache slots (K and V)
GatherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class CacheStats:
    """Counters of a :class:`BlockCache` (blocks of one batch row and KV head)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0  # host -> GPU, K and V together
    last_step_bytes: int = 0
    steps: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class BlockCache:
    """``slots`` key/value blocks per (batch, KV head) row on the device.

    ``k``/``v`` are ``[B, Hkv, slots * block_size, D]``: slot ``s`` of a row holds tokens
    ``[s * block_size, (s + 1) * block_size)`` of that row, which is how the attention kernel
    addresses it. ``table[row, block]`` is the slot holding ``block`` or ``-1``.
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
        self.table = torch.full((self.rows, 0), -1, dtype=torch.int32, device=device)
        self.slot_block = torch.full((self.rows, slots), -1, dtype=torch.int64, device=device)
        self.last_used = torch.zeros((self.rows, slots), dtype=torch.int64, device=device)
        self.stats = CacheStats()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K plus V."""
        return 2 * self.block_size * self.k.shape[-1] * self.k.element_size()

    def slot_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, slots, block_size, D]`` views of the K and V slots."""
        shape = (self.rows, self.slots, self.block_size, self.k.shape[-1])
        return self.k.view(shape), self.v.view(shape)

    def _grow_table(self, n_blocks: int) -> None:
        if n_blocks > self.table.shape[1]:
            grown = torch.full((self.rows, max(n_blocks, 2 * self.table.shape[1])), -1,
                               dtype=torch.int32, device=self.table.device)  # fmt: skip
            grown[:, : self.table.shape[1]] = self.table
            self.table = grown

    def ensure(self, needed: torch.Tensor, gather: GatherFn) -> None:
        """Make every block marked in ``needed`` (``[rows, n_blocks]`` bool) resident.

        Missing blocks go to free slots or evict the least recently used blocks that this step
        does not need; ``gather`` copies them in. Raises ``ValueError`` when one step needs more
        blocks of a row than there are slots."""
        self.stats.steps += 1
        step = self.stats.steps
        self._grow_table(needed.shape[1])
        table = self.table[:, : needed.shape[1]]
        resident = table >= 0
        hit_rows, hit_blocks = (needed & resident).nonzero(as_tuple=True)
        miss_rows, miss_blocks = (needed & ~resident).nonzero(as_tuple=True)
        hit_slots = table[hit_rows, hit_blocks].long()
        self.last_used[hit_rows, hit_slots] = step
        n_miss = miss_rows.numel()
        self.stats.hits += hit_rows.numel()
        self.stats.misses += n_miss
        self.stats.last_step_bytes = n_miss * self.block_bytes
        self.stats.bytes_moved += self.stats.last_step_bytes
        if n_miss == 0:
            return
        in_use = torch.zeros((self.rows, self.slots), dtype=torch.bool, device=table.device)
        in_use[hit_rows, hit_slots] = True
        counts = torch.bincount(miss_rows, minlength=self.rows)
        free = self.slots - in_use.sum(dim=1)
        if bool((counts > free).any()):
            need = int(needed.sum(dim=1).max())
            raise ValueError(
                f"cache_blocks={self.slots} is too small: one step needs {need} key blocks of a "
                f"(batch, KV head) row in the block cache at once; use cache_blocks >= {need}"
            )
        # least recently used first among the slots this step does not need (empty slots: 0)
        age = torch.where(in_use, torch.iinfo(torch.int64).max, self.last_used)
        order = torch.sort(age, dim=1, stable=True).indices
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n_miss, device=table.device) - first[miss_rows]
        slots = order[miss_rows, rank]
        old = self.slot_block[miss_rows, slots]
        evicted = old >= 0
        self.stats.evictions += int(evicted.sum())
        self.table[miss_rows[evicted], old[evicted]] = -1
        self.table[miss_rows, miss_blocks] = slots.to(torch.int32)
        self.slot_block[miss_rows, slots] = miss_blocks
        self.last_used[miss_rows, slots] = step
        gather(miss_rows, miss_blocks, slots)

    def slots_of(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Slots of the selected blocks ``indices`` (``[B, H_sel, n_qb, G]``, ``-1`` padded)
        whose (batch, KV head) rows are ``rows`` (broadcastable to ``indices``)."""
        blocks = indices.clamp(min=0).long()
        return torch.where(indices >= 0, self.table[rows, blocks], 0).to(torch.int32)

    @property
    def nbytes(self) -> int:
        """Device bytes held: the slots and the bookkeeping."""
        tensors = (self.k, self.v, self.table, self.slot_block, self.last_used)
        return sum(t.numel() * t.element_size() for t in tensors)
