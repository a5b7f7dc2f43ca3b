"""Triton backend for multi-hop fibre attention: per-hop fused forward and backward kernels.

Legend: B batch, H query heads, Hkv kv heads, G = H // Hkv, n length, N = prod(dims), d head dim
(split in two halves D1 + D2 so tensor_rope's rotate-half pairs stay apart), dv value dim, m fold
order. Hop along dim j views the folded tensor as (P, n_j, S); a fibre is one (p, s) pair and its
tokens are ``t = p * n_j * S + i * S + s``, i < n_j. Semantics are those of
``kernels.reference.fibre_attention_reference`` (the oracle; same signature, same results).

Design (docs/semantics.md, "One hop"):

- One launch per hop and direction. A program owns one fibre of one head (forward) or of one kv
  head and its G query heads (backward), and walks the fibre in blocks of BLOCK rows, FlashAttention
  style (online softmax, exp2, fp32 accumulators; fp64 for fp64 inputs). Rows are read in place
  through the strides of q, k, v, so (B, H, n, d) tensors and (B, n, H, d) views both work, with no
  permute or contiguous copy. Programs are numbered on grid axis 0 only (no 65,535 limit on y/z),
  fibre index s fastest, so neighbouring programs read neighbouring token rows.
- GQA: the first hop reads v per kv head (h // G); later hops read the per-query-head value state.
  The backward program loops over the G query heads of its kv head, so dk (and the first hop's dv)
  is reduced in registers: k/v are never repeated in memory.
- Validity (padding relays, key_padding_mask): which positions are keys at each hop depends only on
  (batch, position), so it is computed once on the host as (m + 1, B, N) bytes with cheap torch
  scans; the kernels read one byte per key row. With no mask and no padding the reads are skipped.
- Causal ``full`` coverage: a query of fibre (p, s < S - 1) also attends to the summary keys
  (p, b, S - 1), b < i, i.e. the keys of fibre (p, S - 1), in the same online softmax. Their
  gradients gather from all S - 1 sibling fibres: a separate key-centric kernel splits the s range
  into C chunks and writes (B, H, P, C, n_j, d) partial sums; the host adds their sum to the
  summary rows (N / S of them, a small fraction of the tensor).
- tensor_rope is applied to q and k rows as they are loaded (cos / sin of pos * inv_freq read from a
  small fp32 table, the position being the fibre coordinate), so no extra pass over q and k; its
  gradient is the inverse rotation of the rotated-space gradient.
- Backward recomputes each hop from q, k, the hop's input value state and its logsumexp. Saved for
  backward: the m - 1 intermediate value states (input dtype), per-hop logsumexp (fp32, (B, H, N)),
  and the validity bytes. dq and dk accumulate across hops in the gradient dtype (read-add-write;
  the first backward hop writes without reading), so no fp32 copies of q or k are made. When a
  fibre fits one block (n_j <= BLOCK, the common case) one program computes S, P and dS once for
  dq, dk and dv together. Each backward hop also writes rowsum(dV * V) for the rows whose dV it
  produced: that is the next backward hop's delta = rowsum(dO * O), so O is read only once.
  Peak memory of forward+backward stays below FlashAttention's (docs/performance.md).

Unsupported calls (CPU tensors without TRITON_INTERPRET, per-hop positional schemes other than
TensorRoPE, head dims above 256) run the reference with a RuntimeWarning: see ``fallback_reason``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..core.positional import TensorRoPE
from .reference import fibre_attention_reference

__all__ = ["tensorized_fibre_attention", "fallback_reason"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this to fill every buffer the kernels write with NaN first (catches unwritten rows).
POISON = False
_MAX_HEAD_DIM = 256
_MAX_BLOCK = 256  # rows per block, at most: the rotation table covers fibre positions + one block


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_halves(X, rows, row_mask, offs_h, D1, D2, stride_d):
    """Rows ``rows`` (int64 element offsets) of X split into columns [0, D1) and [D1, D1 + D2)."""
    ptr = X + rows[:, None] + offs_h[None, :] * stride_d
    x1 = tl.load(ptr, mask=row_mask[:, None] & (offs_h[None, :] < D1), other=0.0)
    x2 = tl.load(ptr + D1 * stride_d, mask=row_mask[:, None] & (offs_h[None, :] < D2), other=0.0)
    return x1, x2


@triton.jit
def _rotate(x1, x2, pos, Rot, offs_h, D1, SIGN: tl.constexpr):
    """Rotate-half RoPE at positions ``pos``; SIGN = -1 applies the inverse (transpose) rotation.

    Rot is the (positions, 2 * D1) table [cos | sin] built on the host: a few KB that stay in L1/L2,
    where computing sin and cos per loaded element made the hop kernels ALU-bound.
    """
    ptr = Rot + pos[:, None] * (2 * D1) + offs_h[None, :]
    hmask = offs_h[None, :] < D1
    c = tl.load(ptr, mask=hmask, other=1.0)
    s = tl.load(ptr + D1, mask=hmask, other=0.0) * SIGN
    a = x1.to(c.dtype)
    b = x2.to(c.dtype)
    return a * c - b * s, b * c + a * s


@triton.jit
def _load_qk(X, rows, row_mask, pos, Rot, offs_h, D1, D2, stride_d, ROPE: tl.constexpr):
    """q or k rows in the dot dtype, rotated by tensor_rope at fibre coordinates ``pos``."""
    x1, x2 = _load_halves(X, rows, row_mask, offs_h, D1, D2, stride_d)
    if ROPE:
        r1, r2 = _rotate(x1, x2, pos, Rot, offs_h, D1, 1)
        x1 = r1.to(X.dtype.element_ty)
        x2 = r2.to(X.dtype.element_ty)
    return x1, x2


@triton.jit
def _store_halves(X, rows, row_mask, offs_h, D1, D2, stride_d, x1, x2):
    ptr = X + rows[:, None] + offs_h[None, :] * stride_d
    tl.store(ptr, x1.to(X.dtype.element_ty), mask=row_mask[:, None] & (offs_h[None, :] < D1))
    tl.store(
        ptr + D1 * stride_d,
        x2.to(X.dtype.element_ty),
        mask=row_mask[:, None] & (offs_h[None, :] < D2),
    )


@triton.jit
def _key_rows(key_base, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED: tl.constexpr):
    """Token ids of key rows, the rows holding real input (``kin``) and the valid keys (``kok``)."""
    tk = key_base + offs_n.to(tl.int64) * S
    rowk = offs_n < NJ
    kin = rowk & (tk < n)
    kok = rowk
    if MASKED:
        kin = kin & (tl.load(Valid0 + vrow + tk, mask=rowk, other=0) != 0)
        kok = kok & (tl.load(ValidIn + vrow + tk, mask=rowk, other=0) != 0)
    return tk, rowk, kin, kok


@triton.jit
def _scores(q1, q2, k1, k2, qk_scale, DOT_PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits in log2 units."""
    sc = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    sc += tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC)
    return sc * qk_scale


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_keys(
    acc,
    m_i,
    l_i,
    q1,
    q2,
    offs_m,
    Kp,
    Vp,
    ValidIn,
    Valid0,
    Rot,
    key_base,
    lo,
    hi,
    S,
    NJ,
    n,
    n_vin,
    vrow,
    skt,
    skd,
    svt,
    svd,
    offs_h,
    offs_dv,
    D1,
    D2,
    NDV,
    qk_scale,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ROPE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online-softmax pass over the key rows ``key_base + c * S``, c in [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        tk, rowk, kin, kok = _key_rows(key_base, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        k1, k2 = _load_qk(Kp, tk * skt, kin, offs_n, Rot, offs_h, D1, D2, skd, ROPE)
        sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
        ok = kok[None, :]
        if CAUSAL:
            if STRICT:
                ok = ok & (offs_n[None, :] < offs_m[:, None])
            else:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pm = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pm, 1)
        vmask = (rowk & (tk < n_vin))[:, None] & (offs_dv[None, :] < NDV)
        v = tl.load(Vp + tk[:, None] * svt + offs_dv[None, :] * svd, mask=vmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pm.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _hop_fwd_kernel(
    Q,
    K,
    V,
    O,
    Lse,
    ValidIn,
    Valid0,
    Rot,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    n,
    N,
    H,
    G,
    VG,
    P,
    NJ,
    S,
    n_vin,
    n_out,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUMMARY: tl.constexpr,
    ROPE: tl.constexpr,
    MASKED: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One hop for BLOCK_M queries of one fibre of one head: O = softmax(q k^T) V_in over the keys."""
    QB = tl.cdiv(NJ, BLOCK_M)
    pid = tl.program_id(0)
    qb = pid % QB
    r = pid // QB
    s = r % S
    r = r // S
    h = r % H
    r = r // H
    p = r % P
    b = (r // P).to(tl.int64)
    fib = p.to(tl.int64) * NJ * S  # first token of fibre group p
    vrow = b * N
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    tq, rowq, qin, _ = _key_rows(fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
    q1, q2 = _load_qk(Q + b * sqb + h * sqh, tq * sqt, qin, offs_m, Rot, offs_h, D1, D2, sqd, ROPE)
    Kp = K + b * skb + (h // G) * skh
    Vp = V + b * svb + (h // VG) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    hi = NJ
    if CAUSAL:
        hi = tl.minimum(NJ, (qb + 1) * BLOCK_M)
    acc, m_i, l_i = _fwd_keys(
        acc,
        m_i,
        l_i,
        q1,
        q2,
        offs_m,
        Kp,
        Vp,
        ValidIn,
        Valid0,
        Rot,
        fib + s,
        0,
        hi,
        S,
        NJ,
        n,
        n_vin,
        vrow,
        skt,
        skd,
        svt,
        svd,
        offs_h,
        offs_dv,
        D1,
        D2,
        NDV,
        qk_scale,
        CAUSAL,
        False,
        ROPE,
        MASKED,
        BLOCK_N,
        DOT_PREC,
    )
    if SUMMARY:  # summary keys (p, b, S-1), b < i; fibre S-1 has them as fibre keys already
        hi_s = tl.where(s == S - 1, 0, hi)
        acc, m_i, l_i = _fwd_keys(
            acc,
            m_i,
            l_i,
            q1,
            q2,
            offs_m,
            Kp,
            Vp,
            ValidIn,
            Valid0,
            Rot,
            fib + S - 1,
            0,
            hi_s,
            S,
            NJ,
            n,
            n_vin,
            vrow,
            skt,
            skd,
            svt,
            svd,
            offs_h,
            offs_dv,
            D1,
            D2,
            NDV,
            qk_scale,
            True,
            True,
            ROPE,
            MASKED,
            BLOCK_N,
            DOT_PREC,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with no valid key: acc = 0 -> 0
    omask = (rowq & (tq < n_out))[:, None] & (offs_dv[None, :] < NDV)
    tl.store(
        O + b * sob + h * soh + tq[:, None] * sot + offs_dv[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=omask,
    )
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("inf"))
        tl.store(Lse + (b * H + h) * N + tq, lse, mask=rowq)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(X, rows, row_mask, offs, ncol, stride_c):
    mask = row_mask[:, None] & (offs[None, :] < ncol)
    return tl.load(X + rows[:, None] + offs[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _dq_keys(
    dq1,
    dq2,
    q1,
    q2,
    do,
    delta,
    lse,
    offs_m,
    rowq,
    Kp,
    Vp,
    ValidIn,
    Valid0,
    Rot,
    key_base,
    lo,
    hi,
    S,
    NJ,
    n,
    n_vin,
    vrow,
    skt,
    skd,
    svt,
    svd,
    offs_h,
    offs_dv,
    D1,
    D2,
    NDV,
    qk_scale,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ROPE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq (rotated space, before the logit scale) from the key rows ``key_base + c * S``, c in [lo, hi)."""
    for start in range(lo, hi, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        tk, rowk, kin, kok = _key_rows(key_base, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        k1, k2 = _load_qk(Kp, tk * skt, kin, offs_n, Rot, offs_h, D1, D2, skd, ROPE)
        v = _load_rows(Vp, tk * svt, rowk & (tk < n_vin), offs_dv, NDV, svd)
        sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
        ok = kok[None, :] & rowq[:, None]
        if CAUSAL:
            if STRICT:
                ok = ok & (offs_n[None, :] < offs_m[:, None])
            else:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
        pm = tl.where(ok, tl.exp2(sc - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (pm * (dp - delta[:, None])).to(k1.dtype)
        dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
        dq2 += tl.dot(ds, k2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _store_grad(
    DXp,
    rows,
    rmask,
    xin,
    pos,
    Rot,
    offs_h,
    D1,
    D2,
    stride_d,
    x1,
    x2,
    scale,
    ROPE: tl.constexpr,
    ACCUM: tl.constexpr,
):
    """Scale, un-rotate (transpose of tensor_rope), zero rows of invalid tokens, add to DX if ACCUM, store."""
    x1 = x1 * scale
    x2 = x2 * scale
    if ROPE:
        x1, x2 = _rotate(x1, x2, pos, Rot, offs_h, D1, -1)
    x1 = tl.where(xin[:, None], x1, 0.0)
    x2 = tl.where(xin[:, None], x2, 0.0)
    if ACCUM:
        o1, o2 = _load_halves(DXp, rows, rmask, offs_h, D1, D2, stride_d)
        x1 += o1.to(x1.dtype)
        x2 += o2.to(x2.dtype)
    _store_halves(DXp, rows, rmask, offs_h, D1, D2, stride_d, x1, x2)


@triton.jit
def _store_rows(X, rows, row_mask, offs, ncol, stride_c, x):
    mask = row_mask[:, None] & (offs[None, :] < ncol)
    tl.store(X + rows[:, None] + offs[None, :] * stride_c, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _row_delta(
    Dl,
    do,
    Op,
    tq,
    rowq,
    orow,
    offs_dv,
    NDV,
    sot,
    sod,
    ACC: tl.constexpr,
    DELTA_IN: tl.constexpr,
    STORE: tl.constexpr,
):
    """delta_i = dO_i . O_i: read from Dl (written by the previous backward hop) or computed from O rows."""
    if DELTA_IN:
        delta = tl.load(Dl + tq, mask=rowq, other=0.0)
    else:
        o = _load_rows(Op, tq * sot, orow, offs_dv, NDV, sod)
        delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
        if STORE:
            tl.store(Dl + tq, delta, mask=rowq)
    return delta


@triton.jit
def _hop_bwd_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DQ,
    DK,
    DV,
    Lse,
    Delta,
    DeltaNext,
    ValidIn,
    Valid0,
    Rot,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    sdob,
    sdoh,
    sdot,
    sdod,
    sdqb,
    sdqh,
    sdqt,
    sdqd,
    sdkb,
    sdkh,
    sdkt,
    sdkd,
    sdvb,
    sdvh,
    sdvt,
    sdvd,
    n,
    N,
    H,
    G,
    P,
    NJ,
    S,
    n_vin,
    n_o,
    n_dv,
    scale,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SUMMARY: tl.constexpr,
    ROPE: tl.constexpr,
    MASKED: tl.constexpr,
    FIRST: tl.constexpr,
    ACCUM: tl.constexpr,
    STORE_DELTA: tl.constexpr,
    DELTA_IN: tl.constexpr,
    DELTA_OUT: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Backward of one hop for block ``blk`` of one fibre of kv head hk and its G query heads.

    SINGLE (the fibre fits one block): scores, probabilities and dS are computed once and give dq,
    dk and dv together. Otherwise phase 1 accumulates dk (summed over the G heads) and dv for the
    key rows of the block, and phase 2 dq for its query rows. Summary keys contribute to dq here;
    their own gradients come from ``_hop_bwd_summary_kernel``. FIRST: V is the input v (per kv
    head), so dv sums over G. ACCUM: dq and dk add to what earlier backward hops wrote.
    DELTA_IN: this hop's rowsum(dO * O) comes from Delta, written by the previous backward hop as
    DELTA_OUT (rowsum(dV * V) of the rows it produced dV for), so O is never read again.
    """
    NB = tl.cdiv(NJ, BLOCK)
    Hkv = H // G
    pid = tl.program_id(0)
    blk = pid % NB
    r = pid // NB
    s = r % S
    r = r // S
    hk = r % Hkv
    r = r // Hkv
    p = r % P
    b = (r // P).to(tl.int64)
    fib = p.to(tl.int64) * NJ * S
    vrow = b * N
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    Kp = K + b * skb + hk * skh
    DKp = DK + b * sdkb + hk * sdkh

    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    tk, rowk, kin, kok = _key_rows(fib + s, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
    k1, k2 = _load_qk(Kp, tk * skt, kin, offs_n, Rot, offs_h, D1, D2, skd, ROPE)
    dk1 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dk2 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=ACC)
    v = _load_rows(V + b * svb + hk * svh, tk * svt, rowk & (tk < n_vin), offs_dv, NDV, svd)
    hi = NJ
    if CAUSAL:
        hi = tl.minimum(NJ, (blk + 1) * BLOCK)

    if SINGLE:  # rows offs_n are the fibre's keys and its queries
        orow = rowk & (tk < n_o)
        for g in range(G):
            h = hk * G + g
            Vp = V + b * svb + hk * svh
            if not FIRST:
                Vp = V + b * svb + h * svh
                v = _load_rows(Vp, tk * svt, rowk & (tk < n_vin), offs_dv, NDV, svd)
            q1, q2 = _load_qk(
                Q + b * sqb + h * sqh, tk * sqt, kin, offs_n, Rot, offs_h, D1, D2, sqd, ROPE
            )
            do = _load_rows(DO + b * sdob + h * sdoh, tk * sdot, orow, offs_dv, NDV, sdod)
            delta = _row_delta(
                Delta + (b * H + h) * N,
                do,
                O + b * sob + h * soh,
                tk,
                rowk,
                orow,
                offs_dv,
                NDV,
                sot,
                sod,
                ACC,
                DELTA_IN,
                STORE_DELTA,
            )
            lse = tl.load(Lse + (b * H + h) * N + tk, mask=rowk, other=float("inf"))
            sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
            ok = kok[None, :] & rowk[:, None]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_n[:, None])
            pm = tl.where(ok, tl.exp2(sc - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = (pm * (dp - delta[:, None])).to(q1.dtype)
            dvg = tl.dot(tl.trans(pm.to(do.dtype)), do, input_precision=DOT_PREC)
            if DELTA_OUT:
                tl.store(DeltaNext + (b * H + h) * N + tk, tl.sum(dvg * v.to(ACC), 1), mask=rowk)
            dk1 += tl.dot(tl.trans(ds), q1, input_precision=DOT_PREC)
            dk2 += tl.dot(tl.trans(ds), q2, input_precision=DOT_PREC)
            dq1 = tl.dot(ds, k1, input_precision=DOT_PREC)
            dq2 = tl.dot(ds, k2, input_precision=DOT_PREC)
            if SUMMARY:
                hi_s = tl.where(s == S - 1, 0, NJ)
                dq1, dq2 = _dq_keys(
                    dq1,
                    dq2,
                    q1,
                    q2,
                    do,
                    delta,
                    lse,
                    offs_n,
                    rowk,
                    Kp,
                    Vp,
                    ValidIn,
                    Valid0,
                    Rot,
                    fib + S - 1,
                    0,
                    hi_s,
                    S,
                    NJ,
                    n,
                    n_vin,
                    vrow,
                    skt,
                    skd,
                    svt,
                    svd,
                    offs_h,
                    offs_dv,
                    D1,
                    D2,
                    NDV,
                    qk_scale,
                    True,
                    True,
                    ROPE,
                    MASKED,
                    BLOCK,
                    DOT_PREC,
                )
            _store_grad(
                DQ + b * sdqb + h * sdqh,
                tk * sdqt,
                rowk & (tk < n),
                kin,
                offs_n,
                Rot,
                offs_h,
                D1,
                D2,
                sdqd,
                dq1,
                dq2,
                scale,
                ROPE,
                ACCUM,
            )
            if FIRST:
                dv += dvg
            else:
                _store_rows(
                    DV + b * sdvb + h * sdvh, tk * sdvt, rowk & (tk < n_dv), offs_dv, NDV, sdvd, dvg
                )
        if FIRST:
            _store_rows(
                DV + b * sdvb + hk * sdvh,
                tk * sdvt,
                rowk & (tk < n_dv),
                offs_dv,
                NDV,
                sdvd,
                tl.where(kin[:, None], dv, 0.0),
            )
        _store_grad(
            DKp,
            tk * sdkt,
            rowk & (tk < n),
            kin,
            offs_n,
            Rot,
            offs_h,
            D1,
            D2,
            sdkd,
            dk1,
            dk2,
            scale,
            ROPE,
            ACCUM,
        )
    else:
        # ---- phase 1: keys c in block blk, queries from the block on (causal) ----
        lo = 0
        if CAUSAL:
            lo = blk * BLOCK
        for g in range(G):
            h = hk * G + g
            if not FIRST:
                v = _load_rows(
                    V + b * svb + h * svh, tk * svt, rowk & (tk < n_vin), offs_dv, NDV, svd
                )
                dv = tl.zeros([BLOCK, BLOCK_DV], dtype=ACC)
            for start in range(lo, NJ, BLOCK):
                offs_m = start + tl.arange(0, BLOCK)
                tq, rowq, qin, _ = _key_rows(
                    fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED
                )
                q1, q2 = _load_qk(
                    Q + b * sqb + h * sqh, tq * sqt, qin, offs_m, Rot, offs_h, D1, D2, sqd, ROPE
                )
                orow = rowq & (tq < n_o)
                do = _load_rows(DO + b * sdob + h * sdoh, tq * sdot, orow, offs_dv, NDV, sdod)
                delta = _row_delta(
                    Delta + (b * H + h) * N,
                    do,
                    O + b * sob + h * soh,
                    tq,
                    rowq,
                    orow,
                    offs_dv,
                    NDV,
                    sot,
                    sod,
                    ACC,
                    DELTA_IN,
                    False,
                )
                lse = tl.load(Lse + (b * H + h) * N + tq, mask=rowq, other=float("inf"))
                sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
                ok = kok[None, :] & rowq[:, None]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                pm = tl.where(ok, tl.exp2(sc - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(pm.to(do.dtype)), do, input_precision=DOT_PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                ds = tl.trans((pm * (dp - delta[:, None])).to(q1.dtype))
                dk1 += tl.dot(ds, q1, input_precision=DOT_PREC)
                dk2 += tl.dot(ds, q2, input_precision=DOT_PREC)
            if not FIRST:
                _store_rows(
                    DV + b * sdvb + h * sdvh, tk * sdvt, rowk & (tk < n_dv), offs_dv, NDV, sdvd, dv
                )
                if DELTA_OUT:
                    tl.store(DeltaNext + (b * H + h) * N + tk, tl.sum(dv * v.to(ACC), 1), mask=rowk)
        if FIRST:
            _store_rows(
                DV + b * sdvb + hk * sdvh,
                tk * sdvt,
                rowk & (tk < n_dv),
                offs_dv,
                NDV,
                sdvd,
                tl.where(kin[:, None], dv, 0.0),
            )
        _store_grad(
            DKp,
            tk * sdkt,
            rowk & (tk < n),
            kin,
            offs_n,
            Rot,
            offs_h,
            D1,
            D2,
            sdkd,
            dk1,
            dk2,
            scale,
            ROPE,
            ACCUM,
        )

        # ---- phase 2: queries i in block blk, over fibre keys (and summary keys) ----
        offs_m = blk * BLOCK + tl.arange(0, BLOCK)
        tq, rowq, qin, _ = _key_rows(fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        orow = rowq & (tq < n_o)
        for g in range(G):
            h = hk * G + g
            Vp = V + b * svb + h * svh
            if FIRST:
                Vp = V + b * svb + hk * svh
            q1, q2 = _load_qk(
                Q + b * sqb + h * sqh, tq * sqt, qin, offs_m, Rot, offs_h, D1, D2, sqd, ROPE
            )
            do = _load_rows(DO + b * sdob + h * sdoh, tq * sdot, orow, offs_dv, NDV, sdod)
            delta = _row_delta(
                Delta + (b * H + h) * N,
                do,
                O + b * sob + h * soh,
                tq,
                rowq,
                orow,
                offs_dv,
                NDV,
                sot,
                sod,
                ACC,
                DELTA_IN,
                STORE_DELTA,
            )
            lse = tl.load(Lse + (b * H + h) * N + tq, mask=rowq, other=float("inf"))
            dq1 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
            dq2 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
            dq1, dq2 = _dq_keys(
                dq1,
                dq2,
                q1,
                q2,
                do,
                delta,
                lse,
                offs_m,
                rowq,
                Kp,
                Vp,
                ValidIn,
                Valid0,
                Rot,
                fib + s,
                0,
                hi,
                S,
                NJ,
                n,
                n_vin,
                vrow,
                skt,
                skd,
                svt,
                svd,
                offs_h,
                offs_dv,
                D1,
                D2,
                NDV,
                qk_scale,
                CAUSAL,
                False,
                ROPE,
                MASKED,
                BLOCK,
                DOT_PREC,
            )
            if SUMMARY:
                hi_s = tl.where(s == S - 1, 0, hi)
                dq1, dq2 = _dq_keys(
                    dq1,
                    dq2,
                    q1,
                    q2,
                    do,
                    delta,
                    lse,
                    offs_m,
                    rowq,
                    Kp,
                    Vp,
                    ValidIn,
                    Valid0,
                    Rot,
                    fib + S - 1,
                    0,
                    hi_s,
                    S,
                    NJ,
                    n,
                    n_vin,
                    vrow,
                    skt,
                    skd,
                    svt,
                    svd,
                    offs_h,
                    offs_dv,
                    D1,
                    D2,
                    NDV,
                    qk_scale,
                    True,
                    True,
                    ROPE,
                    MASKED,
                    BLOCK,
                    DOT_PREC,
                )
            _store_grad(
                DQ + b * sdqb + h * sdqh,
                tq * sdqt,
                rowq & (tq < n),
                qin,
                offs_m,
                Rot,
                offs_h,
                D1,
                D2,
                sdqd,
                dq1,
                dq2,
                scale,
                ROPE,
                ACCUM,
            )


@triton.jit
def _hop_bwd_summary_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    ValidIn,
    Valid0,
    Rot,
    DKS,
    DVS,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sdob,
    sdoh,
    sdot,
    sdod,
    n,
    N,
    H,
    G,
    P,
    NJ,
    S,
    n_vin,
    n_o,
    C,
    CH,
    scale,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    D: tl.constexpr,
    NDV: tl.constexpr,
    ROPE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Gradients of summary keys (p, c, S-1), c in block blk, from the queries of fibres s in chunk cb.

    Writes partial sums to DKS (B, H, P, C, NJ, D) and DVS (B, H, P, C, NJ, DV), fp32/fp64.
    """
    NB = tl.cdiv(NJ, BLOCK)
    pid = tl.program_id(0)
    cb = pid % C
    r = pid // C
    blk = r % NB
    r = r // NB
    h = r % H
    r = r // H
    p = r % P
    b = (r // P).to(tl.int64)
    fib = p.to(tl.int64) * NJ * S
    vrow = b * N
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)

    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    tk, rowk, kin, kok = _key_rows(fib + S - 1, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
    k1, k2 = _load_qk(
        K + b * skb + (h // G) * skh, tk * skt, kin, offs_n, Rot, offs_h, D1, D2, skd, ROPE
    )
    v = _load_rows(V + b * svb + h * svh, tk * svt, rowk & (tk < n_vin), offs_dv, NDV, svd)
    dk1 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dk2 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=ACC)
    s_lo = cb * CH
    s_hi = tl.minimum(s_lo + CH, S - 1)
    nqb = tl.cdiv(NJ - blk * BLOCK, BLOCK)  # query blocks at or after the key block (b < i)
    for it in range(
        0, (s_hi - s_lo) * nqb
    ):  # one flat loop over (fibre s, query block): pipelined loads
        s = s_lo + it // nqb
        offs_m = blk * BLOCK + (it % nqb) * BLOCK + tl.arange(0, BLOCK)
        tq, rowq, qin, _ = _key_rows(fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        q1, q2 = _load_qk(
            Q + b * sqb + h * sqh, tq * sqt, qin, offs_m, Rot, offs_h, D1, D2, sqd, ROPE
        )
        do = _load_rows(DO + b * sdob + h * sdoh, tq * sdot, rowq & (tq < n_o), offs_dv, NDV, sdod)
        lse = tl.load(Lse + (b * H + h) * N + tq, mask=rowq, other=float("inf"))
        delta = tl.load(Delta + (b * H + h) * N + tq, mask=rowq, other=0.0)
        sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
        ok = kok[None, :] & rowq[:, None] & (offs_n[None, :] < offs_m[:, None])
        pm = tl.where(ok, tl.exp2(sc - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(pm.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = tl.trans((pm * (dp - delta[:, None])).to(q1.dtype))
        dk1 += tl.dot(ds, q1, input_precision=DOT_PREC)
        dk2 += tl.dot(ds, q2, input_precision=DOT_PREC)
    row = (((b * H + h) * P + p) * C + cb) * NJ + offs_n
    _store_grad(
        DKS, row * D, rowk, rowk, offs_n, Rot, offs_h, D1, D2, 1, dk1, dk2, scale, ROPE, False
    )
    tl.store(
        DVS + row[:, None] * NDV + offs_dv[None, :],
        dv,
        mask=rowk[:, None] & (offs_dv[None, :] < NDV),
    )


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int  # query rows per program (forward)
    block_n: int  # key rows per inner step (forward)
    block: int  # rows per block in the backward (keys in phase 1, queries in phase 2)
    num_warps: int  # warps per forward program
    num_stages: int  # software-pipelining depth of the inner loops
    bwd_warps: (
        int  # warps per backward program (more: dk, dv and dq accumulators live in registers)
    )


# Benchmarks set fields here (e.g. {"bwd_warps": 4}) to compare configs without editing the table below.
# A non-empty override also turns autotuning off, so the configs compared are the ones that run.
CONFIG_OVERRIDE: dict = {}
# None (default): on CUDA GPUs the table was not tuned on, hops are autotuned once per process and
# fibre-length bucket (``_tuner``: triton.autotune over the candidates below, the table's among them). On the H200,
# where the table was swept, autotune's picks were mixed (faster forwards on 128-long fibres, up to
# 20% slower elsewhere: the backward's timings include restoring dq and dk) and tuning at 128k took
# over a minute (docs/performance.md), so the table stays. True / False: always / never.
# The interpreter and CONFIG_OVERRIDE always use the table.
AUTOTUNE: bool | None = None
_TABLE_GPUS = ("NVIDIA H200",)  # devices the table was tuned on (benchmarks/attention.py --sweep)


def _config(nj: int, d: int, dv: int) -> _Config:
    """Fixed meta-parameters: 16-row blocks under the interpreter, else sized to the fibre and head dim."""
    base = _Config(16, 16, 16, 1, 1, 1) if _INTERPRET else _gpu_config(nj, d, dv)
    cfg = dataclasses.replace(base, **CONFIG_OVERRIDE)
    assert max(cfg.block_m, cfg.block_n, cfg.block) <= _MAX_BLOCK, cfg
    return cfg


def _gpu_config(nj: int, d: int, dv: int) -> _Config:
    """Blocks as large as useful: the fibre rounded up, capped by the register room of the head dim."""
    fib = _blk(nj)
    wide = max(d, dv) > 128
    bm = min(fib, 64 if wide else 128)
    bn = min(fib, 32 if wide else 64)
    bb = min(fib, 32 if wide else 64)
    # bwd_warps 4: 20.1 ms against 25.0 ms with 8 (128k causal fwd+bwd, H200, docs/performance.md)
    return _Config(bm, bn, bb, 8 if bm >= 128 else 4, 2, 4)


def _use_autotune(device: torch.device) -> bool:
    if _INTERPRET or CONFIG_OVERRIDE or AUTOTUNE is False:
        return False
    return AUTOTUNE or _device_name(device) not in _TABLE_GPUS


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


# Autotune candidates (block_m, block_n, warps, stages) and (block, warps, stages), clipped to the
# hop by the prune functions below (the table's blocks are the largest useful); the table's config
# is always among them.
_FWD_CANDIDATES = (
    (128, 64, 8, 2),
    (128, 64, 4, 2),
    (128, 32, 8, 3),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
)
_BWD_CANDIDATES = ((64, 4, 2), (64, 8, 2), (64, 4, 3), (32, 4, 2), (32, 4, 3), (32, 8, 2))
# Tuned once per fibre-length bucket (a power of two: one tuner each, ``_tuner``) and these settings,
# not per shape: P, S and the coarsest n_j change with every sequence length, and retuning each
# would stall variable-length inputs (a text model's prompts) for seconds per new length.
_TUNE_KEY = ["D1", "D2", "NDV", "CAUSAL", "SUMMARY", "ROPE", "MASKED"]


def _fwd_candidates(configs, named_args, **kwargs) -> list:
    """Forward configs for this hop: blocks no larger than the fibre or the head dim's register room."""
    table = _gpu_config(named_args["NJ"], kwargs["D1"] + kwargs["D2"], kwargs["NDV"])
    seen = {(table.block_m, table.block_n, table.num_warps, table.num_stages): None}
    for bm, bn, warps, stages in _FWD_CANDIDATES:
        bm, bn = min(bm, table.block_m), min(bn, table.block_n)
        seen.setdefault((bm, bn, warps if bm >= 64 else 4, stages), None)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in seen
    ]


def _bwd_candidates(configs, named_args, **kwargs) -> list:
    """Backward configs: one block per fibre when SINGLE (the fibre rounded up), else blocks below it."""
    table = _gpu_config(named_args["NJ"], kwargs["D1"] + kwargs["D2"], kwargs["NDV"])
    seen = {(table.block, table.bwd_warps, table.num_stages): None}
    for block, warps, stages in _BWD_CANDIDATES:
        seen.setdefault(
            (table.block if kwargs["SINGLE"] else min(block, table.block), warps, stages), None
        )
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in seen]


_TUNERS: dict[tuple[str, int], triton.runtime.Autotuner] = {}


def _tuner(direction: str, nj: int) -> triton.runtime.Autotuner:
    """The autotuned kernel of one direction for fibres of up to ``_blk(nj)`` rows (one clipped candidate list).

    triton.autotune only tunes when it holds more than one config: it gets the unclipped candidates,
    and the prune functions replace them with the hop's clipped list. The backward accumulates dq and
    dk in place across hops, so every timed run restores them.
    """
    key = (direction, _blk(nj))
    if key not in _TUNERS:
        if direction == "fwd":
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in _FWD_CANDIDATES
            ]
            tune = triton.autotune(
                configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _fwd_candidates}
            )
            _TUNERS[key] = tune(_hop_fwd_kernel)
        else:
            configs = [
                triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
                for b, w, s in _BWD_CANDIDATES
            ]
            tune = triton.autotune(
                configs,
                key=_TUNE_KEY,
                prune_configs_by={"early_config_prune": _bwd_candidates},
                restore_value=["DQ", "DK"],
            )
            _TUNERS[key] = tune(_hop_bwd_kernel)
    return _TUNERS[key]


def _launch(
    direction: str, programs: int, nj: int, fixed: dict, device, args: tuple, meta: dict
) -> None:
    """One hop kernel over ``programs`` fibres (x the fibre's row blocks): autotuned or the table's ``fixed``."""
    kernel, block = (
        (_hop_fwd_kernel, "BLOCK_M") if direction == "fwd" else (_hop_bwd_kernel, "BLOCK")
    )
    if _use_autotune(device):
        _tuner(direction, nj)[lambda c: (programs * triton.cdiv(nj, c[block]),)](*args, **meta)
    else:
        kernel[(programs * triton.cdiv(nj, fixed[block]),)](*args, **meta, **fixed)


def _blk(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


# ----------------------------------------------------------------------------------------------
# Plan and validity (host)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    dim: int  # fold dim hopped along (0 = coarsest)
    P: int  # prod of coarser dims
    nj: int  # fibre length
    S: int  # prod of finer dims (token stride of the fibre)
    summary: bool  # causal full coverage: attend to summary keys of earlier sibling blocks


@dataclass(frozen=True)
class _Plan:
    dims: tuple[int, ...]
    n: int
    N: int
    hops: tuple[_Hop, ...]
    causal: bool
    scale: float
    masked: bool  # validity bytes needed (padding or key_padding_mask)


def _make_plan(dims, n, d, causal, coverage, hop_order, scale, key_padding_mask) -> _Plan:
    m, N = len(dims), math.prod(dims)
    order = tuple(range(m - 1, -1, -1)) if hop_order is None else tuple(hop_order)
    hops, processed = [], set()
    for j in order:
        P, nj, S = math.prod(dims[:j]), dims[j], math.prod(dims[j + 1 :])
        summary = causal and coverage == "full" and S > 1 and processed == set(range(j + 1, m))
        hops.append(_Hop(j, P, nj, S, summary))
        processed.add(j)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _Plan(
        tuple(dims), n, N, tuple(hops), causal, scale, key_padding_mask is not None or N > n
    )


def _validity(plan: _Plan, B: int, key_padding_mask, device) -> torch.Tensor:
    """(m + 1, B, N) uint8: level 0 = real unmasked tokens; level k+1 = attended a valid key in hop k."""
    valid = torch.zeros(B, plan.N, dtype=torch.bool, device=device)
    valid[:, : plan.n] = True if key_padding_mask is None else key_padding_mask.to(torch.bool)
    levels = [valid]
    for hop in plan.hops:
        vf = valid.view(B, hop.P, hop.nj, hop.S).to(torch.uint8)
        if plan.causal:
            reach = vf.cummax(dim=2).values
        else:
            reach = vf.amax(dim=2, keepdim=True).expand_as(vf)
        if hop.summary:
            last = (
                vf[:, :, :, hop.S - 1].cummax(dim=2).values
            )  # (B, P, nj): any summary b <= i valid
            earlier = torch.zeros_like(last)
            earlier[:, :, 1:] = last[:, :, :-1]  # strictly earlier blocks b < i
            not_last = (torch.arange(hop.S, device=device) != hop.S - 1).to(torch.uint8)
            reach = torch.maximum(reach, earlier[..., None] * not_last)
        valid = reach.reshape(B, plan.N).bool()
        levels.append(valid)
    return torch.stack(levels).to(torch.uint8).contiguous()


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan")) if POISON else torch.empty_like(x)


def _out_like_q(q: torch.Tensor, dv: int) -> torch.Tensor:
    """(B, H, n, dv) output in q's layout: heads-inner views give a (B, n, H, dv) buffer."""
    B, H, n, _ = q.shape
    if q.stride(1) < q.stride(2):
        return _empty((B, n, H, dv), q.dtype, q.device).transpose(1, 2)
    return _empty((B, H, n, dv), q.dtype, q.device)


def _kernel_dtypes(dtype: torch.dtype):
    """Accumulator dtype and dot precision: exact fp32 products for fp32 inputs (no tf32)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return acc, "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _forward(q, k, v, plan: _Plan, rotation, valid, need_backward: bool, gates=None):
    """All hops; returns the output, the m - 1 intermediate states, the (m, B, H, N) logsumexp and, with
    ``gates`` (H, m - 1), the raw (unmixed) outputs of hops 1..m-1 that the backward needs.

    A gated hop's kernel writes its raw output; ``torch.lerp`` then mixes it with the hop's input."""
    B, H, n, d = q.shape
    G, dv, N, m = H // k.shape[1], v.shape[-1], plan.N, len(plan.hops)
    acc, prec = _kernel_dtypes(q.dtype)
    D1, D2 = (d + 1) // 2, d // 2
    lse = torch.empty(
        (m, B, H, N),
        dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
        device=q.device,
    )
    if not need_backward:
        lse = lse[:1]
    dummy = valid if valid is not None else torch.zeros(1, dtype=torch.uint8, device=q.device)
    rope = rotation is not None
    rot = rotation if rope else torch.zeros(1, dtype=lse.dtype, device=q.device)
    states, raws, vin = [], [], v
    for idx, hop in enumerate(plan.hops):
        first, last = idx == 0, idx == m - 1
        gate = (
            None if gates is None or first else gates[:, idx - 1].to(lse.dtype)[None, :, None, None]
        )
        out = (
            _out_like_q(q, dv)
            if last and gate is None
            else _empty((B, H, N, dv), q.dtype, q.device)
        )
        args = (
            q,
            k,
            vin,
            out,
            lse[idx if need_backward else 0],
            dummy[idx] if valid is not None else dummy,
            dummy[0] if valid is not None else dummy,
            rot,
            *_strides(q),
            *_strides(k),
            *_strides(vin),
            *_strides(out),
            n,
            N,
            H,
            G,
            G if first else 1,
            hop.P,
            hop.nj,
            hop.S,
            n if first else N,
            n if last else N,
            plan.scale * math.log2(math.e),
        )
        meta = dict(
            D1=D1,
            D2=D2,
            NDV=dv,
            CAUSAL=plan.causal,
            SUMMARY=hop.summary,
            ROPE=rope,
            MASKED=plan.masked,
            STORE_LSE=need_backward,
            BLOCK_DH=_blk(D1),
            BLOCK_DV=_blk(dv),
            ACC=acc,
            DOT_PREC=prec,
        )
        cfg = _config(hop.nj, d, dv)
        fixed = dict(
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        _launch("fwd", B * H * hop.P * hop.S, hop.nj, fixed, q.device, args, meta)
        if gate is not None:
            if need_backward:
                raws.append(out)
            # vin + g * (out - vin) in fp32 (fp64), rounded once; rows >= n of the last hop are dropped below
            out = torch.lerp(vin.to(gate.dtype), out.to(gate.dtype), gate).to(q.dtype)
        if need_backward and not last:
            states.append(out)
        vin = out
    if gates is not None:
        vin = vin[:, :, :n]
    return vin, states, lse, raws


def _summary_chunks(B: int, H: int, P: int, nb: int, S: int) -> int:
    """Split the S - 1 sibling fibres into chunks so the summary kernel has enough programs."""
    target = 4 if _INTERPRET else 1024
    return max(1, min(S - 1, -(-target // (B * H * P * nb))))


def _backward(
    grad_out, q, k, v, out, states, lse, valid, rotation, plan: _Plan, gates=None, raws=()
):
    """dq, dk, dv (and the gates' gradient, (H, m - 1), or None).

    A gated hop (``V' = V + g (hop(V) - V)``) back-propagates g * dV' through its kernel, (1 - g) * dV'
    straight to V, and rowsum(dV' * (hop(V) - V)) to g. Its rowsum(dO * O) is then computed here for
    every hop (DELTA_IN), since the kernels' fused DELTA_OUT is rowsum over the unmixed rows."""
    B, H, n, d = q.shape
    Hkv = k.shape[1]
    G, dv, N, m = H // Hkv, v.shape[-1], plan.N, len(plan.hops)
    acc, prec = _kernel_dtypes(q.dtype)
    D1, D2 = (d + 1) // 2, d // 2
    dummy = valid if valid is not None else torch.zeros(1, dtype=torch.uint8, device=q.device)
    rope = rotation is not None
    rot = rotation if rope else torch.zeros(1, dtype=lse.dtype, device=q.device)
    dq, dk = _empty_like(q), _empty_like(k)
    dgates = None if gates is None else torch.zeros(gates.shape, dtype=lse.dtype, device=q.device)
    do, delta = grad_out, None
    for idx in range(m - 1, -1, -1):
        hop = plan.hops[idx]
        first, last = idx == 0, idx == m - 1
        o = out if last else states[idx]
        vin = v if first else states[idx - 1]
        mixed_grad, wt = None, lse.dtype  # fp32 (fp64 for fp64 inputs), as the kernels accumulate
        if gates is not None:
            if not first:  # o is the mixed output: the kernel sees the raw one and g * dV'
                o, mixed_grad = raws[idx - 1], do
                g = gates[:, idx - 1].to(wt)[None, :, None, None]
                rows = o.shape[2] if not last else n
                dgates[:, idx - 1] = (
                    do.to(wt) * (o[:, :, :rows].to(wt) - vin[:, :, :rows].to(wt))
                ).sum((0, 2, 3))
                do = g * do.to(wt)
            do = do.to(
                q.dtype
            )  # what the kernel reads; delta from the same rows keeps dS consistent
            delta = (do.to(wt) * o[:, :, : do.shape[2]].to(wt)).sum(-1).to(lse.dtype)
            if do.shape[2] < N:  # the last hop's rows past n have no gradient
                delta = torch.nn.functional.pad(delta, (0, N - do.shape[2])).contiguous()
        # dv is allocated last: one (B, H, n, dv) buffer less at the peak of the backward
        # gated: the gradient of an intermediate state stays in fp32 (fp64), since it feeds the gates' sums
        # and the residual path besides the next kernel (which gets it rounded to q's dtype)
        dvin = (
            _empty_like(v)
            if first
            else _empty((B, H, N, dv), lse.dtype if gates is not None else q.dtype, q.device)
        )
        if delta is None:  # last hop: rowsum(dO * O) from the output, stored for the summary kernel
            delta = (
                torch.empty((B, H, N), dtype=lse.dtype, device=q.device)
                if hop.summary
                else lse[idx]
            )
        # written only with DELTA_OUT (not for the first hop, nor when gated): else any buffer will do
        delta_next = (
            lse[idx]
            if first or gates is not None
            else torch.empty((B, H, N), dtype=lse.dtype, device=q.device)
        )
        vin_lvl = dummy[idx] if valid is not None else dummy
        v0 = dummy[0] if valid is not None else dummy
        cfg = _config(hop.nj, d, dv)
        args = (
            q,
            k,
            vin,
            o,
            do,
            dq,
            dk,
            dvin,
            lse[idx],
            delta,
            delta_next,
            vin_lvl,
            v0,
            rot,
            *_strides(q),
            *_strides(k),
            *_strides(vin),
            *_strides(o),
            *_strides(do),
            *_strides(dq),
            *_strides(dk),
            *_strides(dvin),
            n,
            N,
            H,
            G,
            hop.P,
            hop.nj,
            hop.S,
            n if first else N,
            n if last else N,
            n if first else N,
            plan.scale,
            plan.scale * math.log2(math.e),
        )
        gated = gates is not None
        meta = dict(
            D1=D1,
            D2=D2,
            NDV=dv,
            CAUSAL=plan.causal,
            SUMMARY=hop.summary,
            ROPE=rope,
            MASKED=plan.masked,
            FIRST=first,
            ACCUM=not last,
            STORE_DELTA=last and hop.summary and not gated,
            DELTA_IN=gated or not last,
            DELTA_OUT=not first and not gated,
            SINGLE=hop.nj <= cfg.block,
            BLOCK_DH=_blk(D1),
            BLOCK_DV=_blk(dv),
            ACC=acc,
            DOT_PREC=prec,
        )
        fixed = dict(BLOCK=cfg.block, num_warps=cfg.bwd_warps, num_stages=cfg.num_stages)
        _launch("bwd", B * Hkv * hop.P * hop.S, hop.nj, fixed, q.device, args, meta)
        if hop.summary:
            dvs = _summary_backward(
                q,
                k,
                vin,
                do,
                dk,
                dvin,
                lse[idx],
                delta,
                vin_lvl,
                v0,
                rot,
                rope,
                valid,
                plan,
                hop,
                cfg,
                last,
            )
            # the summary rows' dV grew by dvs: their rowsum(dV * V) for the next backward hop too
            if not first and not gated:
                vrows = vin.view(B, H, hop.P, hop.nj, hop.S, dv)[:, :, :, :, hop.S - 1]
                delta_next.view(B, H, hop.P, hop.nj, hop.S)[..., hop.S - 1] += (
                    dvs * vrows.to(dvs.dtype)
                ).sum(-1)
        if mixed_grad is not None:
            dvin[:, :, : mixed_grad.shape[2]] += ((1 - g) * mixed_grad.to(wt)).to(dvin.dtype)
        do, delta = dvin, delta_next
    return dq, dk, do, dgates


def _summary_backward(
    q, k, vin, do, dk, dvin, lse, delta, vin_lvl, v0, rot, rope, valid, plan, hop, cfg, last
):
    """Summary-key gradients: partial sums from the kernel, added to the (p, :, S-1) rows on the host."""
    B, H, n, d = q.shape
    Hkv, dv, N = k.shape[1], vin.shape[-1], plan.N
    acc, prec = _kernel_dtypes(q.dtype)
    D1, D2 = (d + 1) // 2, d // 2
    nb = triton.cdiv(hop.nj, cfg.block)
    C = _summary_chunks(B, H, hop.P, nb, hop.S)
    CH = -(-(hop.S - 1) // C)
    C = -(-(hop.S - 1) // CH)
    dks = torch.empty((B, H, hop.P, C, hop.nj, d), dtype=lse.dtype, device=q.device)
    dvs = torch.empty((B, H, hop.P, C, hop.nj, dv), dtype=lse.dtype, device=q.device)
    _hop_bwd_summary_kernel[(B * H * hop.P * nb * C,)](
        q,
        k,
        vin,
        do,
        lse,
        delta,
        vin_lvl,
        v0,
        rot,
        dks,
        dvs,
        *_strides(q),
        *_strides(k),
        *_strides(vin),
        *_strides(do),
        n,
        N,
        H,
        H // Hkv,
        hop.P,
        hop.nj,
        hop.S,
        N,
        n if last else N,
        C,
        CH,
        plan.scale,
        plan.scale * math.log2(math.e),
        D1=D1,
        D2=D2,
        D=d,
        NDV=dv,
        ROPE=rope,
        MASKED=plan.masked,
        BLOCK=cfg.block,
        BLOCK_DH=_blk(D1),
        BLOCK_DV=_blk(dv),
        ACC=acc,
        DOT_PREC=prec,
        num_warps=cfg.bwd_warps,
        num_stages=cfg.num_stages,
    )
    P, nj, S = hop.P, hop.nj, hop.S
    dvs = dvs.sum(3)  # (B, H, P, nj, dv)
    dvin.view(B, H, P, nj, S, dv)[:, :, :, :, S - 1] += dvs.to(dvin.dtype)
    # summary token of (p, c) is (p * nj + c) * S + S - 1: increasing, and below n for the first n // S
    keep = n // S
    tok = torch.arange(keep, device=q.device) * S + S - 1
    dks = dks.sum(3).view(B, Hkv, H // Hkv, P * nj, d).sum(2)[:, :, :keep]  # (B, Hkv, keep, d)
    if valid is not None:
        dks = dks * valid[0][:, tok].to(dks.dtype)[:, None, :, None]
    dk.index_add_(2, tok, dks.to(dk.dtype))
    return dvs


# ----------------------------------------------------------------------------------------------
# autograd.Function and the backend entry point
# ----------------------------------------------------------------------------------------------


class _FibreAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rotation, plan, key_padding_mask, gates):
        need_backward = any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[6]
        valid = _validity(plan, q.shape[0], key_padding_mask, q.device) if plan.masked else None
        out, states, lse, raws = _forward(q, k, v, plan, rotation, valid, need_backward, gates)
        if need_backward:
            ctx.plan, ctx.n_states, ctx.n_raws = plan, len(states), len(raws)
            ctx.has_valid, ctx.has_rope, ctx.has_gates = (
                valid is not None,
                rotation is not None,
                gates is not None,
            )
            extra = [x for x in (valid, rotation, gates) if x is not None]
            ctx.save_for_backward(q, k, v, out, lse, *states, *raws, *extra)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        states, raws, rest = (
            rest[: ctx.n_states],
            rest[ctx.n_states : ctx.n_states + ctx.n_raws],
            rest[ctx.n_states + ctx.n_raws :],
        )
        valid = rest.pop(0) if ctx.has_valid else None
        rotation = rest.pop(0) if ctx.has_rope else None
        gates = rest.pop(0) if ctx.has_gates else None
        dq, dk, dv, dgates = _backward(
            grad_out, q, k, v, out, states, lse, valid, rotation, ctx.plan, gates, raws
        )
        dgates = None if dgates is None else dgates.to(gates.dtype)
        return dq, dk, dv, None, None, None, dgates


def fallback_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hop_positional
) -> str | None:
    """Why the Triton kernels cannot run this call (None when they can); such calls use the reference."""
    if not (q.is_cuda or _INTERPRET):
        return f"tensors on {q.device} and TRITON_INTERPRET is not set"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype} is not supported"
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        return f"head dims ({q.shape[-1]}, {v.shape[-1]}) exceed {_MAX_HEAD_DIM}"
    if hop_positional is not None and type(hop_positional) is not TensorRoPE:
        return f"per-hop positional scheme {type(hop_positional).__name__} has no kernel (only TensorRoPE)"
    return None


def tensorized_fibre_attention(
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
    hop_positional=None,
    key_padding_mask: torch.Tensor | None = None,
    hop_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-hop fibre attention on Triton. q (B, H, n, d), k (B, Hkv, n, d), v (B, Hkv, n, dv) -> (B, H, n, dv).

    Same signature and results as ``fibre_attention_reference``; inputs may be strided views.
    Calls the kernels cannot run (see ``fallback_reason``) go to the reference with a warning.
    """
    reason = fallback_reason(q, k, v, hop_positional)
    if reason is not None:
        warnings.warn(
            f"seqtensor triton backend: using the reference ({reason})",
            RuntimeWarning,
            stacklevel=2,
        )
        return fibre_attention_reference(
            q,
            k,
            v,
            dims,
            n,
            causal=causal,
            coverage=coverage,
            hop_order=hop_order,
            scale=scale,
            hop_positional=hop_positional,
            key_padding_mask=key_padding_mask,
            hop_gates=hop_gates,
        )
    if (
        key_padding_mask is not None
    ):  # masked tokens zeroed, as the reference does: NaN/inf there would leak via 0 * NaN
        keep = key_padding_mask[:, None, :, None]
        q, k, v = (x.masked_fill(~keep, 0) for x in (q, k, v))
    plan = _make_plan(dims, n, q.shape[-1], causal, coverage, hop_order, scale, key_padding_mask)
    rotation = None
    if hop_positional is not None:
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        rotation = _rotation_table(hop_positional.inv_freq, max(dims), work, q.device)
    return _FibreAttention.apply(q, k, v, rotation, plan, key_padding_mask, hop_gates)


def _rotation_table(
    inv_freq: torch.Tensor, max_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """(positions, 2 * D1) [cos | sin] of pos * inv_freq; rows past max_dim cover blocks' masked tails."""
    pos = torch.arange(max_dim + _MAX_BLOCK, dtype=torch.float64, device=device)
    angles = pos[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype).contiguous()
