"""Triton kernels against the PyTorch reference on fresh random inputs (CPU: interpreter)."""

import math
from functools import partial

import pytest
import torch
import triton
import triton.language as tl

from hip_attn import HiPConfig
from hip_attn.attention import summary_tree, uses_triton
from hip_attn.geometry import (
    level_offset,
    level_spreads,
    node_summaries,
    pool_queries,
    tree_blocks,
    tree_capacity,
    tree_rows,
)
from hip_attn.reference import (
    dense_attention_reference,
    estimate_mask_reference,
    hip_attention_reference,
)
from hip_attn.triton_kernels import mask
from hip_attn.triton_kernels.attention import (
    KVSegments,
    merge_partials,
    sparse_attention_triton,
)
from hip_attn.triton_kernels.mask import estimate_mask_triton
from hip_attn.triton_kernels.tiles import Tile
from hip_attn.triton_kernels.tree import extend_tree_triton
from hip_attn.triton_kernels.tree import level_offset as level_offset_kernel
from tests import interpreter_sort
from tests.test_reference import focused_row_case, vote_scale_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the lighter search (one node per selected block, pooled rows, summaries at the leaves); keys
# at the leaves, the defaults' last level, have tests of their own
CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64, dense_threshold=0,
                beam=1, query_pool_stride=2, leaf_scores="summary")  # fmt: skip
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_mask(q, k, cfg):
    h_sel = k.shape[1] if cfg.head_sharing == "kv_group" else q.shape[1]
    return estimate_mask_triton(
        q, node_summaries(k, cfg), k.shape[2], cfg, h_sel,
        q.shape[-1] ** -0.5,
    )  # fmt: skip


def run_attention(q, k, v, idx, cfg, **launch):
    return sparse_attention_triton(
        q,
        KVSegments.full(k, v),
        k.shape[2],
        idx,
        cfg,
        q.shape[-1] ** -0.5,
        **launch,
    )


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing,beam",
    [
        (2, 2, 450, 450, "kv_group", 1),  # MHA prefill, T not a multiple of the blocks
        (4, 2, 384, 384, "kv_group", 1),  # GQA prefill
        (4, 2, 300, 300, "head", 1),
        (2, 1, 1, 901, "kv_group", 1),  # decode
        (2, 1, 7, 777, "head", 2),  # short decode chunk, wider beam
        (2, 2, 70, 650, "kv_group", 3),  # chunked prefill
    ],
)
def test_mask_kernel_matches_reference(rand_qkv, hq, hkv, tq, tk, sharing, beam):
    q, k, _ = rand_qkv(1, hq, hkv, tq, tk, 64, device=DEVICE, seed=tq + tk)
    cfg = CFG.replace(head_sharing=sharing, beam=beam)
    ref, stats = estimate_mask_reference(q, k, cfg)
    out, scored = run_mask(q, k, cfg)
    assert stats.scored.max() > 0  # the tree search ran
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(scored.long().cpu(), stats.scored, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case", [*(partial(focused_row_case, leaves) for leaves in ("summary", "keys")),
             vote_scale_case],
)  # fmt: skip
def test_kernel_votes_as_the_reference_rule_says(case):
    """The planted inputs of the reference's vote tests: each child's largest per-row share,
    at half the attention scale."""
    q, k, cfg, want = case()
    q, k = q.to(DEVICE), k.to(DEVICE)
    out, _ = estimate_mask_triton(q, node_summaries(k, cfg), k.shape[2], cfg, 1, 0.25, keys=k,
                                  done=tree_blocks(k.shape[2], cfg))  # fmt: skip
    assert out[0, 0, 0].tolist() == want


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing,beam,dtype",
    [
        (4, 2, 300, 300, "head", 1, torch.float32),  # prefill, one search per query head
        (2, 1, 1, 901, "kv_group", 1, torch.float16),  # decode, the group's rows rank
        (2, 1, 7, 777, "head", 2, torch.bfloat16),  # short decode chunk, wider beam
    ],
)
def test_exact_leaves_kernel_matches_reference(rand_qkv, hq, hkv, tq, tk, sharing, beam, dtype):
    q, k, _ = rand_qkv(1, hq, hkv, tq, tk, 64, dtype=dtype, device=DEVICE, seed=tq + tk + 1)
    cfg = CFG.replace(head_sharing=sharing, beam=beam, leaf_scores="keys")
    ref, stats = estimate_mask_reference(q, k, cfg)
    h_sel = hkv if sharing == "kv_group" else hq
    out, scored = estimate_mask_triton(q, node_summaries(k, cfg), tk, cfg, h_sel, 0.125, keys=k,
                                       done=tree_blocks(tk, cfg))  # fmt: skip
    assert stats.scored.max() > 0
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(scored.long().cpu(), stats.scored, atol=0, rtol=0)
    summary, _ = estimate_mask_reference(q, k, cfg.replace(leaf_scores="summary"))
    assert not torch.equal(summary, ref)  # the leaves' rule changed what was selected
    with pytest.raises(ValueError, match="pass keys="):
        estimate_mask_triton(q, node_summaries(k, cfg), tk, cfg, h_sel, 0.125)
    with pytest.raises(ValueError, match="fewer than tk"):  # the leaves would read past them
        estimate_mask_triton(q, node_summaries(k, cfg), tk, cfg, h_sel, 0.125, keys=k[:, :, :-8],
                             done=tree_blocks(tk - 8, cfg))  # fmt: skip


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing,beam,dtype",
    [
        (4, 2, 300, 300, "head", 2, torch.float32),  # prefill: some blocks select everything
        (2, 1, 1, 901, "kv_group", 1, torch.float16),  # decode
        (2, 2, 70, 650, "kv_group", 3, torch.bfloat16),  # chunked prefill
    ],
)
def test_leaves_ranked_from_a_block_cache_select_as_with_all_keys(
    rand_qkv, hq, hkv, tq, tk, sharing, beam, dtype
):
    """The offloaded path's two launches (the last level's children, then their keys read
    through a slot table) select what one launch with every key on the device selects."""
    q, k, _ = rand_qkv(2, hq, hkv, tq, tk, 64, dtype=dtype, device=DEVICE, seed=tq + 2)
    cfg = CFG.replace(head_sharing=sharing, beam=beam, leaf_scores="keys")
    h_sel = hkv if sharing == "kv_group" else hq
    tree = node_summaries(k, cfg)
    want, want_scored = estimate_mask_triton(q, tree, tk, cfg, h_sel, 0.125, keys=k,
                                             done=tree_blocks(tk, cfg))  # fmt: skip
    cand, scored = mask.leaf_candidates_triton(q, tree, tk, cfg, h_sel, 0.125)
    bk, n_blocks = cfg.block_size_k, -(-tk // cfg.block_size_k)
    assert int(cand.max()) < n_blocks and bool((cand >= -1).all())
    # every block in a slot shuffled per (batch, KV head) row of a cache with room to spare, the
    # rest of it garbage
    gen = torch.Generator().manual_seed(tk)
    slots = n_blocks + 5
    table = torch.stack([torch.randperm(slots, generator=gen)[:n_blocks] for _ in range(2 * hkv)])
    table = table.int().to(DEVICE)
    cache = torch.randn(2, hkv, slots * bk, 64, generator=gen).to(DEVICE, dtype)
    padded = torch.nn.functional.pad(k, (0, 0, 0, n_blocks * bk - tk))
    for b in range(2):
        for h in range(hkv):
            blocks = padded[b, h].view(n_blocks, bk, 64)
            cache[b, h].view(slots, bk, 64)[table[b * hkv + h].long()] = blocks
    got = torch.full_like(want, -7)
    first = mask.rank_leaves_triton(q, cand, cache, table, tk, cfg, 0.125, got, range(0, 1))
    split = want.shape[2] > 1
    rest = mask.rank_leaves_triton(q, cand, cache, table, tk, cfg, 0.125, got,
                                   range(1, want.shape[2])) if split else 0  # fmt: skip
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=0, rtol=0)
    torch.testing.assert_close((scored + first + rest).cpu(), want_scored.cpu(), atol=0, rtol=0)
    assert int(first[..., 1:].abs().sum()) == 0  # the launch of query block 0 counts only it


@pytest.mark.parametrize("leaves", ["summary", "keys"])
def test_rows_scored_in_several_tiles_select_as_one(rand_qkv, monkeypatch, leaves):
    # 64 unpooled rows in tiles of 16 (a wide beam or unpooled rows split them on a GPU)
    monkeypatch.setattr(mask, "MAX_TILE", 16 * 64)
    cfg = CFG.replace(block_size_q=64, query_pool_stride=1, leaf_scores=leaves)
    q, k, _ = rand_qkv(1, 4, 2, 130, 700, 64, device=DEVICE, seed=5)
    ref, _ = estimate_mask_reference(q, k, cfg)
    out, _ = estimate_mask_triton(q, node_summaries(k, cfg), 700, cfg, 2, 0.125, keys=k,
                                  done=tree_blocks(700, cfg))  # fmt: skip
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)


def test_a_search_refused_for_shared_memory_reloads_its_variances(rand_qkv, monkeypatch):
    """A device without the shared memory a 16-bit search variant needs (Triton refuses the
    launch with ``OutOfResources``) runs it reloading the variances per row tile: the same
    selection, and the variant is not tried again; fp32 operands keep the refusal."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(mask, "MAX_TILE", 16 * 64)  # 64 unpooled rows in 4 tiles: 4 reloads
    monkeypatch.setattr(mask, "_RELOADING", set())
    kernel, tried = mask._hip_mask_kernel, []

    class SmallDevice:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tried.append(meta)
                if not meta["RELOAD_VARIANCES"]:
                    raise OutOfResources(139264, 101376, "shared memory")
                kernel[grid](*args, **meta)

            return launch

    monkeypatch.setattr(mask, "_hip_mask_kernel", SmallDevice())
    cfg = CFG.replace(block_size_q=64, query_pool_stride=1, beam=2, head_sharing="head")
    q, k, _ = rand_qkv(1, 4, 2, 130, 700, 64, dtype=torch.float16, device=DEVICE, seed=8)
    ref, _ = estimate_mask_reference(q, k, cfg)
    for _ in range(2):
        out, _ = run_mask(q, k, cfg)
        torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)
    first, reloading = tried[0], mask.reloading_variances(tried[0])
    assert tried == [first, reloading, reloading] and len(mask._RELOADING) == 1
    assert not first["RELOAD_VARIANCES"] and reloading["num_stages"] == 1
    # fp32 operands reloaded need more shared memory, not less: the refusal stands (they launch
    # in two pipeline stages, which take less shared memory than one for them on sm_90)
    with pytest.raises(OutOfResources):
        run_mask(q.float(), k.float(), cfg)
    assert tried[-1]["num_stages"] == 2 and not tried[-1]["RELOAD_VARIANCES"]


def test_mask_kernel_half_precision(rand_qkv):
    q, k, _ = rand_qkv(2, 2, 1, 130, 600, 64, dtype=torch.float16, device=DEVICE, seed=11)
    cfg = CFG
    out, _ = run_mask(q, k, cfg)
    ref, _ = estimate_mask_reference(q, k, cfg)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing,dtype,d",
    [
        (2, 2, 333, 333, "kv_group", torch.float32, 64),
        (4, 2, 256, 256, "kv_group", torch.float16, 64),
        (4, 2, 200, 260, "head", torch.bfloat16, 64),
        (2, 1, 100, 100, "kv_group", torch.float32, 128),
        (2, 2, 96, 96, "kv_group", torch.float32, 80),  # head dim not a power of two
    ],
)
def test_prefill_attention_matches_reference(rand_qkv, hq, hkv, tq, tk, sharing, dtype, d):
    q, k, v = rand_qkv(2, hq, hkv, tq, tk, d, dtype=dtype, device=DEVICE, seed=d + tq)
    cfg = CFG.replace(head_sharing=sharing)
    idx, _ = estimate_mask_reference(q, k, cfg)
    expected = hip_attention_reference(q, k, v, cfg, indices=idx)
    out = torch.full_like(q, float("nan"))  # poison: the kernel must write every row
    run_attention(q, k, v, idx, cfg, out=out)
    assert not out.isnan().any()
    torch.testing.assert_close(
        out.float().cpu(), expected.float().cpu(), atol=TOL[dtype], rtol=TOL[dtype]
    )


@pytest.mark.parametrize("splits", [1, 2])
def test_query_blocks_beyond_the_grid_axis_limit_take_the_first_axis(rand_qkv, monkeypatch, splits):
    from hip_attn.triton_kernels import attention

    monkeypatch.setattr(attention, "MAX_QUERY_BLOCKS", 3)  # 5 query blocks: the other order
    q, k, v = rand_qkv(2, 4, 2, 140, 300, 64, device=DEVICE, seed=5)
    idx, _ = estimate_mask_reference(q, k, CFG)
    expected = hip_attention_reference(q, k, v, CFG, indices=idx)
    out = run_attention(q, k, v, idx, CFG, num_splits=splits)
    torch.testing.assert_close(out.cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq", [1, 3, 32])
@pytest.mark.parametrize("heads,splits", [(1, 1), (2, 1), (1, 3), (2, 4)])
def test_decode_attention_split_and_packed_heads(rand_qkv, tq, heads, splits):
    q, k, v = rand_qkv(2, 4, 2, tq, 700, 64, device=DEVICE, seed=tq * 10 + splits)
    idx, _ = estimate_mask_reference(q, k, CFG)
    expected = hip_attention_reference(q, k, v, CFG, indices=idx)
    out = run_attention(q, k, v, idx, CFG, num_splits=splits, tile=Tile(heads))
    torch.testing.assert_close(out.cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


def test_more_splits_than_tiles_is_still_exact(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 1, 300, 64, device=DEVICE, seed=5)
    idx, _ = estimate_mask_reference(q, k, CFG)
    out = run_attention(q, k, v, idx, CFG, num_splits=16)
    torch.testing.assert_close(
        out.cpu(), hip_attention_reference(q, k, v, CFG).cpu(), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("tq,tk", [(200, 200), (1, 333)])
def test_kernel_with_budget_covering_context_equals_dense(rand_qkv, tq, tk):
    q, k, v = rand_qkv(1, 4, 2, tq, tk, 64, device=DEVICE, seed=tk)
    cfg = CFG.replace(k=512)
    idx, _ = run_mask(q, k, cfg)
    out = run_attention(q, k, v, idx, cfg)
    torch.testing.assert_close(
        out.cpu(), dense_attention_reference(q, k, v).cpu(), atol=1e-5, rtol=1e-5
    )


def test_bf16_search_scores_round_pooled_queries_like_the_reference(rand_qkv):
    # the kernel's 16-bit path (tensor cores on a GPU) rounds the pooled queries to bf16
    # exactly as the reference does; both then accumulate exact products in fp32
    q, k, _ = rand_qkv(1, 4, 2, 200, 900, 64, dtype=torch.bfloat16, device=DEVICE, seed=21)
    pooled = pool_queries(q, CFG)
    assert pooled.dtype == torch.bfloat16
    out, _ = run_mask(q, k, CFG)
    ref, _ = estimate_mask_reference(q, k, CFG)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)


def test_int64_offsets_give_the_same_results(rand_qkv, monkeypatch):
    # int64 offsets are chosen only for tensors spanning 2^31 elements (too big for a test);
    # forcing them on small inputs checks that path computes what the int32 path does
    import hip_attn.triton_kernels.attention as attention_kernel
    import hip_attn.triton_kernels.mask as mask_kernel

    q, k, v = rand_qkv(2, 4, 2, 5, 700, 64, device=DEVICE, seed=31)
    idx32, _ = run_mask(q, k, CFG)
    out32 = run_attention(q, k, v, idx32, CFG, num_splits=2, tile=Tile(2))
    monkeypatch.setattr(mask_kernel, "needs_int64", lambda *t: True)
    monkeypatch.setattr(attention_kernel, "needs_int64", lambda *t: True)
    idx64, _ = run_mask(q, k, CFG)
    out64 = run_attention(q, k, v, idx64, CFG, num_splits=2, tile=Tile(2))
    torch.testing.assert_close(idx64, idx32, atol=0, rtol=0)
    torch.testing.assert_close(out64, out32, atol=0, rtol=0)
    torch.testing.assert_close(
        out64.cpu(),
        hip_attention_reference(q, k, v, CFG, indices=idx32).cpu(),
        atol=1e-5,
        rtol=1e-5,
    )


def test_needs_int64_counts_the_furthest_element_offset():
    from hip_attn.triton_kernels.dtypes import needs_int64

    row = torch.empty((1, 8, 1 << 20, 128), device="meta")  # 2^30 elements: int32 is enough
    assert not needs_int64(row)
    assert not needs_int64(torch.empty((2, 8, 1 << 20, 128), device="meta"))  # max 2^31 - 1
    assert needs_int64(torch.empty((3, 8, 1 << 20, 128), device="meta"))
    # a strided view spans its strides, not its element count
    assert needs_int64(torch.empty((4, 8, 1 << 20, 128), device="meta")[:, :1, :1])


def test_tree_layout_closed_forms_match_their_definitions():
    # tree_rows and level_offset are O(1) (decode asks every step); the layout they describe:
    # level l holds capacity >> l rows after the levels below it
    for capacity in range(2050):
        levels = [capacity >> lv for lv in range(capacity.bit_length())]
        assert tree_rows(capacity) == sum(levels)
        for lv in range(capacity.bit_length() + 1):
            assert level_offset(lv, capacity) == sum(levels[:lv])
        assert tree_capacity(torch.empty(1, 1, tree_rows(capacity), 2)) == capacity


def _tree_levels(tree, n):
    """The written nodes of a summary tree of ``n`` blocks, level by level."""
    cap = tree_capacity(tree)
    return [
        tree[..., level_offset(lv, cap) : level_offset(lv, cap) + (n >> lv), :]
        for lv in range(n.bit_length())
    ]


def test_each_node_holds_the_mean_and_the_pair_variances_of_its_keys(rand_qkv):
    """Composed up the tree from its halves', a node's summary is its keys' mean, then for each
    dimension pair (d, d + D/2) the mean of the two dimensions' variances over its keys."""
    _, k, _ = rand_qkv(1, 1, 2, 1, 16 + 8 * 45 + 5, 64, seed=41)  # 45 blocks, a partial one
    tree = node_summaries(k, CFG)
    first, bk, cap = 16, CFG.block_size_k, tree_capacity(tree)
    assert cap == 45 and tree.shape[-1] == 96
    for level in range(cap.bit_length()):
        for i in range(cap >> level):
            keys = k[:, :, first + i * (bk << level) : first + (i + 1) * (bk << level)]
            row = tree[:, :, level_offset(level, cap) + i]
            torch.testing.assert_close(row[..., :64], keys.mean(dim=2), atol=1e-5, rtol=1e-5)
            var = keys.var(dim=2, unbiased=False)
            pairs = (var[..., :32] + var[..., 32:]) / 2
            torch.testing.assert_close(row[..., 64:], pairs, atol=1e-5, rtol=1e-5)


def test_odd_head_dims_are_refused_with_the_reason(rand_qkv):
    _, k, _ = rand_qkv(1, 1, 1, 1, 200, 15, seed=3)
    with pytest.raises(ValueError, match="head dim must be even"):
        node_summaries(k, CFG)


def test_a_nodes_estimate_is_its_mean_logit_plus_a_spread_growing_with_its_keys():
    """``level_spreads``: ``1.25 sqrt(2 ln m)`` standard deviations for ``m`` keys, the same
    fp32 numbers for the reference and the kernels; a one-key node is scored exactly."""
    spreads = level_spreads(8)
    assert spreads[0] == pytest.approx(1.25 * math.sqrt(2 * math.log(8)), rel=1e-7)
    assert spreads[3] == pytest.approx(1.25 * math.sqrt(2 * math.log(64)), rel=1e-7)
    assert all(a < b for a, b in zip(spreads, spreads[1:], strict=False))
    assert level_spreads(1)[0] == 0.0


def test_half_precision_outliers_keep_summaries_finite_and_the_search_selective(rand_qkv):
    """A float16 key dimension spread wider than sqrt(65504) would store an infinite variance;
    its products make NaN estimates that tie every child (the first G would win). Capped at
    float16's largest value, the tree stays finite and both searches still rank."""
    q, k, _ = rand_qkv(1, 2, 1, 1, 600, 64, dtype=torch.float16, device=DEVICE, seed=12)
    k[..., 5] *= 400  # standard deviation ~400 on one dimension
    tree = node_summaries(k, CFG)
    assert torch.isfinite(tree).all()
    out, _ = run_mask(q, k, CFG)
    ref, _ = estimate_mask_reference(q, k, CFG)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)
    g, first = CFG.blocks_per_query_block, CFG.sink_tokens // CFG.block_size_k
    assert ref[0, 0, 0].tolist() != list(range(first, first + g))
    grown = node_summaries(k[:, :, :400], CFG, min_capacity=tree_blocks(600, CFG))
    extend_tree_triton(grown, k, tree_blocks(400, CFG), CFG)
    for a, b in zip(
        _tree_levels(grown, tree_blocks(600, CFG)),
        _tree_levels(tree, tree_blocks(600, CFG)),
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_kernel_extends_like_the_reference(rand_qkv, dtype):
    _, k, _ = rand_qkv(2, 2, 3, 1, 520, 64, dtype=dtype, device=DEVICE, seed=31)
    tree = node_summaries(k[:, :, :400], CFG)
    tree = node_summaries(k[:, :, :408], CFG, tree, tree_blocks(400, CFG))  # grown: room to 61
    assert tree_capacity(tree) == 61
    done = tree_blocks(408, CFG)
    for tk in (415, 416, 440, 504):  # no new block, one, several, up to the capacity
        extend_tree_triton(tree, k[:, :, :tk], done, CFG)
        done = tree_blocks(tk, CFG)
        expected = _tree_levels(node_summaries(k[:, :, :tk], CFG), done)
        for got, want in zip(_tree_levels(tree, done), expected, strict=True):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cannot extend the tree .*room for 61 blocks"):
        extend_tree_triton(tree, k[:, :, :520], done, CFG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tree_kernel_builds_whole_trees_like_the_reference(rand_qkv, dtype):
    """A prefill's tree from the kernel (runs of 32 blocks in parallel, then the levels above,
    16 nodes a step; head dim 40 pads to 64) is the reference's bit for bit, built whole and
    extended from a prefix ending inside a run."""
    _, k, _ = rand_qkv(2, 2, 3, 1, 16 + 8 * 150 + 3, 40, dtype=dtype, device=DEVICE, seed=33)
    assert uses_triton(k.device)  # else summary_tree is the reference itself
    assert tree_blocks(k.shape[2], CFG) == 150  # five runs, levels 0-7
    assert torch.equal(summary_tree(k, CFG), node_summaries(k, CFG))
    prefix = k[:, :, : 16 + 8 * 45]
    got = summary_tree(k, CFG, summary_tree(prefix, CFG, min_capacity=150), 45)
    want = node_summaries(k, CFG, node_summaries(prefix, CFG, min_capacity=150), 45)
    assert tree_capacity(got) == 150 and torch.equal(got, want)


@pytest.mark.parametrize(
    "sharing,tq,before,dtype,leaves",
    [
        # decode, the candidates (51 blocks) within the tree's: extended beside the search
        ("kv_group", 1, 424, torch.bfloat16, "summary"),
        ("kv_group", 1, 424, torch.float32, "keys"),
        ("head", 1, 424, torch.float32, "summary"),  # one row's extension, four searches
        # the candidates reach past the tree's 48 blocks: extended by a launch first
        ("kv_group", 1, 400, torch.float32, "summary"),
        ("kv_group", 40, 400, torch.float32, "keys"),  # two query blocks: likewise
    ],
)
def test_search_extends_the_tree(rand_qkv, sharing, tq, before, dtype, leaves):
    cfg = CFG.replace(head_sharing=sharing, leaf_scores=leaves)
    q, k, _ = rand_qkv(2, 4, 2, tq, 520, 64, dtype=dtype, device=DEVICE, seed=32)
    done = tree_blocks(before, cfg)
    tree = node_summaries(k[:, :, :before], cfg, min_capacity=60)
    h_sel = 2 if sharing == "kv_group" else 4
    keys = k[:, :, :496]  # 60 blocks
    assert mask.extends_beside(tq, 496, done, cfg) == (before == 424)
    got, _ = estimate_mask_triton(q, tree, 496, cfg, h_sel, 0.125, keys=keys, done=done)
    fresh = node_summaries(keys, cfg)
    want, _ = estimate_mask_triton(q, fresh, 496, cfg, h_sel, 0.125, keys=keys, done=60)
    for a, b in zip(_tree_levels(tree, 60), _tree_levels(fresh, 60), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="room for 60 blocks"):  # beyond the room: no launch
        estimate_mask_triton(q, tree, 520, cfg, h_sel, 0.125, keys=k, done=60)


@pytest.mark.parametrize("tq,heads", [(1, 2), (3, 1)])
def test_the_last_split_to_finish_merges_them_in_the_same_launch(rand_qkv, tq, heads):
    """A split launch's output is merge_partials of the partials it leaves in the scratch, at
    a head dim the tile pads (80); the arrival counters are back at zero after it, so the next
    launch over the same scratch (a replayed step) merges again and gives the same output."""
    q, k, v = rand_qkv(2, 4, 2, tq, 700, 80, device=DEVICE, seed=tq + heads)
    idx, _ = estimate_mask_reference(q, k, CFG)
    scratch: dict[str, torch.Tensor] = {}
    out = run_attention(q, k, v, idx, CFG, num_splits=3, tile=Tile(heads),
                        scratch=scratch)  # fmt: skip
    assert scratch["split_arrivals"].shape == (2 * 4 // heads,)  # one per program, one query block
    assert not scratch["split_arrivals"].any()
    partials = [scratch[name].cpu() for name in ("split_acc", "split_max", "split_sum")]
    assert (partials[1] == float("-inf")).any()  # the last split has no tile: weighs nothing
    torch.testing.assert_close(out.cpu(), merge_partials(*partials), atol=1e-6, rtol=1e-6)
    again = run_attention(q, k, v, idx, CFG, num_splits=3, tile=Tile(heads),
                          scratch=scratch)  # fmt: skip
    assert torch.equal(again, out) and not scratch["split_arrivals"].any()
    expected = hip_attention_reference(q, k, v, CFG, indices=idx)
    torch.testing.assert_close(out.cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


@triton.jit
def _sort_kernel(X, TOP, ASC, N: tl.constexpr, K: tl.constexpr):
    x = tl.load(X + tl.arange(0, N))
    tl.store(TOP + tl.arange(0, K), tl.topk(x, K))
    tl.store(ASC + tl.arange(0, N), tl.sort(x, descending=False))


def _sorts(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, asc = torch.empty_like(x[:k]), torch.empty_like(x)
    _sort_kernel[(1,)](x, top, asc, N=x.numel(), K=k)
    return top, asc


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n,k", [(256, 128), (16, 4)])
def test_numpy_sort_is_tritons_sort(dtype, n, k):
    """The CPU tests run ``tl.sort``/``tl.topk`` by NumPy (tests/interpreter_sort.py); both
    must give what Triton's bitonic network gives, which must be the sort, on keys like the
    search's: the dtype's minimum (the int64 search's invalid key), ties, negatives. On CUDA,
    Triton's compiled sort against torch's."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randint(-(2**20), 2**20, (n,), generator=gen, dtype=dtype)
    x[::3] = torch.iinfo(dtype).min  # invalid keys, tied
    x[1::7] = x[2]
    x = x.to(DEVICE)
    expected = (x.sort(descending=True).values[:k], x.sort().values)
    got = _sorts(x, k)
    if interpreter_sort.active():
        interpreter_sort.use_tritons_sort()
        try:
            tritons = _sorts(x, k)
        finally:
            interpreter_sort.use_numpy_sort()
        for want, have in zip(tritons, expected, strict=True):
            torch.testing.assert_close(want, have, rtol=0, atol=0)
    for want, have in zip(got, expected, strict=True):
        torch.testing.assert_close(want, have, rtol=0, atol=0)


def test_numpy_sort_refuses_a_k_larger_than_the_dimension_as_triton_does():
    # (a k that is not a power of two fails earlier, in the kernel's own tl.arange)
    with pytest.raises(Exception, match="topk: k must"):
        _sorts(torch.arange(16, device=DEVICE), 32)


@triton.jit
def _level_offset_kernel(OUT, capacity, LEVELS: tl.constexpr):
    levels = tl.arange(0, LEVELS)
    tl.store(OUT + levels, level_offset_kernel(levels, capacity))


def test_kernels_level_offset_is_the_references():
    """On capacities up to 2**26 blocks (26 levels, as the search's keys allow), every level."""
    gen = torch.Generator().manual_seed(3)
    capacities = [0, 1, 2, 3, 5, 255, 256, 1000, 2**26 - 1, 2**26, 0x5555555, 0x2AAAAAA]
    capacities += torch.randint(1, 2**26, (20,), generator=gen).tolist()
    out = torch.empty(32, dtype=torch.int32, device=DEVICE)
    for capacity in capacities:
        _level_offset_kernel[(1,)](out, capacity, LEVELS=32)
        assert out[:27].tolist() == [level_offset(lv, capacity) for lv in range(27)]


def test_the_extension_runs_beside_the_search_only_where_the_tree_holds_its_candidates():
    """One query block whose candidates end at or before the tree's blocks: the nodes the
    extension writes (ending after them) are none the search reads, so both run in one launch;
    a decode refresh within ``window`` tokens of the last qualifies, a prefill chunk does not."""
    cfg = HiPConfig()  # window 256, block_size_k 8, 8 sink blocks
    assert mask.extends_beside(1, 4096, 471, cfg)  # (4095 - 256) // 8 - 8 candidates
    assert not mask.extends_beside(1, 4096, 470, cfg)
    assert not mask.extends_beside(65, 4096, 600, cfg)  # two query blocks


@pytest.mark.parametrize("leaves", ["summary", "keys"])
def test_tree_and_search_kernels_at_a_head_dim_not_a_power_of_two(rand_qkv, leaves):
    """D = 80: the tree kernel's half tiles (40 of 64 lanes) and the search's pair-variance
    loads are masked, and both still equal the reference bit for bit."""
    cfg = CFG.replace(leaf_scores=leaves)
    q, k, _ = rand_qkv(1, 2, 1, 1, 901, 80, dtype=torch.float16, device=DEVICE, seed=80)
    ref_tree = node_summaries(k, cfg)
    tree = torch.zeros_like(ref_tree)
    extend_tree_triton(tree, k, 0, cfg)
    assert torch.equal(tree, ref_tree)
    ref, stats = estimate_mask_reference(q, k, cfg)
    out, scored = estimate_mask_triton(q, tree, 901, cfg, 1, 80**-0.5, keys=k,
                                       done=tree_blocks(901, cfg))  # fmt: skip
    assert stats.scored.max() > 0
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(scored.long().cpu(), stats.scored, atol=0, rtol=0)


def test_a_prefill_autotunes_its_tile_once_per_kernel_variant_and_size_class(rand_qkv, monkeypatch):
    """Several tiles: the autotuner times each (a stand-in timer here), launches the fastest,
    whose output is the reference's, and keeps it for later launches of the same kernel variant
    and size class (programs to a power of two) whatever the length; another size class is
    timed again. tuned_tiles says what it kept."""
    from hip_attn.triton_kernels import attention as attention_kernel

    monkeypatch.setattr(attention_kernel, "_TUNERS", {})
    monkeypatch.setattr(attention_kernel, "_can_time", lambda q: True)
    tiles = (Tile(1, 64, 4, 2), Tile(2, 16, 8, 2), Tile(1, 128, 8, 3))
    times = [2.0, 1.0, 3.0, 1.0, 3.0, 2.0]  # Triton times the configs in their order
    timed = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(times[len(timed)])
        return [timed[-1]] * len(quantiles)

    tuner = attention_kernel._autotuned(tiles, CFG.block_size_q)
    vars(tuner)["do_bench"] = stand_in_timer  # the tuner is this test's (a fresh _TUNERS)
    # 5, 5 and 2 query blocks of 32: 40, 40 and 16 programs of one head (size classes 6, 6, 5)
    for tq, tk, tunings in ((140, 300, 1), (130, 500, 1), (64, 400, 2)):
        q, k, v = rand_qkv(2, 4, 2, tq, tk, 64, device=DEVICE, seed=tq)
        idx, _ = estimate_mask_reference(q, k, CFG)
        out = torch.full_like(q, float("nan"))
        run_attention(q, k, v, idx, CFG, tile=tiles, out=out)
        expected = hip_attention_reference(q, k, v, CFG, indices=idx)
        torch.testing.assert_close(out.cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)
        assert len(timed) == tunings * len(tiles)
    fields = ("size_class", "heads", "block_n", "num_warps", "num_stages")
    assert [tuple(c[f] for f in fields) for c in attention_kernel.tuned_tiles()] == [
        ("6", 2, 16, 8, 2),
        ("5", 1, 64, 4, 2),
    ]
    assert all(
        c["D"] == "64" and "torch.float32" in c["dtypes"] for c in attention_kernel.tuned_tiles()
    )
    with pytest.raises(ValueError, match="one tile"):
        run_attention(q, k, v, idx, CFG, tile=tiles, num_splits=2)
    with pytest.raises(ValueError, match=r"divide the query heads per selection head \(2\)"):
        run_attention(q, k, v, idx, CFG, tile=Tile(4))


@pytest.mark.parametrize(
    "fields,message",
    [
        ((0,), "heads must be a positive int"),
        ((1, 48), "block_n must be a power of two"),
        ((1, 8), "block_n must be at least 16"),
        ((1, 64, 6), "num_warps must be a power of two"),
        ((1, 64, 4, 0), "num_stages must be a positive int"),
        ((1, 64.0), "block_n must be a positive int"),
    ],
)
def test_a_tile_refuses_what_the_kernel_cannot_launch(fields, message):
    with pytest.raises(ValueError, match=message):
        Tile(*fields)
