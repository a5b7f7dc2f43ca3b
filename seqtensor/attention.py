"""The op: ``tensorized_attention`` and ``attention_matrix``: argument checks, then dispatch to a kernel.

Legend: B batch, H query heads, Hkv kv heads, n length, d head dim, m fold order.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ._validation import check, check_choice, check_tensor
from .core.folds import FoldLike, resolve_fold
from .core.positional import PositionalScheme, make_positional
from .kernels.reference import kronecker_attention_reference
from .kernels.registry import available_backends, get_backend, resolve_backend

__all__ = [
    "tensorized_attention",
    "attention_matrix",
    "resolve_backend",
    "available_backends",
]


def _validate_qkv(q, k, v, key_padding_mask, validate_values: bool):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4, floating=True, finite=validate_values)
    check(
        q.dtype == k.dtype == v.dtype,
        f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
        TypeError,
    )
    check(
        q.device == k.device == v.device,
        f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}",
    )
    B, H, n, d = q.shape
    check(n > 0, f"sequence length must be positive, got q of shape {tuple(q.shape)}")
    check(
        H > 0 and d > 0 and v.shape[3] > 0,
        f"heads and head dims must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}",
    )
    check(
        k.shape[0] == B and k.shape[2] == n and k.shape[3] == d,
        f"k must have shape (B={B}, H_kv, n={n}, d={d}), got {tuple(k.shape)}",
    )
    check(
        k.shape[:3] == v.shape[:3],
        f"v must have shape (B, H_kv, n, dv) like k {tuple(k.shape)}, got {tuple(v.shape)}",
    )
    check(
        k.shape[1] > 0 and H % k.shape[1] == 0,
        f"query heads H={H} must be a multiple of kv heads H_kv={k.shape[1]}",
    )
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, B, n)


def check_key_padding_mask(mask: torch.Tensor, B: int, n: int) -> None:
    """A (B, n) bool key padding mask (True = keep), or a named error."""
    check_tensor("key_padding_mask", mask, ndim=2)
    check(
        tuple(mask.shape) == (B, n),
        f"key_padding_mask must have shape (B={B}, n={n}), got {tuple(mask.shape)}",
    )
    check(
        mask.dtype == torch.bool,
        f"key_padding_mask must be bool (True = keep), got {mask.dtype}",
        TypeError,
    )


def _resolve_hop_order(
    hop_order: Sequence[int] | None, m: int, causal: bool, coverage: str
) -> tuple[int, ...]:
    default = tuple(range(m - 1, -1, -1))
    if hop_order is None:
        return default
    check(
        not isinstance(hop_order, str)
        and all(isinstance(j, numbers.Integral) and not isinstance(j, bool) for j in hop_order),
        f"hop_order must be a sequence of int dims, got {hop_order!r}",
        TypeError,
    )
    order = tuple(int(j) for j in hop_order)
    check(
        sorted(order) == list(range(m)),
        f"hop_order must be a permutation of dims 0..{m - 1}, got {tuple(hop_order)}",
    )
    # Only finest-to-coarsest keeps summary tokens in the past: other orders would leak the future.
    check(
        not (causal and coverage == "full") or order == default,
        f"causal coverage='full' needs hop_order finest to coarsest {default}, got {order}; use coverage='axial'",
    )
    return order


def _prepare_call(
    q, k, v, fold, causal, coverage, mode, positional, key_padding_mask, hop_order, validate_values
):
    _validate_qkv(q, k, v, key_padding_mask, validate_values)
    check(
        causal in (True, False) and not isinstance(causal, str),
        f"causal must be a bool, got {causal!r}",
        TypeError,
    )
    check_choice("coverage", coverage, ("full", "axial"))
    check_choice("mode", mode, ("fibre", "kronecker"))
    n, d = q.shape[2], q.shape[3]
    fold = resolve_fold(fold, n)
    check(
        positional != "learned",
        "positional='learned' has parameters, which a function call would draw afresh each time: build "
        "seqtensor.core.positional.Learned(max_len, d) once (trained with the model) and pass it",
    )
    if isinstance(positional, str) or positional is None:
        positional = make_positional(positional, d, max_len=fold.size)
    check(
        positional is None or isinstance(positional, PositionalScheme),
        f"positional must be a name or a PositionalScheme, got {positional!r}",
        TypeError,
    )
    dim = None if positional is None else positional.dim
    check(
        dim is None or dim == d,
        f"{type(positional).__name__} was built for head dim {dim}, but q has head dim {d}",
    )
    hop_positional = positional if positional is not None and positional.per_hop else None
    if positional is not None and not positional.per_hop:
        q, k = positional.apply(q, k)
    if mode == "kronecker":
        check(
            not causal, "mode='kronecker' is non-causal only; use mode='fibre' for causal attention"
        )
        check(
            fold.size == n and key_padding_mask is None,
            f"mode='kronecker' needs a fold without padding (prod(dims)={fold.size}, n={n}) and no key_padding_mask",
        )
    hop_order = _resolve_hop_order(hop_order, fold.order, causal, coverage)
    return q, k, fold, hop_positional, hop_order


def tensorized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fold: FoldLike,
    *,
    causal: bool = False,
    coverage: str = "full",
    mode: str = "fibre",
    positional: str | PositionalScheme | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    hop_order: Sequence[int] | None = None,
    backend: str = "auto",
    validate_values: bool = True,
    hop_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-hop attention over a folded sequence.

    Parameters
    ----------
    q : (B, H, n, d) queries; k, v : (B, Hkv, n, d) with H % Hkv == 0 (GQA).
    fold : a Fold, a fold strategy (callable n -> Fold) or a tuple of dims covering n.
    causal : causal (decoder) attention; ``coverage`` "full" (default, reaches every earlier token
        through summary tokens) or "axial" (fibres only).
    mode : "fibre" (the default) or "kronecker" (non-causal, no padding).
    positional : None / "none", "tensor_rope" (per hop), "rope", "sinusoidal", "learned", or a
        ``PositionalScheme``.
    key_padding_mask : (B, n) bool, True for tokens to keep.
    scale : logit scale, default 1/sqrt(d).
    hop_order : dims to hop along, 0-based (0 = coarsest); default finest to coarsest.
    backend : "auto" (Triton on CUDA, reference elsewhere), "reference" or "triton".
    validate_values : check q, k, v for NaN/inf (one reduction; turn off inside trusted models).
    hop_gates : optional (H, m - 1) values in [0, 1], an extension of SPEC's hop (fibre mode): the
        i-th hop after the first updates ``V <- V + g[:, i] * (hop(V) - V)`` instead of
        ``V <- hop(V)``, so a model can keep its local (first-hop) result and take only part of the
        coarser mixtures. All ones is the plain method. Differentiable (gates too), both backends.

    Returns
    -------
    (B, H, n, d) tensor. Outputs at masked positions are relays, not meaningful results.
    """
    q_in = q
    q, k, fold, hop_positional, hop_order = _prepare_call(
        q,
        k,
        v,
        fold,
        causal,
        coverage,
        mode,
        positional,
        key_padding_mask,
        hop_order,
        validate_values,
    )
    if hop_gates is not None:
        check(mode == "fibre", "hop_gates apply to mode='fibre' only")
        _check_hop_gates(hop_gates, q, fold.order, values=validate_values)
    if mode == "kronecker":
        return kronecker_attention_reference(
            q, k, v, fold.dims, scale=scale, hop_positional=hop_positional
        )
    if q.shape[0] == 0:  # an empty batch, as SDPA allows
        return v.new_empty(0, q.shape[1], q.shape[2], v.shape[3])
    fn = get_backend(resolve_backend(backend, q_in.device))
    gated = (
        {} if hop_gates is None else {"hop_gates": hop_gates}
    )  # backends registered without gates still work
    return fn(
        q,
        k,
        v,
        fold.dims,
        q.shape[2],
        causal=causal,
        coverage=coverage,
        hop_order=hop_order,
        scale=scale,
        hop_positional=hop_positional,
        key_padding_mask=key_padding_mask,
        **gated,
    )


def _check_hop_gates(gates: torch.Tensor, q: torch.Tensor, m: int, values: bool = True) -> None:
    """(H, m - 1) floating gates in [0, 1] on q's device (the range read only with ``values``: a device
    sync), or a named error."""
    check_tensor("hop_gates", gates, ndim=2, floating=True)
    H = q.shape[1]
    check(
        tuple(gates.shape) == (H, m - 1),
        f"hop_gates must have shape (H={H}, m-1={m - 1}), got {tuple(gates.shape)}",
    )
    check(gates.device == q.device, f"hop_gates are on {gates.device} but q is on {q.device}")
    check(
        not values or bool(((gates >= 0) & (gates <= 1)).all()),
        "hop_gates must lie in [0, 1] (e.g. a sigmoid of learned logits); NaN is not a gate",
    )


def attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    fold: FoldLike,
    *,
    causal: bool = False,
    coverage: str = "full",
    mode: str = "fibre",
    positional: str | PositionalScheme | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    hop_order: Sequence[int] | None = None,
    backend: str = "reference",
    hop_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The effective (B, H, n, n) matrix M of the whole multi-hop process, for small n.

    Every hop is linear in V, so ``tensorized_attention(q, k, v, ...) == M @ v``. Computed by
    pushing the identity through the hops as the value tensor.
    """
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    B, n = q.shape[0], q.shape[2]
    check(n <= 8192, f"attention_matrix builds an n x n matrix; n={n} is too large (max 8192)")
    eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(B, k.shape[1], n, n)
    return tensorized_attention(
        q,
        k,
        eye,
        fold,
        causal=causal,
        coverage=coverage,
        mode=mode,
        positional=positional,
        key_padding_mask=key_padding_mask,
        scale=scale,
        hop_order=hop_order,
        backend="reference" if backend == "auto" else backend,
        hop_gates=hop_gates,
    )
