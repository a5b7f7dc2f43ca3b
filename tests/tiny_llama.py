"""A tiny randomly initialised Llama the text-adapter tests share (needs transformers)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 4-head (2 kv heads) Llama in eval mode, weights drawn with ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()
