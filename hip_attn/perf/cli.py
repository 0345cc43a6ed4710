"""``hip-attn roofline``: the analytic model from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from hip_attn.cli_args import (
    add_hip_arguments,
    arg_type,
    comma_list,
    file_path,
    hip_config_from_args,
    positive_float,
    positive_int,
)
from hip_attn.perf.estimator import (
    DTYPE_BYTES,
    LAUNCH_PROFILES,
    MODES,
    Estimate,
    Mode,
    OffloadConfig,
    Scenario,
    estimate,
    max_context,
)
from hip_attn.perf.hardware import (
    GPU_PRESETS,
    Efficiency,
    GPUSpec,
    get_gpu,
    load_gpu_file,
    override_gpu,
)
from hip_attn.perf.models import MODEL_PRESETS, ModelSpec, get_model, load_hf_config
from hip_attn.perf.report import table, to_json
from hip_attn.perf.units import (
    fmt_bytes,
    parse_size,
    parse_token_list,
    parse_tokens,
    short_tokens,
)

DESCRIPTION = """\
Peak-performance model of long-context inference (after Fu 2024, "Challenges in Deploying
Long-Context Transformers"). For a model, a GPU and context lengths it predicts the KV cache
size, whether a request fits and how many fit at once, prefill time, decode time per token,
context-switch time and the bound of each phase, for dense attention, HiP, and HiP with the KV
cache offloaded to host memory. Times are max(FLOPs / peak FLOP/s, bytes / bandwidth) per
phase: lower bounds a real kernel approaches, not measurements.

Units: contexts in tokens with k = 1024 and m = 1024^2 (4k = 4096, 1m = 1048576) or plain
integers; memory sizes as 80GiB, 141GB or a plain number of GB; bandwidths in GB/s; compute
in TFLOP/s. Printed sizes are decimal (1 GB = 1e9 bytes)."""

EPILOG = """\
examples:
  hip-attn roofline --model yi-34b --gpu a100-80g --context 4k,50000
      Fu's running example: 0.93 s prefill at 4K; 250 tokens decode in 8.52 s at 4K, 9.91 s at
      50K (Fu's 8.45 s and 9.83 s, plus one 5 us launch per layer and token).
  hip-attn roofline --model llama-3.1-8b --gpu h100-sxm --context 4k,128k,1m \\
          --compare dense,hip,hip+offload
      the three attention modes side by side.
  hip-attn roofline --config ./Meta-Llama-3.1-70B/config.json --gpu h100-sxm --tp 4 \\
          --context 128k --batch 8 --kv-dtype fp8
  hip-attn roofline --gpu h100-sxm --flops 700 --hbm-bandwidth 2900 --context 32k
      measured (not datasheet) peaks.
  hip-attn roofline --mode hip --hip-k 1024 --window 512 --context 1m --json out.json \\
          --plot roofline.png
  hip-attn roofline --list
      the model and GPU presets.

A GPU file (--gpu-file) is a JSON object with any of: "name", "flops" (TFLOP/s),
"hbm_bandwidth", "host_link", "gpu_link" (GB/s), "hbm" ("80GiB" or GB); it overrides the --gpu
preset and the flags override it. Exit status: 0 on success, 2 on bad input (one-line
message), 1 when the plot cannot be drawn."""


def _efficiency(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise ValueError(f"efficiency is a fraction of peak in (0, 1], got {text}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {text}")
    return value


def _modes(text: str) -> list[Mode]:
    modes: list[Mode] = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        match = next((mode for mode in MODES if mode == item), None)
        if match is None:
            raise ValueError(f"unknown attention mode {item!r}; choose from: {', '.join(MODES)}")
        if match not in modes:
            modes.append(match)
    if not modes:
        raise ValueError("empty list of modes")
    return modes


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``roofline`` on the ``hip-attn`` subcommand parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "roofline",
        help="predict memory, prefill/decode time and concurrency; draw the roofline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        type=arg_type(get_model, "model"),
        default=get_model("llama-3.1-8b"),
        metavar="NAME",
        help=f"model preset (default llama-3.1-8b); one of: {', '.join(MODEL_PRESETS)}",
    )
    g.add_argument(
        "--config",
        type=arg_type(load_hf_config, "config"),
        metavar="PATH",
        help="a Hugging Face config.json to use instead of --model (layers, hidden size, heads, "
        "KV heads, head dim, intermediate size, vocab, tied embeddings)",
    )

    g = parser.add_argument_group("GPU (numbers are per GPU)")
    g.add_argument(
        "--gpu",
        type=arg_type(get_gpu, "gpu"),
        default=get_gpu("h100-sxm"),
        metavar="NAME",
        help=f"GPU preset (default h100-sxm); one of: {', '.join(GPU_PRESETS)}",
    )
    g.add_argument(
        "--gpu-file",
        metavar="PATH",
        type=arg_type(file_path, "path"),
        help="JSON object overriding fields of --gpu (keys and units as the flags below)",
    )
    g.add_argument(
        "--flops",
        type=arg_type(positive_float, "flops"),
        metavar="TFLOPS",
        help="peak dense matmul throughput in TFLOP/s (e.g. 989)",
    )
    g.add_argument(
        "--hbm-bandwidth",
        type=arg_type(positive_float, "bandwidth"),
        metavar="GB/S",
        help="HBM bandwidth in GB/s (e.g. 3350)",
    )
    g.add_argument(
        "--hbm",
        type=arg_type(parse_size, "size"),
        metavar="SIZE",
        help="HBM capacity: 80GiB, 141GB, or a plain number of GB",
    )
    g.add_argument(
        "--host-link",
        type=arg_type(positive_float, "bandwidth"),
        metavar="GB/S",
        help="host<->GPU bandwidth per direction in GB/s (PCIe Gen5 x16: 64)",
    )
    g.add_argument(
        "--gpu-link",
        type=arg_type(positive_float, "bandwidth"),
        metavar="GB/S",
        help="GPU<->GPU bandwidth per direction in GB/s for --tp (NVLink4: 450)",
    )
    g.add_argument(
        "--launch-latency",
        type=arg_type(positive_float, "latency"),
        metavar="US",
        help="fixed cost of one kernel launch in microseconds (presets: 5, eager launches "
        "from Python; about 2 under CUDA graphs)",
    )
    g.add_argument(
        "--memory-latency",
        type=arg_type(positive_float, "latency"),
        metavar="US",
        help="one dependent HBM round trip in microseconds (presets: 0.5 HBM, 0.6 GDDR)",
    )
    for name, what in (
        ("compute", "of peak FLOP/s"),
        ("hbm", "of HBM bandwidth"),
        ("host-link", "of host-link bandwidth"),
        ("gpu-link", "of GPU-link bandwidth"),
    ):
        g.add_argument(
            f"--{name}-efficiency",
            type=arg_type(_efficiency, "efficiency"),
            default=1.0,
            metavar="F",
            help=f"fraction {what} reached, in (0, 1] (default 1.0 = peak)",
        )

    g = parser.add_argument_group("workload")
    g.add_argument(
        "--context",
        type=comma_list(parse_tokens, "token counts"),
        default=parse_token_list("4k,32k,128k"),
        metavar="LIST",
        help="prompt lengths in tokens, comma-separated: 4k,32k,128k,1m or 50000 "
        "(k = 1024; default 4k,32k,128k)",
    )
    g.add_argument(
        "--batch",
        type=arg_type(positive_int, "batch"),
        default=1,
        metavar="N",
        help="requests prefilled and decoded together (default 1)",
    )
    g.add_argument(
        "--output-tokens",
        type=arg_type(positive_int, "tokens"),
        default=250,
        metavar="N",
        help="tokens generated per request (default 250)",
    )
    g.add_argument(
        "--weight-dtype",
        choices=list(DTYPE_BYTES),
        default="bf16",
        help="weight storage type (default bf16)",
    )
    g.add_argument(
        "--kv-dtype",
        choices=list(DTYPE_BYTES),
        default="bf16",
        help="KV cache storage type (default bf16)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=arg_type(parse_tokens, "tokens"),
        metavar="TOKENS",
        help="prefill the prompt in passes of this many tokens (activations of one chunk; the "
        "weights are read once per chunk); default: one pass",
    )
    g.add_argument(
        "--tp",
        type=arg_type(positive_int, "tp"),
        default=1,
        metavar="N",
        help="tensor-parallel degree: GPUs per model replica (default 1)",
    )

    g = parser.add_argument_group("attention mode")
    g.add_argument(
        "--mode",
        choices=list(MODES),
        default="dense",
        help="dense, hip (HiP sparse attention), or hip+offload (KV in host RAM); default dense",
    )
    g.add_argument(
        "--compare",
        type=arg_type(_modes, "modes"),
        metavar="LIST",
        help="several modes in one table, e.g. dense,hip,hip+offload (replaces --mode)",
    )

    add_hip_arguments(parser, title="HiP (hip and hip+offload; defaults from HiPConfig)")
    parser.add_argument(
        "--launches",
        choices=list(LAUNCH_PROFILES),
        default="today",
        help="kernel launches per layer of HiP: "
        + " or ".join(
            f"{p.name} ({p.hip_decode_reuse} a decode step, {p.hip_decode_refresh} a refreshing "
            f"step, {p.hip_prefill} a prefill)"
            for p in LAUNCH_PROFILES.values()
        )
        + "; today is what hip_attention launches now (default today)",
    )

    offload = OffloadConfig()
    g = parser.add_argument_group("offload (hip+offload)")
    g.add_argument(
        "--host-ram",
        type=arg_type(parse_size, "size"),
        metavar="SIZE",
        default=offload.host_ram,
        help="pinned host memory for KV caches: 512GB, 1TiB, or GB "
        f"(default {fmt_bytes(offload.host_ram)})",
    )
    g.add_argument(
        "--block-cache",
        type=arg_type(parse_tokens, "tokens"),
        metavar="TOKENS",
        default=offload.block_cache_tokens,
        help="GPU block cache per request in tokens, >= k (2 x beam x k with --leaf-scores "
        "keys; times the query heads per KV head with --head-sharing head) (default "
        f"{short_tokens(offload.block_cache_tokens)})",
    )
    g.add_argument(
        "--miss-rate",
        type=arg_type(_rate, "rate"),
        metavar="F",
        default=offload.miss_rate,
        help="fraction of the selected KV fetched from host per decode step "
        f"(default {offload.miss_rate})",
    )

    g = parser.add_argument_group("output")
    g.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the numbers as JSON to PATH, or to stdout (instead of the table) "
        "when PATH is omitted or '-'",
    )
    g.add_argument(
        "--plot",
        metavar="PNG",
        type=arg_type(file_path, "path"),
        help="draw the roofline and time/memory versus context to this PNG (needs matplotlib)",
    )
    g.add_argument(
        "--calibrate",
        metavar="JSONL",
        type=arg_type(file_path, "path"),
        help="fit per-operator efficiencies to 'hip-attn bench' results (JSON lines) and print "
        "predicted vs measured per case, for --gpu (its peaks and latencies) and --launches; "
        "the records give the shapes, contexts and HiP settings; --json writes the fit",
    )
    g.add_argument("--list", action="store_true", help="list model and GPU presets and exit")
    # with --calibrate every other option would be ignored: said instead (_run_calibration)
    not_calibrated = [
        (action.dest, action.option_strings[0], action.default)
        for action in parser._actions
        if action.option_strings and action.dest not in _CALIBRATE_READS
    ]
    parser.set_defaults(func=run, not_calibrated=not_calibrated)
    return parser


#: What ``--calibrate`` reads besides its file (argument names): the fit predicts one GPU's
#: attention, so of the GPU only its peaks and latencies matter (not HBM size or links).
_CALIBRATE_READS = frozenset(
    {"help", "calibrate", "json", "launches", "gpu", "gpu_file", "flops", "hbm_bandwidth",
     "launch_latency", "memory_latency"}
)  # fmt: skip


class _InputError(ValueError):
    """Bad input found after parsing; reported as one line with exit status 2."""


def _gpu(args: argparse.Namespace) -> GPUSpec:
    gpu: GPUSpec = args.gpu
    if args.gpu_file is not None:  # '' is an error, not nothing
        gpu = load_gpu_file(args.gpu_file, gpu)
    return override_gpu(
        gpu,
        {
            "flops": args.flops,
            "hbm_bandwidth": args.hbm_bandwidth,
            "host_link": args.host_link,
            "gpu_link": args.gpu_link,
            "hbm": f"{args.hbm}B" if args.hbm else None,  # bytes, as a size string
            "launch_latency": args.launch_latency,
            "memory_latency": args.memory_latency,
        },
    )


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The :class:`Scenario` described by parsed ``roofline`` arguments.

    Raises:
        ValueError: inconsistent input (bad GPU file, HiP settings, TP degree, ...).
    """
    model: ModelSpec = args.config or args.model
    return Scenario(
        model=model,
        gpu=_gpu(args),
        efficiency=Efficiency(
            args.compute_efficiency,
            args.hbm_efficiency,
            args.host_link_efficiency,
            args.gpu_link_efficiency,
        ),
        weight_dtype=args.weight_dtype,
        kv_dtype=args.kv_dtype,
        batch=args.batch,
        output_tokens=args.output_tokens,
        tp=args.tp,
        hip=hip_config_from_args(args),
        offload=OffloadConfig(args.host_ram, args.block_cache, args.miss_rate),
        launches=LAUNCH_PROFILES[args.launches],
        prefill_chunk=args.prefill_chunk,
    )


def _check_contexts(sc: Scenario, contexts: list[int]) -> None:
    """Refuse contexts no memory of this setup could hold even prefilled in the smallest chunks
    (HBM for dense/hip, host RAM for offload), unless the weights alone already overflow HBM
    (then every row says so). A context that fits only chunked is reported, ``fits`` false."""
    if sc.hbm_free <= 0:
        return
    storable = dataclasses.replace(sc, prefill_chunk=1)
    limits = {mode: max_context(storable, mode) for mode in MODES}
    best = max(limits, key=lambda mode: limits[mode])
    for context in contexts:
        if context > limits[best]:
            raise _InputError(
                f"context {short_tokens(context)} ({context:,} tokens, "
                f"{fmt_bytes(context * sc.kv_bytes_per_token)} of KV per request) exceeds what "
                f"any memory here can hold: at most {limits[best]:,} tokens ({best}, host RAM "
                f"{fmt_bytes(sc.offload.host_ram)}); dense in HBM: {limits['dense']:,}"
            )


def _list_presets() -> str:
    lines = ["models:"]
    for m in MODEL_PRESETS.values():
        lines.append(
            f"  {m.name:<16} {m.total_params / 1e9:5.1f}B params, {m.layers} layers, hidden "
            f"{m.hidden}, heads {m.heads}/{m.kv_heads} KV, head dim {m.head_dim}, "
            f"MLP {m.intermediate}, vocab {m.vocab}"
        )
    lines.append("GPUs:")
    for g in GPU_PRESETS.values():
        lines.append(f"  {g.name:<10} {g.note}; HBM {fmt_bytes(g.hbm)}")
    return "\n".join(lines)


def _write_json(path: str, text: str) -> bool:
    """Write ``text`` to ``path``; False (said in one line) when it cannot be written."""
    try:
        Path(path).write_text(text + "\n")
    except OSError as exc:
        print(f"hip-attn roofline: error: cannot write {path}: {exc}", file=sys.stderr)
        return False
    return True


def _run_calibration(args: argparse.Namespace) -> int:
    """``roofline --calibrate``: the fit as a table, or as JSON with ``--json``."""
    from hip_attn.perf.calibrate import calibrate, calibration_json, calibration_table

    given = [flag for dest, flag, default in args.not_calibrated if getattr(args, dest) != default]
    try:
        if given:
            raise ValueError(
                f"{', '.join(given)}: not used by --calibrate (the bench records give the shapes, "
                "contexts and HiP settings); it reads --gpu, --gpu-file, --flops, "
                "--hbm-bandwidth, --launch-latency, --memory-latency, --launches and --json"
            )
        fit = calibrate(args.calibrate, _gpu(args), LAUNCH_PROFILES[args.launches])
    except ValueError as exc:
        print(f"hip-attn roofline: error: {exc}", file=sys.stderr)
        return 2
    if args.json is None:
        print(calibration_table(fit))
        return 0
    text = json.dumps(calibration_json(fit), indent=2)
    if args.json == "-":
        print(text)
        return 0
    if not _write_json(args.json, text):
        return 2
    print(calibration_table(fit))
    print(f"JSON written to {args.json}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``hip-attn roofline``; returns the process exit status."""
    if args.calibrate is not None:
        return _run_calibration(args)
    if args.list:
        print(_list_presets())
        return 0
    modes: list[Mode] = args.compare or [args.mode]
    try:
        sc = build_scenario(args)
        _check_contexts(sc, args.context)
        estimates: list[Estimate] = [
            estimate(sc, mode, context) for context in args.context for mode in modes
        ]
    except ValueError as exc:
        print(f"hip-attn roofline: error: {exc}", file=sys.stderr)
        return 2

    json_to_stdout = args.json == "-"
    info = sys.stderr if json_to_stdout else sys.stdout
    if args.json is not None:
        text = json.dumps(to_json(sc, estimates), indent=2)
        if json_to_stdout:
            print(text)
        else:
            if not _write_json(args.json, text):
                return 2
    if not json_to_stdout:
        print(table(sc, estimates))
        if args.json is not None:
            print(f"JSON written to {args.json}", file=info)
    if args.plot is not None:
        from hip_attn.perf.plot import PlotUnavailable, plot

        try:
            plot(sc, modes, args.context, args.plot)
        except PlotUnavailable as exc:
            print(f"hip-attn roofline: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"hip-attn roofline: error: cannot write {args.plot}: {exc}", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}", file=info)
    return 0
