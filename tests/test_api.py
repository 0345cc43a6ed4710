"""The public API: dispatch, dense fallback, decode state, and errors for bad input."""

import logging

import pytest
import torch

import hip_attn
from hip_attn import HiPConfig, HiPDecodeState, estimate_mask, hip_attention
from hip_attn.attention import _warn_reference, uses_triton
from hip_attn.geometry import level_offset, node_summaries, tree_blocks, tree_capacity
from hip_attn.reference import (
    dense_attention_reference,
    estimate_mask_reference,
    hip_attention_reference,
)

CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64, dense_threshold=0)


def test_public_names():
    assert set(hip_attn.__all__) >= {
        "HiPConfig",
        "HiPDecodeState",
        "hip_attention",
        "estimate_mask",
        "__version__",
    }


def test_hip_attention_matches_reference_and_differs_from_dense(rand_qkv):
    q, k, v = rand_qkv(1, 4, 2, 400, 400, 64, seed=1)
    out = hip_attention(q, k, v, CFG)
    torch.testing.assert_close(out, hip_attention_reference(q, k, v, CFG), atol=1e-5, rtol=1e-5)
    assert (out - dense_attention_reference(q, k, v)).abs().max() > 1e-2


def test_estimate_mask_format(rand_qkv):
    q, k, _ = rand_qkv(2, 4, 2, 100, 500, 64, seed=2)
    idx = estimate_mask(q, k, CFG)
    assert idx.dtype == torch.int32 and idx.shape == (2, 2, 4, 8)
    torch.testing.assert_close(idx, estimate_mask_reference(q, k, CFG)[0], atol=0, rtol=0)
    per_head = estimate_mask(q, k, CFG.replace(head_sharing="head"))
    assert per_head.shape == (2, 4, 4, 8)


def test_scale_argument(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 200, 200, 64, seed=3)
    out = hip_attention(q, k, v, CFG, scale=0.3)
    torch.testing.assert_close(
        out, hip_attention_reference(q, k, v, CFG, scale=0.3), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("tq,tk", [(150, 150), (1, 150), (20, 150)])
def test_dense_fallback_at_or_below_threshold(rand_qkv, tq, tk):
    q, k, v = rand_qkv(1, 4, 2, tq, tk, 64, seed=tq)
    cfg = CFG.replace(dense_threshold=150)
    torch.testing.assert_close(
        hip_attention(q, k, v, cfg), dense_attention_reference(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_default_config_is_dense_on_short_inputs(rand_qkv):
    q, k, v = rand_qkv(1, 2, 1, 64, 64, 64, seed=4)
    assert HiPConfig().effective_dense_threshold == 64 + 512 + 256
    torch.testing.assert_close(
        hip_attention(q, k, v), dense_attention_reference(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_budget_covering_context_equals_dense_through_sparse_path(rand_qkv):
    q, k, v = rand_qkv(1, 4, 1, 257, 257, 64, seed=5)
    out = hip_attention(q, k, v, CFG.replace(k=1024))
    torch.testing.assert_close(out, dense_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_decode_state_refreshes_every_interval(rand_qkv):
    q, k, v = rand_qkv(1, 4, 2, 12, 612, 64, seed=6)
    cfg = CFG.replace(refresh_interval=4)
    state = HiPDecodeState()
    for step in range(12):
        tk = 601 + step
        qs, ks, vs = q[:, :, step : step + 1], k[:, :, :tk], v[:, :, :tk]
        out = hip_attention(qs, ks, vs, cfg, state=state)
        assert state.refreshes == step // 4 + 1
        if step % 4 == 0:  # a refresh step estimates from the current keys
            torch.testing.assert_close(state.indices, estimate_mask_reference(qs, ks, cfg)[0])
        expected = hip_attention_reference(qs, ks, vs, cfg, indices=state.indices)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert state.refreshes == 3


def test_prefill_call_resets_decode_state(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 100, 400, 64, seed=7)
    state = HiPDecodeState()
    hip_attention(q[:, :, -1:], k, v, CFG, state=state)
    assert state.indices is not None
    hip_attention(q, k, v, CFG, state=state)
    assert state.indices is None


def test_state_shared_across_mismatched_calls_raises(rand_qkv):
    q, k, v = rand_qkv(1, 4, 2, 1, 400, 64, seed=8)
    state = HiPDecodeState()
    hip_attention(q, k, v, CFG, state=state)
    with pytest.raises(ValueError, match="state"):
        hip_attention(q, k, v, CFG.replace(head_sharing="head"), state=state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA tensors always use the kernels")
def test_reference_fallback_is_logged_once(rand_qkv, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _warn_reference.cache_clear()
    q, k, v = rand_qkv(1, 2, 2, 100, 300, 64, seed=9)
    with caplog.at_level(logging.WARNING, logger="hip_attn"):
        out = hip_attention(q, k, v, CFG)
        hip_attention(q, k, v, CFG)
    assert not uses_triton(q.device)
    torch.testing.assert_close(out, hip_attention_reference(q, k, v, CFG))
    assert sum("PyTorch reference" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA tensors always use the kernels")
def test_an_interpreter_too_old_for_the_kernels_falls_back_to_the_reference(monkeypatch, caplog):
    import hip_attn.attention as attention

    monkeypatch.setattr(attention, "_triton_version", lambda: (3, 6))
    _warn_reference.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hip_attn"):
        assert not uses_triton(torch.device("cpu"))
    assert "Triton 3.6's interpreter cannot run the kernels; 3.8 or newer can" in caplog.text
    _warn_reference.cache_clear()


def _bad_inputs():
    q = torch.randn(1, 4, 8, 64)
    k = torch.randn(1, 2, 16, 64)
    v = torch.randn(1, 2, 16, 64)
    yield "rank", (q[0], k, v), ValueError, "q must have 4 dimensions"
    yield "batch", (q, torch.randn(2, 2, 16, 64), v), ValueError, "batch size"
    yield "head_dim", (q, torch.randn(1, 2, 16, 32), v), ValueError, "head_dim"
    yield "gqa", (q, torch.randn(1, 3, 16, 64), torch.randn(1, 3, 16, 64)), ValueError, "multiple"
    yield "v_heads", (q, k, torch.randn(1, 1, 16, 64)), ValueError, "v must have"
    yield "v_tokens", (q, k, torch.randn(1, 2, 15, 64)), ValueError, "v must have"
    yield "int", (q.long(), k, v), TypeError, "q must be float16"
    yield "mixed", (q, k.half(), v), TypeError, "k must have the dtype"
    yield "device", (q, k.to("meta"), v), ValueError, "k must be on the device"
    yield "stride", (q, torch.randn(1, 2, 64, 16).transpose(2, 3), v), ValueError, "stride"
    yield "tq>tk", (torch.randn(1, 4, 20, 64), k, v), ValueError, "more tokens"
    yield (
        "tiny_d",
        (torch.randn(1, 4, 8, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)),
        ValueError,
        "head_dim must be even and in",
    )
    yield (
        "odd_d",
        (torch.randn(1, 4, 8, 17), torch.randn(1, 2, 16, 17), torch.randn(1, 2, 16, 17)),
        ValueError,
        "head_dim must be even",
    )
    yield "not_tensor", (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"


@pytest.mark.parametrize(
    "name,args,exc,match", list(_bad_inputs()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_bad_inputs_raise_before_any_kernel(name, args, exc, match):
    with pytest.raises(exc, match=match):
        hip_attention(*args, CFG)
    if name not in ("v_heads", "v_tokens"):
        with pytest.raises(exc, match=match):
            estimate_mask(args[0], args[1], CFG)


def test_bad_options_raise(rand_qkv):
    q, k, v = rand_qkv(1, 2, 2, 4, 16, 64)
    with pytest.raises(TypeError, match="config"):
        hip_attention(q, k, v, {"k": 64})
    with pytest.raises(ValueError, match="scale"):
        hip_attention(q, k, v, CFG, scale=-1.0)
    with pytest.raises(TypeError, match="state"):
        hip_attention(q, k, v, CFG, state=object())


def test_multi_token_calls_count_tokens_toward_the_refresh(rand_qkv):
    """Short prefill chunks are not reused across more than refresh_interval new tokens."""
    q, k, v = rand_qkv(1, 2, 2, 24, 424, 64, seed=10)
    cfg = CFG.replace(refresh_interval=8)
    state = HiPDecodeState()
    refreshes = []
    for i, tq in enumerate([3, 3, 3, 8, 1]):  # 3+3 reuse; +3 > 8 refreshes; 8 alone refreshes
        end = 400 + sum([3, 3, 3, 8, 1][: i + 1])
        hip_attention(q[:, :, end - 400 - tq : end - 400], k[:, :, :end], v[:, :, :end], cfg,
                      state=state)  # fmt: skip
        refreshes.append(state.refreshes)
    assert refreshes == [1, 1, 2, 3, 4]


def test_selection_memory_does_not_grow_with_k_beyond_the_context(rand_qkv):
    """k = 2**26 on 256 tokens: the selection is as wide as the candidates, not 8M blocks."""
    q, k, _ = rand_qkv(1, 2, 1, 256, 256, 32, seed=5)
    huge = HiPConfig(k=2**26, block_size_q=64, sink_tokens=16, window=64)
    small = huge.replace(k=512)  # covers every candidate of 256 tokens too
    idx = estimate_mask(q, k, huge)
    assert idx.numel() * idx.element_size() < 4096
    assert torch.equal(idx, estimate_mask(q, k, small)[..., : idx.shape[-1]])
    assert torch.all(estimate_mask(q, k, small)[..., idx.shape[-1] :] == -1)


def test_a_rollback_below_the_dense_threshold_is_followed(rand_qkv, monkeypatch):
    """Cropped below ``dense_threshold``: the dense steps after the crop must tell the state,
    else its first sparse refresh trusts summaries of replaced keys up to the threshold."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference: fast, and the same rule
    cfg = HiPConfig(k=16, block_size_q=16, block_size_k=8, sink_tokens=8, window=16,
                    refresh_interval=1)  # fmt: skip
    threshold = cfg.effective_dense_threshold  # 40
    q, k, v = rand_qkv(1, 1, 1, 200, 200, 32, seed=3)
    state = HiPDecodeState()
    hip_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], cfg, state=state)
    for t in range(100, 120):
        hip_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], cfg, state=state)
    k2 = k.clone()  # crop to 30 keys, then other tokens; one of them matches query 60
    k2[:, :, 30:] = torch.randn_like(k[:, :, 30:])
    k2[:, :, 32:40] = 3 * q[:, :, 60:61]
    for t in range(30, 61):
        row, kk, vv = q[:, :, t : t + 1], k2[:, :, : t + 1], v[:, :, : t + 1]
        hip_attention(row, kk, vv, cfg, state=state)
        if t + 1 > threshold:  # refresh_interval=1: every sparse step searches
            assert torch.equal(state.indices, estimate_mask(row, kk, cfg)), t


def test_decode_state_follows_a_cache_rolled_back(rand_qkv, monkeypatch):
    """Assisted decoding crops the cache and appends other tokens: the state must not keep the
    old selection nor the summaries of the replaced keys."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference: fast, and the same rule
    cfg = HiPConfig(k=64, block_size_q=16, sink_tokens=16, window=64, dense_threshold=0)
    q, k, v = rand_qkv(1, 2, 1, 8, 700, 32, seed=9)
    state = HiPDecodeState()
    hip_attention(q[:, :, :1], k[:, :, :690], v[:, :, :690], cfg, state=state)
    other_k, other_v = k.clone(), v.clone()  # keys 685.. replaced, as after crop(685)
    other_k[:, :, 685:] = torch.randn_like(k[:, :, 685:]) * 3
    other_v[:, :, 685:] = torch.randn_like(v[:, :, 685:])
    kk, vv = other_k[:, :, :693], other_v[:, :, :693]
    got = hip_attention(q, kk, vv, cfg, state=state)  # 8 new tokens after the crop
    torch.testing.assert_close(got, hip_attention(q, kk, vv, cfg), atol=0, rtol=0)
    fresh = node_summaries(kk, cfg)
    n = tree_blocks(693, cfg)
    for level in range(n.bit_length()):
        a = level_offset(level, tree_capacity(state._tree))
        b = level_offset(level, tree_capacity(fresh))
        count = n >> level
        assert torch.equal(state._tree[..., a : a + count, :], fresh[..., b : b + count, :])
