"""Tensorized attention inside a pretrained Hugging Face causal LM (needs ``transformers``).

``tensorize`` swaps the attention of a loaded model for the op, ``load_tensorized`` reloads a saved
one, the cache in ``cache`` makes generation O(sum n_j) per token, ``corpus`` packs training text,
``recipe`` continues pretraining through the one Trainer, and ``evaluation`` measures perplexity,
passkey retrieval and code retrieval; ``retrieval`` is the hop that lets each query also
attend to its top-k earlier blocks (``tensorize(model, retrieval=...)``).
"""

from .analysis import AttentionAnalysis, analyze_attention, attention_maps, plot_attention_analysis
from .cache import CausalFold
from .corpus import PackedSequences, RetrievalMix
from .evaluation import code_retrieval, fixed_span_nll, passkey_accuracy, perplexity
from .recipe import (
    FoldMix,
    StopAt,
    adaptation_config,
    causal_lm_loss,
    continue_pretraining,
    gate_optimizer,
    gate_summary,
    load_gguf_model,
    parse_folds,
    with_rope_scaling,
)
from .retrieval import RetrievalConfig, retrieval_attention
from .tensorize import TextAdapterConfig, is_tensorized, load_tensorized, tensorize, untensorize

__all__ = [
    "CausalFold",
    "TextAdapterConfig",
    "RetrievalConfig",
    "retrieval_attention",
    "tensorize",
    "untensorize",
    "is_tensorized",
    "load_tensorized",
    "perplexity",
    "fixed_span_nll",
    "passkey_accuracy",
    "code_retrieval",
    "PackedSequences",
    "RetrievalMix",
    "causal_lm_loss",
    "continue_pretraining",
    "adaptation_config",
    "FoldMix",
    "StopAt",
    "parse_folds",
    "gate_optimizer",
    "gate_summary",
    "load_gguf_model",
    "with_rope_scaling",
    "AttentionAnalysis",
    "attention_maps",
    "analyze_attention",
    "plot_attention_analysis",
]
