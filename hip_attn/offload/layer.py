"""One attention layer's KV cache offloaded to host memory (DESIGN.md section 4).

The host holds all of K and V. The device holds only what HiP reads: the search's summary
tree (:func:`~hip_attn.geometry.node_summaries`, all the search reads, so the selection is
exactly the on-GPU one), the sink tokens, the recent tokens the window needs, and a fixed-size
cache of key blocks. Each :meth:`OffloadedKV.attend` selects from the tree, brings the missing
blocks into the cache and runs the sparse attention kernel through the slot table. With
``leaf_scores="keys"`` the search also reads its last level's candidate blocks: it stops before
that level, the cache fetches their keys, the leaves are ranked from the cache, and the values
follow for the selected blocks only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from hip_attn.attention import (
    HiPDecodeState,
    extended_tree,
    search_tree,
    select_blocks,
    selection_heads,
    uses_triton,
)
from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    first_candidate_block,
    first_window_start,
    num_query_blocks,
    selection_config,
    tree_blocks,
)
from hip_attn.offload.block_cache import BlockCache
from hip_attn.offload.gather import GATHER_METHODS, gather_kind, make_gather
from hip_attn.offload.host import HostKV
from hip_attn.reference import hip_attention_reference
from hip_attn.validation import check_config, check_scale

logger = logging.getLogger("hip_attn")

#: The ``offload_options`` of ``hip_attn.patch``: the keyword options of :class:`OffloadedKV`,
#: and ``prefetch`` (:class:`~hip_attn.patches.offload.HiPOffloadCache`'s).
OFFLOAD_OPTIONS: dict[str, type] = {
    "cache_blocks": int,
    "max_chunk": int,
    "host_chunk_tokens": int,
    "gather": str,
    "prefetch": bool,
}


def check_offload_options(
    config: HiPConfig, options: Mapping[str, Any], heads_per_kv: int = 1
) -> None:
    """Check offload options (:data:`OFFLOAD_OPTIONS`) for ``config`` before any K/V exists
    (a patched model's offloaded layers are built inside ``generate()``, far from the
    mistake), for a model with ``heads_per_kv`` query heads per KV head.

    Raises:
        TypeError: an option name not in :data:`OFFLOAD_OPTIONS`, or a value of another type.
        ValueError: ``cache_blocks`` below what one query block needs at once
            (:meth:`HiPConfig.offload_cache_blocks`), ``max_chunk`` not a positive multiple
            of ``block_size_q``, ``host_chunk_tokens`` not a positive multiple of
            ``block_size_k``, or an unknown ``gather`` method.
    """
    accepted = ", ".join(OFFLOAD_OPTIONS)
    for name, value in options.items():
        kind = OFFLOAD_OPTIONS.get(name)
        if kind is None:
            raise TypeError(f"unknown offload option {name!r}; accepted: {accepted}")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(
                f"offload option {name} must be {kind.__name__}, got {type(value).__name__}"
            )
    minimum, why = config.offload_cache_blocks(heads_per_kv)
    if options.get("cache_blocks", minimum) < minimum:
        raise ValueError(
            f"cache_blocks must be >= {why} = {minimum} (the key blocks one query block's "
            f"search needs at once), got {options['cache_blocks']}"
        )
    bq, bk = config.block_size_q, config.block_size_k
    max_chunk = options.get("max_chunk", bq)
    if max_chunk < 1 or max_chunk % bq:
        raise ValueError(
            f"max_chunk must be a positive multiple of block_size_q={bq} (chunks then split "
            f"into the same query blocks as one call), got {max_chunk}"
        )
    host_chunk = options.get("host_chunk_tokens", bk)
    if host_chunk < 1 or host_chunk % bk:
        raise ValueError(
            f"host_chunk_tokens must be a positive multiple of block_size_k={bk}, got {host_chunk}"
        )
    if options.get("gather", "auto") not in GATHER_METHODS:
        raise ValueError(f"gather must be one of {GATHER_METHODS}, got {options['gather']!r}")


class OffloadedKV:
    """The KV cache of one layer with the full K/V in host memory.

    Args:
        config: the HiP configuration.
        batch, kv_heads, head_dim, dtype: the layout of the keys and values.
        device: where attention runs (``cuda``; on the CPU everything stays in host memory and
            the same code runs).
        cache_blocks: block-cache slots per (batch, KV head) row; it must hold the blocks one
            call selects (``k // block_size_k`` per query block, times the query heads of a
            group with ``head_sharing="head"``) and, with ``leaf_scores="keys"``, one query
            block's leaf candidates; checked against
            :meth:`HiPConfig.offload_cache_blocks` for one head per KV head.
        max_chunk: the most queries one :meth:`attend` call will have (the recent-token buffer
            keeps ``window + max_chunk`` tokens on the device).
        gather: ``"auto"``, ``"cuda"`` or ``"torch"`` (see :func:`make_gather`).
    """

    def __init__(
        self,
        config: HiPConfig,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        cache_blocks: int = 2048,
        max_chunk: int = 4096,
        host_chunk_tokens: int = 8192,
        gather: str = "auto",
    ) -> None:
        self.config = check_config(config)
        options = {"cache_blocks": cache_blocks, "max_chunk": max_chunk,
                   "host_chunk_tokens": host_chunk_tokens, "gather": gather}  # fmt: skip
        check_offload_options(config, options)
        # with its index ("cuda" -> "cuda:0"), as the tensors made here and compared with it
        self.device = torch.empty(0, device=device).device
        self.batch, self.kv_heads, self.head_dim, self.dtype = batch, kv_heads, head_dim, dtype
        self.max_chunk = max_chunk
        bk = config.block_size_k
        self.host = HostKV(batch, kv_heads, head_dim, dtype, bk, host_chunk_tokens,
                           pin=self.device.type == "cuda")  # fmt: skip
        self.cache = BlockCache(batch, kv_heads, cache_blocks, bk, head_dim, dtype, self.device)
        self._gather = make_gather(self.host, self.cache, gather)
        self.gather_kind = gather_kind(self._gather)  # "cuda-kernel" or "torch"
        shape = (batch, kv_heads, config.sink_tokens, head_dim)
        self.sink_k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.sink_v = torch.zeros(shape, dtype=dtype, device=self.device)
        # recent tokens [recent_start, length): the window of any call of <= max_chunk queries
        self._recent_capacity = -(-(config.window + max_chunk) // bk) * bk + 2 * bk
        shape = (batch, kv_heads, self._recent_capacity, head_dim)
        self.recent_k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.recent_v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.recent_start = 0
        # the search's summary tree, grown by a quarter when full
        self.tree: torch.Tensor | None = None
        self.length = 0
        # the selection whose blocks the cache holds now, and their slots: a decode step that
        # reuses it (the same tensor) needs no lookup, no copy and no host sync
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fetched = False  # whether the last attend consulted the block cache
        self._stepped = False  # whether this attend has counted a cache step
        # after a two-launch search: the query blocks that ranked no candidates (N <= G)
        self._unsearched: torch.Tensor | None = None
        self._scratch: dict[str, torch.Tensor] = {}  # the sparse kernel's split scratch
        # prefetches run on their own stream; the block cache's next user waits for the last
        self._prefetches: torch.cuda.Stream | None = None
        self._prefetched: torch.cuda.Event | None = None

    # -- appending -----------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append keys and values ``[B, Hkv, n, D]`` (``n <= max_chunk``)."""
        n = k.shape[2]
        expected = (self.batch, self.kv_heads, n, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k and v must be {expected}, got {tuple(k.shape)}, {tuple(v.shape)}")
        if n > self.max_chunk:
            raise ValueError(f"append takes at most max_chunk={self.max_chunk} tokens, got {n}")
        k = k.to(self.device, self.dtype)
        v = v.to(self.device, self.dtype)
        old = self.length
        self.host.append(k, v)
        if old < self.config.sink_tokens:
            take = min(n, self.config.sink_tokens - old)
            self.sink_k[:, :, old : old + take] = k[:, :, :take]
            self.sink_v[:, :, old : old + take] = v[:, :, :take]
        self._push_recent(k, v)
        self.length += n
        self._extend_summaries(old)

    def _push_recent(self, k: torch.Tensor, v: torch.Tensor) -> None:
        bk, n = self.config.block_size_k, k.shape[2]
        # the first query of the coming call sits at self.length: its window starts at or after
        # (keeping more would copy the buffer down every few decode steps; attend refuses
        # queries whose window was dropped)
        keep = max(0, (self.length - self.config.window) // bk * bk)
        keep = min(keep, self.length // bk * bk)  # the open block is needed for the tree too
        held = self.length - self.recent_start
        if held + n > self._recent_capacity:  # drop what no window can need any more
            drop = keep - self.recent_start
            self.recent_k[:, :, : held - drop] = self.recent_k[:, :, drop:held].clone()
            self.recent_v[:, :, : held - drop] = self.recent_v[:, :, drop:held].clone()
            self.recent_start, held = keep, held - drop
        self.recent_k[:, :, held : held + n] = k
        self.recent_v[:, :, held : held + n] = v

    def _extend_summaries(self, old_length: int) -> None:
        done, n = tree_blocks(old_length, self.config), tree_blocks(self.length, self.config)
        if n == done:
            return
        bk = self.config.block_size_k
        lo = (first_candidate_block(self.config) + done) * bk - self.recent_start
        keys = self.recent_k[:, :, lo : lo + (n - done) * bk]
        self.tree = extended_tree(self.tree, keys, done, self.config)

    # -- attention -----------------------------------------------------------------------
    def attend(
        self,
        q: torch.Tensor,
        *,
        scale: float | None = None,
        state: HiPDecodeState | None = None,
        prefetch_into: OffloadedKV | None = None,
    ) -> torch.Tensor:
        """HiP attention of queries ``[B, Hq, Tq, D]`` at the last ``Tq`` appended positions;
        the same result as :func:`hip_attn.hip_attention` on the full K/V with
        ``dense_threshold=0``.

        ``prefetch_into``: the layer that runs next (not this one); a call with ``state`` of
        at most ``block_size_q`` queries (a decode step, or a prompt's short last chunk) that
        re-estimates this layer's selection then starts bringing it into that layer's block
        cache (:meth:`prefetch`), unless that layer is on another device or does not
        :attr:`take prefetches <takes_prefetches>`."""
        b, hq, tq, d = q.shape
        if b != self.batch or d != self.head_dim or hq % self.kv_heads:
            raise ValueError(
                f"q must be [{self.batch}, a multiple of {self.kv_heads}, Tq, {self.head_dim}], "
                f"got {tuple(q.shape)}"
            )
        if not 0 < tq <= min(self.length, self.max_chunk):
            raise ValueError(
                f"q has {tq} queries; 1 to min(appended tokens, max_chunk) = "
                f"{min(self.length, self.max_chunk)} are allowed"
            )
        window_start = first_window_start(tq, self.length, self.config)
        if window_start < self.recent_start:
            raise ValueError(
                f"q has {tq} queries, back to position {self.length - tq}: their window starts "
                f"at key {window_start}, before the recent keys still on the device (from "
                f"{self.recent_start}); attend the queries of the last append"
            )
        scale = check_scale(scale, d)
        q = q.to(self.device)
        tk, config = self.length, self.config
        self._stepped, self._unsearched = False, None
        if prefetch_into is self:
            raise ValueError("prefetch_into must be another layer (this one's attention reads "
                             "its block cache while the prefetch would write it)")  # fmt: skip
        refreshes = state.refreshes if state is not None else 0
        indices = select_blocks(q, lambda: self._search(q, scale), tk, config, state,
                                self.kv_heads)  # fmt: skip
        self._fetched = self._resident is None or self._resident[0] is not indices
        if self._resident is None or self._resident[0] is not indices:
            rows = self._fetch(indices)
            self._resident = indices, self.cache.slots_of(indices, rows)
        # a decode-sized call whose state re-estimated its selection (not a lookup again)
        refreshed = state is not None and state.refreshes > refreshes
        ahead = prefetch_into if refreshed else None
        if ahead is not None and (ahead.device != self.device or not ahead.takes_prefetches):
            ahead = None  # a layer on another GPU (the selection is here), or one that can't
        ready = None
        if ahead is not None and self.device.type == "cuda":
            ready = torch.cuda.current_stream(self.device).record_event()
        if not uses_triton(self.device):  # the reference reads the host copy of everything
            k, v = self.host.read()
            out = hip_attention_reference(q, k.to(q.device), v.to(q.device), config,
                                          scale=scale, indices=indices)  # fmt: skip
        else:
            out = self._sparse(q, indices, self._resident[1], scale)
        if ahead is not None:  # launched after this layer's attention, run from `ready` on
            ahead.prefetch(indices, ready=ready)
        return out

    @property
    def takes_prefetches(self) -> bool:
        """Whether :meth:`prefetch` brings blocks in: off CUDA, or with the ``csrc/`` gather
        (the PyTorch gather reads its lists on the host, which would wait for the selection)."""
        return self.device.type != "cuda" or self.gather_kind == "cuda-kernel"

    def prefetch(self, selection: torch.Tensor, *, ready: torch.cuda.Event | None = None) -> None:
        """Start bringing the blocks of ``selection`` (another layer's selection for one query
        block, ``[B, H_sel, 1, G]`` block indices of the same batch on this layer's device,
        ``-1`` padded) into this layer's block cache, keys and values: a guess at what this
        layer's next refresh selects (layers' selections overlap: README, "KV offload"). Every
        KV head gets the union of the selection's blocks over its heads while its ``H_sel * G``
        entries take at most half the slots; beyond, the blocks of the selection heads that
        share its index (more than a KV head's own selection only displaces what the cache
        holds for it). Blocks this layer has not completed are left out.

        On CUDA it runs on a stream of its own, after ``ready`` (an event recorded once
        ``selection`` was written; default: after all the current stream's work so far), so
        it overlaps what runs until this layer next touches its block cache, which waits for
        it on the device; nothing may use this layer's block cache between ``ready`` and this
        call. Nothing is read back. Without :attr:`takes_prefetches` (the PyTorch gather on
        CUDA) nothing is prefetched. Its copies count as ``prefetched_bytes`` in
        :meth:`stats`.

        Raises:
            ValueError: ``selection`` of another shape or device, or more entries per KV head
                than there are slots.
        """
        if selection.dim() != 4 or selection.shape[0] != self.batch or selection.shape[2] != 1:
            raise ValueError(
                f"selection must be [{self.batch}, H_sel, 1, G], got {tuple(selection.shape)}"
            )
        if selection.device != self.device:
            raise ValueError(f"selection must be on {self.device}, got {selection.device}")
        h_sel, width = selection.shape[1], selection[0].numel()
        per_head = width > self.cache.slots // 2
        if per_head and (h_sel % self.kv_heads or width // self.kv_heads > self.cache.slots):
            raise ValueError(
                f"selection has {h_sel} heads of {selection.shape[-1]} blocks: more than half "
                f"this layer's {self.cache.slots} slots, and not {self.kv_heads} KV heads' "
                "worth that fit them"
            )
        if not self.takes_prefetches:
            _say_no_prefetch()
            return
        self._resident = None  # its slots may change: the next attend looks them up again
        if self.device.type != "cuda":
            self._ensure_ahead(selection, per_head)
            return
        if self._prefetches is None:
            self._prefetches = torch.cuda.Stream(self.device)
        if ready is None:
            self._prefetches.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self._prefetches.wait_event(ready)
        with torch.cuda.stream(self._prefetches):
            self._ensure_ahead(selection, per_head)
        selection.record_stream(self._prefetches)  # not freed before the prefetch read it
        self._prefetched = self._prefetches.record_event()

    def _ensure_ahead(self, selection: torch.Tensor, per_head: bool) -> None:
        b = self.batch
        if per_head:
            blocks = selection.reshape(b, self.kv_heads, -1)
        else:
            blocks = selection.reshape(b, 1, -1).expand(b, self.kv_heads, -1)
        complete = self.length // self.config.block_size_k
        blocks = torch.where(blocks < complete, blocks, -1).reshape(self.cache.rows, -1)
        self.cache.ensure(blocks, complete + 1, self._gather, prefetch=True)

    def _wait_prefetch(self) -> None:
        """Order what follows on the current stream after the last prefetch (a device-side
        wait; an event already passed costs nothing)."""
        if self._prefetched is not None:
            torch.cuda.current_stream(self.device).wait_event(self._prefetched)

    def _summaries(self) -> torch.Tensor:
        if self.tree is None:  # no block after the sinks yet: nothing to select from
            self.tree = extended_tree(None, self.recent_k[:, :, :0], 0, self.config)
        return self.tree

    def _search(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The selection of ``q`` from the summary tree, and with ``leaf_scores="keys"`` from
        the keys of the last level's candidates: their keys fetched into the block cache first
        (the values of the selected ones follow in :meth:`_fetch`)."""
        tree, tk = self._summaries(), self.length
        if self.config.leaf_scores == "summary":
            return search_tree(q, tree, tk, self.config, scale)
        if not uses_triton(self.device):  # the reference reads the host copy of everything
            return search_tree(q, tree, tk, self.config, scale, self.host.read()[0].to(q.device))
        from hip_attn.triton_kernels.mask import leaf_candidates_triton, rank_leaves_triton

        config = selection_config(q.shape[2], tk, self.config)
        h_sel = selection_heads(q, self.kv_heads, config)
        candidates, _ = leaf_candidates_triton(q, tree, tk, config, h_sel, scale)
        self._unsearched = (candidates < 0).all(dim=-1)
        n_qb = num_query_blocks(q.shape[2], config)
        out = torch.empty((q.shape[0], h_sel, n_qb, config.blocks_per_query_block),
                          dtype=torch.int32, device=q.device)  # fmt: skip
        # query blocks ranked per launch: as many as the cache holds the candidates of without
        # a host read (a decode step's one; a prefill chunk's in several)
        per_block = candidates.shape[-1] * (h_sel // self.kv_heads)
        step = max(1, self.cache.slots // per_block)
        for lo in range(0, n_qb, step):
            launched = range(lo, min(lo + step, n_qb))
            self._ensure(candidates[:, :, lo : launched.stop], values=False)
            rank_leaves_triton(q, candidates, self.cache.k, self.cache.table, tk, config, scale,
                               out, launched)  # fmt: skip
        return out

    def _ensure(
        self, blocks: torch.Tensor, count_hits: torch.Tensor | None = None, values: bool = True
    ) -> None:
        """Make ``blocks`` (``[B, H_sel, ...]`` key blocks, ``-1`` for none) resident, their
        values too unless ``values`` is false; hits count where ``count_hits`` (shaped as
        ``blocks``) says so (default: all)."""
        self._wait_prefetch()
        # selection head h serves KV head h * Hkv // H_sel: a row's selections are contiguous
        rows = self.batch * self.kv_heads
        counted = None if count_hits is None else count_hits.reshape(rows, -1)
        self.cache.ensure(blocks.reshape(rows, -1), self.length // self.config.block_size_k + 1,
                          self._gather, values=values, same_step=self._stepped,
                          count_hits=counted)  # fmt: skip
        self._stepped = True

    def _fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """Bring the selected blocks into the block cache; returns the (batch, KV head) row of
        every selection entry, broadcastable to ``indices``. Reads nothing back to the host
        when one call's selections of a row fit the cache (a decode step's do)."""
        b, h_sel = indices.shape[:2]
        # after a search that fetched its leaf candidates' keys, a query block's selection among
        # them hits (and brings its values): its hits would only inflate the hit rate (misses,
        # after an eviction, are real)
        counted = self._unsearched
        self._ensure(indices, None if counted is None else counted[..., None].expand_as(indices))
        device = indices.device
        kv_of_sel = torch.arange(h_sel, device=device) * self.kv_heads // h_sel
        return (torch.arange(b, device=device)[:, None] * self.kv_heads + kv_of_sel)[
            ..., None, None
        ]

    def _sparse(
        self, q: torch.Tensor, indices: torch.Tensor, slots: torch.Tensor, scale: float
    ) -> torch.Tensor:
        from hip_attn.attention import launch_sparse
        from hip_attn.triton_kernels.attention import KVSegments

        kv = KVSegments(
            self.sink_k, self.sink_v, self.cache.k, self.cache.v, self.recent_k, self.recent_v,
            slots=slots, window_offset=self.recent_start,
        )  # fmt: skip
        return launch_sparse(q, kv, self.length, indices, self.config, scale, self._scratch)

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
    ) -> torch.Tensor:
        """Append ``k, v`` and attend ``q`` (same length) in chunks of ``max_chunk`` tokens, so
        the device holds one chunk's activations plus the caches whatever the length."""
        out = torch.empty_like(q)
        for start in range(0, q.shape[2], self.max_chunk):
            end = min(start + self.max_chunk, q.shape[2])
            self.append(k[:, :, start:end], v[:, :, start:end])
            out[:, :, start:end] = self.attend(q[:, :, start:end], scale=scale)
        return out

    # -- accounting ----------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Bytes this layer holds on its device: the summary tree, sinks, recent tokens and the
        block cache."""
        tree = () if self.tree is None else (self.tree,)
        tensors = (*tree, self.sink_k, self.sink_v, self.recent_k, self.recent_v)
        return sum(t.numel() * t.element_size() for t in tensors) + self.cache.nbytes

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes

    def stats(self) -> dict[str, Any]:
        """Hits, misses (``keys_only`` of them brought no values: a search's leaf candidates),
        ``value_fills`` (resident blocks that got their values), bytes moved host -> device
        (``prefetched_bytes`` of them by :meth:`prefetch`), bytes held on each side."""
        self._wait_prefetch()
        s = self.cache.stats
        return {
            "tokens": self.length,
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hit_rate,
            "evictions": s.evictions,
            "keys_only": s.keys_only,
            "value_fills": s.value_fills,
            "bytes_moved": s.bytes_moved,
            "prefetched_bytes": s.prefetched_bytes,
            "bytes_moved_last_step": s.last_step_bytes if self._fetched else 0,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
        }


@functools.cache
def _say_no_prefetch() -> None:
    logger.warning("hip_attn: offload prefetch needs the CUDA block gather on CUDA; it is off "
                   "(the PyTorch gather reads its lists on the host)")  # fmt: skip
