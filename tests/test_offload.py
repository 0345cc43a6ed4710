"""KV offload: the offloaded cache gives the on-GPU results with only R, sinks, the window and a
bounded block cache on the device."""

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hip_attn import HiPConfig, HiPDecodeState, hip_attention
from hip_attn.geometry import (
    level_offset,
    node_summaries,
    summary_width,
    tree_blocks,
    tree_capacity,
)
from hip_attn.offload import BlockCache, HostKV, OffloadedKV
from hip_attn.offload.gather import gather_torch
from hip_attn.offload.readable_lru import ReadableLRU
from hip_attn.triton_kernels import mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the lighter search (summaries at the leaves: the search reads only the tree); tests of keys at
# the leaves, the defaults' last level, replace leaf_scores
CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64,
                refresh_interval=4, dense_threshold=0, beam=1, query_pool_stride=2,
                leaf_scores="summary")  # fmt: skip


def qkv(b, hq, hkv, t, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv)]


def offloaded(cfg, b, hkv, **kw):
    kw = {"cache_blocks": 64, "max_chunk": 128, "host_chunk_tokens": 256, **kw}
    return OffloadedKV(cfg, b, hkv, 64, torch.float32, DEVICE, **kw)


@pytest.mark.parametrize(
    "hq,hkv,sharing,steps,leaves",
    [
        (2, 2, "kv_group", 64, "summary"),
        (4, 2, "kv_group", 12, "summary"),
        (4, 2, "head", 8, "keys"),  # the candidates' keys fetched before the leaves rank
    ],
)
def test_chunked_prefill_and_decode_equal_on_gpu_hip(hq, hkv, sharing, steps, leaves):
    cfg = CFG.replace(head_sharing=sharing, leaf_scores=leaves)
    t0 = 520
    q, k, v = qkv(1, hq, hkv, t0 + steps, seed=steps)
    off = offloaded(cfg, 1, hkv)
    copied = _count_copies(off)
    out = off.prefill(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0])
    expected = hip_attention(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], cfg)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    ours, theirs = HiPDecodeState(), HiPDecodeState()
    lookups = []  # the block cache is consulted when the selection changes, not on reuse steps
    ensure = off.cache.ensure
    off.cache.ensure = lambda *a, **kw: (lookups.append(ours.refreshes), ensure(*a, **kw))  # type: ignore
    for t in range(t0, t0 + steps):
        off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        before = len(copied)
        got = off.attend(q[:, :, t : t + 1], state=ours)
        step_bytes = sum(copied[before:]) * off.cache.block_bytes // 2
        assert off.stats()["bytes_moved_last_step"] == step_bytes
        want = hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], cfg,
                             state=theirs)  # fmt: skip
        assert torch.equal(ours.indices, theirs.indices)  # the same selection, from R alone
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ours.refreshes == -(-steps // cfg.refresh_interval)
    # with keys at the leaves, the search fetches its candidates (before the refresh counts)
    looked_up = (lambda r: (r - 1, r)) if leaves == "keys" else (lambda r: (r,))
    assert lookups == [n for r in range(1, ours.refreshes + 1) for n in looked_up(r)]
    stats = off.stats()
    _check_bytes(stats, off.cache.block_bytes, copied, keys_first=leaves == "keys")
    assert stats["hits"] > 0 and stats["misses"] > 0


def _count_copies(off):
    """The keys and values (halves of a block) each gather of ``off`` copies, appended to the
    returned list."""
    copied, gather = [], off._gather

    def counting(rows, blocks, k_slots, v_slots):
        copied.append(int((k_slots >= 0).sum() + (v_slots >= 0).sum()))
        gather(rows, blocks, k_slots, v_slots)

    off._gather = counting
    return copied


def _check_bytes(stats, block_bytes, copied, keys_first):
    """Bytes moved: what the gathers copied; every miss's keys, its values unless it brought
    keys only, and the values a resident block got. Candidates fetched for their keys bring
    fewer bytes than their K and V would have."""
    half = block_bytes // 2
    assert stats["bytes_moved"] == sum(copied) * half
    want = (2 * stats["misses"] - stats["keys_only"] + stats["value_fills"]) * half
    assert stats["bytes_moved"] == want
    if keys_first:  # the selection's values came to blocks the candidates' keys brought
        assert 0 < stats["value_fills"] < stats["keys_only"]
        assert stats["bytes_moved"] < stats["misses"] * block_bytes
    else:
        assert stats["keys_only"] == stats["value_fills"] == 0


def test_cache_smaller_than_working_set_evicts_and_stays_exact():
    q, k, v = qkv(1, 2, 1, 900, seed=1)
    g = CFG.blocks_per_query_block
    off = offloaded(CFG, 1, 1, cache_blocks=g, max_chunk=32)  # one query block's blocks
    out = off.prefill(q, k, v)
    torch.testing.assert_close(out, hip_attention(q, k, v, CFG), atol=1e-5, rtol=1e-5)
    assert off.stats()["evictions"] > 0


def test_leaves_ranked_in_a_cache_that_holds_one_query_blocks_candidates():
    """A prefill chunk's leaf candidates do not fit the cache together (4 query blocks of up to
    16 each, 40 slots): its query blocks rank in several launches, each after its own fetch,
    evicting earlier ones' candidates, and select what the on-GPU path selects."""
    cfg = CFG.replace(leaf_scores="keys")
    q, k, v = qkv(1, 2, 1, 700, seed=6)
    off = offloaded(cfg, 1, 1, cache_blocks=40)
    copied = _count_copies(off)
    launches = []
    rank = mask.rank_leaves_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mask, "rank_leaves_triton", lambda *a: (launches.append(a[-1]), rank(*a))[1])
        out = off.prefill(q, k, v)
    torch.testing.assert_close(out, hip_attention(q, k, v, cfg), atol=1e-5, rtol=1e-5)
    assert len(launches) > len(range(0, 700, 128))  # more than one per chunk
    assert all(len(r) == 1 for r in launches)
    stats = off.stats()
    assert stats["evictions"] > 0
    _check_bytes(stats, off.cache.block_bytes, copied, keys_first=True)


def test_one_attend_after_several_appends_serves_or_refuses():
    """Appends of 40 + 40 + 20 tokens, then one call of 60 queries (<= max_chunk): the recent
    buffer dropped the window of the first query (position 40), so the call is refused rather
    than reading dropped keys (it returned NaN rows); the last append's queries are served."""
    cfg = HiPConfig(k=16, block_size_q=16, block_size_k=8, sink_tokens=8, window=16,
                    dense_threshold=0)  # fmt: skip
    q, k, v = qkv(1, 1, 1, 100, seed=4)
    off = offloaded(cfg, 1, 1, max_chunk=64)
    for a, b in ((0, 40), (40, 80), (80, 100)):
        off.append(k[:, :, a:b], v[:, :, a:b])
    assert off.recent_start > 24  # what the query at 40 would need
    with pytest.raises(ValueError, match="before the recent keys still on the device"):
        off.attend(q[:, :, 40:])
    last = q[:, :, 80:]
    torch.testing.assert_close(off.attend(last), hip_attention(last, k, v, cfg),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_cache_blocks_below_one_query_blocks_selection_is_refused():
    with pytest.raises(ValueError, match=r"cache_blocks must be >= k // block_size_k = 8 .* 4$"):
        offloaded(CFG, 1, 1, cache_blocks=4)
    keys = CFG.replace(leaf_scores="keys", beam=2)  # the search ranks 2 * beam * G candidates
    with pytest.raises(ValueError, match=r"2 x beam x k // block_size_k \(the leaf candidates\) "
                                         r"= 32 .* 31$"):  # fmt: skip
        offloaded(keys, 1, 1, cache_blocks=31)
    offloaded(keys, 1, 1, cache_blocks=32)


def test_one_step_needing_more_blocks_than_slots_raises_naming_cache_blocks():
    # head_sharing="head": the two query heads of a KV head select apart, up to 2 * G blocks
    cfg = CFG.replace(head_sharing="head")
    q, k, v = qkv(1, 2, 1, 600, seed=2)
    off = offloaded(cfg, 1, 1, cache_blocks=cfg.blocks_per_query_block, max_chunk=64)
    with pytest.raises(ValueError, match=r"cache_blocks=8 is too small") as exc:
        off.prefill(q, k, v)
    need = int(str(exc.value).rsplit("cache_blocks >= ", 1)[1])
    bound = 2 * 2 * cfg.blocks_per_query_block  # two query blocks per chunk, two heads, G each
    assert 8 < need <= bound
    offloaded(cfg, 1, 1, cache_blocks=bound, max_chunk=64).prefill(q, k, v)


def test_hits_count_only_where_asked_in_request_order():
    cache = BlockCache(1, 1, slots=4, block_size=8, head_dim=16, dtype=torch.float32,
                       device=torch.device(DEVICE))  # fmt: skip
    noop = lambda rows, blocks, k_slots, v_slots: None  # noqa: E731
    cache.ensure(torch.tensor([[1, 2, 3]], device=DEVICE), 8, noop)
    mask = torch.tensor([[True, False, False]], device=DEVICE)  # block 3, sorted last
    cache.ensure(torch.tensor([[3, 1, 2]], device=DEVICE), 8, noop, count_hits=mask)
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_keys_leaves_count_the_hits_of_query_blocks_without_a_search():
    """Offloaded with keys at the leaves, a selection among the candidates just fetched does
    not count its (sure) hits; one that selects every block without a search (N <= G) does."""
    cfg = CFG.replace(leaf_scores="keys")
    q, k, v = qkv(1, 2, 1, 140, seed=7)  # N <= G = 8 up to 144 tokens
    off = offloaded(cfg, 1, 1)
    off.prefill(q[:, :, :132], k[:, :, :132], v[:, :, :132])
    state = HiPDecodeState()
    for t in range(132, 140):
        off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        off.attend(q[:, :, t : t + 1], state=state)
    assert state.refreshes == 2 and off.stats()["hits"] > 0


def test_lru_evicts_the_least_recently_used_block():
    cache = BlockCache(1, 1, slots=2, block_size=8, head_dim=16, dtype=torch.float32,
                       device=torch.device(DEVICE))  # fmt: skip
    host = HostKV(1, 1, 16, torch.float32, 8, chunk_tokens=64, pin=False)
    keys = torch.randn(1, 1, 64, 16)
    host.append(keys, -keys)

    def gather(rows, blocks, k_slots, v_slots):
        gather_torch(host, cache, rows, blocks, k_slots, v_slots)

    def need(*blocks):
        cache.ensure(torch.tensor([[*blocks, -1]], device=DEVICE), 8, gather)

    need(1)
    need(2)
    need(1)  # block 2 is now the least recently used
    need(5)
    resident = {b for b in range(8) if int(cache.table[0, b]) >= 0}
    assert resident == {1, 5}
    slot = int(cache.table[0, 5])
    torch.testing.assert_close(cache.k[0, 0, slot * 8 : slot * 8 + 8].cpu(), keys[0, 0, 40:48])
    torch.testing.assert_close(cache.v[0, 0, slot * 8 : slot * 8 + 8].cpu(), -keys[0, 0, 40:48])
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 3, 1)
    assert s.bytes_moved == 3 * cache.block_bytes


@pytest.mark.parametrize("width", [5, 9])  # within the slots (no host read) and beyond
def test_device_lru_matches_a_readable_lru_on_random_requests(width):
    """Requests with and without values (a search's candidates, then the selection among
    them): the same slots, copies and counters as a readable LRU."""
    slots, n_blocks, rows = 6, 20, 2
    cache = BlockCache(1, rows, slots=slots, block_size=8, head_dim=16, dtype=torch.float32,
                       device=torch.device(DEVICE))  # fmt: skip
    gen = torch.Generator().manual_seed(width)
    requests = []
    for _ in range(30):
        r = torch.randint(-1, n_blocks, (rows, width), generator=gen)
        for row in range(rows):  # at most `slots` distinct blocks per row and step
            distinct = r[row][r[row] >= 0].unique()
            r[row][torch.isin(r[row], distinct[slots:])] = -1
        requests.append((r, bool(torch.randint(0, 2, (), generator=gen))))
    copies = [[] for _ in range(rows)]

    def gather(row_ids, blocks, k_slots, v_slots):
        entries = zip(row_ids.tolist(), blocks.tolist(), k_slots.tolist(), v_slots.tolist(),
                      strict=True)  # fmt: skip
        for row, block, k_slot, v_slot in entries:
            if k_slot >= 0 or v_slot >= 0:
                copies[row].append((block, k_slot, v_slot))

    for r, values in requests:
        cache.ensure(r.to(DEVICE), n_blocks, gather, values=values)
    totals = [0] * 5
    for row in range(rows):
        lru = ReadableLRU(slots)
        for r, values in requests:
            lru.ensure(r[row].tolist(), values)
        got = {b: int(s) for b, s in enumerate(cache.table[row, :n_blocks].tolist()) if s >= 0}
        assert got == lru.table and copies[row] == lru.copies
        totals = [a + b for a, b in zip(totals, lru.counts, strict=True)]
    s = cache.stats
    assert 0 < totals[3] < totals[1] and totals[4] > 0  # both kinds of request happened
    assert [s.hits, s.misses, s.evictions, s.keys_only, s.value_fills] == totals
    half = cache.block_bytes // 2
    assert s.bytes_moved == (2 * totals[1] - totals[3] + totals[4]) * half
    assert s.steps == len(requests)


def test_host_storage_grows_in_chunks_and_reads_back():
    host = HostKV(2, 3, 16, torch.float16, 8, chunk_tokens=32, pin=False)
    k, v = torch.randn(2, 3, 100, 16).half(), torch.randn(2, 3, 100, 16).half()
    for start in range(0, 100, 30):  # appends that straddle chunk boundaries
        host.append(k[:, :, start : start + 30], v[:, :, start : start + 30])
    assert len(host.chunks) == 4 and host.length == 100
    got_k, got_v = host.read()
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    rows, blocks = torch.tensor([0, 5, 3]), torch.tensor([11, 0, 6])
    gk, gv = host.gather(rows, blocks, 0), host.gather(rows, blocks, 1)
    flat_k = k.reshape(6, 100, 16)
    flat_v = v.reshape(6, 100, 16)
    for i, (r, blk) in enumerate(zip(rows.tolist(), blocks.tolist(), strict=True)):
        assert torch.equal(gk[i], flat_k[r, blk * 8 : blk * 8 + 8])
        assert torch.equal(gv[i], flat_v[r, blk * 8 : blk * 8 + 8])
    assert gk.is_contiguous() and gv.is_contiguous()  # what a non-blocking upload needs


def test_an_append_is_one_copy_per_chunk_it_lands_in():
    """Host writes per append, counted: a decode token of every row and head, K and V, is one
    copy into the host storage (it was ``2 * B * Hkv`` copies when each row was its own run);
    an append straddling a chunk boundary is two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    host = HostKV(2, 4, 16, torch.float32, 8, chunk_tokens=32, pin=False)

    class HostWrites(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            storages = {c.untyped_storage().data_ptr() for c in host.chunks}
            if func is torch.ops.aten.copy_.default:
                self.count += args[0].untyped_storage().data_ptr() in storages
            return func(*args, **(kwargs or {}))

    k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    counts = []
    for start, end in ((0, 30), (30, 31), (31, 32), (32, 40)):  # then one straddling: 40 -> 72
        with HostWrites() as writes:
            host.append(k[:, :, start:end], v[:, :, start:end])
        counts.append(writes.count)
    with HostWrites() as writes:
        host.append(k[:, :, 8:40], v[:, :, 8:40])
    assert counts == [1, 1, 1, 1] and writes.count == 2
    got_k, got_v = host.read()
    assert torch.equal(got_k, torch.cat([k, k[:, :, 8:]], dim=2))
    assert torch.equal(got_v, torch.cat([v, v[:, :, 8:]], dim=2))


def test_async_appends_keep_at_most_one_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU append's laid-out tokens live until its copy ran; the host waits for the previous
    copy only when it has not finished, so at most two such buffers exist (unbounded before: a
    host running ahead of the copies held one per prefill chunk). Streams and events faked;
    the copies themselves are plain CPU copies here."""
    log = []

    class Event:
        def __init__(self) -> None:
            self.done = False

        def record(self, stream: object) -> None:
            events.append(self)

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            log.append(events.index(self))
            self.done = True

    class Stream:
        def __init__(self, device: object = None) -> None:
            pass

        def wait_stream(self, other: object) -> None:
            pass

    events: list[Event] = []
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    host = HostKV(1, 2, 16, torch.float32, 8, chunk_tokens=32, pin=False)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    for start in range(0, 40, 10):
        if start == 30:
            events[-1].done = True  # the copies caught up: no wait
        host._append_async(
            host.append_layout(k[:, :, start : start + 10], v[:, :, start : start + 10])
        )
    assert log == [0, 1]  # the second and third appends waited for the one before
    got_k, got_v = host.read()
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def _raw(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it)")
def test_the_csrc_gather_copies_what_the_host_gather_copies(tmp_path: Path) -> None:
    """The CUDA gather kernel's addressing, run on the host: ``gather_entry`` (all a thread of
    the kernel does) over the host chunks fills the slots as the PyTorch gather does, across
    chunk boundaries, for every row, keys and values each where asked, skipping the entries
    marked not to copy."""
    exe = tmp_path / "gather_on_host"
    source = Path(__file__).parent / "csrc" / "gather_on_host.cu"
    subprocess.run(["nvcc", "-std=c++17", "-O1", str(source), "-o", str(exe)], check=True)
    host = HostKV(2, 3, 64, torch.float16, 8, chunk_tokens=32, pin=False)
    # 13 whole blocks: a block past the appended tokens would read uninitialized memory
    k, v = torch.randn(2, 3, 104, 64).half(), torch.randn(2, 3, 104, 64).half()
    for start in range(0, 104, 30):
        host.append(k[:, :, start : start + 30], v[:, :, start : start + 30])
    rows = torch.tensor([0, 5, 3, 2, 4, 1])
    blocks = torch.tensor([11, 0, 6, 3, 12, 4])
    k_slots = torch.tensor([2, 5, -1, 0, -1, 3])
    v_slots = torch.tensor([2, -1, -1, 0, 1, 4])  # keys only, nothing, values only
    caches = [BlockCache(2, 3, 6, 8, 64, torch.float16, torch.device("cpu")) for _ in range(2)]
    before = torch.randn(2, *caches[0].k.shape).half()  # slots not written keep their contents
    for cache in caches:
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
    ours, ref = caches
    gather_torch(host, ref, rows, blocks, k_slots, v_slots)
    assert not torch.equal(ref.k, before[0]) and not torch.equal(ref.v, before[1])
    k_views, v_views = ref.slot_views()
    assert torch.equal(k_views[4, 1], before[0].view_as(k_views)[4, 1])  # values only: keys kept
    assert not torch.equal(v_views[4, 1], before[1].view_as(v_views)[4, 1])
    assert torch.equal(v_views[5, 5], before[1].view_as(v_views)[5, 5])  # keys only
    row_bytes = 64 * 2
    params = [len(host.chunks), rows.numel(), host.chunk_blocks, 2 * host.rows * row_bytes,
              row_bytes, 8 * row_bytes, ours.slots]  # fmt: skip
    (tmp_path / "params").write_text(" ".join(map(str, params)))
    for c, chunk in enumerate(host.chunks):
        (tmp_path / f"chunk{c}").write_bytes(_raw(chunk))
    for name, x in (("rows", rows), ("blocks", blocks), ("k_slots", k_slots),
                    ("v_slots", v_slots), ("k", ours.k), ("v", ours.v)):  # fmt: skip
        (tmp_path / name).write_bytes(_raw(x))
    subprocess.run([str(exe), str(tmp_path)], check=True)
    for name, want in (("k_out", ref.k), ("v_out", ref.v)):
        got = torch.frombuffer(bytearray((tmp_path / name).read_bytes()), dtype=torch.float16)
        assert torch.equal(got.view(want.shape), want), name


def test_device_bytes_grow_only_by_the_summary_tree():
    """The offloaded layer's own accounting at two context lengths: only the search's summary
    tree grows, and it is the tree of the keys appended so far."""
    sizes = {}
    for t in (1024, 4096):
        _, k, v = qkv(1, 2, 2, t, seed=t)
        off = offloaded(CFG, 1, 2, max_chunk=512, host_chunk_tokens=1024)
        for start in range(0, t, 512):
            off.append(k[:, :, start : start + 512], v[:, :, start : start + 512])
        tree = off.tree
        rep_bytes = tree.numel() * tree.element_size()
        sizes[t] = (off.device_bytes, rep_bytes, off.host_bytes)
        fresh = node_summaries(k, CFG)  # built at once from the whole K
        n = tree_blocks(t, CFG)
        for level in range(n.bit_length()):
            ours = level_offset(level, tree_capacity(tree))
            ref = level_offset(level, tree_capacity(fresh))
            count = n >> level
            assert torch.equal(tree[..., ours : ours + count, :], fresh[..., ref : ref + count, :])
    (dev1, rep1, host1), (dev4, rep4, host4) = sizes[1024], sizes[4096]
    assert dev4 - dev1 == rep4 - rep1 > 0
    # about two nodes of 1.5 * D values per block, and a quarter more room while growing
    assert rep4 <= 1.25 * 2 * (4096 // 8) * 2 * summary_width(64) * 4 + 1
    assert host4 == 4 * host1  # the full K/V lives on the host
    kv_growth = 2 * 2 * (4096 - 1024) * 64 * 4  # what the full K/V grew by
    assert dev4 - dev1 < 0.25 * kv_growth  # the tree: ~3 K / 8, with a quarter of room to grow


def test_reference_fallback_without_kernels_matches(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors always use the kernels")
    q, k, v = qkv(1, 2, 1, 300, seed=3)
    expected = offloaded(CFG, 1, 1).prefill(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(offloaded(CFG, 1, 1).prefill(q, k, v), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_chunk"):
        offloaded(CFG, 1, 1, max_chunk=48)
    off = offloaded(CFG, 1, 1)
    with pytest.raises(ValueError, match="k and v must be"):
        off.append(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64))
    off.append(torch.randn(1, 1, 4, 64, device=DEVICE), torch.randn(1, 1, 4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="queries"):
        off.attend(torch.randn(1, 2, 5, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"selection must be \[1, H_sel, 1, G\]"):
        off.prefetch(torch.zeros(2, 1, 1, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="prefetch_into must be another layer"):
        off.attend(torch.randn(1, 2, 1, 64, device=DEVICE), prefetch_into=off)


def _prefetching(*layers):
    """Skip where the prefetch is off: on a GPU whose csrc gather did not build."""
    if not all(off.takes_prefetches for off in layers):
        pytest.skip("the prefetch needs the csrc gather on CUDA")


def _fill(off, k, v, n):
    for lo in range(0, n, off.max_chunk):
        hi = min(lo + off.max_chunk, n)
        off.append(k[:, :, lo:hi], v[:, :, lo:hi])


def _decode(off, q, k, v, t, state, prefetch_into=None):
    off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    return off.attend(q[:, :, t : t + 1], state=state, prefetch_into=prefetch_into)


def test_a_prefetch_serves_the_next_layers_refresh():
    """A layer whose selection the previous one prefetched finds every selected block resident
    (two layers with the same keys and queries select the same blocks); its result is exact,
    and the prefetch's bytes count apart from its misses."""
    q, k, v = qkv(1, 4, 2, 530, seed=21)
    layers = [offloaded(CFG, 1, 2) for _ in range(3)]  # the third gets no prefetch
    _prefetching(*layers)
    for off in layers:
        _fill(off, k, v, 520)
    states = [HiPDecodeState() for _ in layers]
    theirs = HiPDecodeState()
    for t in range(520, 530):
        before = [off.stats() for off in layers]
        first = _decode(layers[0], q, k, v, t, states[0], prefetch_into=layers[1])
        outs = [_decode(off, q, k, v, t, state)
                for off, state in zip(layers[1:], states[1:], strict=True)]  # fmt: skip
        want = hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], CFG,
                             state=theirs)  # fmt: skip
        for out in (first, *outs):
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        after = [off.stats() for off in layers]
        assert after[1]["misses"] == before[1]["misses"]  # all prefetched
        assert (after[1]["hits"] > before[1]["hits"]) == (states[0].tokens_since_refresh == 1)
        # the prefetch brought at least what the third layer missed
        ahead = after[1]["prefetched_bytes"] - before[1]["prefetched_bytes"]
        assert ahead >= after[2]["bytes_moved"] - before[2]["bytes_moved"]
    assert layers[2].stats()["misses"] > 0
    stats = layers[1].stats()
    assert stats["prefetched_bytes"] == stats["bytes_moved"] > layers[2].stats()["bytes_moved"]
    assert layers[0].stats()["prefetched_bytes"] == 0


def test_a_prefetch_that_evicts_a_reused_selection_leaves_the_reuse_exact():
    """A prefetch may evict the blocks a layer's current selection reads (here a cache of one
    selection's blocks, and another layer's unrelated selection): the layer's next decode
    step, which reuses its selection, looks its slots up again and stays exact."""
    g = CFG.blocks_per_query_block
    q, k, v = qkv(1, 2, 1, 530, seed=22)
    q2, k2, v2 = qkv(1, 2, 1, 530, seed=23)
    target = offloaded(CFG, 1, 1, cache_blocks=g)
    source = offloaded(CFG, 1, 1)
    _prefetching(target)
    _fill(target, k, v, 520)
    _fill(source, k2, v2, 521)
    ours, theirs = HiPDecodeState(), HiPDecodeState()
    want = [hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], CFG,
                          state=theirs) for t in (520, 521)]  # fmt: skip
    torch.testing.assert_close(_decode(target, q, k, v, 520, ours), want[0], atol=1e-5, rtol=1e-5)
    _decode(source, q2, k2, v2, 521, HiPDecodeState(), prefetch_into=target)
    assert target.stats()["evictions"] > 0  # the prefetch displaced the selection's blocks
    got = _decode(target, q, k, v, 521, ours)
    assert ours.refreshes == 1  # a reuse step
    torch.testing.assert_close(got, want[1], atol=1e-5, rtol=1e-5)


def test_only_a_refresh_prefetches_and_prefetches_may_pile_up(monkeypatch):
    """A layer that looks its slots up again on a reuse step (another layer's prefetch moved
    them) does not prefetch: only a refresh does. Two prefetches into a layer before its next
    step land in order: the second evicts the first's blocks, and the step finds all of its
    blocks (the second's) and is exact."""
    q, k, v = qkv(1, 2, 1, 530, seed=24)
    a, b, c = (offloaded(CFG, 1, 1) for _ in range(3))
    _prefetching(a, b, c)
    for off in (a, b, c):
        _fill(off, k, v, 520)
    sb, sc = HiPDecodeState(), HiPDecodeState()
    _decode(a, q, k, v, 520, HiPDecodeState())
    _decode(b, q, k, v, 520, sb, prefetch_into=c)  # b refreshes at 520, 524, ...
    _decode(c, q, k, v, 520, sc)
    assert c.stats()["prefetched_bytes"] > 0
    calls = []
    monkeypatch.setattr(c, "prefetch", lambda *args, **kw: calls.append(args))
    _decode(a, q, k, v, 521, HiPDecodeState(), prefetch_into=b)  # b's slots may move
    _decode(b, q, k, v, 521, sb, prefetch_into=c)  # b reuses: looks up again, no prefetch
    assert sb.refreshes == 1 and b._fetched and not calls
    # two prefetches into a cache of one selection's blocks: other's, then a's
    g = CFG.blocks_per_query_block
    target = offloaded(CFG, 1, 1, cache_blocks=g)
    _fill(target, k, v, 522)
    q2, k2, v2 = qkv(1, 2, 1, 530, seed=25)
    other = offloaded(CFG, 1, 1)
    _fill(other, k2, v2, 522)
    _decode(other, q2, k2, v2, 522, HiPDecodeState(), prefetch_into=target)
    evicted = target.stats()["evictions"]
    _decode(a, q, k, v, 522, HiPDecodeState(), prefetch_into=target)
    assert target.stats()["evictions"] > evicted  # a's blocks displaced other's
    before = target.stats()
    got = _decode(target, q, k, v, 522, HiPDecodeState())  # refreshes as a did
    assert target.stats()["misses"] == before["misses"]
    want = hip_attention(q[:, :, 522:523], k[:, :, :523], v[:, :, :523], CFG)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots,per_head", [(64, False), (48, True)])
def test_a_prefetch_of_per_head_selections_gives_each_kv_head_its_own_or_the_union(slots, per_head):
    """``head_sharing="head"``, batch 2: the union of a selection's 4 heads (32 blocks) goes to
    every KV head while it takes at most half the slots, else each KV head gets its own two
    heads' blocks; a twin layer then misses nothing, exactly."""
    cfg = CFG.replace(head_sharing="head")
    q, k, v = qkv(2, 4, 2, 530, seed=26)
    first, second = (offloaded(cfg, 2, 2, cache_blocks=slots) for _ in range(2))
    _prefetching(second)
    for off in (first, second):
        _fill(off, k, v, 520)
    requests = []
    ensure = second.cache.ensure
    second.cache.ensure = lambda blocks, *a, **kw: (
        requests.append(blocks),
        ensure(blocks, *a, **kw),
    )  # type: ignore
    _decode(first, q, k, v, 520, HiPDecodeState(), prefetch_into=second)
    (blocks,) = requests
    selection = first._resident[0]  # [2, 4, 1, G]
    want = selection.reshape(2, 2, -1) if per_head else selection.reshape(2, 1, -1).expand(2, 2, -1)
    assert torch.equal(blocks, want.reshape(4, -1))
    before = second.stats()
    got = _decode(second, q, k, v, 520, HiPDecodeState())
    assert second.stats()["misses"] == before["misses"]
    want = hip_attention(q[:, :, 520:521], k[:, :, :521], v[:, :, :521], cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not 2 KV heads' worth that fit them"):
        second.prefetch(torch.zeros(2, 3, 1, slots, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"selection must be \[2, H_sel, 1, G\]"):
        second.prefetch(torch.zeros(2, 4, 2, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="selection must be on"):
        second.prefetch(torch.zeros(2, 4, 1, 8, dtype=torch.int32, device="meta"))
