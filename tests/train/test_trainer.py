"""Trainer: configuration, the loop, exact resume, checkpoints, early stopping, logs and bad input."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import seqtensor.train.checkpoint as ckpt
from seqtensor.train.checkpoint import load_checkpoint
from seqtensor.train.trainer import Callback, Trainer, TrainerConfig, lr_multiplier

# ---------------------------------------------------------------------------------------------
# helpers: a tiny MLP with dropout on a noisy linear task
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs)


def make_data(n: int = 40, d_in: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = x @ torch.linspace(-1, 1, d_in)[:, None] + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def config(**kwargs) -> TrainerConfig:
    base = dict(batch_size=8, lr=1e-2, progress=False, log_every=1)
    base.update(kwargs)
    return TrainerConfig(**base)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record) -> None:
        if trainer.global_step_ >= self.step:
            trainer.should_stop = True


# ---------------------------------------------------------------------------------------------
# configuration and schedule
# ---------------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = TrainerConfig(
        max_steps=7, betas=(0.8, 0.95), eval_every=3, log_dir="logs", precision="fp32"
    )
    again = TrainerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown TrainerConfig fields.*bogus"):
        TrainerConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("max_steps", -3),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("grad_accum_steps", True),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("grad_clip", 0.0),
        ("min_lr_ratio", 2.0),
        ("betas", (1.0, 0.9)),
        ("schedule", "step"),
        ("precision", "fp16"),
        ("mode", "up"),
        ("strategy", "deepspeed"),
        ("patience", 0),
        ("warmup_steps", -1),
    ],
)
def test_invalid_config_names_the_field(field, value):
    trainer = Trainer(make_model(), mse, config(**{field: value}))
    with pytest.raises(ValueError, match=field):
        trainer.fit(make_data())


def test_lr_multiplier_warmup_cosine_linear_constant():
    cos = lr_multiplier("cosine", 4, 14, 0.1)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    assert lr_multiplier("linear", 0, 10, 0.0)(5) == pytest.approx(0.5)
    assert lr_multiplier("constant", 2, None, 0.1)(50) == 1.0
    with pytest.raises(ValueError, match="total number of steps"):
        lr_multiplier("cosine", 0, None, 0.1)


@settings(max_examples=50, deadline=None)
@given(
    schedule=st.sampled_from(["cosine", "linear", "constant"]),
    warmup=st.integers(0, 20),
    total=st.integers(1, 200),
    floor=st.floats(0, 1),
)
def test_lr_multiplier_rises_then_never_increases(schedule, warmup, total, floor):
    factor = lr_multiplier(schedule, warmup, total, floor)
    values = [factor(s) for s in range(total + 5)]
    assert all(0 < v <= 1 + 1e-12 for v in values[:warmup])
    after = values[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert all(min(floor, 1.0) - 1e-12 <= v <= 1 + 1e-12 for v in after)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def test_fit_learns_and_keeps_history():
    model = make_model(dropout=0.0)
    trainer = Trainer(model, mse, config(epochs=15, eval_every=10))
    assert trainer.fit(make_data(), val_data=make_data(16, seed=1)) is trainer
    assert trainer.global_step_ == 15 * 5  # 40 samples / batch 8
    train = [r for r in trainer.history_ if "loss" in r]
    assert len(train) == 75 and {"step", "epoch", "loss", "lr", "grad_norm"} <= set(train[0])
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]
    evaluated = [r["step"] for r in trainer.history_ if "val_loss" in r]
    assert evaluated == [10, 20, 30, 40, 50, 60, 70, 75]  # + the final evaluation
    assert trainer.history_[-1]["val_loss"] < 0.2
    assert train[-1]["lr"] == pytest.approx(
        1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 74 / 75)))
    )


def test_same_seed_same_weights_other_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        model = make_model()
        Trainer(model, mse, config(epochs=2, seed=seed)).fit(make_data())
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_fit_gives_the_callers_random_state_back():
    trainer, data = Trainer(make_model(), mse, config(max_steps=2)), make_data()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    trainer.fit(data)
    assert torch.equal(torch.rand(3), expected)


def test_evaluation_and_callbacks_do_not_change_training():
    """Evaluation and callbacks leave the RNG as they found it: they cannot move the weights."""

    class Noisy(Callback):
        def on_step_end(self, trainer, record):
            torch.rand(3), np.random.rand(), random.random()

    a, b = make_model(), make_model()
    Trainer(a, mse, config(max_steps=9)).fit(make_data())
    cfg = config(max_steps=9, eval_every=2, restore_best=False)
    Trainer(b, mse, cfg, callbacks=[Noisy()]).fit(make_data(), val_data=make_data(8, seed=2))
    assert torch.equal(flat(a), flat(b))


def test_grad_accumulation_matches_the_large_batch():
    a, b = make_model(dropout=0.0), make_model(dropout=0.0)
    Trainer(a, mse, config(epochs=2, batch_size=4, grad_accum_steps=2, shuffle=False)).fit(
        make_data()
    )
    Trainer(b, mse, config(epochs=2, batch_size=8, shuffle=False)).fit(make_data())
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)


def test_short_last_group_is_a_mean_over_its_batches():
    """36 samples, batch 8, accum 2: the epoch's last group has one batch of 4 samples, still averaged."""
    a, b = make_model(dropout=0.0), make_model(dropout=0.0)
    data = make_data(36)
    Trainer(
        a, mse, config(epochs=1, batch_size=8, grad_accum_steps=2, shuffle=False, grad_clip=None)
    ).fit(data)
    batches = [(data.tensors[0][i : i + 16], data.tensors[1][i : i + 16]) for i in (0, 16, 32)]
    Trainer(b, mse, config(epochs=1, grad_clip=None)).fit(batches)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)


def test_default_loss_and_metrics_from_the_model():
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, y):
            pred = self.lin(x)
            return SimpleNamespace(loss=F.mse_loss(pred, y), logits=pred)

    xy = make_data()
    batches = [
        {"x": xy.tensors[0][i : i + 8], "y": xy.tensors[1][i : i + 8]} for i in range(0, 40, 8)
    ]
    trainer = Trainer(DictModel(), config=config(epochs=2)).fit(batches, val_data=batches[:2])
    assert trainer.global_step_ == 10 and "val_loss" in trainer.history_[-1]

    def with_metrics(model, batch):
        pred = model(batch[0])
        return F.mse_loss(pred, batch[1]), {"mae": (pred - batch[1]).abs().mean()}

    trainer = Trainer(make_model(), with_metrics, config(max_steps=3)).fit(
        make_data(), val_data=make_data(8)
    )
    assert "mae" in trainer.history_[0] and "val_mae" in trainer.history_[-1]


def test_callbacks_see_hooks_and_can_stop():
    calls = []

    class Spy(StopAt):
        def on_fit_start(self, trainer):
            calls.append("fit_start")

        def on_epoch_start(self, trainer, epoch):
            calls.append(f"epoch_start{epoch}")

        def on_eval_end(self, trainer, metrics):
            calls.append("eval")

        def on_epoch_end(self, trainer, epoch):
            calls.append(f"epoch_end{epoch}")

        def on_fit_end(self, trainer):
            calls.append("fit_end")

    trainer = Trainer(make_model(), mse, config(epochs=5), callbacks=[Spy(7)])
    trainer.fit(make_data(), val_data=make_data(8))
    assert trainer.global_step_ == 7
    assert calls == [
        "fit_start",
        "epoch_start0",
        "eval",
        "epoch_end0",
        "epoch_start1",
        "eval",
        "fit_end",
    ]


def test_early_stopping_restores_the_best_weights():
    scores = iter([5.0, 4.0, 3.0, 3.5, 3.1, 3.2, 9.0])
    snapshots = {}

    class Snap(Callback):
        def on_step_end(self, trainer, record):
            snapshots[trainer.global_step_] = flat(trainer.model).clone()

    trainer = Trainer(
        make_model(),
        mse,
        config(epochs=20, eval_every=1, patience=3, monitor="val_score"),
        eval_fn=lambda model, loader: {"score": next(scores)},
        callbacks=[Snap()],
    )
    trainer.fit(make_data(), val_data=make_data(8))
    assert trainer.stopped_early_ and trainer.global_step_ == 6
    assert (trainer.best_step_, trainer.best_score_) == (3, 3.0)
    assert torch.equal(flat(trainer.model), snapshots[3])


def test_mode_max_and_missing_monitor():
    trainer = Trainer(make_model(), mse, config(max_steps=2, eval_every=1, monitor="val_acc"))
    with pytest.raises(ValueError, match="monitor='val_acc' is not among.*val_loss"):
        trainer.fit(make_data(), val_data=make_data(8))
    scores = iter([0.5, 0.7, 0.6])
    cfg = config(max_steps=3, eval_every=1, mode="max")
    trainer = Trainer(make_model(), mse, cfg, eval_fn=lambda m, d: next(scores))
    trainer.fit(make_data(), val_data=make_data(8))
    assert (trainer.best_step_, trainer.best_score_) == (2, 0.7)


def test_bf16_autocast_on_cpu_and_progress_bar(capsys):
    trainer = Trainer(make_model(), mse, config(max_steps=3, precision="bf16", progress=True))
    trainer.fit(make_data())
    assert trainer.global_step_ == 3 and math.isfinite(trainer.history_[-1]["loss"])
    assert "train" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------

# 40 samples in batches of 8 with accumulation 2: groups of 2, 2, 1 batches (3 steps per epoch), so
# step 7 is in the middle of epoch 2 and 14 steps cross four epoch boundaries.
RESUME = dict(
    max_steps=14,
    grad_accum_steps=2,
    warmup_steps=3,
    eval_every=4,
    checkpoint_every=2,
    restore_best=False,
    seed=5,
)


def _resume_run(tmp_path: Path, name: str, stop: int | None, **kwargs) -> Trainer:
    cfg = config(
        **RESUME, checkpoint_dir=str(tmp_path / name), log_dir=str(tmp_path / name), **kwargs
    )
    callbacks = [StopAt(stop)] if stop else []
    return Trainer(make_model(), mse, cfg, callbacks=callbacks)


def test_resume_continues_exactly(tmp_path):
    val = make_data(8, seed=9)
    straight = _resume_run(tmp_path, "straight", None).fit(make_data(), val_data=val)
    first = _resume_run(tmp_path, "split", 7).fit(make_data(), val_data=val)
    assert first.global_step_ == 7 and not torch.equal(flat(first.model), flat(straight.model))
    second = _resume_run(tmp_path, "split", None).fit(make_data(), val_data=val, resume=True)
    assert torch.equal(flat(second.model), flat(straight.model))
    assert second.history_ == straight.history_
    assert (second.best_score_, second.best_step_) == (straight.best_score_, straight.best_step_)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [
        json.loads(line) for line in lines
    ] == straight.history_  # part one's extra final eval was rewritten away
    with open(tmp_path / "split" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(straight.history_) and rows[0]["step"] == "1" and "val_loss" in rows[0]
    assert json.loads((tmp_path / "split" / "trainer_config.json").read_text())["max_steps"] == 14


def test_ctrl_c_mid_accumulation_saves_and_resumes_exactly(tmp_path):
    straight = _resume_run(tmp_path, "straight", None).fit(make_data())
    calls = 0

    def interrupting(model, batch):
        nonlocal calls
        calls += 1
        if (
            calls == 14
        ):  # epochs 0-1 took calls 1-10 (steps 1-6); step 7 took 11-12; 14 is step 8's second batch
            raise KeyboardInterrupt
        return mse(model, batch)

    cfg = config(**RESUME, checkpoint_dir=str(tmp_path / "split"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_model(), interrupting, cfg).fit(make_data())
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (7, 2, 2)
    resumed = Trainer(make_model(seed=1), mse, cfg).fit(
        make_data(), resume=tmp_path / "split" / "last.pt"
    )
    assert torch.equal(flat(resumed.model), flat(straight.model))


class InterruptOnce(Callback):
    """Ctrl-C from inside the after-work of step ``step``: its evaluation or its step-end callback."""

    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step, self.armed = hook, step, True

    def _maybe(self, trainer, hook: str) -> None:
        if self.armed and hook == self.hook and trainer.global_step_ == self.step:
            self.armed = False
            raise KeyboardInterrupt

    def on_eval_end(self, trainer, metrics) -> None:
        self._maybe(trainer, "on_eval_end")

    def on_step_end(self, trainer, record) -> None:
        self._maybe(trainer, "on_step_end")

    def on_epoch_end(self, trainer, epoch) -> None:
        self._maybe(trainer, "on_epoch_end")


@pytest.mark.parametrize(
    "hook, eval_every, step",
    [("on_eval_end", 2, 4), ("on_step_end", 2, 4), ("on_epoch_end", None, 10)],
)
def test_ctrl_c_during_evaluation_or_callbacks_resumes_exactly(tmp_path, hook, eval_every, step):
    """An interrupt while a step's (or an epoch's) evaluation or callbacks run: the checkpoint keeps the
    state from before that work and the resumed run redoes it, so weights, history and early
    stopping end as in an uninterrupted run (the evaluation already updated early stopping when
    on_eval_end fires)."""
    kw = dict(
        max_steps=16,
        eval_every=eval_every,
        checkpoint_every=1,
        restore_best=True,
        patience=50,
        seed=5,
    )
    val = make_data(8, seed=9)
    straight = Trainer(make_model(), mse, config(**kw)).fit(make_data(), val_data=val)
    cfg = config(**kw, checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_model(), mse, cfg, callbacks=[InterruptOnce(hook, step)]).fit(
            make_data(), val_data=val
        )
    assert load_checkpoint(tmp_path / "last.pt")["step"] == step
    resumed = Trainer(make_model(seed=1), mse, cfg).fit(make_data(), val_data=val, resume=True)
    assert torch.equal(flat(resumed.model), flat(straight.model))
    assert resumed.history_ == straight.history_
    assert resumed.best_step_ == straight.best_step_


@pytest.mark.parametrize("kind", ["dataloader", "list"])
def test_resume_with_a_user_loader_is_exact(tmp_path, kind):
    """A DataLoader shuffling from the global generator: the epoch's start is replayed on resume."""
    data = make_data()

    def loader():
        if kind == "list":
            return [
                (data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]) for i in range(0, 40, 8)
            ]
        return DataLoader(data, batch_size=8, shuffle=True)

    cfg = config(max_steps=8, checkpoint_dir=str(tmp_path / "ckpt"))
    straight = Trainer(make_model(), mse, config(max_steps=8)).fit(loader())
    Trainer(make_model(), mse, cfg, callbacks=[StopAt(3)]).fit(loader())
    resumed = Trainer(make_model(), mse, cfg).fit(loader(), resume=True)
    assert torch.equal(flat(resumed.model), flat(straight.model))


def test_resume_with_another_batch_size_warns_and_maps_the_position(tmp_path):
    cfg = config(max_steps=6, checkpoint_dir=str(tmp_path))
    Trainer(make_model(), mse, cfg, callbacks=[StopAt(2)]).fit(
        make_data()
    )  # 2 batches of 8 consumed
    trainer = Trainer(
        make_model(), mse, config(max_steps=6, batch_size=4, checkpoint_dir=str(tmp_path))
    )
    with pytest.warns(UserWarning, match="not an exact continuation"):
        trainer.fit(make_data(), resume=True)
    assert (
        trainer.global_step_ == 6 and trainer.epoch_ == 0
    )  # resumed at batch 4 of 10, then 4 more steps


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    trainer = Trainer(make_model(), mse, config(max_steps=2, checkpoint_dir=str(tmp_path)))
    trainer.fit(make_data(), resume=True)
    assert trainer.global_step_ == 2 and (tmp_path / "last.pt").is_file()
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        Trainer(make_model(), mse, config(max_steps=2)).fit(make_data(), resume=True)


# ---------------------------------------------------------------------------------------------
# checkpoints: atomic, validated
# ---------------------------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = Trainer(make_model(), mse, config(max_steps=2, checkpoint_dir=str(tmp_path)))
    trainer.fit(make_data())
    before = (tmp_path / "last.pt").read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt"
    ]  # no temporary file left behind
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_checkpoint_from_another_model_is_rejected(tmp_path):
    path = tmp_path / "last.pt"
    cfg = config(max_steps=1, checkpoint_dir=str(tmp_path))
    Trainer(make_model(), mse, cfg, model_config={"width": 16}).fit(make_data())
    with pytest.raises(
        ValueError,
        match=r"shape mismatch \[net.0.bias: checkpoint \(16,\) vs model \(32,\), net.0.w",
    ):
        Trainer(make_model(width=32), mse, config(max_steps=2)).fit(make_data(), resume=path)

    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"missing keys \[extra.bias, extra.weight\]"):
        Trainer(Wider(), mse, config(max_steps=2)).fit(make_data(), resume=path)
    with pytest.raises(ValueError, match="another model config.*width: 16 vs 32"):
        Trainer(make_model(), mse, config(max_steps=2), model_config={"width": 32}).fit(
            make_data(), resume=path
        )


def test_unreadable_checkpoints_are_clear(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a seqtensor trainer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        Trainer(make_model(), mse, config(max_steps=1)).fit(
            make_data(), resume=tmp_path / "missing.pt"
        )


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_empty_data_is_rejected():
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))
    with pytest.raises(ValueError, match="train_data is empty"):
        Trainer(make_model(), mse, config()).fit(empty)
    with pytest.raises(ValueError, match="train_data yields no batches"):
        Trainer(make_model(), mse, config()).fit([])
    with pytest.raises(ValueError, match="val_data is empty"):
        Trainer(make_model(), mse, config()).fit(make_data(), val_data=empty)
    with pytest.raises(ValueError, match="yields no batches"):
        Trainer(make_model(), mse, config(batch_size=64, drop_last=True)).fit(make_data())


def test_nan_loss_names_the_step():
    data = make_data()
    data.tensors[1][20] = float("nan")  # sample 20 sits in the third batch without shuffling
    model = make_model()
    with pytest.raises(ValueError, match=r"loss is nan at step 3 \(epoch 0, batch 3\)"):
        Trainer(model, mse, config(shuffle=False)).fit(data)
    assert torch.isfinite(flat(model)).all()  # the bad step never reached the weights


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: Trainer(make_model(), mse, config()).fit(x for x in range(3)),
            TypeError,
            "re-iterable",
        ),
        (lambda: Trainer(make_model(), mse, config()).fit(42), TypeError, "train_data must be"),
        (lambda: Trainer("model", mse, config()).fit(make_data()), TypeError, "nn.Module"),
        (
            lambda: Trainer(make_model(), mse, config(patience=2)).fit(make_data()),
            ValueError,
            "needs val_data",
        ),
        (
            lambda: Trainer(make_model(), lambda m, b: m(b[0])).fit(make_data()),
            TypeError,
            r"scalar loss.*\(32, 1\)",
        ),
        (
            lambda: Trainer(make_model(), lambda m, b: mse(m, b).detach()).fit(make_data()),
            ValueError,
            "require grad",
        ),
        (
            lambda: Trainer(make_model(), lambda m, b: (mse(m, b), {"lr": 1})).fit(make_data()),
            ValueError,
            "reserved",
        ),
        (
            lambda: Trainer(make_model(), mse, config(schedule="cosine")).fit(_Unsized()),
            ValueError,
            "number of steps",
        ),
        (lambda: Trainer(make_model(), mse, config()).evaluate(make_data()), RuntimeError, "fit"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        Trainer(make_model(), mse, config(device="cuda")).fit(make_data())


class _Unsized:
    """A re-iterable of 5 batches without __len__ (a stream of unknown length)."""

    def __iter__(self):
        data = make_data()
        return iter(
            [(data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]) for i in range(0, 40, 8)]
        )


def test_data_of_unknown_length_with_max_steps():
    trainer = Trainer(make_model(), mse, config(max_steps=7, grad_accum_steps=2)).fit(_Unsized())
    assert trainer.global_step_ == 7 and trainer.epoch_ == 2  # 3 steps per pass (2 + 2 + 1 batches)
