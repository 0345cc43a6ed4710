"""graph_generate: decoding whose decode step runs over a HiPCache on the device (the step a
CUDA graph captures); greedy, token for token what generate() returns under the same patch."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hip_attn.patches import graph_generate, patch  # noqa: E402
from hip_attn.patches.graph_generate import _after_end, prefill  # noqa: E402
from tests.conftest import HAS_CUDA  # noqa: E402
from tests.test_patches import SPARSE, greedy, make_model, prompt  # noqa: E402


@torch.no_grad()
def test_same_tokens_as_generate_with_hip_and_dense_layers(monkeypatch):
    # layer 0 runs HiP (the device decode: refreshes every 4 steps, blocks complete on the
    # device), layer 1 dense over the buffers with a mask built from the device count; the
    # buffers start as NaN (what torch.empty may hold on a GPU): masked keys must not leak
    from hip_attn.patches.cache import PreallocatedLayer

    def nan_buffers(self, like, tokens):
        b, h, _, d = like.shape
        return torch.full((b, h, tokens, d), float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(PreallocatedLayer, "_allocate", nan_buffers)
    model = patch(make_model("llama", eos_token_id=None), SPARSE, dense_layers=[1])
    ids = prompt(100, seed=30, batch=2)  # the budget covers 80 keys
    want = greedy(model, ids, 14)
    assert torch.equal(graph_generate(model, ids, 14, cuda_graph=False), want)


@torch.no_grad()
def test_stops_at_the_end_token_and_pads_as_generate_does():
    # where a generation ends does not depend on the attention: every layer dense here (with
    # the kernels interpreted this was the slowest test of the suite, ~2 minutes)
    model = patch(make_model("llama", eos_token_id=None), SPARSE, dense_layers=[0, 1])
    ids = prompt(60, seed=31, batch=2)  # short: what is checked here is where it ends
    free = graph_generate(model, ids, 12)
    end = int(free[0, 60 + 3])  # sequence 0 ends at its 4th new token
    want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=end)
    got = graph_generate(model, ids, 12, eos_token_id=end, pad_token_id=0, check_every=2)
    assert torch.equal(got, want)
    assert (got[0, 60 + 4 :] == 0).all()  # padded after its end
    # the generation config's end token, unless the call passes None, as generate() does
    model.generation_config.eos_token_id = end
    assert torch.equal(graph_generate(model, ids, 12, pad_token_id=0), got)
    assert torch.equal(graph_generate(model, ids, 12, eos_token_id=None), free)
    want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=None)
    assert torch.equal(graph_generate(model, ids, 12, pad_token_id=None), want)  # pads with end


@torch.no_grad()
def test_samples_as_the_generation_config_or_the_call_asks():
    # how the next token is picked does not depend on the attention: every layer dense
    model = patch(make_model("llama", eos_token_id=None), SPARSE, dense_layers=[0, 1])
    ids = prompt(100, seed=35)
    want = greedy(model, ids, 6)
    model.generation_config.do_sample = True  # a chat model's config: generate() samples
    model.generation_config.top_k = 1  # ... from the most likely token only
    assert torch.equal(graph_generate(model, ids, 6, cuda_graph=False), want)
    draws = []
    for _ in range(2):
        torch.manual_seed(1)
        draws.append(graph_generate(model, ids, 6, temperature=5.0, top_k=0, cuda_graph=False))
    assert torch.equal(*draws) and not torch.equal(draws[0], want)  # seeded draws, not argmax
    model.generation_config.repetition_penalty = 1.3  # a processor graph_generate lacks
    with pytest.raises(ValueError, match="sets repetition_penalty=1.3"):
        graph_generate(model, ids, 6)


def test_after_end_pads_each_sequence_and_drops_the_columns_after_the_last_end():
    tokens = torch.tensor([[9, 5, 2, 7, 7, 7], [9, 5, 6, 6, 2, 4]])  # prompt of 1, end token 2
    got = _after_end(tokens, 1, torch.tensor([2]), 0)
    assert torch.equal(got, torch.tensor([[9, 5, 2, 0, 0], [9, 5, 6, 6, 2]]))
    assert torch.equal(_after_end(tokens, 1, torch.tensor([], dtype=torch.long), 0), tokens)


@torch.no_grad()
def test_the_cache_is_counted_on_the_device_during_the_steps():
    model = patch(make_model("llama"), SPARSE)
    step = prefill(model, prompt(100, seed=32), 8)
    layer = step.cache.layers[0]
    assert int(layer.in_use) == 100 and layer.capacity == 108
    for _ in range(3):
        step()
    assert int(layer.in_use) == 103 and int(step.position) == 103
    assert layer.get_mask_sizes(1) == (108, 0)  # attention sees the whole buffers
    step.cache.leave_device()
    assert layer.in_use is None and layer.keys.shape[2] == 103
    # the buffers hold what the steps wrote: the keys of a plain forward over the tokens
    plain = model(step.tokens[:, :103], use_cache=True)
    keys = plain.past_key_values if hasattr(plain, "past_key_values") else plain.cache
    torch.testing.assert_close(layer.keys, keys.layers[0].keys, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("prompt_tokens", [20, 45])  # fewer tokens than the window, and more
def test_a_ring_holds_the_window_transformers_layer_holds(prompt_tokens):
    from hip_attn.patches.cache import RingWindowLayer

    model = patch(make_model("gemma3"), SPARSE, dense_layers=[1])  # the ring is what counts
    step = prefill(model, prompt(prompt_tokens, seed=37), 30)
    ring = step.cache.layers[0]
    assert isinstance(ring, RingWindowLayer) and ring.sliding_window == 32
    assert int(ring.in_use) == prompt_tokens
    for _ in range(25):
        step()
    seen = prompt_tokens + 25
    assert int(ring.in_use) == seen
    assert ring.get_mask_sizes(1) == (1, 0)  # transformers builds no mask: the ring masks itself
    step.cache.leave_device()
    assert ring.in_use is None and ring.get_seq_length() == seen
    # transformers' layout again: the last 31 tokens in order, as a plain forward leaves them
    plain = model(step.tokens[:, :seen], use_cache=True)
    keys = plain.past_key_values if hasattr(plain, "past_key_values") else plain.cache
    torch.testing.assert_close(ring.keys, keys.layers[0].keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ring.values, keys.layers[0].values, atol=1e-5, rtol=1e-5)
    assert ring.keys.shape[2] == 31
    # layer 1's keys follow layer 0's attention over its ring, wrapped around
    torch.testing.assert_close(step.cache.layers[1].keys, keys.layers[1].keys, atol=1e-5,
                               rtol=1e-5)  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_left_padded_batch_decodes_each_sequence_over_its_own_tokens(family):
    # llama: HiP, dense, dense layers; gemma3: a sliding layer's ring, then HiP. Sequence 1 is
    # 23 tokens shorter. The tokens alone barely see the attention of a tiny random model: the
    # cache is compared too (each layer's keys follow the positions and the layer below's
    # attention), against what generate() leaves
    from hip_attn.patches.compat import output_cache

    layers = {"num_hidden_layers": 3} if family == "llama" else {}
    model = make_model(family, eos_token_id=None, **layers)
    model = patch(model, SPARSE, dense_layers=[1, 2] if family == "llama" else [])
    ids, mask = prompt(100, seed=40, batch=2), torch.ones(2, 100, dtype=torch.long)
    ids[1, :23], mask[1, :23] = 0, 0
    want = greedy(model, ids, 12, attention_mask=mask, return_dict_in_generate=True)
    if family == "llama":  # the entry point once; the steps below are what it runs
        got = graph_generate(model, ids, 12, attention_mask=mask, cuda_graph=False)
        assert torch.equal(got, want.sequences)
    step = prefill(model, ids, 12, starts=[0, 23])
    for _ in range(11):
        step()
    assert torch.equal(step.tokens, want.sequences)
    step.cache.leave_device()
    for mine, theirs in zip(step.cache.layers, output_cache(want).layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape
        before = 111 - theirs.keys.shape[2]  # tokens a sliding layer no longer holds
        for row, start in enumerate([0, 23]):
            real = slice(max(start - before, 0), None)
            for ours, ref in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                torch.testing.assert_close(ours[row, :, real], ref[row, :, real])


@torch.no_grad()
def test_a_left_padded_prompt_alone_continues_its_prefills_decode_state():
    # a batch of one padded prompt: its prefill and the device steps (one count) share the
    # batch's state, as generate()'s padded steps do
    from hip_attn.patches import decode_states
    from hip_attn.patches.compat import output_cache

    model = patch(make_model("llama", eos_token_id=None), SPARSE, dense_layers=[1])
    ids, mask = prompt(300, seed=41), torch.ones(1, 300, dtype=torch.long)
    ids[0, :100], mask[0, :100] = 0, 0  # 200 real keys: HiP selects 32 of them
    want = greedy(model, ids, 6, attention_mask=mask, return_dict_in_generate=True)
    step = prefill(model, ids, 6, starts=[100])
    for _ in range(5):
        step()
    step.cache.leave_device()
    assert list(decode_states(step.cache)) == list(decode_states(output_cache(want)))
    assert list(decode_states(step.cache)) == [(0, None)]
    assert torch.equal(step.tokens, want.sequences)
    ours, theirs = step.cache.layers[1], output_cache(want).layers[1]  # after layer 0's HiP
    torch.testing.assert_close(ours.keys[:, :, 100:], theirs.keys[:, :, 100:])


@torch.no_grad()
def test_enter_device_checks_every_layer_before_moving_any():
    from hip_attn.patches import decode_states

    model = patch(make_model("gemma3"), SPARSE, dense_layers=[1])  # a ring, then preallocated
    step = prefill(model, prompt(40, seed=42, batch=2), 4, starts=[0, 0])  # all 0: unpadded
    assert step.cache.layers[1].in_use.numel() == 1 and step.starts is None
    step()
    assert list(decode_states(step.cache)) == []  # dense layers: no HiP state at all
    cache = step.cache
    with pytest.raises(RuntimeError, match="on the device with other starts"):
        cache.enter_device([0, 5])
    cache.leave_device()
    with pytest.raises(ValueError, match="first real token in \\[0, 41\\)"):
        cache.enter_device([0, 41])
    assert all(layer.in_use is None for layer in cache.layers)  # nothing moved
    cache.layers[1].reset()  # a layer without tokens: refused before the ring moves
    with pytest.raises(RuntimeError, match=r"hold tokens; \[1\] hold none"):
        cache.enter_device()
    assert cache.layers[0].in_use is None


@torch.no_grad()
def test_a_layer_whose_type_disagrees_with_the_model_is_refused_on_the_device():
    # the attention's sliding_window and the cache's layer type come from the same config;
    # were they to disagree, a full layer would attend a ring, or a ring its whole buffer
    from hip_attn.patches.cache import RingWindowLayer

    model = patch(make_model("gemma3"), SPARSE)
    step = prefill(model, prompt(40, seed=43), 4)
    step.cache.leave_device()
    step.cache.layers[0], step.cache.layers[1] = step.cache.layers[1], step.cache.layers[0]
    assert isinstance(step.cache.layers[1], RingWindowLayer)
    step.cache.enter_device()
    with pytest.raises(ValueError, match="layer 0: the model passes sliding_window but"):
        step()


@torch.no_grad()
def test_the_prefill_computes_the_last_logits_only():
    model = patch(make_model("llama"), SPARSE)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    prefill(model, prompt(40, seed=34), 4)
    assert rows == [1]  # not 40 x vocab logits (T x vocab is GBs at long contexts)


@pytest.mark.parametrize(
    "build,kwargs,exc,match",
    [
        ("plain", {}, ValueError, "patched with hip_attn.patch"),
        ("offload", {}, ValueError, "does not run offloaded models"),
        ("chunked", {}, ValueError, "also has DynamicSlidingWindowLayer"),
        ("dynamic_rope", {}, ValueError, "RoPE that depends on the sequence length"),
        ("llama", {"input_ids": torch.zeros(5, dtype=torch.long)}, TypeError, r"\[B, T\]"),
        ("llama", {"input_ids": torch.zeros(1, 5)}, ValueError, "integer tokens"),
        ("llama", {"attention_mask": torch.ones(1, 5)}, ValueError, r"input_ids' shape \(1, 20\)"),
        ("llama", {"attention_mask": torch.full((1, 20), 2)}, ValueError, "0 \\(padding\\) and 1"),
        ("llama", {"attention_mask": torch.arange(20)[None] < 15}, ValueError, "left padding"),
        ("llama", {"starts": [0, 3]}, ValueError, r"each of the 1 sequences' first real token"),
        ("llama", {"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive int"),
        ("llama", {"check_every": 1.5}, TypeError, "check_every must be an int"),
        ("llama", {"cuda_graph": "yes"}, TypeError, "cuda_graph must be a bool"),
        ("llama", {"do_sample": True, "temperature": 0}, ValueError, "temperature must be > 0"),
        ("llama", {"do_sample": True, "top_p": 2}, ValueError, r"top_p must be in \[0, 1\]"),
        ("llama", {"top_k": 2.5}, TypeError, "top_k must be an int"),
    ],
)
def test_bad_input_raises(build, kwargs, exc, match):
    model = {
        "plain": lambda: make_model("llama"),
        "offload": lambda: patch(make_model("llama"), SPARSE, offload=True),
        # a chunked-attention config: transformers' layer, whose mask is not a window
        "chunked": lambda: patch(make_model("llama", attention_chunk_size=16), SPARSE),
        "dynamic_rope": lambda: patch(
            make_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), SPARSE
        ),
        "llama": lambda: patch(make_model("llama"), SPARSE),
    }[build]()
    call = {"input_ids": prompt(20), "max_new_tokens": 2, **kwargs}
    with pytest.raises(exc, match=match):
        if "starts" in call:  # prefill's, which graph_generate derives from attention_mask
            prefill(model, call["input_ids"], 2, starts=call["starts"])
        else:
            graph_generate(model, **call)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error off CUDA")
def test_cuda_graph_needs_cuda():
    model = patch(make_model("llama"), SPARSE)
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        graph_generate(model, prompt(20), 2, cuda_graph=True)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: captures the decode step in a CUDA graph")
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding layer's ring
@pytest.mark.parametrize("padded", [False, True])  # each sequence at its own count
@torch.no_grad()
def test_replayed_graph_gives_the_eager_tokens_cuda(family, padded):
    dense = [1] if family == "llama" else []
    model = patch(make_model(family, eos_token_id=None).cuda(), SPARSE, dense_layers=dense)
    ids, mask = prompt(300, seed=33, batch=2).cuda(), torch.ones(2, 300, dtype=torch.long).cuda()
    if padded:
        ids[1, :70], mask[1, :70] = 0, 0
    want = greedy(model, ids, 40, attention_mask=mask)
    for graph in (False, True):
        got = graph_generate(model, ids, 40, attention_mask=mask, cuda_graph=graph)
        assert torch.equal(got, want)
    # the captured draw: from the most likely token only, it is the argmax
    got = graph_generate(model, ids, 40, attention_mask=mask, cuda_graph=True, do_sample=True,
                         top_k=1)  # fmt: skip
    assert torch.equal(got, want)


def _run_generate_speed(argv):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "generate_speed.py"
    old, sys.argv = sys.argv, ["generate_speed.py", *argv]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    return done.value.code


def test_generate_speed_bench_runs_and_records(tmp_path):
    """bench/generate_speed.py (what a GPU session runs) on a tiny model, two left-padded
    prompts: a record per context with the three paths' times, and the two HiP paths' tokens
    compared."""
    import json
    import math

    out = tmp_path / "generate.json"
    argv = ["--tiny", "--layers", "1", "--context", "100", "--batch", "2", "--padded",
            "--new-tokens", "2", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert _run_generate_speed(argv) == 0
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["context"] == 100 and record["batch"] == 2 and record["left_padded"]
    assert isinstance(row["hip_graph_tokens_equal_hip"], bool)  # reported: a near-tie may flip
    assert row["hip_graph"]["ms_per_token"] > 0  # timed directly
    for name in ("dense", "hip"):  # differences of two timings: finite, of either sign here
        assert math.isfinite(row[name]["ms_per_token"]) and row[name]["prefill_ms"] > 0
    assert record["environment"]["device_type"] in ("cpu", "cuda")
    assert "hip_offload" not in row


def test_generate_speed_bench_times_offload_with_and_without_prefetch(tmp_path, capsys):
    """``--offload`` adds the offloaded generate() without and with the prefetch (two layers:
    the first prefetches into the second; the script asserts their tokens equal); with a
    padded batch it is refused in one line."""
    import json

    from hip_attn.offload.gather import cuda_extension

    if torch.cuda.is_available() and cuda_extension() is None:
        pytest.skip("the prefetch needs the csrc gather on CUDA")

    out = tmp_path / "generate.json"
    argv = ["--tiny", "--layers", "2", "--context", "120", "--new-tokens", "3", "--repeats", "1",
            "--offload", "--cache-blocks", "64", "--out", str(out)]  # fmt: skip
    assert _run_generate_speed(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    for name in ("hip_offload", "hip_offload_prefetch"):
        assert row[name]["prefill_ms"] > 0 and row[name]["bytes_moved"] > 0
    prefetched = [row[name]["prefetched_bytes"] for name in ("hip_offload", "hip_offload_prefetch")]
    assert prefetched[0] == 0 < prefetched[1]
    assert _run_generate_speed(["--tiny", "--offload", "--batch", "2", "--padded"]) == 2
    assert "--offload decodes one unpadded prompt" in capsys.readouterr().err
