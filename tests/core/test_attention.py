import math

import pytest
import torch
import torch.nn.functional as F
from oracle import effective_matrix, kron_reference

import seqtensor as st
from seqtensor.core.positional import TensorRoPE

f64 = torch.float64


def qkv(B=2, H=4, Hkv=2, n=24, d=8, dtype=f64, dv=None):
    return (
        torch.randn(B, H, n, d, dtype=dtype),
        torch.randn(B, Hkv, n, d, dtype=dtype),
        torch.randn(B, Hkv, n, dv or d, dtype=dtype),
    )


def expand_kv(x, H):
    return x.repeat_interleave(H // x.shape[1], dim=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_order_one_fold_is_sdpa(causal, Hkv):
    q, k, v = qkv(Hkv=Hkv, n=19)
    out = st.tensorized_attention(q, k, v, (19,), causal=causal)
    ref = F.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


CASES = [
    # dims, n, causal, coverage, hop_order, rope
    ((4, 6), 24, False, "full", None, False),
    ((5, 5), 23, False, "full", None, True),
    ((2, 3, 4), 24, True, "full", None, True),
    ((3, 3, 3), 25, True, "full", None, False),
    ((2, 2, 2, 3), 21, True, "full", None, True),
    ((3, 4, 2), 24, True, "axial", (0, 2, 1), True),
    ((4, 5), 17, False, "full", (0, 1), True),
    ((3, 2, 4), 19, False, "full", (1, 0, 2), False),
]


@pytest.mark.parametrize("dims, n, causal, coverage, hop_order, rope", CASES)
def test_matches_brute_force_oracle_and_matrix(dims, n, causal, coverage, hop_order, rope):
    q, k, v = qkv(B=1, H=2, Hkv=1, n=n, d=6)
    opts = dict(
        causal=causal,
        coverage=coverage,
        hop_order=hop_order,
        positional="tensor_rope" if rope else None,
    )
    out = st.tensorized_attention(q, k, v, dims, **opts)
    M = st.attention_matrix(q, k, dims, **opts)
    oracle = effective_matrix(
        q[0],
        k[0],
        dims,
        causal=causal,
        coverage=coverage,
        hop_order=hop_order,
        rope_base=1e4 if rope else None,
    )
    torch.testing.assert_close(M[0], oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, M @ expand_kv(v, 2), rtol=1e-10, atol=1e-12)


def test_key_padding_matches_oracle():
    q, k, v = qkv(B=1, H=2, Hkv=2, n=20, d=4)
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, [0, 1, 7, 13]] = False
    M = st.attention_matrix(q, k, (4, 5), key_padding_mask=keep)
    oracle = effective_matrix(q[0], k[0], (4, 5), valid=keep[0])
    torch.testing.assert_close(M[0], oracle, rtol=1e-10, atol=1e-12)
    assert (M[0][:, :, ~keep[0]] == 0).all(), "masked tokens must never be keys"


@pytest.mark.parametrize("coverage", ["full", "axial"])
@pytest.mark.parametrize("dims, n", [((4, 6), 24), ((3, 3, 3), 25), ((2, 3, 2, 2), 24)])
def test_causal_perturbing_the_future_changes_nothing_before(coverage, dims, n):
    q, k, v = qkv(n=n)
    out = st.tensorized_attention(
        q, k, v, dims, causal=True, coverage=coverage, positional="tensor_rope"
    )
    for t in (0, n // 3, n - 2):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 10
        out2 = st.tensorized_attention(
            q2, k2, v2, dims, causal=True, coverage=coverage, positional="tensor_rope"
        )
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=1e-13)
        assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize(
    "dims, n", [((4, 6), 24), ((3, 3, 3), 27), ((2, 3, 2, 2), 24), ((5, 5), 21)]
)
def test_coverage_reach(dims, n):
    q, k, _ = qkv(B=1, H=1, Hkv=1, n=n)
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    full = st.attention_matrix(q, k, dims, causal=True, coverage="full")[0, 0]
    axial = st.attention_matrix(q, k, dims, causal=True, coverage="axial")[0, 0]
    both = st.attention_matrix(q, k, dims, causal=False)[0, 0]
    assert (full[lower] > 0).all(), "full coverage must reach every earlier token"
    assert (full[~lower] == 0).all() and (axial[~lower] == 0).all(), (
        "causal matrices are lower-triangular"
    )
    assert (axial[lower] == 0).any(), "axial coverage misses some past pairs"
    t = dims[-1]  # token (.., 1, 0) never sees its predecessor (.., 0, n_m - 1) under axial
    assert axial[t, t - 1] == 0
    assert (both > 0).all(), "bidirectional reaches every pair, padding included"
    torch.testing.assert_close(full.sum(-1), torch.ones(n, dtype=f64))


@pytest.mark.parametrize("n", [7, 11, 13, 17, 23, 29, 31])
def test_bidirectional_reach_survives_padding(n):
    q, k, _ = qkv(B=1, H=1, Hkv=1, n=n)
    for dims in [st.BalancedFold(2)(n).dims, st.BalancedFold(3)(n).dims, (2, 2, 2, 2, 2)]:
        M = st.attention_matrix(q, k, dims)[0, 0]
        assert (M > 0).all(), f"dims {dims} lost pairs for n={n}"


def test_kronecker_mode_equals_kron_product():
    q, k, v = qkv(B=1, H=2, Hkv=1, n=24)
    out = st.tensorized_attention(q, k, v, (2, 3, 4), mode="kronecker")
    for h in range(2):
        torch.testing.assert_close(
            out[0, h], kron_reference(q[0, h], k[0, 0], v[0, 0], (2, 3, 4)), rtol=1e-10, atol=1e-12
        )


def test_kronecker_mode_rejects_causal_and_padding():
    q, k, v = qkv(n=24)
    with pytest.raises(ValueError, match="non-causal"):
        st.tensorized_attention(q, k, v, (4, 6), mode="kronecker", causal=True)
    with pytest.raises(ValueError, match="padding"):
        st.tensorized_attention(q, k, v, (5, 5), mode="kronecker")


@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_equals_sequences_one_by_one(causal):
    lengths = [24, 17, 9]
    dims = (4, 6)
    q, k, v = qkv(B=3, n=24)
    keep = torch.arange(24)[None, :] < torch.tensor(lengths)[:, None]
    batch = st.tensorized_attention(
        q, k, v, dims, causal=causal, positional="tensor_rope", key_padding_mask=keep
    )
    for b, L in enumerate(lengths):
        alone = st.tensorized_attention(
            q[b : b + 1, :, :L],
            k[b : b + 1, :, :L],
            v[b : b + 1, :, :L],
            dims,
            causal=causal,
            positional="tensor_rope",
        )
        torch.testing.assert_close(batch[b : b + 1, :, :L], alone, rtol=1e-10, atol=1e-12)


def test_tensor_rope_scores_depend_only_on_coordinate_differences():
    rope = TensorRoPE(8)
    x, y = torch.randn(2, 8, dtype=f64)
    for a, b, shift in [(0, 3, 5), (2, 7, 11), (6, 1, 30)]:
        s1 = rope.hop(x[None], torch.tensor([a])) @ rope.hop(y[None], torch.tensor([b])).T
        s2 = (
            rope.hop(x[None], torch.tensor([a + shift]))
            @ rope.hop(y[None], torch.tensor([b + shift])).T
        )
        torch.testing.assert_close(s1, s2)
    # in the full op: identical q, k at every token make each hop's matrix Toeplitz along the fibre
    q = torch.randn(1, 1, 1, 8, dtype=f64).expand(1, 1, 16, 8)
    k = torch.randn(1, 1, 1, 8, dtype=f64).expand(1, 1, 16, 8)
    M = st.attention_matrix(q, k, (16,), positional="tensor_rope")[0, 0]
    logit_gap = lambda i, j: torch.log(M[i, j] / M[i, i])  # noqa: E731  (row normaliser cancels)
    for i in range(1, 12):
        for delta in (1, 3):
            torch.testing.assert_close(logit_gap(i, i + delta), logit_gap(i - 1, i - 1 + delta))


def test_tensor_rope_positions_stay_local():
    """Extrapolation property: a hop's positions are coordinates, never the global index."""
    q, k, v = qkv(B=1, H=1, Hkv=1, n=64)
    dims = (4, 4, 4)
    out = st.tensorized_attention(q, k, v, dims, positional="tensor_rope")
    torch.testing.assert_close(out, st.attention_matrix(q, k, dims, positional="tensor_rope") @ v)
    oracle = effective_matrix(q[0], k[0], dims, rope_base=1e4)
    torch.testing.assert_close(out[0], oracle @ v[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)]
)
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v = qkv(n=30)
    ref = st.tensorized_attention(q, k, v, (5, 6), causal=True, positional="tensor_rope")
    out = st.tensorized_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), (5, 6), causal=True, positional="tensor_rope"
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_gradcheck_float64():
    q, k, v = (x.requires_grad_() for x in qkv(B=1, H=2, Hkv=1, n=10, d=4))
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 3] = False
    fn = lambda q, k, v: st.tensorized_attention(  # noqa: E731
        q, k, v, (3, 4), causal=True, positional="tensor_rope", key_padding_mask=keep
    )
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_never_builds_n_by_n(monkeypatch):
    """Scores per hop are N x n_j (x2 with summary keys): record every score block at n = 4096."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[:-1].numel() * k.shape[-2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(B=1, H=1, Hkv=1, n=4096, d=4, dtype=torch.float32)
    st.tensorized_attention(q, k, v, (64, 64), causal=True)
    assert len(seen) == 2 and max(seen) <= 4096 * 2 * 64 < 4096 * 4096 // 8


def test_value_head_dim_may_differ():
    q, k, v = qkv(n=24, dv=5)
    out = st.tensorized_attention(q, k, v, (4, 6))
    assert out.shape == (2, 4, 24, 5)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q, k[:, :, :-1], v), ValueError, "k must have shape"),
        (
            lambda q, k, v: (
                q,
                torch.randn(2, 3, 24, 8, dtype=f64),
                torch.randn(2, 3, 24, 8, dtype=f64),
            ),
            ValueError,
            "multiple of kv heads",
        ),
        (lambda q, k, v: (q, k.float(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "floating-point"),
        (lambda q, k, v: ([1.0], k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_errors(mutate, error, match):
    q, k, v = mutate(*qkv(n=24))
    with pytest.raises(error, match=match):
        st.tensorized_attention(q, k, v, (4, 6))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_nonfinite_input(name, bad):
    """The value check is opt-in (it reads every input and syncs): it names the tensor."""
    x = dict(zip("qkv", qkv(n=24), strict=True))
    x[name] = x[name].index_fill(2, torch.tensor([3]), bad)
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        st.tensorized_attention(x["q"], x["k"], x["v"], (4, 6), check_finite=True)
    with pytest.warns(DeprecationWarning, match="check_finite"):
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            st.tensorized_attention(x["q"], x["k"], x["v"], (4, 6), validate_values=True)


def test_bad_options_raise_clear_errors():
    q, k, v = qkv(n=24)
    with pytest.raises(ValueError, match="does not cover"):
        st.tensorized_attention(q, k, v, (4, 5))
    with pytest.raises(ValueError, match="coverage"):
        st.tensorized_attention(q, k, v, (4, 6), coverage="diagonal")
    with pytest.raises(ValueError, match="hop_order"):
        st.tensorized_attention(q, k, v, (4, 6), causal=True, hop_order=(0, 1))
    with pytest.raises(ValueError, match="permutation"):
        st.tensorized_attention(q, k, v, (4, 6), hop_order=(1, 1))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        st.tensorized_attention(
            q, k, v, (4, 6), key_padding_mask=torch.ones(2, 23, dtype=torch.bool)
        )
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        st.tensorized_attention(q, k, v, (4, 6), key_padding_mask=torch.ones(2, 24))
    with pytest.raises(ValueError, match="backend"):
        st.tensorized_attention(q, k, v, (4, 6), backend="cuda-magic")
    with pytest.raises(ValueError, match="positional"):
        st.tensorized_attention(q, k, v, (4, 6), positional="alibi")


def test_auto_backend_is_reference_on_cpu_and_visible():
    assert st.resolve_backend("auto", "cpu") == "reference"
    assert "reference" in st.available_backends()


def test_attention_matrix_rows_are_distributions():
    q, k, _ = qkv(B=1, H=1, Hkv=1, n=12)
    fold = st.Fold((3, 4), n=12)
    for causal in (True, False):
        assert math.isclose(
            float(st.attention_matrix(q, k, fold, causal=causal).sum()), 12.0, rel_tol=1e-6
        )


def test_positional_schemes_must_fit_the_head_dim_and_learned_must_be_a_module():
    q = k = v = torch.randn(1, 2, 12, 4)
    for scheme in (TensorRoPE(2), TensorRoPE(8), st.RoPE(8), st.Sinusoidal(8), st.Learned(12, 8)):
        with pytest.raises(ValueError, match="built for head dim"):
            st.tensorized_attention(q, k, v, (3, 4), positional=scheme)
    with pytest.raises(ValueError, match="positional='learned' has parameters"):
        st.tensorized_attention(q, k, v, (3, 4), positional="learned")
    learned = st.Learned(12, 4)  # a module: the same result on every call
    torch.testing.assert_close(
        st.tensorized_attention(q, k, v, (3, 4), positional=learned),
        st.tensorized_attention(q, k, v, (3, 4), positional=learned),
        rtol=0,
        atol=0,
    )


def test_empty_batch_and_zero_sized_heads():
    q, k, v = torch.randn(0, 2, 12, 4), torch.randn(0, 1, 12, 4), torch.randn(0, 1, 12, 6)
    assert st.tensorized_attention(q, k, v, (3, 4), causal=True).shape == (0, 2, 12, 6)
    with pytest.raises(ValueError, match="heads and head dims must be positive"):
        st.tensorized_attention(
            torch.randn(1, 2, 12, 0), torch.randn(1, 1, 12, 0), torch.randn(1, 1, 12, 4), (3, 4)
        )


def test_argument_types_are_checked_by_name():
    q = torch.randn(1, 1, 12, 4)
    with pytest.raises(TypeError, match="causal must be a bool"):
        st.tensorized_attention(q, q, q, (3, 4), causal="no")
    with pytest.raises(TypeError, match="hop_order must be a sequence of int dims"):
        st.tensorized_attention(q, q, q, (3, 4), hop_order="10")
    with pytest.raises(ValueError, match="sequence length n must be a positive int"):
        st.Fold((3,), n=True)
    with pytest.raises(TypeError, match="token index must be an int"):
        st.Fold((3, 4)).coords(1.5)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        st.attention_matrix([1], q, (3, 4))


GATED_CASES = [
    # dims, n, causal, positional, Hkv
    ((2, 3, 4), 24, True, "tensor_rope", 1),
    ((3, 3, 3), 25, True, None, 2),
    ((2, 2, 2, 3), 21, True, "tensor_rope", 1),
    ((4, 6), 24, False, None, 2),
]


@pytest.mark.parametrize("dims, n, causal, positional, Hkv", GATED_CASES)
def test_hop_gates_match_brute_force_oracle(dims, n, causal, positional, Hkv):
    q, k, v = qkv(B=1, H=2, Hkv=Hkv, n=n, d=6)
    gates = torch.rand(2, len(dims) - 1, dtype=f64)
    opts = dict(causal=causal, positional=positional, hop_gates=gates)
    M = st.attention_matrix(q, k, dims, **opts)
    oracle = effective_matrix(
        q[0],
        expand_kv(k, 2)[0] if Hkv == 2 else k[0],
        dims,
        causal=causal,
        rope_base=1e4 if positional else None,
        gates=gates,
    )
    torch.testing.assert_close(M[0], oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        st.tensorized_attention(q, k, v, dims, **opts), M @ expand_kv(v, 2), rtol=1e-10, atol=1e-12
    )


def test_hop_gates_closed_forms():
    """Open gates are the plain method; closed gates leave the first (finest, block-local) hop; with
    one coarse hop the output is linear in the gate."""
    q, k, v = qkv(B=2, H=4, Hkv=2, n=30, d=8)
    dims = (5, 6)
    plain = st.tensorized_attention(q, k, v, dims, causal=True)
    torch.testing.assert_close(
        st.tensorized_attention(q, k, v, dims, causal=True, hop_gates=torch.ones(4, 1, dtype=f64)),
        plain,
    )
    local = st.tensorized_attention(
        q, k, v, dims, causal=True, hop_gates=torch.zeros(4, 1, dtype=f64)
    )
    blocks = lambda x: (
        x.reshape(2, x.shape[1], 5, 6, 8).transpose(1, 2).reshape(10, x.shape[1], 6, 8)
    )  # noqa: E731
    dense = F.scaled_dot_product_attention(
        blocks(q), blocks(expand_kv(k, 4)), blocks(expand_kv(v, 4)), is_causal=True
    )
    torch.testing.assert_close(
        local, dense.reshape(2, 5, 4, 6, 8).transpose(1, 2).reshape(2, 4, 30, 8)
    )
    g = torch.tensor([[0.1], [0.5], [0.7], [0.95]], dtype=f64)
    mixed = st.tensorized_attention(q, k, v, dims, causal=True, hop_gates=g)
    torch.testing.assert_close(
        mixed, (1 - g[None, :, :, None]) * local + g[None, :, :, None] * plain
    )


def test_hop_gates_are_differentiable_and_causal():
    q, k, v = qkv(B=1, H=2, Hkv=1, n=24, d=4)
    logits = torch.zeros(2, 2, dtype=f64, requires_grad=True)
    out = st.tensorized_attention(
        q, k, v, (2, 3, 4), causal=True, positional="tensor_rope", hop_gates=logits.sigmoid()
    )
    out.square().sum().backward()
    assert logits.grad.abs().min() > 0
    v2 = v.clone()
    v2[:, :, 13:] += 1.0
    out2 = st.tensorized_attention(
        q, k, v2, (2, 3, 4), causal=True, positional="tensor_rope", hop_gates=logits.sigmoid()
    )
    torch.testing.assert_close(out2[:, :, :13], out[:, :, :13].detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "gates, match",
    [
        (torch.ones(2, 2), r"shape \(H=2, m-1=1\)"),
        (torch.ones(2), "2 dimensions"),
        (torch.full((2, 1), 1.5), r"\[0, 1\]"),
        (torch.full((2, 1), float("nan")), "NaN"),
        (torch.ones(2, 1, dtype=torch.long), "floating"),
    ],
)
def test_hop_gates_bad_input_is_named(gates, match):
    q, k, v = qkv(B=1, H=2, Hkv=1, n=12, d=4)
    with pytest.raises((ValueError, TypeError), match=match):
        st.tensorized_attention(
            q,
            k,
            v,
            (3, 4),
            causal=True,
            hop_gates=gates.to(f64) if gates.is_floating_point() else gates,
            check_finite=True,  # the range check reads the gates: opt-in
        )


def test_hop_gates_are_refused_where_they_cannot_apply():
    q, k, v = qkv(B=1, H=2, Hkv=1, n=12, d=4)
    with pytest.raises(ValueError, match="mode='fibre' only"):
        st.tensorized_attention(
            q, k, v, (3, 4), mode="kronecker", hop_gates=torch.zeros(2, 1, dtype=f64)
        )
    with pytest.raises(ValueError, match="on meta but q is on cpu"):
        st.tensorized_attention(
            q, k, v, (3, 4), causal=True, hop_gates=torch.zeros(2, 1, dtype=f64, device="meta")
        )
