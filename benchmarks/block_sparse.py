"""Block-sparse retrieval hop (``kernels.block_sparse``) against SDPA flash causal attention.

8B-shaped layer: B=1, H=32, Hkv=8, d=128, bf16; local window 2048 (aligned), block 128, top_k 16,
sinks 64, query chunk 128, RoPE applied in-kernel (theta 500000) unless --no-rope. Per n: forward
and forward+backward of the hop with a fixed selection (from ``block_scores`` + ``select_blocks``,
built outside the timing), the selection itself (scores + top-k), and SDPA's flash backend on the
same q with k, v repeated to 32 heads (outside the timing). Median of ``triton.testing.do_bench``.
Keys per query: the hop reads ~local/2 + sinks + top_k * block (~3.1k), causal attention n/2.
Writes benchmarks/results/block_sparse_<device>.json and prints a table. About a minute on an H200.

    PYTHONPATH=. python benchmarks/block_sparse.py
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
import torch.nn.functional as F
import triton

from seqtensor.kernels import block_sparse as BS


def device_slug() -> str:
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).replace("nvidia_", "").strip("_")


def bench(fn, grads=()) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=list(grads)))


def measure(n: int, args) -> dict:
    B, H, Hkv, d = 1, 32, 8, 128
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, n, d, device="cuda", dtype=dt, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, n, d, device="cuda", dtype=dt, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, n, d, device="cuda", dtype=dt, generator=g).requires_grad_()
    kw = dict(
        block=args.block,
        chunk=args.chunk,
        local=args.local,
        sinks=args.sinks,
        rope_theta=None if args.no_rope else 500000.0,
    )
    row: dict = {"n": n}

    def select():
        return BS.select_blocks(BS.block_scores(q.detach(), k.detach(), **kw), args.top_k)

    sel = select()
    row["selected_per_chunk"] = float((sel >= 0).sum(-1).float().mean())

    def fwd():
        with torch.no_grad():
            return BS.block_sparse_attention(q, k, v, sel, validate=False, **kw)

    do = torch.randn(B, H, n, d, device="cuda", dtype=dt, generator=g)

    def fwd_bwd():
        BS.block_sparse_attention(q, k, v, sel, validate=False, **kw).backward(do)

    t0 = time.time()
    fwd_bwd()  # compile
    torch.cuda.synchronize()
    row["first_call_s"] = time.time() - t0
    row["select_ms"] = bench(select)
    row["hop_fwd_ms"] = bench(fwd)
    torch.cuda.reset_peak_memory_stats()
    row["hop_fwd_bwd_ms"] = bench(fwd_bwd, (q, k, v))
    row["hop_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    kr = k.detach().repeat_interleave(H // Hkv, 1).requires_grad_()
    vr = v.detach().repeat_interleave(H // Hkv, 1).requires_grad_()

    def flash():  # a fresh context per call: sdpa_kernel's context manager is single-use
        return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)

    def sdpa_fwd():
        with flash(), torch.no_grad():
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    def sdpa_fwd_bwd():
        with flash():
            F.scaled_dot_product_attention(q, kr, vr, is_causal=True).backward(do)

    row["sdpa_fwd_ms"] = bench(sdpa_fwd)
    row["sdpa_fwd_bwd_ms"] = bench(sdpa_fwd_bwd, (q, kr, vr))
    row["speedup_fwd"] = row["sdpa_fwd_ms"] / row["hop_fwd_ms"]
    row["speedup_fwd_bwd"] = row["sdpa_fwd_bwd_ms"] / row["hop_fwd_bwd_ms"]
    keys = args.local / 2 + args.sinks + args.top_k * args.block
    row["key_ratio"] = (n / 2) / keys  # causal keys per query over the hop's, on average
    if args.public:
        row.update(measure_public(q.detach(), k.detach(), v.detach(), args))
    for cfg in args.sweep:  # launch settings of the kernel alone, forward only
        BS.CONFIG_OVERRIDE.clear()
        BS.CONFIG_OVERRIDE.update(args.config, **cfg)
        try:
            row.setdefault("sweep", []).append({**cfg, "hop_fwd_ms": bench(fwd)})
        except Exception as e:  # e.g. out of shared memory
            row.setdefault("sweep", []).append({**cfg, "error": str(e)[:200]})
        print("  sweep", row["sweep"][-1], flush=True)
    BS.CONFIG_OVERRIDE.clear()
    BS.CONFIG_OVERRIDE.update(args.config)
    return row


def measure_public(q, k, v, args) -> dict:
    """The hop as the text adapter calls it (``retrieval_attention``: memory queries, ranking,
    block scores, top-k and the kernel), with the settings of ``--public`` and a profile of where
    the forward's time goes."""
    from seqtensor.adapters.text.retrieval import retrieval_attention

    kw = dict(
        top_k=args.top_k,
        block=args.block,
        sinks=args.sinks,
        rope_theta=None if args.no_rope else 500000.0,
        **args.public,
    )

    def call():
        with torch.no_grad():
            return retrieval_attention(q, k, v, args.local, **kw)

    call()
    out = {"public_settings": kw, "public_fwd_ms": bench(call)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, flush=True)
    out["public_profile"] = [
        {"name": e.key[:80], "cuda_ms": e.device_time_total / 1e3, "calls": e.count}
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--local", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--no-rope", action="store_true")
    ap.add_argument("--config", type=json.loads, default={}, help='e.g. {"fwd_m": 64}')
    ap.add_argument(
        "--public",
        type=json.loads,
        default=None,
        help='also time retrieval_attention, e.g. {"shared": true, "chunk": 64, '
        '"representative": "bound", "sliding": true}',
    )
    ap.add_argument(
        "--sweep", type=json.loads, default=[], help='launch settings, e.g. [{"fwd_n": 128}]'
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    BS.CONFIG_OVERRIDE.update(args.config)
    rows = []
    for n in args.n:
        rows.append(measure(n, args))
        r = rows[-1]
        print(
            f"n={n:7d}  hop fwd {r['hop_fwd_ms']:8.2f} ms  fwd+bwd {r['hop_fwd_bwd_ms']:8.2f} ms"
            f"  select {r['select_ms']:6.2f} ms | sdpa fwd {r['sdpa_fwd_ms']:8.2f} ms"
            f"  fwd+bwd {r['sdpa_fwd_bwd_ms']:8.2f} ms | x{r['speedup_fwd']:.2f} fwd"
            f"  x{r['speedup_fwd_bwd']:.2f} fwd+bwd  (keys x{r['key_ratio']:.1f} fewer)",
            flush=True,
        )
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"B": 1, "H": 32, "Hkv": 8, "d": 128, "dtype": "bfloat16"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("n", "out")},
        "rows": rows,
    }
    out = args.out or f"benchmarks/results/block_sparse_{device_slug()}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
