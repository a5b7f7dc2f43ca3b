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
    tokens extended back to a block boundary (``retrieval._window_starts``)."""
    if sliding:
        return (positions - local + 1).clamp(min=0) // block * block
    return positions // local * local


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
) -> torch.Tensor:
    """q as the memory keys (sinks, retrieved blocks) see it: rotated ``memory_distance + i - s_i``
    tokens ahead of an unrotated key, or q itself without positions."""
    if rope_theta is None:
        return q
    pos = torch.arange(T - q.shape[2], T, device=q.device)
    starts = window_starts(pos, local, block, sliding)
    return rotate(q, pos - starts + memory_distance, rope_theta)


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
    retrieved = per_token[:, :, torch.arange(Lq, device=device) // chunk]
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
    q_mem = memory_queries(q, T, local, block, sliding, rope_theta, distance)
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
    representatives: str = "minmax",
) -> torch.Tensor:
    """(B, Hkv, C, NB) scores of each earlier block for each query chunk, -inf for blocks not
    wholly before the chunk's first window start or made only of sink tokens (as
    ``block_sparse.block_scores``)."""
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    distance = local if memory_distance is None else memory_distance
    q_mem = memory_queries(q, T, local, block, sliding, rope_theta, distance)
    C, NB = -(-Lq // chunk), T // block
    qbar = torch.stack(
        [q_mem[:, :, c * chunk : (c + 1) * chunk].mean(2) for c in range(C)], 2
    )  # (B, H, C, d)
    qbar = qbar.unflatten(1, (Hkv, H // Hkv)).mean(2)  # (B, Hkv, C, d)
    kb = k[:, :, : NB * block].unflatten(2, (NB, block))
    if representatives == "minmax":
        kmax, kmin = kb.amax(3), kb.amin(3)
        prod = torch.maximum(
            qbar[:, :, :, None] * kmax[:, :, None], qbar[:, :, :, None] * kmin[:, :, None]
        )
        scores = prod.sum(-1)
    else:
        scores = qbar @ kb.mean(3).transpose(-1, -2)
    pos = torch.arange(T - Lq, T, device=q.device)
    first = window_starts(pos, local, block, sliding)[::chunk]  # (C,) starts are non-decreasing
    ends = (torch.arange(NB, device=q.device) + 1) * block
    unusable = (ends[None, :] > first[:, None]) | (ends[None, :] <= sinks)
    return scores.masked_fill(unusable, float("-inf"))
