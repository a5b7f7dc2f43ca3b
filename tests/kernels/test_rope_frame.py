"""tensor_rope in one frame: the rotation kernels (``rotate_for_hop``, ``rotate_to_frame``), the
frame positions, and the hop kernels that run tensor_rope in that frame.

Oracles: ``TensorRoPE.hop`` in PyTorch at the hop's fibre coordinates (rotation kernels and the
per-hop scores the frame must reproduce), the fold's coordinates by ``meshgrid`` (frame
positions), and the float64 reference (``fibre_attention_reference``) for forward and gradients.
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


def check_kernels(dims, n, H, Hkv, d, dtype, device, causal=True, mask=False):
    """Output and gradients within twice plain PyTorch's error (the reference run in ``dtype``) of
    the float64 reference; every element written."""
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
    got = outputs(T.tensorized_fibre_attention, *low, dims, n, kw, grad)
    eps = torch.finfo(dtype).eps
    for name, x, y, z in zip(("out", "dq", "dk", "dv"), got, want, base):
        assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) elements"
        err = (x.double() - y).abs().max().item()
        err_base = (z.double() - y).abs().max().item()
        tol = 2 * err_base + 10 * eps * max(1.0, y.abs().max().item())
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"


def coordinates(dims) -> torch.Tensor:
    """(N, m) fold coordinates of every token, row-major (the last dim finest)."""
    grids = torch.meshgrid(*(torch.arange(x) for x in dims), indexing="ij")
    return torch.stack(grids, -1).reshape(math.prod(dims), len(dims))


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
def test_frame_kernels_match_reference(_poison, dims, n, H, Hkv, dtype, causal, mask):
    check_kernels(dims, n, H, Hkv, 16, dtype, "cpu", causal=causal, mask=mask)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dims,n,Hkv,dtype",
    [((4, 5), 20, 1, f64), ((2, 3, 4), 24, 2, torch.float32), ((2, 20), 37, 1, f64)],
)
def test_forward_alone_and_training_forward_match_reference(_poison, dims, n, Hkv, dtype):
    """A forward without autograd rotates rows as the kernels load them; one that will be
    differentiated runs in the frame. Both equal the reference's tensor_rope output."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, n, 16, generator=g, dtype=f64).to(dtype)
    k, v = torch.randn(2, 1, Hkv, n, 16, generator=g, dtype=f64).to(dtype)
    kw = dict(causal=True, hop_positional=TensorRoPE(16))
    want = R.fibre_attention_reference(q.double(), k.double(), v.double(), dims, n, **kw)
    with torch.no_grad():
        alone = T.tensorized_fibre_attention(q, k, v, dims, n, **kw)
    training = T.tensorized_fibre_attention(q.requires_grad_(), k, v, dims, n, **kw)
    tol = 10 * torch.finfo(dtype).eps
    for got in (alone, training):
        torch.testing.assert_close(got.detach().double(), want, rtol=tol, atol=tol)


def test_hop_positions_are_the_plans_coordinates():
    """The coordinate (t // S) % nj of a token is its index along the hop's dim in the plan."""
    dims = (3, 4, 5)
    n = math.prod(dims)
    coords = coordinates(dims)
    for hop in hop_plan(dims, n).hops:
        assert torch.equal(hop_positions(n, hop.nj, hop.S), coords[:, hop.dim])


@pytest.mark.parametrize("dims,order", [((3, 4, 5), None), ((2, 3, 2, 4), None), ((4, 3), (0, 1))])
def test_frame_positions_are_coordinate_sums(dims, order):
    n = math.prod(dims)
    plan = hop_plan(
        dims,
        n,
        causal=order is None,
        coverage="full" if order is None else "axial",
        hop_order=order,
    )
    pos = T.frame_positions(plan, "cpu")
    assert pos.dtype == torch.int32 and torch.equal(pos.long(), coordinates(dims).sum(1))
    assert T.frame_positions(plan, "cpu") is pos  # cached


@pytest.mark.parametrize("dims", [(3, 4, 5), (2, 3, 2, 4), (6, 7)])
def test_one_frame_gives_every_hops_tensor_rope_scores(dims):
    """The identity the kernels rely on, in float64 PyTorch: q and k rotated once by the frame
    position score every fibre pair of every hop as tensor_rope at that hop's coordinates, and a
    query turned by Pos[S - 1] - Pos[s] scores each summary key (p, c, S - 1) as tensor_rope with
    the key at its block coordinate c."""
    n, d = math.prod(dims), 8
    rope = TensorRoPE(d)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, n, d, generator=g, dtype=f64)
    coords = coordinates(dims)
    plan = hop_plan(dims, n, causal=True)
    pos = T.frame_positions(plan, "cpu").long()
    qf, kf = rope.hop(q, pos), rope.hop(k, pos)
    frame = qf @ kf.T
    summaries = 0
    for hop in plan.hops:
        c = coords[:, hop.dim]
        want = rope.hop(q, c) @ rope.hop(k, c).T
        # token pairs of one fibre: every coordinate equal but this hop's
        others = [j for j in range(len(dims)) if j != hop.dim]
        same = (coords[:, None, others] == coords[None, :, others]).all(-1)
        assert torch.allclose(frame[same], want[same], rtol=0, atol=1e-10)
        if not hop.summary:
            continue
        S = hop.S
        for t in range(n):
            s = t % S
            turned = rope.hop(qf[t : t + 1], (pos[S - 1] - pos[s]).view(1))
            block = t // (hop.nj * S)  # the fibre group p
            keys = torch.arange(hop.nj) * S + block * hop.nj * S + S - 1
            got = turned @ kf[keys].T
            want_s = (
                rope.hop(q[t : t + 1], c[t].view(1)) @ rope.hop(k[keys], torch.arange(hop.nj)).T
            )
            assert torch.allclose(got, want_s, rtol=0, atol=1e-10)
            summaries += 1
    assert summaries > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
def test_rotate_to_frame_matches_tensor_rope(_poison, dtype):
    dims = (3, 4, 5)
    n, d = math.prod(dims), 16
    rope = TensorRoPE(d)
    x = torch.randn(2, 3, n, d, generator=torch.Generator().manual_seed(2), dtype=f64).to(dtype)
    pos = T.frame_positions(hop_plan(dims, n), "cpu")
    table = rope.rotation_table(sum(dims), T._table_dtype(dtype), "cpu")
    got = T.rotate_to_frame(x, table, pos)
    want = rope.hop(x.double(), pos.long()).to(dtype)
    err = (got.double() - want.double()).abs().max().item()
    assert got.dtype == dtype and err <= 4 * torch.finfo(dtype).eps * x.abs().max().item(), err


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
def test_gpu_frame_kernels_match_reference(dims, n, H, Hkv, d, mask):
    check_kernels(dims, n, H, Hkv, d, torch.bfloat16, "cuda", mask=mask)
