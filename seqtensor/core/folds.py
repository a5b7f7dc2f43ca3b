"""Folding a sequence of n tokens into a tensor of shape (n_1, ..., n_m).

Row-major: token ``t`` has coordinates ``(i_1, ..., i_m)`` with ``t = sum_j i_j * s_j`` and
``s_j = prod_{k>j} n_k``. Dim m (the last) is the finest: neighbouring tokens share it; dim 1 is the
coarsest. Tokens ``t >= n`` are padding (never a key, never returned). See docs/semantics.md.

A *fold strategy* is a callable ``strategy(n) -> Fold``. Anywhere a fold is accepted, a ``Fold``,
a strategy, or a tuple of dims works (:func:`resolve_fold`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._validation import check, is_int

__all__ = [
    "Fold",
    "FixedFold",
    "BalancedFold",
    "BlockFold",
    "ExtrapolatingFold",
    "FoldLike",
    "GPU_DENSE_CROSSOVER",
    "resolve_fold",
    "fold_to_dict",
    "fold_from_dict",
]


class Fold:
    """A fold of a sequence into a tensor with dims ``(n_1, ..., n_m)``.

    Parameters
    ----------
    dims : sequence of positive ints, coarsest first.
    n : optional sequence length this fold was made for; must satisfy ``n <= prod(dims)``.

    Examples
    --------
    >>> f = Fold((4, 8), n=30)
    >>> f.size, f.padding, f.coords(9), f.index((1, 1))
    (32, 2, (1, 1), 9)
    """

    def __init__(self, dims: Sequence[int], n: int | None = None) -> None:
        dims = tuple(dims)
        check(len(dims) > 0, "fold dims must not be empty")
        # one pass without messages first: formatting them was most of a call's host time
        if not all(type(x) is int and x > 0 for x in dims):
            for d in dims:
                check(is_int(d), f"fold dims must be ints, got {dims!r}", TypeError)
                check(d > 0, f"fold dims must be positive, got {dims!r}")
            dims = tuple(int(d) for d in dims)  # numpy integers become Python ints
        self.dims: tuple[int, ...] = dims
        self.size: int = math.prod(dims)
        if n is not None and not (type(n) is int and 0 < n <= self.size):
            check(is_int(n) and n > 0, f"sequence length n must be a positive int, got {n!r}")
            n = int(n)
            check(
                n <= self.size,
                f"fold {dims} holds {self.size} tokens and does not cover a sequence of n={n}",
            )
        self.n: int | None = n

    @property
    def order(self) -> int:
        """Number of fold dims m."""
        return len(self.dims)

    @property
    def strides(self) -> tuple[int, ...]:
        """Row-major token strides ``s_j = prod_{k>j} n_k``."""
        out, s = [], 1
        for d in reversed(self.dims):
            out.append(s)
            s *= d
        return tuple(reversed(out))

    @property
    def padding(self) -> int:
        """Padded positions ``prod(dims) - n`` (0 when the fold was made without n)."""
        return 0 if self.n is None else self.size - self.n

    def covers(self, n: int) -> bool:
        """Whether this fold holds a sequence of length n."""
        return n <= self.size

    def for_length(self, n: int) -> Fold:
        """This fold's dims bound to length n, with a clear error if they do not cover n."""
        return self if self.n == n else Fold(self.dims, n)

    def coords(self, t: int) -> tuple[int, ...]:
        """Coordinates ``(i_1, ..., i_m)`` of token t."""
        check(is_int(t), f"token index must be an int, got {t!r}", TypeError)
        t = int(t)
        check(0 <= t < self.size, f"token index {t} is outside the fold of size {self.size}")
        return tuple((t // s) % d for s, d in zip(self.strides, self.dims))

    def index(self, coords: Sequence[int]) -> int:
        """Token index of coordinates ``(i_1, ..., i_m)``."""
        coords = tuple(coords)
        check(len(coords) == self.order, f"expected {self.order} coordinates, got {coords!r}")
        for i, d in zip(coords, self.dims):
            check(0 <= i < d, f"coordinates {coords!r} are outside the fold dims {self.dims}")
        return sum(i * s for i, s in zip(coords, self.strides))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fold) and other.dims == self.dims and other.n == self.n

    def __hash__(self) -> int:
        return hash((self.dims, self.n))

    def __repr__(self) -> str:
        n = "" if self.n is None else f", n={self.n}"
        return f"Fold({self.dims}{n})"


FoldLike = Fold | Sequence[int] | Callable[[int], Fold]


def resolve_fold(fold: FoldLike, n: int) -> Fold:
    """Turn a Fold, a strategy or a tuple of dims into a Fold covering n (clear error otherwise)."""
    if isinstance(fold, Fold):
        return fold.for_length(n)
    if isinstance(fold, (tuple, list)):
        return Fold(tuple(fold), n)
    if callable(fold):
        out = fold(n)
        check(
            isinstance(out, Fold),
            f"fold strategy {fold!r} returned {type(out).__name__}, not a Fold",
            TypeError,
        )
        return out.for_length(n)
    raise TypeError(
        f"fold must be a Fold, a tuple of dims or a strategy callable, got {type(fold).__name__}"
    )


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _balanced_dims(
    n: int, order: int, multiple: int = 1, max_dim: int | None = None
) -> tuple[int, ...] | None:
    """Near-equal dims (largest / smallest <= 2), coarsest largest, with least padding.

    Searches the smallest dim s around n**(1/m); the other dims lie in [s, 2s] and the coarsest
    is derived from what is left, so the search is O(s^(m-2)) and fast for m <= 4.
    """
    if order == 1:
        d = _round_up(n, multiple)
        return (d,) if max_dim is None or d <= max_dim else None
    root = n ** (1.0 / order)
    best: tuple[tuple, tuple[int, ...]] | None = None
    lo = max(multiple, _round_up(max(1, math.floor(root / 2)), multiple))
    hi = _round_up(math.ceil(root), multiple)
    for s in range(lo, hi + 1, multiple):
        cap = 2 * s if max_dim is None else min(2 * s, max_dim)
        if cap < s:
            continue

        def search(prefix: tuple[int, ...]) -> None:
            nonlocal best
            if len(prefix) == order - 1:
                rest = math.prod(prefix)
                coarse = max(s, _round_up(-(-n // rest), multiple))
                if coarse > cap:
                    return
                dims = tuple(sorted(prefix + (coarse,), reverse=True))
                key = (math.prod(dims) - n, dims[0] / dims[-1], dims)
                if best is None or key < best[0]:
                    best = (key, dims)
                return
            start = s if not prefix else prefix[-1]
            for d in range(start, cap + 1, multiple):
                search(prefix + (d,))

        search((s,))
    return None if best is None else best[1]


# Below this length one flash-attention pass (order 1) beat order 2 forward and forward+backward
# on an H200 (B=1, H=32, d=128, bf16, causal; benchmarks/results/attention_public_h200.json:
# forward / forward+backward at 2048 tokens SDPA 0.17 / 0.63 ms, order 2 0.28 / 1.49 ms; at 4096
# tokens SDPA 0.50 / 1.92 ms, order 2 0.16 / 1.31 ms).
# CPUs have no such crossover measured: there the reference backend runs every hop through SDPA.
GPU_DENSE_CROSSOVER = 4096


def _int_field(strategy: object, name: str, low: int) -> None:
    """Check an int setting of a frozen strategy and store it as a Python int (numpy integers
    included, so the strategy stays JSON-serialisable)."""
    value = getattr(strategy, name)
    check(is_int(value) and value >= low, f"{name} must be an int >= {low}, got {value!r}")
    object.__setattr__(strategy, name, int(value))


@dataclass(frozen=True)
class FixedFold:
    """Always the same dims; errors if they do not cover n."""

    dims: tuple[int, ...]

    def __call__(self, n: int) -> Fold:
        return Fold(tuple(self.dims), n)


@dataclass(frozen=True)
class BalancedFold:
    """Order-m near-equal factorization of n (e.g. 32768 -> 32x32x32), padding allowed.

    Parameters
    ----------
    order : fold order m.
    multiple : every dim is a multiple of this (kernel block alignment).
    dense_below : below this length, order 1 (full attention, which the op then runs on flash
        attention): where one hop is cheaper than several. ``GPU_DENSE_CROSSOVER`` is the measured
        crossover on an H200; 0 (the default) never switches, since the switch changes what a model
        computes at short lengths.
    """

    order: int
    multiple: int = 1
    dense_below: int = 0

    def __post_init__(self) -> None:
        _int_field(self, "order", 1)
        _int_field(self, "multiple", 1)
        _int_field(self, "dense_below", 0)

    def __call__(self, n: int) -> Fold:
        check(n >= 1, f"sequence length must be >= 1, got {n}")
        if n < self.dense_below:
            return Fold((n,), n)
        return Fold(_balanced_dims(n, self.order, self.multiple), n)


@dataclass(frozen=True)
class BlockFold:
    """Finest dim(s) fixed to a season (``block=48``) or nested seasons (``block=(7, 48)``: days of
    a week, half-hours of a day); the coarser dims, ``order`` in all, are a balanced fold of the
    rest."""

    block: int | tuple[int, ...]
    order: int | None = None  # default: one dim more than the blocks

    def __post_init__(self) -> None:
        blocks = self.block if isinstance(self.block, (tuple, list)) else (self.block,)
        ok = len(blocks) >= 1 and all(is_int(b) and b >= 1 for b in blocks)
        check(ok, f"block must be an int >= 1 or a tuple of them, got {self.block!r}")
        blocks = tuple(int(b) for b in blocks)
        object.__setattr__(self, "block", tuple(blocks) if len(blocks) > 1 else blocks[0])
        order = len(blocks) + 1 if self.order is None else self.order
        check(
            is_int(order) and order > len(blocks),
            f"order must be an int > {len(blocks)} (the number of blocks), got {self.order!r}",
        )
        object.__setattr__(self, "order", int(order))

    @property
    def blocks(self) -> tuple[int, ...]:
        """The fixed finest dims, coarsest of them first."""
        return self.block if isinstance(self.block, tuple) else (self.block,)

    def __call__(self, n: int) -> Fold:
        check(n >= 1, f"sequence length must be >= 1, got {n}")
        coarse = -(-n // math.prod(self.blocks))
        return Fold(_balanced_dims(coarse, self.order - len(self.blocks)) + self.blocks, n)


@dataclass(frozen=True)
class ExtrapolatingFold:
    """For any n, every dim <= ``max_dim``: the order grows with n so positions stay in
    distribution.

    A model trained with dims up to ``max_dim`` sees only coordinates it was trained on at any
    length (tensor RoPE positions stay below each n_j), which is what makes extrapolation work.
    """

    max_dim: int
    min_order: int = 2
    dense_below: int = 0  # as in BalancedFold

    def __post_init__(self) -> None:
        _int_field(self, "dense_below", 0)
        _int_field(self, "max_dim", 2)
        _int_field(self, "min_order", 1)

    def __call__(self, n: int) -> Fold:
        check(n >= 1, f"sequence length must be >= 1, got {n}")
        if n < self.dense_below:
            return Fold((n,), n)
        order = self.min_order
        while self.max_dim**order < n:
            order += 1
        dims = _balanced_dims(n, order, max_dim=self.max_dim)
        if dims is None:  # near-equal dims do not fit under max_dim: fill finest dims to the cap
            finer = (self.max_dim,) * (order - 1)
            dims = (-(-n // math.prod(finer)),) + finer
        return Fold(dims, n)


_STRATEGIES = {cls.__name__: cls for cls in (FixedFold, BalancedFold, BlockFold, ExtrapolatingFold)}


def fold_to_dict(fold: FoldLike) -> dict:
    """A JSON-ready description of a Fold, a built-in strategy or a tuple of dims."""
    if isinstance(fold, Fold):
        return {"kind": "Fold", "dims": list(fold.dims), "n": fold.n}
    if isinstance(fold, (tuple, list)):
        return {"kind": "dims", "dims": list(fold)}
    name = type(fold).__name__
    check(
        name in _STRATEGIES,
        f"only Fold, dims and built-in strategies serialize; got {fold!r}",
        TypeError,
    )
    out = {"kind": name, **{k: getattr(fold, k) for k in fold.__dataclass_fields__}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def fold_from_dict(spec: dict) -> FoldLike:
    """Inverse of :func:`fold_to_dict`."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "dims":
        return tuple(spec["dims"])
    if kind == "Fold":
        return Fold(tuple(spec["dims"]), spec.get("n"))
    check(
        kind in _STRATEGIES,
        f"unknown fold kind {kind!r}; expected dims, Fold or one of {sorted(_STRATEGIES)}",
    )
    if kind == "FixedFold":
        spec["dims"] = tuple(spec["dims"])
    return _STRATEGIES[kind](**spec)
