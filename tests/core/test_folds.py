import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtensor import BalancedFold, BlockFold, ExtrapolatingFold, FixedFold, Fold, resolve_fold
from seqtensor.core.folds import fold_from_dict, fold_to_dict


@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.data())
def test_coords_index_round_trip_row_major(dims, data):
    fold = Fold(dims)
    t = data.draw(st.integers(0, fold.size - 1))
    coords = fold.coords(t)
    assert fold.index(coords) == t
    # row-major: t = sum_j i_j * prod_{k>j} n_k, written out independently
    assert t == sum(i * math.prod(dims[j + 1 :]) for j, i in enumerate(coords))


def test_inspection_attributes():
    fold = Fold((4, 8), n=30)
    assert (fold.order, fold.size, fold.padding, fold.strides) == (2, 32, 2, (8, 1))
    assert fold.coords(9) == (1, 1) and fold.index((3, 7)) == 31


@pytest.mark.parametrize(
    "dims, n, match",
    [
        ((), None, "empty"),
        ((3, 0), None, "positive"),
        ((4, -1), None, "positive"),
        ((4, 4), 17, "does not cover"),
    ],
)
def test_bad_folds_raise(dims, n, match):
    with pytest.raises(ValueError, match=match):
        Fold(dims, n)


def test_non_int_dims_raise_type_error():
    with pytest.raises(TypeError, match="ints"):
        Fold((4.0, 2))


def test_coords_and_index_out_of_range():
    fold = Fold((3, 3))
    with pytest.raises(ValueError, match="outside"):
        fold.coords(9)
    with pytest.raises(ValueError, match="outside"):
        fold.index((0, 3))
    with pytest.raises(ValueError, match="coordinates"):
        fold.index((0,))


STRATEGIES = [
    BalancedFold(1),
    BalancedFold(2),
    BalancedFold(3),
    BalancedFold(3, multiple=4),
    BlockFold(16),
    BlockFold(8, order=3),
    BlockFold((7, 4)),
    BlockFold((3, 5), order=4),
    ExtrapolatingFold(16),
    ExtrapolatingFold(32, min_order=3),
]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300_000), st.sampled_from(STRATEGIES))
def test_every_strategy_covers_n(n, strategy):
    fold = strategy(n)
    assert fold.size >= n and fold.n == n and fold.padding == fold.size - n
    if isinstance(strategy, BalancedFold):
        assert fold.order == strategy.order
        assert all(d % strategy.multiple == 0 for d in fold.dims)
    if isinstance(strategy, BlockFold):
        k = len(strategy.blocks)
        assert fold.dims[-k:] == strategy.blocks and fold.order == strategy.order
    if isinstance(strategy, ExtrapolatingFold):
        assert max(fold.dims) <= strategy.max_dim and fold.order >= strategy.min_order


@pytest.mark.parametrize(
    "n, order, dims",
    [
        (4096, 2, (64, 64)),
        (8192, 2, (128, 64)),
        (32768, 3, (32, 32, 32)),
        (65536, 3, (64, 32, 32)),
        (131072, 3, (64, 64, 32)),
    ],
)
def test_balanced_fold_matches_paper_and_anchor_dims(n, order, dims):
    assert BalancedFold(order)(n).dims == dims


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 100_000), st.integers(2, 4))
def test_balanced_fold_is_near_equal_and_tight(n, order):
    fold = BalancedFold(order)(n)
    assert max(fold.dims) <= 2 * min(fold.dims)
    # no near-equal fold with a smaller coarsest dim covers n: padding is less than one coarse slab
    assert fold.size - n < math.prod(fold.dims[1:])


def test_extrapolating_fold_grows_order_not_dims():
    strategy = ExtrapolatingFold(32)
    assert strategy(32 * 32).order == 2
    long = strategy(131072)
    assert long.order == 4 and max(long.dims) <= 32


def test_resolve_fold_accepts_fold_strategy_tuple():
    assert resolve_fold((4, 8), 30) == Fold((4, 8), 30)
    assert resolve_fold(Fold((4, 8)), 30).n == 30
    assert resolve_fold(FixedFold((4, 8)), 30).dims == (4, 8)
    with pytest.raises(ValueError, match="does not cover"):
        resolve_fold(FixedFold((4, 8)), 33)
    with pytest.raises(TypeError, match="fold must be"):
        resolve_fold("4x8", 30)
    with pytest.raises(TypeError, match="not a Fold"):
        resolve_fold(lambda n: (4, 8), 30)


@pytest.mark.parametrize(
    "fold",
    [
        (4, 8),
        Fold((4, 6)),
        Fold((4, 6), n=21),
        FixedFold((5, 5)),
        BalancedFold(3, 2),
        BlockFold(16, 3),
        BlockFold((7, 48)),
        ExtrapolatingFold(64),
    ],
)
def test_fold_dict_round_trip(fold):
    back = fold_from_dict(json.loads(json.dumps(fold_to_dict(fold))))
    assert back == fold


def test_block_fold_nested_seasons():
    """block=(7, 48): weeks x days x half-hours for half-hourly data; token t sits at (week, day, slot)."""
    fold = BlockFold((7, 48))(2144)
    assert fold.dims == (7, 7, 48) and fold.padding == 7 * 7 * 48 - 2144
    assert fold.coords(336 + 2 * 48 + 5) == (1, 2, 5)
    assert BlockFold(24) == BlockFold(24, order=2) and BlockFold([7, 48]) == BlockFold((7, 48))
    for bad in [
        dict(block=(7, 0)),
        dict(block=()),
        dict(block=(7, 48), order=2),
        dict(block=4.0),
        dict(block=(7, True)),
    ]:
        with pytest.raises(ValueError, match="block|order"):
            BlockFold(**bad)


@pytest.mark.parametrize(
    "strategy", [BalancedFold(2, dense_below=100), ExtrapolatingFold(8, dense_below=100)]
)
def test_dense_below_switches_to_order_one_below_the_crossover(strategy):
    assert strategy(99).dims == (99,) and strategy(1).dims == (1,)
    assert strategy(100).order >= 2 and strategy(4096).order >= 2
    back = fold_from_dict(json.loads(json.dumps(fold_to_dict(strategy))))
    assert back == strategy and back(50).dims == (50,)


def test_dense_below_off_by_default_and_checked():
    from seqtensor.core.folds import GPU_DENSE_CROSSOVER

    assert BalancedFold(2)(16).order == 2 and ExtrapolatingFold(8)(16).order == 2
    assert GPU_DENSE_CROSSOVER > 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="dense_below"):
            BalancedFold(2, dense_below=bad)


def test_numpy_integers_are_accepted_and_stored_as_ints():
    import numpy as np

    fold = Fold((np.int64(4), np.int32(8)), n=np.int64(30))
    assert fold.dims == (4, 8) and all(type(d) is int for d in fold.dims) and type(fold.n) is int
    assert fold.coords(np.int64(9)) == (1, 1)
    assert BlockFold(np.int64(8))(64).dims[-1] == 8
    strategy = BalancedFold(order=np.int64(2), dense_below=np.int64(0))
    assert type(strategy.order) is int and json.dumps(fold_to_dict(strategy))
    assert type(ExtrapolatingFold(np.int64(64)).max_dim) is int
    with pytest.raises(TypeError, match="fold dims must be ints"):
        Fold((4.0, 8))
