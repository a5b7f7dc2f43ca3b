"""End-to-end speed of a Llama-3-8B-shaped model: SDPA versus tensorized attention.

Random weights, bf16, 32 layers, 32 query / 8 kv heads, head dim 128 (docs/results.md, "End
to end"). Measured:

- forward latency of ``LlamaModel`` (no LM head) at 8k, 32k, 128k, batch 1, median of repeats;
  folds as in the paper's speed table (128x64, 32x32x32, 64x64x32); with ``--retrieval JSON``
  (``RetrievalConfig`` fields plus ``local``) the tensorized side runs the retrieval hop instead,
  on the fold (n / local, local);
- decode: latency of one generation step (``LlamaForCausalLM``, one new token per sequence) with a
  32k and a 128k cached context, batch 1 and a larger batch; the attention alone (one layer's
  attention call x 32 layers: SDPA over the cache versus ``LayerCache.step``); and cache memory
  (K/V, plus the tensorized value levels). Step and attention are also replayed from a CUDA graph
  (``*_graph_ms``): GPU time without the Python and launch overhead that bounds a tensorized step.

Decode caches are filled with random K/V (and random value levels for tensorized) instead of a
prefill: their values do not change the timings, and a 128k SDPA prefill alone costs ~12 s. Both
methods use transformers' DynamicCache, which copies the whole K/V cache on every appended token.

Usage: ``python benchmarks/llm_e2e.py --out benchmarks/results/llm_e2e_<device>.json``
(``--tiny`` runs the same code on a tiny model on CPU in a minute).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqtensor.adapters.text import RetrievalConfig
from seqtensor.adapters.text.cache import LayerCache
from seqtensor.adapters.text.tensorize import CausalFold, cache_memory_bytes, tensorize, untensorize
from seqtensor.attention import resolve_backend
from seqtensor.core.positional import TensorRoPE
from seqtensor.kernels import decode

# the module (the package's `tensorize` name is the function): its attention is patched below
text_adapter = importlib.import_module("seqtensor.adapters.text.tensorize")

FOLDS = {8192: (128, 64), 32768: (32, 32, 32), 131072: (64, 64, 32)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def graph_ms(fn, device, reps: int) -> float | None:
    """Milliseconds of ``fn`` replayed from a CUDA graph: its GPU time without Python and launch
    overhead (None off CUDA). ``fn`` runs once to warm up (compiles, caches) and once under capture;
    the replays repeat that captured call, which is what a graphed decoding loop executes."""
    if device != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = timed(graph.replay, device, reps, 2)
    del graph
    return 1e3 * statistics.median(times)


def graphed(row: dict, key: str, fn, device, reps: int) -> None:
    """``row[key] = graph_ms(...)``, or the error that stopped capture."""
    try:
        row[key] = graph_ms(fn, device, reps)
    except Exception as err:  # noqa: BLE001 - record and go on
        row[key + "_error"] = f"{type(err).__name__}: {err}"[:300]


# Decode-kernel configs (kernels.decode.CONFIG_OVERRIDE) timed by --decode-sweep in the graphed attention share.
DECODE_SWEEP = {
    "no_split": {"split_chunks": 0},
    "split1": {"split_chunks": 1},
    "split4": {"split_chunks": 4},
    "tile8k": {"tile": 8192},
    "tile2k_split1": {"tile": 2048, "split_chunks": 1},
    "warps4": {"num_warps": 4},
    "tile16k_no_split": {"tile": 16384, "split_chunks": 0},
}


def fold_for(n: int, retrieval: dict | None = None) -> tuple[int, ...]:
    if retrieval:  # the hop reads only the finest dim: one coarse dim covers the rest
        local = retrieval.get("local", 2048)
        return (n // local, local)
    if n in FOLDS:
        return FOLDS[n]
    return (
        CausalFold.extrapolating((32, 32, 32), n).dims if n > 32768 else (max(1, n // 1024), 32, 32)
    )


def retrieval_config(args) -> RetrievalConfig | None:
    """``--retrieval`` as tensorize takes it (its ``local`` sets the fold, not the hop)."""
    if not args.retrieval:
        return None
    return RetrievalConfig(**{k: v for k, v in args.retrieval.items() if k != "local"})


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=131072,
        )
    else:
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=args.layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        )
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    return model.eval(), dtype


def peak_gib(device) -> float:
    return (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.device(device).type == "cuda"
        else float("nan")
    )


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def forward_latency(model, lengths, device, args) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), device=device)
        for method in ("sdpa", "tensorized"):
            if method == "tensorized":
                tensorize(model, fold=fold_for(n, args.retrieval), retrieval=retrieval_config(args))
            reps, warmup = (2, 0) if (method == "sdpa" and n >= 131072) else (args.reps, 1)
            if (
                args.compile
            ):  # both methods, layer by layer (compiling the whole model builds an n x n mask)
                torch._dynamo.reset()
                for layer in model.model.layers:
                    layer.compile(dynamic=False)
                reps, warmup = max(1, reps - 1), 1
            reset_peak(device)
            row = {
                "n": n,
                "method": method,
                "fold": list(fold_for(n, args.retrieval)) if method == "tensorized" else None,
                "retrieval": args.retrieval if method == "tensorized" else None,
                "compiled": args.compile,
            }
            try:
                times = timed(lambda: model.model(ids, use_cache=False), device, reps, warmup)
                row.update(
                    median_s=statistics.median(times), times_s=times, peak_gib=peak_gib(device)
                )
            except Exception as err:  # noqa: BLE001 - record and go on to the next measurement
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            finally:
                if method == "tensorized":
                    untensorize(model)
                for layer in model.model.layers:
                    layer._compiled_call_impl = (
                        None  # undo nn.Module.compile (it has no public undo)
                    )
            rows.append(row)
            print(f"forward n={n} {method}: {row.get('median_s', row.get('error'))}", flush=True)
        by = {r["method"]: r.get("median_s") for r in rows if r["n"] == n}
        if by["sdpa"] and by["tensorized"]:
            rows[-1]["speedup"] = by["sdpa"] / by["tensorized"]
    return rows


@torch.no_grad()
def memory_loop(model, n: int, calls: int, device) -> list[dict]:
    """Allocated memory after each of ``calls`` forwards at n that return their cache (the
    default ``use_cache``), the output dropped at once and Python's cyclic collector off: memory
    that grows call after call is held by reference cycles only that collector would free."""
    import gc

    rows = []
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    for method in ("sdpa", "tensorized"):
        if method == "tensorized":
            tensorize(model)  # the defaults a user gets
        reset_peak(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        after = []
        gc.disable()
        try:
            for _ in range(calls):
                out = model.model(input_ids=ids)
                del out
                sync(device)
                after.append(
                    (torch.cuda.memory_allocated() - before) / 2**30 if device == "cuda" else 0.0
                )
        except Exception as err:  # noqa: BLE001 - record and go on
            rows.append({"n": n, "method": method, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        finally:
            gc.enable()
            if method == "tensorized":
                untensorize(model)
        rows.append(
            {
                "n": n,
                "method": method,
                "calls": calls,
                "allocated_after_each_gib": after,
                "growth_gib": after[-1] - after[0],
                "peak_gib": peak_gib(device),
            }
        )
        print(f"memory loop n={n} {method}: {after}", flush=True)
    return rows


@torch.no_grad()
def profile_forward(model, n: int, device, top: int = 25) -> str:
    """Per-kernel CUDA time of one tensorized forward at n (where the time outside attention goes)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    tensorize(model, fold=fold_for(n))
    try:
        model.model(ids, use_cache=False)  # compile and warm up
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.model(ids, use_cache=False)
            sync(device)
    finally:
        untensorize(model)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top)


def synthetic_cache(
    model, B: int, n: int, device, dtype, tensorized_fold: CausalFold | None, top_int8: bool = False
):
    """A DynamicCache holding n random tokens per layer (plus value levels when tensorized)."""
    from transformers import DynamicCache

    c = model.config
    Hkv, H, d = c.num_key_value_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads
    cache = DynamicCache(config=c)
    states = (
        text_adapter._states(cache) if tensorized_fold is not None else None
    )  # the adapter's per-cache states
    for layer in range(c.num_hidden_layers):
        k = torch.randn(B, Hkv, n, d, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, n, d, device=device, dtype=dtype)
        cache.update(k, v, layer)
        if states is not None:
            levels = [
                torch.randn(B, H, n, d, device=device, dtype=dtype)
                for _ in range(tensorized_fold.order - 1)
            ]
            states[layer] = LayerCache(
                tensorized_fold,
                coverage="full",
                positional=TensorRoPE(d, base=c.rope_parameters["rope_theta"]).to(device),
                scale=d**-0.5,
                length=torch.full((B,), n, device=device),
                offset=torch.zeros(B, dtype=torch.long, device=device),
                levels=levels,
                stored=n,
                top_int8=top_int8,
            )
            del levels
    return cache


def cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_latency(model, n: int, B: int, device, dtype, args) -> list[dict]:
    rows = []
    key = cache_kwarg(model)
    for method in ("sdpa", "tensorized"):
        fold = CausalFold(fold_for(n, args.retrieval)) if method == "tensorized" else None
        if fold is not None:
            tensorize(
                model,
                fold=fold.dims,
                top_level_cache=args.top_level_cache,
                retrieval=retrieval_config(args),
            )
        try:
            reset_peak(device)
            if fold is not None and args.retrieval:
                # the hop's state (block representatives, ranking queries) comes from a real
                # prefill with the same cache object
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                prompt = torch.randint(0, model.config.vocab_size, (B, n), device=device)
                model(prompt, use_cache=True, logits_to_keep=1, **{key: cache})
                del prompt
            else:
                cache = synthetic_cache(
                    model, B, n, device, dtype, fold, args.top_level_cache == "int8"
                )
            ids = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
            step = lambda: model(ids, use_cache=True, **{key: cache})  # noqa: E731
            times = timed(step, device, args.decode_steps, 2)
            memory = cache_memory_bytes(
                cache
            )  # after the steps: the adapter has dropped the V rows no step reads
            row = {
                "n": n,
                "batch": B,
                "method": method,
                "retrieval": args.retrieval if fold is not None else None,
                "step_median_ms": 1e3 * statistics.median(times),
                # the retrieval hop ranks once per chunk of steps: the mean carries that step
                "step_mean_ms": 1e3 * statistics.mean(times),
                "cache_gib": memory["total"] / 2**30,
                "kv_gib": memory["kv"] / 2**30,
                "levels_gib": memory["levels"] / 2**30,
                "peak_gib": peak_gib(device),
            }
            graphed(row, "step_graph_ms", step, device, args.decode_steps)
        except torch.OutOfMemoryError:
            row = {"n": n, "batch": B, "method": method, "oom": True}
        except Exception as err:  # noqa: BLE001 - record and go on
            row = {
                "n": n,
                "batch": B,
                "method": method,
                "error": f"{type(err).__name__}: {err}"[:300],
            }
        finally:
            cache = None
            if fold is not None:
                untensorize(model)
            reset_peak(device)
        rows.append(row)
        print(f"decode n={n} B={B} {method}: {row}", flush=True)
    return rows


@torch.no_grad()
def attention_share(model, n: int, B: int, device, dtype, args) -> dict:
    """One layer's attention for one new token, x layers: SDPA over the cache vs LayerCache.step.

    Timed twice: call by call from Python (``*_ms``: launch-bound for the tensorized step) and as one
    CUDA graph of all layers (``*_graph_ms``: GPU time).
    """
    c = model.config
    H, Hkv, d, layers = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        c.num_hidden_layers,
    )
    R = (
        2 * (args.decode_steps + 2) + 2 * layers + 8
    )  # room for every step below, graphed ones included
    k = torch.randn(B, Hkv, n + R, d, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, n + R, d, device=device, dtype=dtype)
    q = torch.randn(B, H, 1, d, device=device, dtype=dtype)
    sdpa = timed(
        lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True),
        device,
        args.decode_steps,
        2,
    )
    fold = CausalFold(fold_for(n))

    def new_state() -> LayerCache:
        levels = [
            torch.randn(B, H, n, d, device=device, dtype=dtype) for _ in range(fold.order - 1)
        ]
        return LayerCache(
            fold,
            coverage="full",
            positional=TensorRoPE(d, base=500000.0).to(device),
            scale=d**-0.5,
            length=torch.full((B,), n, device=device),
            offset=torch.zeros(B, dtype=torch.long, device=device),
            levels=levels,
            stored=n,
        )

    state = new_state()

    def one_step():  # the plan is built once per step and shared by all layers: time both parts
        plan = state.plan(1, dtype)
        end = state.stored + 1
        state.step(q, k[:, :, :end], v[:, :, :end], plan)

    step_times = timed(one_step, device, args.decode_steps, 2)
    plan_times = timed(lambda: state.plan(1, dtype), device, args.decode_steps, 2)
    one_layer = statistics.median(step_times) - statistics.median(plan_times)
    out = {
        "n": n,
        "batch": B,
        "sdpa_ms": 1e3 * layers * statistics.median(sdpa),
        "tensorized_ms": 1e3 * (layers * one_layer + statistics.median(plan_times)),
        "tensorized_plan_ms": 1e3 * statistics.median(plan_times),
    }
    out["ratio"] = out["sdpa_ms"] / out["tensorized_ms"]

    def sdpa_layers():
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)

    def tensorized_layers():  # the layers of one step: each advances the state by one token
        for _ in range(layers):
            end = state.stored + 1
            state.step(q, k[:, :, :end], v[:, :, :end])

    graphed(out, "sdpa_graph_ms", sdpa_layers, device, args.decode_steps)
    graphed(out, "tensorized_graph_ms", tensorized_layers, device, args.decode_steps)
    if out.get("sdpa_graph_ms") and out.get("tensorized_graph_ms"):
        out["graph_ratio"] = out["sdpa_graph_ms"] / out["tensorized_graph_ms"]
    for name, override in DECODE_SWEEP.items() if args.decode_sweep else ():
        decode.CONFIG_OVERRIDE.clear()
        decode.CONFIG_OVERRIDE.update(override)
        del state
        state = new_state()  # fresh: the graphed steps above used the spare room of k and v
        graphed(out, f"tensorized_graph_ms[{name}]", tensorized_layers, device, args.decode_steps)
    decode.CONFIG_OVERRIDE.clear()
    print(f"attention share n={n} B={B}: {out}", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument(
        "--decode",
        type=str,
        nargs="*",
        default=["32768:1", "32768:8", "131072:1", "131072:2"],
        help="n:batch pairs for the decode measurements",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="forward through torch.compile (both methods)"
    )
    parser.add_argument(
        "--decode-sweep",
        action="store_true",
        help="also time the decode-kernel configs of DECODE_SWEEP",
    )
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny model and lengths, for a CPU check of the script"
    )
    parser.add_argument(
        "--layers", type=int, default=32, help="decoder layers of the 8B-shaped model"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print per-kernel times of one tensorized forward at this n and exit",
    )
    parser.add_argument(
        "--block-sparse-config",
        type=json.loads,
        default={},
        help='launch settings of the retrieval hop\'s kernels (kernels.block_sparse.CONFIG_OVERRIDE), e.g. {"fwd_heads": 2}',
    )
    parser.add_argument(
        "--contiguous-qkv",
        action="store_true",
        help="experiment: copy q, k, v to (B, H, n, d) before the kernels (tests whether layout matters)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--top-level-cache",
        choices=["native", "int8"],
        default="native",
        help="how the tensorized decode cache stores the top hop's input (tensorize's top_level_cache)",
    )
    parser.add_argument(
        "--memory-loop",
        type=int,
        default=0,
        help="run only the memory loop: 10 forwards at this n returning their cache (gc off)",
    )
    parser.add_argument(
        "--retrieval",
        type=json.loads,
        default=None,
        help='forward with the retrieval hop, e.g. {"shared": true, "chunk": 64, '
        '"representative": "bound", "sliding": true}',
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if (
        args.compile
    ):  # our attention is already one fused kernel per hop: compile runs around it, not through it
        from transformers import AttentionInterface

        AttentionInterface.register(
            text_adapter.ATTENTION_NAME, torch.compiler.disable(text_adapter._attention)
        )
    if args.block_sparse_config:
        from seqtensor.kernels import block_sparse

        block_sparse.CONFIG_OVERRIDE.update(args.block_sparse_config)
    if args.contiguous_qkv:
        attend = text_adapter.tensorized_attention
        text_adapter.tensorized_attention = lambda q, k, v, *a, **kw: attend(
            q.contiguous(), k.contiguous(), v.contiguous(), *a, **kw
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.lengths, args.decode, args.reps, args.decode_steps = (
            [256, 1024],
            ["1024:1", "1024:2"],
            2,
            3,
        )
        FOLDS.update({256: (4, 8, 8), 1024: (4, 16, 16)})
    t0 = time.time()
    model, dtype = build_model(args, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {
        "device": name,
        "backend": resolve_backend("auto", device),
        "dtype": str(dtype),
        "tiny": args.tiny,
        "contiguous_qkv": args.contiguous_qkv,
        "block_sparse_config": args.block_sparse_config,
        "top_level_cache": args.top_level_cache,
        "compile": args.compile,
        "layers": args.layers,
        "torch": torch.__version__,
        "build_s": round(time.time() - t0, 1),
    }
    print(f"model built in {results['build_s']} s on {name}", flush=True)
    if args.profile:
        print(profile_forward(model, args.profile, device), flush=True)
        return
    out = Path(args.out or f"benchmarks/results/llm_e2e_{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.memory_loop:
        results["memory_loop"] = memory_loop(model, args.memory_loop, 10, device)
        out.write_text(json.dumps(results, indent=1))
        return

    def save():
        out.write_text(json.dumps(results, indent=1))

    results["forward"] = forward_latency(model, args.lengths, device, args)
    save()
    results["decode"], results["attention_share"] = [], []
    for spec in args.decode:
        n, B = (int(x) for x in spec.split(":"))
        results["decode"] += decode_latency(model, n, B, device, dtype, args)
        save()
        if B == 1:
            try:
                results["attention_share"].append(attention_share(model, n, B, device, dtype, args))
            except Exception as err:  # noqa: BLE001
                results["attention_share"].append(
                    {"n": n, "batch": B, "error": f"{type(err).__name__}: {err}"[:300]}
                )
            save()
    results["wall_s"] = round(time.time() - t0, 1)
    save()
    print("\n| n | SDPA fwd s | tensorized fwd s | speed-up |")
    print("|---|---|---|---|")
    for n in args.lengths:
        by = {r["method"]: r.get("median_s") for r in results["forward"] if r["n"] == n}
        speed = f"{by['sdpa'] / by['tensorized']:.2f}x" if by["sdpa"] and by["tensorized"] else "-"
        fmt = lambda x: "error" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {n} | {fmt(by['sdpa'])} | {fmt(by['tensorized'])} | {speed} |")
    print("\n| n | B | SDPA step ms | tensorized step ms | SDPA cache GiB | tensorized cache GiB |")
    print("|---|---|---|---|---|---|")
    for spec in args.decode:
        n, B = (int(x) for x in spec.split(":"))
        by = {r["method"]: r for r in results["decode"] if r["n"] == n and r["batch"] == B}
        cell = lambda r, k: "OOM" if r.get("oom") else ("error" if "error" in r else f"{r[k]:.2f}")  # noqa: E731
        print(
            f"| {n} | {B} | {cell(by['sdpa'], 'step_median_ms')} | {cell(by['tensorized'], 'step_median_ms')} | "
            f"{cell(by['sdpa'], 'cache_gib')} | {cell(by['tensorized'], 'cache_gib')} |"
        )
    print(f"\nwall {results['wall_s']} s; results in {out}")


if __name__ == "__main__":
    main()
