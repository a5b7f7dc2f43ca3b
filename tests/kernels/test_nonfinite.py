"""Non-finite inputs on the default path (no value check): NaN in gives NaN out, never zeros.

Order 1 is plain attention, so SDPA is the oracle there; at higher orders the reference (which runs
each hop through SDPA) is. The Triton cases run through the interpreter (TRITON_INTERPRET=1).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import seqtensor as st
from seqtensor.core.plan import hop_plan

f32 = torch.float32
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def qkv(n=24, B=1, H=2, d=16, dtype=f32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=dtype) for _ in range(3))


def same_nan_close(got, want):
    """NaN exactly where the oracle has NaN, and the finite values equal to it."""
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(), want.isnan().sum())
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok], want[ok], atol=2e-5, rtol=2e-5)


@pytest.fixture
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["q", "k"])
def test_order_one_nan_matches_sdpa(backend, causal, where):
    q, k, v = qkv()
    x = q if where == "q" else k
    x[0, 1, 7] = float("nan")
    if where == "k" and causal:
        # SDPA's masked logits of a NaN key are implementation-defined; keep it visible to all
        k[0, 1, 7] = 0.0
        k[0, 1, 0, 3] = float("nan")
    got = st.tensorized_attention(q, k, v, (24,), causal=causal, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert want.isnan().any() and not want.isnan().all()
    same_nan_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "dims, causal, coverage",
    [
        ((4, 6), False, "full"),
        ((4, 6), True, "full"),
        ((4, 6), True, "axial"),
        ((2, 3, 4), True, "full"),
    ],
)
def test_higher_order_nan_matches_reference(backend, dims, causal, coverage):
    """One NaN query row: its fibres' later outputs are NaN as in the reference; no row becomes 0."""
    n = math.prod(dims)
    q, k, v = qkv(n=n)
    q[0, 0, 5] = float("nan")
    kw = dict(causal=causal, coverage=coverage)
    got = st.tensorized_attention(q, k, v, dims, backend=backend, **kw)
    want = st.tensorized_attention(q, k, v, dims, backend="reference", **kw)
    clean = st.tensorized_attention(*qkv(n=n), dims, backend="reference", **kw)
    assert want.isnan().any() and not want.isnan().all()
    assert not (want.isnan() & (clean == 0)).any()
    same_nan_close(got, want)
    # the other head never saw the NaN
    assert not got[0, 1].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_value_gives_nan_rows_that_attend_it(backend):
    q, k, v = qkv()
    v[0, 0, 3] = float("nan")
    got = st.tensorized_attention(q, k, v, (4, 6), causal=True, backend=backend)
    want = st.tensorized_attention(q, k, v, (4, 6), causal=True, backend="reference")
    assert want[0, 0, 3].isnan().all() and got[0, 0, 3].isnan().all()
    assert (got.isnan() | ~want.isnan()).all()  # every NaN of the oracle is NaN here too


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dims", [(24,), (4, 6)])
def test_nan_scale_gives_nan(backend, dims):
    q, k, v = qkv()
    got = st.tensorized_attention(q, k, v, dims, causal=True, scale=float("nan"), backend=backend)
    assert got.isnan().all()
    if dims == (24,):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=float("nan"))
        assert want.isnan().all()


def test_scale_must_be_a_number():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale must be a real number"):
        st.tensorized_attention(q, k, v, (4, 6), scale="0.1")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_fold_far_larger_than_n_runs_in_order_n(backend, causal):
    """Coarsest blocks of pure padding are dropped (exact), so (100000,) for 16 tokens is (16,)."""
    q, k, v = qkv(n=16)
    assert hop_plan((100000,), 16).dims == (16,)
    assert hop_plan((100000, 4), 16, causal=True).N == 16
    got = st.tensorized_attention(q, k, v, (100000,), causal=causal, backend=backend)
    want = st.tensorized_attention(q, k, v, (16,), causal=causal, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("hop_order", [None, (0, 1), (1, 0)])
def test_dropping_padding_blocks_is_exact_for_any_hop_order(hop_order):
    """A non-causal fold with whole padding blocks equals the trimmed fold, against the dense oracle."""
    import oracle

    q, k, v = (x.double() for x in qkv(n=10, d=8))
    got = st.tensorized_attention(q, k, v, (7, 3), hop_order=hop_order, backend="reference")
    matrix = oracle.effective_matrix(q[0], k[0], (7, 3), hop_order=hop_order)  # (H, n, n)
    torch.testing.assert_close(got[0], matrix @ v[0])


def test_fold_with_huge_finer_dims_is_refused():
    q, k, v = qkv(n=16)
    with pytest.raises(ValueError, match=r"holds 100000 positions for n=16"):
        st.tensorized_attention(q, k, v, (1, 100000))
