"""What only a GPU can show: the CUDA gather kernel and the offload memory bound.
(The kernel-vs-reference suites run on CUDA by themselves where it exists.)"""

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.offload import OffloadedKV
from hip_attn.offload.gather import ChunkPointers, cuda_extension, gather_cuda, gather_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_gather_matches_torch_gather():
    if cuda_extension() is None:
        pytest.fail("the csrc/ gather extension did not build on a CUDA machine")
    cfg = HiPConfig(k=64, block_size_q=32, sink_tokens=16, window=64)
    caches = []
    for _ in range(2):
        off = OffloadedKV(cfg, 2, 4, 128, torch.bfloat16, "cuda", cache_blocks=16,
                          max_chunk=256, host_chunk_tokens=512, gather="torch")  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        k = torch.randn(2, 4, 1500, 128, generator=gen).to("cuda", torch.bfloat16)
        for start in range(0, 1500, 256):
            off.append(k[:, :, start : start + 256], -k[:, :, start : start + 256])
        caches.append(off)
    rows = torch.tensor([0, 3, 7, 5], device="cuda")
    blocks = torch.tensor([0, 70, 120, 186], device="cuda")  # across host chunks
    k_slots = torch.tensor([2, 9, -1, 0], device="cuda")  # values only, keys only, both
    v_slots = torch.tensor([2, -1, 15, 0], device="cuda")
    torch_off, cuda_off = caches
    gather_torch(torch_off.host, torch_off.cache, rows, blocks, k_slots, v_slots)
    pointers = ChunkPointers(cuda_off.host, cuda_off.cache.k.device)
    gather_cuda(cuda_extension(), cuda_off.host, cuda_off.cache, pointers, rows, blocks,
                k_slots, v_slots)  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(torch_off.cache.k, cuda_off.cache.k)
    assert torch.equal(torch_off.cache.v, cuda_off.cache.v)
    assert cuda_off.cache.k.abs().sum() > 0


def _peak_after_append(tokens: int) -> tuple[int, int]:
    """Peak device bytes of appending ``tokens`` tokens of Llama-3.1-8B attention shapes."""
    cfg = HiPConfig()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    off = OffloadedKV(cfg, 1, 8, 128, torch.bfloat16, "cuda", cache_blocks=1024, max_chunk=4096)
    chunk = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(tokens // 4096):
        off.append(chunk, chunk)
    rep = off.tree.numel() * off.tree.element_size()
    peak = torch.cuda.max_memory_allocated() - base
    del off, chunk
    return peak, rep


def test_offload_device_memory_grows_only_by_the_summary_tree():
    small, rep_small = _peak_after_append(64 * 1024)
    large, rep_large = _peak_after_append(512 * 1024)
    kv_large = 2 * 8 * 128 * 2 * 512 * 1024  # what the full cache would hold: 2 GiB
    # the tree grows by a quarter, so the old and new copies coexist for a moment
    assert large - small <= (rep_large - rep_small) * 1.9 + (1 << 20)
    assert large < kv_large / 2


def test_split_merges_and_the_extension_column_hold_under_real_concurrency():
    """The interpreter runs a launch's programs one after another (the last split always
    merges, the search's extension column always runs last); only a GPU races them. Many tiles
    of many splits, launched again and again on one scratch: each output equals the unsplit
    kernel's and the counters stay at zero. Decode searches beside the extension of many rows:
    the tree equals a fresh build and the selection a search on it."""
    from hip_attn.geometry import node_summaries, tree_blocks
    from hip_attn.reference import estimate_mask_reference
    from hip_attn.triton_kernels.attention import KVSegments, sparse_attention_triton
    from hip_attn.triton_kernels.mask import estimate_mask_triton, extends_beside
    from hip_attn.triton_kernels.tiles import Tile
    from tests.test_kernels import _tree_levels

    cfg = HiPConfig(k=512, block_size_q=64, block_size_k=8, sink_tokens=64, window=256)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(8, h, t, 128, generator=gen).to("cuda", torch.bfloat16)
               for h, t in ((32, 1), (8, 16384), (8, 16384)))  # fmt: skip
    idx, _ = estimate_mask_reference(q, k, cfg)
    kv = KVSegments.full(k, v)
    one = sparse_attention_triton(q, kv, 16384, idx, cfg, 128**-0.5, tile=Tile(4))
    scratch: dict[str, torch.Tensor] = {}
    for _ in range(20):
        out = sparse_attention_triton(q, kv, 16384, idx, cfg, 128**-0.5, num_splits=16,
                                      tile=Tile(4), scratch=scratch)  # fmt: skip
        torch.testing.assert_close(out, one, atol=2e-2, rtol=2e-2)
    assert not scratch["split_arrivals"].any()
    before = 16384 - 64  # the blocks of 64 keys join the tree beside the search
    done = tree_blocks(before, cfg)
    assert extends_beside(1, 16384, done, cfg)
    for _ in range(5):
        tree = node_summaries(k[:, :, :before], cfg, min_capacity=tree_blocks(16384, cfg))
        got, _ = estimate_mask_triton(q, tree, 16384, cfg, 8, 128**-0.5, keys=k, done=done)
        n = tree_blocks(16384, cfg)
        fresh = node_summaries(k, cfg)
        want, _ = estimate_mask_triton(q, fresh, 16384, cfg, 8, 128**-0.5, keys=k, done=n)
        for a, b in zip(_tree_levels(tree, n), _tree_levels(fresh, n), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(got, want)
