"""Causal folds that never move, and incremental decoding for tensorized attention.

Legend: B batch, H query heads, Hkv kv heads, G = H // Hkv, L new tokens, T tokens in the
Hugging Face cache, d head dim, dv value dim, m fold order, K keys one hop gathers for a token.

Why a special fold (``CausalFold``)
-----------------------------------
A general fold strategy picks dims from n, so the coordinates of token t change when the sequence
grows and a causal output at t would depend on how many tokens follow. ``CausalFold(dims)`` keeps
the finer dims ``n_2..n_m`` fixed and lets the coarsest dim grow (``n_1 = ceil(n / s_1)``): token
t's coordinates are its mixed-radix digits, the same in a sequence of any length. A coarsest dim
that is larger than needed only adds padding after the sequence, which causal attention never
reads; an extra leading dim where every token has coordinate 0 is an identity hop (a softmax over
one key). So the output at t is a function of tokens <= t alone: what incremental decoding needs,
and what makes "greedy generation with the cache == recomputing the whole prefix" hold exactly.

Cache design (docs/semantics.md, "Incremental decoding")
---------------------------------------------------------
Hops run finest to coarsest. Call *level l* the value state before hop l (l = 0 the finest hop):
level 0 is V, level m the output. Hop l for token t, with digit ``a = d_l(t)`` and stride
``w_l = n_m * ... * n_{m-l+1}``, reads

- fibre keys ``t - (a - b) w_l`` for b = 0..a, at hop position b;
- summary keys (``coverage="full"``, l >= 1) ``start_{l+1}(t) + b w_l + w_l - 1`` for b < a
  (the last token of each earlier sibling block; skipped when t itself is the last of its block,
  since the fibre key is then the same token).

Both lie inside t's block of ``w_{l+1}`` tokens (the whole past for the top hop). Hence what
is kept:

- K, all tokens: every hop reads it (with tensor RoPE it is stored unrotated, and rotated at the
  hop position after the gather). Kept by the Hugging Face cache, which also keeps V = level 0
  (only the rows of the current finest block are needed).
- level l for 1 <= l < m-1: a ring of ``w_{l+1}`` slots (slot = t mod w_{l+1}); bounded.
- level m-1 (the input of the top hop): every token, per *query* head (H heads: after the first
  hop each query head has its own value state, GQA does not share it).

A new token costs m hops over at most ``2 n_j`` keys each: O(sum n_j) instead of O(n). Only the
first hop reads V, and only inside the new token's finest block, so the text adapter drops older V
rows from the Hugging Face cache (``values_needed_from``; ``v_start`` counts them). Memory per token
and layer: K (Hkv heads) + the top level (H heads), i.e. (1 + H / Hkv) / 2 times a plain K/V cache
(1x without GQA, 2.5x for Llama-3's 32/8 heads); for m = 1 only K and V. ``top_int8`` stores the
top level as int8 rows with one fp32 scale each (``quantize_rows``), ~1.5x for 32/8 heads in bf16;
an approximation (outputs within ~1%), so the exact default keeps the model's dtype.

Per step, the key indices, masks and RoPE tables depend only on token positions: ``plan`` builds
them once and every layer reuses them. Keys are rotated by their position relative to the query
(RoPE is relative), so queries are never rotated. A single new token is written to its ring slot
before it is read (the slot it overwrites lies outside its block). Several new tokens (L > 1) are
handled together hop by hop: they read earlier tokens from the rings and each other from the
call's own tensors, and the rings are written once at the end, so no slot is overwritten before
it is read.

One new token on CUDA (or on CPU under ``TRITON_INTERPRET=1``) runs ``kernels.decode``: all hops in
two launches (partials, then their combine), key indices computed in the kernel, so the plan is
never built (it is lazy). The PyTorch path here stays the oracle: ``DECODE_KERNEL = False`` or
``step(..., kernel=False)`` forces it, and it serves every call the kernel does not support
(``decode.fallback_reason``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..._validation import check, is_int
from ...attention import tensorized_attention
from ...core.folds import Fold
from ...core.plan import hop_plan
from ...core.positional import PositionalScheme
from ...kernels.reference import work_dtype

__all__ = [
    "CausalFold",
    "LayerCache",
    "StepPlan",
    "block_levels",
    "quantize_rows",
    "dequantize_rows",
]

# False: every step runs the PyTorch path (the oracle), even where the decode kernel could run.
DECODE_KERNEL = True


@dataclass(frozen=True)
class CausalFold:
    """Prefix-stable fold for decoders: dims ``(n_1, ..., n_m)``, coarsest first; n_1 grows with n.

    Parameters
    ----------
    dims : fold dims. ``n_2..n_m`` are fixed radices; ``n_1`` is the coarsest size the model is
        meant to see (it grows past that for longer inputs; see ``extrapolating``).

    Examples
    --------
    >>> CausalFold((4, 8)).for_length(100)
    Fold((13, 8), n=100)
    >>> CausalFold.extrapolating((16, 32, 32), 131072).dims
    (8, 16, 32, 32)
    """

    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        dims = tuple(self.dims)
        check(len(dims) > 0, "CausalFold dims must not be empty")
        for d in dims:
            check(is_int(d) and d > 0, f"CausalFold dims must be positive ints, got {dims!r}")
        object.__setattr__(self, "dims", tuple(int(d) for d in dims))

    @property
    def order(self) -> int:
        """Number of hops m."""
        return len(self.dims)

    @property
    def block(self) -> int:
        """Tokens in one coarsest block, ``n_2 * ... * n_m``."""
        return math.prod(self.dims[1:])

    def for_length(self, n: int) -> Fold:
        """The Fold for n tokens: the finer dims, and the coarsest grown to cover n."""
        check(isinstance(n, int) and n >= 1, f"sequence length must be a positive int, got {n!r}")
        return Fold((max(1, -(-n // self.block)),) + self.dims[1:], n)

    def hop_stride(self, hop: int) -> int:
        """Token stride ``w_l`` of the dim hop ``hop`` runs along (hop 0 = finest)."""
        return math.prod(self.dims[self.order - hop :])

    def hop_size(self, hop: int) -> int | None:
        """Size of that dim, None for the (unbounded) coarsest."""
        return None if hop == self.order - 1 else self.dims[self.order - 1 - hop]

    @classmethod
    def extrapolating(cls, dims: Sequence[int], length: int) -> CausalFold:
        """Extend a training fold to ``length`` by adding leading dims no larger than ``dims[0]``.

        Every coordinate then stays within the range seen in training (docs/semantics.md,
        "Folding": grow the order), and tokens before ``prod(dims)`` keep exactly their training-time
        outputs.
        """
        dims = tuple(dims)
        check(length >= 1, f"length must be >= 1, got {length}")
        while math.prod(dims) < length:
            dims = (min(dims[0], -(-length // math.prod(dims))),) + dims
        return cls(dims)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and one fp32 scale per row (absmax / 127, rounding half up), as the decode kernel
    stores them: both compute in fp32 with correctly rounded division, so they store the same
    bytes."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.floor(x / torch.where(scale > 0, scale, 1.0)[..., None] + 0.5)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hx, T, e) at token indices idx (B, L, K) -> (B, Hx, L, K, e)."""
    B, Hx, _, e = x.shape
    L, K = idx.shape[1:]
    flat = idx.reshape(B, 1, L * K, 1).expand(B, Hx, L * K, e)
    return x.gather(2, flat).reshape(B, Hx, L, K, e)


def block_levels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fold: CausalFold,
    *,
    coverage: str,
    positional: PositionalScheme | None,
    scale: float | None,
    backend: str,
    hop_gates: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Value levels 1..m-1 (the states after the first l hops) for a whole sequence.

    Level l only mixes tokens inside blocks of ``w_l`` tokens, so it is the full multi-hop
    attention of the l finest dims run on each block as its own sequence. Each level is one
    ``tensorized_attention`` call (any backend). q (B, H, n, d), k, v (B, Hkv, n, d) ->
    [(B, H, n, dv)] * (m - 1). ``hop_gates`` (H, m - 1): those of the model (see
    ``tensorized_attention``).
    """
    B, H, n, _ = q.shape
    levels = []
    for hop in range(1, fold.order):
        w = fold.hop_stride(hop)
        N = -(-n // w) * w

        def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, h, n, e) -> (B * N/w, h, w, e)
            x = torch.nn.functional.pad(x, (0, 0, 0, N - n))
            return (
                x.reshape(B, x.shape[1], N // w, w, x.shape[-1])
                .transpose(1, 2)
                .reshape(-1, x.shape[1], w, x.shape[-1])
            )

        out = tensorized_attention(
            blocks(q),
            blocks(k),
            blocks(v),
            fold.dims[fold.order - hop :],
            causal=True,
            coverage=coverage,
            positional=positional,
            scale=scale,
            backend=backend,
            hop_gates=None if hop_gates is None else hop_gates[:, : hop - 1],
        )  # (B * N/w, H, w, dv)
        out = out.reshape(B, N // w, H, w, -1).transpose(1, 2).reshape(B, H, N, -1)
        levels.append(out[:, :, :n])
    return levels


@functools.cache
def _decode_kernels():
    try:
        from ...kernels import decode
    except ImportError:  # no triton: the PyTorch path
        return None
    return decode


def _decode_module(q: torch.Tensor):
    """``kernels.decode`` where it can run on q's device (CUDA, or CPU under the interpreter), else
    None."""
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return None  # skip importing triton at all
    return _decode_kernels()


class StepPlan(Sequence):
    """The per-hop dicts of ``LayerCache.plan``, built on first access (then kept)."""

    def __init__(self, build: Callable[[], list[dict[str, torch.Tensor]]]) -> None:
        self._build, self._hops = build, None

    def _get(self) -> list[dict[str, torch.Tensor]]:
        if self._hops is None:
            self._hops, self._build = self._build(), None
        return self._hops

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())


class LayerCache:
    """Incremental state of one attention layer (see the module docstring).

    Tokens are addressed by their *compact* index u (padding removed); the Hugging Face cache
    holds token u of sample i at position ``offset[i] + u`` (left padding).

    Attributes
    ----------
    length : (B,) real tokens seen per sample.
    stored : tokens in the backing K/V cache, padding included (``offset + length``).
    offset : (B,) cache position of compact index 0 (the left padding).
    v_start : cache positions no longer held at the front of the V store (its row i is position
        ``v_start + i``); the owner of the store may drop rows below ``values_needed_from()``.
    rings : level l (1 <= l <= m-1) -> (B, H, slots, dv); slots = w_{l+1}, or a growing capacity
        for the top level.
    top_scale : (B, H, capacity) fp32 row scales when the top level is stored in int8 (``top_int8``:
        a quarter of fp32, half of bf16; an approximation), else None.
    hop_gates : (H, m - 1) or None, as in ``tensorized_attention``.
    """

    def __init__(
        self,
        fold: CausalFold,
        *,
        coverage: str,
        positional: PositionalScheme | None,
        scale: float,
        length: torch.Tensor,
        offset: torch.Tensor,
        levels: list[torch.Tensor],
        stored: int,
        top_int8: bool = False,
        hop_gates: torch.Tensor | None = None,
    ) -> None:
        check(
            hop_gates is None
            or tuple(hop_gates.shape)
            == (levels[0].shape[1] if levels else hop_gates.shape[0], fold.order - 1),
            f"hop_gates must have shape (H, m-1={fold.order - 1}), got "
            f"{None if hop_gates is None else tuple(hop_gates.shape)}",
        )
        self.hop_gates = hop_gates
        self.stored = stored  # tokens in the backing K/V store (padding included)
        self.v_start = (
            0  # cache positions dropped from the front of the V store (``values_needed_from``)
        )
        self.fold, self.coverage, self.positional, self.scale = fold, coverage, positional, scale
        self.length, self.offset = length, offset
        self.max_length = int(length.max())  # host copy of max(length): no device syncs per step
        self.rings: dict[int, torch.Tensor] = {}
        self.top_scale: torch.Tensor | None = None
        self._consts: dict = {}  # (dtype, device) -> the decode kernel's [scale, inv_freq]
        m = fold.order
        for hop, level in enumerate(levels, start=1):
            if hop == m - 1:  # top level: every token, with room to grow
                cap, n = level.shape[2] + 256, level.shape[2]
                if top_int8:
                    ring = torch.zeros(
                        *level.shape[:2],
                        cap,
                        level.shape[-1],
                        dtype=torch.int8,
                        device=level.device,
                    )
                    self.top_scale = torch.zeros(
                        *level.shape[:2], cap, dtype=torch.float32, device=level.device
                    )
                    ring[:, :, :n], self.top_scale[:, :, :n] = quantize_rows(level)
                else:
                    ring = level.new_zeros(*level.shape[:2], cap, level.shape[-1])
                    ring[:, :, :n] = level
            else:
                slots = fold.hop_stride(hop + 1)
                # the last `slots` tokens of each sample: consecutive indices, so distinct slots
                u = (
                    length[:, None] - slots + torch.arange(slots, device=length.device)
                )  # (B, slots)
                vals = _gather_tokens(level, u.clamp(min=0)[:, :, None])[
                    ..., 0, :
                ]  # (B, H, slots, dv)
                ring = torch.empty_like(vals).scatter_(2, self._expand(u % slots, vals), vals)
            self.rings[hop] = ring

    @staticmethod
    def _expand(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """idx (B, L) -> (B, H, L, dv) index for scatter/gather along tokens of ``like``."""
        return idx[:, None, :, None].expand(
            like.shape[0], like.shape[1], idx.shape[1], like.shape[-1]
        )

    def _slots(self, hop: int) -> int:
        return self.rings[hop].shape[2]

    def _slot(self, hop: int, u: torch.Tensor) -> torch.Tensor:
        """Ring slot of tokens u at level ``hop``: u mod slots; the top level holds every token at u
        (its capacity grows in ``step``, so a plan built before the growth stays valid)."""
        return u if hop == self.fold.order - 1 else u % self._slots(hop)

    def _keys(self, t: torch.Tensor, t_max: int, hop: int):
        """Keys of hop ``hop`` for tokens t (B, L), t <= t_max.

        Returns key indices and validity (B, L, K), key positions (K,) and query positions (B, L).
        """
        w, r = self.fold.hop_stride(hop), self.fold.hop_size(hop)
        digit = t // w if r is None else (t // w) % r  # (B, L)
        R = t_max // w + 1 if r is None else r  # host-side bound: no device sync
        b = torch.arange(R, device=t.device)
        u = [t[..., None] - (digit[..., None] - b) * w]  # fibre keys
        ok = [b <= digit[..., None]]
        if hop > 0 and self.coverage == "full":
            start = torch.zeros_like(t) if r is None else (t // (w * r)) * (w * r)
            u.append(start[..., None] + b * w + (w - 1))  # summary tokens of earlier sibling blocks
            ok.append((b < digit[..., None]) & (t % w != w - 1)[..., None])
        kpos = torch.cat([b] * len(u))
        u, ok = torch.cat(u, -1), torch.cat(ok, -1)
        return torch.where(ok, u, 0), ok, kpos, digit

    def plan(self, L: int, dtype: torch.dtype) -> StepPlan:
        """Per-hop indices, masks and rotation tables for the next L tokens.

        They depend only on token positions, so one plan serves every layer of a step (the text
        adapter shares it); ``dtype`` is the dtype of the queries. Built on first use: a step that
        runs the decode kernel computes its indices itself and never builds them.
        """
        return StepPlan(
            functools.partial(self._plan_hops, self.length, self.offset, self.max_length, L, dtype)
        )

    def _plan_hops(self, first, offset, max_length: int, L: int, dtype: torch.dtype) -> list[dict]:
        """The hops of ``plan`` for the state (length ``first``, ``offset``) it was asked for:
        layers that already stepped have moved on, so a plan built late must not read
        ``self.length``."""
        work = work_dtype(dtype)
        t = first[:, None] + torch.arange(L, device=first.device)  # (B, L)
        hops = []
        for hop in range(self.fold.order):
            u, ok, kpos, qpos = self._keys(t, max_length + L - 1, hop)  # (B, L, K)
            bias = torch.zeros(ok.shape, dtype=work, device=u.device).masked_fill(
                ~ok, float("-inf")
            )
            p = {
                "kv": u + offset[:, None, None],
                "bias": bias[:, None, :, None, :],
            }  # bias (B, 1, L, 1, K)
            if self.positional is not None:
                p["rot"] = self._rotation(kpos, qpos, work)
            if hop > 0:
                p["ring"] = self._slot(hop, u)
                p["slot"] = self._slot(hop, t)  # where a single new token is stored
                if L > 1:
                    p["past"] = (u < first[:, None, None])[:, None, :, :, None]  # (B, 1, L, K, 1)
                    p["call"] = (u - first[:, None, None]).clamp(0, L - 1)
            hops.append(p)
        return hops

    def _rotation(self, kpos: torch.Tensor, qpos: torch.Tensor, work: torch.dtype):
        """Tables rotating keys by their position *relative* to the query (RoPE is relative:
        <R(a) q, R(b) k> = <q, R(b - a) k>), so queries are not rotated. Cos and signed-sin
        tables (B, 1, L, K, d) for the rotate-half convention of ``positional.rotate``.

        A per-hop scheme without ``inv_freq`` is applied through its own ``hop`` instead.
        """
        inv_freq = getattr(self.positional, "inv_freq", None)
        if inv_freq is None:
            return kpos, qpos
        rel = (kpos[None, None, :] - qpos[..., None]).to(work)  # (B, L, K)
        angles = rel.unsqueeze(-1) * inv_freq.to(device=rel.device, dtype=work)  # (B, L, K, d/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]

    def step(
        self,
        q: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        plan=None,
        *,
        kernel: bool = True,
    ) -> torch.Tensor:
        """Attention output for L new tokens.

        q (B, H, L, d): the new queries. k_all (B, Hkv, T, d): the whole Hugging Face key cache, the
        new tokens included; v_all the same for values, less the first ``v_start`` positions.
        ``plan``: from ``self.plan`` (built here if None). ``kernel``: False runs the PyTorch path
        even where the decode kernel could (as ``DECODE_KERNEL = False``). Returns (B, H, L, dv).
        """
        B, H, L, d = q.shape
        check(
            v_all.shape[2] + self.v_start == k_all.shape[2],
            f"the value cache holds {v_all.shape[2]} positions from {self.v_start} but the key "
            "cache "
            f"{k_all.shape[2]}: pass V without its first v_start positions (as the text adapter "
            "keeps it)",
        )
        decode = _decode_module(q) if kernel and DECODE_KERNEL and L == 1 else None
        if decode is not None and decode.fallback_reason(q, k_all, v_all, self.positional) is None:
            return self._step_kernel(decode, q, k_all, v_all)
        Hkv, G = k_all.shape[1], H // k_all.shape[1]
        work = work_dtype(q.dtype)
        plan = self.plan(L, q.dtype) if plan is None else plan
        t = self.length[:, None] + torch.arange(L, device=q.device)  # (B, L)
        self._grow_top(self.max_length + L - 1)
        qg = (q.to(work) * self.scale).reshape(B, Hkv, G, L, d)  # scaled once for every hop
        level = None  # this call's tokens at the current level, (B, H, L, dv); None = level 0 (V)
        new_levels = {}
        for hop, p in enumerate(plan):
            keys = _gather_tokens(k_all, p["kv"]).to(work)  # (B, Hkv, L, K, d)
            qh = qg
            if "rot" in p:
                keys, qh = self._rotate(keys, q, p["rot"], qg, work)
            scores = qh.transpose(2, 3) @ keys.transpose(-1, -2) + p["bias"]  # (B, Hkv, L, G, K)
            probs = torch.softmax(scores, dim=-1)
            if level is None:
                # masked keys point at position offset + 0, which may be trimmed: any row will do
                vals = _gather_tokens(v_all, (p["kv"] - self.v_start).clamp(min=0)).to(
                    work
                )  # (B, Hkv, L, K, dv)
                out = probs @ vals  # (B, Hkv, L, G, dv)
            else:
                vals = self._level_values(hop, level, t, p)  # (B, H, L, K, dv)
                vals = (
                    vals.to(work).reshape(B, Hkv, G, L, -1, vals.shape[-1]).transpose(2, 3)
                )  # (B, Hkv, L, G, K, dv)
                out = (probs.unsqueeze(-2) @ vals).squeeze(-2)  # (B, Hkv, L, G, dv)
            out = out.transpose(2, 3).reshape(B, H, L, -1)
            if (
                self.hop_gates is not None and hop > 0
            ):  # this token's own value at the level below, as the prefill mixes it
                g, prev = self.hop_gates[:, hop - 1].to(work)[None, :, None, None], level.to(work)
                out = prev + g * (out - prev)
            level = out.to(q.dtype)
            if hop + 1 < self.fold.order and L > 1:
                new_levels[hop + 1] = level
        self._write(new_levels, t)
        self.length, self.max_length = self.length + L, self.max_length + L
        self.stored += L
        return level

    def values_needed_from(self) -> int | None:
        """First cache position of V that later steps read (None: all of V, for an order-1 fold).

        Only the first hop reads V, and only the new token's finest block: at most n_m - 1 earlier
        positions. Left padding aligns the rows' ends (``offset + length == stored``), so one
        bound holds for every row and needs no device sync.
        """
        finest = self.fold.hop_size(0)
        return None if finest is None else max(0, self.stored - (finest - 1))

    def _step_kernel(
        self, decode, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor
    ) -> torch.Tensor:
        """One new token through ``kernels.decode`` (two launches), which also advances
        ``length``."""
        self._grow_top(self.max_length)
        key = (q.dtype, q.device)
        if key not in self._consts:
            inv_freq = None if self.positional is None else self.positional.inv_freq
            self._consts[key] = decode.decode_constants(self.scale, inv_freq, q.dtype, q.device)
        rings = [self.rings[hop] for hop in range(1, self.fold.order)]
        out, self.length = decode.decode_step(
            q,
            k_all,
            v_all,
            rings,
            self.length,
            self.offset,
            self.fold.dims,
            self._consts[key],
            summary=hop_plan(
                self.fold.dims, math.prod(self.fold.dims), causal=True, coverage=self.coverage
            ).summaries,
            rope=self.positional is not None,
            max_length=self.max_length,
            v_shift=self.v_start,
            top_scale=self.top_scale,
            hop_gates=self.hop_gates,
        )
        self.max_length += 1
        self.stored += 1
        return out

    def _rotate(self, keys, q, rot, qg, work):
        """Rotated keys, and the queries to score them with (scaled, (B, Hkv, G, L, d))."""
        if rot[0].dtype == torch.long:  # generic per-hop scheme: absolute positions on both sides
            kpos, qpos = rot
            B, H, L, d = q.shape
            qh = self.positional.hop(q.to(work) * self.scale, qpos[:, None, :]).reshape(
                B, keys.shape[1], -1, L, d
            )
            return self.positional.hop(keys, kpos), qh
        cos, sin_signed = rot
        return keys * cos + keys.roll(keys.shape[-1] // 2, dims=-1) * sin_signed, qg

    def _level_values(self, hop: int, level: torch.Tensor, t: torch.Tensor, p) -> torch.Tensor:
        """Values of level ``hop`` at the keys: (B, H, L, K, dv).

        One new token: store it first (the slot it overwrites is outside its block), then gather.
        Several: earlier tokens from the ring, this call's from ``level`` (the ring is written
        last).
        """
        if "past" not in p:
            self._store(hop, p["slot"], level)
            return self._gather(hop, p["ring"])
        if self._int8(hop):
            level = dequantize_rows(
                *quantize_rows(level)
            )  # as they will be stored: the same values later
        return torch.where(
            p["past"], self._gather(hop, p["ring"]), _gather_tokens(level, p["call"])
        )

    def _int8(self, hop: int) -> bool:
        return hop == self.fold.order - 1 and self.top_scale is not None

    def _store(self, hop: int, slots: torch.Tensor, level: torch.Tensor) -> None:
        """Write tokens' level values (B, H, L, dv) into ring slots (B, L)."""
        if self._int8(hop):
            level, scale = quantize_rows(level)
            self.top_scale.scatter_(2, slots[:, None, :].expand_as(scale), scale)
        self.rings[hop].scatter_(2, self._expand(slots, level), level)

    def _gather(self, hop: int, slots: torch.Tensor) -> torch.Tensor:
        """Level values at ring slots (B, L, K) -> (B, H, L, K, dv)."""
        vals = _gather_tokens(self.rings[hop], slots)
        if not self._int8(hop):
            return vals
        B, H, _ = self.top_scale.shape
        scale = self.top_scale.gather(2, slots.reshape(B, 1, -1).expand(B, H, -1)).reshape(
            vals.shape[:-1]
        )
        return dequantize_rows(vals, scale)

    def _grow_top(self, t_max: int) -> None:
        """Make room in the top level (every token) for tokens up to t_max."""
        top = self.fold.order - 1
        if top in self.rings and t_max >= self._slots(top):
            ring = self.rings[top]
            cap = max(t_max + 1, ring.shape[2] * 3 // 2 + 256)
            grown = ring.new_zeros(*ring.shape[:2], cap, ring.shape[-1])
            grown[:, :, : ring.shape[2]] = ring
            self.rings[top] = grown
            if self.top_scale is not None:
                scale = self.top_scale.new_zeros(*ring.shape[:2], cap)
                scale[:, :, : ring.shape[2]] = self.top_scale
                self.top_scale = scale

    def _write(self, new_levels: dict[int, torch.Tensor], t: torch.Tensor) -> None:
        """Store a multi-token call's levels in the rings (only the last ``slots`` tokens: distinct
        slots)."""
        for hop, level in new_levels.items():
            slots = self._slots(hop)
            self._store(hop, self._slot(hop, t[:, -slots:]), level[:, :, -slots:])

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering, batch selection)."""
        self.length, self.offset = self.length[index], self.offset[index]
        self.max_length = int(self.length.max())
        self.rings = {hop: ring[index] for hop, ring in self.rings.items()}
        if self.top_scale is not None:
            self.top_scale = self.top_scale[index]

    def memory_bytes(self) -> int:
        """Bytes held by this state beyond the Hugging Face K/V cache."""
        held = [*self.rings.values()] + ([] if self.top_scale is None else [self.top_scale])
        return sum(x.numel() * x.element_size() for x in held)
