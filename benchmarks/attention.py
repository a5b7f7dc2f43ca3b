"""Attention-op benchmark on one GPU: seqtensor's Triton kernels against the naive fold and full attention.

B=1, H=32 heads, head dim 128, bf16 (docs/results.md). Columns per n and mode:
- ours: ``tensorized_fibre_attention`` (Triton), causal ``full`` and ``axial`` coverage and bidirectional;
- naive: the same hops as plain SDPA calls on permuted copies (causal = axial coverage);
- full: ``scaled_dot_product_attention`` forced to the flash backend (measured up to --full-max);
- flex: the same hops as m compiled ``flex_attention`` calls on the unpermuted (B, H, n, d) tensors, one
  BlockMask per hop (``flex_fold``; measured up to --flex-max, in --flex-modes). Its pattern matches
  ours in every row: "flex_coverage" is "axial" in the axial row (= the naive fold), "full" (fibre +
  summary keys) in the causal row, "bidir" in the bidir row. Masks are built once, outside the timing.
Time is the median of ``triton.testing.do_bench``; "floor" = m hops x (read q, k, v + write o) at
4.0 TB/s, the anchors' memory-traffic floor of a forward; peak memory is ``max_memory_allocated``
over one forward+backward including the inputs. Writes JSON (with the device name) and prints a table.

    PYTHONPATH=. python benchmarks/attention.py --out benchmarks/results/attention_h200.json
    PYTHONPATH=. python benchmarks/attention.py --n 4096 8192 16384 32768 65536 131072 --flex-only
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton

DIMS = {
    4096: (64, 64),
    8192: (128, 64),
    16384: (128, 128),
    32768: (32, 32, 32),
    65536: (64, 32, 32),
    131072: (64, 64, 32),
    262144: (64, 64, 64),
    524288: (128, 64, 64),
}
FLOOR_BW = 4.0e12  # bytes/s, the anchors' floor


def naive_fold(q, k, v, dims, causal):
    """Hops finest to coarsest with SDPA on permuted copies (axial coverage when causal)."""
    B, H, n, d = q.shape
    x = v
    for j in range(len(dims) - 1, -1, -1):
        P, nj, S = math.prod(dims[:j]), dims[j], math.prod(dims[j + 1 :])

        def fib(t):  # (B, H, n, d) -> (B * P * S, H, nj, d): fibres on the batch axis, heads kept
            return (
                t.reshape(B, H, P, nj, S, d).permute(0, 2, 4, 1, 3, 5).reshape(B * P * S, H, nj, d)
            )

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            y = F.scaled_dot_product_attention(fib(q), fib(k), fib(x), is_causal=causal)
        x = y.reshape(B, P, S, H, nj, d).permute(0, 3, 1, 4, 2, 5).reshape(B, H, n, d)
    return x


_FLEX_MASKS: dict = {}  # (n, dims, causal, coverage, device) -> one BlockMask per hop, finest first
_FLEX_COMPILED = None


def _flex_mask_mod(stride: int, nj: int, causal: bool, summary: bool, device):
    """mask_mod of the hop along a dim of size nj and token stride ``stride`` (row-major fold).

    Fibre: same coarser block (idx // (nj * stride)) and same finer offset (idx % stride); causal:
    kv coordinate along the hop <= q's. ``summary`` (causal "full" coverage, hops with finer dims):
    also the last token (finer offset stride - 1) of each earlier sibling block in the same coarser
    block. The hop's constants are captured 0-d tensors, not Python ints, so that every hop (same
    code object, tensor closure) reuses one compiled flex kernel per shape instead of recompiling.
    """
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    s_t, nj_t, blk_t, last_t = t(stride), t(nj), t(nj * stride), t(stride - 1)
    causal_t, summary_t = torch.tensor(causal, device=device), torch.tensor(summary, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        same_blk = (q_idx // blk_t) == (kv_idx // blk_t)
        qj, kj = (q_idx // s_t) % nj_t, (kv_idx // s_t) % nj_t
        fibre = same_blk & ((q_idx % s_t) == (kv_idx % s_t)) & ((kj <= qj) | ~causal_t)
        summ = summary_t & same_blk & (kj < qj) & ((kv_idx % s_t) == last_t)
        return fibre | summ

    return mask_mod


def flex_block_masks(n: int, dims, causal: bool, coverage: str = "axial", device="cuda"):
    """One BlockMask per hop (finest first) for ``flex_fold``; built once per key and cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (n, tuple(dims), causal, coverage, str(device))
    if key not in _FLEX_MASKS:
        assert math.prod(dims) == n, f"flex_fold needs dims without padding, got {dims} for n={n}"
        masks = []
        for j in range(len(dims) - 1, -1, -1):
            stride = math.prod(dims[j + 1 :])
            summary = causal and coverage == "full" and stride > 1
            mm = _flex_mask_mod(stride, dims[j], causal, summary, device)
            # _compile: evaluate the mask per block without materializing an n x n tensor
            masks.append(
                create_block_mask(
                    mm, None, None, n, n, device=device, _compile=str(device) != "cpu"
                )
            )
        _FLEX_MASKS[key] = masks
    return _FLEX_MASKS[key]


def flex_fold(q, k, v, dims, causal, coverage="axial", compiled=True):
    """The naive fold's hops (finest first, same q and k, output of hop j = values of hop j+1) as
    ``flex_attention`` calls on the unpermuted tensors, each with its hop's BlockMask.

    coverage "axial" (default) is exactly ``naive_fold`` (no summary keys); "full" adds the causal
    summary keys of ``tensorized_attention(coverage="full")``. ``compiled=False`` runs flex eagerly
    (slow, for checks on CPU).
    """
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and _FLEX_COMPILED is None:
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per n and grad mode
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    attn = _FLEX_COMPILED if compiled else flex_attention
    x = v
    for bm in flex_block_masks(q.shape[2], dims, causal, coverage, q.device):
        x = attn(q, k, x, block_mask=bm)
    return x


def full_attention(q, k, v, causal):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench(fn, q, k, v, backward: bool, rep: int):
    from triton.testing import do_bench

    g = torch.randn_like(q)
    if backward:

        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), g)

    else:

        def step():
            with torch.no_grad():
                fn(q, k, v)

    ms = do_bench(step, warmup=10, rep=rep, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() / 2**30


SWEEP = [
    {},
    {"bwd_warps": 4},
    {"num_stages": 3},
    {"num_warps": 8},
    {"block": 32, "bwd_warps": 4},
    {"block_m": 64, "block_n": 32},
]


def sweep(n: int, H: int, d: int, rep: int) -> dict:
    """Time each override in SWEEP (causal, first row: the defaults); keep the best for the run."""
    from seqtensor.kernels import triton_hops as T
    from seqtensor.kernels import tuning

    dims = DIMS[n]
    q, k, v = (
        torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    fn = lambda q, k, v: T.tensorized_fibre_attention(q, k, v, dims, n, causal=True)  # noqa: E731
    best = (float("inf"), {})
    for override in SWEEP:
        tuning.CONFIG_OVERRIDE = override
        fwd, _ = bench(fn, q, k, v, False, rep)
        both, _ = bench(fn, q, k, v, True, rep)
        best = min(best, (both, override), key=lambda x: x[0])
        print(f"sweep n={n} {override}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms", flush=True)
    tuning.CONFIG_OVERRIDE = best[1]
    print(f"sweep: using {best[1]}", flush=True)
    return best[1]


def profile(n: int, H: int, d: int) -> None:
    """Per-kernel CUDA time of one causal (full coverage) forward+backward, from torch.profiler."""
    from seqtensor.kernels.triton_hops import tensorized_fibre_attention

    dims = DIMS[n]
    q, k, v = (
        torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    g = torch.randn_like(q)

    def step():
        out = tensorized_fibre_attention(q, k, v, dims, n, causal=True)
        torch.autograd.grad(out, (q, k, v), g)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=15, max_name_column_width=40
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=sorted(DIMS))
    ap.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=None,
        help="fold dims for a single --n instead of the DIMS table (e.g. --n 16384 --dims 32 32 16)",
    )
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument(
        "--full-max", type=int, default=32768, help="largest n at which full attention is timed"
    )
    ap.add_argument("--modes", nargs="*", default=["causal", "axial", "bidir"])
    ap.add_argument(
        "--naive-max",
        type=int,
        default=262144,
        help="largest n for the naive fold (faults at 512k)",
    )
    ap.add_argument(
        "--flex-max",
        type=int,
        default=131072,
        help="largest n for the flex column (the coarse hops make very sparse block masks)",
    )
    ap.add_argument(
        "--flex-modes",
        nargs="*",
        default=["causal", "axial", "bidir"],
        help="modes with a flex column (causal = full coverage with summary keys)",
    )
    ap.add_argument(
        "--flex-only",
        action="store_true",
        help="time only the flex column (skip ours, naive, full)",
    )
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition time in ms")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="n at which to print per-kernel times of one causal fwd+bwd",
    )
    ap.add_argument(
        "--sweep", type=int, default=0, help="n at which to time the configs of SWEEP (causal)"
    )
    ap.add_argument(
        "--autotune",
        choices=["auto", "on", "off"],
        default="auto",
        help="triton.autotune (auto: except on the GPUs the config table was tuned on)",
    )
    args = ap.parse_args()
    from seqtensor.kernels import tuning

    tuning.AUTOTUNE = {"auto": None, "on": True, "off": False}[args.autotune]
    override = sweep(args.sweep, args.heads, args.head_dim, args.rep) if args.sweep else {}
    if args.profile:
        profile(args.profile, args.heads, args.head_dim)

    from seqtensor.kernels.triton_hops import tensorized_fibre_attention

    dev = torch.cuda.get_device_name()
    rows = []
    if args.dims is not None:
        assert len(args.n) == 1 and math.prod(args.dims) == args.n[0], (
            "--dims needs one --n equal to their product"
        )
    for n in args.n:
        dims = tuple(args.dims) if args.dims is not None else DIMS[n]
        H, d = args.heads, args.head_dim
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape = (1, H, n, d)
        q, k, v = (
            torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        floor_ms = len(dims) * 4 * q.numel() * 2 / FLOOR_BW * 1e3
        for mode in args.modes:
            causal, coverage = mode != "bidir", ("axial" if mode == "axial" else "full")
            row = dict(
                n=n, dims="x".join(map(str, dims)), mode=mode, floor_fwd_ms=round(floor_ms, 3)
            )

            def ours(q, k, v):
                return tensorized_fibre_attention(
                    q, k, v, dims, n, causal=causal, coverage=coverage
                )

            if not args.flex_only:
                t0 = time.time()
                row["ours_fwd_ms"], _ = bench(ours, q, k, v, False, args.rep)
                row["ours_fwdbwd_ms"], row["ours_peak_gib"] = bench(ours, q, k, v, True, args.rep)
                row["compile_s"] = round(time.time() - t0, 1)
                row["fwd_vs_floor"] = round(row["ours_fwd_ms"] / floor_ms, 2)
            if (
                not args.flex_only and mode != "causal" and n <= args.naive_max
            ):  # naive: no summary keys
                nv = lambda q, k, v: naive_fold(q, k, v, dims, causal)  # noqa: E731
                row["naive_fwd_ms"], _ = bench(nv, q, k, v, False, args.rep)
                row["naive_fwdbwd_ms"], row["naive_peak_gib"] = bench(nv, q, k, v, True, args.rep)
            if not args.flex_only and mode != "axial" and n <= args.full_max:
                fa = lambda q, k, v: full_attention(q, k, v, causal)  # noqa: E731
                row["full_fwd_ms"], _ = bench(fa, q, k, v, False, args.rep)
                row["full_fwdbwd_ms"], row["full_peak_gib"] = bench(fa, q, k, v, True, args.rep)
            if mode in args.flex_modes and n <= args.flex_max:
                # causal row: full coverage (summary keys) like ours; axial row: = the naive fold
                row["flex_coverage"] = coverage if causal else "bidir"
                try:
                    t0 = time.time()
                    flex_block_masks(
                        n, dims, causal, coverage, q.device
                    )  # built and cached outside timing
                    row["flex_mask_s"] = round(time.time() - t0, 1)
                    fx = lambda q, k, v: flex_fold(q, k, v, dims, causal, coverage)  # noqa: E731
                    t0 = time.time()
                    row["flex_fwd_ms"], _ = bench(fx, q, k, v, False, args.rep)
                    row["flex_fwdbwd_ms"], row["flex_peak_gib"] = bench(fx, q, k, v, True, args.rep)
                    row["flex_compile_s"] = round(time.time() - t0, 1)
                except Exception as e:  # compile error, OOM, unsupported: record it and go on
                    row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v
        _FLEX_MASKS.clear()
        torch.cuda.empty_cache()

    tuned = {
        f"{direction} fibres<={fib}": {str(key): str(cfg) for key, cfg in tuner.cache.items()}
        for (direction, fib), tuner in tuning.TUNERS.items()
    }
    result = dict(
        device=dev,
        torch=torch.__version__,
        triton=triton.__version__,
        config_override=override,
        autotune=tuning.use_autotune(torch.device("cuda")),
        autotuned_configs=tuned,
        B=1,
        H=args.heads,
        head_dim=args.head_dim,
        dtype="bfloat16",
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    cols = [
        "n",
        "dims",
        "mode",
        "ours_fwd_ms",
        "ours_fwdbwd_ms",
        "naive_fwd_ms",
        "naive_fwdbwd_ms",
        "full_fwd_ms",
        "full_fwdbwd_ms",
        "flex_coverage",
        "flex_fwd_ms",
        "flex_fwdbwd_ms",
        "floor_fwd_ms",
        "ours_peak_gib",
        "naive_peak_gib",
        "full_peak_gib",
        "flex_peak_gib",
    ]
    print(f"\n{dev}")
    print(" | ".join(c.replace("_ms", "").replace("_gib", "") for c in cols))
    for r in rows:
        print(
            " | ".join(
                f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols
            )
        )
    for r in rows:
        if "flex_error" in r:
            print(f"flex error at n={r['n']} {r['mode']}: {r['flex_error']}")


if __name__ == "__main__":
    main()
