"""SmolLM2-135M before any training: perplexity at 2k for each positional scheme and fold (CPU).

Which tensorized model starts closest to the stock one decides how far continued pretraining has
to go (issue 6). Same protocol as ``examples/adapt_llm.py`` (first L tokens of the 4 held-out
volumes, last quarter scored); order-1 folds must give the stock value exactly (a check).

Usage: ``python benchmarks/llm_positional_init.py --data .carry/llm``  (``adapt_llm.py prepare`` first)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import adapt_llm  # noqa: E402
from seqtensor.adapters.text import tensorize, untensorize  # noqa: E402
from seqtensor.evaluation import sliding_window_nll  # noqa: E402

FOLDS = ((16, 16, 64), (32, 64), (2048,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/llm")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llm_positional_init_cpu.json"))
    args = ap.parse_args()
    model, _ = adapt_llm.load_model(adapt_llm.gguf_path(None), torch.float32, "cpu")
    L = args.length
    docs = [torch.as_tensor(v[:L].astype(np.int64)) for v in np.load(Path(args.data) / "eval.npz").values()]

    def ppl() -> float:
        with torch.no_grad():
            nll, count = sliding_window_nll(model, docs, context=L, min_context=3 * L // 4)
        return math.exp(nll / count)

    rows = [{"model": "stock", "ppl": ppl()}]
    for positional in ("tensor_rope", "rope"):
        for fold in FOLDS:
            tensorize(model, fold=fold, positional=positional, backend="reference")
            rows.append({"model": "tensorized", "positional": positional, "fold": list(fold), "ppl": ppl()})
            untensorize(model)
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"device": "cpu", "length": L, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
