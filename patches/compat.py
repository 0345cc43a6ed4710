"""Where transformers keeps the cache, across the releases hip_attn supports (5.17 and newer).

transformers 5.24 renamed the cache keyword of ``forward``/``generate`` and the generation
output's field from ``past_key_values`` to ``cache`` (the old name still works there, with a
FutureWarning). Nothing in hip_attn spells either name but this module: the attention hooks find
the cache by its type, and everything that passes or reads one asks these helpers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache

_NAMES = ("cache", "past_key_values")  # newest first


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` (and ``generate``) take the cache."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in _NAMES if n in params), "past_key_values")


def find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cache | None:
    """The cache among a module call's arguments, whatever keyword carries it."""
    return next((a for a in (*kwargs.values(), *args) if isinstance(a, Cache)), None)


def given_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a caller passed to ``generate`` under either name."""
    return next((kwargs[n] for n in _NAMES if kwargs.get(n) is not None), None)


def output_cache(output: Any) -> Cache | None:
    """The cache of a ``generate(..., return_dict_in_generate=True)`` or ``forward`` output."""
    fields = output.keys() if hasattr(output, "keys") else ()
    return next((output[n] for n in _NAMES if n in fields), None)
