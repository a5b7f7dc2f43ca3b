"""The retrieval hop: causal local attention plus the top-k most relevant earlier blocks, one
softmax.

Legend: B batch, H query heads, Hkv kv heads (G = H / Hkv per group), T tokens (keys), Lq queries
(the last Lq of the T tokens), d head dim, ``local`` the finest block of the fold.

For a query at token i, with s = the start of its window: its aligned local block of ``local``
tokens (the fold's finest block), or with ``sliding`` its last ``local`` tokens extended back to a
block boundary:

- local keys: the tokens s..i (causal); without ``sliding`` exactly the fold's finest hop;
- retrieved keys: every token of the ``top_k`` blocks of ``block`` tokens that lie wholly before
  s, ranked for this query by ``max over the block's keys of q_bar . k``, where q_bar is the mean
  query of the query's kv group (GQA: one selection per kv head), at the positions the hop gives
  them (below): the logit the block's best key would get;
- sink keys: the first ``sinks`` tokens (when they lie before s).

All of them share one softmax. Each key is counted once (sinks inside a retrieved block are sinks).
Only tokens before i are ever read, so the hop is causal, and a query's keys depend only on its own
query and earlier keys: decoding with a KV cache gives what a whole-sequence call gives.

Positions: with ``rope_theta`` None the hop uses q and k as given (e.g. already rotated at their
true positions by the model, or no positions at all). With ``rope_theta``, q and k arrive unrotated
and the hop applies RoPE (the Llama convention: halves rotated, frequencies ``theta^(-2i/d)``):
local keys at their true distances, retrieved and sink keys ``memory_distance + (i - s)`` tokens
back (default ``memory_distance``: ``local``), inside the range the model was trained on however
far back they are.

``retrieval_attention`` is the hop alone; ``retrieval_tensorized_attention`` adds the fold's coarse
hops after it. The reference computes scores for every earlier key (O(T) per query) in tiles of
queries, in the inputs' precision (float32 for half inputs); float64 inputs give a float64 oracle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..._validation import check, is_int
from ...attention import tensorized_attention
from ...core.folds import Fold
from ...kernels.reference import work_dtype

__all__ = [
    "RetrievalConfig",
    "retrieval_attention",
    "retrieval_selection",
    "retrieval_tensorized_attention",
]


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of the retrieval hop (``tensorize(model, retrieval=...)``).

    top_k : earlier blocks each query attends to, besides its local block.
    block : tokens per retrievable block; must divide the fold's finest dim.
    sinks : initial tokens every query also attends to.
    memory_distance : with RoPE applied by the hop, how far back retrieved and sink tokens sit
        (default: the finest dim, so every distance stays below twice the local block).
    coarse_hops : also run the fold's coarse hops after the retrieval hop (axial coverage only).
    sliding : local keys are each query's last ``local`` tokens (back to a block boundary) rather
        than its aligned block.
    """

    top_k: int = 16
    block: int = 128
    sinks: int = 64
    memory_distance: int | None = None
    coarse_hops: bool = False
    sliding: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "block", "sinks"):
            value = getattr(self, name)
            check(
                is_int(value) and value >= 0,
                f"RetrievalConfig.{name} must be an int >= 0, got {value!r}",
            )
            object.__setattr__(self, name, int(value))  # numpy integers saved as JSON ints
        check(self.block >= 1, f"RetrievalConfig.block must be >= 1, got {self.block}")
        check(
            self.memory_distance is None
            or (is_int(self.memory_distance) and self.memory_distance >= 0),
            f"RetrievalConfig.memory_distance must be None or an int >= 0, "
            f"got {self.memory_distance!r}",
        )
        for name in ("coarse_hops", "sliding"):
            check(
                isinstance(getattr(self, name), bool),
                f"RetrievalConfig.{name} must be a bool, got {getattr(self, name)!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: RetrievalConfig | dict[str, Any] | None) -> RetrievalConfig | None:
        """None, a RetrievalConfig, or its dict (as saved in ``config.seqtensor``)."""
        if value is None or isinstance(value, cls):
            return value
        check(
            isinstance(value, dict),
            f"retrieval must be None, a RetrievalConfig or a dict, got {type(value).__name__}",
            TypeError,
        )
        unknown = set(value) - set(cls.__dataclass_fields__)
        check(not unknown, f"retrieval: unknown settings {sorted(unknown)}")
        return cls(**value)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama-convention RoPE: x (..., P, d) at ``positions`` (P,) (the same for every row)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv  # (P, d/2)
    angles = torch.cat([angles, angles], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def _check_inputs(q, k, v, local: int, block: int) -> None:
    check(
        q.ndim == k.ndim == v.ndim == 4,
        f"q, k, v must be 4-D (B, heads, tokens, d), got {q.ndim}, {k.ndim}, {v.ndim}",
    )
    B, H, Lq, d = q.shape
    check(
        k.shape[:3] == v.shape[:3] and k.shape[0] == B and k.shape[-1] == d,
        f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}",
    )
    check(H % k.shape[1] == 0, f"query heads {H} must be a multiple of kv heads {k.shape[1]}")
    check(Lq <= k.shape[2], f"{Lq} queries but only {k.shape[2]} keys")
    check(
        local >= 1 and block >= 1 and local % block == 0,
        f"the local block ({local}) must be a positive multiple of the retrieval block ({block})",
    )


def _window_starts(positions: torch.Tensor, local: int, block: int, sliding: bool) -> torch.Tensor:
    """First local key of each query: its aligned local block, or (sliding) its last ``local``
    tokens extended back to a block boundary, so every earlier token is in a retrievable block."""
    if sliding:
        return (positions - local + 1).clamp(min=0) // block * block
    return positions // local * local


def _select(
    qbar: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, block: int, top_k: int, sinks: int
):
    """Top-k blocks wholly before each query's window start: qbar (B, Hkv, t, d), k (B, Hkv, T, d),
    starts (t,) -> (blocks (B, Hkv, t, kk) int64, usable (B, Hkv, t, kk) bool)."""
    nb = int(starts.max()) // block
    kk = min(top_k, nb)
    if kk == 0:
        shape = (*qbar.shape[:3], 0)
        return (
            torch.zeros(shape, dtype=torch.long, device=qbar.device),
            torch.zeros(shape, dtype=torch.bool, device=qbar.device),
        )
    scores = torch.einsum("bhqd,bhkd->bhqk", qbar, k[:, :, : nb * block])
    scores = scores.unflatten(-1, (nb, block)).amax(-1)  # (B, Hkv, t, nb)
    ends = (torch.arange(nb, device=k.device) + 1) * block
    # blocks made only of sink tokens add nothing: the sinks are attended to anyway
    unusable = (ends[None, :] > starts[:, None]) | (ends[None, :] <= sinks)  # (t, nb)
    scores = scores.masked_fill(unusable, float("-inf"))
    top, blocks = scores.topk(kk, dim=-1)
    return blocks, top > float("-inf")


def retrieval_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    local: int,
    block: int,
    top_k: int,
    sinks: int = 0,
    *,
    sliding: bool = False,
    rope_theta: float | None = None,
    memory_distance: int | None = None,
) -> list[torch.Tensor]:
    """The retrieved blocks of each query (for analysis and tests): one (B, Hkv, kk_i) tensor per
    query i of the last Lq tokens, -1 where fewer than kk_i blocks are usable."""
    _check_inputs(q, k, k, local, block)
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    distance = local if memory_distance is None else memory_distance
    qbar = q.unflatten(1, (Hkv, H // Hkv)).mean(2)
    out = []
    for i in range(T - Lq, T):
        start = _window_starts(torch.tensor([i], device=q.device), local, block, sliding)
        qi = qbar[:, :, i - (T - Lq)][:, :, None]
        if rope_theta is not None:
            qi = _rotate(qi, distance + i - start, rope_theta)
        blocks, usable = _select(qi, k, start, block, top_k, sinks)
        out.append(torch.where(usable, blocks, -1)[:, :, 0])
    return out


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local: int,
    *,
    top_k: int,
    block: int,
    sinks: int = 0,
    sliding: bool = False,
    scale: float | None = None,
    rope_theta: float | None = None,
    memory_distance: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """The retrieval hop (see the module docstring). q (B, H, Lq, d) are the last Lq of the T
    tokens of k (B, Hkv, T, d) and v (B, Hkv, T, dv) -> (B, H, Lq, dv).

    ``sliding``: the local keys of query i are its last ``local`` tokens (back to a block
    boundary) instead of its aligned local block, so a query at the start of a block keeps its
    recent context.
    ``tile``: queries processed together (default 512; memory grows with tile * top_k * block).
    """
    _check_inputs(q, k, v, local, block)
    check(top_k >= 0 and sinks >= 0, f"top_k and sinks must be >= 0, got {top_k}, {sinks}")
    B, H, Lq, d = q.shape
    Hkv, T, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    distance = local if memory_distance is None else memory_distance
    tile = 512 if tile is None else tile
    check(tile >= 1, f"tile must be >= 1, got {tile}")
    work = work_dtype(q.dtype)
    qg = q.to(work).unflatten(1, (Hkv, G))  # (B, Hkv, G, Lq, d)
    kw, vw = k.to(work), v.to(work)
    offset = T - Lq
    out = torch.empty(B, Hkv, G, Lq, dv, dtype=work, device=q.device)
    a = offset
    while a < T:
        b = min(T, (a // tile + 1) * tile)
        if not sliding:  # a tile stays inside one local block
            b = min(b, a // local * local + local)
        qt = qg[:, :, :, a - offset : b - offset]  # (B, Hkv, G, t, d)
        t = b - a
        qpos = torch.arange(a, b, device=q.device)
        starts = _window_starts(qpos, local, block, sliding)  # (t,)
        lo = int(starts[0])
        k_loc, v_loc = kw[:, :, lo:b], vw[:, :, lo:b]
        kpos = torch.arange(lo, b, device=q.device)
        ns = min(sinks, int(starts[-1]))
        q_mem = qt
        if rope_theta is not None:
            # local keys at their true distances; retrieved and sink keys at position 0, so they sit
            # distance + (i - start) tokens back
            q_mem = _rotate(qt, qpos - starts + distance, rope_theta)
            qt = _rotate(qt, qpos, rope_theta)
            k_loc = _rotate(k_loc, kpos, rope_theta)
        # ranked by the logit a block's best key would get where it is placed
        blocks, usable = _select(q_mem.mean(2), kw, starts, block, top_k, sinks)
        outside = (kpos[None, :] > qpos[:, None]) | (kpos[None, :] < starts[:, None])
        parts = [torch.einsum("bhgqd,bhkd->bhgqk", qt, k_loc).masked_fill(outside, float("-inf"))]
        values = [v_loc]
        if ns > 0:
            sink_logits = torch.einsum("bhgqd,bhkd->bhgqk", q_mem, kw[:, :, :ns])
            late = torch.arange(ns, device=q.device)[None, :] >= starts[:, None]
            parts.append(sink_logits.masked_fill(late, float("-inf")))
            values.append(vw[:, :, :ns])
        kk = blocks.shape[-1]
        if kk > 0:
            tokens = (blocks[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)
            keep = usable.repeat_interleave(block, -1) & (tokens >= sinks)  # (B, Hkv, t, kk*block)
            index = tokens.flatten(2)[..., None]
            k_mem = kw.gather(2, index.expand(-1, -1, -1, d)).unflatten(2, (t, -1))
            v_mem = vw.gather(2, index.expand(-1, -1, -1, dv)).unflatten(2, (t, -1))
            mem = torch.einsum("bhgqd,bhqmd->bhgqm", q_mem, k_mem)
            parts.append(mem.masked_fill(~keep[:, :, None], float("-inf")))
        p = torch.softmax(torch.cat(parts, -1) * scale, -1)
        pieces = p.split([x.shape[-1] for x in parts], -1)
        o = sum(torch.einsum("bhgqk,bhkd->bhgqd", w, x) for w, x in zip(pieces, values))
        if kk > 0:
            o = o + torch.einsum("bhgqm,bhqmd->bhgqd", pieces[-1], v_mem)
        out[:, :, :, a - offset : b - offset] = o
        a = b
    return out.flatten(1, 2).to(q.dtype)


def retrieval_tensorized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dims: tuple[int, ...],
    config: RetrievalConfig,
    *,
    scale: float | None = None,
    rope_theta: float | None = None,
    coverage: str = "axial",
    positional=None,
    backend: str = "auto",
) -> torch.Tensor:
    """The retrieval hop in place of the fold's finest hop, then (``config.coarse_hops``) the
    coarse hops of the fold ``dims`` (coarsest first; the coarsest may be grown to cover n), as
    ``tensorized_attention`` runs them, on its output. q (B, H, n, d), k/v (B, Hkv, n, d).

    The coarse hops of a causal fold act on fibres that keep the finest coordinate fixed, so they
    run as one order m - 1 tensorized attention per finest coordinate. Summary keys ("full"
    coverage) would couple those; only "axial" coverage is supported after the retrieval hop.
    """
    n = q.shape[2]
    check(k.shape[2] == n, "retrieval_tensorized_attention is a whole-sequence call: q, k, v of n")
    local = dims[-1]
    out = retrieval_attention(
        q,
        k,
        v,
        local,
        top_k=config.top_k,
        block=config.block,
        sinks=config.sinks,
        sliding=config.sliding,
        scale=scale,
        rope_theta=rope_theta,
        memory_distance=config.memory_distance,
    )
    if not config.coarse_hops or len(dims) == 1:
        return out
    check(
        coverage == "axial",
        f"coarse hops after the retrieval hop need coverage='axial' (got {coverage!r}): summary "
        "keys are not implemented there",
        NotImplementedError,
    )
    coarse = (-(-n // (math.prod(dims[1:]))), *dims[1:-1])
    N = coarse[0] * math.prod(dims[1:])

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, h, n, e) -> (B * local, h, N / local, e)
        x = torch.nn.functional.pad(x, (0, 0, 0, N - n))
        x = x.unflatten(2, (N // local, local)).permute(0, 3, 1, 2, 4)
        return x.flatten(0, 1)

    # queries and keys at padded positions come after every real token: causal hops never read them
    # after the first hop the values are per query head: k repeated to match (same weights)
    qs, vs = split(q), split(out)
    ks = split(k.repeat_interleave(q.shape[1] // k.shape[1], 1))
    y = tensorized_attention(
        qs,
        ks,
        vs,
        Fold(coarse, N // local),
        causal=True,
        coverage="axial",
        positional=positional,
        scale=scale,
        backend=backend,
    )  # (B * local, H, N / local, dv)
    y = y.unflatten(0, (q.shape[0], local)).permute(0, 2, 3, 1, 4).flatten(2, 3)
    return y[:, :, :n].to(q.dtype)
