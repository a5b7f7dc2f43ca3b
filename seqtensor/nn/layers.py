"""Transformer building blocks: SwiGLU MLP, cross-attention, and the pre-norm block.

Legend: B batch, n length, m memory length, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import FullAttention, TensorizedAttention, full_attention
from .config import ModelConfig

__all__ = ["SwiGLU", "CrossAttention", "Block", "make_self_attention"]


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) * W_up x)`` (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=bias)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CrossAttention(nn.Module):
    """Queries from x (B, n, D) attend to encoder memory (B, m, D) densely (memory is short)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, n, D = x.shape
        q = self.q_proj(x).view(B, n, self.n_heads, -1).transpose(1, 2)  # (B, H, n, d)
        k, v = (
            self.kv_proj(memory)
            .view(B, memory.shape[1], 2, self.n_heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        if memory_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = full_attention(q, k, v, key_padding_mask=memory_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, D))


def make_self_attention(config: ModelConfig, causal: bool) -> nn.Module:
    """The self-attention layer a config asks for; tensorized and full differ only in class."""
    layer = TensorizedAttention if config.attention == "tensorized" else FullAttention
    attn = layer(
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        fold=config.fold,
        causal=causal,
        positional=config.attention_positional(),
        coverage=config.coverage,
        dropout=config.dropout,
        bias=config.bias,
        backend=config.backend,
        max_len=config.max_len,
    )
    return attn


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross(norm(x), memory)] + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = make_self_attention(config, causal)
        self.cross_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps) if cross else None
        self.cross = CrossAttention(config.d_model, config.n_heads, config.bias) if cross else None
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), key_padding_mask)
        if self.cross is not None:
            x = x + self.dropout(self.cross(self.cross_norm(x), memory, memory_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
