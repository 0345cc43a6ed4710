"""Perplexity of SmolLM2 when every attention layer attends what one selection method picks.

Each method of ``hip-attn accuracy`` (:data:`hip_attn.accuracy.methods.METHODS`) chooses the
key blocks of every query block of every layer; one routine
(:func:`hip_attn.reference.hip_attention_reference`) attends sinks + those blocks + the window,
so the methods differ only in the blocks they pick. Perplexity is then scored over one window of
pydoc text. This is what separates the losses of a selection rule on a real model: ``oracle``
(the top blocks by true softmax mass) and ``exact`` (HiP's ranking fed each row's exact max
logit per block) show what a rule could reach; ``hip`` and ``quest`` what the bounds reach.

Slow (CPU, PyTorch reference, one method at a time: 2-4 minutes per method at 8K tokens)::

    python bench/selection_perplexity.py --tokens 8192 --methods dense,oracle,exact,hip,quest
    python bench/selection_perplexity.py --tokens 2048 --methods dense,hip --block-size-q 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import hip_attn
import hip_attn.patches.attention as patched_attention
from hip_attn.accuracy.checkpoints import builtin_text
from hip_attn.accuracy.methods import METHODS, QueryBlock
from hip_attn.accuracy.metrics import dense_block
from hip_attn.accuracy.model_eval import LoadedModel, load_model, perplexity, text_tokens
from hip_attn.attention import dense_attention
from hip_attn.cli_args import add_hip_arguments, comma_list, hip_config_from_args, positive_int
from hip_attn.config import HiPConfig
from hip_attn.geometry import query_blocks
from hip_attn.reference import hip_attention_reference


def method_attention(name: str) -> Any:
    """A drop-in for :func:`hip_attn.hip_attention` whose selection comes from method ``name``,
    query block by query block."""
    select = METHODS[name][1]

    def attend(q, k, v, config, *, scale=None, state=None):  # noqa: ANN001, ARG001
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        tq, tk = q.shape[2], k.shape[2]
        if tk <= config.effective_dense_threshold:
            return dense_attention(q, k, v, scale)
        geo = query_blocks(tq, tk, config)
        g = config.blocks_per_query_block
        chosen = []
        for j in range(geo.start.numel()):
            start, end = int(geo.start[j]), int(geo.end[j])
            rows = q[:, :, start - (tk - tq) : end - (tk - tq)]
            keys, values = k[:, :, :end], v[:, :, :end]
            # only the oracle ranks by the true attention; the others never see it
            mass = dense_block(rows, keys, values, start, scale)[0] if name == "oracle" else None
            block = QueryBlock(
                rows, keys, values, start, end, int(geo.window_start[j]),
                int(geo.n_candidates[j]), mass,  # type: ignore[arg-type]
            )  # fmt: skip
            indices = select(block, config).indices
            chosen.append(F.pad(indices, (0, g - indices.shape[-1]), value=-1))
        return hip_attention_reference(
            q, k, v, config, scale=scale, indices=torch.cat(chosen, dim=2)
        )

    return attend


def one_window_ppl(lm: LoadedModel, ids: torch.Tensor) -> float:
    return float(perplexity(lm, ids, window=ids.numel(), stride=ids.numel())["ppl"])


def run(lm: LoadedModel, ids: torch.Tensor, methods: list[str], config: HiPConfig) -> dict:
    results: dict[str, Any] = {}
    original = patched_attention.hip_attention
    for name in methods:
        began = time.perf_counter()
        if name == "dense":
            ppl = one_window_ppl(lm, ids)
        else:
            hip_attn.patch(lm.model, config)
            patched_attention.hip_attention = method_attention(name)
            try:
                ppl = one_window_ppl(lm, ids)
            finally:
                patched_attention.hip_attention = original
                hip_attn.unpatch(lm.model)
        results[name] = {"ppl": ppl, "seconds": time.perf_counter() - began}
        dense = results.get("dense", {}).get("ppl")
        delta = f" ({100 * (ppl / dense - 1):+.1f}% vs dense)" if dense else ""
        print(f"{name:<10} ppl {ppl:8.3f}{delta}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=positive_int, default=8192, help="window (8192)")
    parser.add_argument(
        "--methods",
        type=comma_list(str, "method names"),
        default=["dense", "oracle", "exact", "hip", "quest", "streaming"],
        help=f"comma-separated, from {', '.join(METHODS)} (all)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    add_hip_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    torch.manual_seed(0)
    config = hip_config_from_args(args)
    lm = load_model("smollm2", torch.device("cpu"), torch.float32)
    ids = torch.tensor(text_tokens(lm, builtin_text("pydoc"), args.tokens, seed=1))
    print(f"SmolLM2-135M, {ids.numel():,} tokens of pydoc, one window; {config}", flush=True)
    results = run(lm, ids, args.methods, config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": ids.numel(), "config": config.to_dict(), "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
