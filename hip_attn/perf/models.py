"""Transformer shapes the model needs: presets and a reader for Hugging Face ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama-style: GQA attention, optionally gated MLP).

    Attributes:
        name: preset name or the source of the config.
        layers: decoder layers.
        hidden: hidden size (model width).
        heads: query heads (``Hq``).
        kv_heads: key/value heads (``Hkv``); ``heads`` for plain multi-head attention.
        head_dim: per-head dimension (``D``).
        intermediate: MLP inner size.
        vocab: vocabulary size.
        tied_embeddings: the LM head shares the input embedding matrix.
        gated_mlp: the MLP has three matrices (gate, up, down) rather than two.
        max_context: trained context length, for information only.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    max_context: int | None = None

    def __post_init__(self) -> None:
        for field_name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {field_name} must be a positive int, got {value!r}")
        if not isinstance(self.vocab, int) or self.vocab < 1:
            raise ValueError(f"model vocab must be a positive int, got {self.vocab!r}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"model heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )

    @property
    def attention_params_per_layer(self) -> int:
        """q, k, v and o projection weights of one layer."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden

    @property
    def mlp_params_per_layer(self) -> int:
        """MLP weights of one layer (3 matrices when gated, else 2)."""
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def matmul_params(self) -> int:
        """``P_mm``: weights of every per-token matmul in the decoder stack."""
        return self.layers * (self.attention_params_per_layer + self.mlp_params_per_layer)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding weights stored besides the LM head (0 when tied)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        """RMSNorm weights: two per layer plus the final one."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        """Every stored weight (biases, if any, are ignored)."""
        return self.matmul_params + self.lm_head_params + self.embedding_params + self.norm_params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            matmul_params=self.matmul_params,
            lm_head_params=self.lm_head_params,
            total_params=self.total_params,
        )
        return data


MODEL_PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # Numbers from each model's published config.json.
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, False, True, 131072),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256, False, True, 131072),
        ModelSpec("yi-34b", 60, 7168, 56, 8, 128, 20480, 64000, False, True, 4096),
        ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, False, True, 131072),
        ModelSpec("mistral-7b-v0.3", 32, 4096, 32, 8, 128, 14336, 32768, False, True, 32768),
    )
}
_ALIASES = {"mistral-7b": "mistral-7b-v0.3"}

# model_type values whose MLP has two matrices (up, down) instead of three.
_UNGATED = {
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "bloom",
    "falcon",
    "phi",
    "starcoder2",
    "gpt_bigcode",
}
# model_type values whose configs default to untied embeddings when the key is absent.
_UNTIED_BY_DEFAULT = {"llama", "mistral", "qwen2", "qwen3", "yi", "mixtral", "internlm2"}


def get_model(name: str) -> ModelSpec:
    """The preset called ``name`` (case-insensitive; ``mistral-7b`` is an alias).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[key]


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def model_from_hf_config(config: Mapping[str, Any], name: str = "config.json") -> ModelSpec:
    """Build a :class:`ModelSpec` from the fields of a Hugging Face ``config.json``.

    Reads layers, hidden size, heads, KV heads (default: heads, i.e. MHA), head dim (default
    hidden / heads), intermediate size (default 4 x hidden), vocab and ``tie_word_embeddings``.
    A multimodal config's ``text_config`` is used when present.

    Raises:
        ValueError: a required field is missing, or the config is a mixture of experts.
    """
    if isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}
    if _first(config, "num_local_experts", "num_experts", "n_routed_experts"):
        raise ValueError(f"{name}: mixture-of-experts configs are not supported by this model")
    model_type = str(config.get("model_type", "")).lower()
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _first(config, "vocab_size")
    missing = [
        key
        for key, value in (
            ("num_hidden_layers", layers),
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
            ("vocab_size", vocab),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"{name}: missing field(s) {', '.join(missing)}")
    kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", "multi_query_group_num")
    head_dim = _first(config, "head_dim")
    intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim")
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT
    max_context = _first(config, "max_position_embeddings", "n_positions")
    try:
        return ModelSpec(
            name=name,
            layers=int(layers),
            hidden=int(hidden),
            heads=int(heads),
            kv_heads=int(kv_heads) if kv_heads is not None else int(heads),
            head_dim=int(head_dim) if head_dim is not None else int(hidden) // int(heads),
            intermediate=int(intermediate) if intermediate is not None else 4 * int(hidden),
            vocab=int(vocab),
            tied_embeddings=bool(tied),
            gated_mlp=model_type not in _UNGATED,
            max_context=int(max_context) if max_context is not None else None,
        )
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise ValueError(f"{name}: {exc!r} (every size must be a positive whole number)") from exc


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` file into a :class:`ModelSpec`.

    Raises:
        ValueError: unreadable file, not a JSON object, or missing fields.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"model config {str(path)!r} must hold a JSON object")
    return model_from_hf_config(data, name=str(data.get("_name_or_path") or path))
