"""The retrieval hop on the block-sparse Triton kernels (what a GPU runs for shared selections)
against the reference hop in float64: outputs, gradients, the last queries of a sequence and a
decode state's steps. Under the interpreter the kernel path is chosen by patching
``use_kernels`` (it is chosen by device on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqtensor.adapters.text import retrieval as R  # noqa: E402

f64 = torch.float64

# (H, Hkv, T, Lq, d, local, block, chunk, top_k, sinks, sliding, representative, anchor, theta)
CASES = [
    (2, 1, 96, None, 16, 32, 8, 16, 2, 4, False, "bound", "window", 100.0),
    (4, 2, 80, None, 16, 16, 8, 16, 3, 0, True, "mean", "query", None),
    (2, 2, 100, None, 16, 32, 16, 32, 1, 5, False, "bound", "query", 50.0),
    (2, 1, 64, None, 8, 16, 4, 16, 16, 3, False, "mean", "window", 10.0),  # every block fits
]


def _id(c):
    return f"G{c[0] // c[1]}-T{c[2]}-Lq{c[3]}-c{c[7]}-k{c[8]}-{c[11]}-{'slide' if c[10] else 'al'}"


def _inputs(H, Hkv, T, Lq, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, H, Lq, d), (1, Hkv, T, d), (1, Hkv, T, d))
    return [torch.randn(s, generator=g, dtype=f64) for s in shapes]


def _hop(inputs, kw, grad):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = R.retrieval_attention(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.double(), *(x.double() for x in grads)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_hop_matches_the_reference_hop(case, monkeypatch):
    H, Hkv, T, Lq, d, local, block, chunk, top_k, sinks, sliding, rep, anchor, theta = case
    Lq = T if Lq is None else Lq
    inputs = _inputs(H, Hkv, T, Lq, d)
    kw = dict(local=local, block=block, top_k=top_k, sinks=sinks, sliding=sliding, chunk=chunk)
    kw.update(shared=True, representative=rep, memory_anchor=anchor, rope_theta=theta)
    grad = torch.randn(1, H, Lq, d, generator=torch.Generator().manual_seed(1), dtype=f64)
    want = _hop(inputs, kw, grad)  # float64 reference (use_kernels is False on CPU)
    assert not R.use_kernels(inputs[0], R._options(**kw, scale=None, memory_distance=None))
    monkeypatch.setattr(R, "use_kernels", lambda q, opts: True)
    got = _hop([x.float() for x in inputs], kw, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a - b).abs().max().item()
        assert err <= 2e-4 * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.interpreter
def test_kernel_decode_steps_match_the_whole_sequence_call(monkeypatch):
    """Prefill then decode on the kernel path gives the reference's whole-sequence outputs: one-token
    steps that reuse their chunk's selection across three chunk boundaries, a three-token step in
    between (the general path, which needs the deferred ranking queries), and a batch reordering."""
    monkeypatch.setattr(R, "use_kernels", lambda q, opts: True)
    T, P = 84, 30
    q, k, v = (torch.cat([x, x.flip(2)]) for x in _inputs(2, 1, T, T, 16, seed=3))  # batch of 2
    opts = R._options(32, 2, 8, 4, False, None, 100.0, None, chunk=16, shared=True)
    opts["representative"] = "bound"
    want = R.retrieval_attention(q, k, v, 32, top_k=2, block=8, sinks=4, rope_theta=100.0,
                                 chunk=16, shared=True, representative="bound")  # fmt: skip
    q, k, v = q.float(), k.float(), v.float()
    out, state = R.RetrievalState.prefill(q[:, :, :P], k[:, :, :P], v[:, :, :P], opts)
    outs, i = [out], P
    while i < T:
        L = 3 if i == 52 else 1
        outs.append(state.step(q[:, :, i : i + L], k[:, :, : i + L], v[:, :, : i + L]))
        i += L
        if i == 70:  # swap the rows, and the inputs with them
            state.select(torch.tensor([1, 0]))
            q, k, v, want = (x.flip(0) for x in (q, k, v, want))
            outs = [x.flip(0) for x in outs]
    got = torch.cat(outs, 2).double()
    assert (got - want).abs().max().item() <= 2e-4 * max(1.0, want.abs().max().item())


def test_the_reference_runs_where_the_kernels_do_not_apply():
    q = torch.zeros(1, 2, 32, 16)
    base = R._options(16, 1, 8, 0, False, None, None, None, chunk=16, shared=True)
    base["representative"] = "bound"
    assert not R.use_kernels(q, base)  # CPU tensors
    for change in ({"shared": False}, {"chunk": 8}, {"representative": "max"}):
        assert not R.use_kernels(q, {**base, **change})


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gpu_hop_runs_the_kernels_and_matches_the_reference(case):
    H, Hkv, T, Lq, d, local, block, chunk, top_k, sinks, sliding, rep, anchor, theta = case
    inputs = _inputs(H, Hkv, T, T, d)
    kw = dict(local=local, block=block, top_k=top_k, sinks=sinks, sliding=sliding, chunk=chunk)
    kw.update(shared=True, representative=rep, memory_anchor=anchor, rope_theta=theta)
    grad = torch.randn(1, H, T, d, generator=torch.Generator().manual_seed(1), dtype=f64)
    want = _hop(inputs, kw, grad)
    cuda = [x.cuda().float() for x in inputs]
    assert R.use_kernels(cuda[0], R._options(**kw, scale=None, memory_distance=None))
    got = _hop(cuda, kw, grad.cuda())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.cpu() - b).abs().max().item()
        assert err <= 2e-3 * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.gpu
def test_gpu_decode_steps_match_and_never_sync():
    """On the GPU, decode steps run the kernels, equal the whole-sequence reference, and make no
    host sync (a sync per layer would serialise the host's launches with the GPU's work)."""
    T, P = 200, 130
    q, k, v = _inputs(4, 1, T, T, 16, seed=4)
    kw = dict(top_k=2, block=8, sinks=4, rope_theta=100.0, chunk=16, shared=True)
    want = R.retrieval_attention(q, k, v, 32, sliding=True, representative="bound", **kw)
    opts = R._options(32, 2, 8, 4, True, None, 100.0, None, chunk=16, shared=True)
    opts["representative"] = "bound"
    q, k, v = (x.cuda().float() for x in (q, k, v))
    assert R.use_kernels(q, opts)
    out, state = R.RetrievalState.prefill(q[:, :, :P], k[:, :, :P], v[:, :, :P], opts)
    state.step(q[:, :, P : P + 1], k[:, :, : P + 1], v[:, :, : P + 1])  # compile outside the check
    torch.cuda.synchronize()
    steps = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(P + 1, T):
            steps.append(state.step(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = torch.cat(steps, 2).double().cpu()
    ref = want[:, :, P + 1 :]
    assert (got - ref).abs().max().item() <= 2e-3 * max(1.0, ref.abs().max().item())
