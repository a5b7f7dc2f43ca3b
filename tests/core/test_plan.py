"""The hop plan: (P, n_j, S) per hop, the summary rule, hop-order checks and padding blocks."""

import math

import pytest

from seqtensor.core.plan import COVERAGES, MODES, hop_plan


def test_hops_finest_to_coarsest_with_summaries_once_finer_dims_are_done():
    plan = hop_plan((2, 3, 4), 24, causal=True, coverage="full")
    got = [(h.dim, h.P, h.nj, h.S, h.summary) for h in plan.hops]
    assert got == [(2, 6, 4, 1, False), (1, 2, 3, 4, True), (0, 1, 2, 12, True)]
    assert plan.order == (2, 1, 0) and plan.N == 24 and not plan.padded and plan.summaries
    for h in plan.hops:  # every hop covers the folded tensor
        assert h.P * h.nj * h.S == plan.N


@pytest.mark.parametrize("causal, coverage", [(False, "full"), (True, "axial")])
def test_no_summaries_without_causal_full(causal, coverage):
    assert not hop_plan((2, 3, 4), 24, causal=causal, coverage=coverage).summaries


def test_summary_needs_every_finer_dim_hopped_first():
    # hopping dim 1 before dim 2: dim 1's hop has an unprocessed finer dim, so no summary keys
    plan = hop_plan((2, 3, 4), 24, causal=True, coverage="axial", hop_order=(1, 2, 0))
    assert [h.dim for h in plan.hops] == [1, 2, 0] and not plan.summaries


def test_bad_orders_and_coverage_are_named():
    with pytest.raises(ValueError, match="finest to coarsest"):
        hop_plan((4, 6), 24, causal=True, hop_order=(0, 1))
    with pytest.raises(ValueError, match="permutation"):
        hop_plan((4, 6), 24, hop_order=(1, 1))
    with pytest.raises(TypeError, match="sequence of int dims"):
        hop_plan((4, 6), 24, hop_order="10")
    with pytest.raises(ValueError, match="coverage"):
        hop_plan((4, 6), 24, coverage="dense")
    with pytest.raises(ValueError, match="does not cover"):
        hop_plan((4, 6), 25)


@pytest.mark.parametrize("dims, n", [((100000,), 16), ((50, 4), 9), ((7, 3), 10), ((1, 7, 48), 10)])
def test_padding_blocks_of_the_coarsest_dim_are_dropped(dims, n):
    plan = hop_plan(dims, n)
    block = math.prod(dims[1:])
    assert plan.dims[1:] == dims[1:] and plan.dims[0] == -(-n // block)
    assert plan.N - n < block


def test_plans_are_shared_and_value_sets_have_one_owner():
    assert hop_plan((4, 6), 24) is hop_plan([4, 6], 24)
    assert COVERAGES == ("full", "axial") and MODES == ("fibre", "kronecker")
