"""The one trainer every adapter uses: loop, config, optimizer, checkpoints, distributed setup."""

from .config import TrainerConfig
from .trainer import Callback, Trainer

__all__ = ["Trainer", "TrainerConfig", "Callback"]
