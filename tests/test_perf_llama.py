"""Llama-3.1-8B on one H100 SXM, bf16, batch 1, 250 output tokens: every mode derived by hand
from the formulas in docs/roofline.md, written out without calling the estimator's helpers."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hip_attn.config import HiPConfig
from hip_attn.perf import OffloadConfig, Scenario, estimate, get_gpu, get_model, max_context
from hip_attn.perf.estimator import hip_prefill_counts

# ---- the model, by hand ---------------------------------------------------------------------
L, H, HQ, HKV, D, INTER, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
Q_PROJ = H * HQ * D  # 16,777,216
KV_PROJ = H * HKV * D  # 4,194,304 each for k and v
O_PROJ = HQ * D * H
MLP = 3 * H * INTER  # gate, up, down
P_MM = L * (Q_PROJ + 2 * KV_PROJ + O_PROJ + MLP)
LM_HEAD = VOCAB * H
NORMS = (2 * L + 1) * H
WEIGHTS = 2 * (P_MM + 2 * LM_HEAD + NORMS)  # untied embedding stored beside the LM head
KV_TOKEN = 2 * L * HKV * D * 2  # 131,072 bytes
# HiP's summary tree: per 8-token block about two nodes (leaves, then half as many per level)
# of 1.5 * D values (the mean, one variance per dimension pair): 24,576 bytes per token
TREE_TOKEN = 2 * L * HKV * 1.5 * D * 2 / 8


def levels_of(n: int, width: int = 64) -> int:
    """Search levels over n candidate blocks: the smallest L whose aligned 2**L-block nodes plus
    the remainder's pieces (its set bits) number at most the width, and at least 1."""
    level = 0
    while (n >> level) + bin(n % (1 << level)).count("1") > width:
        level += 1
    return max(1, level)


def search_reads(width: int, leaf: float, child: float = 1.0) -> float:
    """What the 32K prefill's searches score per head, summed over the searching blocks
    (N = 8 i - 40 for i >= 14): two children per node of the width on each level, each worth
    ``child``, the last level's at most N, each worth ``leaf`` (estimates: 1 and 1, or a
    leaf's 8 keys 4; key-sized vectors read: 1.5 a summary, 8 a leaf's keys)."""
    total = 0.0
    for n in (8 * i - 40 for i in range(14, 512)):
        w = min(n, width)
        total += child * 2 * w * (levels_of(n, width) - 1) + min(n, 2 * w) * leaf
    return total


# ---- the GPU ----------------------------------------------------------------------------------
PEAK, BW, HBM, PCIE = 989e12, 3350e9, 80 * 2**30, 64e9
FREE = HBM - WEIGHTS
LAUNCH = 5e-6  # one eager kernel launch (hardware.LAUNCH)
# Prefill activations per token (bf16): act(gate), up and their product, plus residual and
# normed input: 2 * (3 * 14336 + 2 * 4096) = 102,400 bytes.
ACT = 2 * (3 * INTER + 2 * H)

# Activation traffic of one token through the stack, bf16: every matmul reads its input row and
# writes its output row; attention reads q and writes o; the LM head reads one row, writes logits.
ACT_TOKEN = 2 * L * ((H + (HQ + 2 * HKV) * D) + (HQ * D + H) + (H + 2 * INTER) + (INTER + H))
ACT_ATTN = 2 * L * 2 * HQ * D
ACT_LM = 2 * (H + VOCAB)

CTX, OUT = 32768, 250
MEAN = CTX + (OUT - 1) / 2  # decode is timed at the mean KV length over the 250 steps
# The setting derived by hand: one node per width slot, pooled pairs of rows, summaries at the
# leaves (the defaults before session 19; the defaults' wider search is counted against the
# estimator's helpers in tests/test_reference.py and below)
HIP = HiPConfig(beam=1, query_pool_stride=2, leaf_scores="summary")


@pytest.fixture(scope="module")
def sc() -> Scenario:
    return Scenario(get_model("llama-3.1-8b"), get_gpu("h100-sxm"), output_tokens=OUT, hip=HIP)


def test_model_totals(sc: Scenario) -> None:
    assert P_MM == 6_979_321_856
    assert sc.matmul_params_per_gpu == P_MM
    assert sc.model.total_params == 8_030_261_248
    assert sc.weight_bytes == WEIGHTS
    assert sc.kv_bytes_per_token == KV_TOKEN == 131_072


def test_dense(sc: Scenario) -> None:
    est = estimate(sc, "dense", CTX)
    assert est.kv_bytes == CTX * KV_TOKEN
    assert ACT == 102_400 and est.activation_bytes == CTX * ACT
    assert est.max_concurrency == math.floor((FREE - CTX * ACT) / ((CTX + OUT) * KV_TOKEN)) == 15
    assert est.max_context == math.floor((FREE - OUT * KV_TOKEN) / (KV_TOKEN + ACT)) == 298_991
    assert est.fits

    flops = 2 * P_MM * CTX + L * 2 * CTX**2 * HQ * D + 2 * LM_HEAD
    assert est.prefill.flops == flops
    assert est.prefill.bound == "compute"
    assert est.prefill.time_s == pytest.approx(flops / PEAK + L * LAUNCH, rel=1e-12)

    step_bytes = 2 * (P_MM + LM_HEAD) + MEAN * KV_TOKEN + ACT_TOKEN + ACT_ATTN + ACT_LM
    assert est.decode.hbm_bytes == pytest.approx(step_bytes, rel=1e-12)
    assert est.decode.bound == "memory"
    step = step_bytes / BW + L * LAUNCH  # one flash kernel per layer
    assert est.decode.time_s == pytest.approx(step, rel=1e-12)
    assert est.decode_ms_per_token == pytest.approx(1e3 * step, rel=1e-12)  # 5.93
    assert est.decode_tokens_per_s == pytest.approx(1 / step, rel=1e-12)
    assert est.decode_total_s == pytest.approx(OUT * step, rel=1e-12)
    assert est.context_switch_s == pytest.approx(CTX * KV_TOKEN / PCIE, rel=1e-12)


def test_hip_prefill_counts_by_hand() -> None:
    """k=512, bq=64, bk=8, sinks 64, window 256 at 32K: 512 query blocks.

    Blocks 0..12 (ends 64..832 <= dense threshold 832) are dense. Every later block starts at
    s = 64 i >= 832, has N = (s - 320) / 8 = 8 i - 40 >= 64 candidate blocks, selects 512
    tokens and its row j sees 64 + 512 + (j + 257) keys. The search runs when N > 64 (i >= 14)
    with :func:`levels_of` levels.
    """
    c = hip_prefill_counts(CTX, HIP)
    dense_visits = 832 * 833 // 2
    sparse_block_visits = 64 * 833 + 63 * 64 // 2
    assert c.key_visits == dense_visits + 499 * sparse_block_visits == 27_955_200
    levels = sum(levels_of(8 * i - 40) for i in range(14, 512))
    assert 2532 <= levels <= 2532 + 498  # an even split's levels, at most one more per block

    # leaves: N where N < 128, not the 128 children of 64 nodes
    less = sum(128 - n for n in range(72, 128, 8))
    assert search_reads(64, 1) == 2 * 64 * levels - less
    assert c.search_dots == 32 * search_reads(64, 1)  # 32 pooled rows per block (stride 2)
    assert c.rep_reads == search_reads(64, 1.5, 1.5)  # 1.5 vectors a summary
    assert c.key_reads == 64 * (13 * 14 // 2) + 499 * (64 + 512 + 320)
    assert c.selected_tokens == 499 * 512
    # a leaf read as its 8 keys is 8 vectors and 4 estimates' worth of dot products
    keys = hip_prefill_counts(CTX, HIP.replace(leaf_scores="keys"))
    assert keys.rep_reads == search_reads(64, 8, 1.5)
    assert keys.search_dots == 32 * search_reads(64, 8 / 2) and keys.key_reads == c.key_reads
    # beam 2 keeps 128 nodes: a level fewer and twice the children
    beam2 = hip_prefill_counts(CTX, HIP.replace(beam=2))
    assert beam2.rep_reads == search_reads(128, 1.5, 1.5)


def test_hip(sc: Scenario) -> None:
    est = estimate(sc, "hip", CTX)
    # Memory: the full KV stays in HBM, and the search's summary tree beside it.
    assert est.gpu_bytes_per_request == (CTX + OUT) * (KV_TOKEN + TREE_TOKEN)
    per_request = (CTX + OUT) * (KV_TOKEN + TREE_TOKEN)
    assert est.max_concurrency == math.floor((FREE - CTX * ACT) / per_request) == 12

    visits, dots = 27_955_200, 32 * search_reads(64, 1)
    # an estimate is two dot products of D; building the tree takes a mean and a variance of
    # K (4 FLOPs an element)
    tree_flops = L * HKV * D * CTX * 4
    flops = 2 * P_MM * CTX + 2 * LM_HEAD + L * HQ * (4 * D * visits + 4 * D * dots) + tree_flops
    assert est.prefill.flops == flops
    assert est.prefill.bound == "compute"
    # Latency per layer: 5 launches; the search's chain (N = 4056 candidates: 7 levels, each a
    # 0.5 us round trip and a 28-stage bitonic top-k of 128 children at 20 ns a stage; N comes
    # from the arguments); the sparse kernel's dependent load of its selection row.
    assert levels_of(4056) == 7
    chain = 7 * (0.5e-6 + 28 * 20e-9)
    prefill_latency = L * (5 * LAUNCH + chain + 0.5e-6)
    assert est.prefill.latency_s == pytest.approx(prefill_latency, rel=1e-12)
    assert est.prefill.time_s == pytest.approx(flops / PEAK + prefill_latency, rel=1e-12)
    # Attention is 38% of dense prefill FLOPs at 32K and a few % with HiP: ~1.5x overall.
    speedup = estimate(sc, "dense", CTX).prefill.time_s / est.prefill.time_s
    assert 1.4 < speedup < 1.6

    # Decode at the mean context: sinks + k + window = 832 keys; N = (32892.5 - 320) // 8 = 4071
    # candidate blocks, 7 levels, 2 * 64 * 7 = 896 summaries per KV head, read once every 8
    # steps. Gathers: the 512 selected tokens come in 2 KB runs per head (2048 / (2048 + 128) of
    # the bandwidth), each summary (mean and pair variances, 1.5 vectors) is a 384 B run
    # (384 / 512).
    assert levels_of(4071) == 7
    reps_per_step = 896 / 8
    step_bytes = (
        2 * (P_MM + LM_HEAD)
        + (320 + 512 * (2048 + 128) / 2048) * KV_TOKEN
        + L * HKV * 1.5 * D * 2 * reps_per_step * 512 / 384
        + ACT_TOKEN
        + ACT_ATTN
        + ACT_LM
    )
    assert est.decode.hbm_bytes == pytest.approx(step_bytes, rel=1e-12)
    # Latency per layer: 1 launch of a reuse step (attention, its splits merged by the last to
    # finish) and the sparse kernel's round trip for its selection row, plus an eighth of
    # what a refreshing step adds (1 launch, the search with the tree's extension beside it,
    # and the search chain).
    decode_latency = L * (LAUNCH + 0.5e-6 + (LAUNCH + chain) / 8)
    assert est.decode.latency_s == pytest.approx(decode_latency, rel=1e-12)
    assert est.decode.time_s == pytest.approx(step_bytes / BW + decode_latency, rel=1e-12)
    # With 1-2 launches a layer, a batch-1 HiP step beats dense at 32K (25 launches did not).
    assert est.decode.time_s < estimate(sc, "dense", CTX).decode.time_s
    assert est.context_switch_s == pytest.approx(CTX * (KV_TOKEN + TREE_TOKEN) / PCIE, rel=1e-12)


def test_hip_offload(sc: Scenario) -> None:
    est = estimate(sc, "hip+offload", CTX)
    resident = (64 + 256 + 16384) * KV_TOKEN  # sinks + window + block cache
    gpu_per_request = resident + (CTX + OUT) * TREE_TOKEN
    assert est.gpu_bytes_per_request == gpu_per_request
    assert est.host_bytes_per_request == (CTX + OUT) * KV_TOKEN
    by_hbm = math.floor((FREE - CTX * ACT) / gpu_per_request)
    by_host = math.floor(512e9 / ((CTX + OUT) * KV_TOKEN))
    assert (by_hbm, by_host) == (22, 118)
    assert est.max_concurrency == 22
    # Unchunked, the prompt's activations (100 KB/token) bound it long before host RAM.
    by_hbm_ctx = math.floor((FREE - resident - OUT * TREE_TOKEN) / (TREE_TOKEN + ACT))
    assert est.max_context == min(math.floor(512e9 / KV_TOKEN) - OUT, by_hbm_ctx) == 532_724
    assert max_context(sc, "dense") == 298_991
    chunked = Scenario(sc.model, sc.gpu, output_tokens=OUT, prefill_chunk=8192, hip=HIP)
    # chunked, the summary tree's HBM (24 KB/token) bounds it before host RAM (3.9M tokens)
    by_tree = math.floor((FREE - resident - OUT * TREE_TOKEN - 8192 * ACT) / TREE_TOKEN)
    assert max_context(chunked, "hip+offload") == by_tree == 2_718_277

    # Prefill: same FLOPs as hip; the KV also goes to host once (4.3 GB at 64 GB/s, hidden).
    hip = estimate(sc, "hip", CTX)
    assert est.prefill.flops == hip.prefill.flops
    assert est.prefill.host_bytes == max(CTX * KV_TOKEN, 0.1 * 499 * 512 * KV_TOKEN)
    assert est.prefill.time_s == hip.prefill.time_s

    # Decode: HBM traffic as hip; 10% of the 512 selected tokens' KV crosses PCIe per step.
    assert est.decode.hbm_bytes == hip.decode.hbm_bytes
    assert est.decode.host_bytes == pytest.approx(0.1 * 512 * KV_TOKEN, rel=1e-12)
    assert est.decode.time_s == hip.decode.time_s
    # Switching moves only the GPU-resident part.
    switch = (resident + CTX * TREE_TOKEN) / PCIE
    assert est.context_switch_s == pytest.approx(switch, rel=1e-12)


def test_offloaded_keys_at_the_leaves_fetch_the_leaf_candidates(sc: Scenario) -> None:
    """With leaf_scores="keys" the offloaded search fetches the last level's children first:
    2 * width = 2 * beam * G = 256 blocks of 8 tokens per search (at most N), the 64 selected
    among them: the keys (half the KV bytes) of the other 192 a decode step once per refresh
    interval (8 steps), a prefill query block every time."""
    quality = dataclasses.replace(sc, hip=sc.hip.replace(beam=2, leaf_scores="keys"))
    decode = estimate(quality, "hip+offload", CTX).decode
    step = 0.1 * (512 + 192 * 8 / 2 / 8) * KV_TOKEN
    assert decode.host_bytes == pytest.approx(step, rel=1e-12)
    prefill = hip_prefill_counts(CTX, quality.hip)
    assert prefill.leaf_tokens == sum(
        (min(n, 256) - 64) * 8
        for n in (max(0, s - 256 - 64) // 8 for s in range(0, CTX, 64))
        if n > 64
    )
    # every block a miss: a prefill fetches more than it writes, the candidates' keys only
    missing = dataclasses.replace(quality, offload=OffloadConfig(miss_rate=1.0))
    fetched = (prefill.selected_tokens + prefill.leaf_tokens / 2) * KV_TOKEN
    assert fetched > CTX * KV_TOKEN
    assert estimate(missing, "hip+offload", CTX).prefill.host_bytes == pytest.approx(fetched)
    summary = hip_prefill_counts(CTX, quality.hip.replace(leaf_scores="summary"))
    assert summary.leaf_tokens == 0 and summary.selected_tokens == prefill.selected_tokens
    # offloaded, the block cache must hold one query block's candidates: 256 blocks of 8 tokens
    small = dataclasses.replace(quality, offload=OffloadConfig(block_cache_tokens=2040))
    with pytest.raises(ValueError, match="must hold the 2048 tokens one query block needs"):
        estimate(small, "hip+offload", CTX)
    estimate(small, "hip", CTX)  # what does not offload does not need it


def test_offload_becomes_host_link_bound() -> None:
    sc = Scenario(
        get_model("llama-3.1-8b"),
        get_gpu("h100-sxm"),
        batch=64,
        offload=OffloadConfig(miss_rate=1.0),
        hip=HIP,
    )
    est = estimate(sc, "hip+offload", 131072)
    host = 64 * 512 * KV_TOKEN
    assert est.decode.host_bytes == host
    assert est.decode.bound == "host-link"
    assert est.decode.time_s == pytest.approx(host / PCIE + est.decode.latency_s, rel=1e-12)


def test_tensor_parallel_two() -> None:
    sc = Scenario(get_model("llama-3.1-8b"), get_gpu("h100-sxm"), tp=2, output_tokens=OUT)
    assert sc.matmul_params_per_gpu == P_MM // 2
    assert sc.kv_bytes_per_token_per_gpu == KV_TOKEN // 2
    est = estimate(sc, "dense", CTX)
    # transformers' Llama tp_plan: two ring all-reduces of one hidden row (bf16) per layer (after
    # the rowwise o_proj and down_proj), each GPU sending 2 (tp-1)/tp of it, and the all-gather
    # of the colwise LM head's logits, (tp-1)/tp of one row of the vocabulary.
    link_bytes = L * 2 * 2 * (1 / 2) * H * 2 + (1 / 2) * VOCAB * 2
    assert est.decode.gpu_link_bytes == pytest.approx(link_bytes, rel=1e-12)
    step_bytes = P_MM + LM_HEAD + MEAN * KV_TOKEN / 2 + (ACT_TOKEN + ACT_ATTN) / 2 + ACT_LM / 2
    # (activations: half the heads/MLP columns, the hidden rows in and out stay whole)
    assert est.decode.memory_s == pytest.approx(step_bytes / BW, rel=2e-3)
    assert est.decode.time_s == pytest.approx(
        est.decode.memory_s + link_bytes / 450e9 + L * LAUNCH, rel=1e-12
    )
    # Weights per rank: half of every projection and of the LM head; embed_tokens (not in the
    # tp_plan) and the norms whole.
    weights = 2 * (P_MM / 2 + LM_HEAD / 2 + LM_HEAD + NORMS)
    assert sc.weight_bytes == weights
    act = 2 * (3 * INTER / 2 + 2 * H)  # half the MLP columns, whole hidden rows
    free = HBM - weights - CTX * act
    assert est.max_concurrency == math.floor(free / ((CTX + OUT) * KV_TOKEN / 2))
    with pytest.raises(ValueError, match="must divide 8 KV heads"):
        Scenario(get_model("llama-3.1-8b"), get_gpu("h100-sxm"), tp=16)


def test_hip_short_context_is_dense(sc: Scenario) -> None:
    for ctx in (100, 512, 832):
        assert estimate(sc, "hip", ctx).prefill.flops == estimate(sc, "dense", ctx).prefill.flops
