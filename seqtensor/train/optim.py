"""The trainer's default optimizer and learning-rate schedule; ``Trainer`` takes factories to
replace both."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._validation import check, check_choice
from .config import SCHEDULES, TrainerConfig

__all__ = ["lr_multiplier", "default_optimizer", "default_scheduler"]


def lr_multiplier(
    schedule: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> Callable[[int], float]:
    """Factor on the peak lr at 0-based step ``s``: linear warm-up, then cosine, linear or no decay.

    Parameters
    ----------
    schedule : {"cosine", "linear", "constant"}
    warmup_steps : int
        Steps of linear warm-up, ``(s + 1) / warmup_steps``.
    total_steps : int or None
        Last step of the decay; required unless ``schedule == "constant"``.
    min_lr_ratio : float
        Factor reached at ``total_steps``.
    """
    check_choice("schedule", schedule, SCHEDULES)
    check(
        schedule == "constant" or total_steps is not None,
        f"schedule={schedule!r} needs the total number of steps: set max_steps or epochs with a "
        "sized "
        "train_data, or use schedule='constant'",
    )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # type: ignore[operator]
        decay = (
            0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        )
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def default_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW where matrices (ndim >= 2) get weight decay and biases / norm gains do not, as in
    nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def default_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainerConfig, total_steps: int | None
) -> torch.optim.lr_scheduler.LRScheduler:
    """``LambdaLR`` over ``lr_multiplier`` with the config's schedule."""
    factor = lr_multiplier(config.schedule, config.warmup_steps, total_steps, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
