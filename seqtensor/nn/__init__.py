"""Neural-network modules: attention layers, blocks, stacks and heads."""

from .attention import FullAttention, TensorizedAttention, full_attention
from .config import ModelConfig
from .layers import Block, CrossAttention, SwiGLU
from .stack import Decoder, Encoder, EncoderDecoder, LanguageModel, SequenceHead, TokenHead

__all__ = [
    "TensorizedAttention",
    "FullAttention",
    "full_attention",
    "ModelConfig",
    "Block",
    "CrossAttention",
    "SwiGLU",
    "Encoder",
    "Decoder",
    "EncoderDecoder",
    "SequenceHead",
    "TokenHead",
    "LanguageModel",
]
