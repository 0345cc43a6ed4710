"""``hip-attn bench``: kernel microbenchmarks of HiP against dense attention and the analytic
floor. Torch is imported only when a benchmark runs."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hip_attn.bench.cases import (
    CPU_DEFAULTS,
    DTYPES,
    GPU_DEFAULTS,
    METHODS,
    MODES,
    BenchCase,
    Defaults,
    Mode,
    Shape,
    default_queries,
    defaults_for,
)
from hip_attn.bench.environment import CPU_STEM, RESULTS_DIR
from hip_attn.bench.report import SCHEMA, MixedResults, Record, check_appendable, table
from hip_attn.cli_args import (
    add_hip_arguments,
    arg_type,
    hip_config_from_args,
    non_negative_int,
    positive_float,
    positive_int,
)
from hip_attn.perf.hardware import GPU_PRESETS, get_gpu
from hip_attn.perf.units import parse_token_list

DESCRIPTION = """\
Kernel microbenchmarks: HiP attention against dense attention (torch SDPA, flash backend) and
against flex_attention running the same block selection, each set beside the analytic model's
floor for the same work (hip_attn.perf, one attention layer).

Every case reports median milliseconds (CUDA events after warm-up, L2 flushed between runs),
achieved TFLOP/s and GB/s of the work actually done (keys attended by each query block, search
dot products), peak memory (torch.cuda.max_memory_allocated), speedup over SDPA, and measured
over floor. Results are appended as JSON lines (one per case, written as each case finishes);
a table is printed at the end and --plot draws latency, speedup and measured/floor versus
context.

Modes:
  prefill  the whole prompt attends causally (queries = context)
  decode   one new token attends the cache; HiP per step is amortized over refresh_interval
           steps (one re-estimation), and a re-estimating step is reported too
  mask     mask estimation alone (pooling, representatives, tree search)
  offload  not available yet (KV offload is a later issue)

Units: contexts in tokens, k = 1024 and m = 1024^2 (8k = 8192, 1m = 1048576); times in ms;
rates in TFLOP/s and GB/s (1e12, 1e9); memory in decimal GB."""


def _defaults_text(name: str, d: Defaults) -> str:
    c = d.config
    return (
        f"  {name}: contexts prefill {d.contexts['prefill']}, decode {d.contexts['decode']}, "
        f"mask {d.contexts['mask']};\n       batch {d.batch}, heads {d.heads}, KV heads "
        f"{d.kv_heads}, head dim {d.head_dim}, {d.dtype};\n       HiP k={c.k}, "
        f"block_size_q={c.block_size_q}, block_size_k={c.block_size_k}, sinks={c.sink_tokens}, "
        f"window={c.window}\n"
    )


EPILOG = (
    "defaults (a GPU: Llama-3.1-8B attention; the CPU: tiny smoke-test sizes):\n"
    + _defaults_text("GPU", GPU_DEFAULTS)
    + _defaults_text("CPU", CPU_DEFAULTS)
    + f"""\
  On the CPU the Triton kernels run under TRITON_INTERPRET=1, else the PyTorch reference;
  flex_attention is skipped (it needs a compiled CUDA kernel) and timings are labelled
  "cpu-interpreter" or "cpu-reference".

output (relative to the current directory; run from the repository root):
  GPU: {RESULTS_DIR}/<device name>.jsonl, e.g. {RESULTS_DIR}/nvidia-h100-80gb-hbm3.jsonl
  CPU: {RESULTS_DIR}/{CPU_STEM}.jsonl
  --plot without a path: the same name with -<mode>.png. A file holding another device's
  results is never appended to (pass --out or --overwrite).

examples:
  hip-attn bench prefill --context 8k,32k,128k --plot
  hip-attn bench decode --context 8k,128k,1m --plot
  hip-attn bench mask --context 32k,128k --hip-k 1024 --beam 2
  hip-attn bench decode --methods hip,sdpa --context 1m --batch 4
  TRITON_INTERPRET=1 hip-attn bench prefill --device cpu --out /tmp/smoke.jsonl --plot /tmp/p.png

exit status: 0 when every case ran (methods may be skipped with a recorded reason), 1 when a
case failed, 2 on bad input."""
)


def _at_least_16(text: str) -> int:
    value = positive_int(text)
    if value < 16:
        raise ValueError(f"must be >= 16, got {value}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in METHODS]
    if bad or not items:
        raise ValueError(f"methods are a comma list of {', '.join(METHODS)}; got {text!r}")
    return tuple(dict.fromkeys(items))


def _common_options() -> argparse.ArgumentParser:
    """Options shared by the prefill, decode and mask modes."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("workload (defaults: Llama-3.1-8B on a GPU, tiny on the CPU)")
    g.add_argument(
        "--context",
        type=arg_type(parse_token_list, "contexts"),
        metavar="LIST",
        help="key tokens per case, comma-separated: 8k,32k,128k,1m or plain integers "
        "(k = 1024; defaults below)",
    )
    g.add_argument(
        "--queries",
        type=arg_type(positive_int, "queries"),
        metavar="N",
        help="query tokens per call, at the last positions (default: decode 1, prefill and "
        "mask the whole context); the floor covers only all-queries and one query",
    )
    g.add_argument("--batch", type=arg_type(positive_int, "batch"), metavar="N", help="sequences")
    g.add_argument("--heads", type=arg_type(positive_int, "heads"), metavar="N", help="query heads")
    g.add_argument(
        "--kv-heads", type=arg_type(positive_int, "kv heads"), metavar="N", help="key/value heads"
    )
    g.add_argument(
        "--head-dim", type=arg_type(_at_least_16, "head dim"), metavar="D", help="head dimension"
    )
    g.add_argument("--dtype", choices=DTYPES, help="dtype of q, k, v")

    add_hip_arguments(
        common,
        title="HiP configuration (defaults: HiPConfig() on a GPU)",
        defaults=GPU_DEFAULTS.config,
    )

    g = common.add_argument_group("methods")
    g.add_argument(
        "--methods",
        type=arg_type(_methods, "methods"),
        metavar="LIST",
        help="comma list of hip, sdpa, flex (default: all three; mask mode: hip)",
    )
    g.add_argument(
        "--flex-kv-block",
        type=arg_type(_at_least_16, "tokens"),
        metavar="TOKENS",
        help="key tokens per flex BlockMask block, a power of two and multiple of "
        "block_size_k (default: max(16, block_size_k), flex's smallest tile)",
    )

    g = common.add_argument_group("device and timing")
    g.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="where to run (default: cuda when available, else cpu)",
    )
    g.add_argument(
        "--gpu",
        choices=list(GPU_PRESETS),
        help="GPU preset of the analytic floor (default: from the device name; h100-sxm on CPU)",
    )
    g.add_argument(
        "--warmup-ms",
        type=arg_type(positive_float, "ms"),
        default=25.0,
        metavar="MS",
        help="CUDA warm-up time per measurement, ms (default 25)",
    )
    g.add_argument(
        "--rep-ms",
        type=arg_type(positive_float, "ms"),
        default=200.0,
        metavar="MS",
        help="CUDA timed time per measurement, ms (default 200)",
    )
    g.add_argument(
        "--min-runs",
        type=arg_type(positive_int, "runs"),
        default=10,
        metavar="N",
        help="fewest timed CUDA runs per measurement (default 10)",
    )
    g.add_argument(
        "--max-runs",
        type=arg_type(positive_int, "runs"),
        default=1000,
        metavar="N",
        help="most timed CUDA runs per measurement (default 1000)",
    )
    g.add_argument(
        "--cpu-runs",
        type=arg_type(positive_int, "runs"),
        default=3,
        metavar="N",
        help="timed CPU runs per measurement (default 3)",
    )
    g.add_argument(
        "--cpu-warmup",
        type=arg_type(non_negative_int, "runs"),
        default=1,
        metavar="N",
        help="untimed CPU runs before them (default 1)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")

    g = common.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help=f"JSON lines file to append to (default: {RESULTS_DIR}/<gpu name>.jsonl on a GPU, "
        f"{RESULTS_DIR}/{CPU_STEM}.jsonl on the CPU, relative to the current directory)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace the output file instead of appending"
    )
    g.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="PNG",
        help="draw latency, speedup and measured/floor versus context to PNG (without a path: "
        "the output file's name with -<mode>.png; needs matplotlib)",
    )
    return common


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` (with its ``prefill``, ``decode``, ``mask`` and ``offload`` modes) on
    the ``hip-attn`` subcommand parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="kernel microbenchmarks: HiP vs SDPA and flex_attention vs the analytic floor",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run, bench_mode=None, bench_parser=parser)
    modes = parser.add_subparsers(title="modes", metavar="MODE")
    common = _common_options()
    helps = {
        "prefill": "the whole prompt attends causally (Tq = Tk)",
        "decode": "one new token attends the KV cache",
        "mask": "mask estimation alone",
    }
    for mode in MODES:
        sub = modes.add_parser(
            mode,
            parents=[common],
            help=helps[mode],
            description=f"hip-attn bench {mode}: {helps[mode]}.\n\n{DESCRIPTION}",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=run, bench_mode=mode, bench_parser=sub)
    offload = modes.add_parser(
        "offload",
        help="not available yet (KV offload to host memory is a later issue)",
        description="Not available yet: the KV offload path (host-resident KV, block cache) is "
        "not implemented, so there is nothing to benchmark.",
    )
    offload.set_defaults(func=run, bench_mode="offload", bench_parser=offload)
    return parser


class _InputError(ValueError):
    """Bad input found after parsing; one line, exit status 2."""


def build_cases(args: argparse.Namespace, device_type: str) -> list[BenchCase]:
    """The cases of parsed ``bench`` arguments for a device kind (``"cuda"`` or ``"cpu"``).

    Raises:
        ValueError: inconsistent input (shapes, HiP settings, queries beyond the context).
    """
    mode: Mode = args.bench_mode
    d = defaults_for(device_type)
    try:
        shape = Shape(
            batch=args.batch or d.batch,
            heads=args.heads or d.heads,
            kv_heads=args.kv_heads or d.kv_heads,
            head_dim=args.head_dim or d.head_dim,
            dtype=args.dtype or d.dtype,
        )
    except ValueError as exc:
        raise _InputError(str(exc)) from None
    config = hip_config_from_args(args, d.config)
    contexts = args.context or parse_token_list(d.contexts[mode])
    cases = []
    for context in contexts:
        queries = args.queries or default_queries(mode, context)
        if queries > context:
            raise _InputError(f"--queries {queries} exceeds context {context}")
        cases.append(BenchCase(mode, context, queries, shape, config))
    return cases


def _summary(record: Record) -> str:
    parts = []
    for name in ("hip_amortized", "hip", "hip_mask", "hip_sparse", "sdpa", "flex"):
        result = record["results"].get(name)
        if not result:
            continue
        if "ms" in result:
            parts.append(f"{name} {result['ms']:.4g} ms")
        else:
            parts.append(f"{name} {'skipped' if 'skipped' in result else 'error'}")
    speedup = record["speedup"].get("hip_vs_sdpa")
    if speedup:
        parts.append(f"{speedup:.3g}x vs SDPA")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Run ``hip-attn bench MODE``; returns the process exit status."""
    mode = args.bench_mode
    if mode is None:
        args.bench_parser.print_help()
        return 2
    if mode == "offload":
        print(
            "hip-attn bench offload: error: not available yet: KV offload to host memory is not "
            "implemented in this version; benchmark prefill, decode or mask",
            file=sys.stderr,
        )
        return 2

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("hip-attn bench: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cases = build_cases(args, device.type)
    except ValueError as exc:
        print(f"hip-attn bench: error: {exc}", file=sys.stderr)
        return 2

    from hip_attn.bench import environment as env_mod
    from hip_attn.bench.runner import RunOptions, run_case, timing_label
    from hip_attn.bench.timing import TimingSettings

    env = env_mod.environment(device)
    device_name = str(env["device"])
    if args.gpu:
        gpu_name, gpu_note = args.gpu, None
    elif device.type == "cuda":
        gpu_name, gpu_note = env_mod.gpu_preset_for(device_name)
    else:
        gpu_name, gpu_note = "h100-sxm", None
    out: Path = args.out or env_mod.default_output(device_name, device.type)
    label = timing_label(device)
    if not args.overwrite:
        try:
            check_appendable(out, device_name)
        except MixedResults as exc:
            print(f"hip-attn bench: error: {exc}", file=sys.stderr)
            return 2
    methods = args.methods or (("hip",) if mode == "mask" else METHODS)
    opts = RunOptions(
        device=device,
        methods=methods,
        timing=TimingSettings(
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            min_runs=args.min_runs,
            max_runs=max(args.max_runs, args.min_runs),
            cpu_warmup=args.cpu_warmup,
            cpu_runs=args.cpu_runs,
        ),
        gpu=get_gpu(gpu_name),
        gpu_note=gpu_note,
        flex_kv_block=args.flex_kv_block,
        seed=args.seed,
    )
    run_id = uuid.uuid4().hex[:12]
    print(
        f"hip-attn bench {mode}: {len(cases)} case(s) on {device_name} ({label}), methods "
        f"{','.join(methods)}; results -> {out}",
        file=sys.stderr,
    )
    from hip_attn.bench.report import write_jsonl

    if args.overwrite:
        write_jsonl([], out, overwrite=True)
    records: list[Record] = []
    failed = 0
    for i, case in enumerate(cases, 1):
        tag = f"[{i}/{len(cases)}] {case.label}"
        print(f"{tag} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            body = run_case(case, opts, log=lambda msg: print(f"  {msg}", file=sys.stderr))
        except Exception as exc:  # keep the other cases
            failed += 1
            print(f"{tag}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record: Record = {"schema": SCHEMA, "run_id": run_id, **env, **body}
        records.append(record)
        write_jsonl([record], out)
        took = time.perf_counter() - start
        print(f"{tag}: {_summary(record)} ({took:.1f} s)", file=sys.stderr, flush=True)

    if records:
        print(table(records))
        print(f"\n{len(records)} record(s) appended to {out}", file=sys.stderr)
    if args.plot is not None and records:
        from hip_attn.bench.plot import PlotUnavailable, plot

        png = Path(args.plot) if args.plot else out.with_name(f"{out.stem}-{mode}.png")
        try:
            plot(records, png)
        except PlotUnavailable as exc:
            print(f"hip-attn bench: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"hip-attn bench: error: cannot write {png}: {exc}", file=sys.stderr)
            return 2
        print(f"plot written to {png}", file=sys.stderr)
    return 1 if failed or not records else 0
