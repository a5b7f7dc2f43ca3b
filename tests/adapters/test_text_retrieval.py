"""The retrieval hop against independent oracles: exact causal attention when every earlier block
is retrieved, a brute-force per-query softmax over the selected keys otherwise, and perturbation
for causality."""

from __future__ import annotations

import math

import pytest
import torch

from seqtensor import tensorized_attention
from seqtensor.adapters.text.retrieval import (
    RetrievalConfig,
    retrieval_attention,
    retrieval_selection,
    retrieval_tensorized_attention,
)
from seqtensor.core.folds import Fold


def _qkv(B=2, H=4, Hkv=2, n=37, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def _causal(q, k, v, scale=None):
    """Dense causal attention, one query at a time (GQA by index)."""
    B, H, n, d = q.shape
    G = H // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for h in range(H):
        for i in range(n):
            w = torch.softmax(k[:, h // G, : i + 1] @ q[:, h, i, :, None] * scale, dim=1)
            out[:, h, i] = (w * v[:, h // G, : i + 1]).sum(1)
    return out


def _start(i, local, sliding, block=4):
    """The first local key: the aligned local block, or the last ``local`` tokens from the block
    boundary at or before them."""
    return max(0, i - local + 1) // block * block if sliding else i // local * local


def _brute_selection(q, k, i, local, block, top_k, sinks, theta=None, distance=None, sliding=False):
    """Blocks a query at i retrieves: ranked by max over the block of mean-group-query . key
    (with RoPE: the query at its hop position, keys at 0)."""
    B, H, _, _ = q.shape
    Hkv = k.shape[1]
    s = _start(i, local, sliding)
    chosen = []
    for b in range(B):
        per_head = []
        for h in range(Hkv):
            qbar = q[b, h * (H // Hkv) : (h + 1) * (H // Hkv), i].mean(0)
            if theta is not None:
                qbar = _rope_pair(qbar, (local if distance is None else distance) + i - s, theta)
            scores = []
            for blk in range(s // block):
                if (blk + 1) * block <= sinks:
                    continue
                keys = k[b, h, blk * block : (blk + 1) * block]
                scores.append(((keys @ qbar).max().item(), blk))
            scores.sort(reverse=True)
            per_head.append({blk for _, blk in scores[:top_k]})
        chosen.append(per_head)
    return chosen


def _rope_pair(x, pos, theta):
    """RoPE as complex numbers on pairs (x_j, x_{j + d/2}): an independent form of the hop's."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones_like(freq), pos * freq)
    return torch.cat([z.real, z.imag], -1)


def _brute(q, k, v, local, block, top_k, sinks, theta=None, distance=None, sliding=False):
    """Per query: one softmax over local causal keys, sinks and the selected blocks' tokens."""
    B, H, n, d = q.shape
    G = H // k.shape[1]
    distance = local if distance is None else distance
    out = torch.empty_like(q)
    for i in range(n):
        s = _start(i, local, sliding)
        chosen = _brute_selection(q, k, i, local, block, top_k, sinks, theta, distance, sliding)
        for b in range(B):
            for h in range(H):
                kv = h // G
                memory = {t for blk in chosen[b][kv] for t in range(blk * block, (blk + 1) * block)}
                memory |= set(range(min(sinks, s)))
                keys = sorted(memory) + list(range(s, i + 1))
                qi = q[b, h, i]
                kk = k[b, kv, keys]
                if theta is not None:
                    qi = _rope_pair(qi, distance + i - s, theta)
                    pos = torch.tensor(
                        [0.0 if t < s else distance + t - s for t in keys], dtype=torch.float64
                    )
                    kk = _rope_pair(kk, pos[:, None], theta)
                w = torch.softmax(kk @ qi / math.sqrt(d), 0)
                out[b, h, i] = w @ v[b, kv, keys]
    return out


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("sinks", [0, 3, 6])
def test_retrieving_every_earlier_block_is_exact_causal_attention(sinks, sliding):
    q, k, v = _qkv()
    got = retrieval_attention(q, k, v, 8, top_k=100, block=4, sinks=sinks, sliding=sliding)
    torch.testing.assert_close(got, _causal(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sliding", [False, True])
def test_the_last_queries_alone_match_the_whole_sequence(sliding):
    """A decode step (the last queries, every key) gives the whole-sequence outputs."""
    q, k, v = _qkv(n=41)
    kw = dict(top_k=2, block=4, sinks=3, rope_theta=100.0, sliding=sliding, tile=4)
    whole = retrieval_attention(q, k, v, 8, **kw)
    for last in (1, 5, 13):
        part = retrieval_attention(q[:, :, -last:], k, v, 8, **kw)
        torch.testing.assert_close(part, whole[:, :, -last:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "top_k,sinks,theta,distance,sliding",
    [
        (2, 0, None, None, False),
        (1, 3, None, None, False),
        (2, 3, 100.0, None, False),
        (3, 2, 50.0, 5, False),
        (2, 0, None, None, True),
        (2, 3, 100.0, 5, True),
    ],
)
def test_the_hop_matches_a_brute_force_softmax_over_the_selected_keys(
    top_k, sinks, theta, distance, sliding
):
    q, k, v = _qkv(n=30, seed=top_k + sinks)
    got = retrieval_attention(
        q,
        k,
        v,
        8,
        top_k=top_k,
        block=4,
        sinks=sinks,
        rope_theta=theta,
        memory_distance=distance,
        sliding=sliding,
        tile=5,
    )
    want = _brute(q, k, v, 8, 4, top_k, sinks, theta, distance, sliding)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("theta,sliding", [(None, False), (100.0, False), (100.0, True)])
def test_selection_matches_the_brute_force_ranking_and_stays_in_the_past(theta, sliding):
    q, k, v = _qkv(n=40, seed=5)
    local, block, top_k, sinks = 8, 4, 3, 5
    selected = retrieval_selection(
        q, k, local, block, top_k, sinks, rope_theta=theta, sliding=sliding
    )
    for i, blocks in enumerate(selected):
        want = _brute_selection(q, k, i, local, block, top_k, sinks, theta, None, sliding)
        s = _start(i, local, sliding)
        for b in range(q.shape[0]):
            for h in range(k.shape[1]):
                got = {int(x) for x in blocks[b, h] if x >= 0}
                assert got == want[b][h]
                assert all((x + 1) * block <= s for x in got)  # wholly before the local block


@pytest.mark.parametrize("sliding", [False, True])
def test_no_future_token_changes_an_output(sliding):
    """Perturbing q, k, v from token t on leaves every output before t unchanged: no future block
    is selected, and no future query steers the selection."""
    q, k, v = _qkv(n=48, seed=7)
    kw = dict(top_k=2, block=4, sinks=2, rope_theta=100.0, sliding=sliding)
    base = retrieval_attention(q, k, v, 8, **kw)
    for t in (9, 20, 33, 47):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] = 100 * torch.randn_like(x[:, :, t:])
        out = retrieval_attention(q2, k2, v2, 8, **kw)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, :, t:], base[:, :, t:])


def test_coarse_hops_run_after_the_hop():
    """With nothing retrieved the hop is the fold's finest hop; the coarse hops after it then give
    the tensorized attention of the whole fold (axial coverage, no positions)."""
    q, k, v = _qkv(n=45, seed=3)
    dims = (2, 3, 4)
    config = RetrievalConfig(top_k=0, block=4, sinks=0, coarse_hops=True)
    got = retrieval_tensorized_attention(
        q, k, v, dims, config, coverage="axial", backend="reference"
    )
    fold = Fold((-(-45 // 12), 3, 4), 45)
    want = tensorized_attention(q, k, v, fold, causal=True, coverage="axial", backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    local_only = retrieval_tensorized_attention(q, k, v, dims, RetrievalConfig(0, 4, 0))
    assert not torch.allclose(local_only, want)  # switched off: the hop alone
    with pytest.raises(NotImplementedError, match="axial"):
        retrieval_tensorized_attention(q, k, v, dims, config, coverage="full")


def test_bad_settings_are_refused():
    q, k, v = _qkv(n=16)
    with pytest.raises(ValueError, match="multiple of the retrieval block"):
        retrieval_attention(q, k, v, 6, top_k=1, block=4)
    with pytest.raises(ValueError, match="top_k"):
        RetrievalConfig(top_k=-1)
    with pytest.raises(ValueError, match="unknown settings"):
        RetrievalConfig.from_value({"topk": 3})
    with pytest.raises(ValueError, match="queries but only"):
        retrieval_attention(q, k[:, :, :8], v[:, :, :8], 8, top_k=1, block=4)


# ----------------------------------------------------------------------------- in a tensorized model

transformers = pytest.importorskip("transformers")
from tiny_llama import tiny_llama  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from seqtensor.adapters.text.tensorize import load_tensorized, tensorize  # noqa: E402


def _model() -> LlamaForCausalLM:
    model = tiny_llama()
    with torch.no_grad():  # sharper attention than the std-0.02 init, so selection matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _ids(n: int = 37) -> torch.Tensor:
    return torch.randint(3, 61, (2, n), generator=torch.Generator().manual_seed(1))


def test_a_model_retrieving_every_block_at_true_positions_is_the_stock_model():
    with torch.no_grad():
        stock = _model()(_ids()).logits
        model = tensorize(
            _model(),
            fold=(2, 8),
            positional="rope",
            backend="reference",
            retrieval={"top_k": 100, "block": 4, "sinks": 3},
        )
        torch.testing.assert_close(model(_ids()).logits, stock, rtol=1e-5, atol=1e-5)
        few = tensorize(
            _model(),
            fold=(2, 8),
            positional="rope",
            backend="reference",
            retrieval={"top_k": 1, "block": 4, "sinks": 0},
        )(_ids()).logits
    assert not torch.allclose(few, stock, atol=1e-3)  # with fewer blocks it is not


@pytest.mark.parametrize(
    "positional,sliding", [("tensor_rope", False), ("rope", False), ("tensor_rope", True)]
)
def test_cached_generation_equals_uncached_with_the_retrieval_hop(positional, sliding):
    model = tensorize(
        _model(),
        fold=(4, 8),
        positional=positional,
        backend="reference",
        retrieval=RetrievalConfig(top_k=1, block=4, sinks=2, sliding=sliding),
    )
    prompt = _ids(29)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        # random tokens (generated text repeats itself, and near-tied blocks may then swap)
        ids = _ids(43)
        whole = model(ids, use_cache=False).logits[:, -3:]
        cache = model(ids[:, :-3], use_cache=True).past_key_values
        steps = []
        for j in range(-3, 0):
            out = model(ids[:, j : j + 1 or None], past_key_values=cache)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_the_retrieval_hop(tmp_path):
    retrieval = RetrievalConfig(top_k=2, block=4, sinks=1, memory_distance=6)
    model = tensorize(_model(), fold=(2, 8), backend="reference", retrieval=retrieval)
    model.save_pretrained(tmp_path)
    reloaded = load_tensorized(str(tmp_path))
    assert reloaded.config.seqtensor["retrieval"] == retrieval.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, model(_ids()).logits)


def test_tensorize_refuses_retrieval_settings_it_cannot_run():
    with pytest.raises(ValueError, match="must divide the finest fold dim"):
        tensorize(_model(), fold=(2, 6), retrieval={"block": 4})
    with pytest.raises(ValueError, match="axial"):
        tensorize(_model(), fold=(2, 8), retrieval={"block": 4, "coarse_hops": True})
    with pytest.raises(ValueError, match="hop_gate"):
        tensorize(_model(), fold=(2, 8), hop_gate=0.5, retrieval={"block": 4})
    model = tensorize(
        _model(),
        fold=(2, 8),
        coverage="axial",
        backend="reference",
        retrieval={"block": 4, "coarse_hops": True, "top_k": 1},
    )
    with torch.no_grad():
        model(_ids(), use_cache=False)  # the whole-sequence call runs
        with pytest.raises(NotImplementedError, match="coarse hops"):
            model.generate(_ids(9), max_new_tokens=2, do_sample=False)


def test_the_hops_rope_is_the_models_rope():
    """Within one local block the hop applies RoPE at true distances: the stock model exactly."""
    with torch.no_grad():
        stock = _model()(_ids()).logits
        model = tensorize(
            _model(),
            fold=(2, 64),
            positional="tensor_rope",
            backend="reference",
            retrieval={"top_k": 4, "block": 8, "sinks": 2},
        )
        torch.testing.assert_close(model(_ids()).logits, stock, rtol=1e-5, atol=1e-5)
