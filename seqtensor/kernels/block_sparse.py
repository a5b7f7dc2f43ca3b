"""Triton kernels of the retrieval hop: block-sparse attention (forward, backward, GQA) and block
scores for choosing the blocks.

Legend: B batch, H query heads, Hkv kv heads (G = H / Hkv), T keys, Lq queries (the last Lq of the
T tokens), d head dim (halves D1 + D2 so rotate-half pairs stay apart), dv value dim, C query
chunks of ``chunk`` queries, kk selected blocks per chunk, NB blocks of ``block`` tokens.

Semantics: those of ``adapters/text/retrieval.py``'s hop, given the selection (the oracle is
``block_sparse_reference``): query i, with window start s_i (its aligned ``local`` block, or with
``sliding`` its last ``local`` tokens extended back to a block boundary), attends in one softmax to

- local keys s_i..i, rotated (with ``rope_theta``) at their true positions;
- the first ``sinks`` tokens that lie before s_i;
- every token >= ``sinks`` of the blocks its chunk selected (``selection[b, h_kv, c]``, -1 padding;
  each block wholly before the chunk's first window start, no block twice), so each key counts once.

Sinks and retrieved keys are memory: unrotated, the query rotated at ``memory_distance + i - s_i``,
so they sit that far back however old they are.

Design (following ``kernels/triton_hops.py``: online softmax in exp2, fp32 accumulators, rotation
applied on load from a host [cos | sin] table):

- forward: one program per BLOCK_M queries of one head; three key passes (local, sinks, selected
  blocks) share one online softmax; writes out and the logsumexp (log2 units).
- backward dq: the same traversal, dq accumulated separately for the two rotations (local, memory)
  and un-rotated once at the end.
- backward dk/dv: one program per key tile (inside one block) of one kv head, looping over the G
  query heads: the local queries of the tile, then (dk turned to the unrotated space once) the
  chunks that selected its block, read from an inverse index (CSR, built on the host with a sort),
  so no atomics and deterministic sums. The sink keys are read by every later query: a separate
  kernel splits the queries into ranges and writes fp32 partial sums, which the dk/dv kernel adds.
- block scores: the ranking query (the previous chunk's mean memory query over the kv group, so
  a selection never depends on later queries) against each block's representatives: Quest's
  bound sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin (two dots), or the mean key;
  the top-k is torch.topk.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._validation import check, check_choice, is_int
from . import tuning
from .block_sparse_reference import memory_queries, window_start, window_starts
from .triton_hops import (
    _kernel_dtypes,
    _load_halves,
    _load_qk,
    _load_rows,
    _rotate,
    _scores,
    _store_halves,
    _table_dtype,
    rotate_for_hop,
)

__all__ = [
    "block_sparse_attention",
    "block_scores",
    "select_blocks",
    "check_selection",
    "selection_rows",
    "chunk_starts",
]

# Tests set this to fill every buffer the kernels write with NaN first (catches unwritten rows).
POISON = False
_MAX_HEAD_DIM = 256
# Benchmarks set keys here ("fwd_m", "fwd_n", "fwd_warps", "fwd_heads", "bwd_m", "bwd_n",
# "bwd_warps", "stages") to compare launch settings without editing ``_config``.
CONFIG_OVERRIDE: dict = {}


def _config(d: int, chunk: int, Lq: int) -> dict:
    if tuning.INTERPRET:
        cfg = dict(fwd_m=16, fwd_n=16, fwd_warps=1, fwd_heads=2)
        cfg.update(bwd_m=16, bwd_n=16, bwd_warps=1, stages=1)
    else:
        wide = d > 128
        cfg = dict(
            fwd_m=64 if wide else 128,
            fwd_n=32 if wide else 64,
            fwd_warps=8,
            bwd_m=32 if wide else 64,
            bwd_n=32 if wide else 64,
            bwd_warps=8,
            stages=2,
            fwd_heads=4,  # H100, 128k, chunk 64: 20.5 ms against 41.6 unpacked (NOTES.md)
        )
        if Lq <= 16:  # a decode step: rows beyond the queries are wasted MMA work
            cfg["fwd_m"] = 16
    cfg.update(CONFIG_OVERRIDE)
    # a program's queries share one selection: BLOCK_M divides the chunk
    while chunk % cfg["fwd_m"]:
        cfg["fwd_m"] //= 2
    while chunk % cfg["bwd_m"]:
        cfg["bwd_m"] //= 2
    return cfg


def _heads_per_program(cfg: dict, G: int, d: int, itemsize: int = 2) -> int:
    """The forward's packed heads (``fwd_heads``), cut to a power-of-2 divisor of the group size G
    and to tiles of at most 256 rows of d 2-byte elements (128 beyond: the fp32 accumulator lives
    in registers, and fp32 tiles of 256 x 128 exceed Hopper's shared memory)."""
    rows = 256 if d * itemsize <= 256 else 128
    heads = max(1, min(int(cfg["fwd_heads"]), G, rows // cfg["fwd_m"]))
    while G % heads or heads & (heads - 1):  # tl.arange needs a power-of-2 BLOCK_M
        heads -= 1
    return heads


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _starts(pos, LOCAL, BLK, SLIDING: tl.constexpr):
    """Window start of the queries at ``pos`` (``block_sparse_reference.window_starts``)."""
    if SLIDING:
        return tl.maximum(pos - LOCAL + 1, 0) // BLK * BLK
    return pos // LOCAL * LOCAL


@triton.jit
def _query_rows(offs_m, Lq, T, LOCAL, BLK, DIST, WIN, SLIDING: tl.constexpr):
    """Valid rows, token positions (padding rows clamped to the last token, so table reads stay in
    range), window starts and memory positions of query rows ``offs_m`` (negative: rows before
    the first query, in a tile aligned to the chunks). WIN 1: memory keys ``DIST + i - s_i`` back
    (anchored at the window), 0: ``DIST`` back (anchored at the query)."""
    rowq = (offs_m >= 0) & (offs_m < Lq)
    pos = tl.minimum(T - Lq + offs_m, T - 1)
    starts = _starts(pos, LOCAL, BLK, SLIDING)
    return rowq, pos, starts, DIST + (pos - starts) * WIN


@triton.jit
def _load_q2(Qp, rows, rowq, pos, mpos, Rot, offs_h, D1, D2, stride_d, ROPE: tl.constexpr):
    """q rows as local keys see them (rotated at ``pos``) and as memory keys do (at ``mpos``)."""
    x1, x2 = _load_halves(Qp, rows, rowq, offs_h, D1, D2, stride_d)
    l1, l2, m1, m2 = x1, x2, x1, x2
    if ROPE:
        r1, r2 = _rotate(x1, x2, pos, Rot, offs_h, D1, 1)
        l1 = r1.to(Qp.dtype.element_ty)
        l2 = r2.to(Qp.dtype.element_ty)
        r1, r2 = _rotate(x1, x2, mpos, Rot, offs_h, D1, 1)
        m1 = r1.to(Qp.dtype.element_ty)
        m2 = r2.to(Qp.dtype.element_ty)
    return l1, l2, m1, m2


@triton.jit
def _attend(acc, m_i, l_i, sc, ok, v, DOT_PREC: tl.constexpr):
    """One online-softmax step over a tile of logits ``sc`` (log2 units), keys ``ok``."""
    sc = tl.where(ok, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _ds(q1, q2, k1, k2, v, do, lse, delta, ok, qk_scale, DOT_PREC: tl.constexpr):
    """Probabilities and dS = P * (dO V^T - delta) of a (queries, keys) tile (dS before the logit
    scale)."""
    sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
    p = tl.where(ok, tl.exp2(sc - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    return p, p * (dp - delta[:, None])


# ----------------------------------------------------------------------------------------------
# Forward and dq: the query-centric traversal
# ----------------------------------------------------------------------------------------------


@triton.jit
def _local_tile(
    acc, m_i, l_i, q1, q2, KRp, Vp, st, starts, pos, last, T, offs_h, offs_dv,
    stride_rt, stride_rd, stride_vt, stride_vd, qk_scale,
    D1, D2, NDV, MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One tile of local keys (already rotated) from ``st``; MASK False: every row sees every key
    of the tile."""
    offs_n = st + tl.arange(0, BLOCK_N)
    kin = offs_n <= last
    rows = tl.minimum(offs_n, T - 1).to(tl.int64)
    k1, k2 = _load_halves(KRp, rows * stride_rt, kin, offs_h, D1, D2, stride_rd)
    v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
    sc = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
    if MASK:
        ok = (offs_n[None, :] >= starts[:, None]) & (offs_n[None, :] <= pos[:, None])
        return _attend(acc, m_i, l_i, sc, ok, v, DOT_PREC)
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    KR,
    V,
    O,
    Lse,
    Sel,
    Rot,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_rb,
    stride_rh,
    stride_rt,
    stride_rd,
    KR_LO,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_sb,
    stride_sh,
    stride_sc,
    stride_sk,
    H,
    G,
    Lq,
    T,
    LOCAL,
    BLK,
    SINKS,
    DIST,
    WIN,
    CHUNK,
    KK,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    SLIDING: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEADS: tl.constexpr,
):
    """Out and logsumexp of QM queries of HEADS heads of one kv group (BLOCK_M = HEADS * QM tile
    rows, head-major): the group's heads share keys and selection, so packing them fills the
    tile and reads each key once for all of them. Head groups vary fastest across programs, so
    the programs of a kv head read the same keys at about the same time. KR: the keys rotated at
    their true positions once on the host (K itself without RoPE), from key KR_LO (the first any
    local window reads) on, which the local keys read: rotating them as loaded repeated the work
    for every query tile and head that reads them."""
    QM: tl.constexpr = BLOCK_M // HEADS
    NG = G // HEADS
    pid = tl.program_id(0)
    hg = pid % (H // HEADS)
    r = pid // (H // HEADS)
    # query tiles aligned to absolute positions (so to the chunks): the first may start before
    # the first query
    QOFF = (T - Lq) // QM * QM - (T - Lq)
    QB = tl.cdiv(Lq - QOFF, QM)
    qb = r % QB
    b = (r // QB).to(tl.int64)
    hk = hg // NG
    heads = hk * G + (hg % NG) * HEADS + tl.arange(0, BLOCK_M) // QM  # each row's head
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = QOFF + qb * QM + tl.arange(0, BLOCK_M) % QM
    rowq, pos, starts, mpos = _query_rows(offs_m, Lq, T, LOCAL, BLK, DIST, WIN, SLIDING)
    ql1, ql2, qm1, qm2 = _load_q2(
        Q + b * stride_qb,
        heads.to(tl.int64) * stride_qh + offs_m.to(tl.int64) * stride_qt,
        rowq,
        pos,
        mpos,
        Rot,
        offs_h,
        D1,
        D2,
        stride_qd,
        ROPE,
    )
    Kp = K + b * stride_kb + hk * stride_kh
    KRp = KR + (b * stride_rb - KR_LO * stride_rt) + hk * stride_rh  # KR starts at key KR_LO
    Vp = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    last = tl.minimum(T - Lq + QOFF + qb * QM + QM - 1, T - 1)

    # local keys s_i..i, in key tiles from the smallest start: tiles every row sees whole (after
    # the largest start, before the smallest position) skip the masks, as flash attention does
    lo = tl.min(starts, 0)
    inner = lo + tl.cdiv(tl.max(starts, 0) - lo, BLOCK_N) * BLOCK_N
    inner_end = inner + tl.maximum(tl.min(pos, 0) + 1 - inner, 0) // BLOCK_N * BLOCK_N
    for st in range(lo, inner, BLOCK_N):
        acc, m_i, l_i = _local_tile(
            acc, m_i, l_i, ql1, ql2, KRp, Vp, st, starts, pos, last, T, offs_h, offs_dv,
            stride_rt, stride_rd, stride_vt, stride_vd, qk_scale,
            D1, D2, NDV, True, BLOCK_N, DOT_PREC,
        )  # fmt: skip
    for st in range(inner, inner_end, BLOCK_N):
        acc, m_i, l_i = _local_tile(
            acc, m_i, l_i, ql1, ql2, KRp, Vp, st, starts, pos, last, T, offs_h, offs_dv,
            stride_rt, stride_rd, stride_vt, stride_vd, qk_scale,
            D1, D2, NDV, False, BLOCK_N, DOT_PREC,
        )  # fmt: skip
    for st in range(inner_end, last + 1, BLOCK_N):
        acc, m_i, l_i = _local_tile(
            acc, m_i, l_i, ql1, ql2, KRp, Vp, st, starts, pos, last, T, offs_h, offs_dv,
            stride_rt, stride_rd, stride_vt, stride_vd, qk_scale,
            D1, D2, NDV, True, BLOCK_N, DOT_PREC,
        )  # fmt: skip

    # sink keys before the window, unrotated
    for st in range(0, tl.minimum(SINKS, tl.max(starts, 0)), BLOCK_N):
        offs_n = st + tl.arange(0, BLOCK_N)
        kin = offs_n < SINKS
        rows = offs_n.to(tl.int64)
        k1, k2 = _load_halves(Kp, rows * stride_kt, kin, offs_h, D1, D2, stride_kd)
        v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
        ok = kin[None, :] & (offs_n[None, :] < starts[:, None])
        sc = _scores(qm1, qm2, k1, k2, qk_scale, DOT_PREC)
        acc, m_i, l_i = _attend(acc, m_i, l_i, sc, ok, v, DOT_PREC)

    # the chunk's selected blocks, unrotated; their sink tokens were counted above
    crow = (T - Lq + QOFF + qb * QM) // CHUNK - (T - Lq) // CHUNK
    Sp = Sel + b * stride_sb + hk * stride_sh + crow * stride_sc
    for j in range(0, KK):
        blk = tl.load(Sp + j * stride_sk)
        if blk >= 0:
            for st in range(0, BLK, BLOCK_N):
                offs_b = st + tl.arange(0, BLOCK_N)
                offs_n = blk * BLK + offs_b
                kin = (offs_b < BLK) & (offs_n >= SINKS)
                rows = offs_n.to(tl.int64)
                k1, k2 = _load_halves(Kp, rows * stride_kt, kin, offs_h, D1, D2, stride_kd)
                v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
                sc = _scores(qm1, qm2, k1, k2, qk_scale, DOT_PREC)
                acc, m_i, l_i = _attend(acc, m_i, l_i, sc, kin[None, :], v, DOT_PREC)

    # every valid row has its own token as a local key: l_i > 0
    l_safe = tl.where(rowq, l_i, 1.0)
    out = acc / l_safe[:, None]
    rows = heads.to(tl.int64) * stride_oh + offs_m.to(tl.int64) * stride_ot
    omask = rowq[:, None] & (offs_dv[None, :] < NDV)
    tl.store(
        O + b * stride_ob + rows[:, None] + offs_dv[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=omask,
    )
    tl.store(Lse + (b * H + heads) * Lq + offs_m, m_i + tl.log2(l_safe), mask=rowq)


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    Lse,
    Delta,
    Sel,
    Rot,
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
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    stride_sb,
    stride_sh,
    stride_sc,
    stride_sk,
    H,
    G,
    Lq,
    T,
    LOCAL,
    BLK,
    SINKS,
    DIST,
    WIN,
    CHUNK,
    KK,
    scale,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    SLIDING: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq of BLOCK_M queries of one head: the forward's traversal; the local and memory parts are
    accumulated in their own rotated spaces and each rotated back once."""
    pid = tl.program_id(0)
    h = pid % H
    r = pid // H
    # query tiles aligned to absolute positions (so to the chunks): the first may start before
    # the first query
    QOFF = (T - Lq) // BLOCK_M * BLOCK_M - (T - Lq)
    QB = tl.cdiv(Lq - QOFF, BLOCK_M)
    qb = r % QB
    b = (r // QB).to(tl.int64)
    hk = h // G
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = QOFF + qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rowq, pos, starts, mpos = _query_rows(offs_m, Lq, T, LOCAL, BLK, DIST, WIN, SLIDING)
    qrows = offs_m.to(tl.int64)
    ql1, ql2, qm1, qm2 = _load_q2(
        Q + b * stride_qb + h * stride_qh,
        qrows * stride_qt,
        rowq,
        pos,
        mpos,
        Rot,
        offs_h,
        D1,
        D2,
        stride_qd,
        ROPE,
    )
    do = _load_rows(
        DO + b * stride_dob + h * stride_doh, qrows * stride_dot, rowq, offs_dv, NDV, stride_dod
    )
    lse = tl.load(Lse + (b * H + h) * Lq + offs_m, mask=rowq, other=float("inf"))
    delta = tl.load(Delta + (b * H + h) * Lq + offs_m, mask=rowq, other=0.0)
    Kp = K + b * stride_kb + hk * stride_kh
    Vp = V + b * stride_vb + hk * stride_vh
    dq1 = tl.zeros([BLOCK_M, BLOCK_DH], dtype=ACC)
    dq2 = tl.zeros([BLOCK_M, BLOCK_DH], dtype=ACC)
    last = tl.minimum(T - Lq + QOFF + qb * BLOCK_M + BLOCK_M - 1, T - 1)

    # memory keys first, with q rotated at its memory positions
    for st in range(0, tl.minimum(SINKS, tl.max(starts, 0)), BLOCK_N):
        offs_n = st + tl.arange(0, BLOCK_N)
        kin = offs_n < SINKS
        rows = offs_n.to(tl.int64)
        k1, k2 = _load_halves(Kp, rows * stride_kt, kin, offs_h, D1, D2, stride_kd)
        v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
        ok = kin[None, :] & (offs_n[None, :] < starts[:, None]) & rowq[:, None]
        _, ds = _ds(qm1, qm2, k1, k2, v, do, lse, delta, ok, qk_scale, DOT_PREC)
        ds = ds.to(k1.dtype)
        dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
        dq2 += tl.dot(ds, k2, input_precision=DOT_PREC)

    crow = (T - Lq + QOFF + qb * BLOCK_M) // CHUNK - (T - Lq) // CHUNK
    Sp = Sel + b * stride_sb + hk * stride_sh + crow * stride_sc
    for j in range(0, KK):
        blk = tl.load(Sp + j * stride_sk)
        if blk >= 0:
            for st in range(0, BLK, BLOCK_N):
                offs_b = st + tl.arange(0, BLOCK_N)
                offs_n = blk * BLK + offs_b
                kin = (offs_b < BLK) & (offs_n >= SINKS)
                rows = offs_n.to(tl.int64)
                k1, k2 = _load_halves(Kp, rows * stride_kt, kin, offs_h, D1, D2, stride_kd)
                v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
                ok = kin[None, :] & rowq[:, None]
                _, ds = _ds(qm1, qm2, k1, k2, v, do, lse, delta, ok, qk_scale, DOT_PREC)
                ds = ds.to(k1.dtype)
                dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
                dq2 += tl.dot(ds, k2, input_precision=DOT_PREC)

    # one accumulator for both parts: the memory part moved to the local rotation's space
    # (R(pos) R(mpos)^T), so a single transposed rotation at the end gives dq
    if ROPE:
        dq1, dq2 = _rotate(dq1, dq2, mpos, Rot, offs_h, D1, -1)
        dq1, dq2 = _rotate(dq1, dq2, pos, Rot, offs_h, D1, 1)
    for st in range(tl.min(starts, 0), last + 1, BLOCK_N):
        offs_n = st + tl.arange(0, BLOCK_N)
        kin = offs_n <= last
        kpos = tl.minimum(offs_n, T - 1)
        rows = kpos.to(tl.int64)
        k1, k2 = _load_qk(Kp, rows * stride_kt, kin, kpos, Rot, offs_h, D1, D2, stride_kd, ROPE)
        v = _load_rows(Vp, rows * stride_vt, kin, offs_dv, NDV, stride_vd)
        ok = (offs_n[None, :] >= starts[:, None]) & (offs_n[None, :] <= pos[:, None])
        ok = ok & rowq[:, None]
        _, ds = _ds(ql1, ql2, k1, k2, v, do, lse, delta, ok, qk_scale, DOT_PREC)
        ds = ds.to(k1.dtype)
        dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
        dq2 += tl.dot(ds, k2, input_precision=DOT_PREC)

    if ROPE:
        dq1, dq2 = _rotate(dq1, dq2, pos, Rot, offs_h, D1, -1)
    _store_halves(
        DQ + b * stride_dqb + h * stride_dqh,
        qrows * stride_dqt,
        rowq,
        offs_h,
        D1,
        D2,
        stride_dqd,
        dq1 * scale,
        dq2 * scale,
    )


# ----------------------------------------------------------------------------------------------
# dk, dv: the key-centric traversal
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dkv_tile(
    dk1,
    dk2,
    dv,
    k1,
    k2,
    v,
    offs_n,
    kin,
    Qp,
    DOp,
    Lp,
    Dp,
    Rot,
    lo,
    hi,
    Lq,
    T,
    LOCAL,
    BLK,
    SINKS,
    DIST,
    WIN,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    offs_h,
    offs_dv,
    D1,
    D2,
    NDV,
    qk_scale,
    KIND: tl.constexpr,
    SLIDING: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dk and dv of key rows ``offs_n`` from the queries lo..hi - 1 of one head. KIND 0: as local
    keys (q rotated at its position, k rotated already); 1: as sink keys; 2: as keys of a selected
    block (both memory: q rotated at its memory position, k unrotated)."""
    for st in range(lo, hi, BLOCK_M):
        offs_m = st + tl.arange(0, BLOCK_M)
        rowq, pos, starts, mpos = _query_rows(offs_m, Lq, T, LOCAL, BLK, DIST, WIN, SLIDING)
        rowq = rowq & (offs_m < hi)
        qrows = offs_m.to(tl.int64)
        if KIND == 0:
            q1, q2 = _load_qk(
                Qp, qrows * stride_qt, rowq, pos, Rot, offs_h, D1, D2, stride_qd, ROPE
            )
            ok = (offs_n[None, :] >= starts[:, None]) & (offs_n[None, :] <= pos[:, None])
        else:
            q1, q2 = _load_qk(
                Qp, qrows * stride_qt, rowq, mpos, Rot, offs_h, D1, D2, stride_qd, ROPE
            )
            if KIND == 1:
                ok = offs_n[None, :] < starts[:, None]
            else:
                ok = offs_n[None, :] >= 0
        ok = ok & rowq[:, None] & kin[None, :]
        do = _load_rows(DOp, qrows * stride_dot, rowq, offs_dv, NDV, stride_dod)
        lse = tl.load(Lp + offs_m, mask=rowq, other=float("inf"))
        delta = tl.load(Dp + offs_m, mask=rowq, other=0.0)
        p, ds = _ds(q1, q2, k1, k2, v, do, lse, delta, ok, qk_scale, DOT_PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        ds = tl.trans(ds.to(q1.dtype))
        dk1 += tl.dot(ds, q1, input_precision=DOT_PREC)
        dk2 += tl.dot(ds, q2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def _dkv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    Lse,
    Delta,
    Ptr,
    Inv,
    Order,
    SinkDK,
    SinkDV,
    Rot,
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
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    H,
    G,
    Lq,
    T,
    LOCAL,
    BLK,
    SINKS,
    NS,
    DIST,
    WIN,
    CHUNK,
    NBT,
    scale,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    SLIDING: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dk, dv of one key tile (inside block ``kb``) of kv head hk, summed over its G query heads.
    The sink keys' memory part comes precomputed (SinkDK, SinkDV: (B, Hkv, NS, d) fp32)."""
    SUB = tl.cdiv(BLK, BLOCK_N)
    Hkv = H // G
    pid = tl.program_id(0)
    sub = pid % SUB
    r = tl.load(Order + pid // SUB)  # blocks by decreasing selection count (``_inverse_index``)
    kb = r % NBT
    r = r // NBT
    hk = r % Hkv
    b = (r // Hkv).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_b = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BLK + offs_b
    kin = (offs_b < BLK) & (offs_n < T)
    kpos = tl.minimum(offs_n, T - 1)
    krows = kpos.to(tl.int64)
    Kp = K + b * stride_kb + hk * stride_kh
    k1, k2 = _load_qk(Kp, krows * stride_kt, kin, kpos, Rot, offs_h, D1, D2, stride_kd, ROPE)
    v = _load_rows(
        V + b * stride_vb + hk * stride_vh, krows * stride_vt, kin, offs_dv, NDV, stride_vd
    )
    dk1 = tl.zeros([BLOCK_N, BLOCK_DH], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, BLOCK_DH], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    offset = T - Lq
    # local queries i with s_i <= t <= i: from the tile's first key to the last query whose window
    # starts at or before its last key
    t_last = tl.minimum(kb * BLK + sub * BLOCK_N + BLOCK_N - 1, T - 1)
    if SLIDING:
        i_max = (t_last // BLK + 1) * BLK + LOCAL - 2
    else:
        i_max = (t_last // LOCAL + 1) * LOCAL - 1
    lo = tl.maximum(kb * BLK + sub * BLOCK_N - offset, 0)
    hi = tl.minimum(i_max + 1 - offset, Lq)
    for g in range(G):
        h = hk * G + g
        dk1, dk2, dv = _dkv_tile(
            dk1,
            dk2,
            dv,
            k1,
            k2,
            v,
            offs_n,
            kin,
            Q + b * stride_qb + h * stride_qh,
            DO + b * stride_dob + h * stride_doh,
            Lse + (b * H + h) * Lq,
            Delta + (b * H + h) * Lq,
            Rot,
            lo,
            hi,
            Lq,
            T,
            LOCAL,
            BLK,
            SINKS,
            DIST,
            WIN,
            stride_qt,
            stride_qd,
            stride_dot,
            stride_dod,
            offs_h,
            offs_dv,
            D1,
            D2,
            NDV,
            qk_scale,
            0,
            SLIDING,
            ROPE,
            BLOCK_M,
            DOT_PREC,
        )
    if ROPE:  # from here on dk is in the unrotated space of the memory keys
        dk1, dk2 = _rotate(dk1, dk2, kpos, Rot, offs_h, D1, -1)
        k1, k2 = _load_qk(Kp, krows * stride_kt, kin, kpos, Rot, offs_h, D1, D2, stride_kd, False)
    # the chunks that selected this block (their sink tokens excluded: counted as sinks)
    kin_mem = kin & (offs_n >= SINKS)
    e0 = tl.load(Ptr + (b * Hkv + hk) * NBT + kb)
    e1 = tl.load(Ptr + (b * Hkv + hk) * NBT + kb + 1)
    c0 = (T - Lq) // CHUNK * CHUNK - (T - Lq)  # query index of selection row 0's first token
    for e in range(e0, e1):
        c = tl.load(Inv + e)
        for g in range(G):
            h = hk * G + g
            dk1, dk2, dv = _dkv_tile(
                dk1,
                dk2,
                dv,
                k1,
                k2,
                v,
                offs_n,
                kin_mem,
                Q + b * stride_qb + h * stride_qh,
                DO + b * stride_dob + h * stride_doh,
                Lse + (b * H + h) * Lq,
                Delta + (b * H + h) * Lq,
                Rot,
                tl.maximum(c0 + c * CHUNK, 0),
                tl.minimum(c0 + c * CHUNK + CHUNK, Lq),
                Lq,
                T,
                LOCAL,
                BLK,
                SINKS,
                DIST,
                WIN,
                stride_qt,
                stride_qd,
                stride_dot,
                stride_dod,
                offs_h,
                offs_dv,
                D1,
                D2,
                NDV,
                qk_scale,
                2,
                SLIDING,
                ROPE,
                BLOCK_M,
                DOT_PREC,
            )
    # sink keys: their memory part's partial sums from _sink_kernel, already scaled to the logits
    smask = kin & (offs_n < NS)
    srow = (b * Hkv + hk) * NS + offs_n
    s1 = tl.load(
        SinkDK + srow[:, None] * (D1 + D2) + offs_h[None, :],
        mask=smask[:, None] & (offs_h[None, :] < D1),
        other=0.0,
    )
    s2 = tl.load(
        SinkDK + srow[:, None] * (D1 + D2) + D1 + offs_h[None, :],
        mask=smask[:, None] & (offs_h[None, :] < D2),
        other=0.0,
    )
    sv = tl.load(
        SinkDV + srow[:, None] * NDV + offs_dv[None, :],
        mask=smask[:, None] & (offs_dv[None, :] < NDV),
        other=0.0,
    )
    dk1 = dk1 * scale + s1
    dk2 = dk2 * scale + s2
    dv += sv
    _store_halves(
        DK + b * stride_dkb + hk * stride_dkh,
        krows * stride_dkt,
        kin,
        offs_h,
        D1,
        D2,
        stride_dkd,
        dk1,
        dk2,
    )
    vmask = kin[:, None] & (offs_dv[None, :] < NDV)
    tl.store(
        DV
        + b * stride_dvb
        + hk * stride_dvh
        + krows[:, None] * stride_dvt
        + offs_dv[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=vmask,
    )


@triton.jit
def _sink_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    PartDK,
    PartDV,
    Rot,
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
    H,
    G,
    Lq,
    T,
    LOCAL,
    BLK,
    SINKS,
    NS,
    DIST,
    WIN,
    SPLIT,
    PER,
    scale,
    qk_scale,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    SLIDING: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Partial dk, dv (scaled, fp32) of one tile of the NS sink keys as memory keys, from queries
    [split * PER, split * PER + PER) of the G heads of kv head hk: PartDK (B, Hkv, SPLIT, NS, d)."""
    NT = tl.cdiv(NS, BLOCK_N)
    Hkv = H // G
    pid = tl.program_id(0)
    split = pid % SPLIT
    r = pid // SPLIT
    tile = r % NT
    r = r // NT
    hk = r % Hkv
    b = (r // Hkv).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    kin = offs_n < NS
    krows = offs_n.to(tl.int64)
    k1, k2 = _load_qk(
        K + b * stride_kb + hk * stride_kh,
        krows * stride_kt,
        kin,
        offs_n,
        Rot,
        offs_h,
        D1,
        D2,
        stride_kd,
        False,
    )
    v = _load_rows(
        V + b * stride_vb + hk * stride_vh, krows * stride_vt, kin, offs_dv, NDV, stride_vd
    )
    dk1 = tl.zeros([BLOCK_N, BLOCK_DH], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, BLOCK_DH], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    lo = split * PER
    hi = tl.minimum(lo + PER, Lq)
    for g in range(G):
        h = hk * G + g
        dk1, dk2, dv = _dkv_tile(
            dk1,
            dk2,
            dv,
            k1,
            k2,
            v,
            offs_n,
            kin,
            Q + b * stride_qb + h * stride_qh,
            DO + b * stride_dob + h * stride_doh,
            Lse + (b * H + h) * Lq,
            Delta + (b * H + h) * Lq,
            Rot,
            lo,
            hi,
            Lq,
            T,
            LOCAL,
            BLK,
            SINKS,
            DIST,
            WIN,
            stride_qt,
            stride_qd,
            stride_dot,
            stride_dod,
            offs_h,
            offs_dv,
            D1,
            D2,
            NDV,
            qk_scale,
            1,
            SLIDING,
            ROPE,
            BLOCK_M,
            DOT_PREC,
        )
    prow = ((b * Hkv + hk) * SPLIT + split) * NS + offs_n
    dmask = kin[:, None] & (offs_h[None, :] < D1)
    tl.store(PartDK + prow[:, None] * (D1 + D2) + offs_h[None, :], dk1 * scale, mask=dmask)
    dmask = kin[:, None] & (offs_h[None, :] < D2)
    tl.store(PartDK + prow[:, None] * (D1 + D2) + D1 + offs_h[None, :], dk2 * scale, mask=dmask)
    vmask = kin[:, None] & (offs_dv[None, :] < NDV)
    tl.store(PartDV + prow[:, None] * NDV + offs_dv[None, :], dv, mask=vmask)


# ----------------------------------------------------------------------------------------------
# Block scores
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scores_kernel(
    Qbar,
    Kmax,
    Kmin,
    Starts,
    Out,
    C,
    NB,
    BLK,
    SINKS,
    D: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scores (BLOCK_C chunks x BLOCK_B blocks) of one (batch, kv head): MINMAX q+ . kmax + q- .
    kmin (Quest's bound on the block's best logit), else qbar . kmean (Kmax holds the means);
    -inf for blocks not wholly before the chunk's first window start or made only of sinks.
    Inputs contiguous fp32: Qbar (BH, C, D), Kmax, Kmin (BH, NB, D), Starts (C,)."""
    NCB = tl.cdiv(C, BLOCK_C)
    NBB = tl.cdiv(NB, BLOCK_B)
    pid = tl.program_id(0)
    jb = pid % NBB
    r = pid // NBB
    ic = r % NCB
    bh = (r // NCB).to(tl.int64)
    offs_c = ic * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_b = jb * BLOCK_B + tl.arange(0, BLOCK_B)
    cmask = offs_c < C
    bmask = offs_b < NB
    acc = tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qv = tl.load(
            Qbar + (bh * C + offs_c[:, None]) * D + offs_d[None, :],
            mask=cmask[:, None] & dmask[None, :],
            other=0.0,
        )
        kx = tl.load(
            Kmax + (bh * NB + offs_b[:, None]) * D + offs_d[None, :],
            mask=bmask[:, None] & dmask[None, :],
            other=0.0,
        )
        if MINMAX:
            kn = tl.load(
                Kmin + (bh * NB + offs_b[:, None]) * D + offs_d[None, :],
                mask=bmask[:, None] & dmask[None, :],
                other=0.0,
            )
            acc += tl.dot(tl.maximum(qv, 0.0), tl.trans(kx), input_precision="ieee")
            acc += tl.dot(tl.minimum(qv, 0.0), tl.trans(kn), input_precision="ieee")
        else:
            acc += tl.dot(qv, tl.trans(kx), input_precision="ieee")
    first = tl.load(Starts + offs_c, mask=cmask, other=0)
    ends = (offs_b + 1) * BLK
    usable = (ends[None, :] <= first[:, None]) & (ends[None, :] > SINKS)
    acc = tl.where(usable, acc, float("-inf"))
    tl.store(
        Out + (bh * C + offs_c[:, None]) * NB + offs_b[None, :],
        acc,
        mask=cmask[:, None] & bmask[None, :],
    )


REPRESENTATIVES = ("minmax", "mean")


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int,
    chunk: int,
    local: int,
    sliding: bool = False,
    sinks: int = 0,
    rope_theta: float | None = None,
    memory_distance: int | None = None,
    memory_anchor: str = "window",
    representatives: str = "minmax",
    ranks: torch.Tensor | None = None,
    block_reps: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """(B, Hkv, C, NB) fp32 score of each whole block of k (NB = T // block) for each selection
    row (C = ``selection_rows``, the absolute chunks holding the Lq queries).

    A chunk is ranked by the mean memory query (over its kv group, rotated with ``rope_theta`` where
    it sees memory keys) of the *previous* chunk's tokens among the queries, as
    ``adapters/text/retrieval.py``'s shared selection: a query's blocks never depend on later
    queries. A row whose previous chunk has none of the queries (the first chunk; a decode step)
    selects nothing unless ``ranks`` (B, Hkv, C, d) gives its ranking queries. Representatives:
    "minmax", Quest's bound sum_d max(r_d kmax_d, r_d kmin_d); "mean", the mean key. -inf where
    unusable: not wholly before the window start of the chunk's first token, or only sink tokens.
    ``block_reps``: the representatives already kept for at least the first NB blocks, (kmax, kmin)
    or (kmean,), each (B, Hkv, >= NB, d), so a decode step does not re-read every key.
    """
    check_choice("representatives", representatives, REPRESENTATIVES)
    check_choice("memory_anchor", memory_anchor, ("window", "query"))
    _check_qkv(q, k, k)
    _check_window(block, chunk, local, sinks)
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    distance = local if memory_distance is None else memory_distance
    C, NB = selection_rows(Lq, T, chunk), T // block
    first = chunk_starts(Lq, T, chunk, local, block, sliding, q.device)
    if ranks is None:
        # the group mean first: a group's heads are rotated alike, so this equals the mean of the
        # rotated queries at 1/G of the work
        mean = q.unflatten(1, (Hkv, H // Hkv)).mean(2, dtype=torch.float32)
        mq = memory_queries(mean, T, local, block, sliding, rope_theta, distance, memory_anchor)
        front = (T - Lq) % chunk  # absolute chunk boundaries
        ones = torch.ones(Lq, device=q.device)
        sums = torch.nn.functional.pad(mq, (0, 0, front, C * chunk - Lq - front))
        count = torch.nn.functional.pad(ones, (front, C * chunk - Lq - front))
        sums, count = sums.unflatten(2, (C, chunk)).sum(3), count.unflatten(0, (C, chunk)).sum(1)
        # row c ranks by row c - 1; row 0's previous chunk is not among the queries
        ranks = torch.nn.functional.pad(sums / count.clamp(min=1)[:, None], (0, 0, 1, -1))
        count = torch.nn.functional.pad(count, (1, -1))
        first = torch.where(count > 0, first, 0)  # ends <= 0 never: the row selects nothing
    else:
        check(
            isinstance(ranks, torch.Tensor) and tuple(ranks.shape) == (B, Hkv, C, d),
            f"ranks must be a ({B}, {Hkv}, {C}, {d}) tensor",
        )
    minmax = representatives == "minmax"
    if block_reps is None:
        kb = k[:, :, : NB * block].float().unflatten(2, (NB, block))
        kmax = (kb.amax(3) if minmax else kb.mean(3)).contiguous()
        kmin = kb.amin(3).contiguous() if minmax else kmax
    else:
        check(
            len(block_reps) == (2 if minmax else 1)
            and all(x.shape[:2] == (B, Hkv) and x.shape[2] >= NB for x in block_reps),
            f"block_reps must be {'(kmax, kmin)' if minmax else '(kmean,)'}, each "
            f"({B}, {Hkv}, >= {NB}, {d})",
        )
        kmax = block_reps[0][:, :, :NB].float().contiguous()
        kmin = block_reps[-1][:, :, :NB].float().contiguous()
    out = torch.empty((B, Hkv, C, NB), dtype=torch.float32, device=q.device)
    if NB == 0:
        return out
    bc = 16 if tuning.INTERPRET else 64
    bb = 16 if tuning.INTERPRET else 64
    grid = (B * Hkv * triton.cdiv(C, bc) * triton.cdiv(NB, bb),)
    _scores_kernel[grid](
        ranks.float().contiguous(),
        kmax,
        kmin,
        first.to(torch.int64).contiguous(),
        out,
        C,
        NB,
        block,
        sinks,
        D=d,
        MINMAX=minmax,
        BLOCK_C=bc,
        BLOCK_B=bb,
        BLOCK_D=min(64, _pow2(d)),
    )
    return out


def select_blocks(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` best usable blocks of each chunk from ``block_scores``: (B, Hkv, C, kk) int32,
    kk = min(top_k, NB), -1 where fewer are usable."""
    check(is_int(top_k) and top_k >= 0, f"top_k must be an int >= 0, got {top_k!r}")
    kk = min(int(top_k), scores.shape[-1])
    top, blocks = scores.topk(kk, dim=-1)
    return torch.where(top > float("-inf"), blocks, -1).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_TABLES: dict = {}


def _rotation_table(theta: float, d: int, rows: int, dtype, device) -> torch.Tensor:
    """(>= rows, d) [cos | sin] of pos * theta^(-2i/d), pos = 0, 1, ...; cached per theta, d, dtype
    and device, rebuilt larger when more rows are needed."""
    key = (float(theta), d, dtype, torch.device(device))
    hit = _TABLES.get(key)
    if hit is None or hit.shape[0] < rows:
        n = _pow2(rows)
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv
        hit = torch.cat([angles.cos(), angles.sin()], 1).to(dtype).contiguous()
        _TABLES[key] = hit
    return hit


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check(isinstance(x, torch.Tensor), f"{name} must be a tensor", TypeError)
        check(x.ndim == 4, f"{name} must be 4-D (B, heads, tokens, d), got {tuple(x.shape)}")
        check(
            x.dtype in _DTYPES,
            f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64",
            TypeError,
        )
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device, "q, k, v must be on one device")
    B, H, Lq, d = q.shape
    check(
        k.shape[0] == B and k.shape[-1] == d and v.shape[:3] == k.shape[:3],
        f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}",
    )
    check(H % k.shape[1] == 0, f"query heads {H} must be a multiple of kv heads {k.shape[1]}")
    check(1 <= Lq <= k.shape[2], f"{Lq} queries for {k.shape[2]} keys: need 1 <= Lq <= T")
    check(
        max(d, v.shape[-1]) <= _MAX_HEAD_DIM,
        f"head dims ({d}, {v.shape[-1]}) exceed {_MAX_HEAD_DIM}",
    )
    check(
        q.is_cuda or tuning.INTERPRET,
        f"block_sparse_attention runs Triton kernels: tensors on {q.device} need CUDA or "
        "TRITON_INTERPRET=1 (block_sparse_reference computes the same on any device)",
    )


def _check_window(block: int, chunk: int, local: int, sinks: int) -> None:
    for name, value, low in (("block", block, 1), ("chunk", chunk, 16), ("local", local, 1)):
        check(is_int(value) and value >= low, f"{name} must be an int >= {low}, got {value!r}")
    check(is_int(sinks) and sinks >= 0, f"sinks must be an int >= 0, got {sinks!r}")
    check(local % block == 0, f"local ({local}) must be a multiple of block ({block})")
    check(chunk % 16 == 0, f"chunk ({chunk}) must be a multiple of 16 (the kernels' query tile)")


def selection_rows(Lq: int, T: int, chunk: int) -> int:
    """Selection rows of a call: the chunks holding the last Lq of T tokens."""
    return (T - 1) // chunk - (T - Lq) // chunk + 1


def chunk_starts(Lq, T, chunk, local, block, sliding, device) -> torch.Tensor:
    """(C,) window start of the first token of each selection row's chunk."""
    first = torch.arange((T - Lq) // chunk, (T - 1) // chunk + 1, device=device) * chunk
    return window_starts(first, local, block, sliding)


def check_selection(
    selection: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int,
    chunk: int,
    local: int,
    sliding: bool = False,
) -> torch.Tensor:
    """``selection`` as contiguous int32 after checking it: (B, Hkv, C, kk) integers (C:
    ``selection_rows``), -1 or a block wholly before the window start of its chunk's first token
    (never the window's or a future block), no block twice in a chunk. One device sync."""
    B, H, Lq, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    C = selection_rows(Lq, T, chunk)
    check(isinstance(selection, torch.Tensor), "selection must be a tensor", TypeError)
    check(
        not selection.is_floating_point()
        and not selection.is_complex()
        and selection.dtype != torch.bool,
        f"selection must be an integer tensor, got {selection.dtype}",
        TypeError,
    )
    check(
        selection.ndim == 4 and tuple(selection.shape[:3]) == (B, Hkv, C),
        f"selection must be (B, Hkv, chunks, kk) = ({B}, {Hkv}, {C}, kk), got "
        f"{tuple(selection.shape)}",
    )
    check(selection.device == q.device, "selection must be on the device of q")
    sel = selection.long()
    first = chunk_starts(Lq, T, chunk, local, block, sliding, q.device)
    future = (sel >= 0) & ((sel + 1) * block > first[:, None])
    srt = sel.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    bad = (sel < -1) | future
    if bool(bad.any() | dup.any()):
        if bool(bad.any()):
            b, h, c, j = (int(x) for x in bad.nonzero()[0])
            x = int(sel[b, h, c, j])
            raise ValueError(
                f"selection[{b}, {h}, {c}, {j}] = {x}: "
                + (
                    "must be -1 (padding) or a block index"
                    if x < -1
                    else f"block {x} (tokens {x * block}..{(x + 1) * block - 1}) is not wholly "
                    f"before chunk {c}'s window start {int(first[c])} (a future or local block)"
                )
            )
        b, h, c, _ = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"selection[{b}, {h}, {c}] names a block twice: each key counts once")
    return selection.to(torch.int32).contiguous()


def _inverse_index(sel: torch.Tensor, nbt: int) -> tuple[torch.Tensor, ...]:
    """CSR of the chunks that selected each (batch, kv head, block): ptr (B * Hkv * nbt + 1,),
    chunk ids int32, and the blocks by decreasing count: the dk/dv programs of a block many chunks
    selected take longest, and starting them first keeps them off the tail. Padding sorts past the
    end; no device sync."""
    B, Hkv, C, kk = sel.shape
    n = B * Hkv * nbt
    flat = sel.long().reshape(B * Hkv, C * kk)
    bh = torch.arange(B * Hkv, device=sel.device)[:, None]
    keys = torch.where(flat >= 0, bh * nbt + flat, n).flatten()
    chunks = torch.arange(C, device=sel.device).repeat_interleave(kk).repeat(B * Hkv)
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=n + 1)[:n]
    ptr = torch.zeros(n + 1, dtype=torch.int32, device=sel.device)
    ptr[1:] = counts.cumsum(0)
    by_count = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    return ptr, chunks[order].to(torch.int32).contiguous(), by_count.contiguous()


class _Params:
    """The call's settings, shared by forward and backward."""

    def __init__(
        self, q, k, v, *, block, chunk, local, sliding, sinks, rope_theta, distance, anchor, scale
    ):
        B, H, Lq, d = q.shape
        self.B, self.H, self.Lq, self.d = B, H, Lq, d
        self.Hkv, self.T, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = H // self.Hkv
        self.block, self.chunk, self.local, self.sliding = block, chunk, local, sliding
        self.sinks, self.ns = sinks, min(sinks, self.T)
        self.distance, self.scale = distance, scale
        self.win = int(anchor == "window")
        self.rope = rope_theta is not None
        self.D1, self.D2 = (d // 2, d // 2) if self.rope else ((d + 1) // 2, d // 2)
        self.acc, self.prec = _kernel_dtypes(q.dtype)
        # logsumexp, delta and sink partial sums: fp32, fp64 for fp64 inputs
        self.work = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.cfg = _config(d, chunk, Lq)
        if self.rope:
            rows = max(self.T, distance + local + block) + 1
            self.rot = _rotation_table(rope_theta, d, rows, _table_dtype(q.dtype), q.device)
        else:
            self.rot = torch.zeros(1, dtype=torch.float32, device=q.device)

    def scalars(self) -> tuple:
        return (self.H, self.G, self.Lq, self.T, self.local, self.block, self.sinks)

    def meta(self, bm: int, bn: int, warps: int) -> dict:
        return dict(
            D1=self.D1,
            D2=self.D2,
            NDV=self.dv,
            SLIDING=self.sliding,
            ROPE=self.rope,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_DH=_pow2(self.D1),
            BLOCK_DV=_pow2(self.dv),
            ACC=self.acc,
            DOT_PREC=self.prec,
            num_warps=warps,
            num_stages=self.cfg["stages"],
        )


def _query_tiles(p: _Params, bm: int) -> int:
    """Query tiles aligned to absolute positions: from the first query's tile to the end."""
    return triton.cdiv(p.T - (p.T - p.Lq) // bm * bm, bm)


def _rotated_local_keys(k: torch.Tensor, p: _Params, qm: int) -> tuple[torch.Tensor, int]:
    """The keys the forward reads as local keys, rotated once at their true positions (bitwise as
    the kernels rotate on load), and the first of them: only those from the first query tile's
    window start on, so a decode step rotates and stores O(local) keys, not the whole cache."""
    if not p.rope:
        return k, 0
    # query tiles are aligned to absolute positions: the first tile's first row reads furthest back
    lo = window_start((p.T - p.Lq) // qm * qm, p.local, p.block, p.sliding)
    kr = _empty((p.B, p.Hkv, p.T - lo, p.d), k.dtype, k.device)
    rotate_for_hop(k[:, :, lo:], p.rot[lo:], p.rot.shape[0] - lo, 1, out=kr)
    return kr, lo


def _forward(q, k, v, sel, p: _Params):
    cfg = p.cfg
    out = _empty((p.B, p.H, p.Lq, p.dv), q.dtype, q.device)
    lse = _empty((p.B, p.H, p.Lq), p.work, q.device)
    heads = _heads_per_program(cfg, p.G, p.d, q.element_size())
    grid = (p.B * (p.H // heads) * _query_tiles(p, cfg["fwd_m"]),)
    kr, kr_lo = _rotated_local_keys(k, p, cfg["fwd_m"])
    _fwd_kernel[grid](
        q, k, kr, v, out, lse, sel, p.rot,
        *q.stride(), *k.stride(), *kr.stride(), kr_lo, *v.stride(), *out.stride(), *sel.stride(),
        *p.scalars(), p.distance, p.win, p.chunk, sel.shape[-1],
        p.scale * math.log2(math.e),
        HEADS=heads,
        **p.meta(heads * cfg["fwd_m"], cfg["fwd_n"], cfg["fwd_warps"]),
    )  # fmt: skip
    return out, lse


def _backward(do, q, k, v, out, lse, sel, p: _Params):
    cfg = p.cfg
    bm, bn, warps = cfg["bwd_m"], cfg["bwd_n"], cfg["bwd_warps"]
    meta = p.meta(bm, bn, warps)
    qk_scale = p.scale * math.log2(math.e)
    delta = (do.to(p.work) * out.to(p.work)).sum(-1).contiguous()  # rowsum(dO * O), (B, H, Lq)
    dq, dk, dv = _empty(q.shape, q.dtype, q.device), _empty(k.shape, k.dtype, k.device), None
    dv = _empty(v.shape, v.dtype, v.device)

    # sink keys as memory: fp32 partial sums over query ranges, reduced here
    ns = p.ns
    sink_dk = torch.zeros((p.B, p.Hkv, ns, p.d), dtype=p.work, device=q.device)
    sink_dv = torch.zeros((p.B, p.Hkv, ns, p.dv), dtype=p.work, device=q.device)
    if ns > 0:
        nt = triton.cdiv(ns, bn)
        target = 4 if tuning.INTERPRET else 1024
        split = max(1, min(triton.cdiv(p.Lq, bm), triton.cdiv(target, p.B * p.Hkv * nt)))
        per = triton.cdiv(triton.cdiv(p.Lq, split), bm) * bm
        split = triton.cdiv(p.Lq, per)
        part_dk = _empty((p.B, p.Hkv, split, ns, p.d), p.work, q.device)
        part_dv = _empty((p.B, p.Hkv, split, ns, p.dv), p.work, q.device)
        _sink_kernel[(p.B * p.Hkv * nt * split,)](
            q, k, v, do, lse, delta, part_dk, part_dv, p.rot,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *p.scalars(), ns, p.distance, p.win, split, per, p.scale, qk_scale,
            **meta,
        )  # fmt: skip
        sink_dk, sink_dv = part_dk.sum(2).contiguous(), part_dv.sum(2).contiguous()

    _dq_kernel[(p.B * p.H * _query_tiles(p, bm),)](
        q, k, v, do, dq, lse, delta, sel, p.rot,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *sel.stride(),
        *p.scalars(), p.distance, p.win, p.chunk, sel.shape[-1], p.scale, qk_scale,
        **meta,
    )  # fmt: skip

    nbt = triton.cdiv(p.T, p.block)
    ptr, inv, by_count = _inverse_index(sel, nbt)
    grid = (p.B * p.Hkv * nbt * triton.cdiv(p.block, bn),)
    _dkv_kernel[grid](
        q, k, v, do, dk, dv, lse, delta, ptr, inv, by_count, sink_dk, sink_dv, p.rot,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *p.scalars(), ns, p.distance, p.win, p.chunk, nbt, p.scale, qk_scale,
        **meta,
    )  # fmt: skip
    return dq, dk, dv


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, params):
        out, lse = _forward(q, k, v, sel, params)
        if any(ctx.needs_input_grad[:3]):
            ctx.params = params
            ctx.save_for_backward(q, k, v, out, lse, sel)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, sel = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, sel, ctx.params)
        return dq, dk, dv, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: torch.Tensor,
    *,
    block: int,
    chunk: int,
    local: int,
    sliding: bool = False,
    sinks: int = 0,
    rope_theta: float | None = None,
    memory_distance: int | None = None,
    memory_anchor: str = "window",
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The retrieval hop given its blocks (module docstring). q (B, H, Lq, d) are the last Lq of
    the T tokens of k (B, Hkv, T, d), v (B, Hkv, T, dv); selection (B, Hkv, C, kk) int, -1
    padding: the blocks of ``block`` tokens that the queries of each chunk retrieve. Chunks are
    absolute: tokens g * chunk .. g * chunk + chunk - 1 (``chunk`` a multiple of 16); row c is
    chunk (T - Lq) // chunk + c, C = ``selection_rows(Lq, T, chunk)``. Window starts: queries'
    aligned ``local`` blocks, or ``sliding``. With ``rope_theta``, memory keys sit
    ``memory_distance`` (default ``local``) + i - s_i tokens back from query i
    (``memory_anchor="window"``) or ``memory_distance`` back (``"query"``). ``validate=False``
    skips ``check_selection`` (and its device sync) for selections known to be valid, e.g. from
    ``select_blocks``. Returns (B, H, Lq, dv) in q's dtype; differentiable in q, k, v."""
    _check_qkv(q, k, v)
    _check_window(block, chunk, local, sinks)
    check(
        rope_theta is None or (isinstance(rope_theta, (int, float)) and rope_theta > 0),
        f"rope_theta must be None or > 0, got {rope_theta!r}",
    )
    check(
        rope_theta is None or q.shape[-1] % 2 == 0,
        f"RoPE needs an even head dim, got {q.shape[-1]}",
    )
    check_choice("memory_anchor", memory_anchor, ("window", "query"))
    distance = local if memory_distance is None else memory_distance
    check(
        is_int(distance) and distance >= 0,
        f"memory_distance must be None or an int >= 0, got {memory_distance!r}",
    )
    if validate:
        sel = check_selection(
            selection, q, k, block=block, chunk=chunk, local=local, sliding=sliding
        )
    else:
        sel = selection.to(torch.int32).contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    params = _Params(
        q, k, v, block=block, chunk=chunk, local=local, sliding=sliding, sinks=sinks,
        rope_theta=rope_theta, distance=int(distance), anchor=memory_anchor, scale=scale,
    )  # fmt: skip
    return _BlockSparse.apply(q, k, v, sel, params)
