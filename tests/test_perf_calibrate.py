"""``hip-attn roofline --calibrate``: fitting efficiencies to bench results in their format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_perf_cli import roofline

from hip_attn.config import HiPConfig
from hip_attn.perf import get_gpu
from hip_attn.perf.attention_floor import attention_floor
from hip_attn.perf.calibrate import calibrate
from hip_attn.perf.estimator import LAUNCH_PROFILES

SHAPE = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
GPU = get_gpu("h100-sxm")
# Synthetic "measurements": SDPA at 70% of the model, the sparse kernel at 25%, the search at 10%.
EFF = {"sdpa": 0.7, "hip_sparse": 0.25, "hip_mask": 0.1}


def _predicted(mode: str, ctx: int) -> dict[str, float]:
    """Seconds of each operator by the model, written out independently of calibrate.py."""
    cfg = HiPConfig()
    kw = {"gpu": GPU, "heads": 32, "kv_heads": 8, "head_dim": 128}
    dense = attention_floor("dense", mode, ctx, **kw)  # type: ignore[arg-type]
    hip = attention_floor("hip", mode, ctx, config=cfg.replace(refresh_interval=1), **kw)  # type: ignore[arg-type]
    return {
        "sdpa": dense.time_s,
        "hip_sparse": hip.parts["hip_attention"].time_s,
        "hip_mask": hip.parts["hip_search"].time_s,
    }


def _write(path: Path, noise: dict[tuple[str, int], float]) -> None:
    lines = []
    for mode, ctx in (("prefill", 32768), ("prefill", 131072), ("decode", 131072)):
        pred = _predicted(mode, ctx)
        results: dict[str, dict[str, object]] = {
            m: {"ms": 1e3 * pred[m] / EFF[m] * noise.get((mode, ctx), 1.0)} for m in EFF
        }
        results["hip"] = {"ms": 1e3 * (pred["hip_sparse"] / 0.25 + pred["hip_mask"] / 0.1)}
        results["flex"] = {"skipped": "needs CUDA"}
        record = {
            "schema": 1, "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda",
            "mode": mode, "context": ctx, "queries": ctx if mode == "prefill" else 1,
            "shape": SHAPE, "config": HiPConfig().to_dict(), "results": results,
        }  # fmt: skip
        lines.append(json.dumps(record))
    lines.append(json.dumps({"mode": "offload", "part": "memory"}))  # ignored
    path.write_text("\n".join(lines) + "\n")


def test_recovers_the_efficiencies(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    _write(path, {})
    fit = calibrate(path, GPU, LAUNCH_PROFILES["today"])
    assert fit.efficiency["attention"] == pytest.approx(0.7, rel=1e-9)
    assert fit.efficiency["hip_attention"] == pytest.approx(0.25, rel=1e-9)
    assert fit.efficiency["hip_search"] == pytest.approx(0.1, rel=1e-9)
    assert len(fit.cases) == 3 * 4
    for case in fit.cases:  # hip (not fitted) included: its parts are
        assert case.error == pytest.approx(0.0, abs=1e-9)


def test_noisy_fit_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.jsonl"
    _write(path, {("prefill", 32768): 2.0, ("prefill", 131072): 0.5})
    assert roofline("--calibrate", str(path), "--gpu", "h100-sxm") == 0
    out = capsys.readouterr().out
    assert "attention" in out and "hip_search" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert len(rows) == 12
    # The geometric mean sits between x2 and x0.5: those two cases err by -50% and +100%.
    errors = {(r[0], r[1], r[2]): r[-1] for r in rows}
    assert errors[("prefill", "32k", "sdpa")] == "-50.0%"
    assert errors[("prefill", "128k", "sdpa")] == "+100.0%"
    assert errors[("decode", "128k", "sdpa")] in ("+0.0%", "-0.0%")


def test_unreadable_or_empty_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"mode": "mask", "context": 8, "queries": 8}) + "\n")
    for path in (tmp_path / "missing.jsonl", empty):
        assert roofline("--calibrate", str(path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hip-attn roofline: error:")


def test_json_writes_the_fit_and_other_options_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.jsonl"
    _write(path, {})
    out = tmp_path / "fit.json"
    assert roofline("--calibrate", str(path), "--launches", "fused", "--json", str(out)) == 0
    fit = calibrate(path, GPU, LAUNCH_PROFILES["fused"])
    data = json.loads(out.read_text())
    assert data["efficiency"] == pytest.approx(fit.efficiency)
    assert [c["method"] for c in data["cases"]] == [c.method for c in fit.cases]
    assert [c["error"] for c in data["cases"]] == pytest.approx([c.error for c in fit.cases])
    capsys.readouterr()
    assert roofline("--calibrate", str(path), "--json") == 0  # to stdout, instead of the table
    assert json.loads(capsys.readouterr().out)["gpu"] == GPU.name
    # what the fit does not read is refused, not ignored
    for extra in (["--context", "4k"], ["--plot", str(tmp_path / "p.png")], ["--model", "yi-34b"],
                  ["--hip-k", "1024"], ["--compare", "dense,hip"], ["--hbm", "100"],
                  ["--list"]):  # fmt: skip
        assert roofline("--calibrate", str(path), *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"hip-attn roofline: error: {extra[0]}")
    assert not (tmp_path / "p.png").exists()
    # what it does read: the GPU's peaks and latencies change the fit
    faster = tmp_path / "faster.json"
    assert roofline("--calibrate", str(path), "--flops", "2000", "--json", str(faster)) == 0
    assert json.loads(faster.read_text())["efficiency"] != data["efficiency"]
