"""``hip-attn roofline``: table, JSON and PNG outputs, help text, and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hip_attn.perf import Scenario, estimate, get_gpu, get_model
from hip_attn.perf.cli import add_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hip-attn")
    add_parser(parser.add_subparsers())
    return parser


def roofline(*argv: str) -> int:
    args = _parser().parse_args(["roofline", *argv])
    return int(args.func(args))


def test_table_for_fu_example(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "yi-34b", "--gpu", "a100-80g", "--context", "4k,50000"]
    assert roofline(*argv, "--prefill-chunk", "4k") == 0
    out = capsys.readouterr().out
    assert "yi-34b on a100-80g" in out
    assert "KV 245,760 B/token" in out
    assert "context 4k (4,096 tokens)" in out and "context 50000 (50,000 tokens)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("dense")]
    assert len(rows) == 2
    # mode, KV/req (2 cells), HBM/req (2), act (2), fits, max conc, max ctx, prefill (2), ...
    assert rows[1][1:3] == ["12.3", "GB"] and rows[1][7:9] == ["yes", "1"]
    assert rows[0][10:13] == ["925", "ms", "compute"]
    assert rows[0][17:19] == ["8.52", "s"] and rows[1][17:19] == ["9.91", "s"]
    # Yi-34B was trained on 4K: 50000 tokens is past it, and 4k + 250 outputs too.
    assert out.count("exceeds yi-34b's trained context (4,096 tokens") == 2
    # Unchunked, the 50K prompt's 7.58 GB of activations do not fit beside its KV.
    assert roofline(*argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:5] == "dense"]
    assert rows[1][5:9] == ["7.58", "GB", "NO", "0"]


def test_compare_json_matches_estimator(capsys: pytest.CaptureFixture[str]) -> None:
    code = roofline("--context", "4k,128k", "--compare", "dense,hip,hip+offload", "--json")
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["name"] == "llama-3.1-8b" and data["gpu"]["name"] == "h100-sxm"
    assert data["settings"]["modes"] == ["dense", "hip", "hip+offload"]
    assert data["derived"]["max_context"]["hip+offload"] == 532_724  # activation-bound
    results = data["results"]
    assert [(r["context"], r["mode"]) for r in results] == [
        (c, m) for c in (4096, 131072) for m in ("dense", "hip", "hip+offload")
    ]
    sc = Scenario(get_model("llama-3.1-8b"), get_gpu("h100-sxm"))
    for r in results:
        est = estimate(sc, r["mode"], r["context"])
        assert r["prefill_s"] == est.prefill.time_s
        assert r["decode_ms_per_token"] == est.decode_ms_per_token
        assert r["max_concurrency"] == est.max_concurrency
        assert r["context_switch_s"] == est.context_switch_s
        names = {op["name"] for op in r["decode"]["operators"]}
        assert "lm_head" in names
        assert ("attention" in names) == (r["mode"] == "dense")
        for op in r["prefill"]["operators"]:
            assert op["bound"] in ("compute", "memory", "latency") and op["intensity"] > 0
    hip_128k = results[4]
    assert hip_128k["mode"] == "hip" and "hip_search" in {
        op["name"] for op in hip_128k["prefill"]["operators"]
    }


def test_json_file_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    png, js = tmp_path / "roofline.png", tmp_path / "out.json"
    code = roofline(
        "--context", "4k,64k", "--compare", "dense,hip,hip+offload",
        "--json", str(js), "--plot", str(png),
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "context 64k" in out and f"plot written to {png}" in out
    assert json.loads(js.read_text())["results"][0]["mode"] == "dense"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000


def test_overrides_and_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "mistral",
                "num_hidden_layers": 32,
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "intermediate_size": 14336,
                "vocab_size": 32768,
            }
        )
    )
    gpu_file = tmp_path / "gpu.json"
    gpu_file.write_text(json.dumps({"name": "h100-measured", "hbm_bandwidth": 2900}))
    code = roofline(
        "--config", str(cfg), "--gpu-file", str(gpu_file), "--flops", "700",
        "--hbm", "94GB", "--compute-efficiency", "0.5", "--context", "8k", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["matmul_params"] == get_model("mistral-7b").matmul_params
    assert data["gpu"]["name"] == "h100-measured"
    assert data["gpu"]["flops"] == 700e12 and data["gpu"]["hbm_bandwidth"] == 2900e9
    assert data["gpu"]["hbm"] == 94e9
    assert data["derived"]["ridge_point"] == pytest.approx(350e12 / 2900e9)


def test_hip_flags_reach_the_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    code = roofline(
        "--mode", "hip", "--hip-k", "1024", "--window", "512", "--sinks", "128",
        "--refresh-interval", "16", "--block-size-k", "16", "--head-sharing", "head",
        "--dense-threshold", "0", "--context", "128k", "--json",
    )  # fmt: skip
    assert code == 0
    hip = json.loads(capsys.readouterr().out)["settings"]["hip"]
    assert (hip["k"], hip["window"], hip["sink_tokens"]) == (1024, 512, 128)
    assert (hip["refresh_interval"], hip["block_size_k"]) == (16, 16)
    assert hip["head_sharing"] == "head"
    assert hip["dense_threshold"] == 0


def test_help_teaches_units_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["roofline", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("TFLOP/s", "GB/s", "80GiB", "k = 1024", "examples:", "--compare", "--miss-rate"):
        assert needle in text


def test_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert roofline("--list") == 0
    out = capsys.readouterr().out
    assert "yi-34b" in out and "rtx-4090" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "gpt-5"], "llama-3.1-8b, llama-3.1-70b, yi-34b"),
        (["--gpu", "tpu"], "a100-80g, a100-40g, h100-sxm, h100-pcie, h200, b200, l40s, l40"),
        (["--prefill-chunk", "0"], "positive whole number"),
        (["--launch-latency", "0"], "must be a positive number"),
        (["--launches", "magic"], "invalid choice"),
        (["--hbm-bandwidth", "0"], "must be a positive number"),
        (["--flops", "-3"], "must be a positive number"),
        (["--batch", "0"], "must be >= 1"),
        (["--context", "4k,-1"], "positive whole number"),
        (["--hbm=-80GiB"], "memory size must be at least one byte"),
        (["--hbm", "80 parsecs"], "not a memory size"),
        (["--compute-efficiency", "1.5"], "(0, 1]"),
        (["--miss-rate", "2"], "[0, 1]"),
        (["--compare", "dense,sparse"], "unknown attention mode 'sparse'"),
    ],
)
def test_bad_flags_are_argparse_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["roofline", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--context", "16m"], "exceeds what any memory here can hold"),
        (["--tp", "3"], "tensor-parallel degree 3"),
        (["--hip-k", "100"], "multiple of block_size_k"),
        (["--window", "4", "--mode", "hip"], "window must be >= block_size_q"),
        (["--block-cache", "128", "--mode", "hip+offload"], "block cache"),
    ],
)
def test_inconsistent_input_is_one_line_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert roofline(*argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hip-attn roofline: error:")
    assert needle in lines[0]
    assert captured.out == ""


def test_weights_that_do_not_fit_are_reported_not_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert roofline("--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--context", "4k") == 0
    out = capsys.readouterr().out
    assert "do not fit" in out and " NO " in out
    assert roofline("--model", "llama-3.1-70b", "--tp", "2", "--context", "4k") == 0
    assert " yes " in capsys.readouterr().out


def test_import_stays_torch_free() -> None:
    """The perf package adds neither torch, triton nor matplotlib to what ``hip_attn`` loads."""
    code = (
        "import sys, hip_attn\n"
        "heavy = ('torch', 'triton', 'matplotlib')\n"
        "before = {m for m in heavy if m in sys.modules}\n"
        "import hip_attn.perf, hip_attn.perf.cli\n"
        "after = {m for m in heavy if m in sys.modules}\n"
        "assert after == before, after - before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_in_hip_attn_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from hip_attn.cli import main

    code = main(["roofline", "--context", "4k"])
    assert code == 0
    assert "llama-3.1-8b on h100-sxm" in capsys.readouterr().out
