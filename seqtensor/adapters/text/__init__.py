"""Tensorized attention inside a pretrained Hugging Face causal LM (needs ``transformers``).

``tensorize`` swaps the attention of a loaded model for the op, ``load_tensorized`` reloads a saved
one, the cache in ``cache`` makes generation O(sum n_j) per token, and ``evaluation`` measures
perplexity and passkey retrieval.
"""

from .cache import CausalFold
from .evaluation import passkey_accuracy, perplexity
from .tensorize import TextAdapterConfig, is_tensorized, load_tensorized, tensorize, untensorize

__all__ = [
    "CausalFold",
    "TextAdapterConfig",
    "tensorize",
    "untensorize",
    "is_tensorized",
    "load_tensorized",
    "perplexity",
    "passkey_accuracy",
]
