"""CPU speed of the PyTorch reference backend against dense SDPA, forward + backward.

B=16, H=4, d=16, float32, tensor RoPE, 2 threads (the size of the forecaster's attention on CPU).
Usage: ``python benchmarks/reference_cpu.py`` -> benchmarks/results/reference_cpu.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import seqtensor as st

CASES = [(128, (16, 8)), (1024, (32, 32)), (2048, (64, 32)), (4096, (64, 64))]


def median_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for n, dims in CASES:
        q, k, v = (torch.randn(16, 4, n, 16, requires_grad=True) for _ in range(3))
        for causal in (False, True):
            ours = median_ms(
                lambda: (
                    st.tensorized_attention(
                        q,
                        k,
                        v,
                        dims,
                        causal=causal,
                        positional="tensor_rope",
                        validate_values=False,
                    )
                    .sum()
                    .backward()
                )
            )
            dense = median_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            )
            rows.append(
                {
                    "n": n,
                    "dims": list(dims),
                    "causal": causal,
                    "reference_ms": ours,
                    "dense_sdpa_ms": dense,
                }
            )
            print(
                f"n={n:5d} dims={dims} causal={causal!s:5}  reference {ours:8.1f} ms  dense SDPA {dense:8.1f} ms"
            )
    out = Path(__file__).parent / "results" / "reference_cpu.json"
    meta = {
        "device": "cpu",
        "machine": platform.machine(),
        "threads": 2,
        "torch": torch.__version__,
        "shape": "B=16 H=4 d=16 float32, fwd+bwd, median of 3",
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
