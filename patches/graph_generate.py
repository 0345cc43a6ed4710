"""``graph_generate``: decoding a patched model whose decode step is one CUDA graph.

``generate()`` runs each decode step from Python: a few hundred eager launches per token for the
model, and HiP's host-driven decode state. Here the prompt is prefilled into a
:class:`~hip_attn.patches.cache.HiPCache` sized for the whole generation, the cache goes on the
device (:meth:`~hip_attn.patches.cache.HiPCache.enter_device`: the count of keys in use is a
device tensor, attention runs ``hip_attention(..., length=)``), and a decode step - the model's
forward, picking the token (greedy or sampled, :mod:`~hip_attn.patches.sampling`), writing it
and advancing the position - reads and writes only tensors that stay in place. On a GPU that
step is captured once in a ``torch.cuda.CUDAGraph`` and replayed per token (gpt-fast's loop);
elsewhere the same step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import signature
from typing import Any

import torch

from hip_attn.patches.sampling import NOT_GIVEN, NotGiven, Sampling
from hip_attn.validation import check_positive_int

#: RoPE types whose frequencies follow the sequence length: their forward reads it from the
#: device every step (and swaps buffers), which a CUDA graph cannot replay.
SEQUENCE_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


class DecodeStep:
    """One decode step over tensors that stay in place (what a CUDA graph captures).

    ``tokens[:, :position + 1]`` are known; :meth:`__call__` runs the model on the token at
    ``position``, writes the next token (``sampling``) at ``position + 1`` and advances
    ``position``, all on the device. In a left-padded batch sequence ``b``'s tokens start at
    ``starts[b]``, so its token at ``position`` is at position ``position - starts[b]``.

    Args:
        model: a model patched with :func:`~hip_attn.patches.patch`.
        cache: its :class:`~hip_attn.patches.cache.HiPCache` holding the tokens before
            ``position``, on the device.
        tokens: ``[B, T]`` token buffer (long), filled up to ``position``.
        position: the position of the last known token.
        sampling: how the next token is picked.
        starts: ``[B]``, each sequence's first token in a left-padded batch (long, on the
            device), or ``None``.
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokens: torch.Tensor,
        position: int,
        sampling: Sampling,
        starts: torch.Tensor | None = None,
    ) -> None:
        from hip_attn.patches.compat import cache_kwarg

        self.model, self.cache, self.tokens, self.sampling = model, cache, tokens, sampling
        self.starts = starts
        self.position = torch.tensor([position], dtype=torch.long, device=tokens.device)
        self.token = tokens[:, position : position + 1].clone()
        self._cache_kwarg = cache_kwarg(model)

    def __call__(self) -> None:
        at = self.position if self.starts is None else self.position - self.starts
        out = self.model(
            input_ids=self.token,
            position_ids=at.view(-1, 1),
            use_cache=True,
            **{self._cache_kwarg: self.cache},
        )
        token = self.sampling.next_token(out.logits[:, -1])
        self.tokens.index_copy_(1, self.position + 1, token)
        self.token.copy_(token)
        self.position += 1


def graph_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    eos_token_id: int | list[int] | None | NotGiven = NOT_GIVEN,
    pad_token_id: int | None | NotGiven = NOT_GIVEN,
    check_every: int = 32,
    do_sample: bool | None | NotGiven = NOT_GIVEN,
    temperature: float | None | NotGiven = NOT_GIVEN,
    top_k: int | None | NotGiven = NOT_GIVEN,
    top_p: float | None | NotGiven = NOT_GIVEN,
) -> torch.Tensor:
    """Greedy or sampled decoding whose decode steps replay one CUDA graph.

    Args:
        model: a causal LM patched with :func:`~hip_attn.patches.patch` (without offload),
            whose attention layers are full attention or sliding windows (not chunked).
        input_ids: the prompts, ``[B, T]`` integer tokens.
        max_new_tokens: tokens to generate per sequence.
        attention_mask: ``[B, T]``, 1 for a real token, 0 for padding, as ``generate()``
            takes it; prompts of different lengths must be left-padded (zeros first). Each
            sequence then attends its own tokens only, moved to the front of its row on the
            device and counted apart (the kernels read each sequence's count: the launches
            are those of an unpadded batch).
        cuda_graph: capture the decode step in a CUDA graph and replay it (default: when the
            model is on a CUDA device); ``False`` runs the same step eagerly.
        eos_token_id: a sequence ends after this token (or any of a list); not given: the
            model's generation config's; ``None`` (or ``None`` there): generate
            ``max_new_tokens``.
            Every ``check_every`` steps the host reads whether all sequences ended: the only
            host sync of the loop.
        pad_token_id: what follows an ended sequence (not given: the generation config's;
            ``None`` there or here: the first end token), as in ``generate()``.
        check_every: steps between the checks for the end of all sequences.
        do_sample, temperature, top_k, top_p: as ``generate()`` takes them (not given: the
            generation config's, else ``generate()``'s: greedy; when sampling, temperature 1,
            top-k 50, top-p 1; ``None``: off, i.e. greedy, temperature 1, no top-k, no
            top-p). A sample is drawn on the device from the default generator of the model's
            device (seed it with ``torch.manual_seed``); the draws differ from
            ``generate()``'s, the distribution they are drawn from does not.

    Returns:
        ``[B, T + n]``: the prompts and ``n <= max_new_tokens`` new tokens each; greedy, what
        ``model.generate(input_ids, max_new_tokens=...)`` returns.

    Raises:
        ValueError: the model is not patched, is patched with offload, has layers neither
            full attention nor a sliding window (chunked attention, ...) or a RoPE that
            depends on the sequence length (``dynamic``, ``longrope``); its generation
            config asks for a logits processor or stopping rule besides
            temperature, top-k and top-p (a repetition penalty, ``stop_strings``, ``min_p``
            when sampling, ...: :mod:`~hip_attn.patches.sampling`); ``cuda_graph=True`` off
            CUDA; ``input_ids`` not integer tokens; ``attention_mask`` not of ``input_ids``'s
            shape, not zeros and ones, or not left padding; ``max_new_tokens`` or ``check_every``
            below 1; when sampling, ``temperature <= 0``, ``top_k < 0`` or ``top_p`` outside
            ``[0, 1]``.
        TypeError: ``input_ids`` not a ``[B, T]`` tensor, ``max_new_tokens``, ``check_every``
            or ``top_k`` not an int, ``cuda_graph`` or ``do_sample`` not a bool.
    """
    from hip_attn.patches.model import is_patched, patched_with_offload

    if not is_patched(model):
        raise ValueError("graph_generate needs a model patched with hip_attn.patch(model)")
    if patched_with_offload(model):
        raise ValueError("graph_generate does not run offloaded models; patch without offload")
    rope = _rope_types(model) & SEQUENCE_DEPENDENT_ROPE
    if rope:
        raise ValueError(
            f"graph_generate cannot capture a RoPE that depends on the sequence length "
            f"(rope_type {sorted(rope)[0]!r} re-reads it every step); use model.generate()"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise TypeError(
            f"input_ids must be a [B, T] tensor, got {type(input_ids).__name__} of shape {shape}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be non-empty integer tokens, got {input_ids.dtype}")
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("check_every", check_every)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool or None, got {type(cuda_graph).__name__}")
    device = model.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device; it is on {device}")
    settings = model.generation_config
    sampling = Sampling.resolve(
        settings, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p
    )
    ends = _token_ids(settings.eos_token_id if eos_token_id is NOT_GIVEN else eos_token_id)
    pads = _token_ids(settings.pad_token_id if pad_token_id is NOT_GIVEN else pad_token_id)
    pad = (pads or ends or [0])[0]

    starts = _left_padding(attention_mask, input_ids)
    with torch.no_grad():
        step = prefill(model, input_ids.to(device), max_new_tokens, sampling, starts)
        prompt, steps, done = input_ids.shape[1], max_new_tokens - 1, 0
        run: Callable[[], None] = step
        if (device.type == "cuda" if cuda_graph is None else cuda_graph) and steps >= 2:
            run, done = capture(step), 1  # the capture's warm-up ran one step
        ends_at = torch.tensor(ends, dtype=torch.long, device=device)
        while done < steps and not _all_ended(step.tokens[:, prompt : prompt + done + 1], ends_at):
            for _ in range(min(check_every, steps - done)):
                run()
            done += min(check_every, steps - done)
        step.cache.leave_device()
    return _after_end(step.tokens[:, : prompt + done + 1], prompt, ends_at, pad)


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    starts: list[int] | None = None,
) -> DecodeStep:
    """Run the prompts through ``model`` into a :class:`~hip_attn.patches.cache.HiPCache` with
    room for ``max_new_tokens`` more, write the first new token (``sampling``; greedy by
    default) and put the cache on the device; returns the decode step that continues from
    there. ``starts``: each prompt's first real token when they are left-padded."""
    sampling = Sampling() if sampling is None else sampling
    from hip_attn.patches.cache import HiPCache, check_starts
    from hip_attn.patches.compat import cache_kwarg

    b, t = input_ids.shape
    if starts is not None:
        check_starts(starts, b, t)
        starts = starts if any(starts) else None  # unpadded: one count, one launch per layer
    cache = HiPCache(model.config, max_tokens=t + max_new_tokens)
    stuck = cache.host_only_layers()
    if stuck:
        raise ValueError(
            f"graph_generate supports full-attention and sliding-window layers; "
            f"{type(model).__name__} also has {', '.join(stuck)} (chunked attention or another "
            f"layer type): use model.generate()"
        )
    # the prompt's last logits only: all of them would be T x vocab (25 GB at 128K on SmolLM2)
    last = {"logits_to_keep": 1} if "logits_to_keep" in signature(model.forward).parameters else {}
    padded: dict[str, torch.Tensor] = {}
    if starts is not None:  # positions count from each sequence's first token, as generate()'s
        real = left_padding_mask(starts, t, input_ids.device)
        at = real.long().cumsum(dim=1) - 1
        padded = {"attention_mask": real.long(), "position_ids": at.masked_fill(~real, 1)}
    out = model(input_ids, use_cache=True, **{cache_kwarg(model): cache}, **last, **padded)
    tokens = torch.empty((b, t + max_new_tokens), dtype=torch.long, device=input_ids.device)
    tokens[:, :t] = input_ids
    tokens[:, t : t + 1] = sampling.next_token(out.logits[:, -1])
    cache.enter_device(starts)
    firsts = None if starts is None else torch.tensor(starts, device=input_ids.device)
    return DecodeStep(model, cache, tokens, t, sampling, firsts)


def capture(step: DecodeStep) -> Callable[[], None]:
    """Run ``step`` once on a side stream (the warm-up: it sets up every layer's device state
    and compiles the kernels), capture the next step in a CUDA graph and return its replay."""
    with torch.cuda.device(step.tokens.device):  # the model's GPU, whichever is current
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph.replay


def _rope_types(model: Any) -> set[str]:
    """The RoPE types of the model's rotary modules (Gemma-3 keeps one per layer type)."""
    found: set[str] = set()
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        kinds = kind.values() if isinstance(kind, dict) else [kind]
        found.update(k for k in kinds if isinstance(k, str))
    return found


def left_padding_mask(starts: list[int], tokens: int, device: torch.device) -> torch.Tensor:
    """``[B, tokens]`` booleans, ``True`` from each sequence's first token ``starts[b]`` on."""
    first = torch.tensor(starts, device=device)[:, None]
    return torch.arange(tokens, device=device)[None, :] >= first


def _left_padding(attention_mask: Any, input_ids: torch.Tensor) -> list[int] | None:
    """Each sequence's first real token from a left-padding ``attention_mask`` (``None``
    without one; :func:`prefill` takes all ``0`` as unpadded)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
            f"got {type(attention_mask).__name__} of shape {shape}"
        )
    mask = attention_mask.cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (a token) only")
    real = mask.bool()
    if not bool(real[:, -1].all() and (real[:, 1:] >= real[:, :-1]).all()):
        raise ValueError(
            "attention_mask must be left padding (each row zeros, then ones to the end): "
            "graph_generate appends every new token after the last column"
        )
    starts: list[int] = (~real).sum(dim=1).tolist()
    return starts


def _all_ended(new: torch.Tensor, ends: torch.Tensor) -> bool:
    return bool(ends.numel()) and bool(torch.isin(new, ends).any(dim=1).all())


def _after_end(tokens: torch.Tensor, prompt: int, ends: torch.Tensor, pad: int) -> torch.Tensor:
    """``pad`` after each sequence's end token; the columns after the last sequence ended go."""
    if not ends.numel():
        return tokens
    new = tokens[:, prompt:]
    ended = torch.isin(new, ends).cumsum(dim=1) > 0
    after = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
    new = new.masked_fill(after, pad)
    keep = int((~after).any(dim=0).nonzero().max()) + 1  # column 0 is never after an end
    return torch.cat([tokens[:, :prompt], new[:, :keep]], dim=1)


def _token_ids(value: Any) -> list[int]:
    """A generation setting's token ids (an id, a list of them, or ``None``)."""
    if value is None:
        return []
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    return [int(v) for v in (values if isinstance(values, list | tuple) else [values])]
