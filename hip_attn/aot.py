"""``hip-attn aot``: compile every Triton kernel variant for a GPU architecture, on any machine.

The kernels are tested on the CPU through the Triton interpreter, which neither type-checks
like the compiler nor shows what the GPU would run. This drives the same Python wrappers the
library calls (prefill, packed and split decode, offloaded decode; each dtype and head dim) on
``meta`` tensors, records the launches instead of running them, and compiles each one
ahead of time for the target (``sm_90`` by default: H100/H200) with the Triton compiler and
the CUDA tools its package carries. No GPU is needed. Per variant it reports registers per
thread, stack bytes per thread (local arrays and spills, from ``cuobjdump -res-usage``), shared
memory and warps, so a kernel that would not compile, or would spill, shows up before any GPU
time is spent on it. A search launch that needs more shared memory than the target has is
compiled again as the library launches it there (reloading its variances); a launch that still
does not fit makes the exit status 1. A prefill's attention kernel is compiled for each tile
its autotuner may choose; one that does not fit is not offered there (Triton's autotuner
scores it as failed), and only a prefill none of whose tiles fits is refused.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hip_attn.cli_args import arg_type, command_error, non_negative_int, positive_int
from hip_attn.config import HiPConfig
from hip_attn.interpreter import interpreting
from hip_attn.progress import progress_bar, say

if TYPE_CHECKING:
    import torch

_EPILOG = """examples:
  hip-attn aot                      # every variant for sm_90 (H100/H200)
  hip-attn aot --arch 80 --only mask
  hip-attn aot --quick              # bf16, head dim 128 only (what CI compiles)
"""

#: Compute capabilities the Triton CUDA backend compiles for (of GPUs that exist): Turing and
#: newer. Other numbers abort inside LLVM (sm_12) or ptxas (sm_101, renamed sm_110).
ARCHES = (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)

#: Shared memory one program may use on each architecture, KB (the CUDA programming guide's
#: "maximum amount of shared memory per thread block", opt-in): a launch asking for more is
#: refused (Triton's ``OutOfResources``).
SHARED_KB = {75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227, 110: 227,
             120: 99, 121: 99}  # fmt: skip

# torch dtype name -> Triton signature type (torch is imported only when compiling: the CLI's
# --help stays torch-free)
_TRITON_TYPES = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "int32": "i32",
    "int64": "i64",
    "bool": "i1",
}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and its arguments; ``candidate``:
    one of several tiles a prefill's autotuner times (one the target refuses for shared memory
    is not offered there: Triton scores it as failed)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    candidate: bool = False


@dataclass
class Variant:
    """A named way the library launches the kernels, and what compiling it gave."""

    name: str
    launches: list[Launch] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)


class _Recorder:
    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, the wrappers' kernel launches are recorded, not run."""
    from hip_attn.triton_kernels import attention, mask, tree

    launches: list[Launch] = []
    slots = [
        (mask, "_hip_mask_kernel"),
        (attention, "_sparse_attention_kernel"),
        (tree, "_extend_tree_kernel"),
    ]
    saved = [getattr(module, name) for module, name in slots]
    for (module, name), kernel in zip(slots, saved, strict=True):
        setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for (module, name), kernel in zip(slots, saved, strict=True):
            setattr(module, name, kernel)


def specialize(launch: Launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], Any]]:
    """``(signature, constexprs, attrs)`` for :class:`triton.compiler.ASTSource`, specialized
    as Triton's launcher would: pointers and multiples of 16 marked 16-divisible, the integer
    1 a constant (neither for an argument the kernel does not specialize), integers outside
    int32 as i64."""
    import torch

    kernel = launch.kernel
    names = kernel.arg_names
    values = dict(zip(names, launch.args, strict=False))  # the rest come as kwargs
    values.update(launch.kwargs)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int], Any] = {}
    divisible = [["tt.divisibility", 16]]
    for i, (name, param) in enumerate(zip(names, kernel.params, strict=True)):
        value = values[name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            attrs[(i,)] = divisible  # allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            special = not param.do_not_specialize
            if value == 1 and special:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and special:
                attrs[(i,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot specialize argument {name}={value!r}")
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack bytes per thread (local arrays and spills) and static
    shared memory of a cubin, as ``cuobjdump -res-usage`` reports them."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        cmd = [str(knobs.nvidia.cuobjdump.path), "-res-usage", path]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    return {
        "registers": int(usage.get("REG", 0)),
        "stack_bytes": int(usage.get("STACK", 0)),
        "local_bytes": int(usage.get("LOCAL", 0)),
    }


def compile_launch(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile one recorded launch for ``sm_<arch>``; its resource use as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    src = ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    # launch options the wrapper chose (Triton's defaults otherwise)
    chosen = ("num_warps", "num_stages", "enable_fp_fusion")
    options = {k: launch.kwargs[k] for k in chosen if k in launch.kwargs}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    kw = launch.kwargs  # the attention kernel's tile, which its autotuner varies
    tile = {"tile": f"{kw['BLOCK_M']}x{kw['BLOCK_N']}"} if "BLOCK_M" in kw else {}
    return {
        "kernel": launch.kernel.__name__,
        "grid": list(launch.grid),
        **tile,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "shared_bytes": compiled.metadata.shared,
        **_resource_usage(compiled.asm["cubin"]),
        "compile_s": round(seconds, 2),
    }


def compile_as_launched(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """:func:`compile_launch`, then what the library does where the target refuses it for
    shared memory: the search kernel launches again reloading its variances
    (``hip_attn.triton_kernels.mask``, 16-bit operands only); the result says
    ``"reloads_variances"`` (then ``"first_shared_bytes"`` is what the first compile asked
    for) and ``"fits"`` (within :data:`SHARED_KB`)."""
    from hip_attn.triton_kernels.mask import reloading_variances

    limit = SHARED_KB[arch] * 1024
    result = compile_launch(launch, arch)
    first_shared = result["shared_bytes"]
    is_search = launch.kwargs.get("RELOAD_VARIANCES") is False
    kwargs = reloading_variances(launch.kwargs) if is_search else None
    reloads = first_shared > limit and kwargs is not None
    if reloads and kwargs is not None:
        result = compile_launch(Launch(launch.kernel, launch.grid, launch.args, kwargs), arch)
    first = {"first_shared_bytes": first_shared} if reloads else {}
    return {**result, "reloads_variances": reloads, **first,
            "fits": result["shared_bytes"] <= limit, "candidate": launch.candidate}  # fmt: skip


# -- the variants: the shapes the library launches -----------------------------------------


def _llama_qkv(
    batch: int, tq: int, tk: int, dtype: torch.dtype, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama-3.1-8B attention shapes (32 query heads, 8 KV heads) on the meta device."""
    import torch

    q = torch.empty((batch, 32, tq, head_dim), dtype=dtype, device="meta")
    k = torch.empty((batch, 8, tk, head_dim), dtype=dtype, device="meta")
    return q, k, torch.empty_like(k)


def _record_hip(
    batch: int,
    tq: int,
    tk: int,
    dtype: torch.dtype,
    head_dim: int,
    config: HiPConfig,
    sms: int,
    offload: bool,
) -> list[Launch]:
    import torch

    from hip_attn.attention import launch_shape, summary_tree
    from hip_attn.geometry import node_summaries, tree_blocks
    from hip_attn.triton_kernels.attention import KVSegments, sparse_attention_triton
    from hip_attn.triton_kernels.mask import (
        estimate_mask_triton,
        leaf_candidates_triton,
        rank_leaves_triton,
    )

    q, k, v = _llama_qkv(batch, tq, tk, dtype, head_dim)
    h_sel = 8 if config.head_sharing == "kv_group" else 32
    cache_k = torch.empty(
        (batch, 8, 2048 * config.block_size_k, head_dim), dtype=dtype, device="meta"
    )  # offload's block cache
    with recorded_launches() as launches:
        scale = q.shape[-1] ** -0.5
        if offload and config.leaf_scores == "keys":  # the leaves' keys from the block cache
            tree = node_summaries(k, config)
            candidates, _ = leaf_candidates_triton(q, tree, tk, config, h_sel, scale)
            table = torch.empty((batch * 8, tk // config.block_size_k + 1), dtype=torch.int32,
                                device="meta")  # fmt: skip
            indices = torch.empty((batch, h_sel, 1, config.blocks_per_query_block),
                                  dtype=torch.int32, device="meta")  # fmt: skip
            rank_leaves_triton(q, candidates, cache_k, table, tk, config, scale, indices)
        elif tq <= config.block_size_q:  # a decode refresh: the search launch extends the tree
            before = tk - config.block_size_k
            blocks = tree_blocks(before, config)
            tree = node_summaries(k[:, :, :before], config, min_capacity=blocks + blocks // 4)
            indices, _ = estimate_mask_triton(
                q, tree, tk, config, h_sel, scale, keys=k, done=blocks
            )  # fmt: skip
        else:
            tree = summary_tree(k, config, kernels=True)  # the tree kernel builds it (meta)
            done = tree_blocks(tk, config)  # complete: keys only for leaf_scores="keys"
            indices, _ = estimate_mask_triton(q, tree, tk, config, h_sel, scale, keys=k, done=done)
        kv = KVSegments.full(k, v)
        if offload:  # sinks, slots and window in their own buffers, read through the table
            kv = KVSegments(
                k,
                v,
                cache_k,
                torch.empty_like(cache_k),
                k,
                v,
                slots=torch.empty_like(indices),
                window_offset=tk - 4096,
            )
        tiles, splits = launch_shape(batch, 32, h_sel, tq, config, sms)
        for tile in tiles:  # each tile a prefill's autotuner may choose
            sparse_attention_triton(q, kv, tk, indices, config, scale, num_splits=splits,
                                    tile=tile)  # fmt: skip
            launches[-1].candidate = len(tiles) > 1
    return launches


def _record_device_decode(
    batch: int,
    tk: int,
    dtype: torch.dtype,
    head_dim: int,
    config: HiPConfig,
    sms: int,
    per_sequence: bool = False,
) -> list[Launch]:
    """The launches of one ``hip_attention(..., length=)`` step over a ``tk``-token buffer
    (``per_sequence``: a left-padded batch, one count per sequence)."""
    import torch

    from hip_attn.attention import launch_shape
    from hip_attn.geometry import summary_width, tree_blocks, tree_rows
    from hip_attn.triton_kernels.attention import KVSegments, sparse_attention_triton
    from hip_attn.triton_kernels.mask import decode_search_triton

    q, k, v = _llama_qkv(batch, 1, tk, dtype, head_dim)
    h_sel = 8 if config.head_sharing == "kv_group" else 32
    tree_shape = (batch, 8, tree_rows(tree_blocks(tk, config)), summary_width(head_dim))
    tree = torch.empty(tree_shape, dtype=dtype, device="meta")

    def ints(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int32, device="meta")

    counts = batch if per_sequence else 1
    length, anchor, done = ints(counts), ints(counts), ints(batch, 8)
    indices = ints(batch, h_sel, 1, config.blocks_per_query_block)
    scale = head_dim**-0.5
    with recorded_launches() as launches:
        decode_search_triton(q, tree, k, length, done, anchor, config, scale, indices)
        (tile,), splits = launch_shape(batch, 32, h_sel, 1, config, sms)
        kv = KVSegments.full(k, v)
        sparse_attention_triton(q, kv, length, indices, config, scale, num_splits=splits,
                                tile=tile)  # fmt: skip
    return launches


def variants(quick: bool = False, sms: int = 132) -> list[Variant]:
    """The launch variants to compile. ``sms``: multiprocessors of the target GPU (the
    decode split count depends on it; 132 is an H100 SXM or H200)."""
    import torch

    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    dims = [128] if quick else [64, 128]
    out = []
    configs = {
        "kv_group": HiPConfig(),  # beam 2, every row, keys at the leaves
        "head": HiPConfig(head_sharing="head"),
        # the lighter setting of the README: 0.39x the search's reads at 64K
        "kv_group, beam 1, s 2, summary leaves": HiPConfig(
            beam=1, query_pool_stride=2, leaf_scores="summary"
        ),
    }
    for label, config in configs.items():
        for dtype in dtypes:
            for d in dims:
                tag = f"{str(dtype).removeprefix('torch.')} D={d} {label}"
                for mode, batch, tq, tk, offload in (
                    ("prefill 4K of 128K", 1, 4096, 131072, False),
                    ("decode at 1M", 1, 1, 1 << 20, False),
                    ("offloaded decode at 1M", 1, 1, 1 << 20, True),
                    ("decode at 1M, batch 4 (int64 offsets)", 4, 1, 1 << 20, False),
                ):
                    # quick: every variant of the default config, the others' decode
                    default = config == HiPConfig()
                    if quick and not default and mode != "decode at 1M":
                        continue
                    launches = _record_hip(batch, tq, tk, dtype, d, config, sms, offload)
                    out.append(Variant(f"{mode}, {tag}", launches))
                launches = _record_device_decode(1, 1 << 20, dtype, d, config, sms)
                out.append(Variant(f"device decode at 1M (CUDA-graph step), {tag}", launches))
                launches = _record_device_decode(4, 128 << 10, dtype, d, config, sms, True)
                out.append(Variant(f"device decode at 128K, left-padded batch 4, {tag}",
                                   launches))  # fmt: skip
    return out


# -- command line ------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "aot",
        help="compile every kernel variant for a GPU architecture (no GPU needed)",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        type=int,
        choices=ARCHES,
        default=90,
        metavar="SM",
        help="compute capability as an integer: 80 A100, 89 L4/L40, 90 H100/H200, 100 B200; "
        f"one of {', '.join(map(str, ARCHES))} (default: 90)",
    )
    p.add_argument(
        "--sms",
        type=arg_type(positive_int, "count"),
        default=132,
        help="multiprocessors of the target GPU, which set the decode split count "
        "(default: 132, an H100 SXM or H200)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="bf16 and head dim 128 only (and of the configs other than the default, decode only)",
    )
    p.add_argument(
        "--only", choices=["mask", "attention"], default=None, help="compile one kernel only"
    )
    p.add_argument(
        "--max-stack-bytes",
        type=arg_type(non_negative_int, "bytes"),
        default=None,
        metavar="N",
        help="exit with status 1 if a kernel uses more than N bytes of stack per thread "
        "(local memory: register spills and local arrays)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the table as JSON (target, Triton and torch versions, git commit)",
    )
    p.set_defaults(func=run)


def _write_json(path: str, arch: int, compiled: list[Variant]) -> None:
    import json

    import torch
    import triton

    from hip_attn.bench.environment import git_commit

    doc = {
        "target": f"sm_{arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        **git_commit(),
        "variants": [{"name": v.name, "kernels": v.results} for v in compiled],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def run(args: argparse.Namespace) -> int:
    if interpreting():
        return command_error(
            "hip-attn aot", "unset TRITON_INTERPRET (the compiler, not the interpreter)"
        )
    wanted = {"mask": "_hip_mask_kernel", "attention": "_sparse_attention_kernel"}.get(args.only)
    all_variants = variants(args.quick, args.sms)
    worst, refused = 0, 0
    print(f"compiling for sm_{args.arch} ({len(all_variants)} variants, "
          f"{SHARED_KB[args.arch]} KB of shared memory)", flush=True)  # fmt: skip
    header = (f"{'kernel':<26}{'grid':>18}{'tile':>8}{'warps':>6}{'stages':>7}{'regs':>6}"
              f"{'stack B':>8}{'smem KB':>8}")  # fmt: skip
    over = f"over {SHARED_KB[args.arch]} KB"
    for variant in progress_bar(all_variants, desc=f"sm_{args.arch}", unit="variant"):
        say(f"{variant.name}\n  {header}")
        offered = None  # of the autotuner's candidates, whether one fits
        for launch in variant.launches:
            if wanted and launch.kernel.__name__ != wanted:
                continue
            r = compile_as_launched(launch, args.arch)
            variant.results.append(r)
            if r["fits"]:  # a candidate the target refuses is never launched there
                worst = max(worst, r["stack_bytes"] + r["local_bytes"])
            if r["candidate"]:
                offered = bool(offered) or r["fits"]
            else:
                refused += not r["fits"]
            grid = "x".join(map(str, r["grid"]))
            note = (f"  reloads variances (was {r['first_shared_bytes'] / 1024:.0f} KB)"
                    if r["reloads_variances"] else "")  # fmt: skip
            if not r["fits"]:
                note += f"  {over}: not offered" if r["candidate"] else f"  {over}: refused"
            say(
                f"  {r['kernel']:<26}{grid:>18}{r.get('tile', ''):>8}{r['num_warps']:>6}"
                f"{r['num_stages']:>7}{r['registers']:>6}"
                f"{r['stack_bytes']:>8}{r['shared_bytes'] / 1024:>8.1f}{note}"
            )
        if offered is False:
            say("  no tile the autotuner may choose fits: refused")
            refused += 1
    if args.json:
        try:
            _write_json(args.json, args.arch, all_variants)
        except OSError as err:
            return command_error("hip-attn aot", f"--json {args.json}: {err}")
        print(f"wrote {args.json}")
    if refused:
        print(f"hip-attn aot: {refused} launches need more shared memory than sm_{args.arch} has")
        return 1
    if args.max_stack_bytes is not None and worst > args.max_stack_bytes:
        print(f"hip-attn aot: a kernel uses {worst} stack bytes (> {args.max_stack_bytes})")
        return 1
    return 0
