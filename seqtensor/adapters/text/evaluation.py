"""Long-context evaluation of causal language models: sliding-window perplexity and passkey
retrieval.

Works for any Hugging Face causal LM, stock or tensorized (``seqtensor.adapters.text.tensorize``);
the protocols are those of the long-context literature (docs/results.md): perplexity with a
sliding window (stride 256 in published tables) and a random 5-digit passkey hidden in filler
text at several depths, answered by greedy decoding.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..._validation import check

__all__ = [
    "perplexity",
    "sliding_window_nll",
    "fixed_span_nll",
    "passkey_prompt",
    "passkey_accuracy",
    "PasskeyResult",
    "code_retrieval",
]


def _documents(token_ids) -> list[torch.Tensor]:
    """One 1-D tensor / array / list of ints, a 2-D one (one row a document), or a list of 1-D ones
    (documents) -> list of 1-D LongTensors."""
    if isinstance(token_ids, np.ndarray):
        token_ids = torch.from_numpy(token_ids)
    if isinstance(token_ids, torch.Tensor):
        check(
            token_ids.ndim in (1, 2),
            "token_ids must be 1-D (or 2-D, one row a document), got shape "
            f"{tuple(token_ids.shape)}",
        )
        check(
            not token_ids.is_floating_point()
            and not token_ids.is_complex()
            and token_ids.dtype != torch.bool,
            f"token ids must be integers, got dtype {token_ids.dtype}",
            TypeError,
        )
        token_ids = token_ids.long()
        return [token_ids] if token_ids.ndim == 1 else list(token_ids)
    token_ids = list(token_ids)
    if token_ids and all(
        isinstance(t, numbers.Integral) for t in token_ids
    ):  # one document of ints
        return [torch.tensor([int(t) for t in token_ids], dtype=torch.long)]
    return [doc for x in token_ids for doc in _documents(x)]


@torch.no_grad()
def sliding_window_nll(
    model,
    token_ids,
    context: int,
    stride: int | None = None,
    *,
    min_context: int = 0,
    ce_chunk: int = 4096,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of scored tokens.

    Windows of ``context`` tokens start every ``stride`` tokens (default: ``context``, disjoint
    windows); each window scores the tokens no earlier window scored, as in the Hugging Face
    perplexity guide. A target is scored only if it has at least ``min_context`` tokens before it
    in its window (``min_context = 3 * context // 4`` with one window per document is the
    "score the last quarter" protocol of docs/results.md).

    Only the logits of scored positions are computed (``logits_to_keep``); the cross-entropy is
    taken in float32, ``ce_chunk`` rows at a time.
    """
    check(context >= 2, f"context must be >= 2, got {context}")
    stride = context if stride is None else stride
    check(1 <= stride <= context, f"stride must be in [1, context={context}], got {stride}")
    check(0 <= min_context < context, f"min_context must be in [0, context), got {min_context}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for doc in _documents(token_ids):
        n, prev_end = len(doc), 0
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            first = max(prev_end, begin + max(min_context, 1))  # first scored target
            k = end - first
            if k > 0:
                window = doc[begin:end].to(device)[None]  # (1, end - begin)
                logits = model(window, use_cache=False, logits_to_keep=k + 1).logits[
                    0, -k - 1 : -1
                ]  # (k, V)
                targets = window[0, -k:]
                for s in range(0, k, ce_chunk):
                    nll += float(
                        torch.nn.functional.cross_entropy(
                            logits[s : s + ce_chunk].float(),
                            targets[s : s + ce_chunk],
                            reduction="sum",
                        )
                    )
                count += k
            prev_end = end
            if end == n:
                break
    return nll, count


def fixed_span_nll(
    model, token_ids, context: int, score_tokens: int, *, ce_chunk: int = 4096
) -> tuple[float, int]:
    """Summed NLL of the last ``score_tokens`` tokens of each document, seen through
    ``context``-token windows.

    The scored tokens do not depend on ``context``, so values at several contexts compare the same
    text (with ``sliding_window_nll``'s last-quarter protocol, a longer context also scores other,
    later text). Every scored token sees at least ``c = max(context - score_tokens, 3 * context //
    4)`` tokens; windows step by ``context - c`` (one window once ``context >= 4 * score_tokens``).
    """
    check(score_tokens >= 1, f"score_tokens must be >= 1, got {score_tokens}")
    check(context >= 2, f"context must be >= 2, got {context}")
    c = max(context - score_tokens, 3 * context // 4)
    docs = _documents(token_ids)
    for i, doc in enumerate(docs):
        check(
            len(doc) >= score_tokens + c,
            f"document {i} has {len(doc)} tokens; scoring its last {score_tokens} with {c} tokens "
            "of context "
            f"needs {score_tokens + c}",
        )
    spans = [doc[len(doc) - score_tokens - c :] for doc in docs]
    return sliding_window_nll(model, spans, context, context - c, min_context=c, ce_chunk=ce_chunk)


def perplexity(
    model, token_ids, context: int, stride: int | None = None, *, min_context: int = 0
) -> float:
    """Sliding-window perplexity ``exp(total NLL / scored tokens)`` over one or more documents.

    Parameters
    ----------
    model : a causal LM called as ``model(ids, use_cache=False, logits_to_keep=k)``.
    token_ids : 1-D token ids, or a list of documents (each 1-D); documents are never joined.
    context : window length.
    stride : window step (default ``context``); 256 is the published long-context protocol.
    min_context : score only targets with at least this many tokens before them in their window.

    Examples
    --------
    >>> perplexity(model, ids, context=8192, stride=256)  # doctest: +SKIP
    """
    nll, count = sliding_window_nll(model, token_ids, context, stride, min_context=min_context)
    check(count > 0, "no token was scored: documents shorter than min_context + 1?")
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- passkey retrieval

_PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of exactly ``length`` tokens, the key at relative ``depth``.

    Whole filler sentences surround one needle sentence, which starts at the sentence boundary
    nearest ``depth`` (0 = right after the instructions, 1 = right before the question); the tokens
    that do not fill a whole sentence are the end of one sentence, right after the instructions.
    """
    check(0.0 <= depth <= 1.0, f"depth must be in [0, 1], got {depth}")
    head = _encode(tokenizer, _PREFIX, True)
    needle = _encode(tokenizer, _NEEDLE.format(key=key), False)
    question = _encode(tokenizer, _QUESTION, False)
    sentences = [
        _encode(tokenizer, " " + part.strip() + ".", False)
        for part in _FILLER.split(".")
        if part.strip()
    ]
    n_fill = length - len(head) - len(needle) - len(question)
    check(
        n_fill >= 0,
        f"length={length} is shorter than the passkey prompt without filler ({length - n_fill} "
        "tokens)",
    )
    whole: list[list[int]] = []
    used = 0  # tokens in ``whole`` (a running total: a 128k prompt has ~20k sentences)
    while used + len(sentences[len(whole) % len(sentences)]) <= n_fill:
        whole.append(sentences[len(whole) % len(sentences)])
        used += len(whole[-1])
    rest = n_fill - used
    fragment = sentences[len(whole) % len(sentences)][-rest:] if rest else []
    ends = np.cumsum([0] + [len(x) for x in whole]) + rest  # needle positions in the filler
    j = int(np.argmin(np.abs(ends - depth * n_fill)))
    flat = [t for x in whole for t in x]
    return head + fragment + flat[: ends[j] - rest] + needle + flat[ends[j] - rest :] + question


@dataclass
class PasskeyResult:
    """Passkey retrieval outcome.

    Attributes
    ----------
    accuracy : length -> fraction of (depth, trial) prompts answered with the key.
    by_depth : (length, depth) -> fraction of trials answered.
    answers : (length, depth, trial, key, generated text) for inspection.
    """

    accuracy: dict[int, float] = field(default_factory=dict)
    by_depth: dict[tuple[int, float], float] = field(default_factory=dict)
    answers: list[tuple[int, float, int, str, str]] = field(default_factory=list)


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    lengths: Iterable[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    *,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> PasskeyResult:
    """Passkey retrieval: a random 5-digit key hidden in filler, answered by greedy decoding.

    A prompt counts as solved when the first number in the generated text is the key.
    Keys are drawn from ``random.Random(seed)``, so stock and adapted models see the same prompts.
    """
    check(trials >= 1, f"trials must be >= 1, got {trials}")
    depths = tuple(depths)
    check(len(depths) > 0, "depths must not be empty")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    result = PasskeyResult()
    for length in lengths:
        solved = 0
        for depth in depths:
            hits = 0
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)], device=device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                text = tokenizer.decode(out[0, ids.shape[1] :].tolist())
                found = re.search(r"\d+", text)
                hit = found is not None and found.group(0) == key
                hits += hit
                result.answers.append((length, depth, trial, key, text))
            result.by_depth[(length, depth)] = hits / trials
            solved += hits
        result.accuracy[length] = solved / (trials * len(depths))  # depths checked non-empty above
    return result


@torch.no_grad()
def code_retrieval(model, documents, count: int, near: int) -> dict[str, int]:
    """Teacher-forced code retrieval on ``RetrievalMix``-style documents (items with ``input_ids``
    and ``answer_mask``): a code counts as fetched when every one of its asked tokens is the argmax
    next token. ``far`` counts the codes hidden at least ``near`` tokens (e.g. the finest block)
    before they are asked. Only the asked positions go through the LM head (full logits of a 512k
    document are 50 GB). Returns ``codes_right``, ``codes``, ``far_right``, ``far``."""
    check(
        count >= 0 and near >= 0,
        f"code_retrieval: count and near must be >= 0, got {count}, {near}",
    )
    right = total = far_right = far_total = 0
    for i in range(min(count, len(documents))):
        item = documents[i]
        ids, asked = item["input_ids"], item["answer_mask"]
        hidden = model.model(
            input_ids=ids[None].to(model.device), use_cache=False
        ).last_hidden_state[0]
        targets = asked.nonzero().squeeze(1)
        predicted = model.lm_head(hidden[targets - 1]).argmax(-1).cpu() == ids[targets]
        zero = torch.zeros(1, dtype=torch.int)
        edges = torch.diff(asked.int(), prepend=zero, append=zero)
        starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
        offset = 0
        for start, end in zip(starts.tolist(), ends.tolist()):
            ok = bool(predicted[offset : offset + end - start].all())
            offset += end - start
            # where the code was hidden: its first occurrence before the questions
            windows = ids[: int(starts[0])].unfold(0, end - start, 1)
            hidden_at = int((windows == ids[start:end]).all(1).nonzero()[0])
            right, total = right + ok, total + 1
            if start - hidden_at >= near:
                far_right, far_total = far_right + ok, far_total + 1
    return {"codes_right": right, "codes": total, "far_right": far_right, "far": far_total}
