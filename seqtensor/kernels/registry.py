"""The one registry of fibre-attention backends; every list of allowed backend names reads it.

A backend is a function with the signature of ``reference.fibre_attention_reference``. The
reference is always there; the Triton backend is imported on first use so that machines without
Triton never import it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validation import check, check_choice
from .reference import fibre_attention_reference

__all__ = [
    "BACKEND_CHOICES",
    "register_backend",
    "get_backend",
    "available_backends",
    "resolve_backend",
]

_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": fibre_attention_reference}

# What a user may pass as ``backend=``: "auto" plus every backend this package ships, whether or
# not it can run on this machine (``resolve_backend`` says so with a clear error).
BACKEND_CHOICES = ("auto", "reference", "triton")


def register_backend(name: str, fn: Callable[..., torch.Tensor]) -> None:
    """Register a fibre-attention backend with the signature of ``fibre_attention_reference``."""
    _BACKENDS[name] = fn


def _load_triton() -> bool:
    if "triton" not in _BACKENDS:
        try:
            from .triton_hops import tensorized_fibre_attention
        except ImportError:
            return False
        register_backend("triton", tensorized_fibre_attention)
    return "triton" in _BACKENDS


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    _load_triton()
    return sorted(_BACKENDS)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend ``backend`` means on ``device``: "auto" is Triton on CUDA, the reference
    elsewhere."""
    device = torch.device(device)
    check_choice("backend", backend, (*BACKEND_CHOICES, *_BACKENDS))
    if backend == "auto":
        return "triton" if device.type == "cuda" and _load_triton() else "reference"
    if backend == "triton":
        check(
            _load_triton(),
            "backend='triton' needs the triton package (pip install triton)",
            ImportError,
        )
    return backend


def get_backend(name: str) -> Callable[..., torch.Tensor]:
    """The fibre-attention function registered as ``name`` (after ``resolve_backend``)."""
    return _BACKENDS[name]
