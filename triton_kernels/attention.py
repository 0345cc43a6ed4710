"""Block-sparse flash attention over sinks + selected key blocks + causal window.

Reference: :func:`hip_attn.reference.hip_attention_reference`.

One kernel serves prefill and decode. A program owns one query block of one or more query
heads (rows of the tile are ``(head, query)`` pairs, so with ``head_sharing="kv_group"`` each
selected key is loaded once for the heads of a GQA group in the tile) and walks a virtual list
of key tiles:
the sink tiles, then the selected blocks gathered ``BLOCK_N`` tokens at a time, then the window
tiles. With ``num_splits > 1`` (flash-decoding) the tile list is cut into contiguous ranges, one
program each, whose unnormalized partial outputs are merged with their log-sum-exp by the last
program of the tile to finish (an arrival counter per tile: one launch, not two). Keys are
never repeated per query head and no score matrix larger than ``BLOCK_M x BLOCK_N`` exists.
The launch shapes (heads per tile, keys per tile, warps, stages) are :class:`.tiles.Tile`; a
prefill lets Triton's autotuner pick among several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from hip_attn.config import HiPConfig
from hip_attn.interpreter import interpreting
from hip_attn.triton_kernels.dtypes import TL_DTYPES, dot_operand_dtype, needs_int64
from hip_attn.triton_kernels.lengths import count_stride, keys_in_use
from hip_attn.triton_kernels.scratch import scratch_tensor
from hip_attn.triton_kernels.tiles import Tile

_LOG2E = 1.4426950408889634
#: CUDA's limit on the second launch-grid axis (query blocks, while they fit: 4.2M tokens at
#: block_size_q=64).
MAX_QUERY_BLOCKS = 65535


# size_class only keys the autotuner: specialized (16 is a multiple of 16), it would compile
# every tile again for a launch of 32K-64K one-head programs
@triton.jit(do_not_specialize=["size_class"])
def _sparse_attention_kernel(
    Q, stride_q_b, stride_q_h, stride_q_t,
    # Keys and values come from three places, each with its own (batch, head, token) strides
    # shared by K and V: the sinks, the selected blocks and the window. Without offload all
    # three are the full K/V; with offload they are the GPU sink buffer, the block-cache slots
    # and the recent-token buffer whose row 0 holds absolute position ``win_offset``.
    K_SINK, V_SINK, stride_sk_b, stride_sk_h, stride_sk_t,
    K_SEL, V_SEL, stride_bk_b, stride_bk_h, stride_bk_t,
    K_WIN, V_WIN, stride_wk_b, stride_wk_h, stride_wk_t,
    SEL, stride_s_b, stride_s_h, stride_s_q,  # int32 [B, H_sel, n_query_blocks, G], -1 padded
    SLOT,  # with INDIRECT: int32 like SEL, the block-cache slot holding each selected block
    OUT, stride_o_s, stride_o_b, stride_o_h, stride_o_t,  # [B, Hq, Tq, D] or fp32 [S, ...]
    M_OUT, L_OUT,  # fp32 [S, B, Hq, Tq] contiguous: running max (log2 units) and sum, if SPLIT
    # if SPLIT: the merged output [B, Hq, Tq, D] and int32 arrival counters, one per program of
    # the splits' grid slice (zero before the launch, zero again after it)
    FINAL, stride_f_b, stride_f_h, stride_f_t, ARRIVALS,
    tq, tk,
    stride_tk,  # with TK_ON_DEVICE: 0 for one count shared by the batch, 1 for one per sequence
    q_heads, rows_per_head, q_per_kv, sel_div, sink, window, sel_width, win_offset,
    qk_scale, num_splits,
    size_class,  # bit length of the launch's programs at one head each: for the autotuner's key
    HEADS: tl.constexpr,  # query heads per program
    BLOCK_Q: tl.constexpr,  # block_size_q
    BLOCK_M: tl.constexpr,  # rows of the tile: >= HEADS * rows_per_head
    BLOCK_N: tl.constexpr,  # keys per tile
    BK: tl.constexpr,  # block_size_k
    SEL_PAD: tl.constexpr,  # sel_width padded to a power of two
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    INDIRECT: tl.constexpr,  # selected blocks are read from block-cache slots (offload)
    SPLIT: tl.constexpr,  # write unnormalized partials and their (max, sum)
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (the input dtype but for the interpreter)
    OFFSET: tl.constexpr,  # int32, or int64 when a tensor spans 2^31 elements (K/V of 1M tokens)
    TK_ON_DEVICE: tl.constexpr,  # tk points at the keys in use (int32 in device memory)
    HEADS_FIRST: tl.constexpr,  # grid (heads, query blocks, splits), else query blocks first
):  # fmt: skip
    h_prog = q_heads // HEADS  # programs per sequence and query block
    if HEADS_FIRST:  # a GQA group's heads, which read the same K/V, run side by side
        bh = tl.program_id(0)
        qb = tl.program_id(1)
        n_b = tl.num_programs(0) // h_prog
        n_qb = tl.num_programs(1)
    else:
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        n_b = tl.num_programs(1) // h_prog
        n_qb = tl.num_programs(0)
    split = tl.program_id(2)
    b = (bh // h_prog).to(OFFSET)
    tk = keys_in_use(tk, TK_ON_DEVICE, b * stride_tk)
    head0 = (bh % h_prog) * HEADS
    kv_head = (head0 // q_per_kv).to(OFFSET)
    sel_head = head0 // sel_div

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    cols = tl.arange(0, BLOCK_N)
    head = (head0 + rows // rows_per_head).to(OFFSET)
    t = (qb * BLOCK_Q + rows % rows_per_head).to(OFFSET)  # query row within q
    n_rows = tl.minimum(BLOCK_Q, tq - qb * BLOCK_Q)
    row_ok = (rows < HEADS * rows_per_head) & (rows % rows_per_head < n_rows)
    dim_ok = dims < D
    qpos = tk - tq + t
    first_q = tk - tq + qb * BLOCK_Q  # the block's first query position
    end = first_q + n_rows

    q = tl.load(
        Q + b * stride_q_b + head[:, None] * stride_q_h + t[:, None] * stride_q_t + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    sink_off = b * stride_sk_b + kv_head * stride_sk_h
    sel_off = b * stride_bk_b + kv_head * stride_bk_h
    win_off = b * stride_wk_b + kv_head * stride_wk_h
    sel_row = (b * stride_s_b + sel_head * stride_s_h + qb * stride_s_q).to(tl.int64)

    n_sink = tl.minimum(sink, end)
    # the selection lists its blocks first, then -1 padding
    sel_cols = tl.arange(0, SEL_PAD)
    chosen = tl.load(SEL + sel_row + sel_cols, mask=sel_cols < sel_width, other=-1)
    n_sel = tl.sum((chosen >= 0).to(tl.int32)) * BK
    # hip_attn.geometry.query_blocks: the window starts at the block boundary at or before
    # s - window (s: the block's first query), never inside the sinks
    win = tl.maximum(sink, (tl.maximum(end - n_rows - window, 0) // BK) * BK)
    sink_tiles = tl.cdiv(n_sink, BLOCK_N)
    sel_tiles = tl.cdiv(n_sel, BLOCK_N)
    n_tiles = sink_tiles + sel_tiles + tl.cdiv(tl.maximum(end - win, 0), BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for tile in range(split * per_split, tl.minimum((split + 1) * per_split, n_tiles)):
        # kpos: absolute key positions (for the causal mask); k_ptr/v_ptr: where they live
        if tile < sink_tiles:
            kpos = tile * BLOCK_N + cols
            k_ok = kpos < n_sink
            last = tl.minimum((tile + 1) * BLOCK_N, n_sink) - 1  # the tile's last key
            offs = sink_off + kpos.to(OFFSET)[:, None] * stride_sk_t + dims[None, :]
            k_ptr = K_SINK + offs
            v_ptr = V_SINK + offs
        elif tile < sink_tiles + sel_tiles:
            j = (tile - sink_tiles) * BLOCK_N + cols
            k_ok = j < n_sel
            last = first_q - 1  # selected blocks end before the window, before every query
            kpos = tl.load(SEL + sel_row + j // BK, mask=k_ok, other=0) * BK + j % BK
            if INDIRECT:
                krow = tl.load(SLOT + sel_row + j // BK, mask=k_ok, other=0) * BK + j % BK
            else:
                krow = kpos
            offs = sel_off + krow.to(OFFSET)[:, None] * stride_bk_t + dims[None, :]
            k_ptr = K_SEL + offs
            v_ptr = V_SEL + offs
        else:
            kpos = win + (tile - sink_tiles - sel_tiles) * BLOCK_N + cols
            k_ok = kpos < end
            last = tl.minimum(win + (tile - sink_tiles - sel_tiles + 1) * BLOCK_N, end) - 1
            offs = win_off + (kpos - win_offset).to(OFFSET)[:, None] * stride_wk_t + dims[None, :]
            k_ptr = K_WIN + offs
            v_ptr = V_WIN + offs
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # only a tile reaching the block's first query needs the causal mask: the window's
        # last tiles, or sinks of a block that starts inside them; selected blocks never do
        if last >= first_q:
            qk = tl.where(k_ok[None, :] & (kpos[None, :] <= qpos[:, None]), qk, float("-inf"))
        else:
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    tile_ok = row_ok[:, None] & dim_ok[None, :]
    out = OUT + split * stride_o_s + b * stride_o_b + head * stride_o_h + t * stride_o_t
    if SPLIT:
        tl.store(out[:, None] + dims[None, :], acc, mask=tile_ok)
        stat = ((split * n_b + b) * q_heads + head) * tq + t
        tl.store(M_OUT + stat, m_i, mask=row_ok)
        tl.store(L_OUT + stat, l_i, mask=row_ok)
        # the last of the tile's splits to finish merges them all (no second launch): the
        # barrier orders every thread's stores before the arrival's release, the merging
        # program reads the others' partials after acquiring it (from L2: .cg)
        tl.debug_barrier()
        arrival = ARRIVALS + bh * n_qb + qb
        if tl.atomic_add(arrival, 1, sem="acq_rel") == num_splits - 1:
            # back to zero for the next launch: by an atomic, so that a count never goes astray
            tl.atomic_add(arrival, -num_splits, sem="relaxed")
            split_stat = stat - split * n_b * q_heads * tq  # split 0's
            stat_stride = n_b * q_heads * tq
            m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            num = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            den = tl.zeros([BLOCK_M], tl.float32)
            part = out - split * stride_o_s
            # online over the splits, as over key tiles above (one pass: a first pass for the
            # maximum, as merge_partials takes it, spilled registers on sm_90)
            for s in range(num_splits):
                m_s = tl.load(M_OUT + split_stat + s * stat_stride, mask=row_ok,
                              other=float("-inf"), cache_modifier=".cg")  # fmt: skip
                m_new = tl.maximum(m_max, m_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet
                alpha = tl.exp2(m_max - m_safe)
                weight = tl.exp2(m_s - m_safe)
                l_s = tl.load(L_OUT + split_stat + s * stat_stride, mask=row_ok, other=0.0,
                              cache_modifier=".cg")  # fmt: skip
                den = den * alpha + weight * l_s
                acc_s = tl.load(part[:, None] + s * stride_o_s + dims[None, :], mask=tile_ok,
                                other=0.0, cache_modifier=".cg")  # fmt: skip
                num = num * alpha[:, None] + weight[:, None] * acc_s
                m_max = m_new
            den = tl.where(row_ok, den, 1.0)
            final = FINAL + b * stride_f_b + head * stride_f_h + t * stride_f_t
            merged = (num / den[:, None]).to(FINAL.dtype.element_ty)
            tl.store(final[:, None] + dims[None, :], merged, mask=tile_ok)
    else:
        tl.store(out[:, None] + dims[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
                 mask=tile_ok)  # fmt: skip


@dataclass
class KVSegments:
    """Where the kernel reads keys and values, each pair ``[B, Hkv, rows, D]``.

    Without offload every segment is the full K/V (:meth:`full`). With offload the sinks come
    from a GPU sink buffer, the selected blocks from block-cache slots (``slots``: the slot of
    each selected block, shaped like the selection), and the window from a buffer of recent
    tokens whose row 0 is absolute position ``window_offset``.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sel_k: torch.Tensor
    sel_v: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    slots: torch.Tensor | None = None
    window_offset: int = 0

    @classmethod
    def full(cls, k: torch.Tensor, v: torch.Tensor) -> KVSegments:
        if k.stride() != v.stride():  # the kernel shares one set of strides per K/V pair
            k, v = k.contiguous(), v.contiguous()
        return cls(k, v, k, v, k, v)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.sink_k, self.sink_v, self.sel_k, self.sel_v, self.win_k, self.win_v)

    def launch_args(self) -> list[object]:
        args: list[object] = []
        for k, v in (
            (self.sink_k, self.sink_v),
            (self.sel_k, self.sel_v),
            (self.win_k, self.win_v),
        ):
            if k.stride() != v.stride() or k.stride(-1) != 1:
                raise ValueError("each K/V segment must share strides and have unit stride on D")
            args += [k, v, k.stride(0), k.stride(1), k.stride(2)]
        return args


#: What the autotuner times the prefill tiles again for: a kernel variant (the arguments that
#: shape a program's work; Triton adds the tensors' dtypes) and the launch's size class (its
#: programs to a power of two: a 65-token prefill's few programs tune apart from 128K's), not
#: the exact length.
_TUNING_KEY = ("q_heads", "rows_per_head", "q_per_kv", "sel_div", "SEL_PAD", "D", "BK",
               "INDIRECT", "OFFSET", "TK_ON_DEVICE", "HEADS_FIRST", "size_class")  # fmt: skip
#: The autotuners made so far, by (tiles, rows per head): each keeps its choices.
_TUNERS: dict[tuple[tuple[Tile, ...], int], Any] = {}


def _tile_constants(tile: Tile, rows_per_head: int) -> dict[str, int]:
    return {
        "HEADS": tile.heads,
        "BLOCK_M": max(16, triton.next_power_of_2(tile.heads * rows_per_head)),
        "BLOCK_N": tile.block_n,
    }


def _autotuned(tiles: tuple[Tile, ...], rows_per_head: int) -> Any:
    """The kernel under Triton's autotuner, choosing among ``tiles`` (timed on the GPU at the
    first launch of each kernel variant, :data:`_TUNING_KEY`)."""
    key = (tiles, rows_per_head)
    if key not in _TUNERS:
        configs = [
            triton.Config(
                _tile_constants(t, rows_per_head), num_warps=t.num_warps, num_stages=t.num_stages
            )
            for t in tiles
        ]
        _TUNERS[key] = triton.autotune(configs, key=list(_TUNING_KEY))(_sparse_attention_kernel)
    return _TUNERS[key]


def size_class(batch: int, q_heads: int, query_blocks: int) -> int:
    """The autotuner's size class of a launch: the bit length of its programs at one query head
    each (:data:`_TUNING_KEY`)."""
    return (batch * q_heads * query_blocks).bit_length()


def _can_time(q: torch.Tensor) -> bool:
    """Whether the autotuner can time tiles for ``q``: on a GPU, not in the interpreter."""
    return q.is_cuda and not interpreting()


def tuned_tiles() -> list[dict[str, Any]]:
    """The tile the autotuner chose for each kernel variant and size class launched so far in
    this process (its key's arguments, the tile's fields): what a benchmark records beside its
    timings."""
    chosen = []
    for tuner in _TUNERS.values():
        for key, config in tuner.cache.items():
            variant = dict(zip(_TUNING_KEY, map(str, key), strict=False))
            variant["dtypes"] = ",".join(map(str, key[len(_TUNING_KEY) :]))
            kw = config.kwargs
            tile = Tile(kw["HEADS"], kw["BLOCK_N"], config.num_warps, config.num_stages)
            chosen.append({**variant, **asdict(tile)})
    return chosen


def sparse_attention_triton(
    q: torch.Tensor,
    kv: KVSegments,
    tk: int | torch.Tensor,
    indices: torch.Tensor,
    config: HiPConfig,
    scale: float,
    *,
    num_splits: int = 1,
    tile: Tile | Sequence[Tile] | None = None,
    out: torch.Tensor | None = None,
    scratch: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch the kernel for queries ``q`` at positions ``tk - Tq .. tk - 1``. ``tk`` may be
    an int32 device tensor, read by the kernel: the launch is then the same whatever the
    length (what a CUDA graph replays). Of one element it counts every sequence's keys; of
    ``B``, sequence ``b``'s (its keys first in its row, a left-padded batch compacted).

    ``kv`` says where keys and values live (:meth:`KVSegments.full` for plain K/V),
    ``indices``: the ``[B, H_sel, n_query_blocks, W]`` selection (blocks first, then ``-1``),
    each block inside its query block's candidate region (before the window: no causal mask
    is applied to them).
    The kernel derives each query block's window and selected-block count itself, so the
    launch reads nothing from the device and runs no other op.
    ``tile`` is the launch shape (:class:`~hip_attn.triton_kernels.tiles.Tile`, by default
    ``Tile()``: one head, 64 keys, Triton's default warps and stages): its ``heads``
    query heads of one selection share a tile (``Hq // H_sel`` must be a multiple of it); a
    sequence of tiles lets Triton's autotuner time them on the GPU at the first launch of each
    kernel variant and size class (:data:`_TUNING_KEY`) and keep the fastest for the process
    (:func:`tuned_tiles` says which; ``TRITON_CACHE_AUTOTUNING=1`` keeps the choice on disk for
    later processes; without a GPU to time on, the first is launched). ``num_splits > 1``
    cuts each program's key tiles into that many ranges (flash-decoding; one tile only), which
    the last of them to finish merges in the same launch. The result is written into ``out``
    when given (shape and dtype of ``q``); the split partials and the arrival counters are
    kept in ``scratch`` when given (:func:`~hip_attn.triton_kernels.scratch.scratch_tensor`; a
    split launch without it zeroes fresh counters first, one fill). Launches that may run at
    the same time (other streams) must not share a ``scratch``."""
    b, hq, tq, d = q.shape
    hkv = kv.sel_k.shape[1]
    h_sel, n_qb, width = indices.shape[1:]
    bq = config.block_size_q
    rows_per_head = min(tq, bq)  # one short query block (decode) gets a short tile
    tiles = (Tile(),) if tile is None else (tile,) if isinstance(tile, Tile) else tuple(tile)
    if not tiles or not all(isinstance(t, Tile) for t in tiles):
        raise TypeError(f"tile must be a Tile or a non-empty sequence of them, got {tile!r}")
    for t in tiles:
        if (hq // h_sel) % t.heads:
            raise ValueError(f"tile.heads must divide the query heads per selection head "
                             f"({hq // h_sel}), got {t.heads}")  # fmt: skip
    split = num_splits > 1
    if split and len(tiles) > 1:
        raise ValueError("num_splits > 1 launches one tile; got several to choose from")
    if not _can_time(q):
        tiles = tiles[:1]
    slots = indices if kv.slots is None else kv.slots
    if slots.stride() != indices.stride() or indices.stride(-1) != 1:
        raise ValueError("kv.slots must have the shape and strides of indices, unit stride last")
    dot_dtype = dot_operand_dtype(q.dtype)
    final = torch.empty_like(q) if out is None else out
    if final.stride(-1) != 1:
        raise ValueError("out must have unit stride on the last dimension")
    if split:
        dest, row_max, row_sum = (
            scratch_tensor(scratch, name, shape, torch.float32, q.device)
            for name, shape in (
                ("split_acc", (num_splits, b, hq, tq, d)),
                ("split_max", (num_splits, b, hq, tq)),
                ("split_sum", (num_splits, b, hq, tq)),
            )
        )
        o_strides = dest.stride()[:4]
    else:
        dest = final
        row_max = row_sum = final  # unused without splits
        o_strides = (0, *final.stride()[:3])
    d_pad = max(16, triton.next_power_of_2(d))
    # programs run in launch order, heads before query blocks: the query heads that read the
    # same K/V (and, sharing a selection, the same blocks) run together and share L2; past
    # the second grid axis's limit the query blocks take the first axis
    heads_first = n_qb <= MAX_QUERY_BLOCKS

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        programs = b * hq // meta["HEADS"]
        return (programs, n_qb, num_splits) if heads_first else (n_qb, programs, num_splits)

    programs = b * hq // tiles[0].heads  # with splits, one tile
    arrivals = (
        scratch_tensor(
            scratch, "split_arrivals", (programs * n_qb,), torch.int32, q.device, zeroed=True
        )
        if split
        else indices  # unused without splits
    )
    args = (
        q, q.stride(0), q.stride(1), q.stride(2),
        *kv.launch_args(),
        indices, indices.stride(0), indices.stride(1), indices.stride(2),
        slots,
        dest, *o_strides,
        row_max, row_sum,
        final, *final.stride()[:3], arrivals,
        tq, tk, count_stride(tk, b), hq, rows_per_head, hq // hkv, hq // h_sel,
        config.sink_tokens, config.window, width, kv.window_offset, scale * _LOG2E, num_splits,
        size_class(b, hq, n_qb),
    )  # fmt: skip
    constants = {
        "BLOCK_Q": bq,
        "BK": config.block_size_k,
        "SEL_PAD": triton.next_power_of_2(width),
        "D": d,
        "D_PAD": d_pad,
        "INDIRECT": kv.slots is not None,
        "SPLIT": split,
        "PRECISION": "ieee" if dot_dtype == torch.float32 else "tf32",
        "DOT_DTYPE": TL_DTYPES[dot_dtype],
        "OFFSET": tl.int64 if needs_int64(q, dest, *kv.tensors()) else tl.int32,
        "TK_ON_DEVICE": isinstance(tk, torch.Tensor),
        "HEADS_FIRST": heads_first,
    }
    if len(tiles) > 1:
        _autotuned(tiles, rows_per_head)[grid](*args, **constants)
    else:
        (one,) = tiles
        shape = _tile_constants(one, rows_per_head)
        _sparse_attention_kernel[grid(shape)](
            *args, **constants, **shape, num_warps=one.num_warps, num_stages=one.num_stages
        )
    return final


def merge_partials(acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """What the last split of a tile to finish computes in the sparse kernel (there online,
    split by split): the combination of split partials ``acc`` ``[S, ..., D]`` (unnormalized
    outputs), ``row_max`` ``[S, ...]`` (their running maxima in log2 units, ``-inf`` for a split
    that saw no key) and ``row_sum`` (their softmax denominators)."""
    weight = torch.exp2(row_max - row_max.amax(dim=0, keepdim=True))
    return (weight[..., None] * acc).sum(dim=0) / (weight * row_sum).sum(dim=0)[..., None]
