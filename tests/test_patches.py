"""hip_attn.patch on tiny random Hugging Face models of every supported family."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hip_attn import HiPConfig  # noqa: E402
from hip_attn.patches import decode_states, is_patched, patch, unpatch  # noqa: E402
from hip_attn.patches.attention import LAYER_CONFIGS  # noqa: E402
from hip_attn.patches.compat import cache_kwarg, output_cache  # noqa: E402
from hip_attn.patches.model import _HOOKS  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma3": (  # one sliding-window layer (stays SDPA) and one global layer (HiP)
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
}
# k covers every candidate of these short contexts: HiP must then equal dense attention
COVERING = HiPConfig(
    k=512, block_size_q=16, block_size_k=8, sink_tokens=16, window=32, refresh_interval=4,
    dense_threshold=0,
)  # fmt: skip
SPARSE = COVERING.replace(k=32)


def make_model(family, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def prompt(length, seed=0, batch=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n, **kwargs):
    return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_covering_budget_matches_dense_and_unpatch_restores(family):
    model = make_model(family)
    ids = prompt(64, seed=1)
    dense_logits = model(ids).logits
    dense_tokens = greedy(model, ids, 32)

    patch(model, COVERING)
    assert model.config._attn_implementation == "hip"
    torch.testing.assert_close(model(ids).logits, dense_logits, atol=1e-4, rtol=1e-4)
    out = greedy(model, ids, 32, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense_tokens)
    states = decode_states(output_cache(out))
    assert states and all(s.refreshes > 0 for s in states.values())  # the sparse path ran

    unpatch(model)
    assert not is_patched(model)
    assert torch.equal(model(ids).logits, dense_logits)  # bit for bit


@torch.no_grad()
def test_small_budget_generation_refreshes_every_interval():
    model = patch(make_model("llama"), SPARSE.replace(block_size_q=64, window=64))
    ids = prompt(1024, seed=2)
    out = greedy(model, ids, 10, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 1024 + 10)
    states = decode_states(output_cache(out))
    assert sorted(states) == [(0, None), (1, None)]
    # 9 decode steps after the prefill token: estimates at steps 0, 4 and 8
    assert [s.refreshes for s in states.values()] == [3, 3]


@torch.no_grad()
def test_small_budget_differs_from_dense():
    model = make_model("llama")
    ids = prompt(200, seed=3)
    dense = model(ids).logits
    patch(model, SPARSE)
    assert (model(ids).logits - dense).abs().max() > 1e-3


def _left_padded(seqs):
    width = max(s.shape[1] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[1] :] = s[0]
        mask[i, width - s.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_left_padded_batch_equals_sequences_alone(family):
    model = patch(make_model(family), SPARSE.replace(block_size_q=32))
    seqs = [prompt(120, seed=4), prompt(90, seed=5)]
    ids, mask = _left_padded(seqs)
    out = greedy(model, ids, 5, attention_mask=mask, return_dict_in_generate=True)
    batch = out.sequences
    # each sequence decoded on its own state, held by the batch's: (layer, 0), (layer, 1)
    states = decode_states(output_cache(out))
    assert {seq for _, seq in states} == {None, 0, 1}
    assert all(s.refreshes > 0 for (_, seq), s in states.items() if seq is not None)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, s in enumerate(seqs):
        alone = greedy(model, s, 5)
        assert torch.equal(batch[i, -5:], alone[0, -5:])
        n = s.shape[1]
        torch.testing.assert_close(logits[i, -n:], model(s).logits[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_right_padded_prefill_equals_sequences_alone():
    model = patch(make_model("qwen2"), SPARSE)
    seqs = [prompt(140, seed=6), prompt(100, seed=7)]
    ids = torch.zeros(2, 140, dtype=torch.long)
    mask = torch.zeros(2, 140, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.shape[1]], mask[i, : s.shape[1]] = s[0], 1
    logits = model(ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        n = s.shape[1]
        torch.testing.assert_close(logits[i, :n], model(s).logits[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_dense_layers_stay_dense():
    model = patch(make_model("llama"), SPARSE, dense_layers=[0])
    ids = prompt(120, seed=8)
    out = greedy(model, ids, 3, return_dict_in_generate=True)
    assert sorted(decode_states(output_cache(out))) == [(1, None)]  # layer 0 kept no state
    mixed = model(ids).logits
    patch(model, SPARSE, dense_layers=[])
    assert (model(ids).logits - mixed).abs().max() > 1e-4


@torch.no_grad()
def test_user_cache_gives_same_tokens():
    model = patch(make_model("llama"), SPARSE)
    ids = prompt(120, seed=9)
    own = transformers.DynamicCache(config=model.config)
    assert torch.equal(greedy(model, ids, 6, **{cache_kwarg(model): own}), greedy(model, ids, 6))
    assert decode_states(own)  # the states lived with the user's cache


def test_patch_twice_is_harmless_and_unpatch_without_patch_is_a_no_op():
    model = make_model("llama")
    assert unpatch(model) is model and model.config._attn_implementation == "sdpa"
    patch(model, SPARSE)
    patch(model, COVERING)
    patched = [m for m in model.modules() if m in LAYER_CONFIGS]
    assert len(patched) == 2 and all(LAYER_CONFIGS[m] == COVERING for m in patched)
    assert all(len(_HOOKS[m]) == 2 for m in patched)  # one pre and one post hook, not four
    unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m in LAYER_CONFIGS or m in _HOOKS for m in model.modules())


def test_unsupported_models_raise_naming_the_class():
    gemma2 = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**{**COMMON, "head_dim": 16, "query_pre_attn_scalar": 16})
    )
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*softcapping"):
        patch(gemma2)
    bert = transformers.BertModel(
        transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    with pytest.raises(ValueError, match="BertModel"):
        patch(bert)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dense_layers"):
        patch(make_model("llama"), dense_layers=[5])


@pytest.mark.parametrize(
    "family,leaves,prefetch",
    [("llama", "summary", False), ("gemma3", "summary", False), ("llama", "keys", False),
     ("llama", "keys", True)],
)  # fmt: skip
@torch.no_grad()
def test_offloaded_generation_equals_on_gpu_hip(family, leaves, prefetch):
    from hip_attn.patches.offload import HiPOffloadCache

    config = SPARSE.replace(leaf_scores=leaves)
    model = patch(make_model(family), config)
    ids = prompt(150, seed=10)
    on_gpu = greedy(model, ids, 5, prefill_chunk_size=64)  # the calls offload makes
    options = {"cache_blocks": 64, "max_chunk": 64, "host_chunk_tokens": 256,
               "prefetch": prefetch}  # fmt: skip
    patch(model, config, offload=True, offload_options=options)
    out = greedy(model, ids, 5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, on_gpu)
    cache = output_cache(out)
    assert isinstance(cache, HiPOffloadCache)
    stats = cache.stats()
    hip_layers = [1] if family == "gemma3" else [0, 1]  # gemma3's layer 0 is a sliding layer
    assert sorted(stats) == hip_layers
    for layer, s in stats.items():
        assert s["tokens"] == 154 and s["misses"] > 0
        half = cache.offloaded(hip_layers[0]).cache.block_bytes // 2  # a block's K or V
        assert s["bytes_moved"] == (
            (2 * s["misses"] - s["keys_only"] + s["value_fills"]) * half + s["prefetched_bytes"]
        )
        assert (s["keys_only"] > 0) == (leaves == "keys")  # candidates come without values
        # the first layer prefetches into the second when its decode selection changes
        assert (s["prefetched_bytes"] > 0) == (prefetch and layer == 1)
    unpatch(model)
    assert "generate" not in model.__dict__


@torch.no_grad()
def test_a_prefetch_skips_a_layer_kept_on_the_device(monkeypatch):
    """Three layers, the middle one dense (kept on the device): the first prefetches into the
    third at each decode refresh, and the tokens are those without offload."""
    from hip_attn.offload import OffloadedKV
    from hip_attn.patches.offload import HiPOffloadCache

    targets, prefetch = [], OffloadedKV.prefetch

    def recording(self, *args, **kwargs):
        targets.append(self)
        return prefetch(self, *args, **kwargs)

    monkeypatch.setattr(OffloadedKV, "prefetch", recording)
    config = SPARSE.replace(dense_layers=(1,))
    model = patch(make_model("llama", num_hidden_layers=3), config)
    ids = prompt(150, seed=13)
    on_gpu = greedy(model, ids, 6, prefill_chunk_size=64)
    options = {"cache_blocks": 64, "max_chunk": 64, "prefetch": True}
    patch(model, config, offload=True, offload_options=options)
    out = greedy(model, ids, 6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, on_gpu)
    cache = output_cache(out)
    assert isinstance(cache, HiPOffloadCache) and sorted(cache.stats()) == [0, 2]
    assert cache.prefetch_target(0) is cache.offloaded(2) and cache.prefetch_target(2) is None
    # 5 decode steps (the prefill makes the first token); refreshes at the first and fifth
    assert targets == [cache.offloaded(2)] * 2


@torch.no_grad()
def test_offload_refuses_padded_batches():
    model = patch(make_model("llama"), SPARSE, offload=True,
                  offload_options={"cache_blocks": 64, "max_chunk": 64})  # fmt: skip
    ids, mask = _left_padded([prompt(100, seed=11), prompt(70, seed=12)])
    with pytest.raises(ValueError, match="padded"):
        greedy(model, ids, 2, attention_mask=mask)
