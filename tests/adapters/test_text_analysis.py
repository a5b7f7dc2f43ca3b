"""The attention-analysis tool against independent oracles: brute-force softmax(QK^T) from the
tiny Llama's weights, closed-form region counts of a uniform causal map, hop adjacency matrices
composed into paths, exact Kronecker / rank-1 maps, and a per-query sum over the retrieval hop's
keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from tiny_llama import tiny_llama  # noqa: E402

from seqtensor.adapters.text import RetrievalConfig, analysis, tensorize  # noqa: E402
from seqtensor.adapters.text.analysis import (  # noqa: E402
    analyze_attention,
    attention_maps,
    block_svd_energy,
    coverage_shares,
    kronecker_rearrangement,
    plot_attention_analysis,
    region_labels,
    retrieval_coverage,
    top_energy,
)
from seqtensor.adapters.text.retrieval import retrieval_selection  # noqa: E402
from seqtensor.core.folds import Fold  # noqa: E402


def _sharp_llama(seed: int = 0):
    """The tiny Llama with q scaled up: random init attends almost uniformly otherwise."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
    return model


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the maps


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex rotations of the pairs (x_j, x_{j + d/2}) at positions 0..n-1."""
    n, d = x.shape[-2:]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = z * torch.polar(torch.ones(n, d // 2, dtype=torch.float64), torch.arange(n)[:, None] * freq)
    return torch.cat([z.real, z.imag], -1)


def test_maps_equal_brute_force_softmax_of_the_weights():
    model = _sharp_llama().double()
    ids = _ids(20, batch=2)
    maps = attention_maps(model, ids)
    hidden = model(ids, output_hidden_states=True).hidden_states
    cfg = model.config
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // 4
    theta = cfg.rope_parameters["rope_theta"]
    for i, layer in enumerate(model.model.layers):
        x = layer.input_layernorm(hidden[i])  # (B, n, D)
        a = layer.self_attn
        q = _rope((x @ a.q_proj.weight.T).unflatten(-1, (H, d)).transpose(1, 2), theta)
        k = _rope((x @ a.k_proj.weight.T).unflatten(-1, (Hkv, d)).transpose(1, 2), theta)
        k = k.repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(20, 20).triu(1).bool(), float("-inf"))
        expected = torch.softmax(scores, -1)
        assert maps[i].shape == (2, H, 20, 20)
        torch.testing.assert_close(maps[i].double(), expected, rtol=1e-5, atol=1e-6)
        assert expected.amax() > 0.5  # sharp enough that a wrong map would differ


def test_analysis_leaves_the_model_as_it_was():
    model = _sharp_llama()
    ids = _ids(16)
    before = model(ids).logits
    impl = model.config._attn_implementation
    attention_maps(model, ids, layers=[0])
    assert model.config._attn_implementation == impl
    assert not any(hasattr(x.self_attn, "_seqtensor_analysis") for x in model.model.layers)
    torch.testing.assert_close(model(ids).logits, before)


def test_one_layer_at_a_time_equals_all_layers():
    model = _sharp_llama()
    ids = _ids(32)
    full = analyze_attention(model, ids, (4, 8))
    one = analyze_attention(model, ids, (4, 8), layers=[1])
    assert one.layers == [1]
    np.testing.assert_allclose(one.local[0], full.local[1])
    np.testing.assert_allclose(one.kron_energy[0], full.kron_energy[1])


# ----------------------------------------------------------------------------- (a) coverage


def _uniform(n: int) -> torch.Tensor:
    """The causal map p[t, s] = 1 / (t + 1), as (1, 1, n, n)."""
    t = torch.arange(n, dtype=torch.float64)
    return (torch.ones(n, n, dtype=torch.float64).tril() / (t[:, None] + 1))[None, None]


@pytest.mark.parametrize("coverage", ["full", "axial"])
def test_uniform_map_shares_equal_the_closed_form(coverage):
    n1, n2 = 5, 4
    n = n1 * n2
    shares = coverage_shares(_uniform(n), (n1, n2), coverage)[0]
    # token (i, j): local keys j + 1; fibre keys i; full adds summary keys (i', n2 - 1), i' < i,
    # which are the fibre keys when j = n2 - 1; axial reaches (i' <= i, j' <= j) only
    want = np.zeros(4)
    for t in range(n):
        i, j = divmod(t, n2)
        local = j + 1
        if coverage == "full":
            direct = 2 * i - (i if j == n2 - 1 else 0)
            rest = 0
        else:
            direct = i
            rest = (t + 1) - (i + 1) * (j + 1)
        indirect = t + 1 - local - direct - rest
        want += np.array([local, direct, indirect, rest]) / (t + 1) / n
    np.testing.assert_allclose(shares[:4].numpy(), want, rtol=1e-12)
    # by level: the finest block (= local), then everything earlier
    np.testing.assert_allclose(shares[4:].numpy(), [want[0], 1 - want[0]], rtol=1e-12)


def _hop_keys(dims, n, coverage):
    """Per hop (finest first) the (n, n) bool matrix 'query t reads key s', built token by token
    from docs/semantics.md with Fold.coords, self included."""
    fold = Fold(dims)
    m = len(dims)
    hops = []
    for j in range(m - 1, -1, -1):
        a = torch.zeros(n, n, dtype=torch.bool)
        for t in range(n):
            ct = fold.coords(t)
            for s in range(t + 1):
                cs = fold.coords(s)
                same_other = all(cs[x] == ct[x] for x in range(m) if x != j)
                fibre = same_other and cs[j] <= ct[j]
                coarser_same = all(cs[x] == ct[x] for x in range(j))
                finer_last = all(cs[x] == dims[x] - 1 for x in range(j + 1, m))
                summary = (
                    coverage == "full" and j < m - 1 and coarser_same and cs[j] < ct[j]
                ) and finer_last
                a[t, s] = fibre or summary
        hops.append(a)
    return hops


@pytest.mark.parametrize("coverage", ["full", "axial"])
def test_region_labels_equal_paths_through_the_hops(coverage):
    dims, n = (2, 3, 4), 22  # padded: the fold holds 24
    hops = _hop_keys(dims, n, coverage)
    reach = torch.eye(n, dtype=torch.bool)
    for a in hops:  # finest hop first: its output is what the next hop reads
        reach = (a.double() @ reach.double()) > 0
    local, coarse = hops[0], torch.stack(hops[1:]).any(0)
    region, level = region_labels(dims, n, coverage)
    causal = torch.ones(n, n).tril().bool()
    assert torch.equal(region == 0, local)
    assert torch.equal(region == 1, coarse & ~local)
    assert torch.equal(region == 2, reach & ~local & ~coarse)
    assert torch.equal(region == 3, causal & ~reach)
    assert torch.equal(region == -1, ~causal)
    if coverage == "full":
        assert torch.equal(reach, causal)  # every earlier token has a path
    t, s = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(level.long(), (s // 4 != t // 4).long() + (s // 12 != t // 12).long())


def test_min_query_leaves_out_the_first_queries():
    p = _uniform(16)
    whole = coverage_shares(p, (4, 4))[0]
    later = coverage_shares(p, (4, 4), min_query=4)[0]
    assert later[0] < whole[0]  # the first block's queries are all local
    t = torch.arange(4, 16)
    np.testing.assert_allclose(later[0].item(), ((t % 4 + 1) / (t + 1)).double().mean().item())


# ----------------------------------------------------------------------------- (c) structure


def test_kronecker_product_has_kronecker_rank_one():
    g = torch.Generator().manual_seed(0)
    A, B = torch.rand(6, 6, generator=g), torch.rand(5, 5, generator=g)
    p = torch.kron(A, B)
    assert top_energy(kronecker_rearrangement(p, 6, 5), (1,))[0].item() == pytest.approx(1, 1e-9)
    two = p + torch.kron(torch.rand(6, 6, generator=g), torch.rand(5, 5, generator=g))
    e = top_energy(kronecker_rearrangement(two, 6, 5), (1, 2))
    assert e[0] < 0.999 and e[1].item() == pytest.approx(1, 1e-9)
    # past 1024 rows on both sides the top singular values come from a randomized SVD
    big = torch.kron(torch.rand(33, 33, generator=g), torch.rand(33, 33, generator=g))
    e = top_energy(kronecker_rearrangement(big, 33, 33), (1, 2))
    assert e[0].item() == pytest.approx(1, 1e-6) and e[1].item() == pytest.approx(1, 1e-6)
    # the rearrangement itself: block (i1, j1) of p is row i1 * 6 + j1
    r = kronecker_rearrangement(p, 6, 5)
    torch.testing.assert_close(r[2 * 6 + 3], p[10:15, 15:20].flatten())


def test_rank_one_blocks_have_svd_energy_one():
    g = torch.Generator().manual_seed(1)
    n = 24
    u, v = torch.rand(n, generator=g), torch.rand(n, generator=g)
    p = (u[:, None] * v[None, :]).expand(1, 2, n, n)
    np.testing.assert_allclose(block_svd_energy(p, 6, (1, 2)).numpy(), 1.0, rtol=1e-9)
    noisy = torch.rand(1, 1, n, n, generator=g)
    e = block_svd_energy(noisy, 6, (1, 6))[0]
    assert e[0] < 0.95 and e[1].item() == pytest.approx(1, 1e-9)  # full rank at r = block


def test_block_energy_is_energy_weighted_over_earlier_blocks():
    # one earlier block is rank 1 with all the energy, the others rank 2 and tiny
    n, b = 8, 4
    p = torch.zeros(1, 1, n, n, dtype=torch.float64)
    p[0, 0, 4:, :4] = 1.0
    p[0, 0, :4, 4:] = torch.eye(4)  # above the diagonal: never a (query, earlier key) pair
    assert block_svd_energy(p, b, (1,))[0, 0].item() == pytest.approx(1.0)
    # three blocks: (1, 0) rank 1 and heavy, (2, 0) empty, (2, 1) the identity (rank 4, energy 4)
    p = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    p[0, 0, 4:8, :4] = 3.0  # energy 144, all in one singular value
    p[0, 0, 8:, 4:8] = torch.eye(4)
    assert block_svd_energy(p, b, (1,))[0, 0].item() == pytest.approx((144 + 1) / (144 + 4))
    assert block_svd_energy(p, b, (1,), min_key_block=1)[0, 0].item() == pytest.approx(1 / 4)


# ----------------------------------------------------------------------------- (b) retrieval


def _brute_retrieval(p, selected, local, cfg, k):
    """Per query and head: stock mass on window, sinks before it and the top-k blocks' tokens."""
    B, H, n, _ = p.shape
    G = H // selected[0].shape[1]
    total = torch.zeros(B, H, n, dtype=torch.float64)
    for i in range(n):
        start = i // local * local
        for b in range(B):
            for h in range(H):
                keys = set(range(start, i + 1)) | set(range(min(cfg.sinks, start)))
                for blk in selected[i][b, h // G, :k].tolist():
                    if blk >= 0:
                        keys |= {x for x in range(blk * cfg.block, (blk + 1) * cfg.block)}
                total[b, h, i] = p[b, h, i, sorted(keys)].sum()
    return total.mean((0, 2))


@pytest.mark.parametrize(
    "ranking",
    [{}, {"chunk": 16, "shared": True, "representative": "bound", "memory_anchor": "query"}],
)
def test_retrieval_coverage_equals_the_sum_over_the_hop_keys(ranking):
    model = _sharp_llama()
    n, local = 48, 8
    cfg = RetrievalConfig(block=4, sinks=2, **ranking)
    ids = _ids(n, batch=2)
    captured = {}
    analysis.for_each_layer(model, ids, lambda i, q, k, p: captured.update(q=q, k=k, p=p), [0])
    q, k, p = captured["q"], captured["k"], captured["p"].double()
    ks = (0, 1, 3, 100)
    got = retrieval_coverage(q, k, p, local, cfg, ks)
    selected = retrieval_selection(q, k, local, cfg.block, 100, cfg.sinks, **ranking)
    for c, kk in enumerate(ks):
        torch.testing.assert_close(got[:, c], _brute_retrieval(p, selected, local, cfg, kk))
    if not ranking:  # (shared chunks: chunk 0 retrieves nothing)
        # every earlier block selected: window + sinks + blocks hold the whole causal row
        np.testing.assert_allclose(got[:, -1].numpy(), 1.0, rtol=1e-6)  # p: float32 rows
    assert (got[:, 0] < got[:, 1]).all() and (got[:, 1] <= got[:, 2]).all()


@pytest.mark.parametrize("positional", ["rope", "tensor_rope"])
@pytest.mark.parametrize("sliding", [False, True])
def test_retrieval_coverage_reaches_one_with_every_block(positional, sliding):
    model = _sharp_llama()
    n = 64
    cfg = RetrievalConfig(block=4, sinks=3, sliding=sliding)
    a = analyze_attention(
        model, _ids(n), (4, 16), retrieval=cfg, ks=(0, 2, n // 4), positional=positional
    )
    assert a.retrieval.shape == (2, 4, 3)
    np.testing.assert_allclose(a.retrieval[..., -1], 1.0, rtol=1e-6)
    assert (np.diff(a.retrieval, axis=-1) >= -1e-12).all()


# ----------------------------------------------------------------------------- results


def test_frame_dict_and_plot(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    model = _sharp_llama()
    a = analyze_attention(
        model, _ids(32), (2, 4, 4), retrieval=RetrievalConfig(block=4, sinks=1), ks=(0, 2)
    )
    frame = a.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2 * 4
    regions = frame[["local", "direct", "indirect", "rest"]].sum(1)
    np.testing.assert_allclose(regions, 1.0, rtol=1e-6)
    assert {"retrieval_k2", "svd_r1", "kron_2x16_r1", "kron_8x4_r8", "level_2"} <= set(frame)
    d = a.to_dict()
    assert d["dims"] == [2, 4, 4] and d["summary"]["covered"] == pytest.approx(1.0)
    plot_attention_analysis(a, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_a_clear_error():
    model = _sharp_llama()
    ids = _ids(16)
    with pytest.raises(ValueError, match="does not cover"):
        analyze_attention(model, ids, (2, 4))
    with pytest.raises(ValueError, match="ks .* >= 0"):
        analyze_attention(model, ids, (4, 4), retrieval=RetrievalConfig(block=2), ks=(1, -1))
    with pytest.raises(ValueError, match="must divide the fold's finest dim"):
        analyze_attention(model, ids, (4, 4), retrieval=RetrievalConfig(block=3))
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        attention_maps(model, ids[0])
    with pytest.raises(TypeError, match="integer token ids"):
        attention_maps(model, ids.float())
    with pytest.raises(ValueError, match="layers must be ints"):
        attention_maps(model, ids, layers=[5])
    with pytest.raises(ValueError, match="coverage"):
        analyze_attention(model, ids, (4, 4), coverage="diagonal")
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="not causal"):
        attention_maps(model, ids)
    model.model.layers[1].self_attn.is_causal = True
    with pytest.raises(ValueError, match="model.model.layers"):
        attention_maps(torch.nn.Linear(2, 2), ids)
    tensorize(model, fold=(4, 4))
    with pytest.raises(ValueError, match="untensorize"):
        attention_maps(model, ids)
