"""Stacks of blocks (encoder, decoder, encoder-decoder) and task heads.

Legend: B batch, n length, m memory length, D width, V vocabulary, C outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._validation import check, check_choice
from .config import ModelConfig
from .layers import Block

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "SequenceHead", "TokenHead", "LanguageModel"]


class _Stack(nn.Module):
    def __init__(self, config: ModelConfig, causal: bool, cross: bool) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config, causal, cross) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def forward(self, x, key_padding_mask=None, memory=None, memory_mask=None):
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_padding_mask, memory, memory_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask, memory, memory_mask)
        return self.norm(x)


class Encoder(_Stack):
    """Bidirectional stack. forward(x (B, n, D), key_padding_mask (B, n) | None) -> (B, n, D)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, causal=False, cross=False)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(x, key_padding_mask)


class Decoder(_Stack):
    """Causal stack, optionally cross-attending to encoder memory (B, m, D)."""

    def __init__(self, config: ModelConfig, cross: bool = False) -> None:
        super().__init__(config, causal=True, cross=cross)

    def forward(self, x, key_padding_mask=None, memory=None, memory_mask=None) -> torch.Tensor:
        check(
            (memory is not None) == (self.blocks[0].cross is not None),
            "memory must be given exactly when the decoder was built with cross=True",
        )
        return super().forward(x, key_padding_mask, memory, memory_mask)


class EncoderDecoder(nn.Module):
    """Encoder over the source, causal decoder with cross-attention over the encoder output."""

    def __init__(self, config: ModelConfig, decoder_config: ModelConfig | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(decoder_config or config, cross=True)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None) -> torch.Tensor:
        """src (B, m, D), tgt (B, n, D) -> (B, n, D)."""
        memory = self.encoder(src, src_mask)
        return self.decoder(tgt, tgt_mask, memory, src_mask)


class SequenceHead(nn.Module):
    """Pool a sequence (B, n, D) to (B, C): pooling "mean", "max", "last" or "first"; masks
    honoured."""

    def __init__(self, d_model: int, out_dim: int, pooling: str = "mean") -> None:
        super().__init__()
        check_choice("pooling", pooling, ("mean", "max", "last", "first"))
        self.pooling = pooling
        self.proj = nn.Linear(d_model, out_dim)

    def forward(
        self, h: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, n, _ = h.shape
        keep = (
            torch.ones(B, n, dtype=torch.bool, device=h.device)
            if key_padding_mask is None
            else key_padding_mask
        )
        if self.pooling == "mean":
            w = keep.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        elif self.pooling == "max":
            pooled = h.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
        else:
            positions = torch.arange(n, device=h.device).expand(B, n)
            if self.pooling == "last":
                idx = positions.masked_fill(~keep, -1).amax(1).clamp_min(0)
            else:
                idx = positions.masked_fill(~keep, n).amin(1).clamp_max(n - 1)
            pooled = h[torch.arange(B, device=h.device), idx]
        return self.proj(pooled)


class TokenHead(nn.Module):
    """Per-token projection (B, n, D) -> (B, n, C): per-step regression or token classification."""

    def __init__(self, d_model: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class LanguageModel(nn.Module):
    """Token embedding, causal decoder and LM head (optionally tied). forward(ids (B, n)) -> logits
    (B, n, V)."""

    def __init__(self, config: ModelConfig, vocab_size: int, tie_embeddings: bool = True) -> None:
        super().__init__()
        check(vocab_size > 0, f"vocab_size must be positive, got {vocab_size}")
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(
        self, ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check(
            ids.ndim == 2 and not ids.is_floating_point(),
            f"ids must be (B, n) integer tokens, got {tuple(ids.shape)} {ids.dtype}",
        )
        return self.lm_head(self.decoder(self.embed(ids), key_padding_mask))
