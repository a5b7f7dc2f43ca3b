"""Where a retrieval-hop decode step goes: host time, GPU kernels and Python hot spots of one layer.

One layer's ``RetrievalState.step`` (the retrieval hop of ``tensorize(model, retrieval=...)``) for
the 8B shape (32 / 8 heads, d 128, bf16, batch 1) after a real prefill of n tokens, as in
``llm_e2e.py --decode`` with ``--retrieval``. Reports:

- ``step_ms``: wall time of one step, synchronised (host-bound when it exceeds the GPU time);
- ``host_ms``: the same without synchronising, per step over many steps in a row (what the Python
  side alone costs when the GPU keeps up);
- ``kernels_us``: mean GPU microseconds of each CUDA kernel a step launches (torch.profiler);
- ``python``: the functions with the most own time (cProfile), milliseconds per step.

An 8B eager decode step calls this 32 times, so 32 x ``step_ms`` is the hop's share of a step.

Usage: ``python benchmarks/retrieval_decode_profile.py --n 131072 --out
benchmarks/results/retrieval_decode_profile_<device>.json``
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
from llm_e2e import sync
from torch.profiler import ProfilerActivity, profile

from seqtensor.adapters.text.retrieval import RetrievalConfig, RetrievalState
from seqtensor.kernels import block_sparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--local", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--retrieval",
        type=json.loads,
        default={"shared": True, "chunk": 64, "representative": "bound", "sliding": True},
        help="RetrievalConfig fields",
    )
    p.add_argument("--rope-theta", type=float, default=500000.0, help="0: no positions")
    p.add_argument(
        "--block-sparse-config",
        type=json.loads,
        default={},
        help='launch settings of the hop kernels (kernels.block_sparse.CONFIG_OVERRIDE), e.g. {"fwd_m": 16}',
    )
    p.add_argument("--tiny", action="store_true", help="small shapes, for a CPU check")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block_sparse.CONFIG_OVERRIDE.update(args.block_sparse_config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, Hkv, d, n = 1, 32, 8, 128, args.n
    if args.tiny:
        H, Hkv, d = 4, 2, 16
    config = RetrievalConfig(**args.retrieval)
    options = dict(
        config.hop_options(),
        local=args.local,
        scale=d**-0.5,
        rope_theta=args.rope_theta or None,
    )
    room = 2 * args.steps + 40
    torch.manual_seed(0)
    k = torch.randn(B, Hkv, n + room, d, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, n + room, d, device=device, dtype=dtype)
    with torch.no_grad():
        q_prefill = torch.randn(B, H, n, d, device=device, dtype=dtype)
        _, state = RetrievalState.prefill(q_prefill, k[:, :, :n], v[:, :, :n], options)
        del q_prefill
    q = torch.randn(B, H, 1, d, device=device, dtype=dtype)

    def step() -> None:
        end = state.stored + 1
        state.step(q, k[:, :, :end], v[:, :, :end])

    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "n": n,
        "local": args.local,
        "retrieval": config.to_dict(),
        "rope_theta": options["rope_theta"],
        "block_sparse_config": args.block_sparse_config,
    }
    with torch.no_grad():
        # compile every specialisation first: Triton specialises int arguments divisible by 16
        # (the token count, the rotated keys' first row), so a step in 16 compiles anew until then
        for _ in range(32):
            step()
        sync(device)
        reps = args.steps // 5
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        result["step_ms"] = 1e3 * sorted(times)[len(times) // 2]
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        result["host_ms"] = 1e3 * (time.perf_counter() - t0) / reps
        sync(device)
        if device == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    step()
                sync(device)
            kernels = {
                e.key[:70]: round(e.device_time_total / reps, 2)
                for e in prof.key_averages()
                if e.device_time_total > 0
            }
            result["kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
            result["gpu_ms"] = sum(kernels.values()) / 1e3
        prof_py = cProfile.Profile()
        prof_py.enable()
        for _ in range(reps):
            step()
        sync(device)
        prof_py.disable()
    stats = pstats.Stats(prof_py)
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():
        rows.append((own, cum, calls, f"{Path(file).name}:{line}:{name}"))
    rows.sort(reverse=True)
    result["python"] = [
        {"fn": f, "own_ms": 1e3 * own / reps, "cum_ms": 1e3 * cum / reps, "calls": c / reps}
        for own, cum, c, f in rows[:30]
    ]
    print(json.dumps({k: v for k, v in result.items() if k != "python"}, indent=1))
    for row in result["python"][:20]:
        print(f"{row['own_ms']:8.3f} {row['cum_ms']:8.3f} {row['calls']:6.1f}  {row['fn']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
