"""The peak-performance estimator: memory, prefill, decode, concurrency and context switch.

Everything here is closed-form arithmetic on a :class:`Scenario` (model x GPU x dtypes x batch x
tensor parallelism x HiP/offload settings) and a context length. Quantities are per GPU unless a
name says otherwise; see ``docs/roofline.md`` for the formulas in prose.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from hip_attn.config import HiPConfig
from hip_attn.perf.hardware import GB, Efficiency, GPUSpec
from hip_attn.perf.models import ModelSpec
from hip_attn.perf.roofline import Operator, PhaseCost, phase_cost

Mode = Literal["dense", "hip", "hip+offload"]
MODES: tuple[Mode, ...] = ("dense", "hip", "hip+offload")

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}

DENSE_QUERY_TILE = 128
"""Query rows per tile of the dense (flash) attention kernel; each tile reads the K/V it sees."""


def _floor(x: float) -> int:
    """``floor`` that forgives float round-off just below an integer."""
    return max(0, math.floor(x + 1e-9))


@dataclass(frozen=True)
class OffloadConfig:
    """Settings of ``hip+offload``.

    Attributes:
        host_ram: pinned host memory available for KV caches, bytes (all requests, all GPUs).
        block_cache_tokens: GPU block-cache size per request, in tokens (every layer and KV head
            has that many slots); must hold at least the ``k`` selected tokens.
        miss_rate: fraction of the selected KV bytes a decode step (or a prefill query block)
            fetches from host memory.
    """

    host_ram: int = 512 * GB
    block_cache_tokens: int = 16384
    miss_rate: float = 0.1

    def __post_init__(self) -> None:
        if not self.host_ram > 0:
            raise ValueError(f"host RAM must be positive, got {self.host_ram!r}")
        if not isinstance(self.block_cache_tokens, int) or self.block_cache_tokens < 1:
            raise ValueError(
                f"block cache must be a positive number of tokens, got {self.block_cache_tokens!r}"
            )
        if not 0.0 <= self.miss_rate <= 1.0:
            raise ValueError(f"miss rate must be in [0, 1], got {self.miss_rate!r}")


@dataclass(frozen=True)
class Scenario:
    """Everything but the context length.

    Attributes:
        model: the transformer.
        gpu: one GPU (its peaks; ``efficiency`` scales them).
        efficiency: fractions of peak reached.
        weight_dtype, kv_dtype: keys of :data:`DTYPE_BYTES`.
        batch: concurrent requests prefilled and decoded together.
        output_tokens: decode steps per request.
        tp: tensor-parallel degree (GPUs per model replica).
        hip: HiP settings (used by ``hip`` and ``hip+offload``).
        offload: offload settings (used by ``hip+offload``).
    """

    model: ModelSpec
    gpu: GPUSpec
    efficiency: Efficiency = field(default_factory=Efficiency)
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    batch: int = 1
    output_tokens: int = 250
    tp: int = 1
    hip: HiPConfig = field(default_factory=HiPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self) -> None:
        for name in ("weight_dtype", "kv_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of: "
                    + ", ".join(DTYPE_BYTES)
                )
        for name in ("batch", "output_tokens", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        m = self.model
        if m.heads % self.tp:
            raise ValueError(f"tensor-parallel degree {self.tp} must divide {m.heads} heads")
        if m.kv_heads % self.tp and self.tp % m.kv_heads:
            raise ValueError(
                f"tensor-parallel degree {self.tp} must divide {m.kv_heads} KV heads "
                "or be a multiple of it"
            )
        if self.offload.block_cache_tokens < self.hip.k:
            raise ValueError(
                f"block cache ({self.offload.block_cache_tokens} tokens) must hold at least the "
                f"k={self.hip.k} selected tokens"
            )

    # ---- per-GPU shapes -------------------------------------------------------------------

    @property
    def peak(self) -> GPUSpec:
        """The GPU with efficiency factors applied: the numbers every time is computed with."""
        return self.efficiency.apply(self.gpu)

    @property
    def weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def kv_bytes_per_elem(self) -> float:
        return DTYPE_BYTES[self.kv_dtype]

    @property
    def act_bytes(self) -> float:
        """Activations are bf16, or fp32 when the weights are."""
        return 4.0 if self.weight_dtype == "fp32" else 2.0

    @property
    def heads_per_gpu(self) -> int:
        return self.model.heads // self.tp

    @property
    def kv_heads_per_gpu(self) -> int:
        """KV heads held by each GPU (replicated when ``tp`` exceeds the KV head count)."""
        return max(1, self.model.kv_heads // self.tp)

    @property
    def vocab_per_gpu(self) -> int:
        return -(-self.model.vocab // self.tp)

    def matmuls(self) -> list[tuple[str, int, int]]:
        """Per-layer matmuls on one GPU as ``(name, in_features, out_features)``."""
        m, d = self.model, self.model.head_dim
        hq, hkv = self.heads_per_gpu, self.kv_heads_per_gpu
        inter = -(-m.intermediate // self.tp)
        mlp = (
            [("mlp_gate_up", m.hidden, 2 * inter), ("mlp_down", inter, m.hidden)]
            if m.gated_mlp
            else [("mlp_up", m.hidden, inter), ("mlp_down", inter, m.hidden)]
        )
        return [("qkv_proj", m.hidden, (hq + 2 * hkv) * d), ("o_proj", hq * d, m.hidden), *mlp]

    @property
    def matmul_params_per_gpu(self) -> int:
        """``P_mm`` on one GPU: every layer's projection and MLP weights."""
        return self.model.layers * sum(fin * fout for _, fin, fout in self.matmuls())

    @property
    def lm_head_params_per_gpu(self) -> int:
        return self.vocab_per_gpu * self.model.hidden

    @property
    def weight_bytes(self) -> float:
        """Weights stored on one GPU: matmuls, LM head, untied embedding, norms."""
        embedding = 0 if self.model.tied_embeddings else self.lm_head_params_per_gpu
        params = (
            self.matmul_params_per_gpu
            + self.lm_head_params_per_gpu
            + embedding
            + self.model.norm_params
        )
        return params * self.weight_bytes_per_param

    @property
    def hbm_free(self) -> float:
        """HBM left on one GPU for KV caches after the weights (negative: weights do not fit)."""
        return self.gpu.hbm - self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """Whole-model KV per token, ``2 * layers * Hkv * D * bytes``."""
        m = self.model
        return 2 * m.layers * m.kv_heads * m.head_dim * self.kv_bytes_per_elem

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        m = self.model
        return 2 * m.layers * self.kv_heads_per_gpu * m.head_dim * self.kv_bytes_per_elem

    @property
    def rep_bytes_per_token_per_gpu(self) -> float:
        """HiP representative keys: one key (no value) per ``block_size_k`` tokens."""
        m = self.model
        key_bytes = m.layers * self.kv_heads_per_gpu * m.head_dim * self.kv_bytes_per_elem
        return key_bytes / self.hip.block_size_k


# ---- HiP token counts -----------------------------------------------------------------------


def _sum_range(lo: int, hi: int) -> int:
    """``lo + (lo + 1) + ... + hi``; 0 when empty."""
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def search_levels(candidate_blocks: int, budget_blocks: int) -> int:
    """``ceil(log2(N / G))``: tree levels until every node is one block (0 when N <= G)."""
    if candidate_blocks <= budget_blocks:
        return 0
    return (-(-candidate_blocks // budget_blocks) - 1).bit_length()


@dataclass(frozen=True)
class HipPrefillCounts:
    """HiP prefill work for one sequence, one layer, one head (see :func:`hip_prefill_counts`).

    Attributes:
        key_visits: sum over query rows of the keys each row attends (QK and PV pairs).
        key_reads: sum over query blocks of the distinct keys each block loads.
        search_dots: representative dot products, summed over pooled query rows.
        rep_reads: representative keys loaded, summed over query blocks.
        selected_tokens: tokens selected by the search, summed over query blocks.
    """

    key_visits: int
    key_reads: int
    search_dots: int
    rep_reads: int
    selected_tokens: int


@functools.lru_cache(maxsize=1024)
def hip_prefill_counts(seq_len: int, cfg: HiPConfig) -> HipPrefillCounts:
    """Count HiP prefill work (DESIGN.md section 3) per layer and head, block by block.

    Query block ``[s, e)`` attends sinks ``[0, sink)``, ``min(N, G)`` selected blocks of
    ``block_size_k`` tokens, and the window ``[max(sink, s - window), e)`` causally, where
    ``N = (s - window - sink) // block_size_k`` candidate blocks and ``G = k / block_size_k``.
    Blocks with ``e <= dense_threshold`` run dense. When ``N > G`` the search costs
    ``2 * beam * G * ceil(log2(N / G))`` representative dot products per pooled query row.
    """
    bq, bk, budget = cfg.block_size_q, cfg.block_size_k, cfg.blocks_per_query_block
    sink, window, threshold = cfg.sink_tokens, cfg.window, cfg.effective_dense_threshold
    visits = reads = dots = reps = selected = 0
    for start in range(0, seq_len, bq):
        end = min(seq_len, start + bq)
        if end <= threshold:
            visits += _sum_range(start + 1, end)
            reads += end
            continue
        n_cand = max(0, start - window - sink) // bk
        sel = min(n_cand, budget) * bk
        w0 = max(sink, start - window)
        # Query at position p sees min(p + 1, sink) sinks and max(0, p + 1 - w0) window keys;
        # below, x = p + 1 runs over start + 1 .. end.
        sink_visits = _sum_range(start + 1, min(end, sink)) + sink * max(0, end - max(start, sink))
        first = max(start + 1, w0 + 1)
        window_visits = _sum_range(first - w0, end - w0)
        visits += sink_visits + (end - start) * sel + window_visits
        reads += min(end, sink) + sel + max(0, end - w0)
        levels = search_levels(n_cand, budget)
        if levels:
            per_row = 2 * cfg.beam * budget * levels
            dots += -(-(end - start) // cfg.query_pool_stride) * per_row
            reps += per_row
        selected += sel
    return HipPrefillCounts(visits, reads, dots, reps, selected)


@dataclass(frozen=True)
class HipDecodeCounts:
    """HiP work of one decode step at ``context`` cached tokens, one layer and head.

    Attributes:
        keys: KV tokens read by attention (sinks + selected + window, or all when dense).
        selected_tokens: tokens of the selected blocks (what offload may miss).
        rep_reads: representative keys the search reads when it runs (every
            ``refresh_interval`` steps).
    """

    keys: float
    selected_tokens: int
    rep_reads: int


def hip_decode_counts(context: float, cfg: HiPConfig) -> HipDecodeCounts:
    """Tokens one HiP decode step reads at ``context`` cached tokens (dense at or below the
    dense threshold), and the representatives its search reads."""
    if context <= cfg.effective_dense_threshold:
        return HipDecodeCounts(context, 0, 0)
    sink, window, bk, budget = (
        cfg.sink_tokens,
        cfg.window,
        cfg.block_size_k,
        cfg.k // cfg.block_size_k,
    )
    n_cand = int(max(0.0, context - window - sink) // bk)
    sel = min(n_cand, budget) * bk
    keys = min(context, sink) + sel + (context - max(sink, context - window))
    reps = 2 * cfg.beam * budget * search_levels(n_cand, budget)
    return HipDecodeCounts(keys, sel, reps)


# ---- operators ------------------------------------------------------------------------------


def _matmul_ops(sc: Scenario, phase: str, tokens: int) -> list[Operator]:
    """Projection and MLP matmuls of all layers over ``tokens`` rows, plus the LM head."""
    wb, ab, layers = sc.weight_bytes_per_param, sc.act_bytes, sc.model.layers
    ops = [
        Operator(
            name,
            phase,
            flops=layers * 2 * tokens * fin * fout,
            hbm_bytes=layers * (fin * fout * wb + tokens * (fin + fout) * ab),
        )
        for name, fin, fout in sc.matmuls()
    ]
    # The LM head runs on the last position of each sequence only.
    vocab, hidden = sc.vocab_per_gpu, sc.model.hidden
    ops.append(
        Operator(
            "lm_head",
            phase,
            flops=2 * sc.batch * vocab * hidden,
            hbm_bytes=vocab * hidden * wb + sc.batch * (hidden + vocab) * ab,
        )
    )
    return ops


def _attention_op(
    sc: Scenario, phase: str, name: str, visits: float, key_reads: float, q_rows: int
) -> Operator:
    """Attention over ``visits`` (query, key) pairs per head that loads ``key_reads`` KV tokens
    per KV head, for ``q_rows`` query rows per sequence; summed over layers and the batch.

    FLOPs ``4 * D * visits`` per head (QK and PV, a multiply-add each); bytes: the K/V loaded
    plus Q read and O written."""
    m = sc.model
    hq, hkv, d = sc.heads_per_gpu, sc.kv_heads_per_gpu, m.head_dim
    per_seq_flops = 4 * hq * d * visits
    kv_bytes = key_reads * 2 * hkv * d * sc.kv_bytes_per_elem
    per_seq_bytes = kv_bytes + 2 * q_rows * hq * d * sc.act_bytes
    return Operator(
        name,
        phase,
        flops=m.layers * sc.batch * per_seq_flops,
        hbm_bytes=m.layers * sc.batch * per_seq_bytes,
    )


def _search_op(sc: Scenario, phase: str, dots: float, rep_reads: float) -> Operator:
    """HiP's representative scoring: ``dots`` dot products per query head, ``rep_reads`` keys
    loaded per searching head (KV heads with ``kv_group`` sharing, else query heads)."""
    m = sc.model
    searching = sc.kv_heads_per_gpu if sc.hip.head_sharing == "kv_group" else sc.heads_per_gpu
    return Operator(
        "hip_search",
        phase,
        flops=m.layers * sc.batch * sc.heads_per_gpu * dots * 2 * m.head_dim,
        hbm_bytes=m.layers * sc.batch * rep_reads * searching * m.head_dim * sc.kv_bytes_per_elem,
    )


def _dense_prefill_attention(sc: Scenario, seq_len: int) -> Operator:
    """Causal attention: ``2 * s^2 * Hq * D`` FLOPs per layer (``s^2 / 2`` pairs, 4 FLOPs
    each); each query tile of :data:`DENSE_QUERY_TILE` rows loads the K/V it sees once."""
    tiles = -(-seq_len // DENSE_QUERY_TILE)
    key_reads = DENSE_QUERY_TILE * (tiles - 1) * tiles // 2 + seq_len
    return _attention_op(sc, "prefill", "attention", seq_len**2 / 2, key_reads, seq_len)


def _all_reduce_bytes(sc: Scenario, tokens: int) -> float:
    """Bytes each GPU sends for two ring all-reduces per layer (after o_proj and mlp_down)."""
    if sc.tp == 1:
        return 0.0
    payload = tokens * sc.model.hidden * sc.act_bytes
    return sc.model.layers * 2 * 2 * (sc.tp - 1) / sc.tp * payload


# ---- the estimate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What the model predicts for one mode at one context length.

    Attributes:
        mode: ``dense``, ``hip`` or ``hip+offload``.
        context: prompt tokens per request.
        kv_bytes: KV cache of one request at ``context`` (whole model, all GPUs).
        gpu_bytes_per_request: HBM one request needs on each GPU at ``context + output_tokens``
            (full KV for dense/hip; representatives, sinks, window and block cache for offload).
        host_bytes_per_request: host RAM one request needs (offload only, else 0).
        weight_bytes: weights on each GPU.
        max_concurrency: requests of this length that fit at once (HBM and, for offload, host).
        max_context: longest prompt one request can have (its outputs included in memory).
        fits: ``batch <= max_concurrency``.
        prefill: the batch's prompts, one pass.
        decode: one decode step of the batch, at the mean context ``decode_context``.
        decode_context: ``context + (output_tokens - 1) / 2``, the mean KV length over steps.
        decode_total_s: ``output_tokens x decode.time_s``.
        context_switch_s: moving one request's GPU-resident state at ``context`` over the
            host link (each GPU its own shard, in parallel).
    """

    mode: str
    context: int
    kv_bytes: float
    gpu_bytes_per_request: float
    host_bytes_per_request: float
    weight_bytes: float
    max_concurrency: int
    max_context: int
    fits: bool
    prefill: PhaseCost
    decode: PhaseCost
    decode_context: float
    decode_total_s: float
    context_switch_s: float
    batch: int

    @property
    def decode_ms_per_token(self) -> float:
        """Latency of one decode step, per sequence."""
        return self.decode.time_s * 1e3

    @property
    def decode_tokens_per_s(self) -> float:
        """Batch decode throughput."""
        return self.batch / self.decode.time_s

    def to_dict(self, gpu: GPUSpec) -> dict[str, Any]:
        """Plain data for JSON; ``gpu`` (with efficiency applied) times the operators."""
        return {
            "mode": self.mode,
            "context": self.context,
            "kv_bytes": self.kv_bytes,
            "gpu_bytes_per_request": self.gpu_bytes_per_request,
            "host_bytes_per_request": self.host_bytes_per_request,
            "weight_bytes": self.weight_bytes,
            "max_concurrency": self.max_concurrency,
            "max_context": self.max_context,
            "fits": self.fits,
            "prefill_s": self.prefill.time_s,
            "prefill_bound": self.prefill.bound,
            "decode_context": self.decode_context,
            "decode_ms_per_token": self.decode_ms_per_token,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_total_s": self.decode_total_s,
            "decode_bound": self.decode.bound,
            "context_switch_s": self.context_switch_s,
            "prefill": self.prefill.to_dict(gpu),
            "decode": self.decode.to_dict(gpu),
        }


def gpu_bytes_per_token(sc: Scenario, mode: Mode) -> float:
    """HBM per cached token of one request on one GPU that grows with context."""
    if mode == "dense":
        return sc.kv_bytes_per_token_per_gpu
    if mode == "hip":
        extra = sc.rep_bytes_per_token_per_gpu if sc.hip.representative == "mean" else 0.0
        return sc.kv_bytes_per_token_per_gpu + extra
    return sc.rep_bytes_per_token_per_gpu


def gpu_bytes_per_request(sc: Scenario, mode: Mode, tokens: int) -> float:
    """HBM one request of ``tokens`` cached tokens holds on one GPU.

    ``hip`` with ``representative="center"`` reads the center key in place (no extra storage);
    with ``"mean"`` it stores one extra key per block. ``hip+offload`` keeps the
    representatives of every block, plus sinks, window and the block cache."""
    if mode != "hip+offload":
        return tokens * gpu_bytes_per_token(sc, mode)
    cfg, cache = sc.hip, sc.offload.block_cache_tokens
    resident = min(tokens, cfg.sink_tokens + cfg.window + cache)
    return resident * sc.kv_bytes_per_token_per_gpu + tokens * sc.rep_bytes_per_token_per_gpu


def max_context(sc: Scenario, mode: Mode) -> int:
    """Longest prompt one request can have in ``mode`` with its outputs still fitting: HBM
    bound for dense/hip; host RAM (and the representatives' HBM) for ``hip+offload``."""
    free, out = sc.hbm_free, sc.output_tokens
    if free <= 0:
        return 0
    if mode != "hip+offload":
        return max(0, _floor(free / gpu_bytes_per_token(sc, mode)) - out)
    cfg = sc.hip
    fixed = (cfg.sink_tokens + cfg.window + sc.offload.block_cache_tokens) * (
        sc.kv_bytes_per_token_per_gpu
    )
    by_hbm = _floor((free - fixed) / sc.rep_bytes_per_token_per_gpu) if free > fixed else 0
    by_host = _floor(sc.offload.host_ram / sc.kv_bytes_per_token)
    return max(0, min(by_hbm, by_host) - out)


def _prefill(sc: Scenario, mode: Mode, seq_len: int) -> PhaseCost:
    tokens = sc.batch * seq_len
    ops = _matmul_ops(sc, "prefill", tokens)
    host = 0.0
    if mode == "dense" or seq_len <= sc.hip.effective_dense_threshold:
        ops.append(_dense_prefill_attention(sc, seq_len))
        if mode == "hip+offload":
            host = tokens * sc.kv_bytes_per_token_per_gpu
    else:
        c = hip_prefill_counts(seq_len, sc.hip)
        ops.append(_search_op(sc, "prefill", c.search_dots, c.rep_reads))
        ops.append(
            _attention_op(sc, "prefill", "hip_attention", c.key_visits, c.key_reads, seq_len)
        )
        if mode == "hip+offload":
            # Device->host: the whole KV once; host->device: missed selected blocks. The link
            # is full duplex, so the larger direction counts.
            write = tokens * sc.kv_bytes_per_token_per_gpu
            fetch = (
                sc.batch * sc.offload.miss_rate * c.selected_tokens * sc.kv_bytes_per_token_per_gpu
            )
            host = max(write, fetch)
    return phase_cost("prefill", ops, sc.peak, host, _all_reduce_bytes(sc, tokens))


def _decode_step(sc: Scenario, mode: Mode, context: float) -> PhaseCost:
    ops = _matmul_ops(sc, "decode", sc.batch)
    host = 0.0
    if mode == "dense":
        ops.append(_attention_op(sc, "decode", "attention", context, context, 1))
    else:
        c = hip_decode_counts(context, sc.hip)
        refresh = sc.hip.refresh_interval
        if c.rep_reads:
            # The search runs every refresh_interval steps; its cost is spread over them.
            ops.append(_search_op(sc, "decode", c.rep_reads / refresh, c.rep_reads / refresh))
        ops.append(_attention_op(sc, "decode", "hip_attention", c.keys, c.keys, 1))
        if mode == "hip+offload":
            host = (
                sc.batch * sc.offload.miss_rate * c.selected_tokens * sc.kv_bytes_per_token_per_gpu
            )
    return phase_cost("decode", ops, sc.peak, host, _all_reduce_bytes(sc, sc.batch))


def estimate(sc: Scenario, mode: Mode, context: int) -> Estimate:
    """Predict memory, prefill, decode and context switch for ``mode`` at ``context`` tokens.

    Raises:
        ValueError: unknown mode or a context below 1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    total = context + sc.output_tokens
    per_request = gpu_bytes_per_request(sc, mode, total)
    free = sc.hbm_free
    concurrency = _floor(free / per_request) if free > 0 else 0
    host_per_request = 0.0
    if mode == "hip+offload":
        host_per_request = total * sc.kv_bytes_per_token
        concurrency = min(concurrency, _floor(sc.offload.host_ram / host_per_request))
    decode_context = context + (sc.output_tokens - 1) / 2
    decode = _decode_step(sc, mode, decode_context)
    return Estimate(
        mode=mode,
        context=context,
        kv_bytes=context * sc.kv_bytes_per_token,
        gpu_bytes_per_request=per_request,
        host_bytes_per_request=host_per_request,
        weight_bytes=sc.weight_bytes,
        max_concurrency=concurrency,
        max_context=max_context(sc, mode),
        fits=concurrency >= sc.batch,
        prefill=_prefill(sc, mode, context),
        decode=decode,
        decode_context=decode_context,
        decode_total_s=sc.output_tokens * decode.time_s,
        context_switch_s=gpu_bytes_per_request(sc, mode, context) / sc.peak.host_link,
        batch=sc.batch,
    )
