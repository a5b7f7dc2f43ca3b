"""Where the graphed decode attention share goes: per-kernel GPU time of one decode step.

One layer's ``LayerCache.step`` of the 8B-shaped model (32 / 8 heads, d 128, bf16, batch 1) with a
cached context of n tokens, as in ``llm_e2e.py``'s attention share. Reports, for each decode-kernel
config (``kernels.decode.CONFIG_OVERRIDE``): the mean GPU time of each kernel (torch.profiler, eager
steps) and the graphed time of 32 layers; plus the graph floor, 64 empty Triton launches (two per
layer) replayed from one CUDA graph.

Usage: ``python benchmarks/decode_profile.py --out benchmarks/results/decode_profile_<device>.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from llm_e2e import fold_for, graph_ms
from torch.profiler import ProfilerActivity, profile

from seqtensor.adapters.text.cache import CausalFold, LayerCache
from seqtensor.core.positional import TensorRoPE
from seqtensor.kernels import decode

# "rope": False drops the rotation (LayerCache without a positional scheme): what its sin/cos cost.
CONFIGS = {
    "default": {},
    "no_rope": {"rope": False},
    "warps8": {"num_warps": 8},
    "warps2": {"num_warps": 2},
    "combine_warps2": {"combine_warps": 2},
    "split2": {"split_chunks": 2},
    "tile8k": {"tile": 8192},
}


@triton.jit
def _empty_kernel(X):
    pass


def kernel_times(fn, steps: int) -> dict[str, float]:
    """Mean GPU microseconds per call of each CUDA kernel ``fn`` launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return {
        e.key[:60]: round(e.device_time_total / steps, 2)
        for e in prof.key_averages()
        if e.device_time_total > 0
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, dt, B, H, Hkv, d, n = "cuda", torch.bfloat16, 1, 32, 8, 128, args.n
    fold = CausalFold(fold_for(n))
    room = 4 * args.layers * (args.reps + 4)
    k = torch.randn(B, Hkv, n + room, d, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, n + room, d, device=dev, dtype=dt)
    q = torch.randn(B, H, 1, d, device=dev, dtype=dt)
    rope = TensorRoPE(d, base=500000.0).to(dev)
    result = {
        "device": torch.cuda.get_device_name(),
        "n": n,
        "fold": list(fold.dims),
        "layers": args.layers,
        "configs": {},
    }

    x = torch.zeros(1, device=dev)
    result["graph_floor_ms"] = graph_ms(
        lambda: [_empty_kernel[(32,)](x) for _ in range(2 * args.layers)], dev, args.reps
    )
    for name in args.configs:
        decode.CONFIG_OVERRIDE.clear()
        override = dict(CONFIGS[name])
        with_rope = override.pop("rope", True)
        decode.CONFIG_OVERRIDE.update(override)
        state = LayerCache(
            fold,
            coverage="full",
            positional=rope if with_rope else None,
            scale=d**-0.5,
            length=torch.full((B,), n, device=dev),
            offset=torch.zeros(B, dtype=torch.long, device=dev),
            stored=n,
            levels=[torch.randn(B, H, n, d, device=dev, dtype=dt) for _ in range(fold.order - 1)],
        )

        def layer_step(state=state):
            end = state.stored + 1
            state.step(q, k[:, :, :end], v[:, :, :end])

        try:
            row = {"kernels_us": kernel_times(layer_step, args.reps)}
            row["graph_ms"] = graph_ms(
                lambda: [layer_step() for _ in range(args.layers)], dev, args.reps
            )
        except Exception as err:  # noqa: BLE001 - a config that does not compile: record and go on
            row = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(name, json.dumps(row), flush=True)
        result["configs"][name] = row
    decode.CONFIG_OVERRIDE.clear()
    print(
        f"graph floor (2 empty launches x {args.layers} layers): {result['graph_floor_ms']:.3f} ms"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
