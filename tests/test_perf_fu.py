"""The running example of Fu (2024), "Challenges in Deploying Long-Context Transformers":
Yi-34B in bf16 on one A100-80GB.

Conventions that reproduce it (documented in docs/roofline.md): 4K = 4096 tokens, 50K = 50,000
tokens, 1 GB = 1e9 bytes, HBM = 80 GiB, weights read per decode step = P_mm + lm_head (the
embedding lookup reads one row), decode time = 250 steps at the mean context, prefill includes
causal attention FLOPs (2 * s^2 * Hq * D per layer).
"""

from __future__ import annotations

import pytest

from hip_attn.perf import Scenario, estimate, get_gpu, get_model


@pytest.fixture(scope="module")
def yi_a100() -> Scenario:
    return Scenario(get_model("yi-34b"), get_gpu("a100-80g"), output_tokens=250)


def test_yi_34b_preset_holds_the_published_config() -> None:
    m = get_model("yi-34b")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim) == (60, 7168, 56, 8, 128)
    assert (m.intermediate, m.vocab, m.tied_embeddings) == (20480, 64000, False)
    assert m.total_params == pytest.approx(34.39e9, rel=1e-3)


def test_kv_per_token_and_at_50k(yi_a100: Scenario) -> None:
    assert yi_a100.kv_bytes_per_token == 245_760  # 240 KiB
    est = estimate(yi_a100, "dense", 50_000)
    assert est.kv_bytes == 12_288_000_000  # 12.3 GB
    assert round(est.kv_bytes / 1e9, 1) == 12.3


def test_prefill_4k_about_0_89_s(yi_a100: Scenario) -> None:
    est = estimate(yi_a100, "dense", 4096)
    assert est.prefill.bound == "compute"
    assert est.prefill.time_s == pytest.approx(0.89, rel=0.05)


@pytest.mark.parametrize(("context", "seconds"), [(4096, 8.5), (50_000, 9.8)])
def test_decode_250_tokens(yi_a100: Scenario, context: int, seconds: float) -> None:
    est = estimate(yi_a100, "dense", context)
    assert est.decode.bound == "memory"
    assert est.decode_total_s == pytest.approx(seconds, rel=0.05)


def test_concurrency_at_50k_is_one(yi_a100: Scenario) -> None:
    # Fu counts no activations: that holds for a chunked prefill. Unchunked, the 50K prompt's
    # MLP activations (2 * (3 * 20480 + 2 * 7168) B/token = 7.6 GB) do not fit beside its KV.
    unchunked = estimate(yi_a100, "dense", 50_000)
    assert unchunked.activation_bytes == 50_000 * 2 * (3 * 20480 + 2 * 7168)
    assert unchunked.max_concurrency == 0 and not unchunked.fits
    chunked = Scenario(yi_a100.model, yi_a100.gpu, prefill_chunk=4096)
    assert estimate(chunked, "dense", 50_000).max_concurrency == 1
    # ... and 80 GB read as 80e9 bytes would not even fit one request: the GiB matters.
    assert yi_a100.gpu.hbm == 80 * 2**30


def test_hand_arithmetic_of_the_example(yi_a100: Scenario) -> None:
    """The same figures from the issue's formulas written out by hand."""
    layers, hidden, heads, kv_heads, d, inter, vocab = 60, 7168, 56, 8, 128, 20480, 64000
    per_layer = hidden * heads * d * 2 + hidden * kv_heads * d * 2 + 3 * hidden * inter
    p_mm = layers * per_layer
    assert p_mm == 33_470_545_920
    lm_head = vocab * hidden
    s = 4096
    prefill_flops = 2 * p_mm * s + layers * 2 * s * s * heads * d + 2 * lm_head
    est = estimate(yi_a100, "dense", s)
    assert est.prefill.flops == prefill_flops
    # ... plus one flash-attention launch per layer (5 us each).
    assert est.prefill.time_s == pytest.approx(prefill_flops / 312e12 + 60 * 5e-6, rel=1e-12)
    # Decode: weights (P_mm + lm_head) + KV at the mean context, plus a few MB of activations.
    mean_ctx = 50_000 + (250 - 1) / 2
    step_bytes = 2 * (p_mm + lm_head) + mean_ctx * 245_760
    est = estimate(yi_a100, "dense", 50_000)
    assert est.decode.hbm_bytes == pytest.approx(step_bytes, rel=2e-4)
    assert est.decode_total_s == pytest.approx(250 * (step_bytes / 2039e9 + 60 * 5e-6), rel=2e-4)
