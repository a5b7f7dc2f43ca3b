"""SmolLM2-135M before any training: perplexity at L for each positional scheme and fold (CPU).

Which tensorized model starts closest to the stock one decides how far continued pretraining has
to go. Default protocol: that of ``benchmarks/llm_adapt.py`` (first L tokens of the 4
held-out volumes, last quarter scored); ``--score-tokens S`` scores the last S tokens of the first
L instead (every scored token sees >= L - S tokens), ``--end E`` the L tokens ending at token E
(the same scored tokens at several L), ``--volumes`` the first few volumes only.
Order-1 folds, and (1, n) folds at L = n, must give the stock value exactly (a check).

Usage::

    python benchmarks/llm_positional_init.py --data .carry/llm        # 2k, the default folds
    # block folds past the pretrained context (results/llm_block_fold_cpu.json):
    python benchmarks/llm_positional_init.py --data .carry/llm --length 16384 --volumes 1 \\
        --score-tokens 2048 --baselines stock yarn_x4 --folds 2,8192 4,4096 16,16,64 \\
        --out benchmarks/results/llm_block_fold_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from seqtensor.adapters.text.evaluation import sliding_window_nll
from seqtensor.adapters.text.recipe import load_gguf_model, with_rope_scaling
from seqtensor.adapters.text.tensorize import tensorize, untensorize

ROOT = Path(__file__).resolve().parents[1]

FOLDS = ("16,16,64", "32,64", "2048")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/llm")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument(
        "--folds", nargs="*", default=FOLDS, help="comma-separated CausalFold dims, coarsest first"
    )
    ap.add_argument("--positionals", nargs="*", default=["tensor_rope", "rope"])
    ap.add_argument("--baselines", nargs="*", default=["stock"], help="stock, yarn_x4")
    ap.add_argument("--volumes", type=int, default=4, help="held-out volumes used (the first ones)")
    ap.add_argument(
        "--score-tokens", type=int, default=None, help="score the last S tokens (default L // 4)"
    )
    ap.add_argument(
        "--end",
        type=int,
        default=None,
        help="use the L tokens ending here (default L: the first L)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llm_positional_init_cpu.json"))
    args = ap.parse_args()
    model, _ = load_gguf_model(None, torch.float32, "cpu")
    L = args.length
    S = args.score_tokens or L // 4
    volumes = list(np.load(Path(args.data) / "eval.npz").values())[: args.volumes]
    end = args.end or L
    docs = [torch.as_tensor(v[end - L : end].astype(np.int64)) for v in volumes]
    results = {
        "device": "cpu",
        "length": L,
        "end": end,
        "score_tokens": S,
        "volumes": len(docs),
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "rows": [],
    }

    def measure(row: dict) -> None:
        t0 = time.time()
        with torch.no_grad():
            nll, count = sliding_window_nll(model, docs, context=L, min_context=L - S)
        row.update(ppl=math.exp(nll / count), seconds=round(time.time() - t0, 1))
        results["rows"].append(row)
        print(row, flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    for name in args.baselines:
        if name == "yarn_x4":
            with_rope_scaling(model, "yarn", 4.0)
        measure({"model": name})
        if name == "yarn_x4":
            with_rope_scaling(model, None)
    for positional in args.positionals:
        for fold in args.folds:
            dims = tuple(int(d) for d in fold.split(","))
            tensorize(model, fold=dims, positional=positional, backend="reference")
            measure({"model": "tensorized", "positional": positional, "fold": list(dims)})
            untensorize(model)


if __name__ == "__main__":
    main()
