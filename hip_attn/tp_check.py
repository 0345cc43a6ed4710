"""``hip_attn.patch`` under transformers' tensor parallelism, checked end to end.

Run it under ``torchrun``, one process per device::

    python -m hip_attn.tp_check --save-tiny /tmp/tiny-llama    # once: a tiny random Llama
    torchrun --nproc-per-node 2 -m hip_attn.tp_check --model /tmp/tiny-llama [--offload]

Every rank loads the checkpoint with ``DistributedConfig(tp_plan="auto")`` (transformers shards
the q/k/v projections by heads, so each rank holds ``heads / world`` query heads and
``kv_heads / world`` KV heads), patches it with :data:`CHECK_CONFIG` (a sparse budget that does
not cover the prompt, so the tree search decides the tokens) and generates greedy tokens. Rank 0
prints a JSON report (and writes it with ``--out``): the tokens and, per rank, the head counts
the attention function received, the decode-state refreshes, the KV bytes held and whether the
Triton kernels or the PyTorch reference ran. The exit status is 1 when a rank saw other head
counts than its share or never refreshed a decode selection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from hip_attn.config import HiPConfig

# k=32 of ~200 prompt tokens: the selection matters; refresh_interval 4: decode refreshes it
CHECK_CONFIG = HiPConfig(
    k=32, block_size_q=16, block_size_k=8, sink_tokens=16, window=32, refresh_interval=4,
    dense_threshold=0,
)  # fmt: skip
# prefill in chunks of 64 tokens, a small block cache, host memory in chunks of 256 tokens
OFFLOAD_OPTIONS = {"max_chunk": 64, "cache_blocks": 64, "host_chunk_tokens": 256}


def save_tiny(path: str) -> None:
    """Save a 2-layer random Llama (8 query heads, 4 KV heads, head dim 16) to ``path``."""
    from hip_attn.tiny_model import random_llama

    random_llama(0, layers=2, hidden=128, heads=8, kv_heads=4, vocab=128).save_pretrained(path)


def prompt(tokens: int, vocab: int) -> torch.Tensor:
    """The fixed random prompt ``[1, tokens]`` every process of a check uses."""
    return torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))


def patch_for_check(model: Any, *, offload: bool) -> None:
    """``hip_attn.patch`` ``model`` with :data:`CHECK_CONFIG` (and :data:`OFFLOAD_OPTIONS`)."""
    from hip_attn.patches import patch

    patch(
        model, CHECK_CONFIG, offload=offload, offload_options=OFFLOAD_OPTIONS if offload else None
    )


def greedy(model: Any, ids: torch.Tensor, new_tokens: int) -> Any:
    """``new_tokens`` greedy tokens after ``ids``: the ``generate`` output (``sequences`` and
    the cache)."""
    return model.generate(
        ids.to(model.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, return_dict_in_generate=True,
    )  # fmt: skip


@contextlib.contextmanager
def recording_heads(seen: set[tuple[int, int]]) -> Iterator[None]:
    """Within the block, the ``"hip"`` attention function adds ``(Hq, Hkv)`` of every call to
    ``seen`` (what the rank computes on, after tensor-parallel sharding). Enter it after
    ``patch``, which registers the plain function."""
    from transformers import AttentionInterface

    from hip_attn.patches.attention import ATTN_NAME, hip_attention_forward

    def record(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        seen.add((query.shape[1], key.shape[1]))
        return hip_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, record)
    try:
        yield
    finally:
        AttentionInterface.register(ATTN_NAME, hip_attention_forward)


def cache_report(cache: Any) -> dict[str, Any]:
    """What one rank's generation cache holds: decode refreshes per layer and KV bytes."""
    from hip_attn.patches import decode_states
    from hip_attn.patches.offload import HiPOffloadCache

    states = decode_states(cache).items()
    report: dict[str, Any] = {
        "refreshes": {str(layer): s.refreshes for (layer, seq), s in states if seq is None}
    }
    if isinstance(cache, HiPOffloadCache):
        stats = cache.stats()
        report["kv_heads"] = sorted({kv.kv_heads for kv in map(cache.offloaded, stats) if kv})
        report["host_kv_bytes"] = sum(s["host_bytes"] for s in stats.values())
        report["device_kv_bytes"] = sum(s["device_bytes"] for s in stats.values())
    else:
        report["kv_heads"] = sorted({layer.keys.shape[1] for layer in cache.layers})
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        report["device_kv_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hip_attn.tp_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--save-tiny", metavar="DIR", help="save the tiny random Llama and exit")
    parser.add_argument("--model", metavar="DIR", help="checkpoint to load with tp_plan='auto'")
    parser.add_argument("--offload", action="store_true", help="keep the KV cache in host memory")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", metavar="FILE", help="also write rank 0's JSON report here")
    args = parser.parse_args(argv)
    if args.save_tiny:
        save_tiny(args.save_tiny)
        return 0
    if not args.model:
        parser.error("--model DIR is required (make one with --save-tiny DIR)")
    if "WORLD_SIZE" not in os.environ:
        parser.error("run it under torchrun: torchrun --nproc-per-node N -m hip_attn.tp_check ...")

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    from hip_attn.attention import uses_triton
    from hip_attn.patches.compat import output_cache

    model = AutoModelForCausalLM.from_pretrained(
        args.model, distributed_config=DistributedConfig(tp_plan="auto"), dtype="auto"
    )
    world, rank = dist.get_world_size(), dist.get_rank()
    text = model.config.get_text_config()
    patch_for_check(model, offload=args.offload)
    ids = prompt(args.prompt_tokens, text.vocab_size)
    seen: set[tuple[int, int]] = set()
    with recording_heads(seen), torch.no_grad():
        out = greedy(model, ids, args.new_tokens)
    mine = {
        "rank": rank,
        "tokens": out.sequences[0, ids.shape[1] :].tolist(),
        "attention_heads": sorted(seen),
        "kernels": "triton" if uses_triton(model.device) else "reference",
        **cache_report(output_cache(out)),
    }
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    share = (text.num_attention_heads // world, text.num_key_value_heads // world)
    ok = all(r["attention_heads"] == [share] and r["refreshes"] for r in ranks) and all(
        r["tokens"] == mine["tokens"] for r in ranks
    )
    if rank == 0:
        report = {"world_size": world, "offload": args.offload, "ok": ok,
                  "model_heads": [text.num_attention_heads, text.num_key_value_heads],
                  "tokens": mine["tokens"], "ranks": ranks}  # fmt: skip
        text_report = json.dumps(report, indent=1)
        print(text_report)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text_report)
    dist.barrier()  # no rank tears gloo down while another still uses it (an abort at exit)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: with the report written and the process group destroyed,
    # a thread of the distributed runtime still joinable at exit has aborted a rank
    # ("terminate called without an active exception", twice in CI, barrier or not)
    os._exit(code)
