"""Does prefetching the previous layer's selection shorten an offloaded decode refresh? A
replay of SmolLM2-135M's block-cache requests, with and without a prefetch.

An offloaded layer's refresh fetches what its search needs on the critical path: the keys of
the leaf candidates the first search launch names, then the values of the blocks it selects
(``leaf_scores="keys"``, the defaults). A layer's selection needs its own queries, so a
prefetch queued while the previous layer runs can only guess. Three guesses are replayed:

* ``all_heads``: the union of layer L's selections over its KV heads, into every KV head of
  layer L+1, keys and values (what :meth:`OffloadedKV.prefetch` does while the union takes at
  most half the slots);
* ``same_head``: layer L's selection of the same KV head (``G`` blocks);
* ``candidates``: everything layer L fetched for the same KV head (its leaf candidates' keys,
  its selection's values).

How: a greedy answer of SmolLM2 (``--answer-tokens``) to a ``--context``-token passkey prompt
(``pydoc`` filler); one dense forward pass over prompt and answer captures every layer's
post-RoPE q/k/v. Each layer gets an :class:`~hip_attn.offload.OffloadedKV`; the search of the
prompt's last query block fills its block cache (a long prefill's LRU holds its last query
blocks' candidates), then at each decode refresh (every ``refresh_interval`` tokens) the search
runs on the decode token's query and the cache fetches the candidates and the selection. The
requests are recorded once, and replayed with the readable LRU
(:class:`~hip_attn.offload.readable_lru.ReadableLRU`, checked against the cache's own counters
for the largest ``--cache-blocks``) into caches of each ``--cache-blocks`` size, each guess
prefetched into layer L+1's cache before its own requests. Counted over layers 1.. in half
blocks (the keys or the values of one block of one KV head): fetched on the critical path
(as if each prefetch were done before the next layer needs its cache), and prefetched. The
kernels run interpreted (about 25 minutes at 8K on 2 cores)::

    TRITON_INTERPRET=1 python bench/offload_prefetch.py --context 8192 --cache-blocks 256 384 512

Prints one JSON document (results in ``bench/results/offload-prefetch-smollm2.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import transformers

from hip_attn import HiPConfig
from hip_attn.bench.environment import git_commit
from hip_attn.interpreter import interpreting
from hip_attn.offload import OffloadedKV
from hip_attn.offload.block_cache import BlockCache
from hip_attn.offload.readable_lru import ReadableLRU

GUESSES = ("all_heads", "same_head", "candidates")


def half_blocks(misses: int, fills: int, values: bool) -> int:
    """Keys and values moved (each half a block) by a fetch's ``misses`` and ``fills``."""
    return misses + (misses + fills if values else 0)


def capture(context: int, answer_tokens: int) -> tuple[dict[int, tuple[Any, ...]], int]:
    from hip_attn.accuracy.checkpoints import builtin_text
    from hip_attn.accuracy.model_attention import capture_qkv
    from hip_attn.accuracy.model_eval import load_model, passkey_prompt, text_tokens

    lm = load_model("smollm2", torch.device("cpu"), torch.float32)
    filler = text_tokens(lm, builtin_text("pydoc"), context, seed=0)
    prompt = passkey_prompt(lm, filler, context, 0.5, "52871")
    with torch.no_grad():
        ids = lm.model.generate(prompt.ids, attention_mask=torch.ones_like(prompt.ids),
                                max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                                do_sample=False, pad_token_id=0)  # fmt: skip
    answer = lm.tokenizer.decode(ids[0, context:], skip_special_tokens=True)
    print(f"answer: {answer!r}", file=sys.stderr)
    return capture_qkv(lm, ids), context


Requests = dict[int, list[list[tuple[torch.Tensor, bool]]]]


def record(
    layers: dict[int, tuple[Any, ...]], context: int, config: HiPConfig, cache_blocks: int
) -> tuple[Requests, dict[int, tuple[int, int]]]:
    """Per layer, the block-cache requests (``[rows, L]`` blocks, and whether values come too)
    of the prompt's last query block, then of each decode refresh; and the misses and value
    fills the cache of ``cache_blocks`` slots counted for them."""
    requests: Requests = {}
    counted: dict[int, tuple[int, int]] = {}
    original = BlockCache.ensure
    calls: list[tuple[torch.Tensor, bool]] = []

    def recording(self: BlockCache, requested: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        calls.append((requested.cpu().clone(), kwargs.get("values", True)))
        original(self, requested, *args, **kwargs)

    bq = config.block_size_q
    BlockCache.ensure = recording  # type: ignore[method-assign]
    try:
        for i, (q, k, v, scale) in layers.items():
            off = OffloadedKV(config, 1, k.shape[1], k.shape[3], k.dtype, "cpu",
                              cache_blocks=cache_blocks, max_chunk=1024,
                              host_chunk_tokens=8192)  # fmt: skip
            for lo in range(0, context, 1024):
                hi = min(lo + 1024, context)
                off.append(k[:, :, lo:hi], v[:, :, lo:hi])
            requests[i] = []
            # the cache as a prefill leaves it: its last query block's candidates and selection
            steps = [(q[:, :, context - bq : context], context)]
            refreshes = range(context, k.shape[2], config.refresh_interval)
            steps += [(q[:, :, t : t + 1], t + 1) for t in refreshes]
            for query, end in steps:
                if end > off.length:
                    off.append(k[:, :, off.length : end], v[:, :, off.length : end])
                calls.clear()
                off._fetch(off._search(query, scale))
                requests[i].append(list(calls))
            stats = off.cache.stats
            counted[i] = stats.misses, stats.value_fills
            print(f"layer {i}: {len(requests[i]) - 1} refreshes", file=sys.stderr)
    finally:
        BlockCache.ensure = original  # type: ignore[method-assign]
    return requests, counted


def replay(requests: Requests, slots: int, guess: str | None) -> dict[str, Any]:
    """The requests layer after layer, into caches of ``slots`` slots per KV head: the prompt's
    (not counted), then each refresh's, each layer but the first given ``guess`` from the
    previous one first. Counts half blocks over layers 1.. (layer 0 has no previous): fetched
    on the critical path (``critical``) and prefetched; per layer, the misses and value fills
    of its own requests."""
    order = sorted(requests)
    caches = {i: [ReadableLRU(slots) for _ in requests[i][0][0][0]] for i in order}
    critical = prefetched = 0
    per_layer = {i: (0, 0) for i in order}
    for step in range(len(requests[order[0]])):
        counts = step > 0
        for n, i in enumerate(order):
            if guess is not None and counts and n > 0:
                for r, row in enumerate(caches[i]):
                    for blocks, values in _guess(requests[order[n - 1]][step], r, guess):
                        prefetched += half_blocks(*row.ensure(blocks, values), values)
            for requested, values in requests[i][step]:
                for r, row in enumerate(caches[i]):
                    misses, fills = row.ensure(requested[r].tolist(), values)
                    per_layer[i] = (per_layer[i][0] + misses, per_layer[i][1] + fills)
                    critical += half_blocks(misses, fills, values) if counts and n > 0 else 0
    return {"critical": critical, "prefetched": prefetched, "per_layer": per_layer}


def _guess(
    calls: list[tuple[torch.Tensor, bool]], row: int, guess: str
) -> list[tuple[list[int], bool]]:
    selection = calls[-1][0]  # the last request of a refresh is its selection (values)
    if guess == "same_head":
        return [(selection[row].tolist(), True)]
    if guess == "all_heads":
        return [(selection.flatten().unique().tolist(), True)]
    return [(requested[row].tolist(), values) for requested, values in calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--answer-tokens", type=int, default=64, help="decode steps replayed")
    parser.add_argument("--cache-blocks", type=int, nargs="+", default=[256, 384, 512],
                        help="block-cache slots per KV head (each a run)")  # fmt: skip
    args = parser.parse_args()
    if not interpreting():  # the reference search fetches no candidates: other requests
        parser.error("run with TRITON_INTERPRET=1 (the kernels' requests are replayed)")
    config = HiPConfig()
    begin, source = time.time(), git_commit()  # the tree as the run starts
    layers, context = capture(args.context, args.answer_tokens)
    recorded = max(args.cache_blocks)
    requests, counted = record(layers, context, config, recorded)
    check = replay(requests, recorded, None)["per_layer"]
    if check != counted:  # the readable LRU must miss what the cache missed
        raise AssertionError(f"replayed (misses, value fills) {check}, the cache's {counted}")
    runs = []
    for slots in args.cache_blocks:
        run: dict[str, Any] = {"cache_blocks": slots, "refreshes": len(requests[0]) - 1}
        for guess in (None, *GUESSES):
            result = replay(requests, slots, guess)
            del result["per_layer"]
            run[guess or "no_prefetch"] = result
        runs.append(run)
        print(json.dumps(run), file=sys.stderr)
    print(json.dumps({"model": "SmolLM2-135M-Instruct", "context": context, **source,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "config": config.to_dict(), "runs": runs,
                      "seconds": round(time.time() - begin)}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
