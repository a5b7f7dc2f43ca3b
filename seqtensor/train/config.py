"""``TrainerConfig``: every training setting in one dataclass, its validation and its JSON round
trip.

Kept apart from the loop so that code which only builds, stores or checks settings (estimators,
adapters, checkpoint metadata) reads them without the trainer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .._validation import check, check_choice, is_int
from .distributed import STRATEGIES

__all__ = ["TrainerConfig", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")

_PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainerConfig:
    """Training settings; ``to_dict`` / ``from_dict`` round-trip through plain JSON types."""

    # how long
    epochs: int | None = (
        None  # passes over train_data; None: 1, or as many as max_steps needs when it is set
    )
    max_steps: int | None = (
        None  # optimizer steps; with epochs also set, whichever is reached first stops
    )
    # data (applies when the trainer builds the DataLoader from a torch Dataset)
    # samples per micro-batch per process; global batch = batch_size * grad_accum_steps * ranks
    batch_size: int = 32
    shuffle: bool = True  # reshuffle every epoch with seed + epoch (same permutation on every rank)
    drop_last: bool = False  # drop an incomplete last training batch
    num_workers: int = 0  # DataLoader worker processes
    # optimisation
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = (
        0.01  # AdamW decoupled decay on matrices only, not on biases or norm gains (as nanoGPT)
    )
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    schedule: str = (
        "cosine"  # after warm-up: "cosine" or "linear" decay to min_lr_ratio * lr, or "constant"
    )
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr over this many steps
    min_lr_ratio: float = 0.1  # final lr / peak lr of the decaying schedules
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; None disables clipping
    # > 0: keep an exponential moving average of the weights (Polyak averaging) with this decay per
    # step; evaluation, the best-weight restore and the weights fit ends with use the average
    ema_decay: float = 0.0
    precision: str = (
        "auto"  # "auto" (bf16 autocast on CUDA with bf16 support, else fp32), "bf16" or "fp32"
    )
    # evaluation, early stopping, best model
    eval_every: int | None = None  # evaluate every this many steps; None: at the end of every epoch
    monitor: str = "val_loss"  # validation metric for early stopping and best-model restore
    mode: str = "min"  # "min" or "max": the better direction of monitor
    patience: int | None = (
        None  # stop after this many evaluations without improvement; None: never stop early
    )
    min_delta: float = 0.0  # smallest change of monitor that counts as an improvement
    restore_best: bool = (
        True  # end fit with the best weights by monitor (when validation data is given)
    )
    # logs and checkpoints (rank 0 writes them)
    log_every: int = 10  # steps between training records in history_ and the logs
    progress: bool = True  # tqdm progress bar
    log_dir: str | None = None  # folder for metrics.jsonl, metrics.csv and trainer_config.json
    checkpoint_dir: str | None = None  # folder for last.pt; the end of fit and Ctrl-C also write it
    checkpoint_every: int | None = (
        None  # steps between periodic checkpoints; None: only at the end and on Ctrl-C
    )
    # runtime
    seed: int = 0  # seeds Python, NumPy and torch (plus the rank) and the data order
    device: str = (
        "auto"  # "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu) or a torch device string
    )
    strategy: str = (
        "auto"  # "auto" (ddp under torchrun with >1 process, else none), "none", "ddp" or "fsdp"
    )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        check(not unknown, f"unknown TrainerConfig fields: {sorted(unknown)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("epochs", "max_steps", "eval_every", "patience", "checkpoint_every"):
            _check_int(name, getattr(self, name), low=1, optional=True)
        for name in ("batch_size", "grad_accum_steps", "log_every"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "num_workers", "seed"):
            _check_int(name, getattr(self, name), low=0)
        check(_finite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        for name, low, high in (
            ("weight_decay", 0, math.inf),
            ("min_lr_ratio", 0, 1),
            ("min_delta", 0, math.inf),
            ("ema_decay", 0, 1),
        ):
            value = getattr(self, name)
            check(
                _finite(value) and low <= value <= high,
                f"{name} must be in [{low}, {high}], got {value!r}",
            )
        check(
            self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
            f"grad_clip must be a positive number or None, got {self.grad_clip!r}",
        )
        check(
            len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, _PRECISIONS)
        check_choice("mode", self.mode, ("min", "max"))
        check_choice("strategy", self.strategy, ("auto", *STRATEGIES))
        check(self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        check(
            self.ema_decay == 0 or self.strategy != "fsdp",
            "ema_decay is not supported with strategy='fsdp' (the average would be sharded)",
        )


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: Any, *, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = is_int(value) and value >= low
    what = f"an integer >= {low}" + (" or None" if optional else "")
    check(ok, f"{name} must be {what}, got {value!r}")
