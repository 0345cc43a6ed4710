"""The full K and V of one layer in host memory (pinned when CUDA is present)."""

from __future__ import annotations

import torch


class HostKV:
    """K and V ``[B, Hkv, T, D]`` kept on the host in fixed-size chunks of tokens.

    Storage grows one chunk at a time and is never reallocated or copied as tokens arrive. A
    chunk holds ``[chunk_tokens, 2, B * Hkv, D]``: each token's keys then values of every batch
    row and head are adjacent, so appending ``n`` tokens is one contiguous copy per chunk they
    land in (a decode step: one copy per layer, whatever ``B * Hkv``). A key block (``block_size``
    tokens of one row) is ``block_size`` runs of ``D`` values, as many as a gather reads.
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
        self.chunks: list[torch.Tensor] = []
        self.length = 0
        # appends from a GPU copy on their own stream; readers wait for the last one
        self._copies: torch.cuda.Stream | None = None
        self._appended: torch.cuda.Event | None = None

    @property
    def chunk_blocks(self) -> int:
        return self.chunk_tokens // self.block_size

    def _new_chunk(self) -> torch.Tensor:
        shape = (self.chunk_tokens, 2, self.rows, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``[B, Hkv, n, D]`` keys and values (from any device). They are laid out as
        the chunks hold them where they are (one op on their device), then copied with
        one copy per chunk they land in. From a GPU into pinned chunks that copy is
        asynchronous, on a copy stream that first waits for the work that produced ``k`` and
        ``v``: the host does not wait for the GPU. Readers of the storage wait for them
        (:meth:`wait_appends`, :meth:`gather`, :meth:`read`)."""
        tokens = self.append_layout(k, v)
        if self.pin and tokens.is_cuda:
            self._append_async(tokens)
        else:
            self._append(tokens, non_blocking=False)

    def append_layout(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, n, D]`` keys and values as the chunks hold them, ``[n, 2, B * Hkv, D]``
        (each token's K, then V, of every row), in one op on their device."""
        n = k.shape[2]
        return torch.stack(
            [x.reshape(self.rows, n, self.head_dim).transpose(0, 1) for x in (k, v)], dim=1
        )

    def _append_async(self, tokens: torch.Tensor) -> None:
        if self._copies is None:
            self._copies = torch.cuda.Stream(tokens.device)
        # at most one append in flight: each holds its laid-out tokens until its copy ran, so
        # a host running ahead of the copies (prefill chunks: MBs each) would hold one per
        # append; a decode step's previous copy is long done (no wait, nothing read back)
        if self._appended is not None and not self._appended.query():
            self._appended.synchronize()
        self._copies.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(self._copies):
            self._append(tokens, non_blocking=True)
        tokens.record_stream(self._copies)  # keep its memory until the copies ran
        self._appended = torch.cuda.Event()
        self._appended.record(self._copies)

    def _append(self, tokens: torch.Tensor, *, non_blocking: bool) -> None:
        done, n = 0, tokens.shape[0]
        while done < n:
            chunk, offset = divmod(self.length, self.chunk_tokens)
            if chunk == len(self.chunks):
                self.chunks.append(self._new_chunk())
            take = min(n - done, self.chunk_tokens - offset)
            self.chunks[chunk][offset : offset + take].copy_(
                tokens[done : done + take], non_blocking=non_blocking
            )
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

    def gather(self, rows: torch.Tensor, blocks: torch.Tensor, part: int) -> torch.Tensor:
        """Keys (``part`` 0) or values (1) of blocks ``blocks[i]`` of rows ``rows[i]`` (CPU
        int64): ``[n, block_size, D]`` on the host (pinned when the storage is)."""
        self.wait_appends()
        n, bk = rows.numel(), self.block_size
        out = torch.empty((n, bk, self.head_dim), dtype=self.dtype, pin_memory=self.pin)
        chunk = torch.div(blocks, self.chunk_blocks, rounding_mode="floor")
        for c in chunk.unique().tolist():
            pick = (chunk == c).nonzero().flatten()
            local = blocks[pick] - c * self.chunk_blocks
            # [rows, blocks, bk, D] view of the chunk's keys or values
            by_row = self.chunks[c].view(self.chunk_blocks, bk, 2, self.rows, self.head_dim)
            out[pick] = by_row[:, :, part].permute(2, 0, 1, 3)[rows[pick], local]
        return out

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of K and V as ``[B, Hkv, T, D]`` host tensors (a copy; for tests and fallbacks)."""
        self.wait_appends()
        shape = (self.batch, self.kv_heads, self.length, self.head_dim)
        if not self.chunks:
            return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        tokens = torch.cat(self.chunks)[: self.length]  # [T, 2, rows, D]
        k, v = (tokens[:, i].transpose(0, 1).reshape(shape) for i in range(2))
        return k, v

    @property
    def nbytes(self) -> int:
        """Host bytes held (allocated chunks of K and V)."""
        return sum(c.numel() * c.element_size() for c in self.chunks)
