"""How :func:`~hip_attn.patches.graph_generate` picks each token inside a captured decode step.

Greedy, or a sample from the model's distribution after temperature, top-k and top-p, applied
in that order as ``generate()`` applies them. Every operation has a fixed shape and the draw
reads nothing back (no ``torch.multinomial`` validation): an exponential race, the argmax of
``p_i / E_i`` with ``E_i ~ Exp(1)`` independent, picks token ``i`` with probability ``p_i``.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Any

import torch

#: ``generate()``'s values for the settings :class:`Sampling` applies, when nothing sets them.
DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
#: ... and what it makes of one passed as ``None``: that setting off (``generate(top_k=None)``
#: keeps every token; the generation config's value is not used).
OFF = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


class NotGiven(enum.Enum):
    """The default of a ``generate()``-like argument the caller did not pass, which then comes
    from the generation config (passing ``None`` means off, as in ``generate()``)."""

    NOT_GIVEN = "not given"

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    __str__ = __repr__


NOT_GIVEN = NotGiven.NOT_GIVEN

#: Generation settings that change the tokens ``generate()`` returns, greedy or sampled, with
#: their neutral values: a generation config that sets one is refused rather than ignored
#: (``generate()`` passes a decoder-only model's prompt as ``encoder_input_ids`` too, so the
#: ``encoder_*`` ones act on it).
UNSUPPORTED = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "watermarking_config": None,
    "remove_invalid_values": False,
    "stop_strings": None,
}
#: ... and those ``generate()`` applies only when it samples.
UNSUPPORTED_WHEN_SAMPLING = {
    "typical_p": 1.0,
    "min_p": 0.0,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding (``do_sample=False``) or sampling with ``temperature`` (> 0), ``top_k``
    (``0``: off) and ``top_p`` (in ``[0, 1]``; ``1``: off; ``0`` keeps the most likely token).
    As in ``generate()``, the three are checked and used only when sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(self.do_sample).__name__}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @classmethod
    def resolve(cls, settings: Any, **given: Any) -> Sampling:
        """The sampling ``generate()`` would use: the ``given`` values (:data:`NOT_GIVEN`: not
        given; ``None``: off, :data:`OFF`), else the generation config ``settings``' values,
        else ``generate()``'s defaults. Raises
        ``ValueError`` when ``settings`` asks for a logits processor or stopping rule this does
        not apply (:data:`UNSUPPORTED`; :data:`UNSUPPORTED_WHEN_SAMPLING` when sampling)."""
        values: dict[str, Any] = {}
        for name, default in DEFAULTS.items():
            value = given.get(name, NOT_GIVEN)
            if value is NOT_GIVEN:
                value = getattr(settings, name, None)
                values[name] = default if value is None else value
            else:
                values[name] = OFF[name] if value is None else value
        checked = dict(UNSUPPORTED)
        if values["do_sample"] is True:
            checked.update(UNSUPPORTED_WHEN_SAMPLING)
        for name, neutral in checked.items():
            value = getattr(settings, name, None)
            if value not in (None, neutral) and not (isinstance(value, list | tuple | dict)
                                                     and not value):  # fmt: skip
                raise ValueError(
                    f"graph_generate applies temperature, top_k and top_p only; the model's "
                    f"generation config sets {name}={value!r}: reset it "
                    f"(model.generation_config.{name} = None) or use model.generate()"
                )
        if values["do_sample"] is False:  # greedy: the config's are ignored, as generate() does
            for name in ("temperature", "top_k", "top_p"):
                if given.get(name, NOT_GIVEN) is NOT_GIVEN:
                    values[name] = DEFAULTS[name]
        return cls(**values)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` tokens from the last position's ``[B, V]`` logits."""
        if not self.do_sample:
            return logits.argmax(-1, keepdim=True)
        return draw(filtered_logits(logits, self).softmax(-1))


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """fp32 ``logits / temperature`` with the tokens top-k and then top-p drop set to
    ``-inf``: top-k keeps the ``top_k`` largest (and ties with the last), top-p the smallest
    set of most likely tokens whose probabilities reach ``top_p`` (at least one)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ascending, order = scores.sort(dim=-1)
        # a token goes when the less likely ones, itself included, hold at most 1 - top_p
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` drawn with those probabilities, as ``[B, 1]``
    long, without reading anything back (see the module's docstring)."""
    # clamped: a zero draw would turn a dropped token's 0 / 0 into a NaN that argmax picks
    race = torch.empty_like(probs).exponential_(1).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1, keepdim=True)
