"""The retrieval hop: causal local attention plus the top-k most relevant earlier blocks, one
softmax.

Legend: B batch, H query heads, Hkv kv heads (G = H / Hkv per group), T tokens (keys), Lq queries
(the last Lq of the T tokens), d head dim, ``local`` the finest block of the fold, c ``chunk``.

For a query at token i, with s = the start of its window: its aligned local block of ``local``
tokens (the fold's finest block), or with ``sliding`` its last ``local`` tokens extended back to a
block boundary:

- local keys: the tokens s..i (causal); without ``sliding`` exactly the fold's finest hop;
- retrieved keys: every token of the ``top_k`` blocks of ``block`` tokens that lie wholly before
  the selection's start, ranked by a *ranking query* against each block (below), at the positions
  the hop gives them;
- sink keys: the first ``sinks`` tokens (when they lie before s).

All of them share one softmax. Each key is counted once (sinks inside a retrieved block are sinks).

Ranking queries (GQA: one selection per kv head). Every query j has a *memory query*: the mean over
its kv group of its queries, placed (with RoPE) where retrieved keys are seen from j, so that
memory query . key is the group's mean logit for that key.

- per query (``shared=False``): query i ranks by the mean memory query of the last ``chunk``
  queries up to and including i (fewer at the start); ``chunk=1`` is its own. Blocks wholly
  before s.
- shared (``shared=True``): the queries of chunk g (tokens g*c .. g*c + c - 1) share one
  selection, ranked by the mean memory query of the previous chunk g - 1 (chunk 0 retrieves
  nothing), among the blocks wholly before the window start of the chunk's first query.

Both read only queries at or before i, so the output at i depends on tokens <= i alone, and a
decode step (the last queries, with the ranking queries of the ``2c - 1`` tokens before them and
the block representatives kept in ``RetrievalState``) gives what a whole-sequence call gives.

A block's score for a ranking query r (``representative``):

- "max": max over the block's keys of r . k, the exact best logit (reads every key: O(T) per
  ranking query; the oracle);
- "bound": Quest's upper bound sum_d max(r_d kmax_d, r_d kmin_d) from the block's elementwise key
  max and min (>= "max");
- "mean": r . mean key.

"bound" and "mean" read two / one vectors per block (O(T / block)); decoding keeps them in
``RetrievalState``, updated as blocks complete.

Positions: with ``rope_theta`` None the hop uses q and k as given (e.g. already rotated at their
true positions by the model, or no positions at all). With ``rope_theta``, q and k arrive unrotated
and the hop applies RoPE (the Llama convention: halves rotated, frequencies ``theta^(-2i/d)``):
local keys at their true distances, retrieved and sink keys inside the range the model was trained
on however far back they are: with ``memory_anchor="window"`` ``memory_distance + (i - s)`` tokens
back (just before the window), with ``"query"`` exactly ``memory_distance`` back (default
``memory_distance``: ``local``).

``retrieval_attention`` is the hop alone; ``retrieval_tensorized_attention`` adds the fold's coarse
hops after it. The reference computes in tiles of queries, in the inputs' precision (float32 for
half inputs); float64 inputs give a float64 oracle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..._validation import check, check_choice, is_int
from ...attention import tensorized_attention
from ...core.folds import Fold
from ...kernels.block_sparse_reference import window_start, window_starts
from ...kernels.reference import work_dtype

__all__ = [
    "REPRESENTATIVES",
    "RetrievalConfig",
    "RetrievalState",
    "block_representatives",
    "retrieval_attention",
    "retrieval_selection",
    "retrieval_tensorized_attention",
]

REPRESENTATIVES = ("max", "bound", "mean")
MEMORY_ANCHORS = ("window", "query")


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of the retrieval hop (``tensorize(model, retrieval=...)``).

    top_k : earlier blocks each query attends to, besides its local block.
    block : tokens per retrievable block; must divide the fold's finest dim.
    sinks : initial tokens every query also attends to.
    memory_distance : with RoPE applied by the hop, how far back retrieved and sink tokens sit
        (default: the finest dim).
    coarse_hops : also run the fold's coarse hops after the retrieval hop (axial coverage only).
    sliding : local keys are each query's last ``local`` tokens (back to a block boundary) rather
        than its aligned block.
    chunk : queries whose memory queries are averaged into one ranking query (module docstring).
    shared : the queries of a chunk share one selection, ranked by the previous chunk.
    representative : how a block is scored: "max" (exact), "bound" (Quest) or "mean".
    memory_anchor : "window" (retrieved tokens ``memory_distance + (i - s)`` back) or "query"
        (exactly ``memory_distance`` back from every query).
    int8_representatives : block representatives rounded to int8 rows with one fp32 scale each
        ("bound": kmax rounded up and kmin down, so the score stays an upper bound); the decode
        state stores them so, and the whole-sequence call uses the same rounded values.
    """

    top_k: int = 16
    block: int = 128
    sinks: int = 64
    memory_distance: int | None = None
    coarse_hops: bool = False
    sliding: bool = False
    chunk: int = 1
    shared: bool = False
    representative: str = "max"
    memory_anchor: str = "window"
    int8_representatives: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "block", "sinks", "chunk"):
            value = getattr(self, name)
            check(
                is_int(value) and value >= 0,
                f"RetrievalConfig.{name} must be an int >= 0, got {value!r}",
            )
            object.__setattr__(self, name, int(value))  # numpy integers saved as JSON ints
        check(self.block >= 1, f"RetrievalConfig.block must be >= 1, got {self.block}")
        check(self.chunk >= 1, f"RetrievalConfig.chunk must be >= 1, got {self.chunk}")
        check(
            self.memory_distance is None
            or (is_int(self.memory_distance) and self.memory_distance >= 0),
            f"RetrievalConfig.memory_distance must be None or an int >= 0, "
            f"got {self.memory_distance!r}",
        )
        for name in ("coarse_hops", "sliding", "shared", "int8_representatives"):
            check(
                isinstance(getattr(self, name), bool),
                f"RetrievalConfig.{name} must be a bool, got {getattr(self, name)!r}",
            )
        check_choice("RetrievalConfig.representative", self.representative, REPRESENTATIVES)
        check_choice("RetrievalConfig.memory_anchor", self.memory_anchor, MEMORY_ANCHORS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hop_options(self) -> dict[str, Any]:
        """The keyword arguments of ``retrieval_attention`` these settings give."""
        out = self.to_dict()
        del out["coarse_hops"]
        return out

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


def block_representatives(
    k: torch.Tensor, blocks: int, block: int, representative: str
) -> tuple[torch.Tensor, ...]:
    """What ``representative`` scores the first ``blocks`` blocks of k (B, Hkv, T, d) with:
    (kmax, kmin) for "bound", (kmean,) for "mean", each (B, Hkv, blocks, d); () for "max"."""
    if representative == "max":
        return ()
    kb = k[:, :, : blocks * block].unflatten(2, (blocks, block))
    if representative == "bound":
        return kb.amax(3), kb.amin(3)
    return (kb.mean(3),)


def quantize_representatives(
    reps: tuple[torch.Tensor, ...], representative: str
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(int8 rows, fp32 scale per row) of each representative tensor: scale absmax / 126, so that
    rounding kmax up and kmin down ("bound") never leaves the int8 range; "mean" rounds to nearest."""
    out = []
    for i, x in enumerate(reps):
        x = x if x.dtype == torch.float64 else x.float()
        scale = (x.abs().amax(-1) / 126).float()
        y = x / torch.where(scale > 0, scale, 1.0).to(x.dtype)[..., None]
        if representative == "bound":
            y = torch.ceil(y) if i == 0 else torch.floor(y)
        else:
            y = torch.floor(y + 0.5)
        out.append((y.to(torch.int8), scale))
    return tuple(out)


def dequantize_representatives(stored, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Inverse of ``quantize_representatives`` (up to its rounding)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple((q.to(work) * scale.to(work)[..., None]).to(dtype) for q, scale in stored)


def _representatives(k, blocks: int, opts: dict, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Block representatives of k as the hop scores with them (rounded through int8 if asked)."""
    block, representative = opts["block"], opts["representative"]
    reps = block_representatives(k[:, :, : blocks * block].to(dtype), blocks, block, representative)
    if opts.get("int8_representatives", False):
        reps = dequantize_representatives(quantize_representatives(reps, representative), dtype)
    return reps


def _block_scores(r, k, reps, nb: int, block: int, representative: str) -> torch.Tensor:
    """Scores of the first nb blocks for ranking queries r (B, Hkv, R, d) -> (B, Hkv, R, nb)."""
    if representative == "max":
        scores = torch.einsum("bhrd,bhkd->bhrk", r, k[:, :, : nb * block])
        return scores.unflatten(-1, (nb, block)).amax(-1)
    if representative == "bound":  # sum_d max(r_d kmax_d, r_d kmin_d)
        kmax, kmin = (x[:, :, :nb].transpose(-1, -2) for x in reps)
        return r.clamp(min=0) @ kmax + r.clamp(max=0) @ kmin
    return r @ reps[0][:, :, :nb].transpose(-1, -2)


def _select(
    r, valid, starts, last: int, k, reps, block: int, top_k: int, sinks: int, representative: str
):
    """Top-k blocks wholly before ``starts`` (R,) (at most ``last``) for ranking queries r
    (B, Hkv, R, d) (rows with ``valid`` (R,) False select nothing) -> (blocks (B, Hkv, R, kk)
    int64, usable ... bool)."""
    nb = last // block
    kk = min(top_k, nb)
    if kk == 0:
        shape = (*r.shape[:3], 0)
        return (
            torch.zeros(shape, dtype=torch.long, device=r.device),
            torch.zeros(shape, dtype=torch.bool, device=r.device),
        )
    scores = _block_scores(r, k, reps, nb, block, representative)  # (B, Hkv, R, nb)
    ends = (torch.arange(nb, device=r.device) + 1) * block
    # blocks made only of sink tokens add nothing: the sinks are attended to anyway
    unusable = (ends[None, :] > starts[:, None]) | (ends[None, :] <= sinks) | ~valid[:, None]
    top, blocks = scores.masked_fill(unusable, float("-inf")).topk(kk, dim=-1)
    return blocks, top > float("-inf")


def _memory_queries(q, qpos, starts, opts: dict) -> torch.Tensor:
    """Queries (B, H, t, d) placed where they see retrieved keys (unchanged without RoPE)."""
    if opts["rope_theta"] is None:
        return q
    distance = opts["local"] if opts["memory_distance"] is None else opts["memory_distance"]
    if opts["memory_anchor"] == "window":
        where = distance + qpos - starts
    else:
        where = torch.full_like(qpos, distance)
    return _rotate(q, where, opts["rope_theta"])


def _history_needed(offset: int, chunk: int, shared: bool) -> int:
    """Memory queries of the tokens before the first query that its ranking query reads."""
    if shared:
        return offset - max(offset // chunk - 1, 0) * chunk
    return min(offset, chunk - 1)


def _rankings(mq, history, offset: int, local: int, opts: dict):
    """Ranking queries from the group-mean memory queries mq (B, Hkv, Lq, d) of tokens
    offset..T-1 and ``history`` (those of earlier tokens, the last ones kept).

    Returns (ranks (B, Hkv, R, d), valid (R,), selection starts (R,), group (Lq,)): R ranking
    rows, one per query or (shared) per chunk, and the row of each query.
    """
    chunk, shared = opts["chunk"], opts["shared"]
    B, Hkv, Lq, d = mq.shape
    device = mq.device
    need = _history_needed(offset, chunk, shared)
    have = 0 if history is None else history.shape[2]
    check(
        have >= need,
        f"the ranking queries of the {need} tokens before the first query are needed "
        f"(chunk={chunk}): decode with the state kept by a cached prefill (RetrievalState)",
    )
    ext = mq if need == 0 else torch.cat([history[:, :, have - need :].to(mq.dtype), mq], 2)
    qpos = torch.arange(offset, offset + Lq, device=device)
    if not shared:
        # the last `chunk` memory queries up to each query (zeros before token 0, not counted)
        ext = torch.nn.functional.pad(ext, (0, 0, chunk - 1 - need, 0))
        sums = ext.unfold(2, chunk, 1).sum(-1)  # (B, Hkv, Lq, d)
        ranks = sums / (qpos + 1).clamp(max=chunk).to(mq.dtype)[:, None]
        starts = window_starts(qpos, local, opts["block"], opts["sliding"])
        return ranks, torch.ones(Lq, dtype=torch.bool, device=device), starts, qpos - offset
    first, last = offset // chunk, (offset + Lq - 1) // chunk
    if first == 0:  # chunk 0 has no previous chunk: a placeholder row, marked invalid
        ext = torch.nn.functional.pad(ext, (0, 0, chunk, 0))
    groups = last - first + 1
    ranks = ext[:, :, : groups * chunk].unflatten(2, (groups, chunk)).mean(3)
    g = torch.arange(first, last + 1, device=device)
    starts = window_starts(g * chunk, local, opts["block"], opts["sliding"])
    return ranks, g >= 1, starts, qpos // chunk - first


def use_kernels(q: torch.Tensor, opts: dict) -> bool:
    """Whether the hop runs on the block-sparse Triton kernels: on a GPU, for shared selections
    of whole 16-query tiles ranked by "bound" or "mean" (per-query selections and the "max"
    oracle stay on the reference)."""
    return (
        q.is_cuda
        and opts["shared"]
        and opts["chunk"] % 16 == 0
        and opts["representative"] != "max"
        and q.dtype != torch.float64
        and q.shape[-1] <= 256
    )


def _window(opts: dict) -> dict:
    """The settings the block-sparse kernels take."""
    keys = "block chunk local sliding sinks rope_theta memory_distance memory_anchor".split()
    return {key: opts[key] for key in keys}


def _kernel_selection(q, k, ranks, opts: dict, reps=None) -> torch.Tensor:
    """Top-k blocks of each shared chunk on ``kernels.block_sparse``: scores against the ranking
    queries, then top-k."""
    from ...kernels.block_sparse import block_scores, select_blocks

    kind = "minmax" if opts["representative"] == "bound" else "mean"
    scores = block_scores(q, k, representatives=kind, ranks=ranks, block_reps=reps, **_window(opts))
    return select_blocks(scores, opts["top_k"])


def _kernel_attention(q, k, v, selection, opts: dict) -> torch.Tensor:
    """Block-sparse attention over local, sink and selected keys in one softmax."""
    from ...kernels.block_sparse import block_sparse_attention

    return block_sparse_attention(
        q, k, v, selection, scale=opts["scale"], validate=False, **_window(opts)
    )


def _hop(q, k, v, opts: dict, reps=None, history=None, tile: int | None = None):
    """The hop (``retrieval_attention``) and the group-mean memory queries of its queries
    (B, Hkv, Lq, d), which a decode state keeps."""
    local, block, top_k, sinks = opts["local"], opts["block"], opts["top_k"], opts["sinks"]
    sliding, chunk, shared = opts["sliding"], opts["chunk"], opts["shared"]
    representative = opts["representative"]
    _check_inputs(q, k, v, local, block)
    check(top_k >= 0 and sinks >= 0, f"top_k and sinks must be >= 0, got {top_k}, {sinks}")
    check(is_int(chunk) and chunk >= 1, f"chunk must be an int >= 1, got {chunk!r}")
    check_choice("representative", representative, REPRESENTATIVES)
    check_choice("memory_anchor", opts["memory_anchor"], MEMORY_ANCHORS)
    B, H, Lq, d = q.shape
    Hkv, T, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(d) if opts["scale"] is None else float(opts["scale"])
    theta = opts["rope_theta"]
    work = work_dtype(q.dtype)
    gs = chunk if shared else 1  # queries per selection
    if tile is None:  # the gathered retrieved keys and values dominate: ~4 GiB in fp32
        per_query = B * Hkv * top_k * block * (d + dv) // gs + B * H * 2 * local
        tile = max(32, min(1024 if shared else 512, 2**30 // max(per_query, 1)))
    check(tile >= 1, f"tile must be >= 1, got {tile}")
    if shared:
        tile = -(-tile // chunk) * chunk  # whole chunks per tile
    offset = T - Lq
    qpos_all = torch.arange(offset, T, device=q.device)
    starts_all = window_starts(qpos_all, local, block, sliding)
    # the group mean first: every head of a group is rotated alike, so rotating the mean equals
    # the mean of the rotated queries, at 1/G of the work (and no full-precision copy of q)
    mq = _memory_queries(q.unflatten(1, (Hkv, G)).mean(2, dtype=work), qpos_all, starts_all, opts)
    ranks, valid, sel_starts, group = _rankings(mq, history, offset, local, opts)
    kernels = use_kernels(q, opts)
    if representative != "max" and reps is None:
        if opts.get("int8_representatives", False) or not kernels:  # else the kernel computes them
            reps = _representatives(k, T // block, opts, work)
    elif representative != "max":
        reps = tuple(x.to(work) for x in reps)
    if kernels:
        selection = _kernel_selection(q, k, ranks, opts, reps)
        return _kernel_attention(q, k, v, selection, opts), mq
    qw = q.to(work)  # k and v are cast where read: a decode step reads O(top_k * block) rows
    # "max" reads every key anyway (the oracle): cast once
    k_rank = k.to(work) if representative == "max" else None
    qg = qw.unflatten(1, (Hkv, G))  # (B, Hkv, G, Lq, d)
    out = torch.empty(B, Hkv, G, Lq, dv, dtype=work, device=q.device)
    a = offset
    while a < T:
        b = min(T, (a // tile + 1) * tile)
        if not sliding:  # a tile stays inside one local block
            b = min(b, a // local * local + local)
        t = b - a
        qt = qg[:, :, :, a - offset : b - offset]  # (B, Hkv, G, t, d)
        qpos, starts = qpos_all[a - offset : b - offset], starts_all[a - offset : b - offset]
        lo = window_start(a, local, block, sliding)
        k_loc, v_loc = k[:, :, lo:b].to(work), v[:, :, lo:b].to(work)
        kpos = torch.arange(lo, b, device=q.device)
        ns = min(sinks, window_start(b - 1, local, block, sliding))
        q_mem = qt
        if theta is not None:
            # local keys at their true distances; retrieved and sink keys at position 0, the
            # queries where they see them
            q_mem = _memory_queries(qt, qpos, starts, opts)
            qt = _rotate(qt, qpos, theta)
            k_loc = _rotate(k_loc, kpos, theta)
        outside = (kpos[None, :] > qpos[:, None]) | (kpos[None, :] < starts[:, None])
        parts = [torch.einsum("bhgqd,bhkd->bhgqk", qt, k_loc).masked_fill(outside, float("-inf"))]
        values = [v_loc]
        if ns > 0:
            sink_logits = torch.einsum("bhgqd,bhkd->bhgqk", q_mem, k[:, :, :ns].to(work))
            late = torch.arange(ns, device=q.device)[None, :] >= starts[:, None]
            parts.append(sink_logits.masked_fill(late, float("-inf")))
            values.append(v[:, :, :ns].to(work))
        if shared:  # host-side: group = qpos // chunk - offset // chunk
            g0, g1 = a // chunk - offset // chunk, (b - 1) // chunk - offset // chunk + 1
            last = window_start((b - 1) // chunk * chunk, local, block, sliding)
        else:
            g0, g1, last = a - offset, b - offset, window_start(b - 1, local, block, sliding)
        blocks, usable = _select(
            ranks[:, :, g0:g1],
            valid[g0:g1],
            sel_starts[g0:g1],
            last,
            k_rank,
            reps,
            block,
            top_k,
            sinks,
            representative,
        )  # (B, Hkv, nc, kk): nc selections, each shared by gs query slots
        nc, kk = g1 - g0, blocks.shape[-1]
        pre = a - (g0 + offset // chunk) * chunk if shared else 0
        post = nc * gs - pre - t
        if kk > 0:
            tokens = (blocks[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)
            keep = usable.repeat_interleave(block, -1) & (tokens >= sinks)  # (B, Hkv, nc, M)
            index = tokens.flatten(2)[..., None]
            k_mem = k.gather(2, index.expand(-1, -1, -1, d)).unflatten(2, (nc, -1)).to(work)
            v_mem = v.gather(2, index.expand(-1, -1, -1, dv)).unflatten(2, (nc, -1)).to(work)
            slots = torch.nn.functional.pad(q_mem, (0, 0, pre, post)).unflatten(3, (nc, gs))
            mem = torch.einsum("bhgcqd,bhcmd->bhgcqm", slots, k_mem)
            mem = mem.masked_fill(~keep[:, :, None, :, None], float("-inf"))
            parts.append(mem.flatten(3, 4)[:, :, :, pre : pre + t])
        p = torch.softmax(torch.cat(parts, -1) * scale, -1)
        pieces = p.split([x.shape[-1] for x in parts], -1)
        o = sum(torch.einsum("bhgqk,bhkd->bhgqd", w, x) for w, x in zip(pieces, values))
        if kk > 0:
            w = torch.nn.functional.pad(pieces[-1], (0, 0, pre, post)).unflatten(3, (nc, gs))
            o = (
                o
                + torch.einsum("bhgcqm,bhcmd->bhgcqd", w, v_mem).flatten(3, 4)[
                    :, :, :, pre : pre + t
                ]
            )
        out[:, :, :, a - offset : b - offset] = o
        a = b
    return out.flatten(1, 2).to(q.dtype), mq


def _options(local, top_k, block, sinks, sliding, scale, rope_theta, memory_distance, **extra):
    opts = dict(
        local=local,
        top_k=top_k,
        block=block,
        sinks=sinks,
        sliding=sliding,
        scale=scale,
        rope_theta=rope_theta,
        memory_distance=memory_distance,
        chunk=1,
        shared=False,
        representative="max",
        memory_anchor="window",
        int8_representatives=False,
    )
    opts.update(extra)
    return opts


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
    chunk: int = 1,
    shared: bool = False,
    representative: str = "max",
    memory_anchor: str = "window",
    history: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The retrieved blocks of each query (for analysis and tests): one (B, Hkv, kk_i) tensor per
    query i of the last Lq tokens, -1 where fewer than kk_i blocks are usable. ``history``: as in
    ``retrieval_attention``."""
    _check_inputs(q, k, k, local, block)
    opts = _options(
        local,
        top_k,
        block,
        sinks,
        sliding,
        None,
        rope_theta,
        memory_distance,
        chunk=chunk,
        shared=shared,
        representative=representative,
        memory_anchor=memory_anchor,
    )
    B, H, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    work = work_dtype(q.dtype)
    qpos = torch.arange(T - Lq, T, device=q.device)
    starts = window_starts(qpos, local, block, sliding)
    mq = _memory_queries(q.to(work), qpos, starts, opts).unflatten(1, (Hkv, H // Hkv)).mean(2)
    ranks, valid, sel_starts, group = _rankings(mq, history, T - Lq, local, opts)
    kw = k.to(work)
    reps = block_representatives(kw, T // block, block, representative)
    out = []
    for i in range(Lq):
        g = int(group[i])
        blocks, usable = _select(
            ranks[:, :, g : g + 1],
            valid[g : g + 1],
            sel_starts[g : g + 1],
            int(sel_starts[g]),
            kw,
            reps,
            block,
            top_k,
            sinks,
            representative,
        )
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
    chunk: int = 1,
    shared: bool = False,
    representative: str = "max",
    memory_anchor: str = "window",
    int8_representatives: bool = False,
    reps: tuple[torch.Tensor, ...] | None = None,
    history: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """The retrieval hop (see the module docstring). q (B, H, Lq, d) are the last Lq of the T
    tokens of k (B, Hkv, T, d) and v (B, Hkv, T, dv) -> (B, H, Lq, dv).

    ``sliding``: the local keys of query i are its last ``local`` tokens (back to a block
    boundary) instead of its aligned local block, so a query at the start of a block keeps its
    recent context. ``chunk``, ``shared``, ``representative``, ``memory_anchor``,
    ``int8_representatives``: as in ``RetrievalConfig``.
    ``reps``: ``block_representatives`` of k for at least the blocks before the last query (default:
    computed from k). ``history``: group-mean memory queries (B, Hkv, h, d) of the h tokens before
    the first query, needed when Lq < T and ``chunk`` > 1 (``RetrievalState`` keeps them).
    ``tile``: queries processed together (default: from the memory the gathered keys take).
    """
    opts = _options(
        local,
        top_k,
        block,
        sinks,
        sliding,
        scale,
        rope_theta,
        memory_distance,
        chunk=chunk,
        shared=shared,
        representative=representative,
        memory_anchor=memory_anchor,
        int8_representatives=int8_representatives,
    )
    return _hop(q, k, v, opts, reps=reps, history=history, tile=tile)[0]


class RetrievalState:
    """Decoding state of one layer's retrieval hop, besides the Hugging Face K/V cache (which keeps
    every key and value: any earlier block may be retrieved).

    It keeps the representatives of every completed block (none for "max", which reads every key)
    and the group-mean memory queries of the last ``2 * chunk - 1`` tokens. A new token then ranks
    O(T / block) representatives and reads O(top_k * block + local) keys; its output equals the
    whole-sequence call's, since the hop at a token reads nothing after it.

    One-token steps on the kernels rank once per chunk: a shared chunk's selection depends only on
    the tokens before it, so the chunk's later tokens reuse it, and their group-mean queries wait
    unrotated until the next chunk needs them. This keeps a step to the attention kernel and a few
    host operations (decoding is bound by the host's launches, not by the GPU).

    Attributes: ``options`` (the hop's settings), ``stored`` (tokens seen), ``length`` (B,) (the
    same, per row), ``reps``, ``history``.
    """

    def __init__(self, options: dict, mq: torch.Tensor, k: torch.Tensor) -> None:
        self.options = dict(options)
        B, T = k.shape[0], k.shape[2]
        self.stored = T
        self.length = torch.full((B,), T, device=k.device)
        self._history = mq[:, :, max(mq.shape[2] - self._kept(), 0) :]
        self._pending: list[torch.Tensor] = []  # unrotated group means of the latest kernel steps
        self._selection: torch.Tensor | None = None  # the blocks of chunk _selection_chunk
        self._selection_chunk = -1
        self._stored = self._store(block_representatives(
            k.to(mq.dtype), T // options["block"], options["block"], options["representative"]
        ))  # fmt: skip

    def _store(self, reps: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Each representative as stored: (rows,), or (int8 rows, scales); blocks on axis 2."""
        if not self.options.get("int8_representatives"):
            return tuple((x,) for x in reps)
        return quantize_representatives(reps, self.options["representative"])

    @property
    def reps(self) -> tuple[torch.Tensor, ...]:
        """The block representatives the hop scores with (dequantized when stored as int8)."""
        if not self.options.get("int8_representatives"):
            return tuple(x for (x,) in self._stored)
        return dequantize_representatives(self._stored, self._history.dtype)

    @property
    def history(self) -> torch.Tensor:
        """Group-mean memory queries (B, Hkv, h, d) of the last h = ``2 * chunk - 1`` tokens."""
        if self._pending:
            means = torch.cat(self._pending, 2)
            self._remember(self._memory_queries(means, self.stored - means.shape[2]))
            self._pending = []
        return self._history

    def _memory_queries(self, means: torch.Tensor, first: int) -> torch.Tensor:
        """Group-mean queries of tokens first, first + 1, ... rotated as ``_hop`` rotates them."""
        opts = self.options
        pos = torch.arange(first, first + means.shape[2], device=means.device)
        starts = window_starts(pos, opts["local"], opts["block"], opts["sliding"])
        return _memory_queries(means, pos, starts, opts)

    def _remember(self, mq: torch.Tensor) -> None:
        history = torch.cat([self._history.to(mq.dtype), mq], 2)
        self._history = history[:, :, max(history.shape[2] - self._kept(), 0) :]

    def _kept(self) -> int:
        chunk = self.options["chunk"]
        return 2 * chunk - 1 if self.options["shared"] else chunk - 1

    @classmethod
    def prefill(cls, q, k, v, options: dict) -> tuple[torch.Tensor, RetrievalState]:
        """Whole-sequence hop output and the state that continues it."""
        out, mq = _hop(q, k, v, options)
        return out, cls(options, mq, k)

    def step(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        """The hop for the L new queries q (B, H, L, d); k_all, v_all: every token, the new ones
        last."""
        T, L = k_all.shape[2], q.shape[2]
        check(
            T - L == self.stored,
            f"the cache holds {T - L} earlier tokens but the retrieval state {self.stored} (was "
            "the cache cropped or edited outside generation?)",
        )
        block, rep = self.options["block"], self.options["representative"]
        done = self._stored[0][0].shape[2] if self._stored else 0
        if self._stored and T // block > done:  # blocks completed since: their representatives
            new = self._store(block_representatives(
                k_all[:, :, done * block : T // block * block].to(self._history.dtype),
                T // block - done,
                block,
                rep,
            ))  # fmt: skip
            self._stored = tuple(
                tuple(torch.cat([x, y], 2) for x, y in zip(a, b)) for a, b in zip(self._stored, new)
            )
        if L == 1 and use_kernels(q, self.options):
            out = self._kernel_step(q, k_all, v_all)
        else:
            out, mq = _hop(q, k_all, v_all, self.options, reps=self.reps, history=self.history)
            self._remember(mq)
        self.stored, self.length = T, self.length + L
        return out

    def _kernel_step(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor):
        """One token on the kernels, ranking only when it starts a new chunk (class docstring)."""
        opts = self.options
        T, Hkv = k_all.shape[2], k_all.shape[1]
        _check_inputs(q, k_all, v_all, opts["local"], opts["block"])
        mean = q.unflatten(1, (Hkv, q.shape[1] // Hkv)).mean(2, dtype=work_dtype(q.dtype))
        chunk = (T - 1) // opts["chunk"]
        if chunk != self._selection_chunk:
            mq = self._memory_queries(mean, T - 1)
            ranks = _rankings(mq, self.history, T - 1, opts["local"], opts)[0]
            reps = tuple(x.to(mq.dtype) for x in self.reps)
            self._selection = _kernel_selection(q, k_all, ranks, opts, reps)
            self._selection_chunk = chunk
        self._pending.append(mean)
        return _kernel_attention(q, k_all, v_all, self._selection, opts)

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering, batch selection)."""
        self.length = self.length[index]
        self._history = self.history[index]
        if self._selection is not None:
            self._selection = self._selection[index]
        self._stored = tuple(tuple(x[index] for x in part) for part in self._stored)

    def memory_bytes(self) -> int:
        """Bytes held beyond the Hugging Face K/V cache."""
        kept = [self.history, *(x for part in self._stored for x in part)]
        if self._selection is not None:
            kept.append(self._selection)
        return sum(x.numel() * x.element_size() for x in kept)


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
        scale=scale,
        rope_theta=rope_theta,
        **config.hop_options(),
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
