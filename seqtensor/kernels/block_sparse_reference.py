"""The oracle of ``kernels.block_sparse``: the retrieval hop given its block selection, computed
densely (every query against every key, an allowed-mask, one masked softmax), in the inputs' dtype
(float64 inputs give a float64 oracle). O(Lq * T) memory: for tests and small shapes only.

Legend and semantics as in ``kernels.block_sparse`` (and ``adapters/text/retrieval.py``): query i
(one of the last Lq of the T tokens) with window start s_i attends, in one softmax, to its local
keys s_i..i, to the first ``sinks`` tokens before s_i, and to every token (>= sinks) of the blocks
its query chunk selected. With ``rope_theta`` local pairs are rotated at their true positions and
memory pairs (sinks, retrieved) ``memory_distance + i - s_i`` apart.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "window_starts",
    "rotate",
    "block_sparse_reference",
    "block_scores_reference",
    "memory_queries",
]


def window_starts(positions: torch.Tensor, local: int, block: int, sliding: bool) -> torch.Tensor:
    """First local key of each query: its aligned ``local`` block, or (sliding) its last ``local``
    tokens extended back to a block boundary, so every earlier token is in a retrievable block."""
    if sliding:
        return (positions - local + 1).clamp(min=0) // block * block
    return positions // local * local


def window_start(i: int, local: int, block: int, sliding: bool) -> int:
    """``window_starts`` of one position, on the host (no device sync)."""
    return max(0, i - local + 1) // block * block if sliding else i // local * local


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama rotate-half RoPE of x (..., P, d) at ``positions`` (P,), frequencies theta^(-2i/d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def memory_queries(
    q: torch.Tensor,
    T: int,
    local: int,
    block: int,
    sliding: bool,
    rope_theta: float | None,
    memory_distance: int,
    memory_anchor: str = "window",
) -> torch.Tensor:
    """q as the memory keys (sinks, retrieved blocks) see it: rotated ``memory_distance + i - s_i``
    (anchor "window") or ``memory_distance`` ("query") tokens ahead of an unrotated key, or q
    itself without positions."""
    if rope_theta is None:
        return q
    pos = torch.arange(T - q.shape[2], T, device=q.device)
    starts = window_starts(pos, local, block, sliding)
    ahead = pos - starts if memory_anchor == "window" else torch.zeros_like(pos)
    return rotate(q, ahead + memory_distance, rope_theta)


def allowed_keys(
    Lq: int,
    T: int,
    selection: torch.Tensor,
    *,
    block: int,
    chunk: int,
    local: int,
    sliding: bool,
    sinks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local (Lq, T), memory (B, Hkv, Lq, T)) boolean masks of the keys each query attends to."""
    device = selection.device
    pos = torch.arange(T - Lq, T, device=device)
    starts = window_starts(pos, local, block, sliding)
    t = torch.arange(T, device=device)
    local_ok = (t[None, :] >= starts[:, None]) & (t[None, :] <= pos[:, None])
    sink_ok = (t[None, :] < sinks) & (t[None, :] < starts[:, None])
    B, Hkv, C, kk = selection.shape
    chosen = torch.zeros(B, Hkv, C, T // block + 1, dtype=torch.bool, device=device)
    sel = selection.long()
    chosen.scatter_(-1, torch.where(sel < 0, T // block, sel), True)
    chosen[..., -1] = False  # the -1 padding's slot
    per_token = chosen[..., t // block] & (t >= sinks)  # (B, Hkv, C, T)
    retrieved = per_token[:, :, pos // chunk - (T - Lq) // chunk]  # absolute chunks
    return local_ok, retrieved | sink_ok


def block_sparse_reference(
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
) -> torch.Tensor:
    """Dense masked-softmax version of ``block_sparse.block_sparse_attention`` (same arguments,
    unchecked). q (B, H, Lq, d), k (B, Hkv, T, d), v (B, Hkv, T, dv) -> (B, H, Lq, dv)."""
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    distance = local if memory_distance is None else memory_distance
    local_ok, memory_ok = allowed_keys(
        Lq, T, selection, block=block, chunk=chunk, local=local, sliding=sliding, sinks=sinks
    )
    q_mem = memory_queries(q, T, local, block, sliding, rope_theta, distance, memory_anchor)
    q_loc, k_loc = q, k
    if rope_theta is not None:
        q_loc = rotate(q, torch.arange(T - Lq, T, device=q.device), rope_theta)
        k_loc = rotate(k, torch.arange(T, device=q.device), rope_theta)
    kr = k.repeat_interleave(G, 1)
    logits_loc = q_loc @ k_loc.repeat_interleave(G, 1).transpose(-1, -2)
    logits_mem = q_mem @ kr.transpose(-1, -2)
    memory_ok = memory_ok.repeat_interleave(G, 1)
    logits = torch.where(local_ok, logits_loc, logits_mem)
    logits = logits.masked_fill(~(local_ok | memory_ok), float("-inf"))
    p = torch.softmax(logits * scale, -1)
    return p @ v.repeat_interleave(G, 1)


def block_scores_reference(
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
) -> torch.Tensor:
    """(B, Hkv, C, NB) scores of ``block_sparse.block_scores``, one absolute chunk at a time: chunk
    g ranked by the group-mean memory query of chunk g - 1's tokens among the queries."""
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    distance = local if memory_distance is None else memory_distance
    mq = memory_queries(q, T, local, block, sliding, rope_theta, distance, memory_anchor)
    mq = mq.unflatten(1, (Hkv, H // Hkv)).mean(2)
    NB, g0, g1 = T // block, (T - Lq) // chunk, (T - 1) // chunk
    kb = k[:, :, : NB * block].unflatten(2, (NB, block))
    ends = (torch.arange(NB, device=q.device) + 1) * block
    rows = []
    for g in range(g0, g1 + 1):
        lo, hi = max((g - 1) * chunk, T - Lq), min(g * chunk, T)
        start = int(window_starts(torch.tensor(g * chunk), local, block, sliding))
        usable = (ends <= start) & (ends > sinks) & (hi > lo)
        r = mq[:, :, lo - (T - Lq) : hi - (T - Lq)].mean(2) if hi > lo else mq[:, :, 0] * 0
        if representatives == "minmax":
            prod = torch.maximum(r[:, :, None] * kb.amax(3), r[:, :, None] * kb.amin(3))
            score = prod.sum(-1)
        else:
            score = (r[:, :, None] * kb.mean(3)).sum(-1)
        rows.append(score.masked_fill(~usable, float("-inf")))
    return torch.stack(rows, 2)
