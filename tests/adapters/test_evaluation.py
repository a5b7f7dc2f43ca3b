"""Perplexity (against a direct computation) and passkey retrieval (prompts, scoring, a tiny model)."""

from __future__ import annotations

import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from seqtensor.adapters.text.evaluation import (
    fixed_span_nll,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
    sliding_window_nll,
)  # noqa: E402
from seqtensor.adapters.text.tensorize import tensorize  # noqa: E402

V = 128


class CharTokenizer:
    """Byte-level stand-in for a Hugging Face tokenizer (encode / decode, a BOS token)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [min(ord(c), V - 1) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def _direct_nll(model, ids: torch.Tensor, begin: int, end: int, targets: range) -> float:
    """NLL of the target positions, each predicted from the window ids[begin:end] in one full forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[begin:end][None]).logits[0].double(), -1)
    return -sum(float(logp[t - begin - 1, ids[t]]) for t in targets)


def test_single_window_perplexity_is_exp_mean_cross_entropy(model):
    ids = torch.randint(3, V, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).exp().item()
    assert perplexity(model, ids, context=64) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids.tolist(), context=50) == pytest.approx(expected, rel=1e-5)


def test_sliding_window_scores_each_token_once_with_its_window(model):
    ids = torch.randint(3, V, (70,), generator=torch.Generator().manual_seed(1))
    nll, count = sliding_window_nll(model, ids, context=32, stride=12)
    # windows [0,32) [12,44) [24,56) [36,68) [48,70): each scores what earlier ones did not
    expected = _direct_nll(model, ids, 0, 32, range(1, 32))
    for begin, prev_end in ((12, 32), (24, 44), (36, 56), (48, 68)):
        end = min(begin + 32, 70)
        expected += _direct_nll(model, ids, begin, end, range(prev_end, end))
    assert count == 69
    assert nll == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, 32, 12) == pytest.approx(math.exp(expected / 69), rel=1e-5)


@pytest.mark.parametrize("context", [12, 24, 40])
def test_fixed_span_scores_the_same_tokens_at_every_context(model, context):
    """The last S tokens, each predicted from a window of <= context tokens that gives it >= c before it."""
    ids = torch.randint(3, V, (60,), generator=torch.Generator().manual_seed(3))
    S, n = 10, len(ids)
    c = max(context - S, 3 * context // 4)
    nll, count = fixed_span_nll(model, [ids, ids[5:]], context=context, score_tokens=S)
    assert count == 2 * S
    expected = 0.0
    for doc in (ids, ids[5:]):
        n = len(doc)
        begin, first = (
            n - S - c,
            n - S,
        )  # windows of `context` from the span start, stepping context - c
        while first < n:
            end = min(begin + context, n)
            expected += _direct_nll(model, doc, begin, end, range(first, end))
            first, begin = end, begin + context - c
    assert nll == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="needs"):
        fixed_span_nll(model, ids[:20], context=40, score_tokens=S)


def test_min_context_and_documents(model):
    docs = [
        torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 40, 25)
    ]
    nll, count = sliding_window_nll(model, docs, context=40, min_context=30)
    # one window per document, scoring targets with >= 30 tokens before them; the 25-token doc has none
    expected = sum(_direct_nll(model, d, 0, 40, range(30, 40)) for d in docs[:2])
    assert count == 20 and nll == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, docs[0], context=8, stride=9)
    with pytest.raises(ValueError, match="no token was scored"):
        perplexity(model, docs[2], context=40, min_context=30)


def test_perplexity_of_a_tensorized_model(model):
    ids = torch.randint(3, V, (60,), generator=torch.Generator().manual_seed(2))
    stock = perplexity(model, ids, context=60)
    tensorize(model, fold=(128,), positional="rope")
    try:
        assert perplexity(model, ids, context=60) == pytest.approx(stock, rel=1e-5)
    finally:
        from seqtensor.adapters.text.tensorize import untensorize

        untensorize(model)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_has_exact_length_and_the_key_at_depth(depth):
    tok = CharTokenizer()
    ids = passkey_prompt(tok, 1000, depth, "12345")
    assert len(ids) == 1000 and ids[0] == tok.bos_token_id
    text = tok.decode(ids)
    assert text.count("12345") == 2 and text.endswith("What is the pass key? The pass key is")
    # where the needle starts within the filler, which must be within one filler sentence of depth
    from seqtensor.adapters.text.evaluation import _NEEDLE, _PREFIX, _QUESTION

    start = text.index(_PREFIX) + len(_PREFIX)
    n_fill = len(text) - start - len(_QUESTION) - len(_NEEDLE.format(key="12345"))
    where = (text.index(" The pass key is 12345") - start) / n_fill
    assert abs(where - depth) <= len(" There and back again.") / n_fill
    if depth == 1.0:
        assert text.endswith(_NEEDLE.format(key="12345") + _QUESTION)
    assert (
        text[text.index(" The pass key is 12345") - 1] in ".\n"
    )  # after a whole sentence, no cut word
    with pytest.raises(ValueError, match="shorter than the passkey prompt"):
        passkey_prompt(tok, 50, 0.5, "12345")


class OracleModel(torch.nn.Module):
    """Answers with the first 5-digit number in its prompt: passkey accuracy must be 1."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok, self.w = tokenizer, torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, **kwargs):
        key = re.search(r"\d{5}", self.tok.decode(ids[0].tolist())).group(0)
        answer = torch.tensor([self.tok.encode(" " + key + ".", add_special_tokens=False)])
        return torch.cat([ids, answer[:, :max_new_tokens]], 1)


def test_passkey_accuracy_scores_answers():
    tok = CharTokenizer()
    result = passkey_accuracy(
        OracleModel(tok), tok, lengths=[300, 500], depths=(0.0, 0.5, 1.0), trials=2
    )
    assert result.accuracy == {300: 1.0, 500: 1.0}
    assert len(result.answers) == 12 and result.by_depth[(500, 0.5)] == 1.0
    keys = [a[3] for a in result.answers]
    assert keys == [
        a[3]
        for a in passkey_accuracy(OracleModel(tok), tok, [300, 500], (0.0, 0.5, 1.0), 2).answers
    ]


def test_passkey_accuracy_runs_a_tensorized_model(model):
    tok = CharTokenizer()
    tensorize(model, fold=(4, 8, 8))
    try:
        result = passkey_accuracy(
            model, tok, lengths=[260], depths=(0.5,), trials=2, max_new_tokens=4
        )
    finally:
        from seqtensor.adapters.text.tensorize import untensorize

        untensorize(model)
    assert 0.0 <= result.accuracy[260] <= 1.0 and len(result.answers) == 2


def test_token_ids_as_numpy_lists_or_int32_score_like_a_long_tensor(model):
    ids = torch.randint(3, V, (50,), generator=torch.Generator().manual_seed(4))
    want = sliding_window_nll(model, ids, 16, 8)
    assert want[1] == 49
    for other in (ids.numpy(), ids.int(), list(ids.numpy()), ids.tolist(), [ids.numpy()]):
        got = sliding_window_nll(model, other, 16, 8)
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-6)
    with pytest.raises(TypeError, match="token ids must be integers"):
        perplexity(model, ids.float(), 16)
    with pytest.raises(ValueError, match="depths must not be empty"):
        passkey_accuracy(model, CharTokenizer(), lengths=[300], depths=())
