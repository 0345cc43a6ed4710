"""Bytes an offloaded layer moves host -> device with ``leaf_scores="keys"``: the leaf candidates
fetched keys-only (values only for the blocks selected) against fetched whole (K and V).

Both counts come from one run: the block cache's slot decisions do not depend on values, so
fetching the candidates whole would miss the same blocks, each at a whole block's bytes
(``misses x block_bytes``). Random fp32 inputs, one KV head with 4 query heads, D=64, the
quality setting of session 15 (per-head selection, ``beam=2``, unpooled rows, keys at the
leaves), the block cache at its minimum (``HiPConfig.offload_cache_blocks``) or
``--cache-blocks``. The kernels run interpreted on the CPU (minutes; ``TRITON_INTERPRET=1``)::

    TRITON_INTERPRET=1 python bench/offload_keys_bytes.py --context 2048 --steps 24 --k 256 \
        --sinks 64 --window 256
    TRITON_INTERPRET=1 python bench/offload_keys_bytes.py --context 8192 --steps 32 --k 64

Prints one JSON document (results in ``bench/results/offload-keys-only-bytes.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hip_attn import HiPConfig, HiPDecodeState
from hip_attn.offload import OffloadedKV


def measure(context: int, steps: int, config: HiPConfig, cache_blocks: int) -> dict:
    b, hq, hkv, d = 1, 4, 1, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, context + steps, d, generator=gen) for h in (hq, hkv, hkv))
    need, _ = config.offload_cache_blocks(hq // hkv)
    off = OffloadedKV(config, b, hkv, d, torch.float32, "cpu", cache_blocks=max(need, cache_blocks),
                      max_chunk=1024, host_chunk_tokens=4096)  # fmt: skip
    start = time.time()
    off.prefill(q[:, :, :context], k[:, :, :context], v[:, :, :context])
    print(f"prefill: {time.time() - start:.0f} s", file=sys.stderr)
    filled, block = off.cache.stats, off.cache.block_bytes
    state, refreshes = HiPDecodeState(), []
    for t in range(context, context + steps):
        off.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        before = off.cache.stats
        off.attend(q[:, :, t : t + 1], state=state)
        after = off.cache.stats
        if after.steps != before.steps:  # a refresh consulted the block cache
            refreshes.append({
                "step": t - context,
                "bytes": after.bytes_moved - before.bytes_moved,
                "whole_bytes": (after.misses - before.misses) * block,
                "misses": after.misses - before.misses,
                "keys_only": after.keys_only - before.keys_only,
                "value_fills": after.value_fills - before.value_fills,
            })  # fmt: skip
    moved = sum(r["bytes"] for r in refreshes)
    whole = sum(r["whole_bytes"] for r in refreshes)
    return {
        "context": context,
        "decode_steps": steps,
        "config": config.to_dict(),
        "cache_blocks": off.cache.slots,
        "prefill": {"bytes": filled.bytes_moved, "whole_bytes": filled.misses * block},
        "decode": {"bytes": moved, "whole_bytes": whole, "refreshes": refreshes},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048, help="tokens prefilled (default 2048)")
    p.add_argument("--steps", type=int, default=24, help="decode steps after it (default 24)")
    p.add_argument("--k", type=int, default=256, help="HiP's k (default 256)")
    p.add_argument("--sinks", type=int, default=16, help="sink tokens (default 16)")
    p.add_argument("--window", type=int, default=64, help="window tokens (default 64)")
    p.add_argument("--cache-blocks", type=int, default=0,
                   help="block-cache slots (default: the minimum the config needs)")  # fmt: skip
    args = p.parse_args()
    config = HiPConfig(k=args.k, block_size_q=64, block_size_k=8, sink_tokens=args.sinks,
                       window=args.window, head_sharing="head", beam=2, query_pool_stride=1,
                       leaf_scores="keys", refresh_interval=8, dense_threshold=0)  # fmt: skip
    print(json.dumps(measure(args.context, args.steps, config, args.cache_blocks), indent=1))


if __name__ == "__main__":
    main()
