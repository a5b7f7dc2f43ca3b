"""``Callback``: the hooks ``Trainer.fit`` calls, for code that watches or steers a run from outside the loop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from .trainer import Trainer

__all__ = ["Callback"]


class Callback:
    """Hooks ``fit`` calls on every rank; set ``trainer.should_stop = True`` to stop after the current step.

    ``record`` is the dict appended to ``trainer.history_`` for the step (``step``, ``epoch`` and,
    on logging/evaluation steps, the metrics); ``metrics`` are the validation metrics.
    """

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...
