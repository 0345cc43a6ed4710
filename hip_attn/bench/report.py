"""JSON lines and the table printed at the end of a run. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hip_attn.config import HiPConfig
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


def _field(name: str, key: str, fmt: Callable[[Any], str]) -> Callable[[Record], str]:
    def cell(record: Record) -> str:
        value = _result(record, name).get(key)
        return "-" if value is None else fmt(value)

    return cell


def _rate(name: str, key: str) -> Callable[[Record], str]:
    return _field(name, key, lambda v: f"{v:.3g}")


def _peak(name: str) -> Callable[[Record], str]:
    return _field(name, "peak_mem_bytes", fmt_bytes)


def _factor(section: str, key: str) -> Callable[[Record], str]:
    """The cell of the ratio ``record[section][key]``, as ``1.23x``."""

    def cell(record: Record) -> str:
        value = (record.get(section) or {}).get(key)
        return "-" if value is None else f"{value:.3g}x"

    return cell


def _speedup(key: str) -> Callable[[Record], str]:
    return _factor("speedup", key)


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

#: HiP's two stages beside the dense and flex baselines (prefill and decode).
_STAGES_VS_BASELINES: list[Column] = [
    ("mask ms", _ms("hip_mask")),
    ("sparse ms", _ms("hip_sparse")),
    ("SDPA ms", _ms("sdpa")),
    ("flex ms", _ms("flex")),
    ("vs SDPA", _speedup("hip_vs_sdpa")),
    ("flex/sparse", _speedup("sparse_vs_flex")),
]

_COLUMNS: dict[str, list[Column]] = {
    "prefill": [
        ("context", _context),
        ("HiP ms", _ms("hip")),
        *_STAGES_VS_BASELINES,
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
        ("HiP wall ms", _field("hip_amortized", "wall_ms", lambda v: f"{v:.3g}")),
        ("graph ms", _ms("hip_graph")),
        ("step ms", _ms("hip")),
        *_STAGES_VS_BASELINES,
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
    "decode": "HiP = per step over refresh_interval steps (one refresh), GPU time by events; "
    "wall = the same between device synchronizations (host launch time included); graph = the "
    "same steps replayed from a CUDA graph (device decode); step = a step that re-estimates; "
    "vs SDPA = SDPA ms / HiP ms; x floor = measured / floor",
    "mask": "mask = hip_attention's estimation (pooling, summary tree, search); kernel = the "
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
        f"{HiPConfig(**cfg).describe()} refresh {cfg['refresh_interval']}"
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


# ---- the offload mode --------------------------------------------------------------------------


def _ratio(key: str) -> Callable[[Record], str]:
    return _factor("offload_vs_device", key)


def _fill_s(record: Record) -> str:
    value = (record.get("offload") or {}).get("fill_s")
    return "-" if value is None else f"{value:.3g}"


_OFFLOAD_DECODE_COLUMNS: list[Column] = [
    ("context", _context),
    ("refresh ms", _ms("offload_refresh")),
    ("reuse ms", _ms("offload_reuse")),
    ("append ms", _ms("offload_append")),
    ("per step", _ms("offload_amortized")),
    ("dev refresh", _ms("device_refresh")),
    ("dev reuse", _ms("device_reuse")),
    ("dev per step", _ms("device_amortized")),
    ("x dev", _ratio("amortized")),
    ("refresh moved", _field("offload_refresh", "bytes_per_step", fmt_bytes)),
    ("reuse moved", _field("offload_reuse", "bytes_per_step", fmt_bytes)),
    ("hit rate", _field("offload_amortized", "hit_rate", lambda v: f"{v:.1%}")),
    ("refresh hits", _field("offload_refresh", "hit_rate", lambda v: f"{v:.1%}")),
    ("peak", _peak("offload_amortized")),
    ("fill s", _fill_s),
]

OFFLOAD_NOTES = {
    "memory": "measured = device memory the layer took (see the line above); R = the search's "
    "summary tree as allocated (grown by a quarter); table = the block -> slot table; growth "
    "compares the last context with the first",
    "decode": "refresh / reuse = the attend call of a step that re-estimates / reuses the "
    "selection; append = one token; per step = append + attend over refresh cycles; dev = the "
    "same on device-resident K/V (hip_attention); x dev = offload per step / dev per step; "
    "moved = bytes host->device per step; hit rate = block-cache hits over all steps, refresh "
    "hits over refresh steps",
}


def _offload_header(record: Record) -> str:
    offload = record.get("offload") or {}
    return (
        f"{header(record)}; offload cache_blocks={offload.get('cache_blocks')} "
        f"max_chunk={offload.get('max_chunk')} gather={offload.get('gather')}"
    )


def _grid(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    lines = ["  ".join(f"{t:>{w}}" for t, w in zip(titles, widths, strict=True))]
    lines.extend("  ".join(f"{c:>{w}}" for c, w in zip(r, widths, strict=True)) for r in rows)
    return lines


def _memory_block(record: Record) -> list[str]:
    memory = record["memory"]
    titles = ["context", "measured", "allocated", "device_bytes", "R", "table", "host", "full K/V"]
    keys = ["measured_bytes", "allocated_bytes", "device_bytes", "rep_bytes", "table_bytes",
            "host_bytes", "full_kv_bytes"]  # fmt: skip

    def fmt(value: Any) -> str:
        return "-" if value is None else fmt_bytes(value)

    rows = [
        [short_tokens(int(e["context"])), *(fmt(e.get(k)) for k in keys)]
        for e in memory["per_context"]
    ]
    growth = memory["growth"]
    rows.append(["growth", *(fmt(growth.get(k)) for k in keys)])
    lines = [_offload_header(record), f"measured = {memory['source']}"]
    lines.extend(_grid(titles, rows))
    ratio = growth.get("measured_over_rep")
    if ratio is not None:
        lines.append(
            f"from {short_tokens(int(growth['from']))} to {short_tokens(int(growth['to']))} "
            f"tokens the device memory grew {ratio:.3g}x the growth of R "
            f"({fmt(growth.get('measured_bytes'))} vs {fmt(growth.get('rep_bytes'))}); the full "
            f"K/V grew {fmt(growth.get('full_kv_bytes'))}"
        )
    lines.append(OFFLOAD_NOTES["memory"])
    return lines


def _offload_notes(records: Sequence[Record]) -> list[str]:
    """Notes of the records and their results, each once (without the context prefix)."""
    seen: list[str] = []
    for record in records:
        for name, result in (record.get("results") or {}).items():
            for key in ("skipped", "error", "note"):
                if result.get(key):
                    seen.append(f"{name} {key}: {result[key]}")
        seen.extend(record.get("notes") or [])
    return list(dict.fromkeys(seen))


def _offload_blocks(rows: Sequence[Record]) -> list[str]:
    blocks: list[str] = []
    cpu = rows[0].get("device_type") != "cuda"
    for record in (r for r in rows if r.get("part") == "memory"):
        lines = _memory_block(record)
        if cpu:
            lines.insert(1, "CPU: a smoke test of the harness, not performance numbers")
        lines.extend(f"note: {n}" for n in _offload_notes([record]))
        blocks.append("\n".join(lines))
    decode = [r for r in rows if r.get("part") == "decode"]
    if decode:
        lines = [_offload_header(decode[0])]
        if cpu:
            lines.append("CPU timings: a smoke test of the harness, not performance numbers")
        titles = [t for t, _ in _OFFLOAD_DECODE_COLUMNS]
        lines.extend(_grid(titles, [[fn(r) for _, fn in _OFFLOAD_DECODE_COLUMNS] for r in decode]))
        lines.append(OFFLOAD_NOTES["decode"])
        lines.extend(f"note: {n}" for n in _offload_notes(decode))
        blocks.append("\n".join(lines))
    return blocks


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
    offload = [r for r in records if r.get("mode") == "offload"]
    if offload:
        blocks.extend(_offload_blocks(offload))
    return "\n\n".join(blocks)
