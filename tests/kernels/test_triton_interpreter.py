"""Triton backend against the PyTorch oracle, on CPU through Triton's interpreter.

Every case: forward and gradients of q, k, v equal the float64 reference within twice the error that
plain PyTorch makes in the same precision; every buffer the
kernels write starts as NaN (``triton_hops.POISON``) so an unwritten element fails the test.
Cases are tiny (n <= 64, B * H <= 4): the interpreter costs about a millisecond per tl op.
"""

import warnings

import pytest
import torch

pytest.importorskip("triton")

from seqtensor import tensorized_attention  # noqa: E402
from seqtensor.core.plan import hop_plan  # noqa: E402
from seqtensor.core.positional import RoPE, TensorRoPE  # noqa: E402
from seqtensor.kernels import reference as R  # noqa: E402
from seqtensor.kernels import triton_hops as T  # noqa: E402
from seqtensor.kernels import tuning  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(T, "POISON", True)


f64 = torch.float64
# numpy >= 1.25 warns inside the interpreter when a loop bound is a 0-d array
pytestmark = pytest.mark.interpreter


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def make_inputs(B, H, Hkv, n, d, dtype, *, dv=None, layout="bhnd", mask=False, seed=0):
    """q (B, H, n, d), k, v (B, Hkv, n, d|dv) as leaves; layout "bnhd" gives transposed views."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d

    def leaf(heads, width):
        if layout == "bnhd":  # what a linear projection produces: (B, n, H * d) viewed per head
            x = torch.randn(B, n, heads * width, generator=g, dtype=f64).to(dtype).requires_grad_()
            return x, x.view(B, n, heads, width).transpose(1, 2)
        x = torch.randn(B, heads, n, width, generator=g, dtype=f64).to(dtype).requires_grad_()
        return x, x

    leaves, views = zip(leaf(H, d), leaf(Hkv, d), leaf(Hkv, dv))
    kpm = None
    if mask:
        kpm = torch.rand(B, n, generator=g) > 0.3
        kpm[:, 0] = True
    return leaves, views, kpm


def eager_same_precision(q, k, v, dims, n, **kw):
    """The reference's hop maths run in the inputs' own dtype: plain PyTorch at that precision."""
    return R.fibre_attention_reference(q, k, v, dims, n, compute_dtype=q.dtype, **kw)


def run_all(fn, leaves, views, dims, n, kw, grad_seed=1):
    """Output and gradients (w.r.t. the leaves) of fn, in float64 for comparison."""
    out = fn(*views, dims, n, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=f64).to(
        out.dtype
    )
    grads = torch.autograd.grad(out, leaves, g)
    return [out.double(), *(x.double() for x in grads)]


def check_case(
    dims,
    n,
    *,
    H=2,
    Hkv=1,
    d=16,
    dv=None,
    causal=False,
    coverage="full",
    hop_order=None,
    rope=False,
    mask=False,
    layout="bhnd",
    dtype=f64,
    B=1,
    seed=0,
    gates=False,
):
    """Triton against the float64 reference: output and gradients of q, k, v (and of the hop gates)."""
    leaves, views, kpm = make_inputs(
        B, H, Hkv, n, d, dtype, dv=dv, layout=layout, mask=mask, seed=seed
    )
    kw = dict(
        causal=causal,
        coverage=coverage,
        hop_order=hop_order,
        scale=None,
        hop_positional=TensorRoPE(d) if rope else None,
        key_padding_mask=kpm,
    )
    gate = (
        torch.rand(H, len(dims) - 1, generator=torch.Generator().manual_seed(seed + 7), dtype=f64)
        if gates
        else None
    )

    def with_gates(leaves, dtype):
        if gate is None:
            return list(leaves), kw
        leaf = gate.to(dtype).requires_grad_()
        return [*leaves, leaf], {**kw, "hop_gates": leaf}

    all_leaves, kw_low = with_gates(leaves, dtype)
    got = run_all(T.tensorized_fibre_attention, all_leaves, views, dims, n, kw_low)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    views64 = [
        x.view(v.transpose(1, 2).shape).transpose(1, 2) if layout == "bnhd" else x
        for x, v in zip(leaves64, views)
    ]
    all64, kw64 = with_gates(leaves64, f64)
    want = run_all(R.fibre_attention_reference, all64, views64, dims, n, kw64)
    if dtype in (torch.float32, f64):
        base = run_all(R.fibre_attention_reference, all_leaves, views, dims, n, kw_low)
    else:
        base = run_all(eager_same_precision, all_leaves, views, dims, n, kw_low)
    eps = torch.finfo(dtype).eps
    for name, x, y, z in zip(("out", "dq", "dk", "dv", "dgates"), got, want, base):
        assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) elements"
        err, err_base = (x - y).abs().max().item(), (z - y).abs().max().item()
        tol = 2 * err_base + 10 * eps * max(1.0, y.abs().max().item())
        assert err <= tol, (
            f"{name}: error {err:.3e} > 2 x same-precision PyTorch {err_base:.3e} (+eps)"
        )


# ----------------------------------------------------------------------------------------------
# forward + backward sweep
# ----------------------------------------------------------------------------------------------

# dims, n, options. 16-row blocks under the interpreter: fibres of 17..40 exercise the block loops.
CASES = [
    # order 1
    ((7,), 7, dict()),
    ((9,), 8, dict(causal=True, H=2, Hkv=2, dtype=torch.float32)),
    ((20,), 20, dict(causal=True, rope=True, H=4, Hkv=2)),
    ((33,), 30, dict(mask=True, rope=True, dtype=torch.float32)),
    # order 2
    ((3, 5), 15, dict(dtype=torch.float32)),
    ((4, 5), 17, dict(causal=True, mask=True, H=2, Hkv=2)),
    ((5, 3), 13, dict(causal=True, coverage="axial", rope=True, dtype=torch.float32)),
    ((2, 20), 37, dict(causal=True, rope=True)),
    ((20, 3), 57, dict(causal=True, mask=True, rope=True, dtype=torch.float32)),
    ((3, 4), 12, dict(hop_order=(0, 1), rope=True)),
    ((4, 4), 14, dict(causal=True, coverage="axial", hop_order=(0, 1), dtype=torch.float32)),
    ((6, 5), 29, dict(causal=True, layout="bnhd", H=4, Hkv=4, rope=True)),
    ((5, 6), 30, dict(layout="bnhd", mask=True, H=2, Hkv=1, dtype=torch.float32, B=2)),
    ((3, 7), 21, dict(causal=True, d=15, dv=9)),
    ((1, 8), 8, dict(causal=True, H=3, Hkv=1)),
    # order 3
    ((2, 3, 4), 24, dict(causal=True, rope=True, dtype=torch.float32)),
    ((3, 3, 3), 25, dict(causal=True, H=4, Hkv=1)),
    ((2, 5, 3), 28, dict(causal=True, mask=True, rope=True, layout="bnhd")),
    ((3, 2, 5), 27, dict(rope=True, mask=True, dtype=torch.float32)),
    ((4, 2, 3), 19, dict(causal=True, coverage="axial", d=12, dtype=torch.float32)),
    ((2, 3, 4), 24, dict(causal=True, coverage="axial", hop_order=(1, 0, 2), B=2)),
    # order 4
    ((2, 2, 3, 2), 24, dict(causal=True, rope=True, H=1)),
    ((2, 3, 2, 3), 31, dict(causal=True, mask=True, rope=True, dtype=torch.float32, H=1)),
    ((3, 2, 2, 2), 20, dict(H=2, Hkv=2, layout="bnhd")),
    ((2, 2, 2, 3), 23, dict(causal=True, coverage="axial", dtype=torch.float32, H=1)),
]


@pytest.mark.parametrize(
    "dims,n,opts", CASES, ids=[f"{'x'.join(map(str, c[0]))}-n{c[1]}" for c in CASES]
)
def test_forward_and_gradients_match_reference(dims, n, opts):
    check_case(dims, n, **opts)


HALF_CASES = [
    ((4, 5), 20, dict(causal=True, rope=True)),
    ((3, 2, 5), 27, dict(causal=True, mask=True, H=2, Hkv=1)),
    ((5, 6), 28, dict(rope=True, layout="bnhd")),
]


@pytest.mark.parametrize("dims,n,opts", HALF_CASES)
def test_float16_within_twice_plain_pytorch_error(dims, n, opts):
    check_case(dims, n, dtype=torch.float16, **opts)


@pytest.mark.parametrize(
    "dims,n,causal,rope,mask",
    [
        ((3, 4), 11, True, True, False),
        ((3, 4), 12, True, False, True),
        ((4, 3), 10, False, True, True),
    ],
)
def test_gradcheck_float64(dims, n, causal, rope, mask):
    (q, k, v), _, kpm = make_inputs(1, 2, 1, n, 8, f64, mask=mask, seed=3)
    hp = TensorRoPE(8) if rope else None

    def fn(q, k, v):
        return T.tensorized_fibre_attention(
            q, k, v, dims, n, causal=causal, hop_positional=hp, key_padding_mask=kpm
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# dispatch, inference path, fallbacks
# ----------------------------------------------------------------------------------------------


def test_public_api_dispatches_to_triton_and_matches_reference():
    (q, k, v), _, _ = make_inputs(1, 2, 1, 22, 8, f64, seed=5)
    kw = dict(causal=True, positional="tensor_rope")
    got = tensorized_attention(q, k, v, (2, 3, 4), backend="triton", **kw)
    want = tensorized_attention(q, k, v, (2, 3, 4), backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_inference_path_without_grad_matches():
    (q, k, v), _, kpm = make_inputs(2, 2, 2, 23, 8, torch.float32, mask=True, seed=6)
    kw = dict(
        causal=True,
        coverage="full",
        hop_order=None,
        scale=0.3,
        hop_positional=None,
        key_padding_mask=kpm,
    )
    with torch.no_grad():
        got = T.tensorized_fibre_attention(q, k, v, (2, 3, 4), 23, **kw)
        want = R.fibre_attention_reference(q, k, v, (2, 3, 4), 23, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_output_keeps_the_heads_inner_layout_of_q():
    _, (q, k, v), _ = make_inputs(1, 2, 2, 12, 8, f64, layout="bnhd")
    out = T.tensorized_fibre_attention(q, k, v, (3, 4), 12)
    assert out.shape == (1, 2, 12, 8) and out.stride(1) < out.stride(2)  # (B, n, H, d) underneath


def test_unsupported_calls_fall_back_visibly():
    (q, k, v), _, _ = make_inputs(1, 2, 1, 12, 8, f64)
    assert T.fallback_reason(q, k, v, RoPE(8)) is not None
    with pytest.warns(RuntimeWarning, match="using the reference"):
        out = T.tensorized_fibre_attention(q, k, v, (3, 4), 12, hop_positional=RoPE(8))
    want = R.fibre_attention_reference(q, k, v, (3, 4), 12, hop_positional=RoPE(8))
    torch.testing.assert_close(out, want)
    assert T.fallback_reason(q, k, v, None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        T.tensorized_fibre_attention(q, k, v, (3, 4), 12)


def test_validity_levels_match_reference_relays():
    """The host-side validity scan equals the reference's per-hop 'attended a valid key'."""
    dims, n, B = (3, 2, 4), 19, 2
    kpm = torch.rand(B, n, generator=torch.Generator().manual_seed(2)) > 0.5
    for causal in (False, True):
        plan = hop_plan(dims, n, causal=causal, coverage="full")
        levels = T._validity(plan, B, kpm, "cpu").bool()
        q = torch.zeros(B, 1, n, 1, dtype=f64)
        valid = levels[0]
        _, _, _, want = R._prepare(q, q, q, n, plan.N, kpm)
        torch.testing.assert_close(levels[0], want)
        valid = valid.unflatten(1, dims)
        qg = torch.zeros(B, 1, 1, *dims, 1, dtype=f64)
        for i, hop in enumerate(plan.hops):
            _, valid = R._hop(qg, qg, qg, valid, hop.dim, causal, hop.summary, 1.0, None)
            torch.testing.assert_close(levels[i + 1], valid.flatten(1))


# ----------------------------------------------------------------------------------------------
# autotune candidates (the GPU's configs, checked here for fit and under the interpreter for results)
# ----------------------------------------------------------------------------------------------


def _hop_args(nj, d, dv):
    return {"NJ": nj}, {"D1": (d + 1) // 2, "D2": d // 2, "NDV": dv}


@pytest.mark.parametrize(
    "nj,d,dv",
    [(5, 32, 32), (40, 64, 64), (64, 128, 128), (100, 128, 96), (40, 256, 256), (1000, 64, 64)],
)
def test_autotune_candidates_fit_the_hop(nj, d, dv):
    """No block above the fibre (rounded up) or the head dim's register room; the table's config first."""
    args, kw = _hop_args(nj, d, dv)
    table = tuning.gpu_config(nj, d, dv)
    fib = max(16, 1 << (nj - 1).bit_length())
    wide = max(d, dv) > 128
    fwd = [
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        for c in tuning.fwd_candidates(None, args, **kw)
    ]
    assert fwd[0] == (table.block_m, table.block_n, table.num_warps, table.num_stages)
    assert len(set(fwd)) == len(fwd) > 1
    for bm, bn, _, _ in fwd:
        assert bm <= min(fib, 64 if wide else 128) and bn <= min(fib, 32 if wide else 64)
    single = nj <= table.block
    bwd = [
        (c.kwargs["BLOCK"], c.num_warps, c.num_stages)
        for c in tuning.bwd_candidates(None, args, SINGLE=single, **kw)
    ]
    assert (
        bwd[0] == (table.block, table.bwd_warps, table.num_stages) and len(set(bwd)) == len(bwd) > 1
    )
    # SINGLE kernels assume the whole fibre in one block; the others loop over blocks shorter than it
    assert all(b >= nj if single else b < nj for b, _, _ in bwd)


def test_every_autotune_candidate_matches_reference(monkeypatch):
    """Each config the GPU autotuner may pick gives the reference's output and gradients."""
    args, kw = _hop_args(70, 16, 16)
    fwd = tuning.fwd_candidates(None, args, **kw)
    bwd = tuning.bwd_candidates(None, args, SINGLE=False, **kw)
    for i in range(max(len(fwd), len(bwd))):
        f, b = fwd[i % len(fwd)], bwd[i % len(bwd)]
        override = dict(
            block_m=f.kwargs["BLOCK_M"], block_n=f.kwargs["BLOCK_N"], block=b.kwargs["BLOCK"]
        )
        monkeypatch.setattr(tuning, "CONFIG_OVERRIDE", override)
        assert (
            tuning.config(70, 16, 16).block == override["block"] < 70
        )  # the multi-block backward runs
        check_case((2, 70), 130, causal=True, rope=True, mask=True, H=2, Hkv=1)


def test_autotuners_per_fibre_bucket_with_several_configs():
    """One tuner per direction and power-of-two fibre length (not per shape), each holding several
    configs: triton.autotune skips tuning (and runs its first config) when it holds a single one."""
    for direction in ("fwd", "bwd"):
        kernel = T._hop_fwd_kernel if direction == "fwd" else T._hop_bwd_kernel
        tuner = tuning.tuner(direction, 40, kernel)
        assert tuner is tuning.tuner(direction, 64, kernel)
        assert tuner is not tuning.tuner(direction, 65, kernel)
        assert len(tuner.configs) > 1 and "NJ" not in tuner.keys and "P" not in tuner.keys


def test_autotune_policy(monkeypatch):
    """Table on the GPUs it was tuned on and whenever configs are overridden; autotune elsewhere or when forced."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    assert not tuning.use_autotune("cuda")
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert tuning.use_autotune("cuda")
    monkeypatch.setattr(tuning, "CONFIG_OVERRIDE", {"block": 32})
    assert not tuning.use_autotune("cuda")
    monkeypatch.setattr(tuning, "CONFIG_OVERRIDE", {})
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert not tuning.use_autotune("cuda")
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    assert tuning.use_autotune("cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_values_at_masked_tokens_do_not_leak(backend, causal):
    """NaN / inf in q, k, v at masked tokens (garbage the mask says to ignore): kept tokens get the
    outputs and gradients they get with zeros there."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 3] = mask[0, 9:] = mask[1, :2] = False
    drop = ~mask[:, None, :, None]

    def run(fill):
        xs = [x.masked_fill(drop, fill).requires_grad_() for x in (q, k, v)]
        out = tensorized_attention(
            *xs,
            (3, 4),
            causal=causal,
            key_padding_mask=mask,
            backend=backend,
        )
        out = out.masked_fill(drop, 0)
        out.sum().backward()
        return out, [x.grad.masked_fill(drop, 0) for x in xs]

    want, want_grads = run(0.0)
    for fill in (float("nan"), float("inf")):
        got, grads = run(fill)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


GATED_CASES = [
    ((4, 5), 20, dict(causal=True, rope=True)),
    ((2, 3, 4), 24, dict(causal=True, rope=True, H=4, Hkv=2, dtype=torch.float32)),
    ((2, 5, 3), 28, dict(causal=True, mask=True, layout="bnhd")),
    ((3, 2, 5), 27, dict(rope=True, dtype=torch.float32)),
    ((2, 2, 3, 2), 22, dict(causal=True, coverage="axial", H=2, Hkv=1)),
    ((2, 20), 37, dict(causal=True, rope=True, dtype=torch.float16)),
]


@pytest.mark.parametrize(
    "dims,n,opts", GATED_CASES, ids=[f"{'x'.join(map(str, c[0]))}-n{c[1]}" for c in GATED_CASES]
)
def test_hop_gates_forward_and_gradients_match_reference(dims, n, opts):
    check_case(dims, n, gates=True, **opts)
