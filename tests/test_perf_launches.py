"""The launch counts of ``LAUNCH_PROFILES["today"]`` recounted from the code (and the host
syncs of a decode step, none): every PyTorch op
that launches a kernel (not a view, not an allocation, not on an empty tensor) and every Triton
launch of one ``hip_attention`` call on a GPU-shaped problem (Llama-3.1-8B heads, bf16, the
default ``HiPConfig``, an H100's 132 SMs for the launch shape). The Triton kernels are counted,
not run, so this takes a second on the CPU.

The bytes a patched model's decode step writes are counted the same way (what those PyTorch ops
produce; the Triton kernels write their fixed-size outputs: the selection, the attention
output, the summaries of a completed block)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from hip_attn.perf.estimator import LAUNCH_PROFILES  # noqa: E402

STALE = (
    "hip_attention's launches changed: update LAUNCH_PROFILES['today'] (hip_attn/perf/estimator.py)"
    " and docs/roofline.md 'Latency floors'"
)
_ALLOCATIONS = {"aten.empty", "aten.empty_like", "aten.empty_strided"}
#: Ops whose result the host must wait for on a GPU (a device-to-host read).
_SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal"}


class _Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.syncs = 0
        self.bytes = 0
        self.grids: dict[str, Any] = {}
        self.launches: list[Any] = []
        self.ops: list[Any] = []  # every PyTorch op with its arguments (see _signature)
        self.allocations = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.syncs += str(func.overloadpacket) in _SYNCS
        self.ops.append((str(func), _signature(args), _signature(kwargs)))
        self.allocations += str(func.overloadpacket) in _ALLOCATIONS
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else [out]
        launches = not func.is_view and str(func.overloadpacket) not in _ALLOCATIONS
        written = [o for o in outs if isinstance(o, torch.Tensor) and o.numel()]
        if launches and written:
            self.count += 1
            self.bytes += sum(o.numel() * o.element_size() for o in written)
        return out


def _signature(args: Any) -> Any:
    """A launch's arguments as a CUDA graph captures them, but for the addresses of tensors
    (fresh allocations, e.g. outputs, come from the graph's pool: fixed across replays)."""
    if isinstance(args, dict):
        return tuple(sorted((k, _signature(v)) for k, v in args.items()))
    if isinstance(args, tuple | list):
        return tuple(_signature(a) for a in args)
    if isinstance(args, torch.Tensor):
        return ("tensor", args.dtype, tuple(args.shape), args.stride())
    return args


class _Launch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` counts, notes the grid
    and returns."""

    def __init__(self, counter: _Kernels, name: str) -> None:
        self.counter, self.name = counter, name

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.counter.count += 1
            self.counter.grids[self.name] = grid
            self.counter.launches.append((self.name, grid, _signature(args), _signature(kwargs)))

        return launch


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> _Kernels:
    import hip_attn.attention as attention
    import hip_attn.triton_kernels.attention as sparse
    import hip_attn.triton_kernels.mask as mask
    import hip_attn.triton_kernels.tree as tree

    counter = _Kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "uses_triton", lambda device: True)
    monkeypatch.setattr(attention, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(mask, "_hip_mask_kernel", _Launch(counter, "_hip_mask_kernel"))
    monkeypatch.setattr(
        sparse, "_sparse_attention_kernel", _Launch(counter, "_sparse_attention_kernel")
    )
    monkeypatch.setattr(tree, "_extend_tree_kernel", _Launch(counter, "_extend_tree_kernel"))
    return counter


def _qkv(tq: int, tk: int, heads: int, kv_heads: int) -> tuple[Any, Any, Any]:
    def rand(h: int, t: int) -> Any:
        return torch.randn(1, h, t, 128, dtype=torch.bfloat16)

    return rand(heads, tq), rand(kv_heads, tk), rand(kv_heads, tk)


def test_decode_launches(counter: _Kernels) -> None:
    from hip_attn.attention import HiPDecodeState, hip_attention

    today = LAUNCH_PROFILES["today"]
    q, k, v = _qkv(1, 4106, 32, 8)
    state = HiPDecodeState()
    # as in generation: the prefill builds the summary tree (with room to grow) that the decode
    # steps extend, and each step appends one token; the refreshes at 4096 and 4104 keys
    # each complete a block, which the search launch summarizes beside the search
    prompt, _, _ = _qkv(128, 4095, 32, 8)
    hip_attention(prompt, k[:, :, :4095], v[:, :, :4095], state=state)
    counts = []
    for keys in range(4096, 4107):
        counter.count = 0
        with counter:
            hip_attention(q, k[:, :, :keys], v[:, :, :keys], state=state)
        counts.append(counter.count)
    assert counter.syncs == 0  # no step reads the device from the host
    assert state.refreshes == 2
    refresh, reuse = today.hip_decode_refresh, today.hip_decode_reuse
    # the first split step also zeroes the arrival counters the state keeps for the next ones
    expected = [refresh + 1] + [reuse] * 7 + [refresh] + [reuse] * 2
    assert counts == expected, f"{STALE}: decode launches {counts}"


def test_prefill_launches(counter: _Kernels) -> None:
    from hip_attn import HiPConfig
    from hip_attn.attention import hip_attention
    from hip_attn.geometry import tree_blocks

    q, k, v = _qkv(2048, 2048, 2, 1)
    with counter:
        hip_attention(q, k, v)
    assert counter.count == LAUNCH_PROFILES["today"].hip_prefill, f"{STALE}: {counter.count}"
    # the tree: one program per run of 32 blocks (in parallel), then one per tree for the
    # levels above; never a program walking every block
    runs = -(-tree_blocks(2048, HiPConfig()) // 32)
    trees = [grid for name, grid, *_ in counter.launches if name == "_extend_tree_kernel"]
    assert runs > 1 and trees == [(runs, 1), (1, 1)]
    # (batch x query heads, query blocks, splits): in launch order the two heads sharing one
    # KV head, hence one selection, are adjacent programs and read the same blocks together
    assert counter.grids["_sparse_attention_kernel"] == (2, 2048 // 64, 1)


def test_a_refresh_crossing_a_run_extends_the_tree_in_one_launch(counter: _Kernels) -> None:
    """A refresh's few blocks (here the 64th, which completes a level-6 node) take one
    program per tree for every level, not the parallel build's two launches."""
    from hip_attn import HiPConfig
    from hip_attn.geometry import first_candidate_block, node_summaries
    from hip_attn.triton_kernels.tree import extend_tree_triton

    config = HiPConfig()
    tk = (first_candidate_block(config) + 64) * config.block_size_k
    _, k, _ = _qkv(1, tk, 1, 1)
    tree = node_summaries(k[:, :, : tk - config.block_size_k], config, min_capacity=64)
    with counter:
        extend_tree_triton(tree, k, 63, config)
    assert counter.count == 1 and counter.grids["_extend_tree_kernel"] == (1, 1)


@pytest.mark.parametrize("cache", ["HiPCache", "DynamicCache"])
@torch.no_grad()
def test_decode_step_writes_do_not_grow_with_the_context(counter: _Kernels, cache: str) -> None:
    """``generate``'s cache under ``patch`` (HiPCache) writes the new token in place; transformers'
    DynamicCache, the control, copies the whole cache every step."""
    pytest.importorskip("transformers")
    import transformers

    import hip_attn
    from hip_attn.patches.cache import HiPCache
    from hip_attn.patches.compat import cache_kwarg
    from hip_attn.tiny_model import random_llama

    model = random_llama(0, layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)
    config = hip_attn.HiPConfig(k=64, block_size_q=16, block_size_k=8, sink_tokens=16,
                                window=32, refresh_interval=4, dense_threshold=0)  # fmt: skip
    hip_attn.patch(model, config)
    make = {"HiPCache": HiPCache, "DynamicCache": lambda c: transformers.DynamicCache(config=c)}
    token = torch.zeros(1, 1, dtype=torch.long)
    name = cache_kwarg(model)
    written = {}
    for context in (600, 1800):
        past = make[cache](model.config)
        model(torch.randint(3, 128, (1, context)), **{name: past})
        steps = []
        for _ in range(9):  # two refreshes, one completing a block
            counter.bytes = counter.syncs = 0
            with counter:
                model(token, **{name: past})
            steps.append(counter.bytes)
            assert counter.syncs == 0
        written[context] = steps
    growth = [b - a for a, b in zip(written[600], written[1800], strict=True)]
    if cache == "HiPCache":
        assert growth == [0] * 9, written
    else:  # 1,200 more tokens of K and V, fp32, 2 KV heads of 16 dims, 2 layers, copied
        assert min(growth) >= 1200 * 2 * 2 * 16 * 4 * 2, written


@pytest.mark.parametrize("summary_leaves", [False, True], ids=["default", "summary-leaves"])
def test_device_decode_launches_the_same_way_at_every_step(
    counter: _Kernels, summary_leaves: bool
) -> None:
    """hip_attention(..., length=): after the step that sets the state up, every step (reusing
    or refreshing) makes the same launches with the same arguments, reads nothing back, runs
    no PyTorch op and allocates only its output: what a CUDA graph can capture once and
    replay. Two launches: the search, whose last column of programs extends the tree (either
    leaf rule), and the sparse attention, whose last split merges."""
    from hip_attn import HiPConfig
    from hip_attn.attention import HiPDecodeState, hip_attention

    lighter = HiPConfig(beam=1, query_pool_stride=2, leaf_scores="summary")
    config = lighter if summary_leaves else None
    q, k, v = _qkv(1, 8192, 32, 8)  # buffers for 8K tokens
    state = HiPDecodeState()
    prompt, _, _ = _qkv(128, 4095, 32, 8)
    hip_attention(prompt, k[:, :, :4095], v[:, :, :4095], config, state=state)
    length = torch.tensor([4095], dtype=torch.int32)
    steps, buffers = [], []
    for _ in range(12):  # 4096 .. 4107 keys: refreshes at 4096 and 4104, blocks complete
        length += 1
        counter.count = counter.syncs = counter.allocations = 0
        counter.launches = []
        with counter:
            hip_attention(q, k, v, config, state=state, length=length)
        steps.append((counter.count, counter.syncs, counter.launches, counter.allocations))
        buffers.append(state._device)
    _, *rest = steps
    assert all(b is buffers[0] for b in buffers)  # set up once, then only read and updated
    names = [name for name, grid, *_ in rest[0][2]]
    assert names == ["_hip_mask_kernel", "_sparse_attention_kernel"]
    assert rest[0][2][0][1] == (2, 8)  # the query block's column, the extension's; 8 KV heads
    for count, syncs, launches, allocations in rest:
        assert syncs == 0 and count == len(launches) == len(names)  # Triton launches only
        assert launches == rest[0][2]
        assert allocations == 1  # the output: the split partials and counters are kept


@pytest.mark.parametrize(
    "sample,family,padded",
    [(False, "llama", False), (True, "llama", False), (False, "gemma3", False),
     (False, "llama", True), (False, "gemma3", True)],
    ids=["greedy", "sampled", "gemma3-sliding", "left-padded", "gemma3-left-padded"],
)  # fmt: skip
@torch.no_grad()
def test_a_patched_models_decode_step_is_the_same_at_every_step(
    counter: _Kernels, sample: bool, family: str, padded: bool
) -> None:
    """graph_generate's decode step over a HiPCache on the device: the model's forward, picking
    the token (argmax, or a draw after temperature, top-k and top-p) and the bookkeeping run
    the same PyTorch ops with the same arguments and the same Triton launches at every step
    (reusing or refreshing the selection, completing blocks; Gemma-3's sliding layer writing
    its ring around; a left-padded batch of two, each sequence at its own count, in the
    launches of one sequence), and read nothing back: what one CUDA graph replays. Also on
    transformers 5.17."""
    pytest.importorskip("transformers")
    import hip_attn
    from hip_attn.patches.graph_generate import prefill
    from hip_attn.patches.sampling import Sampling
    from hip_attn.tiny_model import random_llama

    config = hip_attn.HiPConfig(k=64, block_size_q=16, block_size_k=8, sink_tokens=16,
                                window=32, refresh_interval=4, dense_threshold=0)  # fmt: skip
    if family == "gemma3":  # layer 0 slides over 32 tokens (dense), layer 1 is HiP's
        from tests.test_patches import make_model

        model = hip_attn.patch(make_model("gemma3"), config)
    else:
        model = random_llama(0, layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)
        hip_attn.patch(model, config, dense_layers=[1])
    sampling = Sampling(do_sample=sample, temperature=0.7, top_k=20, top_p=0.9)
    batch, starts = (2, [0, 7]) if padded else (1, None)
    step = prefill(model, torch.randint(3, 128, (batch, 600)), 16, sampling, starts)
    step()  # sets up the device state of each layer (a CUDA graph's warm-up step)
    steps = []
    for _ in range(12):  # refreshes at steps 2, 6, 10; blocks complete at 608 and 616 keys
        counter.count = counter.syncs = 0
        counter.ops, counter.launches = [], []
        with counter:
            step()
        steps.append((counter.syncs, counter.ops, counter.launches))
    assert int(step.position) == 613
    first = steps[0]
    # one layer's device decode (a context this short needs no split), the whole batch in
    # each launch: the search beside the tree's extension, the attention
    grids = [(name, tuple(grid)) for name, grid, *_ in first[2]]
    assert grids == [("_hip_mask_kernel", (2, batch * 2)),
                     ("_sparse_attention_kernel", (batch * 2, 1, 1))]  # fmt: skip
    assert any("scaled_dot_product" in op for op, *_ in first[1])  # the dense layer
    assert any("exponential" in op for op, *_ in first[1]) == sample
    for syncs, ops, launches in steps:
        assert syncs == 0 and ops == first[1] and launches == first[2]


@pytest.mark.parametrize("leaves", ["summary", "keys"])
@torch.no_grad()
def test_offloaded_decode_steps_read_nothing_back(leaves: str) -> None:
    """KV offload's decode steps: appending a token, and on a refresh step the block cache's
    lookup, LRU and eviction (device tensors of fixed shapes) and the gather of the misses
    (a fixed-length list, the entries not to copy marked) read nothing back to the host; with
    keys at the leaves, a refresh fetches the leaf candidates first, the same way."""
    from hip_attn import HiPConfig, HiPDecodeState
    from hip_attn.offload import OffloadedKV

    config = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64,
                       refresh_interval=4, dense_threshold=0, leaf_scores=leaves)  # fmt: skip
    # the kernels run: interpreted here, on the GPU where there is one (the reference reads back)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    off = OffloadedKV(config, 1, 2, 64, torch.float32, device, cache_blocks=64, max_chunk=128,
                      host_chunk_tokens=256)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 532, 64, generator=gen).to(device) for h in (4, 2, 2))
    off.prefill(q[:, :, :520], k[:, :, :520], v[:, :, :520])
    gathers = []

    def gather(rows, blocks, k_slots, v_slots):  # the host's part
        gathers.append(torch.stack([k_slots, v_slots]))

    off._gather = gather
    state, counter = HiPDecodeState(), _Kernels()
    for t in range(520, 532):  # refreshes at 520, 524, 528; blocks complete at 528
        with counter:
            off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
            off.attend(q[:, :, t : t + 1], state=state)
    assert counter.syncs == 0
    fetches = 2 if leaves == "keys" else 1  # the leaf candidates, then the selection
    assert state.refreshes * fetches == len(gathers) == 3 * fetches
    for first in range(fetches):  # each a fixed-length list
        assert all(g.shape == gathers[first].shape for g in gathers[first::fetches])
    assert (gathers[fetches - 1] >= 0).any()  # the first decode selection brought blocks in
    if leaves == "keys":  # the candidates' keys, then the selected ones' values (no keys)
        assert any((g[0] >= 0).any() for g in gathers[0::2])  # blocks were missing
        assert all((g[1] < 0).all() for g in gathers[0::2])
        assert all((g[0] < 0).all() and (g[1] >= 0).any() for g in gathers[1::2])


@torch.no_grad()
def test_an_offloaded_prefetch_reads_nothing_back() -> None:
    """A refreshing layer's prefetch into the next layer (its lookup, LRU and gather on the
    next layer's cache), and the next layer's refresh after it, read nothing back."""
    from hip_attn import HiPConfig, HiPDecodeState
    from hip_attn.offload import OffloadedKV

    config = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64,
                       refresh_interval=4, dense_threshold=0, leaf_scores="summary")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = [OffloadedKV(config, 1, 2, 64, torch.float32, device, cache_blocks=64,
                          max_chunk=128, host_chunk_tokens=256) for _ in range(2)]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 530, 64, generator=gen).to(device) for h in (4, 2, 2))
    for off in layers:
        for lo in range(0, 520, 128):
            off.append(k[:, :, lo : min(lo + 128, 520)], v[:, :, lo : min(lo + 128, 520)])
    if not layers[1].takes_prefetches:
        pytest.skip("the prefetch needs the csrc gather on CUDA")
    gathers = []
    for off in layers:  # the host's part (the CUDA kernel's reads no list back)
        off._gather = lambda *lists: gathers.append(lists)
    states, counter = [HiPDecodeState(), HiPDecodeState()], _Kernels()
    for t in range(520, 530):
        with counter:
            for off, state, into in zip(layers, states, (layers[1], None), strict=True):
                off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
                off.attend(q[:, :, t : t + 1], state=state, prefetch_into=into)
    assert counter.syncs == 0
    # per refresh: the first layer's fetch, its prefetch, the second layer's fetch
    assert states[0].refreshes == 3 and len(gathers) == 9
    assert layers[1].stats()["prefetched_bytes"] > 0


class _Noop:
    """A ``@triton.jit`` kernel's stand-in that does nothing (no bookkeeping of its own)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def test_device_decode_host_work_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's share of an eager device decode step, counted as the Python and builtin
    calls it makes (kernels stubbed): per layer and token this is what runs between launches.
    723 calls before the tree layout's closed forms (a binary search over an O(levels) sum,
    twice per step), about 300 after; the bound leaves room for other torch/Triton releases."""
    import sys

    import hip_attn.attention as attention
    import hip_attn.triton_kernels.attention as sparse
    import hip_attn.triton_kernels.mask as mask
    import hip_attn.triton_kernels.tree as tree
    from hip_attn.attention import HiPDecodeState, hip_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "_multiprocessors", lambda device: 132)
    # the tree kernel too: interpreted, summarizing the 4K-token prompt took a minute
    stubbed = ((mask, "_hip_mask_kernel"), (sparse, "_sparse_attention_kernel"),
               (tree, "_extend_tree_kernel"))  # fmt: skip
    for module, name in stubbed:
        monkeypatch.setattr(module, name, _Noop())
    q, k, v = _qkv(1, 8192, 32, 8)
    state = HiPDecodeState()
    prompt, _, _ = _qkv(128, 4095, 32, 8)
    hip_attention(prompt, k[:, :, :4095], v[:, :, :4095], state=state)
    length = torch.tensor([4096], dtype=torch.int32)
    hip_attention(q, k, v, state=state, length=length)  # sets the device state up
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        hip_attention(q, k, v, state=state, length=length)
    finally:
        sys.setprofile(None)
    assert 0 < calls <= 450, calls
