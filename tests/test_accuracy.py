"""The attention-level accuracy harness (``hip-attn accuracy``): synthetic inputs, selection
methods, metrics, and the properties its numbers must have."""

import json

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.accuracy import cli as acc_cli
from hip_attn.accuracy.harness import best_methods, run_accuracy, sample_query_blocks
from hip_attn.accuracy.methods import (
    METHODS,
    REFERENCE_METHODS,
    QueryBlock,
    quest_scores,
    select_exact,
    select_quest,
    top_blocks,
)
from hip_attn.accuracy.metrics import dense_block, mass_breakdown
from hip_attn.accuracy.model_eval import MODES
from hip_attn.accuracy.synthetic import PROFILES, make_inputs, plant_spans
from hip_attn.cli import main
from hip_attn.reference import dense_attention_reference, estimate_mask_reference

SMALL = HiPConfig(k=128, window=128, sink_tokens=16)
SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 64}


@pytest.fixture(scope="module")
def small_run():
    """One 2K-token context, 4 sampled query blocks, every method."""
    return run_accuracy([2048], SMALL, seeds=(0,), sample_last=2, sample_spread=2, **SHAPE)


def test_cli_names_match_the_library():
    assert tuple(METHODS) == acc_cli.METHOD_NAMES
    assert MODES == acc_cli.EVAL_MODES


def test_synthetic_inputs_are_seeded_and_structured():
    a, b = make_inputs(1024, seed=3, **SHAPE), make_inputs(1024, seed=3, **SHAPE)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and a.spans == b.spans
    assert not torch.equal(a.k, make_inputs(1024, seed=4, **SHAPE).k)
    assert a.q.shape == (1, 4, 1024, 64) and a.k.shape == a.v.shape == (1, 2, 1024, 64)
    assert [p.name for p in a.profiles] == [p.name for p in PROFILES]
    ends = [0]
    for lo, hi in a.spans:  # disjoint, ascending, 16-256 tokens, in the first 70%
        assert lo >= ends[-1] and 16 <= hi - lo <= 256 and hi <= 0.7 * 1024
        ends.append(hi)
    # the head types do what they say on the last query block
    mass, _ = dense_block(a.q[:, :, -64:], a.k, a.v, 1024 - 64)
    parts = mass_breakdown(mass, a.spans, sink_tokens=16, window_start=1024 - 64 - 128)[0]
    sinks, window, spans = parts[:, 0], parts[:, 1], parts[:, 2]
    assert spans[0] > 0.5  # retrieval
    assert sinks[1] > 0.5  # sink
    assert window[2] > 0.5  # recency
    assert torch.allclose(parts.sum(-1), torch.ones(4), atol=1e-5)


def test_span_halo_fades_around_the_span():
    sharp, halo = (make_inputs(1024, seed=0, span_halo=h, **SHAPE) for h in (0, 16))
    assert sharp.spans == halo.spans
    a, b = sharp.spans[0]
    rot_k = halo.k - sharp.k  # only the span direction around the span changed
    changed = rot_k.abs().sum(dim=(0, 1, 3)) > 1e-4
    assert changed[a - 16 : a].all() and changed[b : b + 16].all()
    assert not changed[a:b].any() and not changed[: a - 16].any()
    torch.testing.assert_close(halo.q, sharp.q)


def test_plant_spans_rejects_short_contexts():
    with pytest.raises(ValueError, match="too short"):
        plant_spans(256, 8, torch.Generator().manual_seed(0))


def test_dense_block_matches_dense_attention():
    x = make_inputs(512, seed=1, **SHAPE)
    _, out = dense_block(x.q[:, :, 448:], x.k, x.v, 448)
    ref = dense_attention_reference(x.q, x.k, x.v)[:, :, 448:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_exact_ranks_like_a_one_level_search_with_keys_at_the_leaves():
    """``exact`` is HiP's ranking (each block's largest per-row vote at half the attention
    scale) over every block's exact logits: where the search has one level (``beam * G >= N``),
    unpooled rows and keys at the leaves, the two select the same blocks."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 64, 64, generator=gen), torch.randn(1, 2, 1024, 64, generator=gen)
    cfg = HiPConfig(k=64, window=128, sink_tokens=16, query_pool_stride=1, beam=16,
                    leaf_scores="keys")  # fmt: skip
    block = QueryBlock(q, k, k, 960, 1024, 832, 102, torch.zeros(1, 4, 1024))
    want, stats = estimate_mask_reference(q, k, cfg)
    assert int(stats.scored.max()) == 102  # one level: every candidate block a child
    assert torch.equal(select_exact(block, cfg).indices, want)


def test_quest_bound_is_an_upper_bound_and_top_blocks_breaks_ties_low():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 64, generator=gen), torch.randn(1, 2, 1024, 64, generator=gen)
    cfg = HiPConfig(k=64, window=128, sink_tokens=16, query_pool_stride=1)
    block = QueryBlock(q, k, k, 960, 1024, 832, 102, torch.zeros(1, 4, 1024))
    bound = quest_scores(block, cfg)  # [1, 2, 102]
    true = q[0].view(2, 2, 64, 64) @ k[0, :, None, 16:832].transpose(-1, -2)
    true = true.amax(dim=(1, 2)).view(2, 102, 8).amax(-1)  # max over heads, rows, block keys
    assert torch.all(bound[0] >= true - 1e-4)
    chosen = select_quest(block, cfg).indices
    assert chosen.shape == (1, 2, 1, 8)
    assert torch.equal(chosen[0, :, 0].long() - 2, bound[0].topk(8).indices.sort().values)
    scores = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0]]])
    out = top_blocks(scores, HiPConfig(k=16, block_size_k=8), first=10)
    assert out.tolist() == [[[[11, 12]]]]


def test_sampled_blocks_include_the_last_and_are_described():
    blocks, text = sample_query_blocks(4096, HiPConfig(), last=2, spread=5)
    assert blocks == sorted(set(blocks)) and blocks[-2:] == [62, 63] and len(blocks) == 7
    assert "7 of 64 query blocks" in text and "evenly spaced" in text
    covered, text = sample_query_blocks(1024, HiPConfig(k=1024), last=1, spread=3)
    assert len(covered) == 4 and "covers every candidate" in text


def test_oracle_bounds_every_method_and_dense_is_exact(small_run):
    (ctx,) = small_run["contexts"]
    methods = ctx["methods"]
    assert set(methods) == set(METHODS)
    dense, oracle = methods["dense"], methods["oracle"]
    assert dense["mass_recall"] == pytest.approx(1.0, abs=1e-5)
    assert dense["mass_recall_min"] == pytest.approx(1.0, abs=1e-5)
    assert dense["out_rel_err"] < 1e-5 and dense["span_recall"] == 1.0
    sparse = {m: r for m, r in methods.items() if m != "dense"}
    for name, r in sparse.items():  # at the same budget, nothing beats the oracle's mass
        assert r["mass_recall"] <= oracle["mass_recall"] + 1e-6, name
        for head_type, value in r["mass_recall_by_head_type"].items():
            assert 0.0 <= value <= 1.0 + 1e-6, (name, head_type)
    budget = {round(r["keys_per_query"]) for r in sparse.values()}
    assert len(budget) == 1  # the same sinks + k + window for every sparse method
    assert budget.pop() < dense["keys_per_query"]


def test_budget_covering_the_context_makes_every_method_exact():
    result = run_accuracy(
        [1024], SMALL.replace(k=1024), seeds=(0,), sample_last=2, sample_spread=1, **SHAPE
    )
    for name, r in result["contexts"][0]["methods"].items():
        assert r["mass_recall"] == pytest.approx(1.0, abs=1e-5), name
        assert r["out_rel_err"] < 1e-5, name


def test_hip_finds_planted_spans_that_sink_and_window_cannot_see():
    result = run_accuracy(
        [2048],
        SMALL.replace(k=256),
        methods=["hip", "streaming"],
        seeds=(0,),
        n_spans=2,
        sample_last=2,
        sample_spread=0,
        **SHAPE,
    )
    (ctx,) = result["contexts"]
    hip, streaming = ctx["methods"]["hip"], ctx["methods"]["streaming"]
    assert hip["span_cases"] == streaming["span_cases"] > 0
    assert streaming["span_recall"] == 0.0
    assert hip["span_recall"] >= 0.5
    assert hip["mass_recall"] > streaming["mass_recall"] + 0.1


def test_best_methods_excludes_the_references():
    methods = {
        "dense": {"x": 1.0},
        "oracle": {"x": 0.9},
        "a": {"x": 0.5},
        "b": {"x": 0.7},
        "c": {"x": 0.7},
    }
    assert best_methods(methods, "x", higher=True) == {"b", "c"}
    assert best_methods(methods, "x", higher=False) == {"a"}
    assert set(REFERENCE_METHODS) == {"dense", "oracle", "exact"}


def test_accuracy_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "acc.json"
    argv = [
        "accuracy",
        "--context",
        "1k",
        "--seeds",
        "0",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--sample-spread",
        "1",
        "--hip-k",
        "128",
        "--window",
        "128",
        "--sinks",
        "16",
        "--by-head-type",
        "--span-halo",
        "32",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mass recall" in out and "span recall" in out and "select reads" in out
    assert "context 1,024 tokens" in out and "by head type" in out
    for name in METHODS:
        assert f"\n{name} " in out
    assert "*" in out
    data = json.loads(path.read_text())
    assert data["seeds"] == [0] and data["config"]["k"] == 128 and data["span_halo"] == 32
    (ctx,) = data["contexts"]
    assert ctx["context"] == 1024 and ctx["spans"]["0"] and ctx["query_blocks"]
    assert set(ctx["dense_mass"]) == {"retrieval", "sink", "recency", "mixed"}
    for r in ctx["methods"].values():
        assert {
            "mass_recall",
            "span_recall",
            "out_rel_err",
            "keys_per_query",
            "select_reads",
            "mass_recall_by_head_type",
        } <= set(r)

    assert main(argv[:-2] + ["--methods", "dense,streaming", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["contexts"][0]["methods"]) == ["dense", "streaming"]


def test_accuracy_cli_errors(capsys):
    assert main(["accuracy", "--context", "200"]) == 2
    assert ">= 256" in capsys.readouterr().err
    assert main(["accuracy", "--context", "1k", "--heads", "3", "--kv-heads", "2"]) == 2
    assert "multiple of --kv-heads" in capsys.readouterr().err
    assert main(["accuracy", "--context", "1k", "--hip-k", "100"]) == 2
    assert "HiPConfig.k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["accuracy", "--methods", "dense,bogus"])
    assert "unknown 'bogus'" in capsys.readouterr().err
    assert acc_cli.parse_tokens("4k") == 4096 and acc_cli.parse_tokens("1m") == 1 << 20


def test_model_accuracy_scores_every_layer_of_a_captured_model():
    """The real-model harness on the tiny random Llama: q/k/v captured from every layer, every
    method scored on the last query block against that layer's dense attention."""
    from hip_attn.accuracy.model_attention import (
        capture_qkv,
        format_model_accuracy,
        run_model_accuracy,
    )
    from hip_attn.accuracy.model_eval import random_model

    lm = random_model(0, torch.device("cpu"), torch.float32)
    cfg = HiPConfig(k=64, block_size_q=32, sink_tokens=16, window=64, dense_threshold=0)
    result = run_model_accuracy(
        lm, cfg, context=512, depth=0.5, filler="river", text=None, methods=["oracle", "hip"]
    )
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    a, e = result["needle"]
    assert 0 < a < e < 512 and result["query_block"] == [480, 512]
    for row in result["layers"]:
        assert len(row["head_types"]) == 4
        # the oracle maximizes mass recall at this budget: no method beats it
        assert row["oracle"]["mass_recall"] >= row["hip"]["mass_recall"] - 1e-6
    assert set(result["methods"]) == {"oracle", "hip"}
    assert result["methods"]["hip"]["select_reads"] > 0
    assert "needle heads" in format_model_accuracy(result)
    q, k, v, scale = capture_qkv(lm, torch.randint(3, 500, (1, 40)))[1]
    assert q.shape == (1, 4, 40, 32) and k.shape == v.shape == (1, 2, 40, 32)
    assert scale == pytest.approx(32**-0.5)
