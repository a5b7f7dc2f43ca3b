"""Triton kernels for one decoding step of tensorized attention: every hop in two launches.

Legend: B batch, H query heads, Hkv kv heads, G = H // Hkv, T tokens in the K/V cache (left
padding included), d head dim (split in halves D1 + D2 so rotate-half RoPE pairs stay apart),
dv value dim, m fold order, t the new token's compact index, w_l and r_l the token stride and size
of hop l's dim (r = 0 for the unbounded top hop).

Semantics are those of ``adapters.text_cache.LayerCache.step`` for one new token (the oracle; its
module docstring describes the cache). Hop l's keys are earlier tokens plus the new token itself,
and only that one key depends on hop l - 1 (its value is hop l - 1's output). So, as in
flash-decoding, the work splits in two (one program per batch row and HEADS query heads: one on
the GPU, all of them under the interpreter, whose cost is per op and program):

- ``_decode_partial_kernel``, one program per (heads, hop, split of the hop's positions), all in
  parallel: the online-softmax partial (max, sum, weighted values) over its keys, the new token
  left out. Key indices come from t with integer maths (fibre keys ``t - (a - b) w_l``, b <= a, and
  for ``full`` coverage the summary keys ``start + b w_l + w_l - 1``, b < a, unless t is the last
  token of its block), so no per-step index plan is built on the host. Keys are gathered from K at
  ``offset + u`` and, with tensor RoPE, rotated by ``b - a`` (RoPE is relative: the query is never
  rotated); hop 0 reads V (kv head h // G), hop l >= 1 the level-l ring of its query head. fp32
  (fp64 for fp64 inputs).
- ``_decode_combine_kernel``, one program per heads: the hops in order, each merging its partials
  with the new token's own key (score q.k_t at every hop; value V[t], then the previous hop's
  output, first stored in its ring slot, rounded to the ring's dtype as the PyTorch path stores it).
  The program of head 0 also writes ``length + 1`` (the next step's t).

Unsupported calls are listed by ``fallback_reason``; the caller then runs the PyTorch path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._validation import check

__all__ = ["decode_step", "decode_constants", "fallback_reason"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this to fill the output with NaN first (catches unwritten elements).
POISON = False
_MAX_HEAD_DIM = 256
# Rows of the rotation table in ``decode_constants``; with RoPE, chunks hold at most this many
# positions and rotate their keys with it (angle-sum rule) instead of a sin and cos per key and
# frequency.
_ROPE_TABLE = 64


@triton.jit
def _head_setup(
    Q,
    K,
    Length,
    Offset,
    Consts,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    H,
    G,
    HEADS: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    ROPE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program -> (b, first head, heads, heads in range, t, offset, scaled query halves, inv_freq, K
    row base per head)."""
    HB = tl.cdiv(H, HEADS)
    pid = tl.program_id(0)
    h0 = (pid % HB) * HEADS
    b = (pid // HB).to(tl.int64)
    t = tl.load(Length + b).to(tl.int64)
    off = tl.load(Offset + b).to(tl.int64)
    heads = h0 + tl.arange(0, HEADS)
    h_ok = heads < H
    offs_h = tl.arange(0, BLOCK_DH)
    scale = tl.load(Consts)
    q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + offs_h[None, :] * stride_qd
    q1 = (
        tl.load(q_ptr, mask=h_ok[:, None] & (offs_h[None, :] < D1), other=0.0).to(ACC) * scale
    )  # (HEADS, BLOCK_DH)
    q2 = (
        tl.load(q_ptr + D1 * stride_qd, mask=h_ok[:, None] & (offs_h[None, :] < D2), other=0.0).to(
            ACC
        )
        * scale
    )
    inv = tl.zeros([BLOCK_DH], ACC)
    if ROPE:
        inv = tl.load(Consts + 1 + offs_h, mask=offs_h < D1, other=0.0)
    k_base = K + b * stride_kb + (heads // G) * stride_kh  # (HEADS,)
    return b, h0, heads, h_ok, t, off, q1, q2, inv, k_base


@triton.jit
def _decode_partial_kernel(
    Q,
    K,
    Vals,
    Part,
    Length,
    Offset,
    Consts,
    TopScale,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vals,
    stride_sb,
    stride_sh,
    stride_pb,
    stride_ph,
    stride_pm,
    stride_ps,
    H,
    G,
    v_shift,
    W: tl.constexpr,
    R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SPAN: tl.constexpr,
    SPLITS: tl.constexpr,
    M: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    SUMMARY: tl.constexpr,
    ROPE: tl.constexpr,
    TOP_INT8: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
):
    """Hop ``program_id(1)``, positions ``[split * SPAN, (split + 1) * SPAN)`` with split
    ``program_id(2)``: the online-softmax partial (max, sum, weighted values) over its keys, the new
    token itself left out (its value at this level is the previous hop's output, known only in the
    combine kernel).

    Vals: (V, ring_1, ..., ring_{m-1}); stride_vals: their (batch, head, token, dim) strides, flat.
    W, R, BLOCK_B, SPAN, SPLITS: per-hop stride, size (0 = top), chunk, positions per split and
    splits; the last split runs to the hop's end, so a graph captured at one length stays right as t
    grows. v_shift: cache positions dropped from the front of V (row ``i`` of V is position ``i +
    v_shift``). TOP_INT8: the top level holds int8 rows with fp32 scales in TopScale (B, H, slots).
    Tensors are (HEADS, keys, dim): the key indices are shared by the heads of a batch row.
    """
    b, h0, heads, h_ok, t, off, q1, q2, inv, k_base = _head_setup(
        Q,
        K,
        Length,
        Offset,
        Consts,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kd,
        H,
        G,
        HEADS,
        BLOCK_DH,
        D1,
        D2,
        ROPE,
        ACC,
    )
    hop_id = tl.program_id(1)
    split = tl.program_id(2)
    kvh = heads // G
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_head = k_base[:, None, None] + offs_h[None, None, :] * stride_kd
    k1_ok = h_ok[:, None, None] & (offs_h[None, None, :] < D1)
    k2_ok = h_ok[:, None, None] & (offs_h[None, None, :] < D2)
    dv_ok = h_ok[:, None, None] & (offs_dv[None, None, :] < NDV)

    m_i = tl.full([HEADS], float("-inf"), ACC)
    l_i = tl.zeros([HEADS], ACC)
    acc = tl.zeros([HEADS, BLOCK_DV], ACC)
    for hop in tl.static_range(M):
        if hop_id == hop:
            w = W[hop]
            r = R[hop]
            if r == 0:  # top hop: the whole past
                a = t // w
                start = t * 0
            else:
                a = (t // w) % r
                start = (t // (w * r)) * (w * r)
            quantized = TOP_INT8 and hop == M - 1
            if hop == 0:
                v_head = Vals[0] + b * stride_vals[0] + kvh[:, None, None] * stride_vals[1]
            else:
                v_head = (
                    Vals[hop]
                    + b * stride_vals[4 * hop]
                    + heads[:, None, None] * stride_vals[4 * hop + 1]
                )
            v_head += offs_dv[None, None, :] * stride_vals[4 * hop + 3]
            lo = split.to(tl.int64) * SPAN[hop]
            hi = tl.minimum(a + 1, lo + SPAN[hop])
            if split == SPLITS[hop] - 1:
                hi = a + 1
            if split >= SPLITS[hop]:
                hi = lo
            for c in range(lo, hi, BLOCK_B[hop]):
                if SUMMARY and hop > 0:  # fibre and summary keys of the same b interleaved
                    j = tl.arange(0, 2 * BLOCK_B[hop])
                    pos = c + j // 2
                    summ = (j % 2) == 1
                    u = tl.where(summ, start + pos * w + (w - 1), t - (a - pos) * w)
                    # summary keys of blocks b < a; none when t ends its own block (its fibre key is
                    # that token). The scalar condition goes into the bound: a scalar comparison
                    # &-ed with a block gives a non-bool mask under the interpreter, which triton
                    # 3.9's interpreter rejects
                    n_summ = tl.where(t % w == w - 1, 0, a)
                    ok = (pos < hi) & ((~summ) | (pos < n_summ))
                else:
                    pos = c + tl.arange(0, BLOCK_B[hop])
                    u = t - (a - pos) * w
                    ok = pos < hi
                ok = ok & (u != t)  # the new token: added by the combine kernel
                k_ptr = k_head + ((off + u) * stride_kt)[None, :, None]
                k1 = tl.load(k_ptr, mask=ok[None, :, None] & k1_ok, other=0.0).to(
                    ACC
                )  # (HEADS, keys, BLOCK_DH)
                k2 = tl.load(k_ptr + D1 * stride_kd, mask=ok[None, :, None] & k2_ok, other=0.0).to(
                    ACC
                )
                # V is loaded before the scores need it: both HBM reads in flight at once
                if hop == 0:
                    v_ptr = v_head + ((off + u - v_shift) * stride_vals[2])[None, :, None]
                    v = tl.load(v_ptr, mask=ok[None, :, None] & dv_ok, other=0.0).to(ACC)
                else:
                    row = u
                    if r != 0:
                        row = u % (w * r)
                    v_ptr = v_head + (row * stride_vals[4 * hop + 2])[None, :, None]
                    v = tl.load(v_ptr, mask=ok[None, :, None] & dv_ok, other=0).to(ACC)
                    if quantized:
                        s_ptr = TopScale + b * stride_sb + heads[:, None] * stride_sh + row[None, :]
                        row_scales = tl.load(s_ptr, mask=h_ok[:, None] & ok[None, :], other=0.0)
                        v = (v.to(tl.float32) * row_scales[:, :, None]).to(ACC)
                if (
                    ROPE
                ):  # rotate by the key's position relative to the query's: b - a = (c - a) + j
                    # sin/cos of the chunk's first angle, then the angle-sum rule with the table of
                    # j (BLOCK_B <= ROPE_TABLE; a sin and cos per key and frequency was ~25% of this
                    # kernel)
                    first = (c - a).to(ACC) * inv
                    cos_c = tl.cos(first)[None, :]
                    sin_c = tl.sin(first)[None, :]
                    tab = Consts + 1 + D1 + (pos - c)[:, None] * D1 + offs_h[None, :]
                    in_d = offs_h[None, :] < D1
                    cos_j = tl.load(tab, mask=in_d, other=1.0)
                    sin_j = tl.load(tab + ROPE_TABLE * D1, mask=in_d, other=0.0)
                    cos = (cos_c * cos_j - sin_c * sin_j)[None, :, :]
                    sin = (sin_c * cos_j + cos_c * sin_j)[None, :, :]
                    k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
                sc = tl.sum(k1 * q1[:, None, :] + k2 * q2[:, None, :], 2)  # (HEADS, keys)
                sc = tl.where(ok[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                m_safe = tl.where(
                    m_new == float("-inf"), 0.0, m_new
                )  # no key yet: keep l and acc at 0
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(sc - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 1)
                m_i = m_new

    part = (
        Part + b * stride_pb + heads * stride_ph + hop_id * stride_pm + split * stride_ps
    )  # (HEADS,)
    tl.store(part, m_i, mask=h_ok)
    tl.store(part + 1, l_i, mask=h_ok)
    tl.store(part[:, None] + 2 + offs_dv[None, :], acc, mask=h_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    Q,
    K,
    Vals,
    Part,
    O,
    Length,
    NewLength,
    Offset,
    Consts,
    TopScale,
    Gates,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vals,
    stride_ob,
    stride_oh,
    stride_od,
    stride_sb,
    stride_sh,
    stride_pb,
    stride_ph,
    stride_pm,
    stride_ps,
    H,
    G,
    v_shift,
    stride_gh,
    W: tl.constexpr,
    R: tl.constexpr,
    SPLITS: tl.constexpr,
    M: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    NDV: tl.constexpr,
    ROPE: tl.constexpr,
    TOP_INT8: tl.constexpr,
    GATED: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
):
    """The hops in order for the new token: each merges its partials with the new token's own key.

    The own key is the same at every hop (k_t, rotated by 0: RoPE is relative); its value is V[t] at
    hop 0 and the previous hop's output at hop l >= 1, which is first stored in its ring slot (the
    slot it overwrites lies outside its block), rounded to the ring's dtype (or int8 with a scale)
    as the PyTorch path stores it. Head 0's program also writes ``length + 1``. GATED: hop l >= 1's
    output is mixed with that previous output, ``prev + g[h, l-1] * (out - prev)`` (hop gates).
    """
    b, h0, heads, h_ok, t, off, q1, q2, inv, k_base = _head_setup(
        Q,
        K,
        Length,
        Offset,
        Consts,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kd,
        H,
        G,
        HEADS,
        BLOCK_DH,
        D1,
        D2,
        ROPE,
        ACC,
    )
    tl.store(NewLength + b, t + 1, mask=h0 == 0)
    kvh = heads // G
    offs_h = tl.arange(0, BLOCK_DH)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = h_ok[:, None] & (offs_dv[None, :] < NDV)
    k_ptr = k_base[:, None] + (off + t) * stride_kt + offs_h[None, :] * stride_kd
    k1 = tl.load(k_ptr, mask=h_ok[:, None] & (offs_h[None, :] < D1), other=0.0).to(ACC)
    k2 = tl.load(k_ptr + D1 * stride_kd, mask=h_ok[:, None] & (offs_h[None, :] < D2), other=0.0).to(
        ACC
    )
    s_self = tl.sum(k1 * q1 + k2 * q2, 1)  # (HEADS,)
    v_ptr = (
        Vals[0]
        + b * stride_vals[0]
        + kvh[:, None] * stride_vals[1]
        + (off + t - v_shift) * stride_vals[2]
    )
    own = tl.load(v_ptr + offs_dv[None, :] * stride_vals[3], mask=dv_ok, other=0.0).to(
        ACC
    )  # (HEADS, BLOCK_DV)

    out = own
    prev = own
    for hop in tl.static_range(M):
        # this token's level-hop value: the previous output, stored as the PyTorch path stores it
        if hop > 0:
            prev = out.to(O.dtype.element_ty).to(
                ACC
            )  # before any int8 rounding: what the gate mixes
            w = W[hop]
            r = R[hop]
            slot = t
            if r != 0:
                slot = t % (w * r)
            ring = Vals[hop] + b * stride_vals[4 * hop] + heads[:, None] * stride_vals[4 * hop + 1]
            slot_ptr = (
                ring + slot * stride_vals[4 * hop + 2] + offs_dv[None, :] * stride_vals[4 * hop + 3]
            )
            if TOP_INT8 and hop == M - 1:
                own = out.to(O.dtype.element_ty).to(tl.float32)
                # div_rn: correctly rounded like PyTorch's division (plain '/' compiles to an
                # approximate one on CUDA), so both paths store the same bytes; lanes past NDV hold
                # zeros
                row_scale = tl.math.div_rn(
                    tl.max(tl.abs(own), 1), tl.full([HEADS], 127.0, tl.float32)
                )
                divisor = tl.where(row_scale > 0, row_scale, 1.0)[:, None]
                own = tl.floor(tl.math.div_rn(own, tl.broadcast_to(divisor, own.shape)) + 0.5)
                tl.store(slot_ptr, own.to(tl.int8), mask=dv_ok)
                tl.store(TopScale + b * stride_sb + heads * stride_sh + slot, row_scale, mask=h_ok)
                own = (own * row_scale[:, None]).to(ACC)
            else:
                own = out.to(O.dtype.element_ty).to(Vals[hop].dtype.element_ty).to(ACC)
                tl.store(slot_ptr, own.to(Vals[hop].dtype.element_ty), mask=dv_ok)
        m_i = s_self
        l_i = tl.full([HEADS], 1.0, ACC)
        acc = own
        part = Part + b * stride_pb + heads * stride_ph + hop * stride_pm  # (HEADS,)
        for split in range(SPLITS[hop]):
            m_p = tl.load(part + split * stride_ps, mask=h_ok, other=float("-inf"))
            l_p = tl.load(part + split * stride_ps + 1, mask=h_ok, other=0.0)
            acc_p = tl.load(
                part[:, None] + split * stride_ps + 2 + offs_dv[None, :],
                mask=h_ok[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m_i, m_p)  # finite: m_i starts at the own key's score
            alpha = tl.exp(m_i - m_new)
            beta = tl.exp(m_p - m_new)
            l_i = l_i * alpha + l_p * beta
            acc = acc * alpha[:, None] + acc_p * beta[:, None]
            m_i = m_new
        out = acc / l_i[:, None]
        if GATED and hop > 0:
            gate = tl.load(Gates + heads * stride_gh + (hop - 1), mask=h_ok, other=0.0).to(ACC)
            out = prev + gate[:, None] * (out - prev)

    o_ptr = O + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=dv_ok)


# ----------------------------------------------------------------------------------------------
# Config and launcher
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    heads: int  # query heads per program (0: all of a batch row)
    tile: int  # max heads x key lanes x head-dim lanes of one key or value tile (registers)
    num_warps: int  # warps per program
    split_chunks: (
        int  # chunks of hop positions per program of the partial kernel (0: one program per hop)
    )
    combine_warps: (
        int  # warps per program of the combine kernel (tiny tensors: more warps only add barriers)
    )


# Benchmarks set fields here (e.g. {"num_warps": 4}) to compare configs without editing _config.
CONFIG_OVERRIDE: dict = {}


def _config() -> _Config:
    # the interpreter's cost is per op and program, hardly per element: few programs, big tiles
    cfg = (
        _Config(0, 1 << 20, 1, 0, 1) if _INTERPRET else _Config(1, 4096, 4, 1, 1)
    )  # swept on the H200 (docs/performance.md)
    return dataclasses.replace(cfg, **CONFIG_OVERRIDE)


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def fallback_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positional) -> str | None:
    """Why the kernel cannot run this step (None when it can); the caller then uses the PyTorch
    path."""
    if q.shape[2] != 1:
        return f"{q.shape[2]} new tokens (the kernel decodes one)"
    if not (q.is_cuda or _INTERPRET):
        return f"tensors on {q.device} and TRITON_INTERPRET is not set"
    for x in (q, k, v):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return f"dtype {x.dtype} is not supported"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return "gradients are needed (the kernel has no backward)"
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        return f"head dims ({q.shape[-1]}, {v.shape[-1]}) exceed {_MAX_HEAD_DIM}"
    if positional is not None and getattr(positional, "inv_freq", None) is None:
        return f"per-hop positional scheme {type(positional).__name__} has no inv_freq"
    return None


def decode_constants(
    scale: float, inv_freq: torch.Tensor | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """[scale, inv_freq, cos table, sin table] in the kernel's accumulator dtype: a tensor, so fp64
    keeps its precision (a Python float argument would reach the kernel as fp32). The tables hold
    cos / sin(j * inv_freq) for j < ``_ROPE_TABLE`` (rows of len(inv_freq)), computed in fp64.
    Build once per layer and dtype."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    head = torch.tensor([scale], dtype=work)
    if inv_freq is None:
        return head.to(device)
    inv = inv_freq.detach().to("cpu", torch.float64)
    angles = torch.arange(_ROPE_TABLE, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat(
        [head, inv.to(work), angles.cos().flatten().to(work), angles.sin().flatten().to(work)]
    ).to(device)


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rings: Sequence[torch.Tensor],
    length: torch.Tensor,
    offset: torch.Tensor,
    dims: tuple[int, ...],
    consts: torch.Tensor,
    *,
    summary: bool,
    rope: bool,
    max_length: int,
    v_shift: int = 0,
    top_scale: torch.Tensor | None = None,
    hop_gates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token through all hops, in two launches: per-(hop, split) partials, then their
    combine.

    q (B, H, 1, d); k, v (B, Hkv, T, d|dv): the K/V cache, the new token included. rings: levels
    1..m-1, (B, H, slots, dv) each (the top level must already hold room for index ``length``).
    length, offset (B,): the new token's compact index and the left padding. dims: the fold,
    coarsest first. consts: from ``decode_constants``. summary: ``coverage == "full"``. max_length:
    host copy of ``length.max()``. v_shift: positions trimmed from the front of v (it holds
    positions ``v_shift ..``; the first hop reads only the new token's finest block). top_scale: the
    fp32 row scales (B, H, slots) of an int8 top level. hop_gates: (H, m - 1) learned hop gates, or
    None.
    Returns the output (B, H, 1, dv) and ``length + 1``.
    """
    B, H, _, d = q.shape
    m, dv, G = len(dims), v.shape[-1], H // k.shape[1]
    check(
        len(rings) == m - 1,
        f"decode_step needs {m - 1} rings (one per level above V), got {len(rings)}",
    )
    check(
        m == 1 or rings[-1].shape[2] > max_length,
        f"the top ring has {rings[-1].shape[2] if rings else 0} slots: it needs one for index "
        f"max_length={max_length}",
    )
    D1, D2 = (d + 1) // 2, d // 2
    block_dh, block_dv = _pow2(D1), _pow2(dv)
    cfg = _config()
    # hop l (finest first): stride w_l = prod of the l finest dims, size r_l (0 = the top hop)
    W = tuple(math.prod(dims[m - hop :]) for hop in range(m))
    R = tuple(dims[m - 1 - hop] for hop in range(m - 1)) + (0,)
    heads = _pow2(H) if cfg.heads == 0 else cfg.heads
    lanes = heads * max(2 * block_dh, block_dv)
    blocks = []
    for hop in range(m):
        count = R[hop] if R[hop] else max_length // W[hop] + 1  # hop positions b of the largest t
        cap = max(1, cfg.tile // (lanes * (2 if summary and hop else 1)))
        if rope:  # chunks rotate their keys from the table of _ROPE_TABLE rows
            cap = min(cap, _ROPE_TABLE)
        blocks.append(min(_pow2(count), 1 << (cap.bit_length() - 1)))  # a power of two <= cap
    # splits of each hop's positions over programs (flash-decoding): chunks of BLOCK_B per split
    counts = [R[hop] if R[hop] else max_length // W[hop] + 1 for hop in range(m)]
    spans = [
        blocks[hop] * cfg.split_chunks if cfg.split_chunks else _pow2(counts[hop])
        for hop in range(m)
    ]
    splits = [triton.cdiv(counts[hop], spans[hop]) for hop in range(m)]
    vals = (v, *rings)
    out = torch.empty((B, H, 1, dv), dtype=q.dtype, device=q.device)
    if POISON:
        out.fill_(float("nan"))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    part = torch.empty(
        (B, H, m, max(splits), 2 + block_dv), dtype=acc, device=q.device
    )  # (max, sum, values)
    new_length = torch.empty_like(length)
    int8 = top_scale is not None
    check(
        int8 == (len(rings) > 0 and rings[-1].dtype == torch.int8),
        "an int8 top level comes with its scales (top_scale)",
    )
    check(
        not int8 or (top_scale.stride(2) == 1 and top_scale.shape[2] > max_length),
        "top_scale must be contiguous along tokens, with a slot for index max_length",
    )
    scales = top_scale if int8 else consts  # any tensor: not read without TOP_INT8
    gates = (
        consts if hop_gates is None else hop_gates.to(acc).contiguous()
    )  # consts: a placeholder, not read
    stride_sb, stride_sh = (top_scale.stride(0), top_scale.stride(1)) if int8 else (0, 0)
    common = dict(
        M=m,
        D1=D1,
        D2=D2,
        NDV=dv,
        ROPE=rope,
        TOP_INT8=int8,
        HEADS=heads,
        BLOCK_DH=block_dh,
        BLOCK_DV=block_dv,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    programs = B * triton.cdiv(H, heads)
    val_strides = tuple(s for x in vals for s in x.stride())
    _decode_partial_kernel[(programs, m, max(splits))](
        q,
        k,
        vals,
        part,
        length,
        offset,
        consts,
        scales,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        val_strides,
        stride_sb,
        stride_sh,
        *part.stride()[:4],
        H,
        G,
        v_shift,
        W=W,
        R=R,
        BLOCK_B=tuple(blocks),
        SPAN=tuple(spans),
        SPLITS=tuple(splits),
        SUMMARY=summary,
        ROPE_TABLE=_ROPE_TABLE,
        num_warps=cfg.num_warps,
        **common,
    )
    _decode_combine_kernel[(programs,)](
        q,
        k,
        vals,
        part,
        out,
        length,
        new_length,
        offset,
        consts,
        scales,
        gates,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        val_strides,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        stride_sb,
        stride_sh,
        *part.stride()[:4],
        H,
        G,
        v_shift,
        gates.stride(0) if hop_gates is not None else 0,
        W=W,
        R=R,
        SPLITS=tuple(splits),
        GATED=hop_gates is not None,
        num_warps=cfg.combine_warps,
        **common,
    )
    return out, new_length
