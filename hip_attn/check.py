"""``hip-attn check``: run HiP attention once on random inputs and compare it with dense.

The quickest way to see that the install works and what HiP does to one attention layer: which
backend ran, how many keys each query read, how far the output is from exact attention, and how
long each took.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

_EPILOG = """examples:
  hip-attn check                                  # 2K tokens on CPU, 32K on a GPU
  hip-attn check --tokens 131072 --dtype bfloat16 --k 1024
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
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="context length T of the prefill (default: 2048 on CPU, 32768 on CUDA)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default: 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default: 64)")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="input dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--k", type=int, default=512, help="selected key tokens per query block")
    p.add_argument("--window", type=int, default=256, help="sliding-window tokens")
    p.add_argument("--sink-tokens", type=int, default=64, help="attention-sink tokens")
    p.add_argument("--beam", type=int, default=1, help="search beam width")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from hip_attn.attention import dense_attention, estimate_mask, hip_attention, uses_triton
    from hip_attn.config import HiPConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = args.tokens or (32768 if device.type == "cuda" else 2048)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        config = HiPConfig(
            k=args.k,
            window=args.window,
            sink_tokens=args.sink_tokens,
            beam=args.beam,
            dense_threshold=0,
        )
    except (TypeError, ValueError) as err:
        print(f"hip-attn check: error: {err}")
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.heads, tokens, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, tokens, args.head_dim)
    q, k, v = (
        torch.randn(s, generator=gen).to(device, dtype) for s in (shape_q, shape_kv, shape_kv)
    )

    def timed(fn: Any) -> tuple[Any, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    try:
        backend = "triton" if uses_triton(device) else "PyTorch reference"
        if backend == "triton" and device.type != "cuda":
            backend = "triton (interpreter)"
        print(f"inputs   q {list(shape_q)}  k,v {list(shape_kv)}  {dtype}  on {device}")
        print(f"backend  {backend}")
        indices, t_mask = timed(lambda: estimate_mask(q, k, config))
        out, t_hip = timed(lambda: hip_attention(q, k, v, config))
        ref, t_dense = timed(lambda: dense_attention(q, k, v, args.head_dim**-0.5))
    except (TypeError, ValueError) as err:
        print(f"hip-attn check: error: {err}")
        return 2
    selected = int((indices[:, :, -1] >= 0).sum(-1).float().mean()) * config.block_size_k
    read = min(tokens, config.sink_tokens + selected + config.window + config.block_size_q)
    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(
        f"config   k={config.k} window={config.window} sinks={config.sink_tokens} "
        f"block_q={config.block_size_q} block_k={config.block_size_k} beam={config.beam}"
    )
    print(f"keys     last query block reads {read} of {tokens} keys ({read / tokens:.1%})")
    print(f"error    relative L2 distance to dense attention: {rel_err:.4f}")
    print(
        f"time     mask {t_mask * 1e3:.1f} ms, HiP total {t_hip * 1e3:.1f} ms, "
        f"dense (SDPA) {t_dense * 1e3:.1f} ms  (first call: includes compilation)"
    )
    return 0
