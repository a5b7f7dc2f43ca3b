"""Ranking options of the retrieval hop (chunked ranking queries, shared selections, block
representatives, memory anchors) and its decode state, against independent oracles: exact causal
attention when every earlier block is retrieved, a brute-force per-query softmax with a
loop-by-loop ranking, perturbation for causality, and the whole-sequence call for decoding."""

from __future__ import annotations

import math

import pytest
import torch

from seqtensor.adapters.text.retrieval import (
    RetrievalConfig,
    RetrievalState,
    block_representatives,
    dequantize_representatives,
    quantize_representatives,
    retrieval_attention,
    retrieval_selection,
)

LOCAL, BLOCK = 8, 4

# (chunk, shared, representative, memory_anchor, sliding)
MODES = [
    (1, False, "max", "window", False),
    (3, False, "max", "window", False),
    (4, False, "bound", "query", True),
    (5, False, "mean", "window", False),
    (4, True, "max", "window", False),
    (2, True, "bound", "query", False),
    (4, True, "mean", "window", True),
]


def _qkv(B=2, H=4, Hkv=2, n=37, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def _kw(mode, **extra):
    chunk, shared, representative, anchor, sliding = mode
    kw = dict(chunk=chunk, shared=shared, representative=representative, sliding=sliding)
    return dict(kw, memory_anchor=anchor, **extra)


def _causal(q, k, v):
    """Dense causal attention, one query at a time (GQA by index)."""
    B, H, n, d = q.shape
    G = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        for i in range(n):
            w = torch.softmax(k[:, h // G, : i + 1] @ q[:, h, i, :, None] / math.sqrt(d), dim=1)
            out[:, h, i] = (w * v[:, h // G, : i + 1]).sum(1)
    return out


def _rope(x, pos, theta):
    """RoPE as complex numbers on pairs (x_j, x_{j + d/2})."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones_like(freq), torch.as_tensor(pos, dtype=torch.float64) * freq)
    return torch.cat([z.real, z.imag], -1)


def _start(i, sliding):
    return max(0, i - LOCAL + 1) // BLOCK * BLOCK if sliding else i // LOCAL * LOCAL


def _place(i, sliding, anchor, distance):
    """Where the query at i sits when it looks at memory keys (at position 0)."""
    return distance + i - _start(i, sliding) if anchor == "window" else distance


def _block_score(r, keys, representative):
    if representative == "max":
        return max(float(r @ key) for key in keys)
    if representative == "mean":
        return float(r @ keys.mean(0))
    hi, lo = keys.max(0).values, keys.min(0).values
    return sum(max(float(r[j] * hi[j]), float(r[j] * lo[j])) for j in range(len(r)))


def _brute_selection(q, k, i, top_k, sinks, mode, theta=None, distance=LOCAL):
    """Blocks the query at i retrieves, per (row, kv head), by loops over tokens."""
    chunk, shared, representative, anchor, sliding = mode
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    G = H // Hkv
    if shared:
        g = i // chunk
        rows, first = range((g - 1) * chunk, g * chunk), g * chunk
    else:
        rows, first = range(max(0, i - chunk + 1), i + 1), i
    s = _start(first, sliding)
    chosen = []
    for b in range(B):
        per_head = []
        for h in range(Hkv):
            if shared and i < chunk:
                per_head.append(set())
                continue
            mem = []
            for j in rows:
                qj = q[b, h * G : (h + 1) * G, j].mean(0)
                if theta is not None:
                    qj = _rope(qj, _place(j, sliding, anchor, distance), theta)
                mem.append(qj)
            r = torch.stack(mem).mean(0)
            scores = []
            for blk in range(s // BLOCK):
                if (blk + 1) * BLOCK <= sinks:
                    continue
                keys = k[b, h, blk * BLOCK : (blk + 1) * BLOCK]
                scores.append((_block_score(r, keys, representative), blk))
            scores.sort(reverse=True)
            per_head.append({blk for _, blk in scores[:top_k]})
        chosen.append(per_head)
    return chosen


def _brute(q, k, v, top_k, sinks, mode, theta=None, distance=LOCAL):
    """Per query: one softmax over local causal keys, sinks and the selected blocks' tokens."""
    sliding, anchor = mode[4], mode[3]
    B, H, n, d = q.shape
    G = H // k.shape[1]
    out = torch.empty_like(q)
    for i in range(n):
        s = _start(i, sliding)
        chosen = _brute_selection(q, k, i, top_k, sinks, mode, theta, distance)
        for b in range(B):
            for h in range(H):
                kv = h // G
                memory = {t for blk in chosen[b][kv] for t in range(blk * BLOCK, (blk + 1) * BLOCK)}
                memory = {t for t in memory if t >= sinks} | set(range(min(sinks, s)))
                keys = sorted(memory) + list(range(s, i + 1))
                qi, kk = q[b, h, i], k[b, kv, keys]
                if theta is not None:
                    where = _place(i, sliding, anchor, distance)
                    qi = _rope(qi, where, theta)
                    pos = [0.0 if t < s else where - (i - t) for t in keys]
                    kk = _rope(kk, torch.tensor(pos, dtype=torch.float64)[:, None], theta)
                w = torch.softmax(kk @ qi / math.sqrt(d), 0)
                out[b, h, i] = w @ v[b, kv, keys]
    return out


@pytest.mark.parametrize("mode", [m for m in MODES if not (m[1] and m[4])])
@pytest.mark.parametrize("sinks", [0, 3])
def test_every_mode_retrieving_every_block_is_exact_causal_attention(mode, sinks):
    """Shared selections with aligned windows: the chunk's window start is each query's (the
    chunk divides the local block), and chunk 0 has nothing earlier to retrieve."""
    if mode[1]:
        assert LOCAL % mode[0] == 0
    q, k, v = _qkv()
    got = retrieval_attention(q, k, v, LOCAL, top_k=100, block=BLOCK, sinks=sinks, **_kw(mode))
    torch.testing.assert_close(got, _causal(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("theta", [None, 100.0])
def test_every_mode_matches_a_brute_force_softmax_over_its_selection(mode, theta):
    q, k, v = _qkv(n=30, seed=mode[0] + 7 * mode[1])
    kw = _kw(mode, rope_theta=theta, memory_distance=5, tile=6)
    got = retrieval_attention(q, k, v, LOCAL, top_k=2, block=BLOCK, sinks=2, **kw)
    want = _brute(q, k, v, 2, 2, mode, theta, distance=5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_selection_matches_the_loop_ranking_and_stays_in_the_past(mode):
    q, k, _ = _qkv(n=40, seed=5)
    top_k, sinks = 3, 5
    selected = retrieval_selection(q, k, LOCAL, BLOCK, top_k, sinks, rope_theta=100.0, **_kw(mode))
    for i, blocks in enumerate(selected):
        want = _brute_selection(q, k, i, top_k, sinks, mode, 100.0)
        for b in range(q.shape[0]):
            for h in range(k.shape[1]):
                got = {int(x) for x in blocks[b, h] if x >= 0}
                assert got == want[b][h]
                assert all((x + 1) * BLOCK <= _start(i, mode[4]) for x in got)


@pytest.mark.parametrize("mode", MODES)
def test_no_later_token_changes_an_output_in_any_mode(mode):
    """Perturbing q, k and v from token t on leaves every output before t unchanged: no later
    block is selected, and no later query steers a selection (shared chunks included)."""
    q, k, v = _qkv(n=48, seed=7)
    kw = _kw(mode, top_k=2, block=BLOCK, sinks=2, rope_theta=100.0)
    base = retrieval_attention(q, k, v, LOCAL, **kw)
    for t in (9, 21, 34, 47):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] = 100 * torch.randn_like(x[:, :, t:])
        out = retrieval_attention(q2, k2, v2, LOCAL, **kw)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("seed", range(5))
def test_the_quest_bound_is_never_below_the_exact_best_logit(seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, 64, 16, generator=g, dtype=torch.float64) * (1 + seed)
    r = torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64)
    for block in (1, 4, 16):
        kmax, kmin = block_representatives(k, 64 // block, block, "bound")
        bound = (r[..., None, :] * kmax[:, :, None]).maximum(r[..., None, :] * kmin[:, :, None])
        bound = bound.sum(-1)  # (B, Hkv, R, blocks)
        exact = (r @ k.transpose(-1, -2)).unflatten(-1, (64 // block, block)).amax(-1)
        assert bool((bound >= exact - 1e-12).all())
        if block == 1:  # one key: the bound is its logit
            torch.testing.assert_close(bound, exact, rtol=1e-12, atol=1e-12)
        (mean,) = block_representatives(k, 64 // block, block, "mean")
        torch.testing.assert_close(mean, k.unflatten(2, (-1, block)).mean(3))


@pytest.mark.parametrize("seed", range(3))
def test_int8_representatives_keep_the_bound_an_upper_bound(seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, 64, 16, generator=g, dtype=torch.float64) * 10 ** (seed - 1)
    r = torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64)
    reps = block_representatives(k, 16, 4, "bound")
    stored = quantize_representatives(reps, "bound")
    assert all(q.dtype == torch.int8 for q, _ in stored)
    kmax, kmin = dequantize_representatives(stored, torch.float64)
    assert bool((kmax >= reps[0] - 1e-9 * reps[0].abs()).all())
    assert bool((kmin <= reps[1] + 1e-9 * reps[1].abs()).all())
    bound = (r[..., None, :] * kmax[:, :, None]).maximum(r[..., None, :] * kmin[:, :, None]).sum(-1)
    exact = (r @ k.transpose(-1, -2)).unflatten(-1, (16, 4)).amax(-1)
    assert bool((bound >= exact - 1e-9).all())
    # one step of the per-row scale at most: within 1/126 of each row's largest entry
    for a, b in zip((kmax, kmin), reps):
        assert bool(((a - b).abs() <= b.abs().amax(-1, keepdim=True) / 126 * 1.0001).all())
    (mean,) = dequantize_representatives(
        quantize_representatives(block_representatives(k, 16, 4, "mean"), "mean"), torch.float64
    )
    want = k.unflatten(2, (16, 4)).mean(3)
    assert bool(((mean - want).abs() <= want.abs().amax(-1, keepdim=True) / 252 * 1.0001).all())


@pytest.mark.parametrize("mode", [MODES[5], MODES[6], MODES[2]])
def test_int8_decode_state_continues_the_whole_sequence_call_with_half_the_bytes(mode):
    q, k, v = _qkv(n=45, seed=5)
    options = dict(_options(mode), int8_representatives=True)
    whole, _ = RetrievalState.prefill(q, k, v, options)
    kw = _kw(mode, top_k=2, block=BLOCK, sinks=2, rope_theta=100.0, int8_representatives=True)
    want = retrieval_attention(q, k, v, LOCAL, **kw)
    torch.testing.assert_close(whole, want, rtol=0, atol=0)
    out, state = RetrievalState.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], options)
    got = [out] + [
        state.step(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1]) for i in range(30, 45)
    ]
    torch.testing.assert_close(torch.cat(got, 2), whole, rtol=1e-12, atol=1e-12)
    rounded = dequantize_representatives(
        quantize_representatives(block_representatives(k, 45 // BLOCK, BLOCK, mode[2]), mode[2]),
        torch.float64,
    )
    for a, b in zip(state.reps, rounded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    reps_bytes = state.memory_bytes() - state.history.numel() * state.history.element_size()
    plain_bytes = sum(x.numel() * x.element_size() for x in rounded)  # float64 rows
    assert reps_bytes < plain_bytes / 4  # int8 rows and one fp32 scale each


def _options(mode, theta=100.0):
    kw = _kw(mode, top_k=2, block=BLOCK, sinks=2, rope_theta=theta, memory_distance=None)
    return dict(kw, local=LOCAL, scale=None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", [(1,) * 11, (3, 1, 5, 2)])
def test_the_decode_state_continues_the_whole_sequence_call(mode, steps):
    """Prefill 30 tokens, then decode in steps of the given sizes: every step's output is the
    whole-sequence output, and the kept representatives are those of the keys."""
    q, k, v = _qkv(n=30 + sum(steps), seed=11)
    options = _options(mode)
    whole, _ = RetrievalState.prefill(q, k, v, options)
    out, state = RetrievalState.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], options)
    torch.testing.assert_close(out, whole[:, :, :30], rtol=1e-12, atol=1e-12)
    n = 30
    for L in steps:
        got = state.step(q[:, :, n : n + L], k[:, :, : n + L], v[:, :, : n + L])
        torch.testing.assert_close(got, whole[:, :, n : n + L], rtol=1e-12, atol=1e-12)
        n += L
        assert state.stored == n and bool((state.length == n).all())
        want = block_representatives(k[:, :, :n], n // BLOCK, BLOCK, mode[2])
        assert len(state.reps) == len(want)
        for a, b in zip(state.reps, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert state.history.shape[2] == (2 * mode[0] - 1 if mode[1] else mode[0] - 1)


@pytest.mark.parametrize("mode", MODES)
def test_decode_selection_with_the_kept_history_is_the_whole_sequence_selection(mode):
    q, k, _ = _qkv(n=41, seed=3)
    kw = dict(_kw(mode), rope_theta=100.0)
    whole = retrieval_selection(q, k, LOCAL, BLOCK, 2, 2, **kw)
    _, state = RetrievalState.prefill(q[:, :, :38], k[:, :, :38], k[:, :, :38], _options(mode))
    last = retrieval_selection(q[:, :, 38:], k, LOCAL, BLOCK, 2, 2, history=state.history, **kw)
    for a, b in zip(last, whole[38:]):
        assert torch.equal(a, b)
    if mode[0] > 1:
        with pytest.raises(ValueError, match="ranking queries of the"):
            retrieval_attention(q[:, :, 38:], k, k, LOCAL, top_k=2, block=BLOCK, **_kw(mode))


def test_bad_ranking_settings_are_refused():
    with pytest.raises(ValueError, match="representative"):
        RetrievalConfig(representative="median")
    with pytest.raises(ValueError, match="memory_anchor"):
        RetrievalConfig(memory_anchor="sink")
    with pytest.raises(ValueError, match="chunk"):
        RetrievalConfig(chunk=0)
    with pytest.raises(ValueError, match="shared"):
        RetrievalConfig(shared=1)
    q, k, v = _qkv(n=16)
    with pytest.raises(ValueError, match="representative"):
        retrieval_attention(q, k, v, 8, top_k=1, block=4, representative="min")


# ----------------------------------------------------------------------------- in a tensorized model

transformers = pytest.importorskip("transformers")
from tiny_llama import tiny_llama  # noqa: E402

from seqtensor.adapters.text.tensorize import (  # noqa: E402
    cache_memory_bytes,
    load_tensorized,
    tensorize,
)


def _model():
    model = tiny_llama()
    with torch.no_grad():  # sharper attention than the std-0.02 init, so selection matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 61, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "mode, int8",
    [(MODES[1], False), (MODES[2], False), (MODES[5], False), (MODES[6], False)]
    + [(MODES[5], True), (MODES[6], True)],
)
def test_cached_generation_equals_uncached_in_every_ranking_mode(mode, int8):
    chunk, shared, representative, anchor, sliding = mode
    retrieval = RetrievalConfig(
        top_k=1,
        block=4,
        sinks=2,
        chunk=chunk,
        shared=shared,
        representative=representative,
        memory_anchor=anchor,
        sliding=sliding,
        int8_representatives=int8,
    )
    model = tensorize(_model(), fold=(4, 8), backend="reference", retrieval=retrieval)
    prompt = _ids(29)
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True
        )
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        ids = _ids(43)
        whole = model(ids, use_cache=False).logits[:, -5:]
        cache = model(ids[:, :-5], use_cache=True).past_key_values
        steps = []
        for j in range(-5, 0):
            step = model(ids[:, j : j + 1 or None], past_key_values=cache)
            steps.append(step.logits[:, -1])
    assert torch.equal(out.sequences, uncached)
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=1e-5, atol=1e-5)
    states = out.past_key_values._seqtensor_states
    n = out.sequences.shape[1] - 1  # the last token was generated, never fed back
    for state in states.values():
        assert state.stored == n
        if representative != "max":
            assert state.reps[0].shape[2] == n // 4
    assert cache_memory_bytes(out.past_key_values)["levels"] > 0


def test_a_decode_state_from_other_settings_is_refused():
    model = tensorize(_model(), fold=(4, 8), backend="reference", retrieval={"block": 4})
    with torch.no_grad():
        cache = model(_ids(20), use_cache=True).past_key_values
        tensorize(model, fold=(4, 8), backend="reference", retrieval={"block": 4, "chunk": 2})
        with pytest.raises(ValueError, match="not prefilled by this retrieval hop"):
            model(_ids(21)[:, -1:], past_key_values=cache)


def test_save_and_load_keep_the_ranking_settings(tmp_path):
    retrieval = RetrievalConfig(top_k=2, block=4, chunk=3, shared=True, representative="bound")
    model = tensorize(_model(), fold=(2, 8), backend="reference", retrieval=retrieval)
    model.save_pretrained(tmp_path)
    reloaded = load_tensorized(str(tmp_path))
    assert reloaded.config.seqtensor["retrieval"] == retrieval.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids(37)).logits, model(_ids(37)).logits)
