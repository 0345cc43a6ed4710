"""Tiny Llama models with random weights: what the demo, ``hip-attn eval --random`` and the tests
run when no checkpoint can be loaded."""

from __future__ import annotations

from typing import Any


def random_llama(
    seed: int,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    max_positions: int = 1 << 20,
) -> Any:
    """A ``LlamaForCausalLM`` with random weights seeded by ``seed`` (intermediate size
    ``2 * hidden``, head dim ``hidden // heads``), in fp32 on the CPU, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
