"""``hip-attn bench``: kernel microbenchmarks of HiP against dense attention and the analytic
floor. Torch is imported only when a benchmark runs."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from hip_attn.bench.cases import (
    CPU_DEFAULTS,
    CPU_OFFLOAD,
    DTYPES,
    GATHERS,
    GPU_DEFAULTS,
    GPU_OFFLOAD,
    METHODS,
    MODES,
    OFFLOAD_PARTS,
    BenchCase,
    Defaults,
    Mode,
    OffloadDefaults,
    OffloadPlan,
    Shape,
    default_queries,
    defaults_for,
    offload_defaults_for,
)
from hip_attn.bench.environment import CPU_STEM, RESULTS_DIR
from hip_attn.bench.report import (
    SCHEMA,
    MixedResults,
    Record,
    check_appendable,
    table,
    write_jsonl,
)
from hip_attn.cli_args import (
    add_hip_arguments,
    arg_type,
    comma_list,
    command_error,
    file_path,
    hip_config_from_args,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
    torch_device,
)
from hip_attn.perf.hardware import GPU_PRESETS, get_gpu
from hip_attn.perf.units import fmt_bytes, parse_token_list, parse_tokens, short_tokens
from hip_attn.progress import progress_bar, say

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
  mask     mask estimation alone (pooling, summary tree, tree search)
  offload  KV offload to host memory (hip_attn.offload): device memory growth against R,
           and decode latency with offload against the same steps on device-resident K/V
           (its own flags and output: hip-attn bench offload --help)

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
  hip-attn bench offload --plot      # KV offload: memory vs R at 64k,512k; decode 128k,512k,1m
  TRITON_INTERPRET=1 hip-attn bench prefill --device cpu --out /tmp/smoke.jsonl --plot /tmp/p.png

exit status: 0 when every case ran (methods may be skipped with a recorded reason), 1 when a
case or a method failed (a method's error is recorded too), 2 on bad input."""
)


def _at_least_16(text: str) -> int:
    value = positive_int(text)
    if value < 16 or value & (value - 1):
        raise ValueError(f"must be a power of two >= 16, got {value}")
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
        type=comma_list(parse_tokens, "token counts"),
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
    _add_layer_arguments(common, g)

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
        type=arg_type(torch_device, "device"),
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
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
    g.add_argument("--seed", type=arg_type(seed_int, "seed"), default=0,
                   help="seed of the random inputs (default 0)")  # fmt: skip

    _add_output_arguments(
        common,
        "draw latency, speedup and measured/floor versus context to PNG (without a path: "
        "the output file's name with -<mode>.png; needs matplotlib)",
    )
    return common


def _add_layer_arguments(parser: argparse.ArgumentParser, g: argparse._ArgumentGroup) -> None:
    """The shape options (into the workload group ``g``), then the HiP configuration group."""
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
        parser,
        title="HiP configuration (defaults: HiPConfig() on a GPU)",
        defaults=GPU_DEFAULTS.config,
    )


def _add_output_arguments(parser: argparse.ArgumentParser, plot_help: str) -> None:
    g = parser.add_argument_group("output")
    g.add_argument(
        "--out",
        type=arg_type(lambda text: Path(file_path(text)), "path"),
        metavar="PATH",
        help=f"JSON lines file to append to (default: {RESULTS_DIR}/<gpu name>.jsonl on a GPU, "
        f"{RESULTS_DIR}/{CPU_STEM}.jsonl on the CPU, relative to the current directory)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace the output file instead of appending"
    )
    g.add_argument("--plot", nargs="?", const="", metavar="PNG", help=plot_help)


def _parts(text: str) -> tuple[str, ...]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in OFFLOAD_PARTS]
    if bad or not items:
        raise ValueError(f"parts are a comma list of {', '.join(OFFLOAD_PARTS)}; got {text!r}")
    return tuple(dict.fromkeys(items))


def _offload_defaults_text(name: str, d: OffloadDefaults) -> str:
    return (
        f"  {name}: memory contexts {d.memory_contexts}, decode contexts {d.decode_contexts}; "
        f"--cache-blocks {d.cache_blocks},\n       --max-chunk {d.max_chunk}, "
        f"--host-chunk-tokens {d.host_chunk_tokens}, --steps {d.steps}, --warmup-steps "
        f"{d.warmup_steps}\n"
    )


OFFLOAD_DESCRIPTION = """\
hip-attn bench offload: one attention layer whose KV cache is offloaded to host memory
(hip_attn.offload.OffloadedKV: the full K/V in host memory; on the device only the block
summary tree R, the sinks, the recent window and a block cache of --cache-blocks slots per
(batch, KV head)). Two parts (--parts), each written as JSON lines records with
"mode": "offload" and "part": "memory" or "decode":

  memory  the layer filled (random K/V appended from the device in chunks of --max-chunk
          tokens), then one refresh cycle of decode steps, ending at each --memory-context.
          Per context: torch.cuda.max_memory_allocated over what was allocated before (on the
          CPU, which has no allocator statistics: the layer's own device_bytes, labelled so),
          beside the bytes of R, of the block table, of the host copy and of the full K/V. "growth"
          compares the last context with the first: the device should grow by R (plus the
          block table, 4 bytes per block and KV head), not by the K/V.
  decode  per --context: the fill (its time is recorded), then --warmup-steps and --steps
          decode steps, each appending one random token and attending one random query through
          one HiPDecodeState (so the selection is re-estimated every refresh_interval steps, as
          in generation). Every step runs alone (synchronized; L2 flushed first on CUDA), its
          append and attend timed apart, and is classified by whether the state refreshed:
            offload_refresh    the whole attend call of a step that re-estimates the selection
            offload_reuse      the attend call of a step that reuses the selection
            offload_append     appending the token (host copy, R, recent window)
            offload_amortized  append + attend per step over whole refresh cycles
          each with the bytes moved host->device per step and the block-cache hit rate. Then
          the same steps (same K/V, same inputs) without offload, hip_attention on
          device-resident K/V with a HiPDecodeState (device_refresh, device_reuse,
          device_append: writing the token, device_amortized), where they fit in device memory.

Timings are medians with 20th/80th percentiles over the steps of each class (CUDA events, or the
CPU clock). Random queries are the block cache's worst case at refresh steps: each refresh
selects blocks unrelated to the last. --plot draws latency, bytes moved per step and device
memory against context.

Units: contexts in tokens, k = 1024 and m = 1024^2; times in ms; bytes in decimal units."""

OFFLOAD_EPILOG = (
    "defaults (a GPU: Llama-3.1-8B attention, 32 query heads, 8 KV heads, head dim 128, bf16,\n"
    "HiPConfig(); the CPU: the tiny shapes and HiP settings of the other modes):\n"
    + _offload_defaults_text("GPU", GPU_OFFLOAD)
    + _offload_defaults_text("CPU", CPU_OFFLOAD)
    + f"""\
  On the CPU the Triton kernels run under TRITON_INTERPRET=1, else the PyTorch reference, and
  records say "device": "cpu": a smoke test of the harness, not a performance number.

output: as the other modes ({RESULTS_DIR}/<device name>.jsonl on a GPU,
  {RESULTS_DIR}/{CPU_STEM}.jsonl on the CPU); --plot without a path: the same name with
  -offload.png.

examples:
  hip-attn bench offload --plot                      # the GPU run (a few minutes on an H100)
  hip-attn bench offload --parts decode --context 2m --no-baseline
  hip-attn bench offload --parts memory --memory-context 64k,256k,1m
  TRITON_INTERPRET=1 hip-attn bench offload --device cpu --out /tmp/smoke.jsonl --plot /tmp/o.png

exit status: 0 when every part ran, 1 when one failed (or a result in it recorded an error),
2 on bad input."""
)


def _offload_options() -> argparse.ArgumentParser:
    """Options of the offload mode."""
    opts = argparse.ArgumentParser(add_help=False)
    g = opts.add_argument_group("workload (defaults: Llama-3.1-8B on a GPU, tiny on the CPU)")
    g.add_argument(
        "--parts",
        type=arg_type(_parts, "parts"),
        metavar="LIST",
        help="comma list of memory, decode (default: both)",
    )
    g.add_argument(
        "--context",
        type=comma_list(parse_tokens, "token counts"),
        metavar="LIST",
        help="contexts of the decode part, comma-separated (k = 1024; defaults below)",
    )
    g.add_argument(
        "--memory-context",
        type=comma_list(parse_tokens, "token counts"),
        metavar="LIST",
        help="contexts of the memory part, two or more; growth is from the first to the last "
        "(defaults below)",
    )
    _add_layer_arguments(opts, g)

    g = opts.add_argument_group("the offloaded layer (OffloadedKV)")
    g.add_argument(
        "--cache-blocks",
        type=arg_type(positive_int, "blocks"),
        metavar="N",
        help="block-cache slots per (batch, KV head)",
    )
    g.add_argument(
        "--max-chunk",
        type=arg_type(positive_int, "tokens"),
        metavar="TOKENS",
        help="tokens per append while filling (a multiple of block_size_q)",
    )
    g.add_argument(
        "--host-chunk-tokens",
        type=arg_type(positive_int, "tokens"),
        metavar="TOKENS",
        help="tokens per host-memory chunk (a multiple of block_size_k)",
    )
    g.add_argument(
        "--gather",
        choices=GATHERS,
        default="auto",
        help="host->device copy: the csrc/ CUDA kernel, torch, or auto (the kernel when it "
        "builds; default)",
    )

    g = opts.add_argument_group("decode steps, device and timing")
    g.add_argument(
        "--steps",
        type=arg_type(positive_int, "steps"),
        metavar="N",
        help="timed decode steps per decode context",
    )
    g.add_argument(
        "--warmup-steps",
        type=arg_type(non_negative_int, "steps"),
        metavar="N",
        help="untimed decode steps before them",
    )
    g.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the same steps on device-resident K/V",
    )
    g.add_argument(
        "--device",
        type=arg_type(torch_device, "device"),
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
    )
    g.add_argument("--seed", type=arg_type(seed_int, "seed"), default=0,
                   help="seed of the random inputs (default 0)")  # fmt: skip
    _add_output_arguments(
        opts,
        "draw decode latency, bytes moved per step and device memory versus context to PNG "
        "(without a path: the output file's name with -offload.png; needs matplotlib)",
    )
    return opts


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
        parents=[_offload_options()],
        help="KV offload to host memory: device memory vs R, decode latency",
        description=OFFLOAD_DESCRIPTION,
        epilog=OFFLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def build_offload_plan(args: argparse.Namespace, device_type: str) -> OffloadPlan:
    """The offload plan of parsed ``bench offload`` arguments for a device kind.

    Raises:
        ValueError: inconsistent input (shapes, HiP settings, layer settings).
    """
    d, od = defaults_for(device_type), offload_defaults_for(device_type)
    parts = args.parts or OFFLOAD_PARTS
    if args.gather == "cuda" and device_type != "cuda":
        raise _InputError(f"--gather cuda copies into GPU memory; the device is {device_type}")
    try:
        shape = Shape(
            batch=args.batch or d.batch,
            heads=args.heads or d.heads,
            kv_heads=args.kv_heads or d.kv_heads,
            head_dim=args.head_dim or d.head_dim,
            dtype=args.dtype or d.dtype,
        )
        memory = args.memory_context or parse_token_list(od.memory_contexts)
        decode = args.context or parse_token_list(od.decode_contexts)
        return OffloadPlan(
            shape=shape,
            config=hip_config_from_args(args, d.config),
            memory_contexts=tuple(memory) if "memory" in parts else (),
            decode_contexts=tuple(decode) if "decode" in parts else (),
            cache_blocks=args.cache_blocks or od.cache_blocks,
            max_chunk=args.max_chunk or od.max_chunk,
            host_chunk_tokens=args.host_chunk_tokens or od.host_chunk_tokens,
            gather=args.gather,
            steps=args.steps or od.steps,
            warmup_steps=od.warmup_steps if args.warmup_steps is None else args.warmup_steps,
            baseline=not args.no_baseline,
        )
    except ValueError as exc:
        raise _InputError(str(exc)) from None


def _offload_summary(record: Record) -> str:
    if record.get("part") == "memory":
        growth = record["memory"]["growth"]
        ratio = growth.get("measured_over_rep")
        return (
            f"device memory grew {_bytes(growth['measured_bytes'])} from "
            f"{growth['from']} to {growth['to']} tokens, R grew {_bytes(growth['rep_bytes'])}"
            + (f" ({ratio:.3g}x R)" if ratio is not None else "")
            + f", the full K/V would grow {_bytes(growth['full_kv_bytes'])}"
        )
    parts = []
    for name in ("offload_refresh", "offload_reuse", "device_refresh", "device_reuse"):
        result = record["results"].get(name) or {}
        if "ms" in result:
            parts.append(f"{name} {result['ms']:.4g} ms")
        elif result:
            parts.append(f"{name} {'skipped' if 'skipped' in result else 'error'}")
    amortized = record["results"].get("offload_amortized") or {}
    if amortized.get("hit_rate") is not None:
        parts.append(
            f"hit rate {amortized['hit_rate']:.1%}, {_bytes(amortized['bytes_per_step'])}/step"
        )
    return ", ".join(parts)


def _bytes(value: float | None) -> str:
    return "-" if value is None else fmt_bytes(value)


def _summary(record: Record) -> str:
    if record.get("mode") == "offload":
        return _offload_summary(record)
    parts = []
    for name in ("hip_amortized", "hip_graph", "hip", "hip_mask", "hip_sparse", "sdpa", "flex"):
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
        args.bench_parser.error(f"name a mode: {', '.join([*MODES, 'offload'])}")

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == "offload":
        return _run_offload(args, device)
    try:
        if args.min_runs > args.max_runs:
            raise ValueError(f"--min-runs {args.min_runs} exceeds --max-runs {args.max_runs}")
        cases = build_cases(args, device.type)
    except ValueError as exc:
        return command_error(f"hip-attn bench {mode}", exc)

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
    if not _may_write(out, device_name, args.overwrite):
        return 2
    methods = args.methods or (("hip",) if mode == "mask" else METHODS)
    opts = RunOptions(
        device=device,
        methods=methods,
        timing=TimingSettings(
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            min_runs=args.min_runs,
            max_runs=args.max_runs,
            cpu_warmup=args.cpu_warmup,
            cpu_runs=args.cpu_runs,
        ),
        gpu=get_gpu(gpu_name),
        gpu_note=gpu_note,
        flex_kv_block=args.flex_kv_block,
        seed=args.seed,
    )
    print(
        f"hip-attn bench {mode}: {len(cases)} case(s) on {device_name} ({label}), methods "
        f"{','.join(methods)}; results -> {out}",
        file=sys.stderr,
    )
    jobs: list[_Job] = [(case.label, partial(run_case, case, opts)) for case in cases]
    records, failed = _run_jobs(jobs, env, out, device, args.overwrite, empty_cache_each=True)
    return _finish(args, records, failed, out, mode)


def _may_write(out: Path, device_name: str, overwrite: bool) -> bool:
    """Whether records of ``device_name`` may go to ``out``; says why not on stderr."""
    if overwrite:
        return True
    try:
        check_appendable(out, device_name)
    except MixedResults as exc:
        command_error("hip-attn bench", exc)
        return False
    return True


#: A labelled unit of work: called with a logging function, returns the body of one record.
_Job = tuple[str, Callable[[Callable[[str], None]], Record]]


def _run_jobs(
    jobs: list[_Job],
    env: Record,
    out: Path,
    device: Any,
    overwrite: bool,
    *,
    empty_cache_each: bool,
) -> tuple[list[Record], int]:
    """Run ``jobs`` in turn on ``device`` (a ``torch.device``), appending each record to ``out``
    as it finishes (``overwrite``: emptying ``out`` first); a failed job is said on stderr and the
    others still run. The CUDA cache is emptied after a failure, and with ``empty_cache_each``
    after every job. Returns the records and the number of failed jobs."""
    import torch

    run_id = uuid.uuid4().hex[:12]
    if overwrite:
        write_jsonl([], out, overwrite=True)
    records: list[Record] = []
    failed = 0
    bar = progress_bar(total=len(jobs), desc="bench", unit="case")
    for i, (label, job) in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}] {label}"
        bar.set_description_str(label)
        start = time.perf_counter()
        try:
            body = job(bar.set_postfix_str)  # the step running, beside the bar
        except Exception as exc:  # keep the other jobs
            failed += 1
            say(f"{tag}: failed: {type(exc).__name__}: {exc}", sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.update()
            continue
        if empty_cache_each and device.type == "cuda":
            torch.cuda.empty_cache()
        record: Record = {"schema": SCHEMA, "run_id": run_id, **env, **body}
        records.append(record)
        write_jsonl([record], out)
        took = time.perf_counter() - start
        say(f"{tag}: {_summary(record)} ({took:.1f} s)", sys.stderr)
        bar.update()
    bar.close()
    return records, failed


def _finish(
    args: argparse.Namespace, records: list[Record], failed: int, out: Path, mode: str
) -> int:
    """Print the table and draw ``--plot``; returns the exit status of the run."""
    if records:
        print(table(records))
        print(f"\n{len(records)} record(s) appended to {out}", file=sys.stderr)
    if args.plot is not None and records:
        status = _plot_to(args, records, out, mode)
        if status:
            return status
    errors = [
        f"{record.get('context')}: {name}"
        for record in records
        for name, result in (record.get("results") or {}).items()
        if isinstance(result, dict) and "error" in result
    ]
    if errors:
        say(f"failed (recorded as errors): {', '.join(errors)}", sys.stderr)
    return 1 if failed or errors or not records else 0


def _plot_to(args: argparse.Namespace, records: list[Record], out: Path, mode: str) -> int:
    """Draw ``--plot``; returns 0, or the exit status of a failure (said on stderr)."""
    from hip_attn.bench.plot import PlotUnavailable, plot

    png = Path(args.plot) if args.plot else out.with_name(f"{out.stem}-{mode}.png")
    try:
        plot(records, png)
    except PlotUnavailable as exc:
        command_error("hip-attn bench", exc)
        return 1
    except OSError as exc:
        return command_error("hip-attn bench", f"cannot write {png}: {exc}")
    print(f"plot written to {png}", file=sys.stderr)
    return 0


def _run_offload(args: argparse.Namespace, device: Any) -> int:
    """Run ``hip-attn bench offload`` on ``device`` (a ``torch.device``)."""
    try:
        plan = build_offload_plan(args, device.type)
    except ValueError as exc:
        return command_error("hip-attn bench offload", exc)

    from hip_attn.bench import environment as env_mod
    from hip_attn.bench.offload import decode_case, memory_part
    from hip_attn.bench.runner import timing_label

    env = env_mod.environment(device)
    device_name = str(env["device"])
    out: Path = args.out or env_mod.default_output(device_name, device.type)
    if not _may_write(out, device_name, args.overwrite):
        return 2
    jobs: list[_Job] = []
    if plan.memory_contexts:
        label = "offload memory " + ",".join(short_tokens(c) for c in plan.memory_contexts)
        jobs.append((label, partial(memory_part, plan, device, args.seed)))
    for context in plan.decode_contexts:
        label = f"offload decode {short_tokens(context)}"
        jobs.append((label, partial(decode_case, plan, context, device, args.seed)))
    print(
        f"hip-attn bench offload: {len(jobs)} part(s) on {device_name} ({timing_label(device)}); "
        f"results -> {out}",
        file=sys.stderr,
    )
    records, failed = _run_jobs(jobs, env, out, device, args.overwrite, empty_cache_each=False)
    return _finish(args, records, failed, out, "offload")
