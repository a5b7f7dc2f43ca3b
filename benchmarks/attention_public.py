"""The public call against the kernel it dispatches to and against flash attention (SDPA), one GPU.

What a user calls, ``st.tensorized_attention(q, k, v, dims, causal=True)`` with default arguments,
timed beside ``kernels.triton_hops.tensorized_fibre_attention`` called directly (what the public
call adds is argument checks, the hop plan, positions and dispatch) and flash SDPA. B=1, H=32,
d=128, bf16, causal ``full`` coverage; forward under no_grad and forward+backward with
``o.backward(ones)``; with and without ``positional="tensor_rope"``. Times are
``triton.testing.do_bench`` medians; peak memory is ``max_memory_allocated`` over one
forward+backward including the inputs. Also: whether the default forward can be captured in a CUDA
graph (no host sync), and a short-n sweep of order 2 against SDPA (the crossover below which one hop
is cheaper). Writes JSON with the device name (after every
row, so a run cut short keeps what it measured) and prints a table.

    PYTHONPATH=. python benchmarks/attention_public.py --out benchmarks/results/attention_public_h200.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import seqtensor as st
from seqtensor.core.folds import BalancedFold
from seqtensor.core.positional import TensorRoPE
from seqtensor.kernels import tuning
from seqtensor.kernels.triton_hops import tensorized_fibre_attention

CASES = {4096: (64, 64), 32768: (32, 32, 32), 131072: (64, 64, 32)}
CROSSOVER_N = (256, 512, 1024, 2048, 4096, 8192, 16384)


def sdpa(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def timed(fn, q, k, v, backward: bool, rep: int) -> tuple[float, float]:
    """(median ms, peak GiB of one call including the inputs)."""
    if backward:
        ones = torch.ones_like(q)

        def step():
            fn(q, k, v).backward(ones)

    else:

        def step():
            with torch.no_grad():
                fn(q, k, v)

    ms = do_bench(step, warmup=10, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    q.grad = k.grad = v.grad = None
    return ms, peak


def graph_capturable(fn, q, k, v) -> str:
    """'ok' when the forward captures into a CUDA graph and replays to the eager result."""
    try:
        with torch.no_grad():
            want = fn(q, k, v)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn(q, k, v)  # warm-up on a side stream, as torch.cuda.graphs asks
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fn(q, k, v)
            g.replay()
            torch.cuda.synchronize()
        return "ok" if torch.equal(out, want) else "replay differs"
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        return f"{type(e).__name__}: {str(e)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=sorted(CASES))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument("--sdpa-max", type=int, default=131072)
    ap.add_argument("--crossover", type=int, nargs="*", default=list(CROSSOVER_N))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H, d = args.heads, args.head_dim
    t0 = time.time()
    rows = []
    for n in args.n:
        dims = CASES[n]
        q, k, v = (
            torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        rope = TensorRoPE(d)
        fns = {
            "public": lambda q, k, v: st.tensorized_attention(q, k, v, dims, causal=True),
            "kernel": lambda q, k, v: tensorized_fibre_attention(q, k, v, dims, n, causal=True),
            "public_rope": lambda q, k, v: st.tensorized_attention(
                q, k, v, dims, causal=True, positional="tensor_rope"
            ),
            "kernel_rope": lambda q, k, v: tensorized_fibre_attention(
                q, k, v, dims, n, causal=True, hop_positional=rope
            ),
        }
        if n <= args.sdpa_max:
            fns["sdpa"] = sdpa
        row = {"n": n, "dims": list(dims)}
        rows.append(row)
        for name, fn in fns.items():
            fwd, _ = timed(fn, q, k, v, False, args.rep)
            both, peak = timed(fn, q, k, v, True, args.rep if name != "sdpa" else 20)
            row[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "peak_gib": peak}
            print(f"n={n} {name}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms, peak {peak:.2f} GiB")
            write(args.out, rows, [], H, d, t0)
        for name in ("public", "public_rope"):
            row[name]["cuda_graph"] = graph_capturable(fns[name], q, k, v)
        write(args.out, rows, [], H, d, t0)
        del q, k, v
        torch.cuda.empty_cache()
    crossover = []
    for n in args.crossover:
        dims = BalancedFold(2)(n).dims
        q, k, v = (
            torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        fn = lambda q, k, v, dims=dims: tensorized_fibre_attention(  # noqa: E731
            q, k, v, dims, q.shape[2], causal=True
        )
        r = {"n": n, "dims": list(dims)}
        for name, f in (("order2", fn), ("sdpa", sdpa)):
            r[name] = {
                "fwd_ms": timed(f, q, k, v, False, args.rep)[0],
                "fwd_bwd_ms": timed(f, q, k, v, True, args.rep)[0],
            }
        print(f"crossover n={n} {dims}: order2 {r['order2']} sdpa {r['sdpa']}")
        crossover.append(r)
        write(args.out, rows, crossover, H, d, t0)
    print("\n| n | public fwd / fwd+bwd | kernel | public+rope | kernel+rope | sdpa | graph |")
    for r in rows:
        cells = [
            f"{r[x]['fwd_ms']:.3f} / {r[x]['fwd_bwd_ms']:.2f}" if x in r else "-"
            for x in ("public", "kernel", "public_rope", "kernel_rope", "sdpa")
        ]
        print(f"| {r['n']} | " + " | ".join(cells) + f" | {r['public']['cuda_graph']} |")
        fwd = r["public_rope"]["fwd_ms"] / r["public"]["fwd_ms"] - 1
        both = r["public_rope"]["fwd_bwd_ms"] / r["public"]["fwd_bwd_ms"] - 1
        print(f"  n={r['n']} public_rope: tensor_rope costs {fwd:+.1%} fwd, {both:+.1%} fwd+bwd")


def write(path, rows, crossover, H, d, t0) -> None:
    """The JSON so far (device and versions included)."""
    if not path:
        return
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        B=1,
        H=H,
        d=d,
        dtype="bfloat16",
        causal=True,
        coverage="full",
        rope_paths="fwd (no_grad): rotated on load; fwd+bwd: q and k rotated once into the frame "
        "of triton_hops.frame_positions",
        autotune=tuning.use_autotune(torch.device("cuda")),
        rows=rows,
        crossover=crossover,
        seconds=time.time() - t0,
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
