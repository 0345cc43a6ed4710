"""`HiPConfig`: every knob of HiP attention, validated once at construction."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

HeadSharing = Literal["kv_group", "head"]
LeafScores = Literal["summary", "keys"]


#: The largest value of an int field: token positions are int32 in the kernels.
_MAX_INT = 2**31 - 1


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class HiPConfig:
    """Configuration of hierarchical top-k attention pruning (see DESIGN.md section 3).

    Attributes:
        k: key tokens selected per query block (the budget); a positive multiple of
            ``block_size_k``.
        block_size_q: queries sharing one selection (power of two, >= 16).
        block_size_k: tokens per key block, the granularity of selection (power of two).
        query_pool_stride: consecutive query rows mean-pooled before scoring (power of two,
            dividing ``block_size_q``); 1, the default, lets every row vote for itself (the
            question's row finds the needle its neighbours do not).
        sink_tokens: first tokens always attended (a multiple of ``block_size_k``).
        window: most recent tokens always attended (>= ``block_size_q``).
        head_sharing: ``"kv_group"`` selects once per KV head (a child keeps its largest
            per-row vote over its query heads' rows); ``"head"`` selects once per query head.
        beam: search width; levels before the last keep ``beam * G`` nodes.
            The defaults (``beam=2, query_pool_stride=1, leaf_scores="keys"``) are the setting
            that finds what dense attention finds on SmolLM2 (README "Accuracy"); ``beam=1,
            query_pool_stride=2, leaf_scores="summary"`` reads 0.39x as much per search at 64K
            and loses more (+5.2% perplexity at 8K instead of +1.2%).
        refresh_interval: decode steps between re-estimations of the selection
            (<= ``window``, so tokens added since the last refresh sit in the window).
        dense_threshold: at or below this many keys, exact dense attention runs instead.
            ``None`` derives it as ``sink_tokens + k + window``; ``0`` always runs sparse.
        dense_layers: layer indices that stay dense (used by the model patches).
        leaf_scores: how the last level ranks single key blocks: ``"keys"`` (default) by each
            pooled row's exact largest logit over the block's ``block_size_k`` keys (those keys
            read; the selection the tree's estimates cannot make for a short span,
            docs/accuracy.md), ``"summary"`` by the block's node summary (1.5 key-sized
            vectors read).
    """

    k: int = 512
    block_size_q: int = 64
    block_size_k: int = 8
    query_pool_stride: int = 1
    sink_tokens: int = 64
    window: int = 256
    head_sharing: HeadSharing = "kv_group"
    beam: int = 2
    refresh_interval: int = 8
    dense_threshold: int | None = None
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    leaf_scores: LeafScores = "keys"

    def __post_init__(self) -> None:
        ints = (
            "k",
            "block_size_q",
            "block_size_k",
            "query_pool_stride",
            "sink_tokens",
            "window",
            "beam",
            "refresh_interval",
        )
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"HiPConfig.{name} must be an int, got {type(value).__name__}")
            if not value <= _MAX_INT:
                raise ValueError(f"HiPConfig.{name} must be <= 2**31 - 1, got {value}")
            object.__setattr__(self, name, int(value))  # a NumPy integer becomes an int
        if not _is_pow2(self.block_size_k):
            raise ValueError(
                f"HiPConfig.block_size_k must be a power of two, got {self.block_size_k}"
            )
        if not _is_pow2(self.block_size_q) or self.block_size_q < 16:
            raise ValueError(
                f"HiPConfig.block_size_q must be a power of two >= 16, got {self.block_size_q}"
            )
        if not _is_pow2(self.query_pool_stride) or self.query_pool_stride > self.block_size_q:
            raise ValueError(
                "HiPConfig.query_pool_stride must be a power of two <= block_size_q, "
                f"got {self.query_pool_stride}"
            )
        if self.k <= 0 or self.k % self.block_size_k:
            raise ValueError(
                f"HiPConfig.k must be a positive multiple of block_size_k={self.block_size_k}, "
                f"got {self.k}"
            )
        if self.sink_tokens < 0 or self.sink_tokens % self.block_size_k:
            raise ValueError(
                "HiPConfig.sink_tokens must be a non-negative multiple of "
                f"block_size_k={self.block_size_k}, got {self.sink_tokens}"
            )
        if self.window < self.block_size_q:
            raise ValueError(
                f"HiPConfig.window must be >= block_size_q={self.block_size_q} so every query "
                f"sees its own block, got {self.window}"
            )
        if self.beam < 1:
            raise ValueError(f"HiPConfig.beam must be >= 1, got {self.beam}")
        if not 1 <= self.refresh_interval <= self.window:
            raise ValueError(
                f"HiPConfig.refresh_interval must be in [1, window={self.window}], "
                f"got {self.refresh_interval}"
            )
        if self.head_sharing not in ("kv_group", "head"):
            raise ValueError(
                f"HiPConfig.head_sharing must be 'kv_group' or 'head', got {self.head_sharing!r}"
            )
        if self.leaf_scores not in ("summary", "keys"):
            raise ValueError(
                f"HiPConfig.leaf_scores must be 'summary' or 'keys', got {self.leaf_scores!r}"
            )
        threshold = self.dense_threshold
        if threshold is not None:
            if not isinstance(threshold, numbers.Integral) or isinstance(threshold, bool):
                raise TypeError(
                    "HiPConfig.dense_threshold must be None or an int, "
                    f"got {type(threshold).__name__}"
                )
            if not 0 <= threshold <= _MAX_INT:
                raise ValueError(
                    f"HiPConfig.dense_threshold must be in [0, 2**31 - 1], got {threshold}"
                )
            object.__setattr__(self, "dense_threshold", int(threshold))
        try:
            layers = tuple(self.dense_layers)
        except TypeError:
            raise TypeError(
                "HiPConfig.dense_layers must be a sequence of layer indices, "
                f"got {type(self.dense_layers).__name__}"
            ) from None
        if any(not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0 for i in layers):
            raise ValueError(
                f"HiPConfig.dense_layers must hold non-negative ints, got {self.dense_layers!r}"
            )
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in layers))

    @property
    def blocks_per_query_block(self) -> int:
        """G: the number of key blocks each query block selects (``k // block_size_k``)."""
        return self.k // self.block_size_k

    def offload_cache_blocks(self, heads_per_kv: int = 1) -> tuple[int, str]:
        """The block-cache slots per (batch, KV head) one offloaded query block needs at once,
        and the rule as text: its selection (``k // block_size_k``), or with
        ``leaf_scores="keys"`` the leaf candidates its search ranks (``2 * beam * k //
        block_size_k``; more only when the candidate count has more set bits than ``beam * G``),
        times the ``heads_per_kv`` query heads of a KV head with ``head_sharing="head"``."""
        need, why = self.blocks_per_query_block, "k // block_size_k"
        if self.leaf_scores == "keys":
            need, why = 2 * self.beam * need, f"2 x beam x {why} (the leaf candidates)"
        if self.head_sharing == "head" and heads_per_kv > 1:
            need, why = need * heads_per_kv, f"{why} x query heads per KV head"
        return need, why

    @property
    def effective_dense_threshold(self) -> int:
        """Key count at or below which attention runs dense."""
        if self.dense_threshold is not None:
            return self.dense_threshold
        return self.sink_tokens + self.k + self.window

    def replace(self, **changes: Any) -> HiPConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The settings that decide the selection, on one line (result headers)."""
        return (
            f"k={self.k} sinks {self.sink_tokens} window {self.window} block_q "
            f"{self.block_size_q} block_k {self.block_size_k} pool {self.query_pool_stride} "
            f"beam {self.beam} head_sharing {self.head_sharing} leaves {self.leaf_scores}"
        )
