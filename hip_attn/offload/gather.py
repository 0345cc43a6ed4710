"""Moving key blocks from host memory into the GPU block cache.

On CUDA the ``csrc/`` kernel reads pinned host memory through its device address and writes the
slots directly; it is compiled on first use with ``torch.utils.cpp_extension`` (cached by
torch). If it cannot be built or the tensors are on the CPU, a PyTorch path gathers the blocks
on the host into pinned staging memory and copies them with one non-blocking copy on a side
stream. Both produce identical slot contents.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources
from typing import Any

import torch

from hip_attn.offload.block_cache import BlockCache
from hip_attn.offload.host import HostKV

logger = logging.getLogger("hip_attn")


@functools.cache
def cuda_extension() -> Any | None:
    """The compiled gather extension, or ``None`` (said once in the log) when it can't build."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load

        src = resources.files("hip_attn.csrc")
        sources = [str(src / "block_gather.cpp"), str(src / "block_gather_kernel.cu")]
        return load(name="hip_attn_block_gather", sources=sources,
                    extra_cuda_cflags=["-O3"], verbose=False)  # fmt: skip
    except Exception as err:  # no compiler, no CUDA toolkit, ...: fall back, once, loudly
        logger.warning("hip_attn: CUDA block gather unavailable (%s); using the PyTorch "
                       "gather through pinned staging memory", err)  # fmt: skip
        return None


def gather_torch(
    host: HostKV,
    cache: BlockCache,
    rows: torch.Tensor,
    blocks: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
) -> None:
    """Host gather into pinned staging memory, non-blocking copies, scatter into slots: keys
    into ``k_slots``, values into ``v_slots``, skipping slots of ``-1`` (this path reads the
    lists on the host; only what is written is gathered and crosses to the device)."""
    keys, values = k_slots >= 0, v_slots >= 0
    host_rows, host_blocks = rows.cpu(), blocks.cpu()
    k, v = (host.gather(host_rows[m], host_blocks[m], part)
            for part, m in enumerate((keys.cpu(), values.cpu())))  # fmt: skip
    k_cache, v_cache = cache.slot_views()
    device = k_cache.device
    if device.type == "cuda":
        side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
        current.wait_stream(side)
        for x in (k, v):  # allocated on the side stream, read on this one: not free before
            x.record_stream(current)
    k_cache[rows[keys], k_slots[keys]] = k
    v_cache[rows[values], v_slots[values]] = v


class ChunkPointers:
    """The device addresses of the host chunks as an int64 device tensor (what the kernel
    indexes), rebuilt only when a chunk was added: a gather copies nothing else to the
    device."""

    def __init__(self, host: HostKV, device: torch.device) -> None:
        self.host, self.device = host, device
        self._chunks = -1
        self.table = torch.empty(0, dtype=torch.int64, device=device)

    def __call__(self) -> torch.Tensor:
        if self._chunks != len(self.host.chunks):
            self._chunks = len(self.host.chunks)
            # from pinned memory, not blocking: a copy from a list would wait for the stream
            addresses = torch.tensor([c.data_ptr() for c in self.host.chunks], dtype=torch.int64)
            self.table = addresses.pin_memory().to(self.device, non_blocking=True)
        return self.table


def gather_cuda(
    ext: Any,
    host: HostKV,
    cache: BlockCache,
    pointers: ChunkPointers,
    rows: torch.Tensor,
    blocks: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
) -> None:
    """The ``csrc/`` kernel: blocks read from pinned host memory straight into the slots, keys
    into ``k_slots`` and values into ``v_slots``; one program per list entry, which skips a slot
    of ``-1`` (both: it returns at once). Nothing is read back."""
    device = cache.k.device
    table = pointers()
    host.wait_appends(torch.cuda.current_stream(device))
    row_bytes = host.head_dim * cache.k.element_size()
    ext.gather_blocks(
        table, rows.long().contiguous(), blocks.long().contiguous(),
        k_slots.long().contiguous(), v_slots.long().contiguous(), *cache.slot_views(),
        host.chunk_blocks, 2 * host.rows * row_bytes, row_bytes,
        torch.cuda.current_stream(device).cuda_stream,
    )  # fmt: skip


def gather_kind(gather: Any) -> str:
    """Which copy a gather from :func:`make_gather` makes: ``cuda-kernel`` (``csrc/``, nothing
    read back) or ``torch`` (the lists read on the host); ``unknown`` for another callable."""
    name = getattr(getattr(gather, "func", None), "__name__", "")
    return {"gather_cuda": "cuda-kernel", "gather_torch": "torch"}.get(name, "unknown")


#: The ``method`` values of :func:`make_gather`.
GATHER_METHODS = ("auto", "cuda", "torch")


def make_gather(host: HostKV, cache: BlockCache, method: str = "auto") -> Any:
    """A ``gather(rows, blocks, k_slots, v_slots)`` for :meth:`BlockCache.ensure`.

    ``method``: ``"cuda"`` (the csrc kernel; an error if it can't run), ``"torch"`` or
    ``"auto"`` (the kernel when the cache is on CUDA, the host is pinned and it builds)."""
    if method not in GATHER_METHODS:
        raise ValueError(f"gather method must be one of {GATHER_METHODS}, got {method!r}")
    usable = cache.k.is_cuda and host.pin and host.head_dim * cache.k.element_size() % 16 == 0
    ext = cuda_extension() if method != "torch" and usable else None
    if method == "cuda" and ext is None:
        raise RuntimeError("the CUDA block gather needs CUDA, pinned host KV and a build")
    if ext is not None:
        return functools.partial(gather_cuda, ext, host, cache, ChunkPointers(host, cache.k.device))
    return functools.partial(gather_torch, host, cache)
