"""Launch shapes of the sparse attention kernel (:mod:`.attention`), Triton-free so that the
dispatch can choose one where Triton is not installed.

A prefill offers the autotuner several tiles (:data:`PREFILL_TILES`); it times them at the
first launch of each kernel variant and size class on the GPU and keeps the fastest. A decode
step launches one tile (packed heads, flash-decoding splits:
``hip_attn.attention.launch_shape``), the same at every step, which a CUDA graph can replay.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One launch shape: ``heads`` query heads of one selection per program (their rows
    stacked in one tile, so each K/V tile is loaded once for all of them), ``block_n`` keys per
    tile, ``num_warps`` and ``num_stages`` (software-pipelining depth) of the compiled kernel.
    ``num_warps`` and ``num_stages`` default to Triton's own launch defaults on CUDA."""

    heads: int = 1
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("heads", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Tile.{name} must be a positive int, got {value!r}")
        for name in ("block_n", "num_warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"Tile.{name} must be a power of two, got {value}")
        if self.block_n < 16:  # the smallest tl.dot operand
            raise ValueError(f"Tile.block_n must be at least 16, got {self.block_n}")


#: The prefill tiles the autotuner chooses from: those of a 64-row query block (Llama-3.1-8B
#: shapes, bf16, head dim 128) that compile for sm_90 without a spill (``hip-attn aot`` records
#: each one's registers, stack and shared memory). Two heads of a GQA group in one tile halve
#: the K/V loads; four (256 rows), or two with 4 warps, spill.
PREFILL_TILES = (
    Tile(1, 64, 4, 2),
    Tile(1, 64, 4, 3),
    Tile(1, 64, 8, 2),
    Tile(1, 64, 8, 3),
    Tile(1, 128, 8, 2),
    Tile(1, 128, 8, 3),
    Tile(2, 64, 8, 2),
    Tile(2, 64, 8, 3),
)

#: Most rows (query heads x queries of a block) of a prefill tile packing several heads.
MAX_PREFILL_ROWS = 128


def prefill_tiles(heads_per_selection: int, block_size_q: int) -> tuple[Tile, ...]:
    """The tiles of :data:`PREFILL_TILES` a prefill may launch: one head per program, or
    several that share one selection (``heads_per_selection``: query heads per selection head)
    whose rows fit :data:`MAX_PREFILL_ROWS` with queries in blocks of ``block_size_q``."""
    return tuple(
        t
        for t in PREFILL_TILES
        if t.heads == 1
        or (heads_per_selection % t.heads == 0 and t.heads * block_size_q <= MAX_PREFILL_ROWS)
    )
