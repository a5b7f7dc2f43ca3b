"""Attention layers: projections around an attention backend.

``TensorizedAttention`` and ``FullAttention`` differ only in ``_attend``, so any model can swap one
for the other and every comparison changes attention alone.
Legend: B batch, n length, D embed dim, H heads, Hkv kv heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check, check_tensor
from ..attention import check_key_padding_mask, resolve_backend, tensorized_attention
from ..core.folds import ExtrapolatingFold, FoldLike
from ..core.positional import PositionalScheme, make_positional

_DEFAULT_FOLD = ExtrapolatingFold(64)  # frozen: one shared instance is safe

__all__ = ["TensorizedAttention", "FullAttention", "full_attention"]


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense softmax attention with GQA. q (B, H, n, d), k, v (B, Hkv, n, d) -> (B, H, n, d).

    Queries with no valid key (every key masked) output zeros, as in the tensorized backends.
    """
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    n = q.shape[2]
    mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, n)
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    has_key = mask.any(-1, keepdim=True)  # (B, 1, n|1, 1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~has_key, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out * has_key


class _AttentionLayer(nn.Module):
    """q/k/v/o projections, GQA head split and dropout shared by both attention layers."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None,
        causal: bool,
        positional: str | PositionalScheme | None,
        dropout: float,
        bias: bool,
        max_len: int = 8192,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check(
            embed_dim > 0 and num_heads > 0,
            f"embed_dim and num_heads must be positive, got {embed_dim}, {num_heads}",
        )
        check(
            embed_dim % num_heads == 0,
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}",
        )
        check(
            num_kv_heads > 0 and num_heads % num_kv_heads == 0,
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}",
        )
        check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.positional = make_positional(positional, self.head_dim, max_len=max_len)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, n, D), key_padding_mask (B, n) bool (True = keep) -> (B, n, D)."""
        check_tensor("x", x, ndim=3, floating=True)
        B, n, D = x.shape
        check(
            D == self.embed_dim,
            f"x must have last dim embed_dim={self.embed_dim}, got shape {tuple(x.shape)}",
        )
        if (
            key_padding_mask is not None
        ):  # here, so FullAttention and TensorizedAttention reject the same masks
            check_key_padding_mask(key_padding_mask, B, n)
        # (B, n, H*d) -> (B, H, n, d) as strided views: the Triton backend reads them in place
        q = self.q_proj(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = self._attend(q, k, v, key_padding_mask)  # (B, H, n, d)
        out = out.transpose(1, 2).reshape(B, n, D)
        return self.dropout(self.o_proj(out))

    def _attend(self, q, k, v, key_padding_mask):
        raise NotImplementedError


class TensorizedAttention(_AttentionLayer):
    """Multi-head tensorized attention layer.

    Parameters
    ----------
    embed_dim, num_heads, num_kv_heads : width D, query heads H and kv heads Hkv (GQA; default H).
    fold : Fold, fold strategy or tuple of dims; default ``ExtrapolatingFold(64)``.
    causal : decoder (causal) attention.
    positional : "tensor_rope" (default), "rope", "sinusoidal", "learned", "none" or a scheme.
    coverage : causal coverage, "full" or "axial".
    dropout : dropout on the layer output.
    bias : bias in the projections.
    backend : "auto", "reference" or "triton".
    max_len : positions of the "learned" scheme.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        fold: FoldLike = _DEFAULT_FOLD,
        causal: bool = False,
        positional: str | PositionalScheme | None = "tensor_rope",
        coverage: str = "full",
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        max_len: int = 8192,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, num_kv_heads, causal, positional, dropout, bias, max_len
        )
        self.fold, self.coverage, self.backend = fold, coverage, backend

    def _attend(self, q, k, v, key_padding_mask):
        return tensorized_attention(
            q,
            k,
            v,
            self.fold,
            causal=self.causal,
            coverage=self.coverage,
            positional=self.positional,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        device = self.q_proj.weight.device
        return (
            f"fold={self.fold!r}, causal={self.causal}, coverage={self.coverage}, "
            f"backend={resolve_backend(self.backend, device)}"
        )


class FullAttention(_AttentionLayer):
    """Dense attention with the same interface as ``TensorizedAttention`` (baselines).

    ``fold``, ``coverage`` and ``backend`` are accepted and ignored so configs swap freely;
    the positional default is global "rope".
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        fold: FoldLike | None = None,
        causal: bool = False,
        positional: str | PositionalScheme | None = "rope",
        coverage: str = "full",
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        max_len: int = 8192,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, num_kv_heads, causal, positional, dropout, bias, max_len
        )
        check(
            self.positional is None or not self.positional.per_hop,
            "FullAttention has no hops: use a global positional scheme ('rope', 'sinusoidal', "
            "'learned', 'none')",
        )

    def _attend(self, q, k, v, key_padding_mask):
        if self.positional is not None:
            q, k = self.positional.apply(q, k)
        return full_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
