"""torchrun worker for tests/test_distributed.py: exact resume with 2 ranks (gloo), for DDP and FSDP.

For each strategy: 8 steps straight, then 3 steps + a new Trainer resuming to 8, with dropout (a
different random stream per rank), shuffling, accumulation, evaluation and checkpoints on. Rank 0
writes ``{strategy: {"equal", "history_equal", "ranks_agree", "files"}}`` as JSON to argv[2].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from seqtensor.train.distributed import (
    all_gather_objects,
    destroy_distributed,
    init_distributed,
    model_state,
)
from seqtensor.train.trainer import Callback, Trainer, TrainerConfig


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 16), nn.Linear(16, 16)])
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.drop(F.gelu(block(x)))
        return self.out(x)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        trainer.should_stop = trainer.global_step_ >= self.step


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def run(
    strategy: str, folder: Path, stop: int | None = None, resume: bool = False
) -> tuple[dict, list, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    data, val = (
        TensorDataset(x, x.sum(1, keepdim=True)),
        TensorDataset(x[:12], x[:12].sum(1, keepdim=True)),
    )
    torch.manual_seed(0)
    model = Net()
    config = TrainerConfig(
        max_steps=8,
        batch_size=4,
        grad_accum_steps=2,
        lr=1e-2,
        eval_every=3,
        checkpoint_every=2,
        log_every=1,
        restore_best=False,
        progress=False,
        device="cpu",
        strategy=strategy,
        seed=1,
        checkpoint_dir=str(folder),
        log_dir=str(folder),
    )
    trainer = Trainer(model, mse, config, callbacks=[StopAt(stop)] if stop else [])
    trainer.fit(data, val_data=val, resume=resume)
    local = (
        torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if strategy == "ddp"
        else torch.zeros(1)
    )
    return model_state(model), trainer.history_, local


def main(base: Path, out: Path) -> None:
    env = init_distributed("cpu")
    results = {}
    for strategy in ("ddp", "fsdp"):
        straight, history, local = run(strategy, base / strategy / "straight")
        run(strategy, base / strategy / "split", stop=3)
        resumed, resumed_history, _ = run(strategy, base / strategy / "split", resume=True)
        weights = all_gather_objects(local)
        if env.is_main:
            results[strategy] = {
                "equal": all(torch.equal(straight[k], resumed[k]) for k in straight),
                "history_equal": history == resumed_history,
                "ranks_agree": all(torch.equal(weights[0], w) for w in weights),
                "files": sorted(p.name for p in (base / strategy / "split").iterdir()),
            }
    if env.is_main:
        out.write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
