"""Decode kernel (``kernels.decode``) against the PyTorch path of ``LayerCache.step``, on CPU
through Triton's interpreter.

Each case runs two identical caches side by side for several single-token steps, one through the
kernel and one through the PyTorch path (the oracle): outputs, rings and lengths must agree after
every step. Rows have different lengths and left padding (filled with NaN: a read of padding shows),
the output starts as NaN (``decode.POISON``), steps cross block borders (t % w == w - 1), the rings
wrap and the top level grows past its capacity.
"""

import pytest
import torch

pytest.importorskip("triton")

from seqtensor.adapters.text import cache as tc  # noqa: E402
from seqtensor.adapters.text.cache import CausalFold, LayerCache, block_levels  # noqa: E402
from seqtensor.core.positional import TensorRoPE  # noqa: E402
from seqtensor.kernels import decode  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(decode, "POISON", True)


f64 = torch.float64
pytestmark = pytest.mark.interpreter


class Case:
    """Compact sequences q (B, H, N, d), k, v (B, Hkv, N, d|dv) and a prefill of ``prefill[i]`` tokens per row."""

    def __init__(
        self,
        dims,
        *,
        coverage="full",
        rope=False,
        H=2,
        Hkv=1,
        d=8,
        dv=None,
        prefill=(9, 4),
        steps=10,
        dtype=f64,
        seed=0,
        gates=False,
    ):
        g = torch.Generator().manual_seed(seed)
        self.B, self.H, self.d, self.dv = len(prefill), H, d, dv or d
        self.prefill, self.steps, self.dtype = prefill, steps, dtype
        N = max(prefill) + steps
        self.q = torch.randn(self.B, H, N, d, generator=g, dtype=f64)
        self.k = torch.randn(self.B, Hkv, N, d, generator=g, dtype=f64)
        self.v = torch.randn(self.B, Hkv, N, self.dv, generator=g, dtype=f64)
        self.fold, self.coverage = CausalFold(dims), coverage
        self.positional = TensorRoPE(d) if rope else None
        self.scale = d**-0.5
        self.hop_gates = torch.rand(H, len(dims) - 1, generator=g, dtype=f64) if gates else None

    def state(self, dtype, *, top_room: int | None = None, top_int8: bool = False) -> LayerCache:
        """A cache after the prefill; ``top_room`` shrinks the top level so that it must grow soon."""
        p = max(self.prefill)
        q, k, v = (x[:, :, :p].to(dtype) for x in (self.q, self.k, self.v))
        levels = block_levels(
            q,
            k,
            v,
            self.fold,
            coverage=self.coverage,
            positional=self.positional,
            scale=self.scale,
            backend="reference",
            hop_gates=self.hop_gates,
        )
        length = torch.tensor(self.prefill)
        state = LayerCache(
            self.fold,
            coverage=self.coverage,
            positional=self.positional,
            scale=self.scale,
            length=length,
            offset=p - length,
            levels=levels,
            stored=p,
            top_int8=top_int8,
            hop_gates=self.hop_gates,
        )
        top = self.fold.order - 1
        if top_room is not None and top > 0:
            state.rings[top] = state.rings[top][:, :, : p + top_room].clone()
            if top_int8:
                state.top_scale = state.top_scale[:, :, : p + top_room].clone()
        return state

    def step_inputs(self, s: int, dtype):
        """Step s: the new queries (B, H, 1, d) as a (B, 1, H, d) view, and the left-padded K/V cache."""
        p = max(self.prefill)
        T = p + s + 1
        k = torch.full((self.B, self.k.shape[1], T, self.d), float("nan"), dtype=f64)
        v = torch.full((self.B, self.v.shape[1], T, self.dv), float("nan"), dtype=f64)
        q = torch.empty(self.B, 1, self.H, self.d, dtype=f64)
        for i, n in enumerate(self.prefill):
            off = p - n
            k[i, :, off:], v[i, :, off:] = self.k[i, :, : n + s + 1], self.v[i, :, : n + s + 1]
            q[i, 0] = self.q[i, :, n + s]
        return q.to(dtype).transpose(1, 2), k.to(dtype), v.to(dtype)


def run(case: Case, dtype, *, kernel: bool, top_room=None, trim_v=False, top_int8=False):
    """Outputs (steps, B, H, dv) and the states after each step (rings and lengths, cloned).

    trim_v: V without the rows before ``values_needed_from()``, as the text adapter keeps it.
    top_int8: the top level stored as int8 rows with fp32 scales.
    """
    state = case.state(dtype, top_room=top_room, top_int8=top_int8)
    outs, snaps = [], []
    for s in range(case.steps):
        q, k, v = case.step_inputs(s, dtype)
        if trim_v and state.values_needed_from() is not None:
            state.v_start = state.values_needed_from()
            v = v[:, :, state.v_start :]
        plan = None if kernel else state.plan(1, dtype)  # the shared-plan route of the text adapter
        outs.append(state.step(q, k, v, plan, kernel=kernel)[:, :, 0])
        rings = {h: r.clone() for h, r in state.rings.items()}
        if top_int8:
            rings["scale"] = state.top_scale.clone()
        snaps.append((rings, state.length.clone(), state.max_length))
    return torch.stack(outs), snaps


def check(case: Case, dtype=f64, *, top_room=None, top_int8=False):
    got, got_states = run(case, dtype, kernel=True, top_room=top_room, top_int8=top_int8)
    want, want_states = run(case, dtype, kernel=False, top_room=top_room, top_int8=top_int8)
    assert torch.isfinite(got).all(), "unwritten or NaN output elements"
    if dtype == f64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        ring_tol = dict(atol=1e-12, rtol=0)
    else:  # at most twice the error the PyTorch path makes in the same precision (float64 oracle)
        ref, _ = run(case, f64, kernel=False, top_room=top_room)
        err, err_base = (
            (got.double() - ref).abs().max().item(),
            (want.double() - ref).abs().max().item(),
        )
        eps = torch.finfo(dtype).eps
        assert err <= 2 * err_base + 10 * eps, f"error {err:.3e} > 2 x PyTorch's {err_base:.3e}"
        ring_tol = dict(atol=4 * eps, rtol=4 * eps)
    for (rings, length, max_length), (rings_w, length_w, max_w) in zip(got_states, want_states):
        assert torch.equal(length, length_w) and max_length == max_w
        assert rings.keys() == rings_w.keys()
        for hop in rings:
            assert rings[hop].shape == rings_w[hop].shape
            if rings[hop].dtype == torch.int8:  # both paths quantize in fp32: the same bytes
                assert torch.equal(rings[hop], rings_w[hop])
            else:
                torch.testing.assert_close(rings[hop], rings_w[hop], **ring_tol)


# ----------------------------------------------------------------------------------------------
# sweep: fold orders 1-3 and odd dims, both coverages, GQA 1/2/4, with and without tensor RoPE
# ----------------------------------------------------------------------------------------------

DIMS = [(4,), (3, 4), (2, 3, 4), (3, 5)]
GQA = [(2, 2), (4, 2), (4, 1)]  # (H, Hkv): G = 1, 2, 4


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("coverage", ["full", "axial"])
@pytest.mark.parametrize("dims", DIMS, ids=["x".join(map(str, d)) for d in DIMS])
def test_kernel_equals_pytorch_path(dims, coverage, rope):
    H, Hkv = GQA[(DIMS.index(dims) + rope) % len(GQA)]
    # 9 and 4 prefilled tokens, 14 steps: t crosses w - 1 borders of every hop, rings wrap
    check(
        Case(
            dims,
            coverage=coverage,
            rope=rope,
            H=H,
            Hkv=Hkv,
            prefill=(9, 4),
            steps=14,
            seed=len(dims),
        )
    )


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("dims", [(2, 3, 4), (5,)], ids=["2x3x4", "order1"])
def test_trimmed_values_give_the_same_steps(dims, kernel):
    """Dropping V rows before ``values_needed_from`` (the text adapter does) changes no output."""
    case = Case(dims, rope=True, H=4, Hkv=2, prefill=(11, 23), steps=10)
    want, _ = run(case, f64, kernel=False)
    got, _ = run(case, f64, kernel=kernel, trim_v=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    state = case.state(f64)
    assert state.values_needed_from() == (None if len(dims) == 1 else max(case.prefill) - 3)
    state.v_start = (
        2  # V must then come without its first 2 positions: a full V is refused, not misread
    )
    with pytest.raises(ValueError, match="value cache holds"):
        state.step(*case.step_inputs(0, f64), kernel=kernel)


@pytest.mark.parametrize("dims", [(2, 3, 4), (3, 5)], ids=["2x3x4", "3x5"])
def test_int8_top_level_kernel_equals_pytorch_path(dims):
    """Both paths store the same int8 bytes and scales and give the same outputs; the top level
    grows past its capacity during the steps."""
    check(Case(dims, rope=True, H=4, Hkv=2, prefill=(11, 23), steps=10), top_room=4, top_int8=True)


def test_split_hops_with_int8_top_level_and_trimmed_values(monkeypatch):
    """Hops split over programs (GPU layout) with the int8 top level and with V trimmed."""
    monkeypatch.setattr(decode, "CONFIG_OVERRIDE", {"heads": 1, "tile": 16, "split_chunks": 1})
    case = Case((2, 3, 4), rope=True, H=4, Hkv=2, prefill=(11, 23), steps=10)
    check(case, top_room=4, top_int8=True)
    want, _ = run(case, f64, kernel=False)
    got, _ = run(case, f64, kernel=True, trim_v=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_int8_top_level_is_close_to_exact():
    """int8 rows with a per-row scale: outputs within ~1% of the exact cache's."""
    case = Case((2, 3, 4), rope=True, H=4, Hkv=2, prefill=(11, 23), steps=10)
    exact, _ = run(case, f64, kernel=False)
    approx, _ = run(case, f64, kernel=False, top_int8=True)
    err = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < err < 1e-2, err
    previous = torch.get_default_dtype()
    torch.set_default_dtype(f64)
    try:  # the scales stay fp32 whatever the default dtype (the kernel stores fp32)
        assert case.state(f64, top_int8=True).top_scale.dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
    q, scale = tc.quantize_rows(case.v[:, :, :5])
    assert q.dtype == torch.int8 and q.abs().max() == 127  # every row uses the full range
    torch.testing.assert_close(
        tc.dequantize_rows(q, scale), case.v[:, :, :5].float(), atol=scale.max().item() / 2, rtol=0
    )


@pytest.mark.parametrize("H,Hkv", GQA)
def test_gqa_ratios(H, Hkv):
    check(Case((2, 3, 4), rope=True, H=H, Hkv=Hkv, prefill=(11, 23), steps=6))


def test_top_level_grows_during_kernel_steps():
    check(Case((2, 3), rope=True, H=2, Hkv=1, prefill=(5, 8), steps=12), top_room=3)


def test_order_four_and_long_top_hop():
    # the top hop spans 3 * 2 * 2 * 2 = 24 tokens: several b positions, block borders of every hop
    check(Case((3, 2, 2, 2), H=2, Hkv=1, prefill=(20, 13), steps=8))


def test_rope_table_rows_in_chunks_of_a_long_top_hop():
    """A top hop of ~80 positions with RoPE: chunks capped at the rotation table's 64 rows, so keys
    64+ positions before the query are rotated from a chunk start other than 0 (angle-sum rule)."""
    check(Case((2, 2), rope=True, H=2, Hkv=1, prefill=(150, 137), steps=12))


def test_odd_head_dims_and_value_dim():
    check(Case((3, 4), H=2, Hkv=1, d=5, dv=7, prefill=(6, 3), steps=6))
    check(Case((3, 4), rope=True, H=2, Hkv=2, d=6, dv=3, prefill=(6, 3), steps=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lower_precision(dtype):
    check(Case((2, 3, 4), rope=True, H=4, Hkv=2, d=16, prefill=(13, 7), steps=6), dtype)


@pytest.mark.parametrize("split_chunks", [0, 1, 2])
def test_gpu_config_one_head_per_program_and_chunked_hops(monkeypatch, split_chunks):
    """The GPU layout (one head per program), with tiles so small that every hop loops over chunks,
    and hops split over programs (1-2 chunks each; splits left empty for short hops)."""
    monkeypatch.setattr(
        decode, "CONFIG_OVERRIDE", {"heads": 1, "tile": 16, "split_chunks": split_chunks}
    )
    check(Case((3, 5), rope=True, H=4, Hkv=2, prefill=(14, 9), steps=8))
    check(Case((2, 3, 4), coverage="axial", H=2, Hkv=2, prefill=(17, 12), steps=4))
    check(Case((6,), H=2, Hkv=1, prefill=(5, 2), steps=5))


@pytest.mark.parametrize("gates", [False, True], ids=["plain", "gated"])
def test_equals_whole_sequence_reference(gates):
    """Kernel steps after a prefill equal tensorized attention over the whole sequence."""
    from seqtensor import tensorized_attention

    case = Case((2, 3, 4), rope=True, H=4, Hkv=2, prefill=(10, 10), steps=9, gates=gates)
    got, _ = run(case, f64, kernel=True)
    n = 19
    q, k, v = (x[:, :, :n] for x in (case.q, case.k, case.v))
    ref = tensorized_attention(
        q,
        k,
        v,
        case.fold.for_length(n),
        causal=True,
        positional=case.positional,
        scale=case.scale,
        backend="reference",
        hop_gates=case.hop_gates,
    )
    torch.testing.assert_close(got.permute(1, 2, 0, 3), ref[:, :, 10:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("top_int8", [False, True], ids=["native", "int8"])
@pytest.mark.parametrize(
    "dims,coverage", [((3, 4), "full"), ((2, 3, 4), "axial"), ((2, 2, 3, 2), "full")]
)
def test_hop_gates_kernel_equals_pytorch_path(dims, coverage, top_int8):
    check(Case(dims, coverage=coverage, rope=True, H=4, Hkv=2, gates=True), top_int8=top_int8)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def test_one_kernel_call_per_step_and_no_plan_built(monkeypatch):
    calls = []
    real = decode.decode_step
    monkeypatch.setattr(decode, "decode_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = Case((3, 4), rope=True, prefill=(5, 5), steps=3)
    state = case.state(f64)
    for s in range(case.steps):
        plan = state.plan(1, f64)
        state.step(*case.step_inputs(s, f64), plan)
        assert plan._hops is None  # the kernel computes its own indices: the plan is never built
    assert len(calls) == case.steps


def test_decode_step_refuses_a_top_ring_without_room():
    """The caller must leave a top-level slot for the new token; without one the kernel would write
    past the ring, so the launcher checks it."""
    case = Case((2, 3, 4), rope=True, prefill=(9, 9), steps=1)
    state = case.state(f64)
    q, k, v = case.step_inputs(0, f64)
    consts = decode.decode_constants(state.scale, state.positional.inv_freq, f64, q.device)
    rings = [state.rings[1], state.rings[2][:, :, :9].clone()]
    with pytest.raises(ValueError, match="top ring has 9 slots"):
        decode.decode_step(
            q,
            k,
            v,
            rings,
            state.length,
            state.offset,
            case.fold.dims,
            consts,
            summary=True,
            rope=True,
            max_length=9,
        )


def test_pytorch_path_when_disabled_or_unsupported(monkeypatch):
    monkeypatch.setattr(decode, "decode_step", lambda *a, **kw: pytest.fail("kernel called"))
    case = Case((3, 4), prefill=(5, 5), steps=1)
    q, k, v = case.step_inputs(0, f64)
    case.state(f64).step(q, k, v, kernel=False)
    monkeypatch.setattr(tc, "DECODE_KERNEL", False)
    case.state(f64).step(q, k, v)
    monkeypatch.setattr(tc, "DECODE_KERNEL", True)
    state = case.state(f64)
    state.positional = type(
        "Hop", (), {"hop": lambda self, x, pos: x}
    )()  # a per-hop scheme without inv_freq
    assert decode.fallback_reason(q, k, v, state.positional) is not None
    state.step(q, k, v)
    # gradients needed: the kernel has no backward
    out = case.state(f64).step(q.clone().requires_grad_(), k, v)
    assert out.requires_grad
    # several new tokens: the PyTorch path
    case2 = Case((3, 4), prefill=(5, 5), steps=2)
    q2 = torch.cat([case2.step_inputs(s, f64)[0] for s in range(2)], 2)
    _, k2, v2 = case2.step_inputs(1, f64)
    case2.state(f64).step(q2, k2, v2)
