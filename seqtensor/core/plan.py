"""The hop plan: which dim each hop runs along, its (P, n_j, S) view, and where summary keys apply.

Legend: m fold order, N = prod(dims) folded length, n real tokens. Hop along dim j views the folded
tensor as (P, n_j, S) with P = prod(n_1..n_{j-1}) (coarser dims) and S = prod(n_{j+1}..n_m) (finer
dims); a fibre is one (p, s) pair, its tokens ``p * n_j * S + i * S + s`` for i < n_j.

Every kernel (the PyTorch reference, the Triton launcher, the decode cache) reads this one plan, so
the summary rule and the hop order live here only. This module also owns the sets of allowed
values for the op's string arguments (``COVERAGES``, ``MODES``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .._validation import check, check_choice, is_int

__all__ = ["COVERAGES", "MODES", "Hop", "HopPlan", "hop_plan", "default_hop_order"]

# "full": causal queries also reach every earlier token through summary tokens; "axial": fibres
# only.
COVERAGES = ("full", "axial")
# "fibre": hop by hop attention along fibres; "kronecker": one n_j x n_j matrix per dim
# (non-causal).
MODES = ("fibre", "kronecker")


@dataclass(frozen=True)
class Hop:
    """One hop: attention inside each fibre along ``dim``."""

    dim: int  # fold dim hopped along (0 = coarsest)
    P: int  # prod of coarser dims
    nj: int  # fibre length
    S: int  # prod of finer dims (token stride of the fibre)
    summary: bool  # causal full coverage: also attend to summary keys of earlier sibling blocks


@dataclass(frozen=True)
class HopPlan:
    """The hops of one call, in the order they run (build with ``hop_plan``)."""

    dims: tuple[int, ...]  # the fold's dims, the coarsest cut to the blocks holding real tokens
    n: int
    causal: bool
    coverage: str
    order: tuple[int, ...]
    hops: tuple[Hop, ...]

    @property
    def N(self) -> int:
        """Folded length prod(dims) (>= n: the rest is padding)."""
        return math.prod(self.dims)

    @property
    def m(self) -> int:
        """Number of hops (the fold order)."""
        return len(self.dims)

    @property
    def padded(self) -> bool:
        return self.N > self.n

    @property
    def summaries(self) -> bool:
        """Whether any hop attends to summary keys."""
        return any(hop.summary for hop in self.hops)


def default_hop_order(m: int) -> tuple[int, ...]:
    """Finest to coarsest: the only order under which causal summary tokens stay in the past."""
    return tuple(range(m - 1, -1, -1))


def hop_plan(
    dims: Sequence[int],
    n: int,
    *,
    causal: bool = False,
    coverage: str = "full",
    hop_order: Sequence[int] | None = None,
) -> HopPlan:
    """The plan for n tokens folded as ``dims`` (a named error for a bad
    ``hop_order``/``coverage``).

    ``hop_order`` lists dims 0-based (0 = coarsest), default finest to coarsest. Plans are cached,
    so the per-call cost is one dictionary lookup.
    """
    if hop_order is not None:
        check(
            not isinstance(hop_order, str)
            and isinstance(hop_order, Sequence)
            and all(is_int(j) for j in hop_order),
            f"hop_order must be a sequence of int dims, got {hop_order!r}",
            TypeError,
        )
        hop_order = tuple(int(j) for j in hop_order)
    key = (tuple(int(x) for x in dims), int(n), bool(causal), coverage, hop_order)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4096:  # variable-length inputs: keep the cache bounded
            _PLANS.clear()
        plan = _PLANS[key] = _hop_plan(*key)
    return plan


# A plain dict, not functools.lru_cache: torch.compile traces through it without a warning.
_PLANS: dict[tuple, HopPlan] = {}


# Padding allowed beyond whole coarsest blocks (those are dropped): N <= this x n + a block's worth.
_MAX_PADDING_FACTOR = 16
_PADDING_SLACK = 4096


def _trim(dims: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``dims`` without coarsest blocks that hold only padding, or a named error.

    Dropping them is exact for every hop order: such a block has no valid key in any hop along a
    finer dim (those stay inside the block), so it only becomes a relay in the coarsest hop, and
    after that hop no other hop connects it back to a real token. Work then stays proportional to
    n, where a fold of (100000,) for 16 tokens would otherwise attend over 100000 slots.
    """
    block = math.prod(dims[1:])
    dims = (min(dims[0], -(-n // block)),) + dims[1:]
    N = math.prod(dims)
    check(
        N <= _MAX_PADDING_FACTOR * n + _PADDING_SLACK,
        f"fold {dims} holds {N} positions for n={n} tokens: its finer dims alone hold {block}; "
        f"choose dims whose product is close to n (e.g. seqtensor.core.folds.BalancedFold)",
    )
    return dims


def _hop_plan(
    dims: tuple[int, ...], n: int, causal: bool, coverage: str, hop_order: tuple[int, ...] | None
) -> HopPlan:
    check_choice("coverage", coverage, COVERAGES)
    check(n >= 1 and math.prod(dims) >= n, f"fold {dims} does not cover n={n} tokens")
    dims = _trim(dims, n)
    m = len(dims)
    default = default_hop_order(m)
    order = default if hop_order is None else hop_order
    check(
        sorted(order) == list(range(m)),
        f"hop_order must be a permutation of dims 0..{m - 1}, got {order}",
    )
    # Only finest-to-coarsest keeps summary tokens in the past: other orders would leak the future.
    check(
        not (causal and coverage == "full") or order == default,
        f"causal coverage='full' needs hop_order finest to coarsest {default}, got {order}; "
        "use coverage='axial'",
    )
    hops, processed = [], set()
    for j in order:
        P, nj, S = math.prod(dims[:j]), dims[j], math.prod(dims[j + 1 :])
        # A summary token of block b is its last token, which has seen the whole block only once
        # every finer dim has been hopped.
        summary = causal and coverage == "full" and S > 1 and processed == set(range(j + 1, m))
        hops.append(Hop(j, P, nj, S, summary))
        processed.add(j)
    return HopPlan(dims, n, causal, coverage, order, tuple(hops))
