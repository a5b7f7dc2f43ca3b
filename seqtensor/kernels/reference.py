"""Pure-PyTorch tensorized attention: the oracle for every test and the CPU backend.

Legend: B batch, H query heads, Hkv kv heads, G = H // Hkv query heads per kv head, n length,
N = prod(dims) folded length, d head dim, m fold order, n_j fold dims. For hop j the folded tensor
is viewed as (P, n_j, S) with P = prod(n_1..n_{j-1}) (coarser dims) and S = prod(n_{j+1}..n_m)
(finer dims); a *fibre* is one (p, s) pair.

Batched over batch, heads and fibres: the only Python loop is over the m hops. Never builds an
n x n matrix (hop j's scores are N x n_j).

Padding and masks (../shared/SPEC.md, "One hop"): a position is *valid* at level 0 when it is a
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

from ..positional import PositionalScheme

__all__ = ["fibre_attention_reference", "kronecker_attention_reference"]


def _prepare(q, k, v, n: int, N: int, key_padding_mask, compute_dtype: torch.dtype | None = None):
    """Pad to N, upcast half precision, group query heads per kv head, zero invalid positions."""
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    work = work if compute_dtype is None else compute_dtype
    valid = torch.zeros(B, N, dtype=torch.bool, device=q.device)
    valid[:, :n] = True if key_padding_mask is None else key_padding_mask.to(torch.bool)

    def fold(x: torch.Tensor, heads: int) -> torch.Tensor:
        x = torch.nn.functional.pad(x.to(work), (0, 0, 0, N - n))
        x = x.masked_fill(~valid[:, None, :, None], 0.0)
        return x.reshape(B, Hkv, heads // Hkv, N, x.shape[-1])  # (B, Hkv, G|1, N, d)

    return fold(q, H), fold(k, Hkv), fold(v, Hkv), valid


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
) -> torch.Tensor:
    """Multi-hop fibre attention. q (B, H, n, d), k (B, Hkv, n, d), v (B, Hkv, n, dv) -> (B, H, n, dv).

    Inputs are assumed validated (``seqtensor.tensorized_attention`` does that); ``hop_order``
    lists dims 0-based (0 = coarsest), default finest to coarsest. ``compute_dtype`` overrides the
    working precision (default: float32 for half inputs); the kernel tests use the inputs' own
    dtype to measure what plain PyTorch loses at that precision.
    """
    B, H, _, d = q.shape
    m, N = len(dims), math.prod(dims)
    hop_order = tuple(range(m - 1, -1, -1)) if hop_order is None else hop_order
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg, kg, vg, valid = _prepare(q, k, v, n, N, key_padding_mask, compute_dtype)
    processed: set[int] = set()
    for j in hop_order:
        P, nj, S = math.prod(dims[:j]), dims[j], math.prod(dims[j + 1 :])
        with_summary = causal and coverage == "full" and S > 1 and processed == set(range(j + 1, m))
        vg, valid = _hop(qg, kg, vg, valid, P, nj, S, causal, with_summary, scale, hop_positional)
        processed.add(j)
    out = vg.expand(B, k.shape[1], H // k.shape[1], N, vg.shape[-1]).reshape(B, H, N, -1)
    return out[:, :, :n].to(q.dtype)


def _hop(qg, kg, vg, valid, P, nj, S, causal, with_summary, scale, hop_positional):
    """One hop along a dim of size nj; returns the new value state and validity.

    Each fibre becomes one row of a (B*P*S, heads, nj, d) batch for SDPA, so the per-hop work runs
    in PyTorch's fused attention; summary keys are appended to every fibre's keys.
    """
    B, Hkv, G = qg.shape[:3]

    def fibres(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, g, N, d) -> (B, P, S, Hkv*g, nj, d)
        x = x.reshape(B, Hkv, x.shape[2], P, nj, S, x.shape[-1]).permute(0, 3, 5, 1, 2, 4, 6)
        return x.reshape(B, P, S, -1, nj, x.shape[-1])

    qf, kf, vf = fibres(qg), fibres(kg), fibres(vg)
    if hop_positional is not None:
        pos = torch.arange(nj, device=qg.device)
        qf, kf = hop_positional.hop(qf, pos), hop_positional.hop(kf, pos)
    key_ok = valid.reshape(B, P, nj, S).transpose(-1, -2)[:, :, :, None, :]  # (B, P, S, 1, nj) over keys
    if causal:
        key_ok = key_ok & torch.ones(nj, nj, dtype=torch.bool, device=qg.device).tril()
    if with_summary:
        # Summary keys: the last token (finer coords all last) of each earlier sibling block.
        ks, vs = kf[:, :, S - 1 :], vf[:, :, S - 1 :]  # (B, P, 1, heads, nj, d)
        kf = torch.cat([kf, ks.expand_as(kf)], dim=-2)
        vf = torch.cat([vf, vs.expand(*vf.shape[:2], S, *vs.shape[3:])], dim=-2)
        earlier = torch.ones(nj, nj, dtype=torch.bool, device=qg.device).tril(-1)
        not_dup = (torch.arange(S, device=qg.device) != S - 1)[:, None, None]  # summary == fibre key at s = S-1
        sum_ok = valid.reshape(B, P, nj, S)[:, :, None, None, :, S - 1] & earlier & not_dup  # (B, P, S, nj, nj)
        key_ok = torch.cat([key_ok.expand(B, P, S, nj, nj), sum_ok], dim=-1)
    key_ok = key_ok.expand(B, P, S, nj, key_ok.shape[-1])
    has_key = key_ok.any(-1)  # (B, P, S, nj): rows that received something stay valid
    mask = None if bool(key_ok.all()) else (key_ok | ~has_key[..., None]).reshape(B * P * S, 1, nj, -1)
    heads = qf.shape[3]
    out = torch.nn.functional.scaled_dot_product_attention(
        qf.reshape(B * P * S, heads, nj, -1),
        kf.reshape(B * P * S, kf.shape[3], kf.shape[4], -1),
        vf.reshape(B * P * S, vf.shape[3], vf.shape[4], -1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=kf.shape[3] != heads or vf.shape[3] != heads,
    )
    out = out.reshape(B, P, S, heads, nj, -1) * has_key[:, :, :, None, :, None]
    out = out.reshape(B, P, S, Hkv, G, nj, -1).permute(0, 3, 4, 1, 5, 2, 6).reshape(B, Hkv, G, P * nj * S, -1)
    return out, has_key.transpose(-1, -2).reshape(B, P * nj * S)


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
    m, N = len(dims), math.prod(dims)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg, kg, vg, _ = _prepare(q, k, v, n, N, None)
    G = qg.shape[2]
    vg = vg.expand(*qg.shape[:3], N, vg.shape[-1])
    for j in range(m):
        P, nj, S = math.prod(dims[:j]), dims[j], math.prod(dims[j + 1 :])
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
