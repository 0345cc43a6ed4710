"""The full K and V of one layer in host memory (pinned when CUDA is present)."""

from __future__ import annotations

import torch


class HostKV:
    """K and V ``[B, Hkv, T, D]`` kept on the host in fixed-size chunks of tokens.

    Storage grows one chunk at a time and is never reallocated or copied as tokens arrive. A
    chunk holds ``[B * Hkv, chunk_tokens, D]`` so that every key block (``block_size`` tokens
    of one batch row and head) is one contiguous run of memory: a gather moves whole blocks.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int,
        chunk_tokens: int = 1 << 16,
        pin: bool | None = None,
    ) -> None:
        if chunk_tokens % block_size:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) must be a multiple of block_size ({block_size})"
            )
        self.rows, self.head_dim, self.dtype = batch * kv_heads, head_dim, dtype
        self.batch, self.kv_heads = batch, kv_heads
        self.block_size, self.chunk_tokens = block_size, chunk_tokens
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.k_chunks: list[torch.Tensor] = []
        self.v_chunks: list[torch.Tensor] = []
        self.length = 0
        # appends from a GPU copy on their own stream; readers wait for the last one
        self._copies: torch.cuda.Stream | None = None
        self._appended: torch.cuda.Event | None = None

    @property
    def chunk_blocks(self) -> int:
        return self.chunk_tokens // self.block_size

    def _new_chunk(self) -> torch.Tensor:
        shape = (self.rows, self.chunk_tokens, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``[B, Hkv, n, D]`` keys and values (from any device). From a GPU into pinned
        chunks the copies are asynchronous, on a copy stream that first waits for the work
        that produced ``k`` and ``v``: the host does not wait for the GPU. Readers of the
        storage wait for them (:meth:`wait_appends`, :meth:`gather`, :meth:`read`)."""
        k = k.reshape(self.rows, -1, self.head_dim)
        v = v.reshape(self.rows, -1, self.head_dim)
        if self.pin and k.is_cuda:
            self._append_async(k, v)
        else:
            self._append(k, v, non_blocking=False)

    def _append_async(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._copies is None:
            self._copies = torch.cuda.Stream(k.device)
        self._copies.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(self._copies):
            self._append(k, v, non_blocking=True)
        for x in (k, v):  # keep their memory until the copies ran
            x.record_stream(self._copies)
        self._appended = torch.cuda.Event()
        self._appended.record(self._copies)

    def _append(self, k: torch.Tensor, v: torch.Tensor, *, non_blocking: bool) -> None:
        done, n = 0, k.shape[1]
        while done < n:
            chunk, offset = divmod(self.length, self.chunk_tokens)
            if chunk == len(self.k_chunks):
                self.k_chunks.append(self._new_chunk())
                self.v_chunks.append(self._new_chunk())
            take = min(n - done, self.chunk_tokens - offset)
            for dst, src in ((self.k_chunks[chunk], k), (self.v_chunks[chunk], v)):
                if non_blocking:  # one contiguous copy per row: a strided one would stage
                    for row in range(self.rows):
                        dst[row, offset : offset + take].copy_(
                            src[row, done : done + take], non_blocking=True
                        )
                else:
                    dst[:, offset : offset + take].copy_(src[:, done : done + take])
            done += take
            self.length += take

    def wait_appends(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order reads of the storage after the appends so far: on ``stream`` (a GPU reading
        it, without blocking the host) or, without one, on the host (blocks until done)."""
        if self._appended is None:
            return
        if stream is None:
            self._appended.synchronize()
        else:
            stream.wait_event(self._appended)

    def gather(self, rows: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``blocks[i]`` of rows ``rows[i]`` (CPU int64): ``[n, block_size, D]`` K and V
        on the host (pinned when the storage is)."""
        self.wait_appends()
        n, bk = rows.numel(), self.block_size
        k = torch.empty((n, bk, self.head_dim), dtype=self.dtype, pin_memory=self.pin)
        v = torch.empty_like(k, pin_memory=self.pin)
        chunk = torch.div(blocks, self.chunk_blocks, rounding_mode="floor")
        for c in chunk.unique().tolist():
            pick = (chunk == c).nonzero().flatten()
            local = blocks[pick] - c * self.chunk_blocks
            k_blocks = self.k_chunks[c].view(self.rows, self.chunk_blocks, bk, self.head_dim)
            v_blocks = self.v_chunks[c].view(self.rows, self.chunk_blocks, bk, self.head_dim)
            k[pick] = k_blocks[rows[pick], local]
            v[pick] = v_blocks[rows[pick], local]
        return k, v

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of K and V as ``[B, Hkv, T, D]`` host tensors (a copy; for tests and fallbacks)."""
        self.wait_appends()
        shape = (self.batch, self.kv_heads, self.length, self.head_dim)
        if not self.k_chunks:
            return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        k = torch.cat(self.k_chunks, dim=1)[:, : self.length].reshape(shape)
        v = torch.cat(self.v_chunks, dim=1)[:, : self.length].reshape(shape)
        return k, v

    @property
    def nbytes(self) -> int:
        """Host bytes held (allocated chunks of K and V)."""
        return sum(c.numel() * c.element_size() for c in self.k_chunks + self.v_chunks)
