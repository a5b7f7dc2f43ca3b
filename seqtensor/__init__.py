"""seqtensor: tensorized attention for long sequences."""

from .attention import attention_matrix, available_backends, resolve_backend, tensorized_attention
from .folds import BalancedFold, BlockFold, ExtrapolatingFold, FixedFold, Fold, resolve_fold
from .positional import RoPE, Sinusoidal, Learned, TensorRoPE

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
]
