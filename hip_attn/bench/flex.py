"""``flex_attention`` doing HiP's sparse work: a ``BlockMask`` built from the HiP selection.

Each HiP query block attends its sinks, its selected key blocks and its causal window. The
``BlockMask`` has one row of blocks per HiP query block (``block_size_q`` queries) and key
blocks of ``kv_block`` tokens (``block_size_k`` rounded up to 16, flex's smallest tile, unless
given). For every query block it lists the key blocks holding any attended key, as *full*
(every query attends every key: mask_mod skipped) or *partial* (mask_mod decides per element):
sink blocks, the selected blocks, the window blocks; a block in two of those is listed once.
``mask_mod`` is the exact HiP rule (causal, and sink, window or selected), reading a
``[B, H_sel, n_query_blocks, Tk / block_size_k]`` bitmap of the selection; when that bitmap would
be too large and ``kv_block == block_size_k`` (every partial block is then a sink or window block)
a ``mask_mod`` without it is exact on every listed block.

Decode with ``head_sharing="kv_group"`` folds the query heads of a KV group into the query axis
(``[B, Hkv, group * Tq, D]``), the layout of HiP's decode kernel and of flex's decoding kernel,
so one program reads each selected key once for the whole group. Otherwise GQA runs with
``enable_gqa=True`` and the mask repeated per query head.

On CUDA the call is ``torch.compile(flex_attention, fullgraph=True)``; elsewhere it is not timed
(eager ``flex_attention`` computes every score, which is dense work), but the mask is the same
and the tests check it against the reference there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hip_attn.config import HiPConfig
from hip_attn.geometry import query_blocks

#: Largest selection bitmap built for ``mask_mod``.
BITMAP_MAX_BYTES = 2 * 2**30
#: Query rows below which flex runs its decoding kernel.
FLEX_DECODE_MAX_ROWS = 128


class FlexUnavailable(RuntimeError):
    """flex_attention cannot run this case; the message is the reason."""


@dataclass
class FlexPlan:
    """A ``BlockMask`` for one case and how to call flex with it.

    Attributes:
        block_mask: the mask (``torch.nn.attention.flex_attention.BlockMask``).
        folded: query heads of a KV group are folded into the query axis.
        kv_block: key tokens per mask block.
        q_block: query rows per mask block.
        exact_mask_mod: ``mask_mod`` is exact on every element (it reads the selection
            bitmap), not only on the listed partial blocks.
        listed_keys: key tokens in the listed (partial and full) blocks, summed over the
            mask's rows of blocks: what flex loads, to compare with HiP's key reads.
    """

    block_mask: Any
    folded: bool
    kv_block: int
    q_block: int
    exact_mask_mod: bool
    listed_keys: int


def default_kv_block(config: HiPConfig) -> int:
    """``block_size_k`` rounded up to flex's smallest key tile (16)."""
    return max(16, config.block_size_k)


def _compact(
    ids: torch.Tensor, keep: torch.Tensor, big: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept ``ids`` of each row moved to the front in ascending order: ``(count, ids)``,
    int32, ``width`` columns padded with 0."""
    picked = torch.where(keep, ids, big).sort(dim=-1).values[..., :width]
    picked = torch.where(picked == big, 0, picked)
    if picked.shape[-1] < width:
        picked = F.pad(picked, (0, width - picked.shape[-1]))
    return keep.sum(dim=-1).to(torch.int32).contiguous(), picked.to(torch.int32).contiguous()


def block_lists(
    indices: torch.Tensor,
    tq: int,
    tk: int,
    config: HiPConfig,
    kv_block: int,
    *,
    full_width: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial and full key blocks of every HiP query block.

    Args:
        indices: the HiP selection ``[B, H_sel, n_query_blocks, G]``, ascending, ``-1`` padded.
        tq, tk: queries and keys.
        config: the HiP configuration.
        kv_block: key tokens per mask block (a multiple of ``block_size_k``).
        full_width: give the id lists ``ceil(Tk / kv_block)`` columns, as ``create_block_mask``
            does (flex's CPU kernel needs it); otherwise as many as the longest list.

    Returns:
        ``(partial_count, partial_ids, full_count, full_ids)``: counts ``[B, H_sel, nQB]`` and
        ascending block ids ``[B, H_sel, nQB, width]``, int32. Both id lists have the same
        width: flex's decoding kernel reads them with one set of strides.
    """
    bk, sink, fb = config.block_size_k, config.sink_tokens, kv_block
    if fb % bk:
        raise ValueError(f"kv_block ({fb}) must be a multiple of block_size_k ({bk})")
    ratio = fb // bk
    b, h_sel, n_qb, _ = indices.shape
    dev = indices.device
    geo = query_blocks(tq, tk, config, dev)
    s, e, ws = geo.start[:, None], geo.end[:, None], geo.window_start[:, None]  # [nQB, 1]
    big = tk // fb + 2

    sid = torch.arange(-(-sink // fb), device=dev)[None, :]  # sink blocks
    s_ok = sid * fb < torch.clamp(e, max=sink)
    s_full = ((sid + 1) * fb <= sink) & ((sid + 1) * fb - 1 <= s)
    span = (config.window + config.block_size_q + bk) // fb + 2  # window blocks, at most
    wid = ws // fb + torch.arange(span, device=dev)[None, :]
    w_ok = torch.maximum(wid * fb, ws) < e
    w_full = (wid * fb >= ws) & ((wid + 1) * fb - 1 <= s)

    idx = indices.long()
    sel_ok = idx >= 0
    fid = torch.where(sel_ok, idx // ratio, -1)
    if ratio == 1:
        f_full = sel_ok
    else:  # distinct ascending ids: ``ratio`` of them in one mask block cover it
        ahead = F.pad(idx, (0, ratio - 1), value=-1)[..., ratio - 1 :]
        f_full = sel_ok & (ahead >= 0) & (ahead // ratio == fid)

    lead = (b, h_sel, n_qb)
    ids = torch.cat([sid.expand(*lead, -1), wid.expand(*lead, -1), fid], dim=-1)
    ok = torch.cat([s_ok.expand(*lead, -1), w_ok.expand(*lead, -1), sel_ok], dim=-1)
    full = torch.cat([s_full.expand(*lead, -1), w_full.expand(*lead, -1), f_full], dim=-1) & ok
    # One entry per block, full if any of its entries is: sort by (id, partial), keep firsts.
    key = torch.where(ok, ids * 2 + (~full).long(), 2 * big).sort(dim=-1).values
    ids, full, ok = key // 2, key % 2 == 0, key < 2 * big
    first = ids != F.pad(ids, (1, 0), value=-1)[..., :-1]
    keep = ok & first
    longest = int(torch.maximum((keep & full).sum(-1), (keep & ~full).sum(-1)).max())
    width = -(-tk // fb) if full_width else max(1, longest)
    partial_count, partial_ids = _compact(ids, keep & ~full, big, width)
    full_count, full_ids = _compact(ids, keep & full, big, width)
    return partial_count, partial_ids, full_count, full_ids


def selection_bitmap(indices: torch.Tensor, tk: int, config: HiPConfig) -> torch.Tensor:
    """``[B, H_sel, nQB, ceil(Tk / bk) + 1]`` bool: key block selected by the query block (the
    last column absorbs the ``-1`` padding)."""
    n_kb = -(-tk // config.block_size_k)
    bitmap = torch.zeros((*indices.shape[:3], n_kb + 1), dtype=torch.bool, device=indices.device)
    cols = torch.where(indices >= 0, indices.long(), n_kb)
    bitmap.scatter_(-1, cols, True)
    bitmap[..., n_kb] = False
    return bitmap


def hip_mask_mod(
    tq: int,
    tk: int,
    config: HiPConfig,
    window_start: torch.Tensor,
    bitmap: torch.Tensor | None,
    heads_per_mask_head: int,
    folded: bool,
) -> Callable[..., torch.Tensor]:
    """The HiP rule as a flex ``mask_mod(b, h, q_idx, kv_idx)``: causal, and sink, window or
    (with ``bitmap``) selected. ``folded``: query rows are ``(group head, query)`` pairs."""
    bq, bk, sink, offset = config.block_size_q, config.block_size_k, config.sink_tokens, tk - tq

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        t = q_idx % tq if folded else q_idx
        qb = t // bq
        keep = (kv_idx < sink) | (kv_idx >= window_start[qb])
        if bitmap is not None:
            keep = keep | bitmap[b, h // heads_per_mask_head, qb, kv_idx // bk]
        return (kv_idx <= t + offset) & keep

    return mask_mod


def plan_flex(
    indices: torch.Tensor,
    q_shape: tuple[int, int, int, int],
    kv_heads: int,
    tk: int,
    config: HiPConfig,
    kv_block: int | None = None,
    *,
    fold: bool | None = None,
    exact: bool | None = None,
    full_width: bool = False,
) -> FlexPlan:
    """Build the ``BlockMask`` for HiP's selection ``indices`` (see the module docstring).

    Args:
        indices: the selection ``[B, H_sel, nQB, G]``.
        q_shape: ``(B, Hq, Tq, D)``.
        kv_heads: ``Hkv``.
        tk: keys.
        config: the HiP configuration.
        kv_block: key tokens per mask block (default :func:`default_kv_block`).
        fold: fold GQA groups into the query axis (default: decode-shaped ``kv_group`` cases
            with fewer than 128 folded rows).
        exact: build the selection bitmap so ``mask_mod`` is exact everywhere (default: when
            it fits in :data:`BITMAP_MAX_BYTES`).
        full_width: pad the block lists to every key block (see :func:`block_lists`).

    Raises:
        FlexUnavailable: flex_attention is missing, or the mask cannot be built within memory.
    """
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as exc:  # pragma: no cover - torch >= 2.5 has it
        raise FlexUnavailable(f"torch.nn.attention.flex_attention unavailable: {exc}") from None
    b, hq, tq, _ = q_shape
    fb = kv_block or default_kv_block(config)
    if fb % config.block_size_k or fb & (fb - 1):
        raise FlexUnavailable(
            f"flex key block {fb} must be a power of two and a multiple of block_size_k "
            f"({config.block_size_k})"
        )
    h_sel = indices.shape[1]
    group = hq // kv_heads
    if fold is None:
        fold = (
            config.head_sharing == "kv_group"
            and tq <= config.block_size_q
            and group * tq < FLEX_DECODE_MAX_ROWS
        )
    if fold and (config.head_sharing != "kv_group" or tq > config.block_size_q):
        raise ValueError("folding needs head_sharing='kv_group' and Tq <= block_size_q")
    bitmap_bytes = indices.shape[0] * h_sel * indices.shape[2] * (tk // config.block_size_k + 2)
    if exact is None:
        exact = bitmap_bytes <= BITMAP_MAX_BYTES
    if not exact and fb != config.block_size_k:
        raise FlexUnavailable(
            f"mask_mod would need a {bitmap_bytes / 1e9:.1f} GB selection bitmap (limit "
            f"{BITMAP_MAX_BYTES / 1e9:.1f} GB) because a {fb}-token flex block holds several "
            f"{config.block_size_k}-token HiP blocks; with block_size_k >= 16 and "
            "--flex-kv-block equal to it no bitmap is needed"
        )

    geo = query_blocks(tq, tk, config, indices.device)
    part_n, part_ids, full_n, full_ids = block_lists(
        indices, tq, tk, config, fb, full_width=full_width
    )
    if fold:
        rows, per_mask_head = group * tq, 1
        q_block = max(16, 1 << (rows - 1).bit_length())
    else:
        rows, q_block = tq, config.block_size_q
        per_mask_head = hq // h_sel
        if per_mask_head > 1:  # the mask has one row of blocks per query head
            part_n, part_ids, full_n, full_ids = (
                x.repeat_interleave(per_mask_head, dim=1)
                for x in (part_n, part_ids, full_n, full_ids)
            )
    listed = int(part_n.sum() + full_n.sum()) * fb
    bitmap = selection_bitmap(indices, tk, config) if exact else None
    mask_mod = hip_mask_mod(tq, tk, config, geo.window_start, bitmap, per_mask_head, fold)
    kwargs: dict[str, Any] = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: no transposed lists needed
    block_mask = BlockMask.from_kv_blocks(
        part_n,
        part_ids,
        full_n,
        full_ids,
        BLOCK_SIZE=(q_block, fb),
        mask_mod=mask_mod,
        seq_lengths=(rows, tk),
        **kwargs,
    )
    return FlexPlan(block_mask, fold, fb, q_block, exact, listed)


def flex_call(
    plan: FlexPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    compiled: bool = True,
) -> Callable[[], torch.Tensor]:
    """A call of (compiled) flex_attention with ``plan``; returns ``[B, Hq, Tq, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    fn: Any = flex_attention
    if compiled:
        _raise_recompile_limits()
        fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    if plan.folded:
        q_folded = q.contiguous().view(b, hkv, (hq // hkv) * tq, d)

        def folded() -> torch.Tensor:
            out = fn(q_folded, k, v, block_mask=plan.block_mask, scale=scale)
            return out.view(b, hq, tq, d)

        return folded
    options = {
        "BLOCK_M": min(plan.q_block, 128),
        "BLOCK_N": min(plan.kv_block, 128),
        "FORCE_USE_FLEX_ATTENTION": True,
    }

    def unfolded() -> torch.Tensor:
        return fn(
            q,
            k,
            v,
            block_mask=plan.block_mask,
            scale=scale,
            enable_gqa=hq != hkv,
            kernel_options=options if compiled else None,
        )

    return unfolded


def _raise_recompile_limits() -> None:
    """Every case is a new mask_mod closure and shape: let dynamo compile them all (and with
    ``fullgraph=True`` fail loudly instead of silently running eager, dense flex)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), 256))
