"""Pure-PyTorch tensorized attention: the oracle for every test and the CPU backend.

Legend: B batch, H query heads, Hkv kv heads, G = H // Hkv query heads per kv head, n length,
N = prod(dims) folded length, d head dim, m fold order, n_j fold dims. For hop j the folded tensor
is viewed as (P, n_j, S) with P = prod(n_1..n_{j-1}) (coarser dims) and S = prod(n_{j+1}..n_m)
(finer dims); a *fibre* is one (p, s) pair.

Batched over batch, heads and fibres: the only Python loop is over the m hops. Never builds an
n x n matrix (hop j's scores are N x n_j).

Padding and masks (docs/semantics.md, "One hop"): a position is *valid* at level 0 when it is a
real (< n) and unmasked token. Invalid positions start with zero q, k, v; in each hop only valid
positions are keys, and a position becomes valid for the next hop when it attended to at least one
valid key. So a padded position relays the mixture of its fibre to later hops, which keeps
bidirectional reach complete when prod(dims) > n. A query with no valid key outputs zeros.

Causal ``full`` coverage: in a hop along dim j that has finer dims already processed, a query at
(a_1..a_m) also attends to the summary tokens (a_1..a_{j-1}, b, n_{j+1}-1, ..., n_m-1), b < a_j.
Keys form a set: a summary token that is also a fibre key (queries whose finer coordinates are all
last) is counted once.
"""

from __future__ import annotations

import math

import torch

from ..core.plan import hop_plan
from ..core.positional import PositionalScheme, TensorRoPE

__all__ = ["fibre_attention_reference", "kronecker_attention_reference"]


def work_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The working precision: ``compute_dtype`` if given, else float32 for half inputs (also the
    decode cache's, ``adapters.text_cache``)."""
    return compute_dtype or (dtype if dtype in (torch.float32, torch.float64) else torch.float32)


def _prepare(
    q,
    k,
    v,
    n: int,
    N: int,
    key_padding_mask,
    compute_dtype: torch.dtype | None = None,
    pairs: bool = False,
):
    """Pad to N, upcast half precision, group query heads per kv head, zero invalid positions.

    ``pairs`` reorders q's and k's head dim from rotary halves to interleaved pairs (x1_0, x2_0,
    x1_1, ...), so a hop's rotation is one complex multiply; scores are unchanged because q and k
    move alike.
    """
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    work = work_dtype(q.dtype, compute_dtype)
    valid = torch.zeros(B, N, dtype=torch.bool, device=q.device)
    valid[:, :n] = True if key_padding_mask is None else key_padding_mask.to(torch.bool)

    def fold(x: torch.Tensor, heads: int, pairs: bool) -> torch.Tensor:
        e, x = x.shape[-1], x.to(work)
        if key_padding_mask is not None:
            x = x.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
        if (
            pairs
        ):  # torch.complex interleaves in one vectorized pass (a transposed copy is ~2x slower)
            x = torch.view_as_real(torch.complex(*x.chunk(2, dim=-1)))
        if N > n:
            x = torch.nn.functional.pad(
                x, (0, 0) * (x.ndim - 3) + (0, N - n)
            )  # padded rows are zero
        return x.reshape(B, Hkv, heads // Hkv, N, e)  # (B, Hkv, G|1, N, e)

    return fold(q, H, pairs), fold(k, Hkv, pairs), fold(v, Hkv, False), valid


def fibre_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dims: tuple[int, ...],
    n: int,
    *,
    causal: bool = False,
    coverage: str = "full",
    hop_order: tuple[int, ...] | None = None,
    scale: float | None = None,
    hop_positional: PositionalScheme | None = None,
    key_padding_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    hop_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-hop fibre attention. q (B, H, n, d), k (B, Hkv, n, d), v (B, Hkv, n, dv) -> (B, H, n,
    dv).

    Inputs are assumed validated (``seqtensor.tensorized_attention`` does that); ``hop_order``
    lists dims 0-based (0 = coarsest), default finest to coarsest. ``compute_dtype`` overrides the
    working precision (default: float32 for half inputs); the kernel tests use the inputs' own
    dtype to measure what plain PyTorch loses at that precision. ``hop_gates`` (H, m - 1): the
    i-th hop after the first mixes ``V + g[:, i] * (hop(V) - V)`` (see ``tensorized_attention``).
    """
    B, H, _, d = q.shape
    plan = hop_plan(dims, n, causal=causal, coverage=coverage, hop_order=hop_order)
    dims, m, N = plan.dims, plan.m, plan.N
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # TensorRoPE as a complex multiply needs complex64/128, i.e. a float32/64 working precision
    complex_rotary = isinstance(hop_positional, TensorRoPE) and work_dtype(
        q.dtype, compute_dtype
    ) in (torch.float32, torch.float64)
    qg, kg, vg, valid = _prepare(q, k, v, n, N, key_padding_mask, compute_dtype, complex_rotary)
    # States stay (B, Hkv, G|1, n_1, ..., n_m, e) between hops (a permuted view, no copy back).
    qg, kg, vg, valid = (
        qg.unflatten(3, dims),
        kg.unflatten(3, dims),
        vg.unflatten(3, dims),
        valid.unflatten(1, dims),
    )
    for i, hop in enumerate(plan.hops):
        v_in = vg
        vg, valid = _hop(
            qg, kg, vg, valid, hop.dim, causal, hop.summary, scale, hop_positional, complex_rotary
        )
        if hop_gates is not None and i > 0:
            g = (
                hop_gates[:, i - 1]
                .to(vg.dtype)
                .reshape(1, k.shape[1], H // k.shape[1], *[1] * (m + 1))
            )
            vg = v_in + g * (vg - v_in)
    # Returned as a (B, H, n, dv) view of (B, N, H, dv) memory: the caller's transpose back to
    # (B, n, H * dv) is then free.
    out = vg.expand(B, k.shape[1], H // k.shape[1], *dims, vg.shape[-1]).permute(
        0, *range(3, 3 + m), 1, 2, -1
    )
    return out.reshape(B, N, H, -1)[:, :n].transpose(1, 2).to(q.dtype)


def _to_fibres(x: torch.Tensor, j: int) -> torch.Tensor:
    """(B, Hkv, g, n_1..n_m, e) -> (B * Hkv * P * S, g, n_j, e): one fibre along dim j per row.

    Kv heads stay outside the fibres, so the finest hop's fibres of a contiguous state with g == 1
    (k, v, and q without GQA) are a view, not a copy.
    """
    m = x.ndim - 4
    x = x.permute(0, 1, *[3 + i for i in range(m) if i != j], 2, 3 + j, x.ndim - 1)
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


def _from_fibres(
    y: torch.Tensor, j: int, lead: tuple[int, ...], dims: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of ``_to_fibres`` for ``lead`` = (B, Hkv, g): a permuted view, no copy."""
    m = len(dims)
    y = y.reshape(
        lead[0], lead[1], *[dims[i] for i in range(m) if i != j], lead[2], dims[j], y.shape[-1]
    )
    rest = iter(range(2, m + 1))
    return y.permute(0, 1, m + 1, *[m + 2 if i == j else next(rest) for i in range(m)], m + 3)


def _hop_keys(valid: torch.Tensor, j: int, causal: bool, with_summary: bool):
    """Keys each query of hop j may see and which queries see any.

    ``valid`` (B, n_1..n_m) -> ``key_ok`` (F, nj | 1, nj [+ nj summary keys]) over the F = B * P * S
    fibres, and ``has_key`` (F, nj | 1): rows that received something stay valid for the next hop.
    Query dim 1 when every query of a fibre sees the same keys (no causal mask, no summaries), so
    masks stay small.
    """
    dims = tuple(valid.shape[1:])
    nj, S = dims[j], math.prod(dims[j + 1 :])
    fibre_valid = _to_fibres(valid[:, None, None, ..., None], j).reshape(-1, nj)  # (F, nj)
    key_ok = fibre_valid[:, None, :]
    if causal:
        key_ok = key_ok & torch.ones(nj, nj, dtype=torch.bool, device=valid.device).tril()
    if with_summary:
        # Summary keys: the last token (finer coords all last) of each earlier sibling block.
        last = fibre_valid.reshape(-1, S, nj)[:, S - 1 :]  # (B*P, 1, nj)
        earlier = torch.ones(nj, nj, dtype=torch.bool, device=valid.device).tril(-1)
        not_dup = (torch.arange(S, device=valid.device) != S - 1)[
            :, None, None
        ]  # summary == fibre key at s = S-1
        sum_ok = (last[:, :, None, :] & earlier & not_dup).reshape(-1, nj, nj)
        key_ok = torch.cat([key_ok.expand(-1, nj, nj), sum_ok], dim=-1)
    return key_ok, key_ok.any(-1)


def _hop(qg, kg, vg, valid, j, causal, with_summary, scale, hop_positional, complex_rotary=False):
    """One hop along dim j; returns the new value state and validity in the same layouts.

    Each fibre becomes one row of a (F, heads, nj, d) batch for SDPA, so the per-hop work runs in
    PyTorch's fused attention; summary keys are appended to every fibre's keys.
    """
    B, Hkv, G = qg.shape[:3]
    dims = tuple(qg.shape[3:-1])
    nj, S = dims[j], math.prod(dims[j + 1 :])
    qf, kf, vf = _to_fibres(qg, j), _to_fibres(kg, j), _to_fibres(vg, j)
    if complex_rotary:
        phase = hop_positional.phase(torch.arange(nj, device=qg.device), qf.dtype)  # (nj, d/2)
        qf, kf = (
            torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * phase).flatten(-2)
            for x in (qf, kf)
        )
    elif hop_positional is not None:
        pos = torch.arange(nj, device=qg.device)
        qf, kf = hop_positional.hop(qf, pos), hop_positional.hop(kf, pos)
    if causal and not with_summary and bool(valid.all()):
        # every fibre is a plain causal sequence: SDPA's own causal path, no (F, nj, nj) mask (n_j =
        # 2048 at 512k tokens would make that mask gigabytes)
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, is_causal=True, scale=scale, enable_gqa=kf.shape[1] != G or vf.shape[1] != G
        )
        return _from_fibres(_keep_nan(out, qf, scale), j, (B, Hkv, G), dims), valid
    key_ok, has_key = _hop_keys(
        valid, j, causal, with_summary
    )  # per (B, P, S) fibre, shared by kv heads
    if with_summary:

        def with_summaries(x: torch.Tensor) -> torch.Tensor:
            x = x.unflatten(0, (-1, S))
            return torch.cat([x, x[:, S - 1 :].expand_as(x)], dim=-2).flatten(0, 1)

        kf, vf = with_summaries(kf), with_summaries(vf)
    all_have_keys = bool(has_key.all())
    mask = None
    if not bool(key_ok.all()):
        mask = key_ok if all_have_keys else key_ok | ~has_key[..., None]
        mask = (
            mask.unflatten(0, (B, 1, -1))
            .expand(B, Hkv, -1, *mask.shape[1:])
            .reshape(-1, 1, *mask.shape[1:])
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=mask, scale=scale, enable_gqa=kf.shape[1] != G or vf.shape[1] != G
    )
    out = _keep_nan(out, qf, scale)
    if not all_have_keys:
        out = (
            out.unflatten(0, (B, Hkv, -1))
            * has_key.unflatten(0, (B, 1, -1))[:, :, :, None, :, None]
        ).flatten(0, 2)
    new_valid = _from_fibres(has_key.expand(-1, nj)[:, None, :, None], j, (B, 1, 1), dims)[
        :, 0, 0, ..., 0
    ]
    return _from_fibres(out, j, (B, Hkv, G), dims), new_valid


def _keep_nan(out: torch.Tensor, qf: torch.Tensor, scale: float) -> torch.Tensor:
    """NaN rows where the query (or the scale) is not finite.

    PyTorch's CPU flash SDPA returns zeros for a query row whose logits are all NaN (it skips NaN
    in the row max, then sees a fully masked row); NaN in must give NaN out, as SDPA's math path
    and the Triton kernels do. One read of q per hop, no device sync.
    """
    return out + qf.sum(-1, keepdim=True).mul(0.0 * scale).to(out.dtype)


def kronecker_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dims: tuple[int, ...],
    *,
    scale: float | None = None,
    hop_positional: PositionalScheme | None = None,
) -> torch.Tensor:
    """Kronecker mode (non-causal, no padding): per (batch, head, dim) one n_j x n_j matrix.

    ``A_j = softmax(scale * <Q_j, K_j> / (N / n_j))`` where ``<Q_j, K_j>`` contracts every other
    dim and the head dim (averaged over the other dims, so logits have a single dot product's
    scale). The output is ``(A_1 (x) ... (x) A_m) vec(V)``.
    """
    B, H, n, d = q.shape
    plan = hop_plan(dims, n, hop_order=range(len(dims)))
    N = plan.N
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg, kg, vg, _ = _prepare(q, k, v, n, N, None)
    G = qg.shape[2]
    vg = vg.expand(*qg.shape[:3], N, vg.shape[-1])
    for hop in plan.hops:
        P, nj, S = hop.P, hop.nj, hop.S
        qj = qg.reshape(B, -1, G, P, nj, S, d)
        kj = kg.reshape(B, -1, 1, P, nj, S, d)
        if hop_positional is not None:
            pos = torch.arange(nj, device=q.device)
            qj = hop_positional.hop(qj.transpose(-3, -2), pos).transpose(-3, -2)
            kj = hop_positional.hop(kj.transpose(-3, -2), pos).transpose(-3, -2)
        scores = torch.einsum("bhgpasd,bhgpcsd->bhgac", qj, kj.expand_as(qj)) * (scale / (P * S))
        attn = torch.softmax(scores, dim=-1)  # (B, Hkv, G, nj, nj)
        vj = vg.reshape(B, -1, G, P, nj, S, vg.shape[-1])
        vg = torch.einsum("bhgac,bhgpcse->bhgpase", attn, vj).reshape(B, -1, G, N, vg.shape[-1])
    return vg.reshape(B, H, N, -1)[:, :, :n].to(q.dtype)
