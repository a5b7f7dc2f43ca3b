"""Triton backend on CUDA at realistic sizes: bf16 / fp16 / fp32 against the float64 reference.

Same rule as tests/test_kernels.py: the kernel's error (forward and gradients) is at most twice the
error of plain PyTorch in the same precision (the reference's hop maths run in that dtype), both
measured against the float64 reference. Skipped without CUDA; run on the GPU machine with
``python -m pytest -q tests/test_kernels_gpu.py``.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

from seqtensor.core.positional import TensorRoPE  # noqa: E402
from seqtensor.kernels import reference as R  # noqa: E402

f64 = torch.float64


def eager_same_precision(q, k, v, dims, n, **kw):
    """The reference's hop maths run in the inputs' own dtype: plain PyTorch at that precision."""
    return R.fibre_attention_reference(q, k, v, dims, n, compute_dtype=q.dtype, **kw)


def outputs(fn, leaves, views, dims, n, kw, g):
    out = fn(*views, dims, n, **kw)
    return [out.double(), *(x.double() for x in torch.autograd.grad(out, leaves, g.to(out.dtype)))]


CASES = [
    # dims, n, B, H, Hkv, d, layout, causal, coverage, rope, mask
    ((64, 64), 4096, 1, 4, 4, 128, "bhnd", True, "full", False, False),
    ((64, 64), 4096, 1, 4, 4, 128, "bnhd", False, "full", True, False),
    ((16, 16, 16), 4000, 2, 8, 2, 64, "bnhd", True, "full", True, True),
    ((32, 16, 8), 4096, 1, 4, 1, 128, "bhnd", True, "axial", False, False),
    ((128, 40), 5000, 1, 2, 2, 256, "bhnd", True, "full", True, False),
    ((8, 8, 8, 8), 4096, 1, 2, 1, 32, "bhnd", True, "full", False, True),
    ((200, 30), 6000, 1, 2, 2, 96, "bnhd", False, "full", False, True),
]


PARAMS = [(c, dt) for c in CASES for dt in (torch.bfloat16, torch.float16)] + [
    (c, torch.float32) for c in CASES[::3]
]


def _id(x):
    return (
        str(x).replace("torch.", "")
        if isinstance(x, torch.dtype)
        else "x".join(map(str, x[0])) + f"-d{x[5]}"
    )


@pytest.mark.parametrize("case,dtype", PARAMS, ids=_id)
def test_gpu_matches_float64_reference(case, dtype):
    """The default path (the config table on the H200, autotuned configs elsewhere)."""
    check_gpu(case, dtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_hop_gates_match_float64(case, dtype):
    check_gpu(case, dtype, gates=True)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=_id)
def test_gpu_autotuned_path_matches_float64(case, monkeypatch):
    """triton.autotune (the default on GPUs the table was not tuned on) picks a config and stays correct."""
    from seqtensor.kernels import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    check_gpu(case, torch.bfloat16)
    assert any(
        tuner.cache for (direction, _), tuner in tuning.TUNERS.items() if direction == "bwd"
    )  # it tuned


def test_gpu_every_autotune_candidate_matches_float64(monkeypatch):
    """Each block and warp count the autotuner may pick, on a multi-block and a one-block hop."""
    from seqtensor.kernels import tuning

    case = ((41, 100), 4100, 1, 4, 2, 128, "bnhd", True, "full", True, True)
    args, kw = {"NJ": 100}, {"D1": 64, "D2": 64, "NDV": 128}
    fwd = tuning.fwd_candidates(None, args, **kw)
    bwd = tuning.bwd_candidates(None, args, SINGLE=False, **kw)
    for i in range(max(len(fwd), len(bwd))):
        f, b = fwd[i % len(fwd)], bwd[i % len(bwd)]
        override = dict(
            block_m=f.kwargs["BLOCK_M"],
            block_n=f.kwargs["BLOCK_N"],
            num_warps=f.num_warps,
            num_stages=f.num_stages,
            block=b.kwargs["BLOCK"],
            bwd_warps=b.num_warps,
        )
        monkeypatch.setattr(tuning, "CONFIG_OVERRIDE", override)
        check_gpu(case, torch.bfloat16)


def check_gpu(case, dtype, gates=False):
    from seqtensor.kernels import triton_hops as T

    dims, n, B, H, Hkv, d, layout, causal, coverage, rope, mask = case
    gen = torch.Generator(device="cuda").manual_seed(0)

    def leaf(heads):
        if layout == "bnhd":
            x = (
                torch.randn(B, n, heads * d, device="cuda", generator=gen)
                .to(dtype)
                .requires_grad_()
            )
            return x, x.view(B, n, heads, d).transpose(1, 2)
        x = torch.randn(B, heads, n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
        return x, x

    leaves, views = zip(leaf(H), leaf(Hkv), leaf(Hkv))
    kpm = torch.rand(B, n, device="cuda", generator=gen) > 0.2 if mask else None
    kw = dict(
        causal=causal,
        coverage=coverage,
        hop_order=None,
        scale=None,
        hop_positional=TensorRoPE(d).cuda() if rope else None,
        key_padding_mask=kpm,
    )
    g = torch.randn(B, H, n, d, device="cuda", generator=gen, dtype=f64)
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    v64 = [x.view(B, n, -1, d).transpose(1, 2) if layout == "bnhd" else x for x in l64]
    kw64 = kw
    if gates:  # learned hop gates: their gradient is checked too
        gate = torch.rand(H, len(dims) - 1, device="cuda", generator=gen)
        low, high = gate.to(dtype).requires_grad_(), gate.double().requires_grad_()
        leaves, l64, kw, kw64 = (
            (*leaves, low),
            [*l64, high],
            {**kw, "hop_gates": low},
            {**kw, "hop_gates": high},
        )
    T.POISON = True
    try:
        got = outputs(T.tensorized_fibre_attention, leaves, views, dims, n, kw, g)
    finally:
        T.POISON = False
    want = outputs(R.fibre_attention_reference, l64, v64, dims, n, kw64, g)
    base_fn = R.fibre_attention_reference if dtype == torch.float32 else eager_same_precision
    base = outputs(base_fn, leaves, views, dims, n, kw, g)
    for name, x, y, z in zip(("out", "dq", "dk", "dv", "dgates"), got, want, base):
        assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) elements"
        err, err_base = (x - y).norm().item(), (z - y).norm().item()
        tol = 2 * err_base + 1e-6 * y.norm().item()
        if (
            name == "dgates"
        ):  # one sum of B * n * dv products of rounded states per gate: one unit of the dtype's eps
            tol += torch.finfo(dtype).eps * y.norm().item()
        rel = err / max(y.norm().item(), 1e-30)
        ratio = err / max(err_base, 1e-30)
        print(
            f"{'x'.join(map(str, dims))} {dtype} {name}: rel err {rel:.2e}, ratio to PyTorch {ratio:.2f}"
        )
        assert err <= tol, f"{name}: error {err:.3e} > 2 x same-precision PyTorch {err_base:.3e}"


@pytest.mark.parametrize("gates", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize(
    "config", [{}, {"tile": 1024, "split_chunks": 1}], ids=["default", "many_splits"]
)
@pytest.mark.parametrize("top_int8", [False, True], ids=["native", "int8"])
@pytest.mark.parametrize("coverage", ["full", "axial"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_kernel_matches_float64(dtype, coverage, top_int8, config, gates, monkeypatch):
    """The decode kernels (seqtensor.kernels.decode) at a Llama-like shape, several steps.

    Same rule: its error is at most twice the PyTorch step's error in the same dtype, both against
    the float64 PyTorch step (all three with an int8 top level in the int8 cases). The kernel gets V
    without the rows the text adapter drops. ``many_splits``: 4-position chunks, one per program,
    so every hop is split over several programs.
    """
    from seqtensor.kernels import decode

    monkeypatch.setattr(decode, "CONFIG_OVERRIDE", config)
    from seqtensor.adapters.text import cache as text_cache
    from seqtensor.adapters.text.cache import CausalFold, LayerCache, block_levels

    fold, B, H, Hkv, d, n0, steps = CausalFold((16, 16, 32)), 2, 8, 2, 128, 3000, 6
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, h, n0 + steps, d, device="cuda", dtype=f64, generator=g)
        for h in (H, Hkv, Hkv)
    )
    rope = TensorRoPE(d, base=10000.0).cuda()
    kw = dict(coverage=coverage, positional=rope, scale=d**-0.5)
    hop_gates = torch.rand(H, 2, device="cuda", dtype=f64, generator=g) if gates else None

    def state(dt):
        levels = block_levels(
            q[:, :, :n0].to(dt),
            k[:, :, :n0].to(dt),
            v[:, :, :n0].to(dt),
            fold,
            backend="reference",
            hop_gates=hop_gates,
            **kw,
        )
        return LayerCache(
            fold,
            length=torch.full((B,), n0, device="cuda"),
            offset=torch.zeros(B, dtype=torch.long, device="cuda"),
            levels=levels,
            stored=n0,
            top_int8=top_int8,
            hop_gates=hop_gates,
            **kw,
        )

    exact, fused, eager = state(f64), state(dtype), state(dtype)
    calls = []
    real = text_cache.LayerCache._step_kernel
    text_cache.LayerCache._step_kernel = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        for s in range(steps):
            t = n0 + s + 1
            want = exact.step(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], kernel=False)
            args = [x.to(dtype) for x in (q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t])]
            fused.v_start = fused.values_needed_from()  # V trimmed as the text adapter keeps it
            err_fused = (
                (fused.step(*args[:2], args[2][:, :, fused.v_start :]).double() - want)
                .abs()
                .max()
                .item()
            )
            err_eager = (eager.step(*args, kernel=False).double() - want).abs().max().item()
            assert err_fused <= 2 * err_eager + 1e-6, (s, err_fused, err_eager)
    finally:
        text_cache.LayerCache._step_kernel = real
    assert len(calls) == steps  # every step went through the kernel


@pytest.mark.parametrize("dims", [(24,), (4, 6), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_nan_in_gives_nan_out(dims, dtype):
    """Compiled kernels (whose max skips NaN, unlike the interpreter's) keep NaN: a NaN query row
    gives NaN exactly where the reference does, and a NaN scale gives NaN everywhere."""
    from seqtensor import tensorized_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 64, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    q[0, 0, 5] = float("nan")
    for causal in (False, True):
        got = tensorized_attention(q, k, v, dims, causal=causal, backend="triton")
        want = tensorized_attention(
            q.float(), k.float(), v.float(), dims, causal=causal, backend="reference"
        )
        assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    out = tensorized_attention(q, k, v, dims, causal=True, scale=float("nan"), backend="triton")
    assert out.isnan().all()
