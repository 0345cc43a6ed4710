"""HiPCache: K/V written in place into preallocated buffers, the cache generate() uses under
hip_attn.patch."""

from itertools import pairwise

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hip_attn.patches import patch  # noqa: E402
from hip_attn.patches.cache import HiPCache, PreallocatedLayer  # noqa: E402
from hip_attn.patches.compat import cache_kwarg, output_cache  # noqa: E402
from tests.test_patches import SPARSE, greedy, make_model, prompt  # noqa: E402


def _chunks(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g))
            for n in sizes]  # fmt: skip


def test_layer_holds_what_concatenation_holds_and_grows_geometrically():
    layer, plain = PreallocatedLayer(grow_tokens=16), transformers.DynamicLayer()
    capacities = []
    for k, v in _chunks([37] + [1] * 200 + [5, 64]):
        keys, values = layer.update(k, v)
        want_k, want_v = plain.update(k, v)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        capacities.append(layer.capacity)
    assert layer.get_seq_length() == 37 + 200 + 5 + 64
    grown = sorted(set(capacities))
    assert grown[0] == 48  # the first update rounded up to a multiple of grow_tokens
    assert all(c % 16 == 0 for c in grown)
    assert all(b >= a + a // 2 for a, b in pairwise(grown))  # by half at least: amortized
    assert len(grown) <= 6


def test_layer_preallocated_for_the_generation_never_grows():
    layer = PreallocatedLayer(max_tokens=40)
    first = None
    for k, v in _chunks([30] + [1] * 10):
        layer.update(k, v)
        first = first if first is not None else layer.keys.untyped_storage().data_ptr()
        assert layer.capacity == 40
    assert layer.keys.untyped_storage().data_ptr() == first  # written in place, never moved
    layer.update(*_chunks([1])[0])
    assert layer.capacity > 40 and layer.get_seq_length() == 41


def test_layer_crop_reorder_and_reset():
    layer, plain = PreallocatedLayer(grow_tokens=8), transformers.DynamicLayer()
    for k, v in _chunks([20, 3]):
        layer.update(k, v)
        plain.update(k, v)
    layer.crop(-5)
    plain.crop(-5)
    assert torch.equal(layer.keys, plain.keys) and layer.get_seq_length() == 18
    layer.crop(10)  # transformers 5.17's form: the length to keep
    assert torch.equal(layer.values, plain.values[:, :, :10])
    k, v = _chunks([4], seed=1)[0]
    keys, _ = layer.update(k, v)  # the cropped tail is overwritten
    assert torch.equal(keys, torch.cat([plain.keys[:, :, :10], k], dim=2))
    before = layer.keys.clone()
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, before.flip(0))
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, before.flip(0).repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.keys, before.flip(0)[[0, 1]])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.capacity == 0


@torch.no_grad()
def test_generate_under_patch_uses_a_preallocated_cache_with_the_same_tokens():
    model = patch(make_model("gemma3"), SPARSE)  # a sliding layer, then a global layer
    ids = prompt(150, seed=20)
    out = greedy(model, ids, 12, return_dict_in_generate=True)
    cache = output_cache(out)
    assert isinstance(cache, HiPCache)
    sliding, full = cache.layers
    assert type(sliding) is not PreallocatedLayer and isinstance(full, PreallocatedLayer)
    assert full.capacity == 150 + 12  # sized for the generation: it never grew
    dynamic = transformers.DynamicCache(config=model.config)
    assert torch.equal(out.sequences, greedy(model, ids, 12, **{cache_kwarg(model): dynamic}))
    grows = HiPCache(model.config, grow_tokens=8)  # 152 tokens, grown at the third step
    assert torch.equal(out.sequences, greedy(model, ids, 12, **{cache_kwarg(model): grows}))


@torch.no_grad()
def test_generate_keeps_what_the_caller_asked_for():
    from transformers import GenerationConfig

    from hip_attn.patches.cache import GROW_TOKENS
    from hip_attn.patches.model import _hip_cache_tokens, _wants_default_cache

    model = patch(make_model("llama"), SPARSE)
    ids = prompt(40, seed=21)
    settings = {"max_new_tokens": 3, "do_sample": False}
    static = GenerationConfig(cache_implementation="static", **settings)  # positional config
    out = model.generate(ids, static, return_dict_in_generate=True)
    assert type(output_cache(out)).__name__ == "StaticCache"
    no_cache = model.generate(ids, GenerationConfig(use_cache=False, **settings))
    assert torch.equal(no_cache, model.generate(ids, use_cache=False, **settings))
    draft = GenerationConfig()
    draft.is_assistant = True  # assisted decoding's draft: transformers prepares its cache
    assert not _wants_default_cache(model, {"generation_config": draft})
    assert _wants_default_cache(model, {"generation_config": GenerationConfig()})
    # a generous max_new_tokens reserves one growth step, not all of it
    assert _hip_cache_tokens(model, {"inputs": ids, "max_new_tokens": 10**6}) == 40 + GROW_TOKENS
    assert _hip_cache_tokens(model, {"input_ids": ids, "max_new_tokens": 7}) == 47
    settings = {"generation_config": GenerationConfig(max_new_tokens=5)}
    assert _hip_cache_tokens(model, settings) is None  # no prompt
    assert _hip_cache_tokens(model, {**settings, "inputs": ids}) == 45
    model.generation_config.max_new_tokens = 9  # the model's own default counts too
    assert _hip_cache_tokens(model, {"inputs": ids}) == 49
    assert _hip_cache_tokens(model, {"inputs": ids, "max_new_tokens": 2}) == 42


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"max_tokens": 0}, ValueError, "max_tokens must be a positive int"),
        ({"grow_tokens": 1.5}, TypeError, "grow_tokens must be an int"),
        ({"max_tokens": True}, TypeError, "max_tokens must be an int"),
    ],
)
def test_bad_sizes_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HiPCache(make_model("llama").config, **kwargs)


def test_a_ring_layer_resets_to_empty():
    # transformers 5.17's sliding layer zeroes its window on reset and appends after it
    from hip_attn.patches.cache import RingWindowLayer

    layer = RingWindowLayer(4)
    layer.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    assert layer.keys.shape[2] == 3 and layer.get_seq_length() == 6
    layer.reset()
    keys, _ = layer.update(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8))
    assert keys.shape[2] == 2 and bool((keys == 1).all()) and layer.get_seq_length() == 2
