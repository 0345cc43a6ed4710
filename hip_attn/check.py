"""``hip-attn check``: run HiP attention once on random inputs and compare it with dense.

The quickest way to see that the install works and what HiP does to one attention layer: which
backend ran, how many keys each query read, how far the output is from exact attention, and how
long each took.
"""

from __future__ import annotations

import argparse
from typing import Any

from hip_attn.cli_args import (
    add_device_arguments,
    add_hip_arguments,
    arg_type,
    command_error,
    device_and_dtype,
    hip_config_from_args,
    positive_int,
    wall_time,
)
from hip_attn.config import HiPConfig
from hip_attn.perf.units import parse_tokens

# Sparse at every length, so that even short checks exercise the HiP kernels.
_BASE = HiPConfig(dense_threshold=0)

_EPILOG = """examples:
  hip-attn check                                  # 2K tokens on CPU, 32K on a GPU
  hip-attn check --tokens 131072 --dtype bfloat16 --hip-k 1024
  TRITON_INTERPRET=1 hip-attn check --tokens 1024  # the Triton kernels, interpreted on CPU
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="run HiP attention on random inputs and compare it with dense attention",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    count = arg_type(positive_int, "count")
    p.add_argument(
        "--tokens",
        type=arg_type(parse_tokens, "tokens"),
        default=None,
        help="context length T of the prefill: 4096, 4k, ... (default: 2048 on CPU, 32768 on CUDA)",
    )
    p.add_argument("--batch", type=count, default=1, help="batch size (default: 1)")
    p.add_argument("--heads", type=count, default=8, help="query heads (default: 8)")
    p.add_argument("--kv-heads", type=count, default=2, help="key/value heads (default: 2)")
    p.add_argument("--head-dim", type=count, default=64, help="head dimension (default: 64)")
    add_device_arguments(p)
    add_hip_arguments(
        p, title="HiP configuration (defaults: HiPConfig(dense_threshold=0))", defaults=_BASE
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from hip_attn.attention import dense_attention, estimate_mask, hip_attention, uses_triton

    device, dtype = device_and_dtype(args)
    tokens = args.tokens or (32768 if device.type == "cuda" else 2048)
    try:
        config = hip_config_from_args(args, _BASE)
    except (TypeError, ValueError) as err:
        return command_error("hip-attn check", err)
    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.heads, tokens, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, tokens, args.head_dim)
    q, k, v = (
        torch.randn(s, generator=gen).to(device, dtype) for s in (shape_q, shape_kv, shape_kv)
    )

    try:
        backend = "triton" if uses_triton(device) else "PyTorch reference"
        if backend == "triton" and device.type != "cuda":
            backend = "triton (interpreter)"
        print(f"inputs   q {list(shape_q)}  k,v {list(shape_kv)}  {dtype}  on {device}")
        print(f"backend  {backend}")
        indices, t_mask = wall_time(lambda: estimate_mask(q, k, config), device)
        out, t_hip = wall_time(lambda: hip_attention(q, k, v, config), device)
        ref, t_dense = wall_time(lambda: dense_attention(q, k, v, args.head_dim**-0.5), device)
    except (TypeError, ValueError) as err:
        return command_error("hip-attn check", err)
    selected = int((indices[:, :, -1] >= 0).sum(-1).float().mean()) * config.block_size_k
    read = min(tokens, config.sink_tokens + selected + config.window + config.block_size_q)
    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"config   {config.describe()}")
    print(f"keys     last query block reads {read} of {tokens} keys ({read / tokens:.1%})")
    print(f"error    relative L2 distance to dense attention: {rel_err:.4f}")
    print(
        f"time     mask {t_mask * 1e3:.1f} ms, HiP total {t_hip * 1e3:.1f} ms, "
        f"dense (SDPA) {t_dense * 1e3:.1f} ms  (first call: includes compilation)"
    )
    return 0
