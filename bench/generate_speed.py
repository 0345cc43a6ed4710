"""Decode speed of a whole model: dense ``generate()``, HiP ``generate()`` and ``graph_generate``.

The kernel benchmarks (``hip-attn bench``) time one attention layer; this times what a user
runs: a Llama-3.1-8B-shaped model (random weights, bf16, ``--layers`` of its 32 layers) decoding
after a prompt of each ``--context``. Per context it reports the prefill and the milliseconds
per new token of

- ``dense``: the unpatched model's ``generate()`` (SDPA, transformers' dynamic cache);
- ``hip``: ``generate()`` under ``hip_attn.patch`` (host-driven decode state, ``HiPCache``);
- ``hip_graph``: ``graph_generate``'s decode step replayed from a CUDA graph (eager off CUDA),

and whether ``hip`` and ``hip_graph`` produced the same greedy tokens (random weights give flat
logits: a flipped near-tie is possible, so this is reported, not asserted). With ``--offload``
also ``generate()`` with the KV cache in host memory (``hip_offload``, ``--cache-blocks`` slots
per KV head) and the same with each refreshing layer prefetching its selection into the next
layer's block cache (``hip_offload_prefetch``; the same tokens, asserted: a prefetch changes
what is resident, not what is selected). Random weights make adjacent layers' selections
unrelated, so this measures what a prefetch costs a decode step more than what it saves; and a
context of ``--cache-blocks`` blocks or fewer (8K at the default 1024 and ``block_size_k=8``)
fits the block cache whole, so only longer ones show the offloaded fetches at all.

On a GPU (``bash bench/gpu_session.sh generate``)::

    python bench/generate_speed.py --context 8k,32k,128k --layers 4 --offload

``--batch 4 --padded`` decodes four prompts, left-padded to the longest (sequence ``b`` is
``b * context / 8`` tokens shorter): ``graph_generate`` then counts each sequence's keys
apart (the same launches as ``--batch 4`` unpadded, whose time it should match).

A CPU smoke run of the same code on a tiny model (the Triton interpreter, seconds)::

    TRITON_INTERPRET=1 python bench/generate_speed.py --tiny --context 300 --new-tokens 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hip_attn
from hip_attn.bench.environment import environment, result_stem
from hip_attn.cli_args import comma_list, positive_int
from hip_attn.patches import unpatch
from hip_attn.patches.compat import output_cache
from hip_attn.patches.graph_generate import capture, left_padding_mask, prefill
from hip_attn.perf.units import parse_tokens

#: Llama-3.1-8B's attention and MLP shapes (the layer count is ``--layers``).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)  # fmt: skip
TINY_CONFIG = hip_attn.HiPConfig(k=64, block_size_q=16, block_size_k=8, sink_tokens=16,
                                 window=32, dense_threshold=0)  # fmt: skip


def build_model(layers: int, tiny: bool, device: torch.device) -> Any:
    """A Llama with random weights: Llama-3.1-8B's shapes in bf16, or a tiny fp32 one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = TINY if tiny else LLAMA_8B
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=1 << 21, **shapes)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    with device:
        return LlamaForCausalLM(config).to(dtype).eval()


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` takes, synchronized, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def generate_ms(
    model: Any, ids: torch.Tensor, new: int, repeats: int, starts: list[int] | None = None
) -> dict[str, Any]:
    """``generate()``'s prefill (one new token) and its milliseconds per further token: the
    difference of two medians, so noise can make it small or even negative where a token costs
    little next to the prefill (a tiny model on a CPU); on a GPU it is the decode's cost.
    ``starts``: each prompt's first token when they are left-padded."""
    kw: dict[str, Any] = {"do_sample": False}
    if starts is not None:
        kw["attention_mask"] = left_padding_mask(starts, ids.shape[1], ids.device).long()
    device = ids.device
    model.generate(ids, max_new_tokens=2, **kw)  # warm-up: first-call costs are not decode
    prefills, totals, tokens = [], [], None
    for _ in range(repeats):
        prefills.append(_timed(lambda: model.generate(ids, max_new_tokens=1, **kw), device)[0])
        seconds, tokens = _timed(
            lambda: model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, **kw),
            device,
        )
        totals.append(seconds)
    prefill_s, total_s = statistics.median(prefills), statistics.median(totals)
    return {"prefill_ms": 1e3 * prefill_s, "ms_per_token": 1e3 * (total_s - prefill_s) / new,
            "tokens": tokens}  # fmt: skip


def _repeat(fn: Callable[[], Any], times: int) -> None:
    for _ in range(times):
        fn()


def graph_ms(
    model: Any, ids: torch.Tensor, new: int, repeats: int, starts: list[int] | None = None
) -> dict[str, Any]:
    """``graph_generate``'s decode step: milliseconds per replay (per eager step off CUDA),
    after the prefill, the warm-up step and the capture."""
    device = ids.device
    per_token, tokens = [], None
    for _ in range(repeats):
        with torch.no_grad():
            step = prefill(model, ids, new + 1, starts=starts)
            run = capture(step) if device.type == "cuda" else step
            if device.type != "cuda":
                step()  # the warm-up step capture() runs
            seconds, _ = _timed(functools.partial(_repeat, run, new - 1), device)
            step.cache.leave_device()
        per_token.append(1e3 * seconds / (new - 1))
        tokens = step.tokens
    return {"ms_per_token": statistics.median(per_token), "tokens": tokens}


def offload_ms(
    model: Any, config: hip_attn.HiPConfig, ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """:func:`generate_ms` with the KV cache offloaded, without and with the prefetch."""
    out = {}
    new = args.new_tokens + 1
    for name, prefetch in (("hip_offload", False), ("hip_offload_prefetch", True)):
        options = {"cache_blocks": args.cache_blocks, "prefetch": prefetch}
        hip_attn.patch(model, config, offload=True, offload_options=options)
        out[name] = generate_ms(model, ids, args.new_tokens, args.repeats)
        # host -> device bytes of one timed generate(), prefill included, over all layers
        done = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              return_dict_in_generate=True)  # fmt: skip
        layers = output_cache(done).stats().values()
        for key in ("bytes_moved", "prefetched_bytes"):
            out[name][key] = sum(layer[key] for layer in layers)
    if not torch.equal(out["hip_offload"]["tokens"], out["hip_offload_prefetch"]["tokens"]):
        raise AssertionError("the prefetch changed the generated tokens")
    hip_attn.patch(model, config)  # as the caller had it
    return out


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = build_model(args.layers, args.tiny, device)
    config = TINY_CONFIG if args.tiny else hip_attn.HiPConfig()
    rows = []
    for context in args.context:
        ids = torch.randint(3, model.config.vocab_size, (args.batch, context), device=device)
        starts = [b * context // (2 * args.batch) for b in range(args.batch)]
        starts = starts if args.padded and any(starts) else None
        row: dict[str, Any] = {"context": context}
        dense = generate_ms(model, ids, args.new_tokens, args.repeats, starts)
        hip_attn.patch(model, config)
        hip = generate_ms(model, ids, args.new_tokens, args.repeats, starts)
        graph = graph_ms(model, ids, args.new_tokens, args.repeats, starts)
        offloaded = offload_ms(model, config, ids, args) if args.offload else {}
        unpatch(model)
        prompt = ids.shape[1]
        same = torch.equal(hip["tokens"][:, prompt:], graph["tokens"][:, prompt : prompt + 1 +
                                                                      args.new_tokens])  # fmt: skip
        for name, r in (("dense", dense), ("hip", hip), ("hip_graph", graph), *offloaded.items()):
            row[name] = {k: v for k, v in r.items() if k != "tokens"}
        row["hip_graph_tokens_equal_hip"] = same
        row["speedup"] = {
            "hip_vs_dense": dense["ms_per_token"] / hip["ms_per_token"],
            "hip_graph_vs_dense": dense["ms_per_token"] / graph["ms_per_token"],
        }
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return {"model": "tiny llama" if args.tiny else "llama-3.1-8b shapes, random weights",
            "layers": args.layers, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "batch": args.batch, "left_padded": args.padded,
            "hip_config": dataclasses.asdict(config),
            "results": rows}  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    names = [name for name in ("hip_offload", "hip_offload_prefetch") if name in row]
    offloaded = "".join(f", {name} {row[name]['ms_per_token']:.2f}" for name in names)
    return (
        f"context {row['context']}: ms/token dense {row['dense']['ms_per_token']:.2f}, "
        f"hip {row['hip']['ms_per_token']:.2f}, hip_graph {row['hip_graph']['ms_per_token']:.2f} "
        f"(x{row['speedup']['hip_graph_vs_dense']:.2f} vs dense){offloaded}; tokens equal "
        f"{row['hip_graph_tokens_equal_hip']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=comma_list(parse_tokens, "token counts"),
                        default=[8192, 32768],
                        help="prompt lengths, comma-separated (8k, 128k accepted)")  # fmt: skip
    parser.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens timed")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs, median kept")
    parser.add_argument("--batch", type=positive_int, default=1, help="prompts decoded together")
    parser.add_argument("--padded", action="store_true",
                        help="left-pad the prompts: sequence b is b * context / (2 * batch) "
                             "tokens shorter")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (CPU smoke run)")
    parser.add_argument("--offload", action="store_true",
                        help="also time generate() with the KV cache in host memory, without "
                             "and with the prefetch into the next layer")  # fmt: skip
    parser.add_argument("--cache-blocks", type=positive_int, default=1024,
                        help="with --offload: block-cache slots per KV head")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one warm-up step, then the timed ones)")
    if args.offload and (args.padded or args.batch > 1):
        parser.error("--offload decodes one unpadded prompt (offload has no padded batches yet)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {"environment": environment(device), **measure(args, device)}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = args.out or Path("bench/results") / f"{result_stem(name, device.type)}-generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
