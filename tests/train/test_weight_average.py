"""Trainer's weight average (``ema_decay``): checked against the average recomputed by hand from the
raw weights of a run without it (the average never changes the training trajectory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from seqtensor.train.checkpoint import load_checkpoint
from seqtensor.train.trainer import Callback, Trainer, TrainerConfig


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))


def make_data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(
        x, x @ torch.linspace(-1, 1, 4)[:, None] + 0.1 * torch.randn(n, 1, generator=g)
    )


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def config(**kwargs) -> TrainerConfig:
    base = dict(batch_size=8, lr=1e-2, progress=False, log_every=1, max_steps=12, seed=3)
    base.update(kwargs)
    return TrainerConfig(**base)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Record(Callback):
    """The raw weights after every step (an evaluation at that step has already run)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_step_end(self, trainer, record) -> None:
        self.weights.append(flat(trainer.model).clone())


def by_hand(weights: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    """The average after each step: the first step's weights, then decay * avg + (1 - decay) * w."""
    out = [weights[0].double()]
    for w in weights[1:]:
        out.append(decay * out[-1] + (1 - decay) * w.double())
    return out


def test_fit_ends_with_the_average_of_the_raw_trajectory():
    raw, averaged = Record(), Record()
    plain = Trainer(make_model(), mse, config(), callbacks=[raw]).fit(make_data())
    ema = Trainer(make_model(), mse, config(ema_decay=0.9), callbacks=[averaged]).fit(make_data())
    # the optimizer steps the raw weights: the same trajectory with or without the average
    assert all(torch.equal(a, b) for a, b in zip(raw.weights, averaged.weights))
    expected = by_hand(raw.weights, 0.9)[-1]
    torch.testing.assert_close(flat(ema.model).double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flat(plain.model), flat(ema.model))


def test_validation_scores_the_average_and_the_best_average_is_restored():
    val = make_data(16, seed=7)
    raw = Record()
    trainer = Trainer(make_model(), mse, config(ema_decay=0.7, eval_every=3), callbacks=[raw]).fit(
        make_data(), val_data=val
    )
    averages = by_hand(raw.weights, 0.7)
    probe = make_model()
    x, y = val.tensors
    for record in (r for r in trainer.history_ if "val_loss" in r):
        torch.nn.utils.vector_to_parameters(
            averages[record["step"] - 1].float(), probe.parameters()
        )
        probe.eval()
        with torch.no_grad():
            expected = float(F.mse_loss(probe(x), y))
        assert record["val_loss"] == pytest.approx(expected, rel=1e-5)
    best = averages[trainer.best_step_ - 1].float()
    torch.testing.assert_close(flat(trainer.model), best, rtol=1e-5, atol=1e-6)


def test_resume_with_the_average_is_exact(tmp_path):
    kw = dict(ema_decay=0.8, eval_every=4, checkpoint_dir=str(tmp_path / "ckpt"))
    val = make_data(8, seed=9)

    class StopAt(Callback):
        def on_step_end(self, trainer, record) -> None:
            trainer.should_stop = trainer.global_step_ >= 5

    straight = Trainer(make_model(), mse, config(ema_decay=0.8, eval_every=4)).fit(
        make_data(), val_data=val
    )
    Trainer(make_model(), mse, config(**kw), callbacks=[StopAt()]).fit(make_data(), val_data=val)
    state = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert state["step"] == 5 and len(state["weight_average"]) == 4
    resumed = Trainer(make_model(seed=1), mse, config(**kw)).fit(
        make_data(), val_data=val, resume=True
    )
    assert torch.equal(flat(resumed.model), flat(straight.model))
    assert resumed.history_ == straight.history_
    # a checkpoint with an average does not resume into a run without one, nor the reverse
    with pytest.raises(ValueError, match="weight average"):
        Trainer(make_model(), mse, config(checkpoint_dir=kw["checkpoint_dir"])).fit(
            make_data(), resume=True
        )
    plain_dir = str(tmp_path / "plain")
    Trainer(make_model(), mse, config(max_steps=3, checkpoint_dir=plain_dir)).fit(make_data())
    with pytest.raises(ValueError, match="no weight average"):
        Trainer(make_model(), mse, config(ema_decay=0.8, checkpoint_dir=plain_dir)).fit(
            make_data(), resume=True
        )


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_bad_decay_names_the_field(value):
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(make_model(), mse, config(ema_decay=value)).fit(make_data())


def test_fsdp_with_an_average_is_refused():
    with pytest.raises(ValueError, match="ema_decay.*fsdp"):
        config(ema_decay=0.9, strategy="fsdp").validate()
