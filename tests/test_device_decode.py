"""Device decode (``hip_attention(..., length=)``): the same results as the host-driven decode
state, with every length in device memory and the same launches at every step."""

import pytest
import torch

from hip_attn import HiPConfig, HiPDecodeState, hip_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64,
                refresh_interval=4, dense_threshold=0)  # fmt: skip


def _step_both(q, k, v, t, buffers, cfg, host, dev):
    """Decode token ``t`` through the host-driven state on K/V views and through the device
    path on the buffers (``length`` already counts it); the outputs must agree."""
    k_buf, v_buf, length = buffers
    row = q[:, :, t : t + 1]
    want = hip_attention(row, k[:, :, : t + 1], v[:, :, : t + 1], cfg, state=host)
    got = hip_attention(row, k_buf, v_buf, cfg, state=dev, length=length)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "hq,hkv,sharing,dtype,leaves",
    [
        # the search launch extends the tree beside the search, at every step
        (4, 2, "kv_group", torch.float32, "summary"),
        (4, 2, "head", torch.float32, "keys"),  # the leaves read the buffer's keys
        (4, 2, "kv_group", torch.float32, "keys"),
        (2, 1, "kv_group", torch.bfloat16, "summary"),
    ],
)
def test_device_steps_equal_the_host_decode_state(rand_qkv, hq, hkv, sharing, dtype, leaves):
    cfg = CFG.replace(head_sharing=sharing, leaf_scores=leaves)
    prompt, steps, capacity = 411, 14, 512
    q, k, v = rand_qkv(1, hq, hkv, prompt + steps, capacity, 64, dtype=dtype, device=DEVICE,
                       seed=40)  # fmt: skip
    k_buf, v_buf = k.clone(), v.clone()
    k_buf[:, :, prompt:] = v_buf[:, :, prompt:] = 1e4  # not written yet: must never be read
    host, dev = HiPDecodeState(), HiPDecodeState()
    ctx = slice(0, prompt)
    first = hip_attention(q[:, :, ctx], k[:, :, ctx], v[:, :, ctx], cfg, state=host)
    assert torch.equal(first, hip_attention(q[:, :, ctx], k[:, :, ctx], v[:, :, ctx], cfg,
                                            state=dev))  # fmt: skip
    length = torch.tensor([prompt], dtype=torch.int32, device=DEVICE)
    for t in range(prompt, prompt + steps):  # blocks complete at 416 and 424: refreshes too
        k_buf[:, :, t], v_buf[:, :, t] = k[:, :, t], v[:, :, t]
        length += 1
        _step_both(q, k, v, t, (k_buf, v_buf, length), cfg, host, dev)
        expected = host.indices
        assert expected is not None and dev.indices is not None
        width = expected.shape[-1]
        assert torch.equal(dev.indices[..., :width], expected)
        assert (dev.indices[..., width:] == -1).all()
    assert host.refreshes == -(-steps // cfg.refresh_interval)


@pytest.mark.parametrize(
    "sharing,leaves,kernels",
    [
        ("kv_group", "summary", True),  # the search extends each sequence's tree itself
        ("head", "keys", True),  # the gated extension launch, leaves from the buffer's keys
        ("kv_group", "summary", False),  # the PyTorch reference: a loop over the sequences
    ],
)
def test_a_count_per_sequence_decodes_each_as_if_alone(rand_qkv, monkeypatch, sharing, leaves,
                                                       kernels):  # fmt: skip
    """A left-padded batch on the device: each sequence's keys first in its row, ``length``
    one count per sequence. The device steps continue each sequence's host-driven history
    (``state.sequence(b)``: a prefill alone, host steps mid-cycle, a short chunk; later one
    sequence's host step between device steps), give each sequence the output and selection of
    its own host-driven decode over its own keys at every step (refreshing or not, blocks
    completing at different steps), host steps after them continue their schedule, and a
    host call on the batch's state starts afresh."""
    if not kernels:
        monkeypatch.setattr("hip_attn.attention.uses_triton", lambda device: False)
    cfg = CFG.replace(head_sharing=sharing, leaf_scores=leaves)
    prompts, capacity = [211, 150, 178], 256
    q, k, v = rand_qkv(3, 4, 2, capacity, capacity, 32, device=DEVICE, seed=47)
    k_buf, v_buf = torch.full_like(k, 1e4), torch.full_like(v, 1e4)  # 1e4: must never be read
    hosts, dev = [HiPDecodeState() for _ in prompts], HiPDecodeState()

    def host_step(b, rows, keys):  # one host-driven call of sequence b alone, on both sides
        args = (q[b : b + 1, :, rows], k[b : b + 1, :, :keys], v[b : b + 1, :, :keys], cfg)
        want = hip_attention(*args, state=hosts[b])
        torch.testing.assert_close(hip_attention(*args, state=dev.sequence(b)), want)
        k_buf[b, :, :keys], v_buf[b, :, :keys] = k[b, :, :keys], v[b, :, :keys]

    def device_steps(ends, steps):  # sequence b holds ends[b] keys; returns them after
        length = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
        for _ in range(steps):
            for b, t in enumerate(ends):
                k_buf[b, :, t], v_buf[b, :, t] = k[b, :, t], v[b, :, t]
            length += 1
            rows = torch.stack([q[b, :, t] for b, t in enumerate(ends)])[:, :, None]
            got = hip_attention(rows, k_buf, v_buf, cfg, state=dev, length=length)
            for b, t in enumerate(ends):
                want = hip_attention(rows[b : b + 1], k[b : b + 1, :, : t + 1],
                                     v[b : b + 1, :, : t + 1], cfg, state=hosts[b])  # fmt: skip
                torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)
                if kernels:
                    width = hosts[b].indices.shape[-1]
                    row = dev.indices[b : b + 1]
                    assert torch.equal(row[..., :width], hosts[b].indices), (b, t)
                    assert (row[..., width:] == -1).all()
            ends = [t + 1 for t in ends]
        return ends

    for b, n in enumerate(prompts):  # each prefill alone, as a patched model's padded batch's
        host_step(b, slice(0, n), n)
    for t in range(150, 155):  # sequence 1: host decode steps, mid-cycle
        host_step(1, slice(t, t + 1), t + 1)
    host_step(2, slice(178, 181), 181)  # sequence 2: a chunk shorter than a query block
    ends = device_steps([211, 155, 181], 5)
    host_step(1, slice(160, 161), 161)  # one sequence's host step: the next device step sets up
    ends = device_steps([ends[0], 161, ends[2]], 4)
    assert [h.refreshes for h in hosts] == [3, 4, 3]
    for b, n in enumerate(ends):  # host steps after the device's, on each sequence's state
        for t in range(n, n + 3):
            host_step(b, slice(t, t + 1), t + 1)
            assert dev.sequence(b).tokens_since_refresh == hosts[b].tokens_since_refresh
    assert [h.refreshes for h in hosts] == [3, 5, 4]
    # a host call on the batch's state after its device steps: no selection kept
    hip_attention(q[:1, :, 220:221], k[:1, :, :221], v[:1, :, :221], cfg, state=dev)
    assert dev.refreshes == 1 and dev.tokens_since_refresh == 1 and not dev.sequences


def _host_call(states, q, k, v, rows, keys, cfg):
    for s in states:  # the same host-driven call on each state
        hip_attention(q[:, :, rows], k[:, :, :keys], v[:, :, :keys], cfg, state=s)


def _device_steps(q, k, v, start, steps, cfg, host, dev, buffers=None):
    """Decode ``steps`` tokens from ``start`` keys on both paths; the device path's buffers
    are filled as it goes. Returns the buffers and how often the host path refreshed."""
    if buffers is None:  # the keys so far, then what must never be read
        buffers = (k.clone(), v.clone())
        buffers[0][:, :, start:] = buffers[1][:, :, start:] = 1e4
    k_buf, v_buf = buffers
    length = torch.tensor([start], dtype=torch.int32, device=DEVICE)
    refreshed = host.refreshes
    for t in range(start, start + steps):
        k_buf[:, :, t], v_buf[:, :, t] = k[:, :, t], v[:, :, t]
        length += 1
        _step_both(q, k, v, t, (k_buf, v_buf, length), cfg, host, dev)
        if host.indices is not None:
            width = host.indices.shape[-1]
            assert torch.equal(dev.indices[..., :width], host.indices), t
    return (k_buf, v_buf), host.refreshes - refreshed


@pytest.mark.parametrize(
    "history",
    [
        "mid_cycle",  # host decode steps first: the device continues their selection
        "short_chunk",  # a chunk shorter than a query block: its selection serves 3 queries
        "dense",  # at or below dense_threshold the host runs dense, then refreshes
        "rollback",  # the cache cropped after host steps: the selection is stale
        "new_sequence",  # a second sequence's prompt, dense, in the same state
        "mixed",  # device steps, one host step, device steps again
    ],
)
def test_device_steps_take_over_the_host_refresh_schedule(rand_qkv, history):
    """Whatever host-driven history a state has, device steps refresh when the host rule
    would (and the host rule picks up after device steps): the same outputs and selections
    step by step."""
    cfg = CFG.replace(dense_threshold=None) if history in ("dense", "new_sequence") else CFG
    both = (host, dev) = HiPDecodeState(), HiPDecodeState()
    q, k, v = rand_qkv(1, 4, 2, 440, 440, 64, device=DEVICE, seed=44)
    if history == "new_sequence":  # the first sequence: a prefill and host decode steps
        _host_call(both, q, k, v, slice(0, 300), 300, cfg)
        for t in range(300, 310):
            _host_call(both, q, k, v, slice(t, t + 1), t + 1, cfg)
        q, k, v = rand_qkv(1, 4, 2, 440, 440, 64, device=DEVICE, seed=45)
    prompt = {"dense": 130, "new_sequence": cfg.effective_dense_threshold}.get(history, 400)
    _host_call(both, q, k, v, slice(0, prompt), prompt, cfg)
    start, steps = prompt, 12
    if history == "mid_cycle":
        for t in range(prompt, prompt + 6):
            _host_call(both, q, k, v, slice(t, t + 1), t + 1, cfg)
        start = prompt + 6
    elif history == "short_chunk":
        _host_call(both, q, k, v, slice(prompt, prompt + 3), prompt + 3, cfg)
        start = prompt + 3
    elif history == "dense":
        steps = 24  # crosses sinks + k + window = 144 keys
    elif history == "rollback":
        for t in range(prompt, prompt + 18):
            _host_call(both, q, k, v, slice(t, t + 1), t + 1, cfg)
        start = prompt + 4  # cropped to 404 keys: what follows is new
        _, k_new, v_new = rand_qkv(1, 4, 2, 1, 440, 64, device=DEVICE, seed=46)
        k[:, :, start:], v[:, :, start:] = k_new[:, :, start:], v_new[:, :, start:]
    elif history == "mixed":
        buffers, refreshes = _device_steps(q, k, v, prompt, 6, cfg, host, dev)
        assert refreshes == 2
        _host_call(both, q, k, v, slice(prompt + 6, prompt + 7), prompt + 7, cfg)
        buffers[0][:, :, prompt + 6], buffers[1][:, :, prompt + 6] = (
            k[:, :, prompt + 6],
            v[:, :, prompt + 6],
        )
        start = prompt + 7
        _, refreshes = _device_steps(q, k, v, start, steps, cfg, host, dev, buffers)
        assert refreshes >= 3
        return
    _, refreshes = _device_steps(q, k, v, start, steps, cfg, host, dev)
    assert refreshes >= 2  # the steps compared span refreshes


def test_a_new_sequence_in_the_same_buffers_starts_afresh_in_place(rand_qkv):
    """A host-driven call (here the next sequence's prefill) makes the next device step set up
    again: from the new keys, in the same tensors (a captured graph stays valid)."""
    capacity = 448
    _, k_buf, v_buf = rand_qkv(1, 2, 1, 1, capacity, 64, device=DEVICE, seed=42)
    state = HiPDecodeState()
    kept = None
    for seq, prompt in ((0, 411), (1, 350)):
        q, k, v = rand_qkv(1, 2, 1, prompt + 6, prompt + 6, 64, device=DEVICE, seed=43 + seq)
        k_buf[:, :, : prompt + 6], v_buf[:, :, : prompt + 6] = k, v
        host = HiPDecodeState()
        for s in (host, state):
            hip_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], CFG, state=s)
        length = torch.tensor([prompt], dtype=torch.int32, device=DEVICE)
        for t in range(prompt, prompt + 6):
            length += 1
            _step_both(q, k, v, t, (k_buf, v_buf, length), CFG, host, state)
        device = state._device
        assert device is not None
        kept = kept or device
        assert device is kept  # the same tensors for the second sequence


def test_a_host_call_after_device_steps_and_a_rollback_drops_their_selection(rand_qkv):
    """Device steps to 233 keys, the cache cropped to 202 (``HiPCache.crop``), a host call:
    the selection a device step made after the crop point must not be reused (it reaches past
    the query's candidates, into keys that were replaced)."""
    cfg = HiPConfig(k=32, block_size_q=16, block_size_k=8, sink_tokens=8, window=16,
                    refresh_interval=16, dense_threshold=0)  # fmt: skip
    q, k, v = rand_qkv(1, 2, 1, 256, 256, 32, seed=0)
    k[:, :, 208:216] = 3 * q[:, :, 232].mean(1, keepdim=True)  # the step at 232 selects it
    state = HiPDecodeState()
    hip_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], cfg, state=state)
    length = torch.tensor([200], dtype=torch.int32, device=k.device)
    for t in range(200, 233):
        length += 1
        hip_attention(q[:, :, t : t + 1], k, v, cfg, state=state, length=length)
    assert state.indices is not None and int(state.indices.max()) >= 26  # past key 208
    k[:, :, 202:], v[:, :, 202:] = torch.randn_like(k[:, :, 202:]), torch.randn_like(v[:, :, 202:])
    row, kk, vv = q[:, :, 202:203], k[:, :, :203], v[:, :, :203]
    got = hip_attention(row, kk, vv, cfg, state=state)
    torch.testing.assert_close(got, hip_attention(row, kk, vv, cfg), atol=1e-5, rtol=1e-5)
    assert int(state.indices.max()) < 23  # the candidates of a query at 202 end at block 23


def test_a_rollback_behind_device_steps_is_seen_even_with_an_early_selection(rand_qkv):
    """As above, but the last device refresh (at 232 keys) selects early blocks only, within the
    candidates of a query at the crop point 220: the device state must still drop it and
    decode on like a state that ran every step on the host."""
    cfg = HiPConfig(k=32, block_size_q=16, block_size_k=8, sink_tokens=8, window=16,
                    refresh_interval=16, dense_threshold=0)  # fmt: skip
    q, k, v = rand_qkv(1, 2, 1, 256, 256, 32, seed=0)
    k[:, :, 16:48] = 3 * q[:, :, 232].mean(1, keepdim=True)  # blocks 2..5 for the step at 232
    dev, host = HiPDecodeState(), HiPDecodeState()
    for state in (dev, host):
        hip_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], cfg, state=state)
    length = torch.tensor([200], dtype=torch.int32, device=k.device)
    for t in range(200, 233):
        length += 1
        hip_attention(q[:, :, t : t + 1], k, v, cfg, state=dev, length=length)
        hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], cfg, state=host)
    k[:, :, 220:], v[:, :, 220:] = torch.randn_like(k[:, :, 220:]), torch.randn_like(v[:, :, 220:])
    for t in range(220, 224):  # the cache cropped to 220 keys, other tokens after it
        row, kk, vv = q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1]
        got = hip_attention(row, kk, vv, cfg, state=dev)
        torch.testing.assert_close(got, hip_attention(row, kk, vv, cfg, state=host), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
        assert torch.equal(dev.indices, host.indices)
        assert dev.tokens_since_refresh == host.tokens_since_refresh


def test_one_length_tensor_carried_to_other_buffers_is_no_rollback(rand_qkv):
    """The caller advances one ``length`` in place and moves to other key buffers without a
    host call: the state must continue its selection and refresh phase, as with a new tensor."""
    cfg = HiPConfig(k=32, block_size_q=16, block_size_k=8, sink_tokens=8, window=16,
                    refresh_interval=16, dense_threshold=0)  # fmt: skip
    q, k, v = rand_qkv(1, 2, 1, 256, 256, 32, seed=0)
    phases = []
    for same_tensor in (False, True):
        state = HiPDecodeState()
        hip_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], cfg, state=state)
        for t in range(200, 203):
            hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], cfg, state=state)
        length = torch.tensor([203], dtype=torch.int32, device=k.device)
        for _ in range(6):  # set-ups only, as the device steps on these buffers would do
            length += 1
            state.device_buffers(k.clone(), length, cfg, 1)
        length = length if same_tensor else length.clone()
        length += 1
        state.device_buffers(k.clone(), length, cfg, 1)  # other buffers, no host call between
        assert state.indices is not None and bool((state.indices >= 0).any())
        phases.append(state._anchor)
    assert phases[0] == phases[1]


def test_bad_lengths_raise(rand_qkv):
    q, k, v = rand_qkv(1, 2, 1, 1, 128, 64)
    state = HiPDecodeState()
    one = torch.tensor([100], dtype=torch.int32)
    with pytest.raises(TypeError, match="length must be a torch.Tensor"):
        hip_attention(q, k, v, CFG, state=state, length=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"int32 tensor on cpu of one element or \[1\]"):
        hip_attention(q, k, v, CFG, state=state, length=one.long())
    with pytest.raises(ValueError, match=r"one element or \[1\].*shape \(2,\)"):
        hip_attention(q, k, v, CFG, state=state, length=torch.tensor([9, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs a HiPDecodeState and one query token"):
        hip_attention(q, k, v, CFG, length=one)
    q2, _, _ = rand_qkv(1, 2, 1, 2, 128, 64)
    with pytest.raises(ValueError, match="2 queries"):
        hip_attention(q2, k, v, CFG, state=state, length=one)
    scalar = torch.tensor(100, dtype=torch.int32)  # one element, of any shape
    want = hip_attention(q, k[:, :, :100], v[:, :, :100], CFG, state=HiPDecodeState())
    got = hip_attention(q, k, v, CFG, state=HiPDecodeState(), length=scalar)
    torch.testing.assert_close(got, want)
    _, k3, v3 = rand_qkv(3, 2, 1, 1, 128, 64)
    q3, _, _ = rand_qkv(3, 2, 1, 1, 128, 64)
    bad = torch.tensor([100, 129, 60], dtype=torch.int32)  # one count per sequence
    with pytest.raises(ValueError, match=r"length must be in \[1, 128\].*got 129"):
        hip_attention(q3, k3, v3, CFG, state=HiPDecodeState(), length=bad)
    state.sequence(1)  # exists now: a bad index must not find it either
    for b, error in ((True, TypeError), (1.0, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="b must be"):
            state.sequence(b)
    for n in (-5, 0, 129):  # read at the setup step (and on the host-driven path)
        bad = torch.tensor([n], dtype=torch.int32)
        with pytest.raises(ValueError, match=rf"length must be in \[1, 128\].*got {n}"):
            hip_attention(q, k, v, CFG, state=HiPDecodeState(), length=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_captured_in_a_cuda_graph_replays_like_the_host_decode(rand_qkv):
    prompt, steps, capacity = 411, 12, 512
    q, k, v = rand_qkv(1, 4, 2, prompt + steps, capacity, 64, device="cuda", seed=41)
    k_buf, v_buf = k.clone(), v.clone()
    k_buf[:, :, prompt:] = v_buf[:, :, prompt:] = 1e4
    host, dev = HiPDecodeState(), HiPDecodeState()
    for state in (host, dev):
        hip_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], CFG, state=state)
    length = torch.tensor([prompt], dtype=torch.int32, device="cuda")
    q_new, k_new, v_new = q[:, :, :1].clone(), k[:, :, :1].clone(), v[:, :, :1].clone()

    def step() -> torch.Tensor:  # everything on the device: write the token, count it, attend
        k_buf.index_copy_(2, length.long(), k_new)
        v_buf.index_copy_(2, length.long(), v_new)
        length.add_(1)
        return hip_attention(q_new, k_buf, v_buf, CFG, state=dev, length=length)

    def feed(t: int) -> torch.Tensor:
        for new, full in ((q_new, q), (k_new, k), (v_new, v)):
            new.copy_(full[:, :, t : t + 1])
        return hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], CFG,
                             state=host)  # fmt: skip

    want = feed(prompt)
    torch.testing.assert_close(step(), want, atol=1e-2, rtol=1e-2)  # warm-up: compiles, sets up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in range(prompt + 1, prompt + steps):  # refreshes at 416 and 420 keys
        want = feed(t)
        graph.replay()
        torch.testing.assert_close(out, want, atol=1e-2, rtol=1e-2)
        assert dev.indices is not None and host.indices is not None
        assert torch.equal(dev.indices[..., : host.indices.shape[-1]], host.indices)
