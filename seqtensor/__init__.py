"""seqtensor: tensorized attention for long sequences."""

from .attention import attention_matrix, available_backends, resolve_backend, tensorized_attention
from .folds import BalancedFold, BlockFold, ExtrapolatingFold, FixedFold, Fold, resolve_fold
from .adapters import Forecaster
from .baselines import DLinearForecaster
from .estimators import SequenceClassifier, SequenceRegressor
from .trainer import Callback, Trainer, TrainerConfig
from .positional import Learned, RoPE, Sinusoidal, TensorRoPE
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

__all__ = [
    "Fold",
    "FixedFold",
    "BalancedFold",
    "BlockFold",
    "ExtrapolatingFold",
    "resolve_fold",
    "tensorized_attention",
    "attention_matrix",
    "resolve_backend",
    "available_backends",
    "TensorRoPE",
    "RoPE",
    "Sinusoidal",
    "Learned",
    "TensorizedAttention",
    "FullAttention",
    "ModelConfig",
    "Encoder",
    "Decoder",
    "EncoderDecoder",
    "SequenceHead",
    "TokenHead",
    "LanguageModel",
    "Trainer",
    "TrainerConfig",
    "Callback",
    "SequenceClassifier",
    "SequenceRegressor",
    "Forecaster",
    "DLinearForecaster",
]
