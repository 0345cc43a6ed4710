"""The block cache's LRU written plainly, one (batch, KV head) row at a time: the reference that
:meth:`~hip_attn.offload.block_cache.BlockCache.ensure` (fixed-shape device scatters) is tested
against, and what ``bench/offload_prefetch.py`` replays recorded requests with."""

from __future__ import annotations

from collections.abc import Iterable


class ReadableLRU:
    """``slots`` slots of one row, filled as :meth:`BlockCache.ensure` fills them.

    Attributes:
        table: ``{block: slot}`` of the resident blocks.
        counts: hits, misses, evictions, keys-only misses, value fills so far.
        copies: ``(block, K slot, V slot)`` per copy the gather would make, in order (``-1``:
            that half not copied).
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.table: dict[int, int] = {}
        self.holds = [-1] * slots  # the block in each slot
        self.last = [0] * slots  # the step each slot was last used (0: never)
        self.has_values = [False] * slots
        self.step = 0
        self.counts = [0] * 5
        self.copies: list[tuple[int, int, int]] = []

    def ensure(self, request: Iterable[int], values: bool = True) -> tuple[int, int]:
        """Make ``request``'s blocks resident (repeats and ``-1`` allowed), their values too
        if ``values``; returns this request's misses and value fills."""
        self.step += 1
        need = sorted({b for b in request if b >= 0})
        hits = [b for b in need if b in self.table]
        busy = {self.table[b] for b in hits}
        # victims: the slots this request does not hit, least recently used (then lowest) first
        free = iter(sorted((s for s in range(self.slots) if s not in busy),
                           key=lambda s: (self.last[s], s)))  # fmt: skip
        misses = fills = 0
        for b in need:  # in block order, as the gather gets them
            if b in self.table:
                s = self.table[b]
                self.last[s] = self.step
                if values and not self.has_values[s]:
                    self.has_values[s] = True
                    self.copies.append((b, -1, s))
                    fills += 1
                continue
            s = next(free)
            if self.holds[s] >= 0:
                del self.table[self.holds[s]]
                self.counts[2] += 1
            self.table[b], self.holds[s], self.last[s] = s, b, self.step
            self.has_values[s] = values
            self.copies.append((b, s, s if values else -1))
            misses += 1
        self.counts[0] += len(hits)
        self.counts[1] += misses
        self.counts[3] += 0 if values else misses
        self.counts[4] += fills
        return misses, fills
