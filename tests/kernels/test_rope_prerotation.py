"""tensor_rope pre-rotation (``triton_hops.rotate_for_hop``) and the hop kernels with it on and off.

Oracles: ``TensorRoPE.hop`` in PyTorch at the hop's fibre coordinates for the rotation kernel; the
float64 reference (``fibre_attention_reference``) for forward and gradients on either path.
Interpreter cases are tiny (16-row blocks); GPU cases are bf16 at realistic sizes.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from seqtensor.core.plan import hop_plan  # noqa: E402
from seqtensor.core.positional import TensorRoPE  # noqa: E402
from seqtensor.kernels import reference as R  # noqa: E402
from seqtensor.kernels import triton_hops as T  # noqa: E402
from seqtensor.kernels.tuning import MAX_BLOCK  # noqa: E402

f64 = torch.float64
# (PREROTATE_BACKWARD, PREROTATE_FORWARD_KEYS): on load, q and k / q only pre-rotated, with keys
PATHS = [(False, False), (True, False), ("q", False), (True, True), (False, True)]


def hop_positions(n: int, nj: int, S: int, device=None) -> torch.Tensor:
    """Fibre coordinate of each token for a hop viewing tokens as (P, nj, S)."""
    return (torch.arange(n, device=device) // S) % nj


def check_rotation(B, H, n, d, nj, S, dtype, device, layout):
    rope = TensorRoPE(d).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    if layout == "bnhd":  # heads-inner view of a (B, n, H * d) projection
        x = torch.randn(B, n, H * d, generator=g, device=device, dtype=f64).to(dtype)
        x = x.view(B, n, H, d).transpose(1, 2)
    else:
        x = torch.randn(B, H, n, d, generator=g, device=device, dtype=f64).to(dtype)
    table = rope.rotation_table(nj + MAX_BLOCK, T._table_dtype(dtype), device)
    got = T.rotate_for_hop(x, table, nj, S)
    want = rope.hop(x.double(), hop_positions(n, nj, S, device)).to(dtype)
    # one rounding to dtype on each side, plus the table's (fp16 for bf16) on ours
    eps = torch.finfo(dtype).eps
    assert got.shape == x.shape and got.dtype == dtype
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 4 * eps * x.abs().max().item(), err
    # into a strided buffer: every row of every head written, nothing else
    out = torch.full((B, n, H, d), float("nan"), dtype=dtype, device=device).transpose(1, 2)
    T.rotate_for_hop(x, table, nj, S, out)
    assert torch.equal(out, got)


def outputs(fn, q, k, v, dims, n, kw, grad):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, dims, n, **kw)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def check_paths(monkeypatch, dims, n, H, Hkv, d, dtype, device, causal=True, mask=False):
    """Each path's output and gradients are within twice plain PyTorch's error of the float64
    reference; under the interpreter the four paths also agree exactly (they round the rotated rows
    identically; compiled kernels may contract the rotation into FMAs differently)."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, H, n, d, generator=g, device=device, dtype=f64)
    k = torch.randn(1, Hkv, n, d, generator=g, device=device, dtype=f64)
    v = torch.randn(1, Hkv, n, d, generator=g, device=device, dtype=f64)
    grad = torch.randn(1, H, n, d, generator=g, device=device, dtype=f64)
    kpm = None
    if mask:
        kpm = torch.rand(1, n, generator=g, device=device) > 0.3
        kpm[:, 0] = True
    rope = TensorRoPE(d).to(device)
    kw = dict(causal=causal, hop_positional=rope, key_padding_mask=kpm)
    low = [x.to(dtype) for x in (q, k, v)]
    want = outputs(R.fibre_attention_reference, *(x.double() for x in low), dims, n, kw, grad)
    base = outputs(
        lambda *a, **k_: R.fibre_attention_reference(*a, compute_dtype=dtype, **k_),
        *low,
        dims,
        n,
        kw,
        grad,
    )
    results = []
    for bwd, fwd in PATHS:
        monkeypatch.setattr(T, "PREROTATE_BACKWARD", bwd)
        monkeypatch.setattr(T, "PREROTATE_FORWARD_KEYS", fwd)
        got = outputs(T.tensorized_fibre_attention, *low, dims, n, kw, grad)
        eps = torch.finfo(dtype).eps
        for name, x, y, z in zip(("out", "dq", "dk", "dv"), got, want, base):
            assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) elements"
            err = (x.double() - y).abs().max().item()
            err_base = (z.double() - y).abs().max().item()
            tol = 2 * err_base + 10 * eps * max(1.0, y.abs().max().item())
            assert err <= tol, (
                f"{name} (pre-rotate bwd={bwd}, fwd keys={fwd}): {err:.3e} > {tol:.3e}"
            )
        results.append(got)
    if device == "cpu":
        for got in results[1:]:
            for x, y in zip(got, results[0]):
                assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# interpreter (CPU)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON", True)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nj,S", [(5, 1), (4, 3), (7, 6)])
def test_rotation_kernel_matches_tensor_rope(_poison, nj, S, dtype, layout):
    check_rotation(2, 2, 37, 16, nj, S, dtype, "cpu", layout)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dims,n,H,Hkv,dtype,causal,mask",
    [
        ((4, 5), 20, 2, 1, f64, True, False),
        ((2, 3, 4), 24, 2, 2, torch.float32, True, True),
        ((3, 2, 5), 27, 2, 1, f64, False, False),
        ((2, 20), 37, 1, 1, torch.float32, True, False),  # fibre of 20 > the 16-row block
    ],
)
def test_prerotated_paths_match_reference(
    _poison, monkeypatch, dims, n, H, Hkv, dtype, causal, mask
):
    check_paths(monkeypatch, dims, n, H, Hkv, 16, dtype, "cpu", causal=causal, mask=mask)


def test_hop_positions_are_the_plans_coordinates():
    """The coordinate (t // S) % nj of a token is its index along the hop's dim in the plan."""
    dims = (3, 4, 5)
    n = math.prod(dims)
    coords = torch.stack(torch.meshgrid(*(torch.arange(x) for x in dims), indexing="ij"), -1)
    coords = coords.reshape(n, len(dims))
    for hop in hop_plan(dims, n).hops:
        pos = hop_positions(n, hop.nj, hop.S)
        axis = [i for i, x in enumerate(dims) if x == hop.nj]
        assert any(torch.equal(pos, coords[:, a]) for a in axis)


# ----------------------------------------------------------------------------------------------
# GPU (compiled kernels, bf16)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("nj,S", [(32, 1), (64, 32), (64, 2048)])
def test_gpu_rotation_kernel_matches_tensor_rope(nj, S):
    check_rotation(
        1, 4, 8192 if S < 2048 else 2048 * 64, 128, nj, S, torch.bfloat16, "cuda", "bhnd"
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dims,n,H,Hkv,d,mask",
    [((16, 16, 16), 4000, 4, 2, 64, True), ((32, 16, 8), 4096, 2, 2, 128, False)],
)
def test_gpu_prerotated_paths_match_reference(monkeypatch, dims, n, H, Hkv, d, mask):
    check_paths(monkeypatch, dims, n, H, Hkv, d, torch.bfloat16, "cuda", mask=mask)
