"""One place for argument checks, so every user error names the argument and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def check(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    floating: bool = False,
    finite: bool = False,
) -> torch.Tensor:
    """Check type, rank, dtype kind and (optionally) finiteness of a tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x
