"""Forward time of the Triton kernels on the inputs a Hugging Face decoder hands them.

``benchmarks/attention.py`` times contiguous (B, H, n, d) inputs without RoPE or GQA; inside a
Llama layer the same call gets heads-inner (B, n, H, d) views, 8 kv heads for 32 query heads and
tensor RoPE. This script times each of those differences alone and together at one n, so the
end-to-end gap (benchmarks/NOTES.md, "End to end") can be pinned on one of them.

Usage: ``python benchmarks/attention_llm_inputs.py --out benchmarks/results/attention_llm_inputs_<device>.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from seqtensor.core.positional import TensorRoPE
from seqtensor.kernels.triton_hops import tensorized_fibre_attention


def inputs(n: int, H: int, Hkv: int, d: int, heads_inner: bool, device: str):
    """q (B, H, n, d) and k, v (B, Hkv, n, d): contiguous, or views of (B, n, heads, d) buffers."""

    def make(heads: int) -> torch.Tensor:
        if heads_inner:
            return torch.randn(1, n, heads, d, device=device, dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16)

    return make(H), make(Hkv), make(Hkv)


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 64, 32])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dims, n, d, H = tuple(args.dims), args.n, args.head_dim, args.heads
    assert math.prod(dims) == n, "dims must cover n exactly"
    rope = TensorRoPE(d, base=500000.0).cuda()
    floor_bytes = 2 * n * d * (2 * H + 2 * args.kv_heads) + 2 * (len(dims) - 1) * 2 * n * H * d
    rows = []
    for Hkv, heads_inner, use_rope in itertools.product(
        (H, args.kv_heads), (False, True), (False, True)
    ):
        q, k, v = inputs(n, H, Hkv, d, heads_inner, "cuda")
        positional = rope if use_rope else None

        def fn(q=q, k=k, v=v, positional=positional):
            return tensorized_fibre_attention(
                q, k, v, dims, n, causal=True, coverage="full", hop_positional=positional
            )

        with torch.no_grad():
            ms = triton.testing.do_bench(fn, rep=100)
        row = {
            "kv_heads": Hkv,
            "layout": "B,n,H,d" if heads_inner else "B,H,n,d",
            "tensor_rope": use_rope,
            "fwd_ms": ms,
        }
        rows.append(row)
        print(row, flush=True)
        del q, k, v
    result = {
        "device": torch.cuda.get_device_name(),
        "n": n,
        "dims": list(dims),
        "heads": H,
        "head_dim": d,
        "dtype": "bfloat16",
        "causal": True,
        "coverage": "full",
        "approx_floor_gb": floor_bytes / 1e9,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
