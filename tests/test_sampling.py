"""graph_generate's token choice: the filters generate() applies (temperature, top-k, top-p),
a draw that reads nothing back, and the settings resolved as generate() resolves them."""

from types import SimpleNamespace

import pytest
import torch

from hip_attn.patches.sampling import Sampling, draw, filtered_logits

transformers = pytest.importorskip("transformers")


def _transformers_filtered(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.float()
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    for warp in warpers:
        scores = warp(None, scores)
    return scores


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (1.3, 5, 0.9),
        (1.0, 0, 0.5),
        (0.5, 200, 0.95),
        (2.0, 1, 1.0),
        (1.0, 0, 0.0),
    ],  # fmt: skip
)
def test_the_filters_keep_what_generates_filters_keep(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 100, generator=gen) * 3
    logits[0, :10] = logits[0, 10]  # ties at the top-k edge are kept, as generate() keeps them
    sampling = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    ours, theirs = filtered_logits(logits, sampling), _transformers_filtered(logits, sampling)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))


def test_draws_follow_the_probabilities_and_never_pick_a_dropped_token():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0])
    torch.manual_seed(0)
    tokens = draw(probs.expand(50_000, -1).contiguous())
    assert tokens.shape == (50_000, 1) and tokens.dtype == torch.long
    freq = torch.bincount(tokens.flatten(), minlength=6).float() / tokens.numel()
    assert freq[4:].sum() == 0
    # 50,000 draws: a frequency's standard deviation is at most 0.0023
    assert (freq - probs).abs().max() < 0.01, freq


def test_greedy_is_the_argmax_and_a_top_k_of_one_samples_it():
    logits = torch.randn(3, 40)
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(Sampling().next_token(logits), want)
    assert torch.equal(Sampling(do_sample=True, top_k=1, temperature=3.0).next_token(logits), want)


def test_settings_resolve_as_generate_resolves_them():
    plain = SimpleNamespace(do_sample=None, temperature=None, top_k=None, top_p=None)
    assert Sampling.resolve(plain) == Sampling(do_sample=False, temperature=1.0, top_k=50, top_p=1)
    chat = SimpleNamespace(do_sample=True, temperature=0.6, top_k=None, top_p=0.9)
    assert Sampling.resolve(chat) == Sampling(True, 0.6, 50, 0.9)
    assert Sampling.resolve(chat, do_sample=False, top_k=0).do_sample is False
    assert Sampling.resolve(chat, temperature=1.5, top_k=0) == Sampling(True, 1.5, 0, 0.9)
    neutral = SimpleNamespace(do_sample=False, repetition_penalty=1.0, min_p=None, num_beams=1,
                              suppress_tokens=[], sequence_bias={})  # fmt: skip
    assert Sampling.resolve(neutral) == Sampling()
    # greedy ignores the sampling settings, as generate() does, even ones it could not use
    odd = SimpleNamespace(do_sample=False, temperature=0.0, top_p=7, min_p=0.05)
    assert Sampling.resolve(odd) == Sampling()
    assert Sampling.resolve(SimpleNamespace(do_sample=True, min_p=0.05), do_sample=False).top_k
    assert Sampling.resolve(chat, top_p=0).top_p == 0  # keeps the most likely token only
    for name, value in (("repetition_penalty", 1.2), ("encoder_repetition_penalty", 3.0),
                        ("encoder_no_repeat_ngram_size", 1), ("num_return_sequences", 2),
                        ("stop_strings", ["\n"]), ("suppress_tokens", [5])):  # fmt: skip
        with pytest.raises(ValueError, match=f"sets {name}="):
            Sampling.resolve(SimpleNamespace(**{name: value}))
    for name, value in (("min_p", 0.05), ("top_h", 0.4), ("typical_p", 0.9)):
        with pytest.raises(ValueError, match=f"sets {name}="):
            Sampling.resolve(SimpleNamespace(do_sample=True, **{name: value}))


@pytest.mark.parametrize(
    "config",
    [
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9},
        {},
        {"do_sample": False, "temperature": 0.3, "top_k": 5, "top_p": 0.5},
    ],
    ids=["sampling", "unset", "greedy"],
)
@pytest.mark.parametrize(
    "call",
    [
        {},
        {"top_k": None},
        {"top_p": None, "temperature": None},
        {"do_sample": None},
        {"do_sample": True, "top_k": None, "top_p": 0.5},
        {"temperature": 2.0, "top_k": 7},
    ],
)
def test_arguments_resolve_as_generate_resolves_them_none_included(config, call):
    """Not given: the generation config's value; given as ``None``: off (``generate(top_k=None)``
    keeps every token). Checked against the config ``generate()`` itself prepares."""
    from tests.test_patches import make_model

    model = make_model("llama")
    model.generation_config.update(**config)
    prepared, _ = model._prepare_generation_config(None, **call)

    def setting(name, off):
        value = getattr(prepared, name)
        return off if value is None else value

    want = Sampling(prepared.do_sample is True, setting("temperature", 1.0),
                    setting("top_k", 0), setting("top_p", 1.0))  # fmt: skip
    got = Sampling.resolve(model.generation_config, **call)
    assert got.do_sample == want.do_sample
    if want.do_sample:
        assert got == want
    if not call and config.get("do_sample"):
        assert got == Sampling(True, 0.6, 20, 0.9)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"do_sample": True, "top_k": -1}, ValueError, "top_k must be >= 0"),
        ({"do_sample": True, "top_p": -0.1}, ValueError, r"top_p must be in \[0, 1\]"),
        ({"do_sample": True, "top_p": 1.5}, ValueError, r"top_p must be in \[0, 1\]"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"do_sample": 1}, TypeError, "do_sample must be a bool"),
    ],
)
def test_bad_settings_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Sampling(**kwargs)
