"""Accuracy harness: how much of dense attention does a block selection keep?

* :mod:`hip_attn.accuracy.synthetic`: attention inputs with sinks, recency, topic drift and
  planted spans;
* :mod:`hip_attn.accuracy.methods`: HiP and the baselines (sink + window, Quest-like min/max
  bounds, the oracle, dense) as block selections in :func:`hip_attn.estimate_mask`'s format;
* :mod:`hip_attn.accuracy.metrics`: attention-mass recall, span recall, output error, keys read;
* :mod:`hip_attn.accuracy.harness`: ``hip-attn accuracy`` (:func:`run_accuracy`);
* :mod:`hip_attn.accuracy.model_eval`: ``hip-attn eval``, passkey retrieval and perplexity of a
  Hugging Face model (:func:`run_eval`).

Importing this package does not import torch (the ``hip-attn`` command line stays light); the
names below load their module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hip_attn.accuracy.harness import format_table, run_accuracy
    from hip_attn.accuracy.methods import METHODS
    from hip_attn.accuracy.model_eval import format_eval, run_eval
    from hip_attn.accuracy.synthetic import make_inputs

__all__ = ["METHODS", "format_eval", "format_table", "make_inputs", "run_accuracy", "run_eval"]

_LAZY = {
    "METHODS": "hip_attn.accuracy.methods",
    "format_eval": "hip_attn.accuracy.model_eval",
    "format_table": "hip_attn.accuracy.harness",
    "make_inputs": "hip_attn.accuracy.synthetic",
    "run_accuracy": "hip_attn.accuracy.harness",
    "run_eval": "hip_attn.accuracy.model_eval",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hip_attn.accuracy' has no attribute {name!r}")
