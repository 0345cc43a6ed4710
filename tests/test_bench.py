"""``hip-attn bench``: the harness end to end on tiny CPU sizes (JSON lines, PNG, table), the
work it counts, the flex BlockMask it builds from a HiP selection, and the attention floor."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.bench.cases import BenchCase, Shape
from hip_attn.bench.environment import default_output, gpu_preset_for
from hip_attn.bench.flex import plan_flex
from hip_attn.bench.report import MixedResults, check_appendable
from hip_attn.bench.work import dense_work, hip_work
from hip_attn.cli import main
from hip_attn.geometry import query_blocks
from hip_attn.perf import Scenario, estimate, get_gpu, get_model
from hip_attn.perf.attention_floor import attention_floor
from hip_attn.reference import attended_keys, estimate_mask_reference, hip_attention_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--device", "cpu", "--heads", "2", "--kv-heads", "1", "--head-dim", "64",
    "--dtype", "float32", "--hip-k", "64", "--block-size-q", "32", "--block-size-k", "8",
    "--sinks", "16", "--window", "64", "--cpu-runs", "1", "--cpu-warmup", "0",
]  # fmt: skip
CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prefill_smoke_writes_jsonl_png_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "r.jsonl", tmp_path / "prefill.png"
    argv = ["bench", "prefill", *TINY, "--context", "512", "--out", str(out), "--plot", str(png)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (record,) = _records(out)
    # labelled as CPU, never as a GPU
    assert record["device"] == "cpu" and record["device_type"] == "cpu"
    assert record["timing"] in ("cpu-interpreter", "cpu-reference")
    assert record["schema"] == 1 and len(record["run_id"]) == 12
    for key in ("torch", "triton", "python", "timestamp"):
        assert key in record
    assert record["git"]["commit"]  # a sha, or "unknown"
    assert record["mode"] == "prefill" and record["context"] == record["queries"] == 512
    assert record["shape"] == {
        "batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 64, "dtype": "float32"
    }  # fmt: skip
    assert record["config"]["k"] == 64 and record["config"]["window"] == 64
    results = record["results"]
    for name in ("hip", "hip_mask", "hip_sparse", "sdpa"):
        r = results[name]
        assert r["ms"] > 0 and r["runs"] == 1 and r["p20_ms"] <= r["p80_ms"]
        assert r["flops"] > 0 and r["bytes"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        assert r["peak_mem_bytes"] is None  # CUDA only
    assert results["sdpa"]["backend"] in ("flash", "math")
    assert "CUDA" in results["flex"]["skipped"]
    assert record["speedup"]["hip_vs_sdpa"] == pytest.approx(
        results["sdpa"]["ms"] / results["hip"]["ms"]
    )
    prediction = record["prediction"]
    assert prediction["gpu"] == "h100-sxm" and prediction["phase"] == "prefill"
    assert set(prediction["ms"]) >= {"sdpa", "hip", "hip_mask", "hip_sparse"}
    assert prediction["measured_over_floor"] is None  # CPU vs a GPU floor: not compared
    assert record["work"]["keys_per_query"] > 0 and record["work"]["search_dots"] > 0
    assert 0 <= record["accuracy"]["hip_vs_sdpa_rel_l2"] < 2
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    # the table on stdout, progress on stderr
    assert "prefill on cpu" in captured.out and "CPU timings" in captured.out
    header = next(line for line in captured.out.splitlines() if "HiP ms" in line)
    assert "SDPA ms" in header and "x floor" in header
    assert any(line.split()[:1] == ["512"] for line in captured.out.splitlines())
    assert "[1/1] prefill 512" in captured.err


def test_decode_smoke_appends_and_default_plot_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.jsonl"
    argv = ["bench", "decode", *TINY, "--context", "600", "--methods", "hip,sdpa"]
    assert main([*argv, "--out", str(out), "--plot"]) == 0
    assert main([*argv, "--out", str(out)]) == 0  # appends
    first, second = _records(out)
    assert first["run_id"] != second["run_id"]
    assert first["queries"] == 1 and first["context"] == 600
    amortized = first["results"]["hip_amortized"]
    assert amortized["steps_per_run"] == CFG.refresh_interval and amortized["ms"] > 0
    assert "needs CUDA" in first["results"]["hip_graph"]["skipped"]
    assert "flex" not in first["results"]
    assert set(first["speedup"]) >= {"hip_vs_sdpa", "hip_step_vs_sdpa"}
    assert first["prediction"]["phase"] == "decode" and "hip_amortized" in first["prediction"]["ms"]
    assert (tmp_path / "d-decode.png").read_bytes()[:8] == PNG_MAGIC
    assert "step ms" in capsys.readouterr().out


def test_a_method_that_errors_is_recorded_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import hip_attn.bench.runner as runner

    real = runner.prepare_sdpa

    def failing_sdpa(*args):  # noqa: ANN002, ANN202
        def boom() -> None:
            raise RuntimeError("boom")

        return dataclasses.replace(real(*args), fn=boom)

    monkeypatch.setattr(runner, "prepare_sdpa", failing_sdpa)
    out = tmp_path / "e.jsonl"
    argv = ["bench", "decode", *TINY, "--context", "600", "--methods", "hip,sdpa"]
    assert main([*argv, "--out", str(out)]) == 1
    (record,) = _records(out)
    assert record["results"]["sdpa"] == {"error": "RuntimeError: boom"}
    assert "failed (recorded as errors): 600: sdpa" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smoke_times_every_method(tmp_path: Path) -> None:
    out = tmp_path / "gpu.jsonl"
    argv = ["bench", "decode", "--context", "8k", "--heads", "8", "--kv-heads", "2"]
    timing = ["--rep-ms", "5", "--warmup-ms", "2", "--min-runs", "3", "--out", str(out)]
    assert main([*argv, *timing, "--plot"]) == 0
    (record,) = _records(out)
    assert record["device_type"] == "cuda" and record["timing"] == "cuda-events"
    for name in ("hip", "hip_amortized", "hip_graph", "hip_sparse", "sdpa", "flex"):
        assert record["results"][name]["ms"] > 0, record["results"][name]
        assert record["results"][name]["peak_mem_bytes"] > 0
        assert record["results"][name]["wall_ms"] > 0  # launch time included
    assert record["accuracy"]["flex_vs_hip_max_abs"] < 2e-2
    assert record["speedup"]["hip_graph_vs_sdpa"] > 0
    assert record["prediction"]["measured_over_floor"]["sdpa"] > 0.5


def test_refuses_to_mix_devices_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "timing": "cuda-events"}) + "\n")
    with pytest.raises(MixedResults, match="refusing"):
        check_appendable(path, "cpu")
    check_appendable(path, "NVIDIA H100 80GB HBM3")
    check_appendable(tmp_path / "missing.jsonl", "cpu")


def test_default_paths_and_gpu_presets() -> None:
    assert default_output("NVIDIA H100 80GB HBM3", "cuda") == Path(
        "bench/results/nvidia-h100-80gb-hbm3.jsonl"
    )
    assert default_output("cpu", "cpu") == Path("bench/results/cpu-smoke.jsonl")
    assert gpu_preset_for("NVIDIA H200") == ("h200", None)
    assert gpu_preset_for("NVIDIA H100 80GB HBM3") == ("h100-sxm", None)
    preset, note = gpu_preset_for("NVIDIA H100 PCIe")
    assert preset == "h100-sxm" and note and "--gpu" in note


TINY_OFFLOAD = [
    "--device", "cpu", "--heads", "2", "--kv-heads", "1", "--head-dim", "64",
    "--dtype", "float32", "--hip-k", "64", "--block-size-q", "32", "--block-size-k", "8",
    "--sinks", "16", "--window", "64", "--refresh-interval", "2", "--cache-blocks", "32",
    "--max-chunk", "128", "--host-chunk-tokens", "512", "--steps", "4", "--warmup-steps", "1",
    # the lighter search: a refresh fetches only its selection's blocks, keys and values
    "--beam", "1", "--query-pool-stride", "2", "--leaf-scores", "summary",
]  # fmt: skip


def test_offload_smoke_memory_growth_and_decode_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "o.jsonl", tmp_path / "o.png"
    argv = ["bench", "offload", *TINY_OFFLOAD, "--memory-context", "512,2k", "--context", "600"]
    code = main([*argv, "--out", str(out), "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    memory, decode = _records(out)
    for record in (memory, decode):  # labelled as CPU, the format of the other modes
        assert record["device"] == "cpu" and record["device_type"] == "cpu"
        assert record["timing"] in ("cpu-interpreter", "cpu-reference")
        assert record["schema"] == 1 and record["git"]["commit"] and "torch" in record
        assert record["mode"] == "offload" and record["queries"] == 1
        assert record["shape"]["kv_heads"] == 1 and record["config"]["refresh_interval"] == 2
        assert record["offload"]["cache_blocks"] == 32 and record["offload"]["gather"] == "torch"
    assert memory["run_id"] == decode["run_id"]
    block_bytes = 2 * 8 * 64 * 4  # one key block of K and V

    # memory: on the CPU the layer's own device_bytes, labelled so
    assert memory["part"] == "memory" and "device_bytes" in memory["memory"]["source"]
    small, large = memory["memory"]["per_context"]
    assert (small["context"], large["context"]) == (512, 2048)
    for e in (small, large):
        assert e["peak_bytes"] is None and e["allocated_bytes"] is None  # CUDA only
        assert e["measured_bytes"] == e["device_bytes"] > e["rep_bytes"] > 0
        assert e["tokens"] == e["context"]  # the fill and the steps end there
        assert e["host_bytes"] >= e["full_kv_bytes"] == 2 * e["tokens"] * 64 * 4
    growth = memory["memory"]["growth"]
    assert growth["measured_bytes"] == growth["device_bytes"]
    assert growth["device_bytes"] == growth["rep_bytes"] + growth["table_bytes"]  # R, table
    assert growth["rep_bytes"] > 0 and growth["measured_over_rep"] == pytest.approx(
        growth["device_bytes"] / growth["rep_bytes"]
    )
    assert growth["full_kv_bytes"] == 2 * 1536 * 64 * 4
    assert growth["device_bytes"] < growth["full_kv_bytes"] / 2  # R: ~3 K / 8 at bk = 8

    # decode: 4 timed steps after 1 warm-up with refresh_interval 2: refresh, reuse alternate
    assert decode["part"] == "decode" and decode["context"] == 600
    results = decode["results"]
    refresh, reuse = results["offload_refresh"], results["offload_reuse"]
    assert refresh["steps"] == reuse["steps"] == 2 and refresh["ms"] > 0 and reuse["ms"] > 0
    assert refresh["p20_ms"] <= refresh["p80_ms"] and refresh["peak_mem_bytes"] is None
    assert refresh["bytes_per_step"] * 2 == refresh["misses"] * block_bytes
    # the same selection: its blocks are resident, the block cache is not even consulted
    assert reuse["bytes_per_step"] == 0 and reuse["hits"] == reuse["misses"] == 0
    assert reuse["hit_rate"] is None
    amortized = results["offload_amortized"]
    assert amortized["cycles"] == 1 and amortized["steps_per_cycle"] == 2
    assert results["offload_append"]["steps"] == 4
    for name in ("device_refresh", "device_reuse", "device_amortized", "device_append"):
        assert results[name]["ms"] > 0, results[name]
    assert set(decode["offload_vs_device"]) == {"refresh", "reuse", "amortized"}
    assert decode["accuracy"]["same_selection"] is True
    assert decode["accuracy"]["offload_vs_device_max_abs"] < 1e-4
    info = decode["offload"]
    assert info["fill_tokens"] == 600 and info["fill_s"] >= 0 and info["tokens_after"] == 605
    assert info["stats"]["bytes_moved"] == info["stats"]["misses"] * block_bytes

    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "offload on cpu" in captured.out and "refresh ms" in captured.out
    assert any(line.split()[:1] == ["growth"] for line in captured.out.splitlines())
    assert "[2/2] offload decode 600" in captured.err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offload_memory_grows_by_r_and_decode_is_timed(tmp_path: Path) -> None:
    out = tmp_path / "gpu-offload.jsonl"
    argv = ["bench", "offload", "--memory-context", "16k,128k", "--context", "32k"]
    assert main([*argv, "--steps", "32", "--warmup-steps", "8", "--out", str(out)]) == 0
    memory, decode = _records(out)
    assert memory["device_type"] == "cuda" and "max_memory_allocated" in memory["memory"]["source"]
    growth = memory["memory"]["growth"]
    assert growth["peak_bytes"] == growth["measured_bytes"] > 0
    assert growth["peak_over_rep"] <= 1.9  # R, and its old copy while it grows
    assert growth["allocated_over_rep"] <= 1.1  # R and the block table
    assert growth["measured_bytes"] < growth["full_kv_bytes"] / 2
    for name in ("offload_refresh", "offload_reuse", "device_refresh", "device_reuse"):
        assert decode["results"][name]["ms"] > 0, decode["results"][name]
    assert decode["results"]["offload_reuse"]["bytes_per_step"] == 0
    assert decode["accuracy"]["same_selection"] is True


def test_offload_decode_without_a_timed_refresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one timed step after the warm-up reuses the selection: no refresh, no complete cycle
    argv = ["bench", "offload", *TINY_OFFLOAD, "--parts", "decode", "--context", "300"]
    assert main([*argv, "--refresh-interval", "8", "--steps", "1", "--warmup-steps", "2",
                 "--out", str(tmp_path / "o.jsonl")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "no refresh step among the timed steps" in out
    assert "no complete refresh cycle" in out


def test_offload_bad_input_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "offload", *TINY_OFFLOAD, "--cache-blocks", "4"]) == 2
    assert "--cache-blocks 4 cannot hold" in capsys.readouterr().err
    assert main(["bench", "offload", *TINY_OFFLOAD, "--memory-context", "1k"]) == 2
    assert "two or more contexts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "offload", "--parts", "prefill"])


def test_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "prefill", "--device", "cpu", "--hip-k", "100"]) == 2
    assert "multiple of block_size_k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "prefill", "--context", "8q"])


def test_help_teaches_units_defaults_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--help"])
    text = capsys.readouterr().out
    for needle in (
        "k = 1024",
        "8k,32k,128k,512k,1m",
        "bench/results/cpu-smoke.jsonl",
        "examples:",
        "hip-attn bench prefill --context 8k,32k,128k",
        "--flex-kv-block",
    ):
        assert needle in text
    with pytest.raises(SystemExit):
        main(["bench", "offload", "--help"])
    text = capsys.readouterr().out
    for needle in ("64k,512k", "128k,512k,1m", "hip-attn bench offload --plot", "device_bytes"):
        assert needle in text


def test_cli_import_stays_torch_free() -> None:
    code = (
        "import sys; import hip_attn.cli as c; c.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the work counted ------------------------------------------------------------------------


def test_hip_work_counts_the_keys_exact_leaves_read(rand_qkv) -> None:
    # N = 20 candidates within the search width 32: one level, every child a leaf
    cfg = CFG.replace(beam=4, leaf_scores="keys")
    q, k, _ = rand_qkv(1, 2, 1, 1, 241, 64, seed=3)
    indices, stats = estimate_mask_reference(q, k, cfg)
    assert stats.n_candidates.tolist() == [[[20]]] and stats.scored.tolist() == [[[20]]]
    case = BenchCase("decode", 241, 1, Shape(1, 2, 1, 64, "float32"), cfg)
    work = hip_work(case, indices, stats.scored)
    pooled_rows = 2 * 1 * 64 * 4  # one pooled row per query head
    assert work.search.bytes == 20 * 8 * 64 * 4 + pooled_rows + indices.numel() * 4
    assert work.search.flops == 2 * 64 * 8 * 20 * 2  # 8 dot products per leaf, row and head


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing",
    [(4, 2, 300, 300, "kv_group"), (2, 1, 1, 900, "kv_group"), (4, 2, 70, 650, "head")],
)
def test_hip_work_matches_a_brute_force_count(
    rand_qkv, hq: int, hkv: int, tq: int, tk: int, sharing: str
) -> None:
    cfg = CFG.replace(head_sharing=sharing)
    q, k, _ = rand_qkv(1, hq, hkv, tq, tk, 64, seed=tq)
    indices, stats = estimate_mask_reference(q, k, cfg)
    case = BenchCase("prefill", tk, tq, Shape(1, hq, hkv, 64, "float32"), cfg)
    work = hip_work(case, indices, stats.scored)
    geo = query_blocks(tq, tk, cfg)
    visits = reads = 0
    per_sel = hq // indices.shape[1]
    for hs in range(indices.shape[1]):
        for j in range(indices.shape[2]):
            keys = attended_keys(int(geo.end[j]), int(geo.window_start[j]), indices[0, hs, j], cfg)
            rows = torch.arange(int(geo.start[j]), int(geo.end[j]))
            visits += int((keys[None, :] <= rows[:, None]).sum()) * per_sel
            reads += len(keys)
    assert work.key_visits == visits
    assert work.sparse.flops == 4 * 64 * visits
    qo, index_bytes = 2 * hq * tq * 64 * 4, indices.numel() * 4
    assert work.sparse.bytes == reads * 2 * 64 * 4 + qo + index_bytes
    pooled = -(-(geo.end - geo.start) // cfg.query_pool_stride)
    assert work.search_dots == int((stats.scored * pooled).sum()) * per_sel
    dense = dense_work(case)
    assert dense.flops == 4 * 64 * hq * sum(range(tk - tq + 1, tk + 1))


# ---- flex_attention driven by the HiP selection -----------------------------------------------


def _kernel_view(block_mask, truth_mod, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """What the compiled kernel attends (full blocks whole, partial blocks through mask_mod),
    and the exact mask from ``truth_mod``, both ``[B, H, rows, Tk]``."""
    b, h, rows, tk = shape
    bi = torch.arange(b)[:, None, None, None]
    hi = torch.arange(h)[None, :, None, None]
    qi = torch.arange(rows)[None, None, :, None]
    ki = torch.arange(tk)[None, None, None, :]
    partial_mod = block_mask.mask_mod(bi, hi, qi, ki).expand(b, h, rows, tk)
    truth = truth_mod(bi, hi, qi, ki).expand(b, h, rows, tk)
    seen = torch.zeros(b, h, rows, tk, dtype=torch.bool)
    qs, ks = block_mask.BLOCK_SIZE
    lists = (
        (block_mask.kv_num_blocks, block_mask.kv_indices, False),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True),
    )
    listed: dict[tuple[int, int, int], list[int]] = {}
    for counts, ids, full in lists:
        for x in range(b):
            for y in range(h):
                for m in range(counts.shape[2]):
                    rq = slice(m * qs, min((m + 1) * qs, rows))
                    blocks = ids[x, y, m, : int(counts[x, y, m])].tolist()
                    assert blocks == sorted(blocks)
                    listed.setdefault((x, y, m), []).extend(blocks)
                    for blk in blocks:
                        rk = slice(blk * ks, min((blk + 1) * ks, tk))
                        region = truth[x, y, rq, rk]
                        assert region.any(), "a listed block holds no attended key"
                        if full:
                            assert region.all(), "a full block holds unattended keys"
                            seen[x, y, rq, rk] = True
                        else:
                            seen[x, y, rq, rk] |= partial_mod[x, y, rq, rk]
    for blocks in listed.values():  # each block once: flex would count it twice
        assert len(blocks) == len(set(blocks))
    return seen, truth


@pytest.mark.parametrize(
    "hq,hkv,tq,tk,sharing,bk,kv_block,fold,full_width",
    [
        (4, 2, 384, 384, "kv_group", 8, 16, None, False),  # prefill, 2 HiP blocks per flex block
        (4, 2, 1, 700, "kv_group", 8, 16, None, False),  # decode: GQA group folded into rows
        (4, 2, 1, 700, "kv_group", 8, 32, False, True),  # decode, unfolded, 4 HiP blocks per flex
        (4, 2, 300, 300, "head", 16, 16, None, True),  # one HiP block per flex block
        (2, 2, 70, 650, "kv_group", 16, 16, None, False),  # chunked prefill
    ],
)
def test_flex_block_mask_does_hips_work(
    rand_qkv, hq, hkv, tq, tk, sharing, bk, kv_block, fold, full_width
) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    cfg = CFG.replace(head_sharing=sharing, block_size_k=bk)
    q, k, v = rand_qkv(1, hq, hkv, tq, tk, 64, seed=tk)
    indices, _ = estimate_mask_reference(q, k, cfg)
    ref = hip_attention_reference(q, k, v, cfg, indices=indices)
    variants = [True, False] if kv_block == bk else [True]  # a mask_mod without the bitmap
    build = {"fold": fold, "full_width": full_width}
    exact = plan_flex(indices, tuple(q.shape), hkv, tk, cfg, kv_block, exact=True, **build)
    rows = exact.block_mask.seq_lengths[0]
    heads = hkv if exact.folded else hq
    for flag in variants:
        plan = plan_flex(indices, tuple(q.shape), hkv, tk, cfg, kv_block, exact=flag, **build)
        bm = plan.block_mask
        assert bm.kv_indices.shape == bm.full_kv_indices.shape  # flex decode shares strides
        if full_width:
            assert bm.kv_indices.shape[-1] == -(-tk // kv_block)
        seen, truth = _kernel_view(plan.block_mask, exact.block_mask.mask_mod, (1, heads, rows, tk))
        assert torch.equal(seen, truth)  # the kernel attends exactly HiP's keys
        assert plan.listed_keys > 0
    # eager flex evaluates mask_mod on every element: the exact one reproduces HiP
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        if exact.folded:
            out = flex_attention(
                q.reshape(1, hkv, -1, 64), k, v, block_mask=exact.block_mask
            ).view_as(q)
        else:
            out = flex_attention(q, k, v, block_mask=exact.block_mask, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- the analytic floor ------------------------------------------------------------------------


def test_attention_floor_is_the_estimators_attention_per_layer() -> None:
    model, gpu = get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    sc = Scenario(model, gpu, output_tokens=1)
    shapes = {"heads": model.heads, "kv_heads": model.kv_heads, "head_dim": model.head_dim}
    hip_decode = {"hip_search", "hip_attention"}  # a prefill also builds the summary tree
    expected = {"dense": ({"attention"},) * 2, "hip": (hip_decode | {"hip_representatives"},
                                                       hip_decode)}  # fmt: skip
    for method, (prefill_names, decode_names) in expected.items():
        est = estimate(sc, method, 131072)
        for phase, cost, names in (
            ("prefill", est.prefill, prefill_names),
            ("decode", est.decode, decode_names),
        ):
            floor = attention_floor(method, phase, 131072, gpu=gpu, **shapes)
            ops = [op for op in cost.operators if op.name in names]
            assert set(floor.parts) == names
            assert floor.total.flops == pytest.approx(sum(op.flops for op in ops) / model.layers)
            assert floor.total.hbm_bytes == pytest.approx(
                sum(op.hbm_bytes for op in ops) / model.layers
            )
    dense = attention_floor("dense", "prefill", 131072, gpu=gpu, **shapes)
    hip = attention_floor("hip", "prefill", 131072, gpu=gpu, **shapes)
    assert dense.total.bound == "compute" and dense.time_s > 10 * hip.time_s
    with pytest.raises(ValueError, match="method"):
        attention_floor("sparse", "prefill", 1024, gpu=gpu, **shapes)  # type: ignore[arg-type]


def test_cuda_timing_also_reports_the_wall_clock_between_synchronizations(monkeypatch) -> None:
    """time_cuda's plumbing on the CPU: events that read the host clock, a host-side call of
    ~2 ms; the wall-clock median is reported beside the event median."""
    import time

    from hip_attn.bench import timing

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = 0.0

        def record(self) -> None:
            self.t = time.perf_counter()

        def elapsed_time(self, end: Event) -> float:
            return (end.t - self.t) * 1e3

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: empty(*a, **k))
    monkeypatch.setattr(timing, "L2_FLUSH_BYTES", 16)
    settings = timing.TimingSettings(warmup_ms=1, rep_ms=10, min_runs=3, max_runs=5)
    result = timing.time_cuda(lambda: time.sleep(0.002), settings)
    assert result.runs >= 3 and result.ms >= 2 and result.wall_ms is not None
    assert result.wall_ms >= 2


def test_a_record_lists_the_tiles_tuned_for_its_own_shape_and_size_class(monkeypatch):
    """Of the autotuner's choices so far in the process, a case's record keeps those of its
    query heads, head dim, dtype and size class (the prefill's programs to a power of two)."""
    from hip_attn.bench import runner
    from hip_attn.triton_kernels import attention as attention_kernel

    case = BenchCase("prefill", 8192, 8192, Shape(1, 32, 8, 128, "bfloat16"), HiPConfig())
    own = attention_kernel.size_class(1, 32, 8192 // 64)

    def entry(q_heads, d, dtype, size, heads):
        return {"q_heads": str(q_heads), "D": str(d), "dtypes": f"torch.{dtype},torch.int32",
                "size_class": str(size), "heads": heads}  # fmt: skip

    chosen = [
        entry(32, 128, "bfloat16", own, 2),  # this case's
        entry(32, 128, "bfloat16", own + 1, 1),  # a longer prefill's
        entry(32, 128, "float16", own, 1),
        entry(32, 64, "bfloat16", own, 1),
        entry(16, 128, "bfloat16", own, 1),
    ]
    monkeypatch.setattr(attention_kernel, "tuned_tiles", lambda: chosen)
    monkeypatch.setattr(runner, "uses_triton", lambda device: True)
    assert runner._tuned_tiles(case, torch.device("cpu")) == chosen[:1]
    monkeypatch.setattr(runner, "uses_triton", lambda device: False)
    assert runner._tuned_tiles(case, torch.device("cpu")) is None
