"""JSON lines and the table printed at the end of a run. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hip_attn.perf.units import fmt_bytes, short_tokens

#: Version of the record layout (bump when a field changes meaning).
SCHEMA = 1

Record = dict[str, Any]


class MixedResults(ValueError):
    """Appending would put results of two devices (or of CPU and GPU) in one file."""


def _first_record(path: Path) -> Record | None:
    try:
        with path.open() as fh:
            for line in fh:
                if line.strip():
                    data = json.loads(line)
                    return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None
    return None


def check_appendable(path: Path, device: str) -> None:
    """Refuse to append records of ``device`` (a GPU name, or ``"cpu"``) to a file holding
    another device's.

    Raises:
        MixedResults: the file's first record comes from another device.
    """
    first = _first_record(path)
    if first is None:
        return
    if first.get("device") != device:
        raise MixedResults(
            f"{path} holds results of {first.get('device')!r}; refusing to append results of "
            f"{device!r}: pass --out for another file or --overwrite to replace it"
        )


def write_jsonl(records: Sequence[Record], path: Path, *, overwrite: bool = False) -> None:
    """Append (or with ``overwrite`` replace) ``records`` as JSON lines, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if overwrite else "a") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> list[Record]:
    """Every record of a JSON lines file."""
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---- the table ------------------------------------------------------------------------------


def _result(record: Record, name: str) -> dict[str, Any]:
    value = record.get("results", {}).get(name)
    return value if isinstance(value, dict) else {}


def _ms(name: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        r = _result(record, name)
        if "ms" in r:
            ms = float(r["ms"])
            return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"
        if "skipped" in r:
            return "skip"
        return "err" if "error" in r else "-"

    return cell


def _rate(name: str, key: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = _result(record, name).get(key)
        return "-" if value is None else f"{value:.3g}"

    return cell


def _peak(name: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = _result(record, name).get("peak_mem_bytes")
        return "-" if value is None else fmt_bytes(value)

    return cell


def _speedup(key: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = (record.get("speedup") or {}).get(key)
        return "-" if value is None else f"{value:.3g}x"

    return cell


def _floor_ms(name: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = ((record.get("prediction") or {}).get("ms") or {}).get(name)
        return "-" if value is None else f"{value:.3g}"

    return cell


def _over_floor(name: str) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = ((record.get("prediction") or {}).get("measured_over_floor") or {}).get(name)
        return "-" if value is None else f"{value:.3g}x"

    return cell


def _context(record: Record) -> str:
    return short_tokens(int(record["context"]))


Column = tuple[str, Callable[[Record], str]]

_COLUMNS: dict[str, list[Column]] = {
    "prefill": [
        ("context", _context),
        ("HiP ms", _ms("hip")),
        ("mask ms", _ms("hip_mask")),
        ("sparse ms", _ms("hip_sparse")),
        ("SDPA ms", _ms("sdpa")),
        ("flex ms", _ms("flex")),
        ("vs SDPA", _speedup("hip_vs_sdpa")),
        ("flex/sparse", _speedup("sparse_vs_flex")),
        ("HiP TFLOP/s", _rate("hip", "tflops")),
        ("HiP GB/s", _rate("hip", "gbps")),
        ("HiP peak", _peak("hip")),
        ("SDPA peak", _peak("sdpa")),
        ("floor ms", _floor_ms("hip")),
        ("x floor", _over_floor("hip")),
        ("SDPA x floor", _over_floor("sdpa")),
    ],
    "decode": [
        ("context", _context),
        ("HiP ms", _ms("hip_amortized")),
        ("step ms", _ms("hip")),
        ("mask ms", _ms("hip_mask")),
        ("sparse ms", _ms("hip_sparse")),
        ("SDPA ms", _ms("sdpa")),
        ("flex ms", _ms("flex")),
        ("vs SDPA", _speedup("hip_vs_sdpa")),
        ("flex/sparse", _speedup("sparse_vs_flex")),
        ("sparse GB/s", _rate("hip_sparse", "gbps")),
        ("HiP peak", _peak("hip_amortized")),
        ("floor ms", _floor_ms("hip_amortized")),
        ("x floor", _over_floor("hip_amortized")),
        ("SDPA x floor", _over_floor("sdpa")),
    ],
    "mask": [
        ("context", _context),
        ("mask ms", _ms("hip_mask")),
        ("kernel ms", _ms("hip_mask_kernel")),
        ("SDPA ms", _ms("sdpa")),
        ("TFLOP/s", _rate("hip_mask", "tflops")),
        ("GB/s", _rate("hip_mask", "gbps")),
        ("peak", _peak("hip_mask")),
        ("floor ms", _floor_ms("hip_mask")),
        ("x floor", _over_floor("hip_mask")),
    ],
}

COLUMN_NOTES = {
    "prefill": "HiP = mask + sparse (hip_attention); vs SDPA = SDPA ms / HiP ms; flex/sparse = "
    "flex ms / HiP sparse ms on the same selection; floor = analytic attention-only floor; "
    "x floor = measured / floor",
    "decode": "HiP = per step over refresh_interval steps (one refresh); step = a step that "
    "re-estimates; vs SDPA = SDPA ms / HiP ms; x floor = measured / floor",
    "mask": "mask = hip_attention's estimation (pooling, representatives, search); kernel = the "
    "search kernel alone; x floor = measured / floor",
}


def header(record: Record) -> str:
    """One line naming the device, timing method, shapes and HiP settings."""
    sh, cfg = record["shape"], record["config"]
    prediction = record.get("prediction") or {}
    text = (
        f"{record['mode']} on {record.get('device', '?')} ({record.get('timing')}, HiP "
        f"{record.get('backend')}): B={sh['batch']} Hq={sh['heads']} Hkv={sh['kv_heads']} "
        f"D={sh['head_dim']} {sh['dtype']}, queries "
        f"{'all' if record['queries'] == record['context'] else record['queries']}; HiP "
        f"k={cfg['k']} bq={cfg['block_size_q']} bk={cfg['block_size_k']} "
        f"sinks={cfg['sink_tokens']} window={cfg['window']} beam={cfg['beam']} "
        f"refresh={cfg['refresh_interval']}"
    )
    if prediction.get("gpu"):
        text += f"; floor for {prediction['gpu']}"
    return text


def _notes(records: Sequence[Record]) -> list[str]:
    seen: list[str] = []
    for record in records:
        ctx = _context(record)
        for name, result in (record.get("results") or {}).items():
            for key in ("skipped", "error", "note"):
                if result.get(key):
                    line = f"{name} {key}: {result[key]}"
                    if line not in seen:
                        seen.append(f"{line}")
        for note in record.get("notes") or []:
            line = f"{ctx}: {note}"
            if line not in seen:
                seen.append(line)
        prediction_note = (record.get("prediction") or {}).get("note")
        if prediction_note and f"floor: {prediction_note}" not in seen:
            seen.append(f"floor: {prediction_note}")
    return seen


def table(records: Sequence[Record]) -> str:
    """The end-of-run table of ``records`` (one mode per table; several modes, several)."""
    if not records:
        return "no results"
    blocks: list[str] = []
    for mode in ("prefill", "decode", "mask"):
        rows = [r for r in records if r.get("mode") == mode]
        if not rows:
            continue
        columns = _COLUMNS[mode]
        cells = [[fn(r) for _, fn in columns] for r in rows]
        widths = [
            max(len(title), *(len(row[i]) for row in cells)) for i, (title, _) in enumerate(columns)
        ]
        lines = [header(rows[0])]
        if rows[0].get("device_type") != "cuda":
            lines.append("CPU timings: a smoke test of the harness, not performance numbers")
        lines.append("  ".join(f"{t:>{w}}" for (t, _), w in zip(columns, widths, strict=True)))
        lines.extend(
            "  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)) for row in cells
        )
        lines.append(COLUMN_NOTES[mode])
        lines.extend(f"note: {n}" for n in _notes(rows))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
