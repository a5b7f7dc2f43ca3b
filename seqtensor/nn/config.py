"""``ModelConfig``: one object that describes a model and round-trips through a plain dict /
JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._validation import check, check_choice, check_int, check_real
from ..core.folds import ExtrapolatingFold, FoldLike, fold_from_dict, fold_to_dict
from ..core.plan import COVERAGES
from ..core.positional import POSITIONAL_CHOICES
from ..kernels.registry import BACKEND_CHOICES

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """Transformer stack settings shared by encoders, decoders and every adapter."""

    d_model: int = 128  # width D
    n_layers: int = 2  # number of blocks
    n_heads: int = 4  # query heads H
    n_kv_heads: int | None = None  # kv heads Hkv (GQA); None = n_heads
    mlp_ratio: float = (
        8 / 3
    )  # SwiGLU hidden width / d_model (8/3 keeps params equal to a 4x GELU MLP)
    dropout: float = 0.0  # dropout on attention and MLP outputs
    attention: str = "tensorized"  # "tensorized" or "full": the only switch a comparison flips
    fold: FoldLike = field(
        default_factory=lambda: ExtrapolatingFold(64)
    )  # fold strategy for tensorized attention
    positional: str = (
        "tensor_rope"  # per-hop "tensor_rope", or global "rope" / "sinusoidal" / "learned" / "none"
    )
    coverage: str = "full"  # causal coverage: "full" or "axial"
    backend: str = "auto"  # "auto" (Triton on CUDA), "reference", "triton"
    bias: bool = False  # bias in linear layers
    norm_eps: float = 1e-6  # RMSNorm epsilon
    max_len: int = 8192  # positions for the "learned" scheme
    gradient_checkpointing: bool = False  # recompute blocks in backward to save memory

    def __post_init__(self) -> None:
        # numpy integers (e.g. from a parameter grid) become Python ints, so configs stay JSON-able
        self.d_model = check_int("d_model", self.d_model, low=1)
        self.n_layers = check_int("n_layers", self.n_layers, low=1)
        self.n_heads = check_int("n_heads", self.n_heads, low=1)
        self.max_len = check_int("max_len", self.max_len, low=1)
        if self.n_kv_heads is not None:
            self.n_kv_heads = check_int("n_kv_heads", self.n_kv_heads, low=1)
        self.mlp_ratio = check_real("mlp_ratio", self.mlp_ratio, low=0.0, open_low=True)
        self.dropout = check_real("dropout", self.dropout, low=0.0)
        check(
            self.d_model % self.n_heads == 0,
            f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        check_choice("attention", self.attention, ("tensorized", "full"))
        check_choice("coverage", self.coverage, COVERAGES)
        check_choice("positional", self.positional, POSITIONAL_CHOICES)
        check_choice("backend", self.backend, BACKEND_CHOICES)
        check(
            self.n_kv_heads is None
            or (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0),
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        check(self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.fold, list):
            self.fold = tuple(self.fold)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: mlp_ratio * d_model rounded up to a multiple of 16, because odd
        widths
        (171 for d_model 64) make CPU matrix multiplies up to 2x slower."""
        return 16 * math.ceil(self.mlp_ratio * self.d_model / 16)

    def attention_positional(self) -> str:
        """Full attention has no hops: tensor_rope becomes global rope there."""
        return (
            "rope"
            if self.attention == "full" and self.positional == "tensor_rope"
            else self.positional
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fold"] = fold_to_dict(self.fold)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        check(not unknown, f"unknown ModelConfig fields: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("fold"), dict):
            data["fold"] = fold_from_dict(data["fold"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
