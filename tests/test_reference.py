"""Properties of the PyTorch reference, the specification every kernel is held to."""

import math

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.geometry import (
    VOTE_SCALE,
    first_candidate_block,
    first_window_start,
    query_blocks,
    search_width,
)
from hip_attn.reference import (
    attended_keys,
    dense_attention_reference,
    estimate_mask_reference,
    hip_attention_reference,
)

# the lighter search (one node per selected block, pooled rows, summaries at the leaves); keys
# at the leaves, the defaults' last level, have tests of their own
CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64, dense_threshold=0,
                beam=1, query_pool_stride=2, leaf_scores="summary")  # fmt: skip


def test_geometry_parts_are_disjoint_and_cover_the_causal_prefix():
    for tq, tk in [(700, 700), (1, 701), (37, 1003), (5, 90)]:
        geo = query_blocks(tq, tk, CFG)
        for j in range(geo.start.numel()):
            n = int(geo.n_candidates[j])
            first = first_candidate_block(CFG)
            every = torch.arange(first, first + n, dtype=torch.int32)
            keys = attended_keys(int(geo.end[j]), int(geo.window_start[j]), every, CFG)
            assert torch.equal(keys.sort().values, torch.arange(int(geo.end[j])))


@pytest.mark.parametrize("sharing", ["kv_group", "head"])
@pytest.mark.parametrize("tq,tk", [(700, 700), (3, 900), (100, 611)])
def test_indices_sorted_distinct_inside_candidate_region(rand_qkv, sharing, tq, tk):
    q, k, _ = rand_qkv(1, 4, 2, tq, tk, 32, seed=tq)
    cfg = CFG.replace(head_sharing=sharing)
    idx, _ = estimate_mask_reference(q, k, cfg)
    geo = query_blocks(tq, tk, cfg)
    first = first_candidate_block(cfg)
    assert idx.shape == (1, 2 if sharing == "kv_group" else 4, geo.start.numel(), 8)
    for j in range(idx.shape[2]):
        n = int(geo.n_candidates[j])
        for row in idx[0, :, j]:
            chosen = row[row >= 0]
            assert chosen.numel() == min(n, 8)
            assert torch.all(row[chosen.numel() :] == -1)
            assert torch.all(chosen[1:] > chosen[:-1])
            if chosen.numel():
                assert chosen.min() >= first and chosen.max() < first + n


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_search_respects_dot_product_bound(rand_qkv, beam):
    """At most 2 * beam * G children per level and ceil(log2(N / (beam * G))) + 1 levels (the
    start partition's aligned nodes may need one level more than an even split)."""
    q, k, _ = rand_qkv(1, 2, 1, 64, 2000, 32, seed=beam)
    cfg = CFG.replace(beam=beam, k=128)
    _, stats = estimate_mask_reference(q, k, cfg)
    g = cfg.blocks_per_query_block
    n = stats.n_candidates.double()
    bound = 2 * beam * g * (torch.ceil(torch.log2(n / (beam * g))).clamp(min=0) + 1)
    searched = n > g
    assert searched.any()
    assert torch.all(stats.scored[searched] <= bound[searched])
    assert torch.all(stats.scored[~searched] == 0)


def test_search_work_grows_logarithmically(rand_qkv):
    """Doubling the context adds about one level (<= 2 * width scores), not N more scores. With
    G = 8 the width is at least the set bits of N (the aligned start pieces)."""
    work, widths = [], []
    for tk in (4096, 8192, 16384):
        q, k, _ = rand_qkv(1, 1, 1, 1, tk, 32, seed=tk)
        _, stats = estimate_mask_reference(q, k, CFG)
        work.append(int(stats.scored[0, 0, 0]))
        widths.append(search_width(int(stats.n_candidates[0, 0, 0]), CFG))
    assert work[-1] * 8 < int(stats.n_candidates[0, 0, 0])  # 16K: ~2000 blocks, ~150 scores
    for i in (1, 2):  # one more level, give or take one from the uneven split
        assert work[i] - work[i - 1] <= 2 * 2 * max(widths[i - 1 : i + 1])


def test_budget_covering_context_equals_dense(rand_qkv):
    q, k, v = rand_qkv(2, 4, 2, 300, 300, 32, seed=1)
    out = hip_attention_reference(q, k, v, CFG.replace(k=512))
    torch.testing.assert_close(out, dense_attention_reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_empty_candidate_region_is_exact_dense(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 1, 80, 32, seed=2)  # s - window < sink: no candidates
    out = hip_attention_reference(q, k, v, CFG)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_small_budget_differs_from_dense(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 600, 600, 32, seed=3)
    out = hip_attention_reference(q, k, v, CFG)
    assert (out - dense_attention_reference(q, k, v)).abs().max() > 1e-2


def test_batch_split_does_not_change_results(rand_qkv):
    q, k, v = rand_qkv(3, 2, 1, 300, 300, 32, seed=4)
    whole = hip_attention_reference(q, k, v, CFG)
    parts = torch.cat(
        [hip_attention_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], CFG) for i in range(3)]
    )
    torch.testing.assert_close(whole, parts, atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_search_finds_a_planted_span(seed):
    """An 8-block span of keys aligned with the queries, far back in a 2K context, is found
    whole: a node's mean and variance see every key of it, so a span that stands out in a
    node raises the node's estimate at every level."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 32, 32, generator=gen)
    k = torch.randn(1, 1, 2048, 32, generator=gen)
    direction = torch.randn(32, generator=gen)
    q[0, 0] = direction + 0.5 * q[0, 0]
    span = set(range(100, 108))  # tokens 800..863, far outside the window
    for blk in span:
        k[0, 0, blk * 8 : blk * 8 + 8] = 1.5 * direction + 0.3 * k[0, 0, blk * 8 : blk * 8 + 8]
    cfg = CFG.replace(k=128)
    for beam in (1, 4):
        idx, _ = estimate_mask_reference(q, k, cfg.replace(beam=beam))
        assert span <= set(idx[0, 0, 0].tolist())


def focused_row_case(leaf_scores: str) -> tuple[torch.Tensor, torch.Tensor, HiPConfig, list[int]]:
    """Seven query heads (one row each, one KV group) that split their attention over blocks 3,
    4 and 5, and an eighth that attends block 9 alone; one level (every candidate a child),
    ``G = 2``. A block keeps its largest vote over the rows, so block 9 is selected with block
    3 (a tie of 4 and 5, to the lower block); summed votes would give 7/3 to each of the three
    against block 9's 1. Returns ``q, k, config`` and the selection (absolute blocks)."""
    cfg = CFG.replace(k=16, beam=8, leaf_scores=leaf_scores)  # G = 2; width 16 >= N: one level
    first, n, d = first_candidate_block(cfg), 12, 16
    k = torch.zeros(1, 1, 8 * (first + n) + cfg.window + 8, d)
    basis = torch.eye(d)
    for block, direction in ((3, 0), (4, 1), (5, 2), (9, 3)):
        k[0, 0, (first + block) * 8 : (first + block + 1) * 8] = basis[direction]
    q = torch.zeros(1, 8, 1, d)
    q[0, :7, 0] = 80 * (basis[0] + basis[1] + basis[2])  # spread over blocks 3, 4 and 5
    q[0, 7, 0] = 80 * basis[3]  # only block 9
    return q, k, cfg, [first + 3, first + 9]


def vote_scale_case() -> tuple[torch.Tensor, torch.Tensor, HiPConfig, list[int]]:
    """Eight query heads of one KV group, one row each, ranking 12 single blocks by their keys
    in one level (``G = 4``, attention scale 0.25): an input whose selection differs between
    the votes at half the attention scale (the rule), at the full scale, and summed over the
    rows. Returns ``q, k, config`` and the rule's selection, computed here from the logits."""
    cfg = CFG.replace(k=32, beam=4, leaf_scores="keys")
    first, n = first_candidate_block(cfg), 12
    gen = torch.Generator().manual_seed(14)
    q = 3 * torch.randn(1, 8, 1, 16, generator=gen)
    k = torch.randn(1, 1, 8 * (first + n) + cfg.window + 8, 16, generator=gen)
    keys = k[0, 0, first * 8 : (first + n) * 8].unflatten(0, (n, 8))
    best = torch.einsum("pd,nkd->pnk", q[0, :, 0], keys).amax(-1)  # [rows, blocks]

    def top(votes: torch.Tensor) -> list[int]:
        return sorted((first + votes.topk(4).indices).tolist())

    want = top((best * (0.25 * VOTE_SCALE)).softmax(dim=1).amax(0))
    assert want != top((best * 0.25).softmax(dim=1).amax(0))  # the scale matters here
    assert want != top((best * (0.25 * VOTE_SCALE)).softmax(dim=1).sum(0))  # and the maximum
    return q, k, cfg, want


@pytest.mark.parametrize("leaf_scores", ["summary", "keys"])
def test_one_focused_row_outranks_many_spread_rows(leaf_scores):
    q, k, cfg, want = focused_row_case(leaf_scores)
    idx, stats = estimate_mask_reference(q, k, cfg, scale=0.25)
    assert int(stats.n_candidates[0, 0, 0]) == 12
    assert idx[0, 0, 0].tolist() == want


def test_votes_are_each_childs_largest_share_at_half_the_attention_scale():
    assert VOTE_SCALE == 0.5  # what README and docs/accuracy.md measured and state
    q, k, cfg, want = vote_scale_case()
    idx, stats = estimate_mask_reference(q, k, cfg, scale=0.25)
    assert int(stats.scored[0, 0, 0]) == 12 and idx[0, 0, 0].tolist() == want


def test_exact_leaves_rank_blocks_by_their_keys_largest_logits(rand_qkv):
    """With one level (every candidate a child), ``leaf_scores="keys"`` selects the ``G`` blocks
    with the largest per-row softmax share of each row's largest logit over the block's keys,
    and scoring one key per block far above the rest of its block still finds that block."""
    cfg = CFG.replace(k=32, beam=4, leaf_scores="keys")  # G = 4; width 16 >= N: one level
    q, k, _ = rand_qkv(1, 2, 1, 1, 8 * 14 + cfg.window + 8, 16, seed=8)
    pooled = q[0, :, 0].float()  # [heads of the group, D]: one row each
    first, n = first_candidate_block(cfg), 12
    k[0, 0, (first + 5) * 8 + 3] = 6 * pooled.sum(0)  # one key of block 5 matches both heads
    idx, stats = estimate_mask_reference(q, k, cfg, scale=0.25)
    assert int(stats.n_candidates[0, 0, 0]) == n and int(stats.scored[0, 0, 0]) == n
    keys = k[0, 0, first * 8 : (first + n) * 8].float().unflatten(0, (n, 8))
    best = torch.einsum("pd,nkd->pnk", pooled, keys).amax(-1)  # [rows, blocks]
    score = (best * (0.25 * VOTE_SCALE)).softmax(dim=1).amax(0)
    want = sorted((first + score.topk(4).indices).tolist())
    assert idx[0, 0, 0].tolist() == want and first + 5 in want
    summary, _ = estimate_mask_reference(q, k, cfg.replace(leaf_scores="summary"), scale=0.25)
    assert summary[0, 0, 0].tolist() != want  # the block's summary dilutes the one key


@pytest.mark.parametrize("k,beam", [(16, 1), (32, 2), (64, 4), (64, 1)])
def test_read_bounds_hold_the_children_the_search_scores(rand_qkv, k, beam):
    """The accuracy harness's and the roofline's read counts bound the children the reference
    scores (each level at most two per kept node, the last at most N), from N just above G
    through powers of two."""
    from hip_attn.accuracy.methods import hip_search_reads
    from hip_attn.perf.estimator import search_estimates, search_vectors

    cfg = CFG.replace(k=k, beam=beam)
    g, exact = cfg.blocks_per_query_block, 0
    for n in [g + 1, g + 3, 2 * g - 1, 2 * g, 2 * g + 5, 4 * g, 4 * g + 7, 127, 128, 200]:
        if n <= g:
            continue
        tk = (n + first_candidate_block(cfg)) * 8 + cfg.window + 1
        q, kk, _ = rand_qkv(1, 2, 1, 1, tk, 16, seed=n)
        _, stats = estimate_mask_reference(q, kk, cfg)
        assert int(stats.n_candidates[0, 0, 0]) == n
        bound = search_estimates(n, cfg)  # children scored, at most
        assert search_vectors(n, cfg) == 1.5 * bound  # 1.5 vectors a summary
        assert hip_search_reads(n, cfg) == math.ceil(search_vectors(n, cfg))
        assert int(stats.scored[0, 0, 0]) <= bound
        exact += int(stats.scored[0, 0, 0]) == bound
    assert exact > 0  # tight where the kept nodes all split


def test_levels_match_log_of_candidates(rand_qkv):
    q, k, _ = rand_qkv(1, 1, 1, 1, 4096, 32, seed=6)
    _, stats = estimate_mask_reference(q, k, CFG)
    n = int(stats.n_candidates[0, 0, 0])
    width = search_width(n, CFG)  # G = 8, or the set bits of N when more
    levels = math.ceil(math.log2(n / width)) + 1  # aligned start nodes: at most one more level
    # beam 1: each level scores the two halves of each kept node
    assert int(stats.scored[0, 0, 0]) <= 2 * width * levels
    assert int(stats.scored[0, 0, 0]) >= width * (levels - 1)


@pytest.mark.parametrize("tq,tk", [(1, 100), (5, 300), (64, 1000), (100, 5000), (16, 16)])
def test_first_window_start_is_query_blocks_first(tq, tk):
    for cfg in (HiPConfig(), HiPConfig(k=16, block_size_q=16, sink_tokens=8, window=20)):
        assert first_window_start(tq, tk, cfg) == int(query_blocks(tq, tk, cfg).window_start[0])
