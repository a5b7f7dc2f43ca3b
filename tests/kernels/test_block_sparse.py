"""Block-sparse retrieval kernels (``kernels.block_sparse``) against their oracles.

Interpreter tests (TRITON_INTERPRET=1, CPU): forward and q, k, v gradients equal the float64 dense
masked-softmax reference (``block_sparse_reference``) over a sweep of block sizes, GQA groups, RoPE,
sinks, window rules and selections; with every earlier block selected the hop is exact causal
attention (brute force); the selection never names a block at or after a chunk's window (and the
whole pipeline never reads future tokens); bad input raises. Every buffer the kernels write starts
as NaN (``POISON``). GPU tests: bf16 at larger sizes.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from seqtensor.kernels import block_sparse as BS  # noqa: E402
from seqtensor.kernels import block_sparse_reference as R  # noqa: E402

f64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(BS, "POISON", True)


def _inputs(B, H, Hkv, T, d, dtype, *, Lq=None, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    Lq = T if Lq is None else Lq
    shapes = ((B, H, Lq, d), (B, Hkv, T, d), (B, Hkv, T, d))
    return [torch.randn(s, generator=g, dtype=f64, device=device).to(dtype) for s in shapes]


def random_selection(B, Hkv, Lq, T, kk, *, block, chunk, local, sliding, seed=0, device="cpu"):
    """Valid random selections: distinct blocks wholly before the window start of each chunk's
    first token, -1 padding at random slots."""
    g = torch.Generator().manual_seed(seed)
    C = BS.selection_rows(Lq, T, chunk)
    first = BS.chunk_starts(Lq, T, chunk, local, block, sliding, "cpu")
    sel = torch.full((B, Hkv, C, kk), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(Hkv):
            for c in range(C):
                usable = int(first[c]) // block
                pick = torch.randperm(usable, generator=g)[: min(kk, usable)]
                slots = torch.randperm(kk, generator=g)[: len(pick)]
                sel[b, h, c, slots] = pick
    return sel.to(device)


def outputs(fn, inputs, sel, grad_seed=1, **kw):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves, sel, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=f64)
    grads = torch.autograd.grad(out, leaves, g.to(out.device, out.dtype))
    return [out.double(), *(x.double() for x in grads)]


def assert_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"


# (B, H, Hkv, T, Lq, d, block, chunk, local, sliding, sinks, rope, kk)
CASES = [
    (1, 2, 1, 80, None, 16, 8, 16, 32, False, 4, 100.0, 3),  # G=2, RoPE, sinks
    (1, 4, 1, 70, None, 16, 16, 16, 32, False, 0, None, 2),  # G=4, T not a multiple of block
    (1, 1, 1, 75, None, 32, 8, 16, 16, True, 5, 50.0, 4),  # sliding, d=32
    (1, 2, 2, 64, None, 16, 4, 32, 16, False, 3, None, 16),  # top_k >= every earlier block
    (1, 2, 1, 90, 20, 16, 24, 16, 48, True, 10, 100.0, 2),  # last Lq queries; block 24
    (1, 2, 1, 60, 3, 16, 8, 16, 16, False, 3, 100.0, 3),  # a few last queries (decode-like)
    (1, 2, 2, 48, None, 16, 16, 16, 16, False, 0, None, 0),  # top_k 0: local keys only
    (1, 4, 2, 64, None, 8, 8, 16, 32, False, 6, 10.0, 1),  # G=2 over 2 kv heads, d=8
]


def _id(c):
    return (
        f"G{c[1] // c[2]}-T{c[3]}-blk{c[6]}-{'slide' if c[9] else 'align'}-s{c[10]}"
        f"-{'rope' if c[11] else 'nopos'}-k{c[12]}"
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_float64_reference(case):
    B, H, Hkv, T, Lq, d, block, chunk, local, sliding, sinks, rope, kk = case
    inputs = _inputs(B, H, Hkv, T, d, torch.float32, Lq=Lq)
    Lq = inputs[0].shape[2]
    sel = random_selection(
        B, Hkv, Lq, T, kk, block=block, chunk=chunk, local=local, sliding=sliding
    )
    kw = dict(block=block, chunk=chunk, local=local, sliding=sliding, sinks=sinks, rope_theta=rope)
    got = outputs(BS.block_sparse_attention, inputs, sel, **kw)
    want = outputs(R.block_sparse_reference, [x.double() for x in inputs], sel, **kw)
    assert_close(got, want, 2e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_forward_packs_any_number_of_group_heads(heads, monkeypatch):
    """The forward packs ``fwd_heads`` heads of a kv group into one tile (cut to a divisor of G:
    3 runs as 2 for G=4); every packing gives the reference's output."""
    monkeypatch.setitem(BS.CONFIG_OVERRIDE, "fwd_heads", heads)
    B, H, Hkv, T, d, block, chunk, local = 1, 8, 2, 72, 16, 8, 16, 32
    q, k, v = _inputs(B, H, Hkv, T, d, torch.float32, Lq=40)
    sel = random_selection(B, Hkv, 40, T, 2, block=block, chunk=chunk, local=local, sliding=True)
    kw = dict(block=block, chunk=chunk, local=local, sliding=True, sinks=5, rope_theta=100.0)
    with torch.no_grad():
        got = BS.block_sparse_attention(q, k, v, sel, **kw)
        want = R.block_sparse_reference(q.double(), k.double(), v.double(), sel, **kw)
    assert_close([got.double()], [want], 2e-5)


@pytest.mark.parametrize(
    "G,fwd_m,d,itemsize,want",
    [
        (4, 64, 128, 2, 4),  # the 8B shape: 256 rows
        (3, 64, 64, 2, 1),  # SmolLM2's groups of 3: the only power-of-2 divisor is 1
        (6, 16, 64, 2, 2),
        (8, 64, 128, 4, 2),  # fp32: 128 rows of 128
        (4, 64, 256, 2, 2),  # d 256: 128 rows
    ],
)
def test_packed_heads_are_a_power_of_two_dividing_the_group(G, fwd_m, d, itemsize, want):
    """tl.arange needs a power-of-2 tile (3 heads x 64 rows failed to compile on the GPU), the
    heads must split the group evenly, and the tile must fit shared memory."""
    cfg = dict(fwd_heads=4, fwd_m=fwd_m)
    got = BS._heads_per_program(cfg, G, d, itemsize)
    assert got == want
    assert G % got == 0 and got & (got - 1) == 0 and got * fwd_m * d * itemsize <= 256 * 256


@pytest.mark.interpreter
def test_float64_inputs_and_strided_views():
    """fp64 kernels agree to rounding; q, k, v as (B, T, heads, d) views are read in place; memory
    keys anchored at the query."""
    B, H, Hkv, T, d = 1, 2, 1, 48, 16
    q = torch.randn(B, T, H, d, dtype=f64).transpose(1, 2)
    k = torch.randn(B, T, Hkv, d, dtype=f64).transpose(1, 2)
    v = torch.randn(B, T, Hkv, d, dtype=f64).transpose(1, 2)
    kw = dict(
        block=8,
        chunk=16,
        local=16,
        sinks=2,
        rope_theta=100.0,
        memory_distance=5,
        memory_anchor="query",
        scale=0.3,
    )
    sel = random_selection(B, Hkv, T, T, 3, block=8, chunk=16, local=16, sliding=False)
    got = outputs(BS.block_sparse_attention, [q, k, v], sel, **kw)
    want = outputs(R.block_sparse_reference, [q, k, v], sel, **kw)
    assert_close(got, want, 1e-12)


def dense_causal(q, k, v, scale=None):
    """Brute-force causal attention, float64, GQA by repeating kv heads."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    T, Lq = k.shape[2], q.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale
    t = torch.arange(T, device=q.device)
    future = t[None, :] > t[T - Lq :, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), -1) @ v


@pytest.mark.interpreter
@pytest.mark.parametrize("block,sinks,G", [(8, 0, 1), (8, 5, 2), (16, 20, 4)])
def test_all_blocks_is_dense_causal(block, sinks, G):
    """top_k >= every earlier block, no positions: exact causal attention, whatever the sinks."""
    B, Hkv, T, d, local = 1, 1, 72, 16, 32
    inputs = _inputs(B, G * Hkv, Hkv, T, d, torch.float32, seed=3)
    kw = dict(block=block, chunk=16, local=local, sinks=sinks)
    sel = BS.select_blocks(BS.block_scores(inputs[0], inputs[1], **kw), T // block)
    got = outputs(BS.block_sparse_attention, inputs, sel, **kw)
    want = outputs(lambda q, k, v, _: dense_causal(q, k, v), [x.double() for x in inputs], sel)
    assert_close(got, want, 2e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("representatives", ["minmax", "mean"])
@pytest.mark.parametrize(
    "rope,sliding,anchor,Lq",
    [(None, False, "window", 100), (100.0, True, "window", 70), (100.0, False, "query", 45)],
)
def test_block_scores_match_reference(representatives, rope, sliding, anchor, Lq):
    q, k, _ = _inputs(1, 4, 2, 100, 16, torch.float32, Lq=Lq, seed=5)
    kw = dict(
        block=8, chunk=16, local=24, sliding=sliding, sinks=9, rope_theta=rope, memory_anchor=anchor
    )
    got = BS.block_scores(q, k, representatives=representatives, **kw).double()
    want = R.block_scores_reference(q.double(), k.double(), representatives=representatives, **kw)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    finite = want > float("-inf")
    assert finite.any()
    assert torch.allclose(got[finite], want[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_minmax_bounds_every_key():
    """Quest's score bounds the best logit, in the block, of the ranking query: the previous
    chunk's mean query (no positions)."""
    q, k, _ = _inputs(1, 2, 1, 64, 16, torch.float32, seed=6)
    kw = dict(block=8, chunk=16, local=16)
    scores = BS.block_scores(q, k, **kw)[:, :, 1:]  # (1, 1, C - 1, NB): chunk 0 has no ranking
    qbar = q.unflatten(2, (4, 16)).mean(3).mean(1, keepdim=True)[:, :, :-1]  # (1, 1, C - 1, d)
    best = (qbar @ k.transpose(-1, -2)).unflatten(-1, (8, 8)).amax(-1)
    ok = scores > float("-inf")
    assert ok.any() and bool((scores[ok] >= best[ok] - 1e-5).all())


@pytest.mark.interpreter
@pytest.mark.parametrize("sliding", [False, True])
def test_no_future_blocks_and_causal_pipeline(sliding):
    """Scores -> top-k -> attention: changing q, k and v at tokens >= p changes neither the
    selection of chunks starting at or before p, nor any output of a query before p; no selected
    block reaches its chunk's window."""
    B, H, Hkv, T, d = 1, 2, 1, 80, 16
    kw = dict(block=8, chunk=16, local=16, sliding=sliding, sinks=3, rope_theta=100.0)
    q, k, v = _inputs(B, H, Hkv, T, d, torch.float32, seed=7)

    def pipeline(q, k, v):
        sel = BS.select_blocks(BS.block_scores(q, k, **kw), 64)
        return sel, BS.block_sparse_attention(q, k, v, sel, **kw)

    sel, out = pipeline(q, k, v)
    first = BS.chunk_starts(T, T, 16, 16, 8, sliding, "cpu")
    assert (sel >= 0).any()
    for p in (35, 50, 64):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, p:] = 50 * torch.randn_like(q2[:, :, p:])
        k2[:, :, p:] = 50 * torch.randn_like(k2[:, :, p:])
        v2[:, :, p:] = 50
        sel2, out2 = pipeline(q2, k2, v2)
        keep = torch.arange(len(first)) * 16 <= p
        assert torch.equal(sel[:, :, keep], sel2[:, :, keep])
        assert torch.equal(out[:, :, :p], out2[:, :, :p])
        # every block named ends at or before its chunk's first window start
        ends = (sel2.long() + 1) * 8
        assert bool(((sel2 < 0) | (ends <= first[:, None])).all())


@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [1, 7, 21])
def test_last_queries_equal_whole_sequence_rows(Lq):
    """A call for the last Lq queries (a decode step) with the selection rows of their chunks gives
    the whole-sequence call's last Lq rows."""
    B, H, Hkv, T, d, chunk = 1, 2, 1, 70, 16, 16
    q, k, v = _inputs(B, H, Hkv, T, d, torch.float32, seed=9)
    kw = dict(block=8, chunk=chunk, local=32, sinks=3, rope_theta=100.0)
    sel = BS.select_blocks(BS.block_scores(q, k, **kw), 3)
    assert (sel >= 0).any()
    full = BS.block_sparse_attention(q, k, v, sel, **kw)
    last = BS.block_sparse_attention(q[:, :, T - Lq :], k, v, sel[:, :, (T - Lq) // chunk :], **kw)
    torch.testing.assert_close(last, full[:, :, T - Lq :], rtol=1e-6, atol=1e-6)


def _small():
    q, k, v = _inputs(1, 2, 1, 48, 16, torch.float32)
    kw = dict(block=8, chunk=16, local=16)
    return q, k, v, kw


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.fill_(-2), "must be -1"),
        (lambda s: s.__setitem__((0, 0, 1, 0), 2), "not wholly before"),  # the window's own block
        (lambda s: s.__setitem__((0, 0, 2, 0), 5), "future or local block"),
        (lambda s: s.__setitem__((0, 0, 2), torch.tensor([1, 1])), "twice"),
    ],
)
def test_bad_selection(edit, message):
    q, k, v, kw = _small()
    sel = torch.full((1, 1, 3, 2), -1, dtype=torch.int64)
    edit(sel)
    with pytest.raises(ValueError, match=message):
        BS.block_sparse_attention(q, k, v, sel, **kw)


@pytest.mark.interpreter
def test_bad_inputs():
    q, k, v, kw = _small()
    sel = torch.full((1, 1, 3, 2), -1, dtype=torch.int32)
    with pytest.raises(TypeError, match="integer"):
        BS.block_sparse_attention(q, k, v, sel.float(), **kw)
    with pytest.raises(ValueError, match="selection must be"):
        BS.block_sparse_attention(q, k, v, sel[:, :, :2], **kw)
    with pytest.raises(ValueError, match="dtypes differ"):
        BS.block_sparse_attention(q, k.double(), v, sel, **kw)
    with pytest.raises(TypeError, match="dtype"):
        BS.block_sparse_attention(q.int(), k.int(), v.int(), sel, **kw)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        BS.block_sparse_attention(
            q[:, :1], k.expand(1, 2, 48, 16), v.expand(1, 2, 48, 16), sel, **kw
        )
    with pytest.raises(ValueError, match="4-D"):
        BS.block_sparse_attention(q[0], k, v, sel, **kw)
    with pytest.raises(ValueError, match="chunk"):
        BS.block_sparse_attention(q, k, v, sel, **{**kw, "chunk": 24})
    with pytest.raises(ValueError, match="multiple of block"):
        BS.block_sparse_attention(q, k, v, sel, **{**kw, "local": 20})
    with pytest.raises(ValueError, match="even head dim"):
        BS.block_sparse_attention(q[..., :15], k[..., :15], v[..., :15], sel, **kw, rope_theta=10.0)
    with pytest.raises(ValueError, match="representatives"):
        BS.block_scores(q, k, **kw, representatives="max")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, H, Hkv, T, d, block, chunk, local, sliding, sinks, rope, top_k
    (1, 8, 2, 4096, 128, 128, 128, 512, False, 64, 500000.0, 4),
    (1, 4, 1, 3000, 128, 64, 64, 256, True, 64, None, 8),
    (2, 4, 4, 2048, 64, 32, 128, 256, False, 0, 10000.0, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_bf16_matches_reference(case):
    """bf16 kernels' error (forward, gradients) against the float64 reference is at most twice
    plain PyTorch's (the reference run in bf16) plus a small floor."""
    B, H, Hkv, T, d, block, chunk, local, sliding, sinks, rope, top_k = case
    inputs = _inputs(B, H, Hkv, T, d, torch.bfloat16, device="cuda")
    kw = dict(block=block, chunk=chunk, local=local, sliding=sliding, sinks=sinks, rope_theta=rope)
    sel = BS.select_blocks(BS.block_scores(inputs[0], inputs[1], **kw), top_k)
    assert (sel >= 0).any()
    got = outputs(BS.block_sparse_attention, inputs, sel, **kw)
    want = outputs(R.block_sparse_reference, [x.double() for x in inputs], sel, **kw)
    eager = outputs(R.block_sparse_reference, inputs, sel, **kw)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        err, base = (a - b).abs().max().item(), (e - b).abs().max().item()
        assert err <= 2 * base + 1e-3 * b.abs().max().item(), f"{name}: {err:.3g} vs {base:.3g}"


@pytest.mark.gpu
def test_gpu_all_blocks_is_dense_causal():
    B, H, Hkv, T, d = 1, 8, 2, 2048, 128
    inputs = _inputs(B, H, Hkv, T, d, torch.float32, device="cuda")
    kw = dict(block=64, chunk=128, local=256, sinks=64)
    sel = BS.select_blocks(BS.block_scores(inputs[0], inputs[1], **kw), T // 64)
    out = BS.block_sparse_attention(*inputs, sel, **kw)
    want = dense_causal(*[x.double() for x in inputs])
    assert (out.double() - want).abs().max().item() < 2e-3  # tf32 dots in fp32
