"""The op: ``tensorized_attention`` and ``attention_matrix``: argument checks, then dispatch to a
kernel.

Legend: B batch, H query heads, Hkv kv heads, n length, d head dim, m fold order.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Sequence

import torch

from ._validation import check, check_choice, check_tensor
from .core.folds import FoldLike, resolve_fold
from .core.plan import COVERAGES, MODES, HopPlan, hop_plan
from .core.positional import PositionalScheme, make_positional
from .kernels.reference import kronecker_attention_reference
from .kernels.registry import available_backends, get_backend, resolve_backend

__all__ = [
    "tensorized_attention",
    "attention_matrix",
    "resolve_backend",
    "available_backends",
]


def _qkv_ok(q, k, v) -> bool:
    """The checks of ``_explain_qkv`` as one expression: the common (valid) call formats no
    message, which was most of the op's host time at small n."""
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T)):
        return False
    if not (q.ndim == k.ndim == v.ndim == 4 and q.is_floating_point()):
        return False
    B, H, n, d = q.shape
    kB, Hkv, kn, kd = k.shape
    return (
        q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and n > 0
        and H > 0
        and d > 0
        and v.shape[3] > 0
        and kB == B
        and kn == n
        and kd == d
        and v.shape[:3] == k.shape[:3]
        and Hkv > 0
        and H % Hkv == 0
    )


def _validate_qkv(q, k, v, key_padding_mask, check_finite: bool):
    if not _qkv_ok(q, k, v):
        _explain_qkv(q, k, v)
    if check_finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, x, finite=True)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[2])


def _explain_qkv(q, k, v):
    """Raise the error that names what is wrong with q, k, v."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4, floating=True)
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


@functools.lru_cache(maxsize=64)
def _named_positional(name: str | None, d: int, max_len: int) -> PositionalScheme | None:
    """One module per (name, d, max_len): a scheme built afresh per call would also rebuild the
    tables it caches (``TensorRoPE.rotation_table``)."""
    return make_positional(name, d, max_len=max_len)


def _prepare_call(
    q, k, v, fold, causal, coverage, mode, positional, key_padding_mask, hop_order, check_finite
) -> tuple[torch.Tensor, torch.Tensor, HopPlan, PositionalScheme | None]:
    _validate_qkv(q, k, v, key_padding_mask, check_finite)
    check(
        causal in (True, False) and not isinstance(causal, str),
        f"causal must be a bool, got {causal!r}",
        TypeError,
    )
    check_choice("coverage", coverage, COVERAGES)
    check_choice("mode", mode, MODES)
    n, d = q.shape[2], q.shape[3]
    fold = resolve_fold(fold, n)
    check(
        positional != "learned",
        "positional='learned' has parameters, which a function call would draw afresh each time: "
        "build seqtensor.core.positional.Learned(max_len, d) once (trained with the model) and "
        "pass it",
    )
    if isinstance(positional, str) or positional is None:
        positional = _named_positional(positional, d, fold.size)
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
            f"mode='kronecker' needs a fold without padding (prod(dims)={fold.size}, n={n}) and no "
            "key_padding_mask",
        )
    plan = hop_plan(fold.dims, n, causal=causal, coverage=coverage, hop_order=hop_order)
    return q, k, plan, hop_positional


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
    check_finite: bool = False,
    hop_gates: torch.Tensor | None = None,
    validate_values: bool | None = None,
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
    check_finite : raise on NaN/inf in q, k, v (and hop_gates outside [0, 1]). Off by default: the
        check reads every input and waits for the device. Without it NaN in gives NaN out, as in
        SDPA.
    hop_gates : optional (H, m - 1) values in [0, 1], an extension of the hop of
        docs/semantics.md (fibre mode): the i-th hop after the first updates
        ``V <- V + g[:, i] * (hop(V) - V)`` instead of ``V <- hop(V)``, so a model can keep its
        local (first-hop) result and take only part of the coarser mixtures. All ones is the
        plain method. Differentiable (gates too), both backends.

    validate_values : deprecated name of ``check_finite``.

    Returns
    -------
    (B, H, n, d) tensor. Outputs at masked positions are relays, not meaningful results.
    """
    if validate_values is not None:
        if validate_values:
            warnings.warn(
                "validate_values is deprecated: pass check_finite=True",
                DeprecationWarning,
                stacklevel=2,
            )
        check_finite = bool(validate_values)
    check(
        scale is None or isinstance(scale, numbers.Real) and not isinstance(scale, bool),
        f"scale must be a real number or None, got {scale!r}",
        TypeError,
    )
    q_in = q
    q, k, plan, hop_positional = _prepare_call(
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
        check_finite,
    )
    if hop_gates is not None:
        check(mode == "fibre", "hop_gates apply to mode='fibre' only")
        _check_hop_gates(hop_gates, q, plan.m, values=check_finite)
    if mode == "kronecker":
        return kronecker_attention_reference(
            q, k, v, plan.dims, scale=scale, hop_positional=hop_positional
        )
    if q.shape[0] == 0:  # an empty batch, as SDPA allows
        return v.new_empty(0, q.shape[1], q.shape[2], v.shape[3])
    resolved = resolve_backend(backend, q_in.device)
    if plan.m == 1 and key_padding_mask is None and backend == "auto" and resolved == "triton":
        # One hop is plain attention: PyTorch's flash kernel is the fastest there is on a GPU
        return _one_hop_sdpa(q, k, v, causal, scale, hop_positional)
    fn = get_backend(resolved)
    gated = (
        {} if hop_gates is None else {"hop_gates": hop_gates}
    )  # backends registered without gates still work
    return fn(
        q,
        k,
        v,
        plan.dims,
        plan.n,
        causal=causal,
        coverage=coverage,
        hop_order=plan.order,
        scale=scale,
        hop_positional=hop_positional,
        key_padding_mask=key_padding_mask,
        **gated,
    )


def _one_hop_sdpa(q, k, v, causal, scale, hop_positional) -> torch.Tensor:
    """Order 1 (fold (n,)): the hop's coordinate is the token index, so this is SDPA."""
    if hop_positional is not None:
        pos = torch.arange(q.shape[2], device=q.device)
        q, k = hop_positional.hop(q, pos), hop_positional.hop(k, pos)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def _check_hop_gates(gates: torch.Tensor, q: torch.Tensor, m: int, values: bool = True) -> None:
    """(H, m - 1) floating gates in [0, 1] on q's device (the range read only with ``values``: a
    device sync), or a named error."""
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
