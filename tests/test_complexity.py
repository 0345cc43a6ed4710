"""Complexity is part of correctness: no T x T matrix, a logarithmic search, and attention that
reads only sinks + selected blocks + window."""

import tracemalloc

import torch
from torch.profiler import ProfilerActivity, profile

from hip_attn import HiPConfig, hip_attention
from hip_attn.geometry import node_summaries, query_blocks, search_width, tree_blocks
from hip_attn.reference import attended_keys, estimate_mask_reference, hip_attention_reference
from hip_attn.triton_kernels.attention import KVSegments, sparse_attention_triton
from hip_attn.triton_kernels.mask import estimate_mask_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the lighter search: summaries at the leaves (the search kernel reads the tree alone)
CFG = HiPConfig(k=64, block_size_q=64, block_size_k=8, sink_tokens=16, window=64, dense_threshold=0,
                beam=1, query_pool_stride=2, leaf_scores="summary")  # fmt: skip


def test_prefill_never_allocates_a_t_by_t_matrix(rand_qkv):
    t = 1024
    q, k, v = rand_qkv(1, 1, 1, t, t, 64, seed=1)
    square = t * t * 4
    cfg = CFG
    hip_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], cfg)  # warm up the launchers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()  # the interpreter's tiles are numpy arrays
        hip_attention(q, k, v, cfg)
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    torch_largest = max(e.cpu_memory_usage for e in prof.events())
    assert torch_largest < square / 4  # q itself is t * 64 * 4 bytes
    assert numpy_peak < square / 4


def test_mask_kernel_work_is_logarithmic_in_context(rand_qkv):
    for tk in (4096, 16384):
        q, k, _ = rand_qkv(1, 1, 1, 1, tk, 64, device=DEVICE, seed=tk)
        geo = query_blocks(1, tk, CFG, q.device)
        _, scored = estimate_mask_triton(q, node_summaries(k, CFG), tk, CFG, 1, 0.125)
        n = int(geo.n_candidates[0])
        width = search_width(n, CFG)  # G, or the set bits of N when more
        # levels: the aligned start needs one more than an even split when the width is
        # large against log2(N) (G = 64: N < 2^31); with this test's G = 8 at most log2(N)
        assert 0 < int(scored[0, 0, 0]) <= 2 * width * n.bit_length()
    assert int(scored[0, 0, 0]) * 8 < n  # 16K: ~2000 candidate blocks, ~150 scores


def _poison_unattended(q, k, v, idx, cfg):
    """Copies of k, v with NaN at every key no query block attends."""
    geo = query_blocks(q.shape[2], k.shape[2], cfg)
    used = torch.zeros(k.shape[0], k.shape[1], k.shape[2], dtype=torch.bool)
    group = idx.shape[1] // k.shape[1] if idx.shape[1] > k.shape[1] else 1
    for b in range(k.shape[0]):
        for hs in range(idx.shape[1]):
            for j in range(idx.shape[2]):
                keys = attended_keys(
                    int(geo.end[j]), int(geo.window_start[j]), idx[b, hs, j].cpu(), cfg
                )
                used[b, hs // group, keys] = True
    mask = used[..., None].to(k.device)
    return k.masked_fill(~mask, float("nan")), v.masked_fill(~mask, float("nan")), used


def test_attention_reads_only_sinks_selected_and_window(rand_qkv):
    for tq, tk in [(128, 1100), (1, 1500)]:
        q, k, v = rand_qkv(1, 2, 1, tq, tk, 64, device=DEVICE, seed=tk)
        idx, _ = estimate_mask_reference(q, k, CFG)
        expected = hip_attention_reference(q, k, v, CFG, indices=idx)
        k_bad, v_bad, used = _poison_unattended(q, k, v, idx, CFG)
        assert used.float().mean() < 0.5  # most of the context is never touched
        for splits in (1, 3):
            kv = KVSegments.full(k_bad, v_bad)
            out = sparse_attention_triton(q, kv, tk, idx, CFG, 64**-0.5, num_splits=splits)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_search_scores_a_gqa_groups_rows_in_as_few_row_tiles_as_they_fill():
    """The search stacks the query rows of the heads sharing a selection head by head into its
    row tiles: a decode step's one row per head (4 heads of a group) takes one tile for the
    group, not one per head and pooled row of a full block (16 with the defaults); a prefill
    block's 64 rows a head still take 4 tiles of 16 each (counted from the launch the search
    makes, on meta tensors)."""
    from hip_attn.aot import _llama_qkv, recorded_launches

    config = HiPConfig()
    for tq, tiles in ((1, 1), (7, 2), (4096, 16)):
        q, k, _ = _llama_qkv(1, tq, 1 << 17, torch.bfloat16, 128)
        tree = node_summaries(k, config)
        with recorded_launches() as launches:
            done = tree_blocks(1 << 17, config)  # a complete tree
            estimate_mask_triton(q, tree, 1 << 17, config, 8, 128**-0.5, keys=k, done=done)
        (search,) = launches
        meta = search.kwargs
        assert meta["HEADS_PER_SEL"] == 4 and meta["ROW_TILE"] == 16
        assert meta["ROW_TILES"] == tiles, tq
