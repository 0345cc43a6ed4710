"""Inputs of the analytic model: units, presets, Hugging Face configs, GPU overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hip_attn.perf import GPU_PRESETS, MODEL_PRESETS, Efficiency, get_gpu, get_model, override_gpu
from hip_attn.perf.estimator import OffloadConfig, Scenario, estimate
from hip_attn.perf.hardware import load_gpu_file
from hip_attn.perf.models import load_hf_config, model_from_hf_config
from hip_attn.perf.units import fmt_bytes, fmt_seconds, parse_size, parse_token_list, parse_tokens


def test_token_counts() -> None:
    assert parse_token_list("4k,32k,128k,1m") == [4096, 32768, 131072, 1048576]
    assert parse_token_list("50000, 4K") == [50000, 4096]
    assert parse_tokens("1.5k") == 1536
    for bad in ("0", "-4k", "4x", "", "0.5", "k"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_sizes() -> None:
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("512") == 512 * 10**9
    assert parse_size("1TiB") == 2**40
    for bad in ("0", "-1GB", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_formatting() -> None:
    assert fmt_bytes(12_288_000_000) == "12.3 GB"
    assert fmt_bytes(137e9) == "137 GB"
    assert fmt_seconds(0.925) == "925 ms"
    assert fmt_seconds(8.45) == "8.45 s"
    assert fmt_seconds(3e-5) == "30 us"


def test_presets_required_by_the_issue() -> None:
    for name in ("llama-3.1-8b", "llama-3.1-70b", "yi-34b", "qwen2.5-7b", "mistral-7b-v0.3"):
        assert name in MODEL_PRESETS
    for name in ("a100-80g", "h100-sxm", "h200", "l40s", "rtx-4090"):
        assert name in GPU_PRESETS
    a100, h100, h200 = get_gpu("a100-80g"), get_gpu("H100-SXM"), get_gpu("h200")
    assert (a100.flops, a100.hbm_bandwidth, a100.hbm) == (312e12, 2039e9, 80 * 2**30)
    assert (h100.flops, h100.hbm_bandwidth, h100.hbm) == (989e12, 3350e9, 80 * 2**30)
    assert (h200.flops, h200.hbm_bandwidth, h200.hbm) == (989e12, 4800e9, 141e9)
    assert a100.host_link == 32e9 and h100.host_link == 64e9
    assert get_model("mistral-7b") is get_model("mistral-7b-v0.3")
    assert get_model("llama-3.1-70b").total_params == pytest.approx(70.55e9, rel=1e-3)
    assert get_model("qwen2.5-7b").total_params == pytest.approx(7.6e9, rel=0.01)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="llama-3.1-8b.*yi-34b"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match="a100-80g.*rtx-4090"):
        get_gpu("tpu-v5")


def test_hf_config_gqa_tied_and_derived_head_dim(tmp_path: Path) -> None:
    cfg = {
        "model_type": "qwen2",
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_hf_config(path)
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim) == (24, 896, 14, 2, 64)
    assert m.tied_embeddings and m.gated_mlp
    assert m.total_params == m.matmul_params + m.lm_head_params + m.norm_params  # no 2nd table
    assert m.total_params == pytest.approx(0.494e9, rel=0.01)  # Qwen2.5-0.5B without biases


def test_hf_config_defaults_and_errors() -> None:
    m = model_from_hf_config(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
    )
    assert (m.kv_heads, m.head_dim, m.intermediate, m.gated_mlp) == (12, 64, 3072, False)
    assert m.tied_embeddings  # HF's default when the config says nothing
    llama = model_from_hf_config(
        {
            "model_type": "llama",
            "num_hidden_layers": 32,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "head_dim": 128,
        }
    )
    assert not llama.tied_embeddings
    assert llama.matmul_params == get_model("llama-3.1-8b").matmul_params
    with pytest.raises(ValueError, match="hidden_size"):
        model_from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 8})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_from_hf_config({"num_local_experts": 8})


def test_gpu_overrides_and_file(tmp_path: Path) -> None:
    h100 = get_gpu("h100-sxm")
    custom = override_gpu(h100, {"flops": 700, "hbm_bandwidth": 2900, "hbm": "94GB"})
    assert (custom.flops, custom.hbm_bandwidth, custom.hbm) == (700e12, 2900e9, 94e9)
    assert custom.host_link == h100.host_link
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"name": "my-gpu", "host_link": 50, "hbm": "80GiB"}))
    from_file = load_gpu_file(path, h100)
    assert from_file.name == "my-gpu" and from_file.host_link == 50e9
    with pytest.raises(ValueError, match="unknown GPU field"):
        override_gpu(h100, {"tflops": 1})
    with pytest.raises(ValueError, match="positive"):
        override_gpu(h100, {"hbm_bandwidth": 0})
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_gpu_file(path, h100)


def test_efficiency_scales_the_peaks() -> None:
    gpu = Efficiency(compute=0.5, hbm=0.8).apply(get_gpu("h100-sxm"))
    assert gpu.flops == pytest.approx(494.5e12) and gpu.hbm_bandwidth == pytest.approx(2680e9)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError):
            Efficiency(compute=bad)


def test_scenario_validation() -> None:
    model, gpu = get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    with pytest.raises(ValueError, match="tensor-parallel"):
        Scenario(model, gpu, tp=3)
    with pytest.raises(ValueError, match="dtype"):
        Scenario(model, gpu, kv_dtype="fp7")
    small_cache = Scenario(model, gpu, offload=OffloadConfig(block_cache_tokens=128))
    with pytest.raises(ValueError, match="block cache"):  # checked where it offloads
        estimate(small_cache, "hip+offload", 4096)
    estimate(small_cache, "hip", 4096)
    with pytest.raises(ValueError, match="miss rate"):
        OffloadConfig(miss_rate=1.5)
    # transformers shards KV heads and never replicates them: TP must divide them.
    with pytest.raises(ValueError, match="8 KV heads"):
        Scenario(model, gpu, tp=16)
    assert Scenario(model, gpu, tp=8).kv_heads_per_gpu == 1
    with pytest.raises(ValueError, match="prefill chunk"):
        Scenario(model, gpu, prefill_chunk=0)
