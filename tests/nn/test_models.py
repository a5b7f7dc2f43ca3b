"""The model stack (seqtensor.nn): config round trip, causality, attention swaps, masks, checkpointing.

Legend: B batch, n length, D width, V vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch

from seqtensor import (
    BalancedFold,
    BlockFold,
    Decoder,
    Encoder,
    EncoderDecoder,
    ExtrapolatingFold,
    FixedFold,
    LanguageModel,
    ModelConfig,
    SequenceHead,
    TokenHead,
)


def small_config(**overrides) -> ModelConfig:
    settings = dict(d_model=16, n_layers=2, n_heads=2, backend="reference")
    settings.update(overrides)
    return ModelConfig(**settings)


def seeded(module_cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return module_cls(*args, **kwargs).eval()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fold",
    [
        (4, 4),
        (2, 3, 5),
        ExtrapolatingFold(16),
        ExtrapolatingFold(8, min_order=3),
        BalancedFold(3),
        BalancedFold(2, 4),
        BlockFold(8),
        FixedFold((4, 8)),
    ],
    ids=repr,
)
def test_config_dict_and_json_round_trip(fold):
    cfg = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        fold=fold,
        positional="rope",
        coverage="axial",
        dropout=0.1,
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    text = cfg.to_json()
    assert isinstance(json.loads(text), dict)  # plain JSON, no pickled objects
    again = ModelConfig.from_json(text)
    assert again == cfg and again.to_json() == text


def test_config_from_dict_accepts_fold_as_list_and_rejects_unknown_fields():
    assert ModelConfig.from_dict({"fold": [4, 8]}).fold == (4, 8)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"d_model": 16, "widht": 3})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(attention="sparse"), "attention"),
        (dict(coverage="diagonal"), "coverage"),
        (dict(positional="alibi"), "positional"),
        (dict(n_layers=0), "positive"),
        (dict(backend="cuda"), "backend"),
        (dict(dropout=2.0), "dropout"),
        (dict(mlp_ratio=-1.0), "mlp_ratio"),
        (dict(d_model=16, n_heads=2, n_kv_heads=3), "multiple of n_kv_heads"),
    ],
)
def test_config_rejects_bad_values_with_named_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


@pytest.mark.parametrize("attention", ["tensorized", "full"])
def test_config_max_len_reaches_learned_positions(attention):
    enc = Encoder(
        small_config(
            attention=attention, positional="learned", max_len=12, fold=ExtrapolatingFold(8)
        )
    )
    assert enc.blocks[0].attn.positional.embedding.weight.shape[0] == 12
    assert enc(torch.randn(1, 12, 16)).shape == (1, 12, 16)
    with pytest.raises(ValueError, match="max_len=12"):
        enc(torch.randn(1, 13, 16))


def test_same_config_builds_same_model_shapes():
    cfg = small_config(n_kv_heads=1)
    a, b = Encoder(cfg), Encoder(ModelConfig.from_json(cfg.to_json()))
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize(
    "attention, fold, coverage",
    [
        ("tensorized", (4, 4), "full"),
        ("tensorized", (4, 4), "axial"),
        ("tensorized", (2, 3, 3), "full"),  # order 3 with padding (18 > 14)
        ("tensorized", ExtrapolatingFold(4), "full"),
        ("full", None, "full"),
    ],
)
def test_language_model_never_leaks_future_tokens(attention, fold, coverage):
    n, V = 14, 11
    cfg = small_config(attention=attention, fold=fold or (n,), coverage=coverage)
    lm = seeded(LanguageModel, cfg, vocab_size=V)
    ids = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = lm(ids)
        for t in (0, 5, n - 2):
            changed = ids.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(n - t - 1)) % V
            out = lm(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert (
                out[:, t + 1 :] - base[:, t + 1 :]
            ).abs().amax() > 1e-4  # the perturbation does reach later tokens


@pytest.mark.parametrize("coverage, reaches_all", [("full", True), ("axial", False)])
def test_causal_full_coverage_reaches_every_earlier_token(coverage, reaches_all):
    """Gradient of the last output w.r.t. each input: full coverage reaches all, axial misses some."""
    n = 16
    dec = seeded(Decoder, small_config(fold=(4, 4), coverage=coverage, n_layers=1))
    x = torch.randn(1, n, 16, requires_grad=True)
    dec(x)[0, 5].sum().backward()  # token 5 = (1, 1): axial misses (0, 2) and (0, 3)
    reached = x.grad[0].abs().sum(-1) > 0
    assert not reached[6:].any()
    assert bool(reached[:6].all()) == reaches_all


def test_decoder_requires_memory_exactly_when_built_with_cross():
    with pytest.raises(ValueError, match="memory"):
        Decoder(small_config())(torch.randn(1, 4, 16), memory=torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="memory"):
        Decoder(small_config(), cross=True)(torch.randn(1, 4, 16))


# ---------------------------------------------------------------- attention swap


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_full_and_order_one_tensorized_agree_for_identical_weights(stack):
    """An order-1 fold is one hop over the whole sequence: exactly full attention."""
    n = 12
    tens = small_config(attention="tensorized", fold=(n,), positional="rope", n_kv_heads=1)
    full = small_config(attention="full", positional="rope", n_kv_heads=1)
    cls = Encoder if stack == "encoder" else Decoder
    a, b = seeded(cls, tens), seeded(cls, full, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, n, 16, dtype=torch.float64)
    a, b = a.double(), b.double()
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)
    mask = torch.arange(n)[None] < torch.tensor([n, 7, 3])[:, None]
    torch.testing.assert_close(a(x, mask)[mask], b(x, mask)[mask], rtol=1e-10, atol=1e-10)


def test_tensorized_and_full_models_have_identical_parameters():
    """Swapping attention changes the computation only, never the parameter set."""
    a = Encoder(small_config(attention="tensorized"))
    b = Encoder(small_config(attention="full"))
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_encoder_is_permutation_equivariant_with_full_attention_and_no_positions():
    enc = seeded(Encoder, small_config(attention="full", positional="none")).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    perm = torch.randperm(9)
    torch.testing.assert_close(enc(x[:, perm]), enc(x)[:, perm])
    with_positions = seeded(Encoder, small_config(attention="full", positional="rope")).double()
    assert not torch.allclose(with_positions(x[:, perm]), with_positions(x)[:, perm])


# ---------------------------------------------------------------- key padding


@pytest.mark.parametrize("fold", [(4, 4), (2, 2, 4)])
def test_padded_batch_equals_unpadded_sequences_one_by_one(fold):
    n, lengths = 16, [16, 11, 5, 1]
    enc = seeded(Encoder, small_config(fold=fold)).double()
    x = torch.randn(len(lengths), n, 16, dtype=torch.float64)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]  # (B, n) True = keep
    batched = enc(x, mask)
    for i, length in enumerate(lengths):
        alone = enc(x[i : i + 1, :length])
        torch.testing.assert_close(batched[i : i + 1, :length], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "first"])
def test_sequence_head_pools_only_real_tokens(pooling):
    head = seeded(SequenceHead, 8, 3, pooling=pooling)
    h = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    garbage = h.clone()
    garbage[1, 4:] = 1e3
    torch.testing.assert_close(head(h, mask), head(garbage, mask))
    torch.testing.assert_close(head(h, mask)[1:], head(h[1:, :4]))


def test_token_head_shape():
    assert TokenHead(8, 5)(torch.randn(2, 7, 8)).shape == (2, 7, 5)


# ---------------------------------------------------------------- encoder-decoder


def test_encoder_decoder_shapes_and_dependence_on_memory():
    model = seeded(EncoderDecoder, small_config(fold=(3, 4)), small_config(fold=(2, 3)))
    src, tgt = torch.randn(2, 12, 16), torch.randn(2, 6, 16)
    out = model(src, tgt)
    assert out.shape == (2, 6, 16)
    other_src = src.clone()
    other_src[:, 0] += 1.0  # change the first source token only
    assert (model(other_src, tgt) - out).abs().amax() > 1e-4


def test_encoder_decoder_memory_mask_hides_padded_source_tokens():
    model = seeded(EncoderDecoder, small_config(fold=(3, 4)))
    src, tgt = torch.randn(1, 12, 16), torch.randn(1, 5, 16)
    src_mask = torch.arange(12)[None] < 8
    junk = src.clone()
    junk[:, 8:] = 100.0
    torch.testing.assert_close(model(src, tgt, src_mask), model(junk, tgt, src_mask))
    torch.testing.assert_close(
        model(src, tgt, src_mask), model(src[:, :8], tgt), rtol=1e-5, atol=1e-5
    )


def test_encoder_decoder_target_is_causal():
    model = seeded(EncoderDecoder, small_config(fold=(3, 4)))
    src, tgt = torch.randn(1, 12, 16), torch.randn(1, 8, 16)
    changed = tgt.clone()
    changed[:, 5:] += 1.0
    torch.testing.assert_close(
        model(src, changed)[:, :5], model(src, tgt)[:, :5], rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------- checkpointing, compile, tying


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_gradient_checkpointing_gives_the_same_gradients(cls):
    plain = seeded(cls, small_config(fold=(3, 4))).train().double()
    ckpt = seeded(cls, small_config(fold=(3, 4), gradient_checkpointing=True)).train().double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    g_plain, g_ckpt = _grads(plain, x), _grads(ckpt, x)
    assert g_plain.keys() == g_ckpt.keys()
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-10, atol=1e-12, msg=k)


def test_torch_compile_matches_eager():
    model = seeded(Encoder, small_config(fold=(3, 4)))
    x = torch.randn(2, 12, 16)
    try:
        compiled = torch.compile(model)
        out = compiled(x)
    except (
        Exception
    ) as exc:  # a missing C compiler or unsupported platform is the environment, not us
        pytest.skip(
            f"torch.compile unavailable here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        )
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_language_model_ties_embeddings_by_default():
    lm = LanguageModel(small_config(), vocab_size=7)
    assert lm.lm_head.weight is lm.embed.weight
    untied = LanguageModel(small_config(), vocab_size=7, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight
    assert lm(torch.randint(0, 7, (2, 5))).shape == (2, 5, 7)


def test_language_model_rejects_float_ids():
    with pytest.raises(ValueError, match="ids"):
        LanguageModel(small_config(), vocab_size=7)(torch.randn(2, 5))


def test_gqa_model_runs_and_has_fewer_kv_parameters():
    mha, gqa = Encoder(small_config(n_heads=4)), Encoder(small_config(n_heads=4, n_kv_heads=1))
    assert (
        gqa.blocks[0].attn.k_proj.weight.shape[0] == mha.blocks[0].attn.k_proj.weight.shape[0] // 4
    )
    assert gqa(torch.randn(2, 10, 16)).shape == (2, 10, 16)


# ---------------------------------------------------------------- the long-range example


def test_long_range_example_runs_end_to_end(tmp_path):
    """examples/long_range.py on a tiny setting: every variant trains and the JSON is written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "long_range.py"
    spec = importlib.util.spec_from_file_location("long_range_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = example.matching_task(64, 96, seed=0)
    ids, labels = data.tensors
    signals = (ids <= example.SIGNALS).sum(1)
    assert bool((signals == 2).all()) and 0.2 < labels.float().mean() < 0.8
    out = tmp_path / "long_range.json"
    rows = example.main(
        [
            "--lengths",
            "48",
            "96",
            "--full-max",
            "48",
            "--steps",
            "2",
            "--train-size",
            "16",
            "--test-size",
            "8",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert len(rows) == len(result["results"]) == 5 + 3  # full variants skipped at 96
    assert {r["variant"] for r in result["skipped"]} == {"full", "full-causal"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_step"] > 0 for r in rows)


def test_long_range_passkey_task_and_score(tmp_path):
    """examples/long_range.py --task passkey: KEY + 5 digits in the first half and ASK + the same
    digits at the end; the loss is the cross-entropy of those 5 predictions and a sequence counts as
    right only with all 5 (checked against a model that predicts the next token, with a digit spoilt
    in every other sequence); only causal variants are accepted."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "long_range.py"
    spec = importlib.util.spec_from_file_location("long_range_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    n, k = 64, 5
    (ids,) = example.passkey_task(40, n, seed=0).tensors
    for row in ids:
        at = int((row == example.KEY).nonzero()[0])
        assert at + k < n // 2 and (row == example.KEY).sum() == 1 and row[-k - 1] == example.ASK
        assert torch.equal(row[at + 1 : at + 1 + k], row[-k:])
        assert bool(((row[-k:] >= example.DIGITS) & (row[-k:] < example.DIGITS + 10)).all())

    class NextToken(
        torch.nn.Module
    ):  # logits = one-hot of the following token, spoilt on even rows
        def forward(self, x):
            following = torch.cat([x[:, 1:], x[:, :1]], 1)
            following[::2, -3] = example.DIGITS + (following[::2, -3] - example.DIGITS + 1) % 10
            return 10.0 * torch.nn.functional.one_hot(following, example.PASSKEY_VOCAB).float()

    (short,) = example.passkey_task(8, 32, seed=1, key_length=2).tensors
    at = (short == example.KEY).nonzero()[:, 1]
    assert torch.equal(
        short[torch.arange(8)[:, None], at[:, None] + torch.arange(1, 3)], short[:, -2:]
    )
    assert bool((short[:, -3] == example.ASK).all())
    data = torch.utils.data.TensorDataset(ids)
    assert example.accuracy(NextToken(), data, torch.device("cpu"), 16, k) == 0.5
    model = example.Copier(ModelConfig(d_model=16, n_layers=1, n_heads=2, attention="full"))
    logits = model(ids[:4])
    expected = torch.stack(
        [
            torch.nn.functional.cross_entropy(logits[:, n - k - 1 + j], ids[:4, n - k + j])
            for j in range(k)
        ]
    ).mean()
    torch.testing.assert_close(example.key_loss(model, (ids[:4],)), expected)

    rows = example.main(
        [
            "--task",
            "passkey",
            "--lengths",
            "48",
            "--steps",
            "2",
            "--train-size",
            "16",
            "--test-size",
            "8",
            "--out",
            str(tmp_path / "passkey.json"),
        ]
    )
    assert [r["variant"] for r in rows] == [
        "full-causal",
        "tensorized-causal-full",
        "tensorized-causal-axial",
    ]
    with pytest.raises(SystemExit):
        example.main(
            ["--task", "passkey", "--variants", "tensorized", "--out", str(tmp_path / "x.json")]
        )
