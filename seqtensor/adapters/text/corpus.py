"""Training data for adapting a causal LM: a token stream cut into sequences, and retrieval
documents.

``PackedSequences`` cuts one token stream (documents joined with EOS) into non-overlapping
sequences of a fixed context. ``RetrievalMix`` turns a share of them into retrieval documents:
"The code for <word> is NNNNN." sentences hidden at random places and asked again at the end, so
that a loss can pay for fetching tokens from far back (``recipe.causal_lm_loss``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validation import check

__all__ = ["PackedSequences", "RetrievalMix"]


class PackedSequences(torch.utils.data.Dataset):
    """A 1-D token stream cut into ``len(stream) // context`` sequences of ``context`` tokens."""

    def __init__(self, stream: np.ndarray | torch.Tensor, context: int) -> None:
        check(
            isinstance(context, (int, np.integer))
            and not isinstance(context, bool)
            and context > 0,
            f"PackedSequences: context must be a positive integer, got {context!r}",
        )
        check(
            getattr(stream, "ndim", None) == 1,
            f"PackedSequences: stream must be 1-D, got shape {getattr(stream, 'shape', None)}",
        )
        self.stream, self.context = stream, int(context)

    def __len__(self) -> int:
        return len(self.stream) // self.context

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"PackedSequences: index {i} out of range for {len(self)} sequences")
        window = self.stream[i * self.context : (i + 1) * self.context]
        if isinstance(window, torch.Tensor):
            return window.to(torch.int64)
        return torch.as_tensor(np.asarray(window).astype(np.int64))


class RetrievalMix(torch.utils.data.Dataset):
    """``PackedSequences`` with a share of them made into retrieval documents.

    A retrieval document is a window of the base text with 1 to ``keys`` sentences "The code for
    <word> is NNNNN." inserted at random token positions, and at its end the same words queried in a
    shuffled order, each followed by its code; its length stays the base context. Items are
    ``{"input_ids", "answer_mask"}``; the mask marks the asked codes, which ``causal_lm_loss``
    weights on top of the language-model loss: left to the plain loss, 8 codes are ~0.1% of a 32k
    sequence's tokens. Wording and filler differ from the passkey evaluation (``passkey_prompt``).
    Deterministic per index and ``seed``. ``tokenizer(text, add_special_tokens=False)`` must return
    a mapping with ``"input_ids"``.
    """

    WORDS = (
        "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle",
        "forest", "silver", "harbor", "garden", "rocket", "violet", "winter", "marble",
    )  # fmt: skip

    def __init__(
        self, base: PackedSequences, tokenizer: Any, share: float, keys: int = 8, seed: int = 0
    ) -> None:
        check(
            0.0 <= share <= 1.0 and 1 <= keys <= len(self.WORDS),
            f"RetrievalMix needs a share in [0, 1] and 1..{len(self.WORDS)} keys, "
            f"got share={share}, keys={keys}",
        )
        self.base, self.tokenizer, self.share, self.keys, self.seed = (
            base,
            tokenizer,
            share,
            keys,
            seed,
        )

    def __len__(self) -> int:
        return len(self.base)

    def _encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.as_tensor(ids, dtype=torch.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = self.base[i]
        rng = np.random.default_rng((self.seed, i))
        if rng.random() >= self.share:
            return {"input_ids": seq, "answer_mask": torch.zeros_like(seq, dtype=torch.bool)}
        keys = int(rng.integers(1, self.keys + 1))
        words = rng.choice(self.WORDS, keys, replace=False)
        # a code is encoded apart from its sentence so that it is the same tokens where hidden and
        # where asked
        sentences = [
            (self._encode(f" The code for {w} is"), self._encode(f" {c}."))
            for w, c in zip(words, rng.integers(10000, 100000, keys))
        ]
        tail = [(self._encode(" Now the codes."), False)]
        for j in rng.permutation(keys):
            tail += [(sentences[j][0], False), (sentences[j][1], True)]
        room = len(seq) - 2 * sum(len(a) + len(b) for a, b in sentences) - len(tail[0][0])
        check(
            room >= 0,
            f"RetrievalMix: {keys} codes take {len(seq) - room} tokens, "
            f"more than the context {len(seq)}",
        )
        filler = seq[:room]
        cuts = np.sort(rng.integers(0, len(filler) + 1, keys))
        parts, start = [], 0
        for cut, (sentence, code) in zip(cuts, sentences):
            parts += [(filler[start:cut], False), (sentence, False), (code, False)]
            start = cut
        parts += [(filler[start:], False), *tail]
        ids = torch.cat([x for x, _ in parts])
        answer = torch.cat([torch.full_like(x, asked, dtype=torch.bool) for x, asked in parts])
        return {"input_ids": ids, "answer_mask": answer}
