"""seqtensor: tensorized attention for long sequences."""

from .folds import BalancedFold, BlockFold, ExtrapolatingFold, FixedFold, Fold, resolve_fold
from .positional import Learned, RoPE, Sinusoidal, TensorRoPE
from .attention import attention_matrix, available_backends, resolve_backend, tensorized_attention
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
from .trainer import Callback, Trainer, TrainerConfig
from .estimators import SequenceClassifier, SequenceRegressor
from .adapters import Forecaster
from .baselines import DLinearForecaster
from .evaluation import passkey_accuracy, perplexity

# The text adapter needs transformers: import it on first use so `import seqtensor` stays light.
_TEXT_ADAPTER = ("CausalFold", "tensorize", "untensorize", "load_tensorized")


def __getattr__(name: str):
    if name in _TEXT_ADAPTER:
        from .adapters import text

        return getattr(text, name)
    raise AttributeError(f"module 'seqtensor' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy text-adapter names too (tab completion, help)
    return sorted(set(globals()) | set(_TEXT_ADAPTER))


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
    "perplexity",
    "passkey_accuracy",
]
