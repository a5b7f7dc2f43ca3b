"""seqtensor: tensorized attention for long sequences."""

from .attention import attention_matrix, available_backends, resolve_backend, tensorized_attention
from .core.folds import BalancedFold, BlockFold, ExtrapolatingFold, FixedFold, Fold, resolve_fold
from .core.positional import Learned, RoPE, Sinusoidal, TensorRoPE
from .nn import (
    Decoder,
    Encoder,
    EncoderDecoder,
    FullAttention,
    LanguageModel,
    ModelConfig,
    SequenceHead,
    TensorizedAttention,
    TokenHead,
)
from .train import Callback, Trainer, TrainerConfig

# The adapters load scikit-learn, pandas or transformers: import each on first use so that
# `import seqtensor` costs only torch for a user of the op or the stack.
_LAZY = {
    "SequenceClassifier": "adapters.estimators",
    "SequenceRegressor": "adapters.estimators",
    "Forecaster": "adapters.forecast",
    "DLinearForecaster": "adapters.forecast",
    "CausalFold": "adapters.text",
    "tensorize": "adapters.text",
    "untensorize": "adapters.text",
    "load_tensorized": "adapters.text",
    "perplexity": "adapters.text",
    "passkey_accuracy": "adapters.text",
    "RetrievalConfig": "adapters.text",
    "TextAdapterConfig": "adapters.text",
    "AttentionAnalysis": "adapters.text",
    "attention_maps": "adapters.text",
    "analyze_attention": "adapters.text",
    "plot_attention_analysis": "adapters.text",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'seqtensor' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too (tab completion, help)
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # folds and positions
    "Fold",
    "FixedFold",
    "BalancedFold",
    "BlockFold",
    "ExtrapolatingFold",
    "resolve_fold",
    "TensorRoPE",
    "RoPE",
    "Sinusoidal",
    "Learned",
    # the op
    "tensorized_attention",
    "attention_matrix",
    "resolve_backend",
    "available_backends",
    # modules
    "TensorizedAttention",
    "FullAttention",
    "ModelConfig",
    "Encoder",
    "Decoder",
    "EncoderDecoder",
    "SequenceHead",
    "TokenHead",
    "LanguageModel",
    # training and estimators
    "Trainer",
    "TrainerConfig",
    "Callback",
    "SequenceClassifier",
    "SequenceRegressor",
    "Forecaster",
    "DLinearForecaster",
    # text
    "CausalFold",
    "tensorize",
    "untensorize",
    "load_tensorized",
    "TextAdapterConfig",
    "RetrievalConfig",
    "perplexity",
    "passkey_accuracy",
]
