"""Long-distance matching and passkey copying: does a model connect tokens thousands of positions apart?

Task. A sequence of n noise tokens (ids 5..15) carries two *signal* tokens (ids 1..4): one at a
random position in the first eighth, one in the last eighth, so they are at least 3n/4 apart
(3,072 positions at n = 4096, 12,288 at 16,384). The label is whether the two signals are equal
(balanced). Per-token features pooled by a linear head cannot decide equality (the pooled
features of a different pair are the midpoint of two equal pairs'), so the two tokens must meet
through attention.

Task ``--task passkey`` (causal models only): noise tokens with a marker and a key of
``--key-length`` digits (default 5) hidden in the first half, and at the end the marker ``ASK``
followed by the same digits; the model is a language model scored on those digits only
(teacher-forced; a sequence counts when all are the argmax). The key is >= n/2 positions back, so
with a fold of finest dim b < n/2 only the coarse hops can bring it: what an adapted LLM's passkey
needs, learnt from scratch.

Models. Token embedding -> 2-layer stack -> max pooling -> linear head (passkey: a linear head on
every position), identical except for attention, trained through ``seqtensor.Trainer`` with the
same data, seed and steps:

- ``full``: bidirectional dense attention (global RoPE);
- ``tensorized``: bidirectional tensorized attention (``ExtrapolatingFold(64)``, tensor RoPE);
- ``tensorized-causal-full`` / ``tensorized-causal-axial``: causal stacks with the two causal
  coverages (docs/semantics.md, "Causal");
- ``full-causal``: causal dense attention, the baseline for the two causal rows.

Reported per length and model: test accuracy, final training loss, median milliseconds per
optimizer step (warm-up steps excluded), tokens per second and the fold. JSON goes to
``benchmarks/results/long_range[_passkey]_<device>.json``; a table is printed.

    python examples/long_range.py                          # CPU-sized: n = 1024, a few minutes
    python examples/long_range.py --threads 1 --lengths 1024 4096 --full-max 1024   # the recorded CPU run
    python examples/long_range.py --device cuda --lengths 1024 4096 16384 --steps 300
    python examples/long_range.py --task passkey --key-length 5 --variants full-causal tensorized-causal-full \
        --layers 3 --d-model 64 --heads 4 --lengths 256 --steps 2000 --lr 1e-3 --train-size 32768   # recorded (CPU)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from seqtensor.core.folds import ExtrapolatingFold, resolve_fold
from seqtensor.nn import Decoder, Encoder, ModelConfig, SequenceHead
from seqtensor.train.trainer import Callback, Trainer, TrainerConfig

VOCAB = 16  # 0 unused, 1..4 signals, 5..15 noise
SIGNALS = 4
FOLD = ExtrapolatingFold(64)
VARIANTS = {  # name -> (attention, causal, coverage)
    "full": ("full", False, "full"),
    "tensorized": ("tensorized", False, "full"),
    "full-causal": ("full", True, "full"),
    "tensorized-causal-full": ("tensorized", True, "full"),
    "tensorized-causal-axial": ("tensorized", True, "axial"),
}
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
KEY, ASK, DIGITS, PASSKEY_VOCAB = 1, 2, 3, 32  # digits 3..12, noise 13..31


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


def matching_task(n_samples: int, length: int, seed: int) -> TensorDataset:
    """(ids (N, n) int64, label (N,) int64): 1 when the early and the late signal token are equal."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(SIGNALS + 1, VOCAB, size=(n_samples, length))
    first = rng.randint(1, SIGNALS + 1, size=n_samples)
    same = rng.rand(n_samples) < 0.5
    shift = rng.randint(1, SIGNALS, size=n_samples)  # a different signal when not same
    second = np.where(same, first, (first - 1 + shift) % SIGNALS + 1)
    rows = np.arange(n_samples)
    ids[rows, rng.randint(0, length // 8, size=n_samples)] = first
    ids[rows, rng.randint(length - length // 8, length, size=n_samples)] = second
    return TensorDataset(torch.from_numpy(ids), torch.from_numpy(same.astype(np.int64)))


def passkey_task(n_samples: int, length: int, seed: int, key_length: int = 5) -> TensorDataset:
    """(ids (N, n) int64,): noise, ``KEY`` + ``key_length`` digits at a random place in the first
    half, and the last tokens ``ASK`` + the same digits."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(DIGITS + 10, PASSKEY_VOCAB, size=(n_samples, length))
    key = np.concatenate(
        [
            np.full((n_samples, 1), KEY),
            rng.randint(DIGITS, DIGITS + 10, size=(n_samples, key_length)),
        ],
        1,
    )
    at = rng.randint(0, length // 2 - key_length, size=n_samples)
    ids[np.arange(n_samples)[:, None], at[:, None] + np.arange(key_length + 1)] = key
    ids[:, -key_length - 1 :] = np.where(np.arange(key_length + 1) == 0, ASK, key)
    return TensorDataset(torch.from_numpy(ids))


class Copier(nn.Module):
    """ids (B, n) -> embedding -> causal Decoder -> next-token logits (B, n, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(PASSKEY_VOCAB, config.d_model)
        self.stack = Decoder(config)
        self.head = nn.Linear(config.d_model, PASSKEY_VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.embed(ids)))


def key_logits(model: nn.Module, ids: torch.Tensor, key_length: int) -> torch.Tensor:
    """Logits (B, key_length, vocab) of the asked digits: the outputs at ASK and at all but the last digit."""
    return model(ids)[:, -key_length - 1 : -1]


def key_loss(model: nn.Module, batch, key_length: int = 5) -> torch.Tensor:
    (ids,) = batch
    return nn.functional.cross_entropy(
        key_logits(model, ids, key_length).transpose(1, 2), ids[:, -key_length:]
    )


class Matcher(nn.Module):
    """ids (B, n) -> embedding (B, n, D) -> Encoder or causal Decoder -> max pool -> logits (B, 2)."""

    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.stack = Decoder(config) if causal else Encoder(config)
        self.head = SequenceHead(config.d_model, 2, pooling="max")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.embed(ids)))


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    ids, label = batch
    return nn.functional.cross_entropy(model(ids), label)


class StepTimer(Callback):
    """Wall time of every optimizer step (the trainer syncs the device once per step)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.times = [time.perf_counter()]

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        self.times.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        deltas = np.diff(self.times).tolist()
        return deltas[warmup:] or deltas


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: TensorDataset,
    device: torch.device,
    batch_size: int,
    key_length: int = 5,
) -> float:
    """Share of test sequences right: the label (matching), or all asked digits (passkey)."""
    model.eval()
    ids = data.tensors[0]
    correct = 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if len(data.tensors) == 2:
            right = (
                model(chunk.to(device)).argmax(-1).cpu()
                == data.tensors[1][start : start + batch_size]
            )
        else:
            right = (
                key_logits(model, chunk.to(device), key_length).argmax(-1).cpu()
                == chunk[:, -key_length:]
            ).all(1)
        correct += int(right.sum())
    return correct / len(ids)


# ---------------------------------------------------------------------------------------------
# One run and the sweep
# ---------------------------------------------------------------------------------------------


def run_one(variant: str, length: int, train: TensorDataset, test: TensorDataset, args) -> dict:
    attention, causal, coverage = VARIANTS[variant]
    config = ModelConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        attention=attention,
        fold=FOLD,
        coverage=coverage,
        backend=args.backend,
    )
    torch.manual_seed(
        args.seed
    )  # identical initial weights for every attention (same parameter set)
    model = Copier(config) if args.task == "passkey" else Matcher(config, causal)
    timer = StepTimer()
    trainer = Trainer(
        model,
        functools.partial(key_loss, key_length=args.key_length)
        if args.task == "passkey"
        else cross_entropy,
        TrainerConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=min(20, args.steps // 10),
            weight_decay=0.0,
            progress=args.progress,
            log_every=max(1, args.steps // 10),
            seed=args.seed,
            device=args.device,
            precision="fp32",
            strategy="none",
        ),
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(train)
    train_s = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.history_ if "loss" in r]
    step_s = statistics.median(timer.step_seconds(warmup=min(3, args.steps - 1)))
    return {
        "variant": variant,
        "length": length,
        "attention": attention,
        "causal": causal,
        "coverage": coverage if attention == "tensorized" and causal else None,
        "fold": list(resolve_fold(FOLD, length).dims) if attention == "tensorized" else None,
        "accuracy": accuracy(model, test, trainer.device_, args.batch_size, args.key_length),
        "final_loss": losses[-1] if losses else None,
        "ms_per_step": 1e3 * step_s,
        "tokens_per_s": args.batch_size * length / step_s,
        "train_s": train_s,
        "steps": trainer.global_step_,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def print_table(rows: list[dict]) -> None:
    header = f"{'n':>6}  {'model':<24} {'fold':<14} {'accuracy':>8} {'loss':>7} {'ms/step':>9} {'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        fold = "x".join(map(str, r["fold"])) if r["fold"] else "-"
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        print(
            f"{r['length']:>6}  {r['variant']:<24} {fold:<14} {r['accuracy']:>8.3f} {loss:>7} "
            f"{r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10.0f}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument(
        "--task", default="match", choices=["match", "passkey"], help="see the module docstring"
    )
    p.add_argument(
        "--key-length", type=int, default=5, help="digits of the passkey (--task passkey)"
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[1024], help="sequence lengths (default 1024)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="default: all (passkey: the causal ones)",
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per model")
    p.add_argument(
        "--full-max",
        type=int,
        default=None,
        help="skip full attention above this length (its cost grows as n^2)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--train-size", type=int, default=2048, help="training sequences (re-used across epochs)"
    )
    p.add_argument("--test-size", type=int, default=512)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--backend", default="auto", help="tensorized backend: auto, reference or triton"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/long_range_<device>.json)",
    )
    args = p.parse_args(argv)
    if min(args.lengths) < 16:
        p.error(
            f"--lengths must be >= 16 (the signals sit in the first and last eighth), got {args.lengths}"
        )
    if args.variants is None:
        args.variants = [
            v for v, (_, causal, _) in VARIANTS.items() if causal or args.task == "match"
        ]
    if args.task == "passkey" and not all(VARIANTS[v][1] for v in args.variants):
        p.error(f"--task passkey trains language models: causal variants only, got {args.variants}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, skipped = [], []
    for length in args.lengths:
        task = (
            functools.partial(passkey_task, key_length=args.key_length)
            if args.task == "passkey"
            else matching_task
        )
        train, test = (
            task(args.train_size, length, seed=args.seed),
            task(args.test_size, length, seed=args.seed + 1),
        )
        for variant in args.variants:
            if (
                VARIANTS[variant][0] == "full"
                and args.full_max is not None
                and length > args.full_max
            ):
                skipped.append(
                    {
                        "variant": variant,
                        "length": length,
                        "reason": f"n > --full-max={args.full_max}",
                    }
                )
                print(f"n={length} {variant}: skipped (n > --full-max={args.full_max})", flush=True)
                continue
            rows.append(run_one(variant, length, train, test, args))
            r = rows[-1]
            print(
                f"n={length} {variant}: accuracy {r['accuracy']:.3f}, {r['ms_per_step']:.1f} ms/step",
                flush=True,
            )
    print()
    print_table(rows)
    name = "cpu" if device.type == "cpu" else device.type
    out = (
        args.out or RESULTS / f"long_range_{'' if args.task == 'match' else 'passkey_'}{name}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": {
            "match": "long-distance matching: label = (signal in first n/8) == (signal in last n/8)",
            "passkey": "copy a key of --key-length digits hidden in the first half after ASK at the end (all digits right)",
        }[args.task],
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()
        if hasattr(os, "getloadavg")
        else None,  # other jobs skew ms/step
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "chance_accuracy": 0.5 if args.task == "match" else 1e-5,
    }
    out.write_text(json.dumps({"meta": meta, "results": rows, "skipped": skipped}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
