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

SECTOR_BYTES = 32
"""DRAM/L2 transaction unit of NVIDIA GPUs (CUDA C++ Best Practices Guide, "Coalesced Access to
Global Memory": 32-byte segments)."""

GATHER_OVERHEAD_BYTES = 128
"""Bytes of bandwidth a random run costs beyond its sectors (a DRAM row activation and bus
turnaround, taken as four sectors): the half-efficiency run is 128 B (docs/roofline.md)."""

SPARSE_DEPENDENT_LOADS = 1
"""Dependent round trips of the sparse attention kernel beyond the launch: its row of the
selection (the block count and the indices), before the first gathered key can be requested."""

RANK_STAGE_S = 20e-9
"""Seconds of one compare-exchange stage of the search's in-register bitonic top-k (a shuffle or
shared-memory exchange and a barrier, ~35 cycles at ~1.7 GHz)."""


@dataclass(frozen=True)
class LaunchProfile:
    """Kernel launches per layer of each attention path (docs/roofline.md, "Latency floors").

    ``today`` counts what ``hip_attn.hip_attention`` launches on a GPU in bf16
    (``tests/test_perf_launches.py`` recounts it from the code): a decode step runs the sparse
    kernel, whose flash-decoding splits (which a one-token decode takes at batch 1) are merged
    by the last of them to finish; a refreshing step also searches, in a launch whose last
    column of programs extends the summary tree by the completed blocks beside the search
    (``hip_attn.triton_kernels.mask.extends_beside``; a refresh whose candidates reach past the
    tree's blocks, more than ``window`` tokens after the last one, extends it in a launch
    first); a prefill zeroes the tree's allocation and builds it with two launches of the tree
    kernel (every run of 32 blocks up to its root in parallel, then the levels above) before
    searching and attending: 5 for a whole prompt of at least 64 candidate blocks (a chunk that
    extends the tree in place skips the allocation; one that grows it copies each level over).
    ``fused`` is one search kernel and one attention kernel, what a fully fused path would
    launch: a decode step now launches as it counts.

    Attributes:
        name: ``today``, ``fused`` or a label.
        hip_decode_reuse: launches of a decode step that reuses the selection.
        hip_decode_refresh: launches of a decode step that searches.
        hip_prefill: launches of one prefill pass (or chunk).
        dense_decode, dense_prefill: launches of dense attention (one flash kernel).
    """

    name: str
    hip_decode_reuse: int
    hip_decode_refresh: int
    hip_prefill: int
    dense_decode: int = 1
    dense_prefill: int = 1


LAUNCH_PROFILES: dict[str, LaunchProfile] = {
    p.name: p for p in (LaunchProfile("today", 1, 2, 5), LaunchProfile("fused", 1, 2, 2))
}


def gather_efficiency(run_bytes: float) -> float:
    """Fraction of HBM bandwidth reached by random runs of ``run_bytes`` contiguous bytes:
    ``run / (ceil(run / 32) * 32 + 128)`` (2 KB blocks: 0.94, one 256-byte key: 0.67)."""
    sectors = -(-run_bytes // SECTOR_BYTES) * SECTOR_BYTES
    return run_bytes / (sectors + GATHER_OVERHEAD_BYTES)


def bitonic_stages(elements: int) -> int:
    """Compare-exchange stages of a bitonic sort of ``elements`` (a power of two)."""
    t = max(1, elements - 1).bit_length()
    return t * (t + 1) // 2


def _floor(x: float) -> int:
    """``floor`` that forgives float round-off just below an integer."""
    return max(0, math.floor(x + 1e-9))


@dataclass(frozen=True)
class OffloadConfig:
    """Settings of ``hip+offload``.

    Attributes:
        host_ram: pinned host memory available for KV caches, bytes (all requests, all GPUs).
        block_cache_tokens: GPU block-cache size per request, in tokens (every layer and KV head
            has that many slots); must hold what one query block needs at once
            (``HiPConfig.offload_cache_blocks``: the ``k`` selected tokens, or with
            ``leaf_scores="keys"`` the leaf candidates).
        miss_rate: fraction of the selected KV bytes a decode step (or a prefill query block)
            fetches from host memory; with ``leaf_scores="keys"`` also the key bytes of the
            leaf candidates it does not select (:func:`leaf_candidates`; their values stay on
            the host), a decode step's once per refresh.
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
        launches: kernel launches per layer of each attention path.
        prefill_chunk: prompt tokens per prefill pass (``None``: the whole prompt at once).
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
    launches: LaunchProfile = LAUNCH_PROFILES["today"]
    prefill_chunk: int | None = None

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
        chunk = self.prefill_chunk
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"prefill chunk must be a positive int, got {chunk!r}")
        m = self.model
        if m.heads % self.tp:
            raise ValueError(f"tensor-parallel degree {self.tp} must divide {m.heads} heads")
        if m.kv_heads % self.tp:
            # transformers' get_kv_heads_per_rank: KV heads are sharded, never replicated.
            raise ValueError(
                f"tensor-parallel degree {self.tp} must divide {m.kv_heads} KV heads "
                "(transformers shards k_proj/v_proj colwise and refuses uneven KV heads)"
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
        """KV heads held by each GPU: ``Hkv / tp`` (k_proj, v_proj colwise)."""
        return self.model.kv_heads // self.tp

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
        """Weights stored on one GPU: matmuls, LM head shard, embedding, norms.

        transformers' Llama tp_plan shards the projections and the LM head (colwise, output
        gathered) and leaves ``embed_tokens`` and the norms whole on every rank; a tied LM head
        is that replicated embedding."""
        m = self.model
        embedding = m.vocab * m.hidden
        lm_head = 0 if m.tied_embeddings else self.lm_head_params_per_gpu
        params = self.matmul_params_per_gpu + lm_head + embedding + self.model.norm_params
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
        """HiP's search summary tree: per ``block_size_k`` tokens about two nodes (one per
        level, halving) of ``1.5 * D`` values (:data:`SUMMARY_VECTORS`), i.e. 3/8 of the keys'
        bytes at ``block_size_k = 8``."""
        m = self.model
        key_bytes = m.layers * self.kv_heads_per_gpu * m.head_dim * self.kv_bytes_per_elem
        return 2 * SUMMARY_VECTORS * key_bytes / self.hip.block_size_k

    def prefill_chunks(self, seq_len: int) -> int:
        """Prefill passes of a ``seq_len``-token prompt."""
        chunk = self.prefill_chunk
        return 1 if chunk is None else -(-seq_len // chunk)

    @property
    def activation_bytes_per_token(self) -> float:
        """Peak transient activation bytes per prompt token on one GPU during prefill.

        The larger of the MLP and attention moments of a transformers Llama layer:
        ``down(act(gate(x)) * up(x))`` holds ``act(gate)``, ``up`` and their product (3 I/tp)
        besides the residual stream and the normed input (2 h); attention holds q, k, v and
        their rotated copies and its output (``(3 Hq + 4 Hkv) D / tp``) besides the same 2 h."""
        m = self.model
        inter = -(-m.intermediate // self.tp)
        mlp = (3 if m.gated_mlp else 2) * inter
        attn = (3 * self.heads_per_gpu + 4 * self.kv_heads_per_gpu) * m.head_dim
        return (max(mlp, attn) + 2 * m.hidden) * self.act_bytes

    def activation_bytes(self, seq_len: int, requests: int) -> float:
        """Peak activation bytes of prefilling ``requests`` prompts of ``seq_len`` tokens (one
        chunk of each at a time with ``prefill_chunk``)."""
        tokens = seq_len if self.prefill_chunk is None else min(seq_len, self.prefill_chunk)
        return requests * tokens * self.activation_bytes_per_token


# ---- HiP token counts -----------------------------------------------------------------------


def _sum_range(lo: int, hi: int) -> int:
    """``lo + (lo + 1) + ... + hi``; 0 when empty."""
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def search_width(candidate_blocks: int, budget_blocks: int, beam: int = 1) -> int:
    """Nodes the levels before the last keep (``hip_attn.geometry.search_width``):
    ``beam * G``, at least the set bits of ``N``, at most ``N``."""
    return min(candidate_blocks, max(beam * budget_blocks, candidate_blocks.bit_count()))


def search_levels(candidate_blocks: int, budget_blocks: int, beam: int = 1) -> int:
    """Tree levels until every node is one block (0 when N <= G): the smallest ``L`` whose
    aligned ``2**L``-block nodes plus the remainder's pieces number at most the search width
    (:func:`search_width`), and at least one (``hip_attn.geometry.search_levels``; about
    ``ceil(log2(N / (beam G)))``)."""
    if candidate_blocks <= budget_blocks:
        return 0
    width = search_width(candidate_blocks, budget_blocks, beam)
    level, pieces = 0, 0
    while (candidate_blocks >> level) + pieces > width:
        pieces += (candidate_blocks >> level) & 1
        level += 1
    return max(1, level)


#: Key-sized vectors (``D`` values) in one node summary: the mean, then one variance per
#: dimension pair (``hip_attn.geometry.summary_width``).
SUMMARY_VECTORS = 1.5


def search_vectors(candidate_blocks: int, cfg: HiPConfig) -> float:
    """Key-sized vectors one search loads, at most: a summary (:data:`SUMMARY_VECTORS`) per
    child it scores (:func:`search_estimates`), a last-level child's ``block_size_k`` keys
    instead with ``leaf_scores="keys"`` (the accuracy harness's ``select reads``, rounded up)."""
    budget, n = cfg.blocks_per_query_block, candidate_blocks
    levels = search_levels(n, budget, cfg.beam)
    if not levels:
        return 0.0
    children = 2 * search_width(n, budget, cfg.beam)
    leaf = cfg.block_size_k if cfg.leaf_scores == "keys" else SUMMARY_VECTORS
    return SUMMARY_VECTORS * children * (levels - 1) + min(n, children) * leaf


def search_estimates(candidate_blocks: int, cfg: HiPConfig) -> float:
    """Node estimates one search makes per pooled query row, at most (two dot products of
    ``D`` each): two children per node of the search width per level (:func:`search_levels`),
    the last level's at most ``N`` (single blocks). With ``leaf_scores="keys"`` a child of the
    last level takes its ``block_size_k`` keys' dot products instead of two:
    ``block_size_k / 2`` estimates' worth."""
    budget, n = cfg.blocks_per_query_block, candidate_blocks
    levels = search_levels(n, budget, cfg.beam)
    if not levels:
        return 0
    children = 2 * search_width(n, budget, cfg.beam)
    leaves = min(n, children) * (cfg.block_size_k / 2 if cfg.leaf_scores == "keys" else 1)
    return children * (levels - 1) + leaves


def leaf_candidates(candidate_blocks: int, cfg: HiPConfig) -> int:
    """Blocks whose keys one search reads with ``leaf_scores="keys"`` (the last level's
    children, at most ``min(N, 2 * width)``; 0 with summary leaves or without a search): what
    the offloaded path fetches into its block cache before ranking them, the ``G`` it selects
    among them."""
    budget, n = cfg.blocks_per_query_block, candidate_blocks
    if cfg.leaf_scores != "keys" or not search_levels(n, budget, cfg.beam):
        return 0
    return min(n, 2 * search_width(n, budget, cfg.beam))


def _unselected_leaves(candidate_blocks: int, cfg: HiPConfig) -> int:
    """Leaf candidates a search ranks but does not select (it selects ``G`` of them)."""
    candidates = leaf_candidates(candidate_blocks, cfg)
    return candidates - cfg.blocks_per_query_block if candidates else 0


@dataclass(frozen=True)
class HipPrefillCounts:
    """HiP prefill work for one sequence, one layer, one head (see :func:`hip_prefill_counts`).

    Attributes:
        key_visits: sum over query rows of the keys each row attends (QK and PV pairs).
        key_reads: sum over query blocks of the distinct keys each block loads.
        search_dots: node estimates (two dot products of ``D`` each), summed over pooled query rows.
        rep_reads: key-sized vectors the searches load (:func:`search_vectors`), summed over
            query blocks.
        selected_tokens: tokens selected by the search, summed over query blocks.
        leaf_tokens: tokens of the leaf candidates the search reads the keys of but does not
            select, summed over query blocks (:func:`leaf_candidates` less ``G`` blocks).
    """

    key_visits: int
    key_reads: int
    search_dots: float
    rep_reads: float
    selected_tokens: int
    leaf_tokens: int = 0


@functools.lru_cache(maxsize=1024)
def hip_prefill_counts(seq_len: int, cfg: HiPConfig) -> HipPrefillCounts:
    """Count HiP prefill work (DESIGN.md section 3) per layer and head, block by block.

    Query block ``[s, e)`` attends sinks ``[0, sink)``, ``min(N, G)`` selected blocks of
    ``block_size_k`` tokens, and the window ``[max(sink, s - window), e)`` causally, where
    ``N = (s - window - sink) // block_size_k`` candidate blocks and ``G = k / block_size_k``.
    Blocks with ``e <= dense_threshold`` run dense. When ``N > G`` the search costs at most
    ``2 * width`` node estimates per level and pooled query row (:func:`search_estimates`),
    reading :func:`search_vectors` key-sized vectors.
    """
    bq, bk, budget = cfg.block_size_q, cfg.block_size_k, cfg.blocks_per_query_block
    sink, window, threshold = cfg.sink_tokens, cfg.window, cfg.effective_dense_threshold
    visits = reads = selected = leaf = 0
    dots = reps = 0.0
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
        dots += -(-(end - start) // cfg.query_pool_stride) * search_estimates(n_cand, cfg)
        reps += search_vectors(n_cand, cfg)
        selected += sel
        leaf += _unselected_leaves(n_cand, cfg) * bk
    return HipPrefillCounts(visits, reads, dots, reps, selected, leaf)


@dataclass(frozen=True)
class HipDecodeCounts:
    """HiP work of one decode step at ``context`` cached tokens, one layer and head.

    Attributes:
        keys: KV tokens read by attention (sinks + selected + window, or all when dense).
        selected_tokens: tokens of the selected blocks (what offload may miss).
        rep_reads: key-sized vectors the search reads when it runs (every
            ``refresh_interval`` steps; :func:`search_vectors`).
        search_estimates: node estimates it makes per query row then
            (:func:`search_estimates`).
        leaf_tokens: tokens of the leaf candidates the search reads the keys of but does not
            select when it runs (:func:`leaf_candidates` less ``G`` blocks).
    """

    keys: float
    selected_tokens: int
    rep_reads: float
    search_estimates: float = 0.0
    leaf_tokens: int = 0


def hip_decode_counts(context: float, cfg: HiPConfig) -> HipDecodeCounts:
    """Tokens one HiP decode step reads at ``context`` cached tokens (dense at or below the
    dense threshold), and what its search reads and estimates."""
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
    leaf = _unselected_leaves(n_cand, cfg) * bk
    return HipDecodeCounts(
        keys, sel, search_vectors(n_cand, cfg), search_estimates(n_cand, cfg), leaf
    )


# ---- operators ------------------------------------------------------------------------------


def _matmul_ops(sc: Scenario, phase: str, tokens: int, passes: int = 1) -> list[Operator]:
    """Projection and MLP matmuls of all layers over ``tokens`` rows in ``passes`` passes (each
    reads the weights), plus the LM head."""
    wb, ab, layers = sc.weight_bytes_per_param, sc.act_bytes, sc.model.layers
    ops = [
        Operator(
            name,
            phase,
            flops=layers * 2 * tokens * fin * fout,
            hbm_bytes=layers * (passes * fin * fout * wb + tokens * (fin + fout) * ab),
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
    sc: Scenario,
    phase: str,
    name: str,
    visits: float,
    key_reads: float,
    q_rows: int,
    *,
    gathered: float = 0.0,
    latency_s: float = 0.0,
    kernels: float = 0.0,
) -> Operator:
    """Attention over ``visits`` (query, key) pairs per head that loads ``key_reads`` KV tokens
    per KV head, ``gathered`` of them in random ``block_size_k``-token blocks, for ``q_rows``
    query rows per sequence; summed over layers and the batch. ``latency_s`` and ``kernels``
    are per layer.

    FLOPs ``4 * D * visits`` per head (QK and PV, a multiply-add each); bytes: the K/V loaded
    (gathered blocks at their :func:`gather_efficiency`) plus Q read and O written."""
    m = sc.model
    hq, hkv, d = sc.heads_per_gpu, sc.kv_heads_per_gpu, m.head_dim
    per_seq_flops = 4 * hq * d * visits
    token_bytes = 2 * hkv * d * sc.kv_bytes_per_elem
    eff = gather_efficiency(sc.hip.block_size_k * d * sc.kv_bytes_per_elem)
    kv_bytes = (key_reads - gathered + gathered / eff) * token_bytes
    per_seq_bytes = kv_bytes + 2 * q_rows * hq * d * sc.act_bytes
    return Operator(
        name,
        phase,
        flops=m.layers * sc.batch * per_seq_flops,
        hbm_bytes=m.layers * sc.batch * per_seq_bytes,
        latency_s=m.layers * latency_s,
        kernels=m.layers * kernels,
    )


def _search_chain_s(sc: Scenario, levels: int) -> float:
    """The search kernel's dependent chain: per level one gather of node summaries and a
    bitonic top-k over ``2 x NODES`` children (the candidate count comes from the launch's
    arguments)."""
    if not levels:
        return 0.0
    nodes = max(16, 1 << (sc.hip.beam * sc.hip.blocks_per_query_block - 1).bit_length())
    per_level = sc.peak.memory_latency + bitonic_stages(2 * nodes) * RANK_STAGE_S
    return levels * per_level


def _search_op(
    sc: Scenario, phase: str, dots: float, rep_reads: float, latency_s: float, kernels: float
) -> Operator:
    """HiP's node scoring: ``dots`` estimates per query head (``2 * D`` multiply-adds each: the
    variance dot runs over every dimension), ``rep_reads`` key-sized vectors loaded per
    searching head (KV heads with ``kv_group`` sharing, else query heads), in random runs of a
    summary's ``1.5 * D`` elements (exact leaves' key blocks are longer runs, counted at the
    summaries' efficiency: :func:`search_vectors`); ``latency_s`` and ``kernels`` per layer."""
    m = sc.model
    searching = sc.kv_heads_per_gpu if sc.hip.head_sharing == "kv_group" else sc.heads_per_gpu
    vector_bytes = m.head_dim * sc.kv_bytes_per_elem
    summary_bytes = SUMMARY_VECTORS * vector_bytes
    return Operator(
        "hip_search",
        phase,
        flops=m.layers * sc.batch * sc.heads_per_gpu * dots * 4 * m.head_dim,
        hbm_bytes=m.layers
        * sc.batch
        * rep_reads
        * searching
        * vector_bytes
        / gather_efficiency(summary_bytes),
        latency_s=m.layers * latency_s,
        kernels=m.layers * kernels,
    )


def _summary_tree_op(sc: Scenario, context: float) -> Operator:
    """The search summary tree's upkeep (``hip_attn.geometry.node_summaries``). A prefill builds
    it from the whole K: K read (``b_kv`` per element; the variance pass reads a block again
    while it is in cache), 4 FLOPs per element (the sum, then a difference squared and summed),
    about ``3 / bk`` summary elements per key element zeroed at allocation (two nodes of
    :data:`SUMMARY_VECTORS` ``* D`` per block) and as many written, and those above the leaves
    read again one level up (``1.5 / bk``). Decode extends it by the
    block a step completes (kept in the decode state): nothing that grows with the context,
    counted as free. Its launches are in the :class:`LaunchProfile` counts."""
    m, b, bk = sc.model, sc.kv_bytes_per_elem, sc.hip.block_size_k
    elems = context * sc.kv_heads_per_gpu * m.head_dim
    return Operator(
        "hip_representatives",
        "prefill",
        flops=m.layers * sc.batch * elems * 4,
        hbm_bytes=m.layers * sc.batch * elems * b * (1 + 5 * SUMMARY_VECTORS / bk),
    )


def _dense_prefill_attention(sc: Scenario, seq_len: int) -> Operator:
    """Causal attention: ``2 * s^2 * Hq * D`` FLOPs per layer (``s^2 / 2`` pairs, 4 FLOPs
    each); each query tile of :data:`DENSE_QUERY_TILE` rows loads the K/V it sees once."""
    tiles = -(-seq_len // DENSE_QUERY_TILE)
    key_reads = DENSE_QUERY_TILE * (tiles - 1) * tiles // 2 + seq_len
    launches = sc.launches.dense_prefill * sc.prefill_chunks(seq_len)
    return _attention_op(
        sc, "prefill", "attention", seq_len**2 / 2, key_reads, seq_len,
        latency_s=launches * sc.peak.launch_latency, kernels=launches,
    )  # fmt: skip


def _collective_bytes(sc: Scenario, tokens: int, lm_rows: int) -> float:
    """Bytes each GPU sends: two ring all-reduces of the hidden state per layer (after the
    rowwise o_proj and down_proj) over ``tokens`` rows, and the all-gather of the colwise LM
    head's logits over ``lm_rows`` rows (transformers' ``colwise_gather_output``)."""
    if sc.tp == 1:
        return 0.0
    share = (sc.tp - 1) / sc.tp
    all_reduce = sc.model.layers * 2 * 2 * share * tokens * sc.model.hidden * sc.act_bytes
    return all_reduce + share * lm_rows * sc.model.vocab * sc.act_bytes


# ---- the estimate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What the model predicts for one mode at one context length.

    Attributes:
        mode: ``dense``, ``hip`` or ``hip+offload``.
        context: prompt tokens per request.
        kv_bytes: KV cache of one request at ``context`` (whole model, all GPUs).
        gpu_bytes_per_request: HBM one request needs on each GPU at ``context + output_tokens``
            (the KV for dense; the KV and the summary tree for hip; the summary tree, sinks,
            window and block cache for offload).
        host_bytes_per_request: host RAM one request needs (offload only, else 0).
        weight_bytes: weights on each GPU.
        max_concurrency: requests of this length that fit at once (HBM and, for offload, host),
            with room left for one request's prefill activations.
        max_context: longest prompt one request can have (its outputs and its prefill
            activations included in memory).
        fits: ``batch <= max_concurrency`` and weights + the batch's state + its prefill
            activations fit in HBM.
        prefill: the batch's prompts, one pass.
        decode: one decode step of the batch, at the mean context ``decode_context``.
        decode_context: ``context + (output_tokens - 1) / 2``, the mean KV length over steps.
        decode_total_s: ``output_tokens x decode.time_s``.
        context_switch_s: moving one request's GPU-resident state at ``context`` over the
            host link (each GPU its own shard, in parallel).
        batch: requests prefilled and decoded together.
        activation_bytes: peak prefill activations of the batch on each GPU (one chunk each).
        peak_bytes: weights + the batch's HBM state + ``activation_bytes``, per GPU.
        prefill_chunks: prefill passes per prompt.
        trained_context: the model's trained context (``max_position_embeddings``), if known.
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
    activation_bytes: float = 0.0
    peak_bytes: float = 0.0
    prefill_chunks: int = 1
    trained_context: int | None = None

    @property
    def beyond_trained_context(self) -> bool:
        """The prompt and its outputs (``2 x decode_context - context + 1`` tokens) run past
        the model's trained context."""
        final = 2 * self.decode_context - self.context + 1
        return self.trained_context is not None and final > self.trained_context

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
            "activation": self.activation_bytes,
            "peak_bytes": self.peak_bytes,
            "prefill_chunks": self.prefill_chunks,
            "beyond_trained_context": self.beyond_trained_context,
            "prefill_latency_s": self.prefill.latency_s,
            "decode_latency_s": self.decode.latency_s,
            "prefill": self.prefill.to_dict(gpu),
            "decode": self.decode.to_dict(gpu),
        }


def gpu_bytes_per_token(sc: Scenario, mode: Mode) -> float:
    """HBM per cached token of one request on one GPU that grows with context."""
    if mode == "dense":
        return sc.kv_bytes_per_token_per_gpu
    if mode == "hip":
        return sc.kv_bytes_per_token_per_gpu + sc.rep_bytes_per_token_per_gpu
    return sc.rep_bytes_per_token_per_gpu


def gpu_bytes_per_request(sc: Scenario, mode: Mode, tokens: int) -> float:
    """HBM one request of ``tokens`` cached tokens holds on one GPU.

    ``hip`` keeps the search's summary tree beside the full KV (the decode state extends it
    instead of rebuilding it). ``hip+offload`` keeps the summary tree, the sinks, the window and
    the block cache."""
    if mode != "hip+offload":
        return tokens * gpu_bytes_per_token(sc, mode)
    cfg, cache = sc.hip, sc.offload.block_cache_tokens
    resident = min(tokens, cfg.sink_tokens + cfg.window + cache)
    return resident * sc.kv_bytes_per_token_per_gpu + tokens * sc.rep_bytes_per_token_per_gpu


def max_context(sc: Scenario, mode: Mode) -> int:
    """Longest prompt one request can have in ``mode`` with its outputs and its prefill
    activations still fitting: HBM bound for dense/hip; host RAM (and the summary tree's
    HBM) for ``hip+offload``. Unchunked, the activations grow with the prompt; with
    ``prefill_chunk`` they are those of one chunk."""
    free, out = sc.hbm_free, sc.output_tokens
    if free <= 0:
        return 0
    per_token = gpu_bytes_per_token(sc, mode)
    fixed = out * per_token
    if mode == "hip+offload":
        cfg = sc.hip
        fixed = (cfg.sink_tokens + cfg.window + sc.offload.block_cache_tokens) * (
            sc.kv_bytes_per_token_per_gpu
        ) + out * per_token
    act = sc.activation_bytes_per_token
    by_hbm = _floor((free - fixed) / (per_token + act)) if free > fixed else 0
    chunk = sc.prefill_chunk
    if chunk is not None and by_hbm > chunk:
        room = free - fixed - chunk * act
        by_hbm = max(chunk, _floor(room / per_token)) if room > 0 else by_hbm
    if mode != "hip+offload":
        return by_hbm
    by_host = _floor(sc.offload.host_ram / sc.kv_bytes_per_token) - out
    return max(0, min(by_hbm, by_host))


def _prefill(sc: Scenario, mode: Mode, seq_len: int) -> PhaseCost:
    tokens = sc.batch * seq_len
    chunks = sc.prefill_chunks(seq_len)
    ops = _matmul_ops(sc, "prefill", tokens, chunks)
    host = 0.0
    if mode == "dense" or seq_len <= sc.hip.effective_dense_threshold:
        ops.append(_dense_prefill_attention(sc, seq_len))
        if mode == "hip+offload":
            host = tokens * sc.kv_bytes_per_token_per_gpu
    else:
        c = hip_prefill_counts(seq_len, sc.hip)
        launch, mem = sc.peak.launch_latency, sc.peak.memory_latency
        launches = chunks * sc.launches.hip_prefill
        levels = search_levels(
            max(0, seq_len - sc.hip.window - sc.hip.sink_tokens) // sc.hip.block_size_k,
            sc.hip.blocks_per_query_block,
            sc.hip.beam,
        )
        # The search kernel's launch is its; the rest of the launches go to attention.
        ops.append(
            _search_op(
                sc, "prefill", c.search_dots, c.rep_reads,
                chunks * (launch + _search_chain_s(sc, levels)), chunks,
            )
        )  # fmt: skip
        ops.append(_summary_tree_op(sc, seq_len))  # offload builds it on append too
        ops.append(
            _attention_op(
                sc, "prefill", "hip_attention", c.key_visits, c.key_reads, seq_len,
                gathered=c.selected_tokens,
                latency_s=(launches - chunks) * launch + chunks * SPARSE_DEPENDENT_LOADS * mem,
                kernels=launches - chunks,
            )
        )  # fmt: skip
        if mode == "hip+offload":
            # Device->host: the whole KV once; host->device: missed selected blocks and the
            # keys (half the KV bytes) of the other leaf candidates. The link is full duplex,
            # so the larger direction counts.
            write = tokens * sc.kv_bytes_per_token_per_gpu
            fetched = c.selected_tokens + c.leaf_tokens / 2
            fetch = sc.batch * sc.offload.miss_rate * fetched * sc.kv_bytes_per_token_per_gpu
            host = max(write, fetch)
    return phase_cost("prefill", ops, sc.peak, host, _collective_bytes(sc, tokens, sc.batch))


def _decode_step(sc: Scenario, mode: Mode, context: float) -> PhaseCost:
    ops = _matmul_ops(sc, "decode", sc.batch)
    host = 0.0
    launch, mem = sc.peak.launch_latency, sc.peak.memory_latency
    lp = sc.launches
    if mode == "dense" or context <= sc.hip.effective_dense_threshold:
        ops.append(
            _attention_op(
                sc, "decode", "attention", context, context, 1,
                latency_s=lp.dense_decode * launch, kernels=lp.dense_decode,
            )
        )  # fmt: skip
    else:
        c = hip_decode_counts(context, sc.hip)
        refresh = sc.hip.refresh_interval
        if c.rep_reads:
            # The search runs every refresh_interval steps, with the launches a refreshing
            # step adds; its cost is spread over the steps.
            levels = search_levels(
                int(max(0.0, context - sc.hip.window - sc.hip.sink_tokens) // sc.hip.block_size_k),
                sc.hip.blocks_per_query_block,
                sc.hip.beam,
            )
            extra = lp.hip_decode_refresh - lp.hip_decode_reuse
            ops.append(
                _search_op(
                    sc, "decode", c.search_estimates / refresh, c.rep_reads / refresh,
                    (extra * launch + _search_chain_s(sc, levels)) / refresh, extra / refresh,
                )
            )  # fmt: skip
        ops.append(
            _attention_op(
                sc, "decode", "hip_attention", c.keys, c.keys, 1,
                gathered=c.selected_tokens,
                latency_s=lp.hip_decode_reuse * launch + SPARSE_DEPENDENT_LOADS * mem,
                kernels=lp.hip_decode_reuse,
            )
        )  # fmt: skip
        if mode == "hip+offload":  # the other leaf candidates' keys come once per refresh
            fetched = c.selected_tokens + c.leaf_tokens / 2 / refresh
            host = sc.batch * sc.offload.miss_rate * fetched * sc.kv_bytes_per_token_per_gpu
    return phase_cost("decode", ops, sc.peak, host, _collective_bytes(sc, sc.batch, sc.batch))


def _check_block_cache(sc: Scenario) -> None:
    """The block cache must hold what one offloaded query block needs at once
    (``HiPConfig.offload_cache_blocks``)."""
    m = sc.model
    blocks, why = sc.hip.offload_cache_blocks(m.heads // m.kv_heads)
    if sc.offload.block_cache_tokens < blocks * sc.hip.block_size_k:
        raise ValueError(
            f"block cache ({sc.offload.block_cache_tokens} tokens, --block-cache) must hold the "
            f"{blocks * sc.hip.block_size_k} tokens one query block needs at once ({why}, of "
            "block_size_k tokens)"
        )


def estimate(sc: Scenario, mode: Mode, context: int) -> Estimate:
    """Predict memory, prefill, decode and context switch for ``mode`` at ``context`` tokens.

    Raises:
        ValueError: unknown mode, a context below 1, or for ``hip+offload`` a block cache
            smaller than one query block needs at once (``HiPConfig.offload_cache_blocks``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "hip+offload":
        _check_block_cache(sc)
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    total = context + sc.output_tokens
    per_request = gpu_bytes_per_request(sc, mode, total)
    activation = sc.activation_bytes(context, sc.batch)
    # Requests are admitted one prefill at a time: room for one prefill's activations.
    free = sc.hbm_free - sc.activation_bytes(context, 1)
    concurrency = _floor(free / per_request) if free > 0 else 0
    peak = sc.weight_bytes + sc.batch * per_request + activation
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
        fits=concurrency >= sc.batch and peak <= sc.gpu.hbm,
        prefill=_prefill(sc, mode, context),
        decode=decode,
        decode_context=decode_context,
        decode_total_s=sc.output_tokens * decode.time_s,
        context_switch_s=gpu_bytes_per_request(sc, mode, context) / sc.peak.host_link,
        batch=sc.batch,
        activation_bytes=activation,
        peak_bytes=peak,
        prefill_chunks=sc.prefill_chunks(context),
        trained_context=sc.model.max_context,
    )
