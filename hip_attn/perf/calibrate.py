"""``hip-attn roofline --calibrate``: fit the model's per-operator efficiencies to measurements.

Reads ``hip-attn bench`` results (JSON lines, one record per case: ``mode``, ``context``,
``queries``, ``shape``, ``config`` and ``results[method]["ms"]``; see
``hip_attn/bench/runner.py``), predicts each measured method with :func:`attention_floor` and
fits one efficiency per operator, the geometric mean of ``predicted / measured`` over the cases:

* ``attention`` (dense) from ``sdpa``;
* ``hip_attention`` from ``hip_sparse`` (sparse attention on a fixed selection);
* ``hip_search`` from ``hip_mask`` (the search of a step that searches).

The calibrated prediction of a case is ``predicted / efficiency``. ``hip`` (search + sparse
attention; for decode a refreshing step) is predicted from the two fitted efficiencies and
measured independently: its error checks the fit on a method that took no part in it. Pure
Python.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hip_attn.config import HiPConfig
from hip_attn.perf.attention_floor import Method, Phase, attention_floor
from hip_attn.perf.estimator import LaunchProfile
from hip_attn.perf.hardware import GPUSpec
from hip_attn.perf.units import short_tokens

#: Measured method -> the operator whose efficiency it fits.
FITTED = {"sdpa": "attention", "hip_sparse": "hip_attention", "hip_mask": "hip_search"}
_MODEL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class CaseFit:
    """One measured method of one case.

    Attributes:
        label: ``"decode 128k"``.
        method: ``sdpa``, ``hip_sparse``, ``hip_mask`` or ``hip``.
        measured_s, predicted_s: seconds measured, and predicted at peak.
        calibrated_s: the prediction with the fitted efficiencies.
    """

    label: str
    method: str
    measured_s: float
    predicted_s: float
    calibrated_s: float

    @property
    def error(self) -> float:
        """``calibrated / measured - 1``."""
        return self.calibrated_s / self.measured_s - 1.0


@dataclass(frozen=True)
class Calibration:
    """Fitted efficiencies (``predicted / measured`` at peak; below 1: slower than the model)
    and every case."""

    gpu: str
    efficiency: dict[str, float]
    cases: list[CaseFit]


def _config(data: dict[str, Any]) -> HiPConfig:
    names = {f.name for f in fields(HiPConfig)}
    return HiPConfig(**{k: v for k, v in data.items() if k in names})


def _phase(record: dict[str, Any]) -> Phase | None:
    if record.get("mode") not in ("prefill", "decode"):
        return None
    if record["queries"] == record["context"]:
        return "prefill"
    return "decode" if record["queries"] == 1 else None


def _parts(
    record: dict[str, Any], phase: Phase, gpu: GPUSpec, launches: LaunchProfile
) -> dict[str, float]:
    """Predicted seconds of each operator for the case (the search as a searching step)."""
    sh, cfg = record["shape"], _config(record["config"])
    common: dict[str, Any] = {
        "heads": sh["heads"],
        "kv_heads": sh["kv_heads"],
        "head_dim": sh["head_dim"],
        "gpu": gpu,
        "batch": sh["batch"],
        "dtype": _MODEL_DTYPE[sh["dtype"]],
        "launches": launches,
    }

    def floor(method: Method, config: HiPConfig) -> dict[str, float]:
        f = attention_floor(method, phase, record["context"], config=config, **common)
        return {name: cost.time_s for name, cost in f.parts.items()}

    parts = floor("dense", cfg)
    parts.update(floor("hip", cfg.replace(refresh_interval=1)))
    return parts


def calibrate(path: str | Path, gpu: GPUSpec, launches: LaunchProfile) -> Calibration:
    """Fit the efficiencies to the records of ``path`` on ``gpu``.

    Raises:
        ValueError: unreadable file, or no record with a measured method the model predicts.
    """
    try:
        lines = Path(path).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise ValueError(f"cannot read bench results {str(path)!r}: {exc}") from exc
    measured: list[tuple[str, str, float, dict[str, float]]] = []
    for number, record in enumerate(records, 1):
        try:
            phase = _phase(record) if isinstance(record, dict) else None
            if phase is None:
                continue
            parts = _parts(record, phase, gpu, launches)
            label = f"{phase} {short_tokens(int(record['context']))}"
            for method, result in (record.get("results") or {}).items():
                if (method in FITTED or method == "hip") and result.get("ms"):
                    measured.append((label, method, float(result["ms"]) / 1e3, parts))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"bench results {str(path)!r}: record {number} is not a 'hip-attn bench' "
                f"record ({exc!r})"
            ) from exc
    ratios: dict[str, list[float]] = {}
    for _, method, seconds, parts in measured:
        op = FITTED.get(method)
        if op in parts:
            ratios.setdefault(op, []).append(math.log(parts[op] / seconds))
    if not ratios:
        raise ValueError(f"{path}: no prefill or decode case measures sdpa, hip_sparse or hip_mask")
    eff = {op: math.exp(sum(v) / len(v)) for op, v in ratios.items()}
    cases: list[CaseFit] = []
    for label, method, seconds, parts in measured:
        ops = [FITTED[method]] if method in FITTED else ["hip_search", "hip_attention"]
        if not all(op in parts and op in eff for op in ops):
            continue
        predicted = sum(parts[op] for op in ops)
        calibrated = sum(parts[op] / eff[op] for op in ops)
        cases.append(CaseFit(label, method, seconds, predicted, calibrated))
    return Calibration(gpu.name, eff, cases)


def calibration_json(fit: Calibration) -> dict[str, Any]:
    """The fit as JSON-ready data: the efficiencies, then every case with its error."""
    return {
        "gpu": fit.gpu,
        "efficiency": dict(fit.efficiency),
        "cases": [{**asdict(c), "error": c.error} for c in fit.cases],
    }


def calibration_table(fit: Calibration) -> str:
    """The fitted efficiencies, then predicted vs measured per case with the error."""
    lines = [f"calibration for {fit.gpu}: efficiency = predicted at peak / measured"]
    lines += [f"  {op:<14} {value:.3g}" for op, value in fit.efficiency.items()]
    lines.append(
        f"{'case':<14}{'method':<12}{'measured':>12}{'peak model':>12}{'calibrated':>12}"
        f"{'error':>9}"
    )
    for c in fit.cases:
        lines.append(
            f"{c.label:<14}{c.method:<12}{c.measured_s * 1e3:>10.4g}ms{c.predicted_s * 1e3:>10.4g}"
            f"ms{c.calibrated_s * 1e3:>10.4g}ms{c.error:>+9.1%}"
        )
    lines.append("hip = search + sparse attention, predicted from the fitted parts (not fitted)")
    return "\n".join(lines)
