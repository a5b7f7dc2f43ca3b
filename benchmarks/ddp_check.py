"""Check that distributed training gives the weights one process gets with the same global batch.

    torchrun --nproc_per_node 2 benchmarks/ddp_check.py --device cuda            # NCCL, 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/ddp_check.py --device cpu             # gloo
    torchrun --nproc_per_node 2 benchmarks/ddp_check.py --device cpu --strategy fsdp

Every rank trains with ``batch_size = global_batch / world_size`` (shuffling, gradient accumulation,
clipping and warm-up + cosine on; dropout off, so the ranks' randomness cannot matter); rank 0 then
trains the same initial model alone with the full global batch and compares the final weights.
Prints a summary and writes ``benchmarks/results/ddp_<device>[_fsdp].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from seqtensor.train.checkpoint import atomic_write_text
from seqtensor.train.distributed import barrier, destroy_distributed, init_distributed, model_state
from seqtensor.train.trainer import Trainer, TrainerConfig

RESULTS = Path(__file__).resolve().parent / "results"


class ResidualMLP(nn.Module):
    """x (B, d_in) -> (B, 1); its blocks sit in a ModuleList, so FSDP shards them one by one."""

    def __init__(self, d_in: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(n: int, d_in: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.1 * x.sum(1, keepdim=True)
    return TensorDataset(x, y)


def train(args: argparse.Namespace, strategy: str, batch_size: int) -> tuple[nn.Module, float]:
    """Fresh model with the fixed initial weights, trained; returns it and the wall time of fit."""
    torch.manual_seed(0)
    model = ResidualMLP(args.d_in, args.width, args.depth)
    config = TrainerConfig(
        max_steps=args.steps,
        batch_size=batch_size,
        grad_accum_steps=args.grad_accum,
        lr=3e-3,
        warmup_steps=2,
        precision="fp32",
        device=args.device,
        strategy=strategy,
        progress=False,
        seed=0,
    )
    data = make_data(args.samples, args.d_in)
    start = time.perf_counter()
    Trainer(model, mse, config).fit(data)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument(
        "--samples", type=int, default=96, help="dataset size (a few epochs at the defaults)"
    )
    parser.add_argument("--d-in", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: results/ddp_<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        # exact fp32 products on both sides: TF32 would make the comparison measure TF32 noise
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    env = init_distributed(args.device)
    if env.world_size < 2 or args.global_batch % env.world_size:
        print(
            "launch with torchrun --nproc_per_node N (N >= 2 dividing --global-batch)",
            file=sys.stderr,
        )
        return 2
    import torch._dynamo as _dynamo  # noqa: F401  (DDP's constructor imports it, ~4 s on CPU: keep that out of the timing)

    barrier()
    model, dist_time = train(args, args.strategy, args.global_batch // env.world_size)
    dist_state = model_state(model)  # collective under FSDP; the full weights land on rank 0
    ok = True
    if env.is_main:
        reference, single_time = train(args, "none", args.global_batch)
        ref_state = model_state(reference)
        diffs = {k: (dist_state[k] - ref_state[k]).abs().max().item() for k in ref_state}
        ok = all(
            torch.allclose(dist_state[k], ref_state[k], rtol=args.rtol, atol=args.atol)
            for k in ref_state
        )
        result = {
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "backend": torch.distributed.get_backend(),
            "strategy": args.strategy,
            "world_size": env.world_size,
            "steps": args.steps,
            "global_batch": args.global_batch,
            "grad_accum_steps": args.grad_accum,
            "params": sum(p.numel() for p in reference.parameters()),
            "max_abs_diff": max(diffs.values()),
            "rtol": args.rtol,
            "atol": args.atol,
            "allclose": ok,
            "distributed_fit_s": round(dist_time, 3),
            "single_fit_s": round(single_time, 3),
            "torch": torch.__version__,
        }
        suffix = "" if args.strategy == "ddp" else f"_{args.strategy}"
        out = args.out or RESULTS / f"ddp_{args.device}{suffix}.json"
        atomic_write_text(json.dumps(result, indent=2) + "\n", out)
        print(
            f"{args.strategy} x{env.world_size} ({result['backend']}) vs 1 process: "
            f"max |dw| = {result['max_abs_diff']:.3g}, allclose(rtol={args.rtol}, atol={args.atol}) = {ok}; "
            f"fit {dist_time:.2f}s vs {single_time:.2f}s -> {out}"
        )
    barrier()
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
