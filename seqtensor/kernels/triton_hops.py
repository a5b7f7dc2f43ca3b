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
- tensor_rope (cos / sin of pos * inv_freq read from a small table, fp16 for bf16 inputs and the
  working precision otherwise, cached on the ``TensorRoPE`` module). Training runs it in one frame
  for all hops: q and k are rotated once, before the first hop, by the sum of the token's fold
  coordinates (``frame_positions``, ``_rotate_kernel``). A fibre's tokens share every coordinate
  but i_j, so the shared part of the angle cancels in q . k and the score is the hop's own
  tensor_rope score (angle i_j - i'_j). A summary key (p, c, S - 1) differs from a query (p, i, s)
  in its finer coordinates too: the query is turned by the scalar Pos[S - 1] - Pos[s] for those
  keys (the backward turns the keys back instead, so dq stays in the frame of q). The hop kernels
  load plain rows; dq and dk accumulate across hops in the frame and the last backward hop
  un-rotates them as it stores them. A forward alone (no autograd) rotates q and k rows at their
  fibre coordinates as the kernels load them: without a backward to share them with, the frame's
  two passes cost more than they save (benchmarks/NOTES.md, "tensor_rope in one frame").
- Backward recomputes each hop from q, k, the hop's input value state and its logsumexp. Saved for
  backward: the m - 1 intermediate value states (input dtype), per-hop logsumexp (fp32, (B, H, N)),
  and the validity bytes. dq and dk accumulate across hops in the gradient dtype (read-add-write;
  the first backward hop writes without reading), so no fp32 copies of q or k are made. When a
  fibre fits one block (n_j <= BLOCK, the common case) one program computes S, P and dS once for
  dq, dk and dv together. Each backward hop also writes rowsum(dV * V) for the rows whose dV it
  produced: that is the next backward hop's delta = rowsum(dO * O), so O is read only once.
  Peak memory of forward+backward stays within 1% of FlashAttention's (docs/performance.md).
- NaN stays NaN: a row's softmax sum is tested for == 0 (no valid key: output 0), never > 0.

The hops (order, (P, n_j, S), summary keys) come from ``core.plan.hop_plan``; block sizes, warps
and autotuning from ``kernels.tuning``.

Unsupported calls (CPU tensors without TRITON_INTERPRET, per-hop positional schemes other than
TensorRoPE, head dims above 256) run the reference with a RuntimeWarning: see ``fallback_reason``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..core.plan import HopPlan, hop_plan
from ..core.positional import TensorRoPE
from . import tuning
from .reference import fibre_attention_reference
from .tuning import MAX_BLOCK, block_size, config, launch

__all__ = [
    "tensorized_fibre_attention",
    "fallback_reason",
    "rotate_for_hop",
    "rotate_to_frame",
    "frame_positions",
]

# Tests set this to fill every buffer the kernels write with NaN first (catches unwritten rows).
POISON = False
_MAX_HEAD_DIM = 256


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
    s = tl.load(ptr + D1, mask=hmask, other=0.0)
    if Rot.dtype.element_ty == tl.float16:  # bf16 inputs' half-size table: rotate in fp32
        c = c.to(tl.float32)
        s = s.to(tl.float32)
    return _rotate_by(x1, x2, c, s, SIGN)


@triton.jit
def _rotate_by(x1, x2, c, s, SIGN: tl.constexpr):
    """(x1, x2) turned by cos ``c`` and sin ``s`` (broadcast against the rows), in their dtype."""
    s = s * SIGN
    a = x1.to(c.dtype)
    b = x2.to(c.dtype)
    return a * c - b * s, b * c + a * s


@triton.jit
def _load_rotated(X, rows, row_mask, pos, Rot, offs_h, D1, D2, stride_d):
    """Rows of X rotated by the table Rot at positions ``pos``, rounded to X's dtype."""
    x1, x2 = _load_halves(X, rows, row_mask, offs_h, D1, D2, stride_d)
    r1, r2 = _rotate(x1, x2, pos, Rot, offs_h, D1, 1)
    return r1.to(X.dtype.element_ty), r2.to(X.dtype.element_ty)


@triton.jit
def _load_qk(X, rows, row_mask, pos, Rot, offs_h, D1, D2, stride_d, ROPE: tl.constexpr):
    """q or k rows in X's dtype, rotated at positions ``pos`` when ROPE."""
    if ROPE:
        x1, x2 = _load_rotated(X, rows, row_mask, pos, Rot, offs_h, D1, D2, stride_d)
    else:
        x1, x2 = _load_halves(X, rows, row_mask, offs_h, D1, D2, stride_d)
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
def _rotate_kernel(
    X,
    Y,
    Rot,
    Pos,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_xd,
    stride_yb,
    stride_yh,
    stride_yt,
    stride_yd,
    n,
    H,
    NJ,
    S,
    D1: tl.constexpr,
    D2: tl.constexpr,
    POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    """Y = X rotated by the table Rot at each token's position: Pos[t] (POS) or the hop coordinate
    (t // S) % NJ. BLOCK_T rows of one head per program, rotated in the table's precision (fp32 for
    bf16) and rounded once to Y's dtype."""
    TB = tl.cdiv(n, BLOCK_T)
    pid = tl.program_id(0)
    tb = pid % TB
    r = pid // TB
    h = r % H
    b = (r // H).to(tl.int64)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = t < n
    t64 = t.to(tl.int64)
    if POS:
        pos = tl.load(Pos + t64, mask=rows, other=0)
    else:
        pos = (t // S) % NJ
    offs_h = tl.arange(0, BLOCK_DH)
    x1, x2 = _load_rotated(
        X + b * stride_xb + h * stride_xh,
        t64 * stride_xt,
        rows,
        pos,
        Rot,
        offs_h,
        D1,
        D2,
        stride_xd,
    )
    Yp = Y + b * stride_yb + h * stride_yh
    _store_halves(Yp, t64 * stride_yt, rows, offs_h, D1, D2, stride_yd, x1, x2)


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
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
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
        k1, k2 = _load_qk(Kp, tk * stride_kt, kin, offs_n, Rot, offs_h, D1, D2, stride_kd, ROPE)
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
        v = tl.load(
            Vp + tk[:, None] * stride_vt + offs_dv[None, :] * stride_vd, mask=vmask, other=0.0
        )
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
    Turn,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
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
    SHIFT: tl.constexpr,
    MASKED: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One hop for BLOCK_M queries of one fibre of one head: O = softmax(q k^T) V_in over the
    keys."""
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
    q1, q2 = _load_qk(
        Q + b * stride_qb + h * stride_qh,
        tq * stride_qt,
        qin,
        offs_m,
        Rot,
        offs_h,
        D1,
        D2,
        stride_qd,
        ROPE,
    )
    Kp = K + b * stride_kb + (h // G) * stride_kh
    Vp = V + b * stride_vb + (h // VG) * stride_vh

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
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
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
        if SHIFT:  # the query turned to the summary keys' finer coordinates
            qs1, qs2 = _turn(q1, q2, Turn, s, offs_h, D1, 1)
            q1 = qs1.to(Q.dtype.element_ty)
            q2 = qs2.to(Q.dtype.element_ty)
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
            stride_kt,
            stride_kd,
            stride_vt,
            stride_vd,
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

    # Rows with no valid key (l_i == 0, acc == 0) output 0. A NaN logit or value makes l_i or acc
    # NaN whether or not tl.max skipped it (GPUs' max.f32 does, the interpreter's numpy does not);
    # the test is l_i == 0 rather than l_i > 0 so that NaN stays NaN, as in SDPA.
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    out = acc / l_safe[:, None]
    omask = (rowq & (tq < n_out))[:, None] & (offs_dv[None, :] < NDV)
    tl.store(
        O + b * stride_ob + h * stride_oh + tq[:, None] * stride_ot + offs_dv[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=omask,
    )
    if STORE_LSE:
        lse = tl.where(l_i == 0, float("inf"), m_i + tl.log2(l_safe))
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
    Turn,
    s,
    key_base,
    lo,
    hi,
    S,
    NJ,
    n,
    n_vin,
    vrow,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_h,
    offs_dv,
    D1,
    D2,
    NDV,
    qk_scale,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    SHIFT: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq (before the logit scale) from the key rows ``key_base + c * S``, c in [lo, hi). SHIFT
    (summary keys): the keys are turned back by row s of Turn, which scores them as the
    forward's turned query does and leaves dq in the frame of q (no second accumulator)."""
    for start in range(lo, hi, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        tk, rowk, kin, kok = _key_rows(key_base, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        k1, k2 = _load_halves(Kp, tk * stride_kt, kin, offs_h, D1, D2, stride_kd)
        if SHIFT:
            r1, r2 = _turn(k1, k2, Turn, s, offs_h, D1, -1)
            k1 = r1.to(Kp.dtype.element_ty)
            k2 = r2.to(Kp.dtype.element_ty)
        v = _load_rows(Vp, tk * stride_vt, rowk & (tk < n_vin), offs_dv, NDV, stride_vd)
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
    tok,
    Pos,
    Rot,
    offs_h,
    D1,
    D2,
    stride_d,
    x1,
    x2,
    scale,
    UNROTATE: tl.constexpr,
    ACCUM: tl.constexpr,
):
    """Scale, zero rows of invalid tokens, add to DX if ACCUM, un-rotate the sum if UNROTATE (the
    transpose of the frame rotation at the positions Pos[tok]), store."""
    x1 = x1 * scale
    x2 = x2 * scale
    x1 = tl.where(xin[:, None], x1, 0.0)
    x2 = tl.where(xin[:, None], x2, 0.0)
    if ACCUM:
        o1, o2 = _load_halves(DXp, rows, rmask, offs_h, D1, D2, stride_d)
        x1 += o1.to(x1.dtype)
        x2 += o2.to(x2.dtype)
    if UNROTATE:
        pos = tl.load(Pos + tok, mask=rmask, other=0)
        x1, x2 = _rotate(x1, x2, pos, Rot, offs_h, D1, -1)
    _store_halves(DXp, rows, rmask, offs_h, D1, D2, stride_d, x1, x2)


@triton.jit
def _turn(x1, x2, Turn, s, offs_h, D1, SIGN: tl.constexpr):
    """Rows x1, x2 all rotated by row ``s`` of Turn (SIGN -1: back): the angle that takes a query of
    fibre s to the finer coordinates of the summary keys. Turn's rows are indexed by the loop's own
    s, so no load waits on another (a loaded angle stalled pipelined loops)."""
    ptr = Turn + s * (2 * D1) + offs_h
    hmask = offs_h < D1
    c = tl.load(ptr, mask=hmask, other=1.0)[None, :]
    sn = tl.load(ptr + D1, mask=hmask, other=0.0)[None, :]
    if Turn.dtype.element_ty == tl.float16:  # as in _rotate
        c = c.to(tl.float32)
        sn = sn.to(tl.float32)
    return _rotate_by(x1, x2, c, sn, SIGN)


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
    stride_ot,
    stride_od,
    ACC: tl.constexpr,
    DELTA_IN: tl.constexpr,
    STORE: tl.constexpr,
):
    """delta_i = dO_i . O_i: read from Dl (written by the previous backward hop) or computed from O
    rows."""
    if DELTA_IN:
        delta = tl.load(Dl + tq, mask=rowq, other=0.0)
    else:
        o = _load_rows(Op, tq * stride_ot, orow, offs_dv, NDV, stride_od)
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
    Pos,
    Turn,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
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
    SHIFT: tl.constexpr,
    UNROTATE: tl.constexpr,
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
    Kp = K + b * stride_kb + hk * stride_kh
    DKp = DK + b * stride_dkb + hk * stride_dkh

    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    tk, rowk, kin, kok = _key_rows(fib + s, offs_n, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
    k1, k2 = _load_halves(Kp, tk * stride_kt, kin, offs_h, D1, D2, stride_kd)
    dk1 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dk2 = tl.zeros([BLOCK, BLOCK_DH], dtype=ACC)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=ACC)
    v = _load_rows(
        V + b * stride_vb + hk * stride_vh,
        tk * stride_vt,
        rowk & (tk < n_vin),
        offs_dv,
        NDV,
        stride_vd,
    )
    hi = NJ
    if CAUSAL:
        hi = tl.minimum(NJ, (blk + 1) * BLOCK)

    if SINGLE:  # rows offs_n are the fibre's keys and its queries
        orow = rowk & (tk < n_o)
        for g in range(G):
            h = hk * G + g
            Vp = V + b * stride_vb + hk * stride_vh
            if not FIRST:
                Vp = V + b * stride_vb + h * stride_vh
                v = _load_rows(Vp, tk * stride_vt, rowk & (tk < n_vin), offs_dv, NDV, stride_vd)
            q1, q2 = _load_halves(
                Q + b * stride_qb + h * stride_qh, tk * stride_qt, kin, offs_h, D1, D2, stride_qd
            )
            do = _load_rows(
                DO + b * stride_dob + h * stride_doh,
                tk * stride_dot,
                orow,
                offs_dv,
                NDV,
                stride_dod,
            )
            delta = _row_delta(
                Delta + (b * H + h) * N,
                do,
                O + b * stride_ob + h * stride_oh,
                tk,
                rowk,
                orow,
                offs_dv,
                NDV,
                stride_ot,
                stride_od,
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
                    Turn,
                    s,
                    fib + S - 1,
                    0,
                    hi_s,
                    S,
                    NJ,
                    n,
                    n_vin,
                    vrow,
                    stride_kt,
                    stride_kd,
                    stride_vt,
                    stride_vd,
                    offs_h,
                    offs_dv,
                    D1,
                    D2,
                    NDV,
                    qk_scale,
                    True,
                    True,
                    SHIFT,
                    MASKED,
                    BLOCK,
                    DOT_PREC,
                )
            _store_grad(
                DQ + b * stride_dqb + h * stride_dqh,
                tk * stride_dqt,
                rowk & (tk < n),
                kin,
                tk,
                Pos,
                Rot,
                offs_h,
                D1,
                D2,
                stride_dqd,
                dq1,
                dq2,
                scale,
                UNROTATE,
                ACCUM,
            )
            if FIRST:
                dv += dvg
            else:
                _store_rows(
                    DV + b * stride_dvb + h * stride_dvh,
                    tk * stride_dvt,
                    rowk & (tk < n_dv),
                    offs_dv,
                    NDV,
                    stride_dvd,
                    dvg,
                )
        if FIRST:
            _store_rows(
                DV + b * stride_dvb + hk * stride_dvh,
                tk * stride_dvt,
                rowk & (tk < n_dv),
                offs_dv,
                NDV,
                stride_dvd,
                tl.where(kin[:, None], dv, 0.0),
            )
        _store_grad(
            DKp,
            tk * stride_dkt,
            rowk & (tk < n),
            kin,
            tk,
            Pos,
            Rot,
            offs_h,
            D1,
            D2,
            stride_dkd,
            dk1,
            dk2,
            scale,
            UNROTATE,
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
                    V + b * stride_vb + h * stride_vh,
                    tk * stride_vt,
                    rowk & (tk < n_vin),
                    offs_dv,
                    NDV,
                    stride_vd,
                )
                dv = tl.zeros([BLOCK, BLOCK_DV], dtype=ACC)
            for start in range(lo, NJ, BLOCK):
                offs_m = start + tl.arange(0, BLOCK)
                tq, rowq, qin, _ = _key_rows(
                    fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED
                )
                q1, q2 = _load_halves(
                    Q + b * stride_qb + h * stride_qh,
                    tq * stride_qt,
                    qin,
                    offs_h,
                    D1,
                    D2,
                    stride_qd,
                )
                orow = rowq & (tq < n_o)
                do = _load_rows(
                    DO + b * stride_dob + h * stride_doh,
                    tq * stride_dot,
                    orow,
                    offs_dv,
                    NDV,
                    stride_dod,
                )
                delta = _row_delta(
                    Delta + (b * H + h) * N,
                    do,
                    O + b * stride_ob + h * stride_oh,
                    tq,
                    rowq,
                    orow,
                    offs_dv,
                    NDV,
                    stride_ot,
                    stride_od,
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
                    DV + b * stride_dvb + h * stride_dvh,
                    tk * stride_dvt,
                    rowk & (tk < n_dv),
                    offs_dv,
                    NDV,
                    stride_dvd,
                    dv,
                )
                if DELTA_OUT:
                    tl.store(DeltaNext + (b * H + h) * N + tk, tl.sum(dv * v.to(ACC), 1), mask=rowk)
        if FIRST:
            _store_rows(
                DV + b * stride_dvb + hk * stride_dvh,
                tk * stride_dvt,
                rowk & (tk < n_dv),
                offs_dv,
                NDV,
                stride_dvd,
                tl.where(kin[:, None], dv, 0.0),
            )
        _store_grad(
            DKp,
            tk * stride_dkt,
            rowk & (tk < n),
            kin,
            tk,
            Pos,
            Rot,
            offs_h,
            D1,
            D2,
            stride_dkd,
            dk1,
            dk2,
            scale,
            UNROTATE,
            ACCUM,
        )

        # ---- phase 2: queries i in block blk, over fibre keys (and summary keys) ----
        offs_m = blk * BLOCK + tl.arange(0, BLOCK)
        tq, rowq, qin, _ = _key_rows(fib + s, offs_m, S, NJ, n, vrow, ValidIn, Valid0, MASKED)
        orow = rowq & (tq < n_o)
        for g in range(G):
            h = hk * G + g
            Vp = V + b * stride_vb + h * stride_vh
            if FIRST:
                Vp = V + b * stride_vb + hk * stride_vh
            q1, q2 = _load_halves(
                Q + b * stride_qb + h * stride_qh, tq * stride_qt, qin, offs_h, D1, D2, stride_qd
            )
            do = _load_rows(
                DO + b * stride_dob + h * stride_doh,
                tq * stride_dot,
                orow,
                offs_dv,
                NDV,
                stride_dod,
            )
            delta = _row_delta(
                Delta + (b * H + h) * N,
                do,
                O + b * stride_ob + h * stride_oh,
                tq,
                rowq,
                orow,
                offs_dv,
                NDV,
                stride_ot,
                stride_od,
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
                Turn,
                s,
                fib + s,
                0,
                hi,
                S,
                NJ,
                n,
                n_vin,
                vrow,
                stride_kt,
                stride_kd,
                stride_vt,
                stride_vd,
                offs_h,
                offs_dv,
                D1,
                D2,
                NDV,
                qk_scale,
                CAUSAL,
                False,
                False,
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
                    Turn,
                    s,
                    fib + S - 1,
                    0,
                    hi_s,
                    S,
                    NJ,
                    n,
                    n_vin,
                    vrow,
                    stride_kt,
                    stride_kd,
                    stride_vt,
                    stride_vd,
                    offs_h,
                    offs_dv,
                    D1,
                    D2,
                    NDV,
                    qk_scale,
                    True,
                    True,
                    SHIFT,
                    MASKED,
                    BLOCK,
                    DOT_PREC,
                )
            _store_grad(
                DQ + b * stride_dqb + h * stride_dqh,
                tq * stride_dqt,
                rowq & (tq < n),
                qin,
                tq,
                Pos,
                Rot,
                offs_h,
                D1,
                D2,
                stride_dqd,
                dq1,
                dq2,
                scale,
                UNROTATE,
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
    Pos,
    Turn,
    DKS,
    DVS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
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
    SHIFT: tl.constexpr,
    UNROTATE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Gradients of summary keys (p, c, S-1), c in block blk, from the queries of fibres s in chunk
    cb.

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
    k1, k2 = _load_halves(
        K + b * stride_kb + (h // G) * stride_kh, tk * stride_kt, kin, offs_h, D1, D2, stride_kd
    )
    v = _load_rows(
        V + b * stride_vb + h * stride_vh,
        tk * stride_vt,
        rowk & (tk < n_vin),
        offs_dv,
        NDV,
        stride_vd,
    )
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
        q1, q2 = _load_halves(
            Q + b * stride_qb + h * stride_qh, tq * stride_qt, qin, offs_h, D1, D2, stride_qd
        )
        if SHIFT:  # turned to the summary keys' finer coordinates, as in the forward
            r1, r2 = _turn(q1, q2, Turn, s, offs_h, D1, 1)
            q1 = r1.to(Q.dtype.element_ty)
            q2 = r2.to(Q.dtype.element_ty)
        do = _load_rows(
            DO + b * stride_dob + h * stride_doh,
            tq * stride_dot,
            rowq & (tq < n_o),
            offs_dv,
            NDV,
            stride_dod,
        )
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
        DKS, row * D, rowk, rowk, tk, Pos, Rot, offs_h, D1, D2, 1, dk1, dk2, scale, UNROTATE, False
    )
    tl.store(
        DVS + row[:, None] * NDV + offs_dv[None, :],
        dv,
        mask=rowk[:, None] & (offs_dv[None, :] < NDV),
    )


# ----------------------------------------------------------------------------------------------
# Plan and validity (host)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    """One call's hop plan and what the kernels need beyond it."""

    plan: HopPlan
    scale: float
    masked: bool  # validity bytes needed (padding or key_padding_mask)

    @property
    def hops(self):
        return self.plan.hops

    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def N(self) -> int:
        return self.plan.N

    @property
    def causal(self) -> bool:
        return self.plan.causal


def _validity(plan: HopPlan | _Launch, B: int, key_padding_mask, device) -> torch.Tensor:
    """(m + 1, B, N) uint8: level 0 = real unmasked tokens; level k+1 = attended a valid key in hop
    k."""
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


def _forward(q, k, v, plan: _Launch, rotation, pos, valid, need_backward: bool, gates=None):
    """All hops. With ``rotation``: q and k are already in the tensor_rope frame when ``pos`` (the
    frame positions) is given, else the kernels rotate them as they load them. Returns the
    output, the m - 1 intermediate states, the (m, B, H, N) logsumexp and, with ``gates``
    (H, m - 1), the raw (unmixed) outputs of hops 1..m-1 that the backward needs.

    A gated hop's kernel writes its raw output; ``torch.lerp`` then mixes it with the hop's
    input."""
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
    frame = rope and pos is not None
    pos = pos if frame else dummy
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
            _turn_table(rot, pos, hop) if frame and hop.summary else dummy,
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
            ROPE=rope and not frame,
            SHIFT=frame and hop.summary,
            MASKED=plan.masked,
            STORE_LSE=need_backward,
            BLOCK_DH=block_size(D1),
            BLOCK_DV=block_size(dv),
            ACC=acc,
            DOT_PREC=prec,
        )
        cfg = config(hop.nj, d, dv)
        fixed = dict(
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        launch(_hop_fwd_kernel, "fwd", B * H * hop.P * hop.S, hop.nj, fixed, q.device, args, meta)
        if gate is not None:
            if need_backward:
                raws.append(out)
            # vin + g * (out - vin) in fp32 (fp64), rounded once; rows >= n of the last hop are
            # dropped below
            out = torch.lerp(vin.to(gate.dtype), out.to(gate.dtype), gate).to(q.dtype)
        if need_backward and not last:
            states.append(out)
        vin = out
    if gates is not None:
        vin = vin[:, :, :n]
    return vin, states, lse, raws


def rotate_for_hop(
    x: torch.Tensor, rotation: torch.Tensor, nj: int, S: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """tensor_rope of x (B, H, n, d) for a hop viewing tokens as (P, nj, S): token t rotated by the
    ``rotation`` table (``TensorRoPE.rotation_table``) at position (t // S) % nj. Written to ``out``
    (any strides) or a new (B, H, n, d) tensor, in x's dtype."""
    return _rotate_rows(x, rotation, None, nj, S, out)


def rotate_to_frame(
    x: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """x (B, H, n, d) with token t rotated by the ``rotation`` table at ``positions[t]`` (int32,
    ``frame_positions``): the frame the hop kernels run tensor_rope in. A new tensor, x's dtype."""
    return _rotate_rows(x, rotation, positions, 1, 1, None)


def _rotate_rows(x, rotation, positions, nj, S, out):
    B, H, n, d = x.shape
    out = _empty(x.shape, x.dtype, x.device) if out is None else out
    block = 16 if tuning.INTERPRET else 64
    D1 = (d + 1) // 2
    _rotate_kernel[(B * H * triton.cdiv(n, block),)](
        x,
        out,
        rotation,
        rotation if positions is None else positions,
        *_strides(x),
        *_strides(out),
        n,
        H,
        nj,
        S,
        D1=D1,
        D2=d // 2,
        POS=positions is not None,
        BLOCK_T=block,
        BLOCK_DH=block_size(D1),
        num_warps=4,
    )
    return out


# (plan, device) -> int32 (N,) frame positions; bounded like core.plan's plan cache
_FRAME_POSITIONS: dict[tuple, torch.Tensor] = {}


def frame_positions(plan: HopPlan, device) -> torch.Tensor:
    """int32 (N,): the sum of each token's fold coordinates, sum_j (t // S_j) % n_j.

    tensor_rope scores in hop j depend on i_j - i'_j only, and a fibre's tokens differ in i_j
    alone, so rotating q and k once by this sum gives every hop its own scores. Below S_j (one
    block of the finer dims) it is the sum of the finer coordinates, which the summary keys' shift
    reads. Cached per plan and device: a CUDA-graph capture after a first call allocates nothing.
    """
    device = torch.device(device)
    key = (plan, device)
    hit = _FRAME_POSITIONS.get(key)
    if hit is None:
        if len(_FRAME_POSITIONS) >= 256:
            _FRAME_POSITIONS.clear()
        t = torch.arange(plan.N, device=device)
        pos = sum((t // hop.S) % hop.nj for hop in plan.hops)
        hit = _FRAME_POSITIONS[key] = pos.to(torch.int32)
    return hit


def _turn_table(rotation: torch.Tensor, pos: torch.Tensor, hop) -> torch.Tensor:
    """(S, d) table rows: row s turns a query of fibre s by Pos[S - 1] - Pos[s], to the finer
    coordinates of the hop's summary keys (Pos of a token below S is its finer coordinates' sum)."""
    S = hop.S
    return rotation.index_select(0, (pos[S - 1] - pos[:S]).long())


def _summary_chunks(B: int, H: int, P: int, nb: int, S: int) -> int:
    """Split the S - 1 sibling fibres into chunks so the summary kernel has enough programs."""
    target = 4 if tuning.INTERPRET else 1024
    return max(1, min(S - 1, -(-target // (B * H * P * nb))))


def _backward(
    grad_out, q, k, v, out, states, lse, valid, rotation, pos, plan: _Launch, gates=None, raws=()
):
    """dq, dk, dv (and the gates' gradient, (H, m - 1), or None). With ``rotation``, q and k are in
    the tensor_rope frame (``frame_positions``) and the first hop's kernels un-rotate dq and dk.

    A gated hop (``V' = V + g (hop(V) - V)``) back-propagates g * dV' through its kernel, (1 - g) *
    dV' straight to V, and rowsum(dV' * (hop(V) - V)) to g. Its rowsum(dO * O) is then computed here
    for every hop (DELTA_IN), since the kernels' fused DELTA_OUT is rowsum over the unmixed rows."""
    B, H, n, d = q.shape
    Hkv = k.shape[1]
    G, dv, N, m = H // Hkv, v.shape[-1], plan.N, len(plan.hops)
    acc, prec = _kernel_dtypes(q.dtype)
    D1, D2 = (d + 1) // 2, d // 2
    dummy = valid if valid is not None else torch.zeros(1, dtype=torch.uint8, device=q.device)
    rope = rotation is not None
    rot = rotation if rope else torch.zeros(1, dtype=lse.dtype, device=q.device)
    pos = pos if rope else dummy
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
        # gated: the gradient of an intermediate state stays in fp32 (fp64), since it feeds the
        # gates' sums and the residual path besides the next kernel (which gets it rounded to q's
        # dtype)
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
        # written only with DELTA_OUT (not for the first hop, nor when gated): else any buffer
        # will do
        delta_next = (
            lse[idx]
            if first or gates is not None
            else torch.empty((B, H, N), dtype=lse.dtype, device=q.device)
        )
        turn = _turn_table(rot, pos, hop) if rope and hop.summary else dummy
        vin_lvl = dummy[idx] if valid is not None else dummy
        v0 = dummy[0] if valid is not None else dummy
        cfg = config(hop.nj, d, dv)
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
            pos,
            turn,
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
            SHIFT=rope and hop.summary,
            UNROTATE=rope and first,
            MASKED=plan.masked,
            FIRST=first,
            ACCUM=not last,
            STORE_DELTA=last and hop.summary and not gated,
            DELTA_IN=gated or not last,
            DELTA_OUT=not first and not gated,
            SINGLE=hop.nj <= cfg.block,
            BLOCK_DH=block_size(D1),
            BLOCK_DV=block_size(dv),
            ACC=acc,
            DOT_PREC=prec,
        )
        fixed = dict(BLOCK=cfg.block, num_warps=cfg.bwd_warps, num_stages=cfg.num_stages)
        launch(_hop_bwd_kernel, "bwd", B * Hkv * hop.P * hop.S, hop.nj, fixed, q.device, args, meta)
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
                pos,
                turn,
                rope,
                rope and first,
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
    q,
    k,
    vin,
    do,
    dk,
    dvin,
    lse,
    delta,
    vin_lvl,
    v0,
    rot,
    pos,
    turn,
    shift,
    unrotate,
    valid,
    plan,
    hop,
    cfg,
    last,
):
    """Summary-key gradients: partial sums from the kernel, added to the (p, :, S-1) rows on the
    host."""
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
        pos,
        turn,
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
        SHIFT=shift,
        UNROTATE=unrotate,
        MASKED=plan.masked,
        BLOCK=cfg.block,
        BLOCK_DH=block_size(D1),
        BLOCK_DV=block_size(dv),
        ACC=acc,
        DOT_PREC=prec,
        num_warps=cfg.bwd_warps,
        num_stages=cfg.num_stages,
    )
    P, nj, S = hop.P, hop.nj, hop.S
    dvs = dvs.sum(3)  # (B, H, P, nj, dv)
    dvin.view(B, H, P, nj, S, dv)[:, :, :, :, S - 1] += dvs.to(dvin.dtype)
    # summary token of (p, c) is (p * nj + c) * S + S - 1: increasing, and below n for the
    # first n // S
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
        pos = None
        # Training runs tensor_rope in one frame (the rotated q and k replace q and k, in the
        # backward too); a forward alone rotates rows as the kernels load them, which was faster
        # than the frame's two rotation passes (benchmarks/NOTES.md, "tensor_rope in one frame").
        if rotation is not None and need_backward:
            pos = frame_positions(plan.plan, q.device)
            q, k = rotate_to_frame(q, rotation, pos), rotate_to_frame(k, rotation, pos)
        out, states, lse, raws = _forward(q, k, v, plan, rotation, pos, valid, need_backward, gates)
        if need_backward:
            ctx.plan, ctx.n_states, ctx.n_raws = plan, len(states), len(raws)
            ctx.has_valid, ctx.has_rope, ctx.has_gates = (
                valid is not None,
                rotation is not None,
                gates is not None,
            )
            extra = [x for x in (valid, rotation, pos, gates) if x is not None]
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
        rotation, pos = (rest.pop(0), rest.pop(0)) if ctx.has_rope else (None, None)
        gates = rest.pop(0) if ctx.has_gates else None
        dq, dk, dv, dgates = _backward(
            grad_out, q, k, v, out, states, lse, valid, rotation, pos, ctx.plan, gates, raws
        )
        dgates = None if dgates is None else dgates.to(gates.dtype)
        return dq, dk, dv, None, None, None, dgates


def fallback_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hop_positional
) -> str | None:
    """Why the Triton kernels cannot run this call (None when they can); such calls use the
    reference."""
    if not (q.is_cuda or tuning.INTERPRET):
        return f"tensors on {q.device} and TRITON_INTERPRET is not set"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype} is not supported"
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        return f"head dims ({q.shape[-1]}, {v.shape[-1]}) exceed {_MAX_HEAD_DIM}"
    if hop_positional is not None and type(hop_positional) is not TensorRoPE:
        return (
            f"per-hop positional scheme {type(hop_positional).__name__} has no kernel (only "
            "TensorRoPE)"
        )
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
    """Multi-hop fibre attention on Triton. q (B, H, n, d), k (B, Hkv, n, d), v (B, Hkv, n, dv) ->
    (B, H, n, dv).

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
    hops = hop_plan(dims, n, causal=causal, coverage=coverage, hop_order=hop_order)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = _Launch(hops, scale, key_padding_mask is not None or hops.padded)
    rotation = None
    if hop_positional is not None:
        # frame positions reach sum(n_j - 1); loads rotated at fibre coordinates run up to one block
        # past the fibre (masked rows)
        rows = max(sum(hops.dims), max(hops.dims) + MAX_BLOCK)
        rotation = hop_positional.rotation_table(rows, _table_dtype(q.dtype), q.device)
    return _FibreAttention.apply(q, k, v, rotation, plan, key_padding_mask, hop_gates)


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The rotation table's dtype: fp16 for bf16 inputs (its rounding, 2^-11, is a quarter of the
    bf16 rounding the rotated q and k get anyway, and it halves the table reads of every tile;
    benchmarks/NOTES.md), else the working precision (fp32, fp64 for fp64)."""
    if dtype == torch.bfloat16:
        return torch.float16
    return torch.float64 if dtype == torch.float64 else torch.float32
