"""The one training loop, ``Trainer``. Every adapter and estimator trains through it.

Its pieces live beside it in ``seqtensor.train``: settings in ``config``, the default optimizer and
schedule in ``optim``, batch and loss handling in ``batches``, checkpoints in ``checkpoint`` and the
process-group setup in ``distributed``. ``Callback`` (the hooks ``fit`` calls) is defined here.

Contract
--------
``loss_fn(model, batch)`` returns a scalar loss tensor, or ``(loss, metrics)`` with ``metrics`` a
dict of scalars that are averaged and logged beside the loss. Without ``loss_fn`` the trainer calls
``model(**batch)`` for dict batches and ``model(batch)`` otherwise; the result must be a scalar
tensor, have a ``.loss`` (Hugging Face outputs) or be a dict with a ``"loss"`` entry. Under DDP
``loss_fn`` receives the DDP wrapper: call it, and reach attributes through ``trainer.model``.

A *step* is one optimizer update over ``grad_accum_steps`` micro-batches; ``max_steps``,
``eval_every``, ``log_every``, ``checkpoint_every`` and the ``step`` of every record count these.
Under ``torchrun`` every rank runs ``fit``; rank 0 alone shows progress and writes logs and
checkpoints.

With ``ema_decay`` the trainer also keeps an exponential moving average of the trainable weights
(from the weights after the first step); evaluation, the best weights and the weights ``fit`` ends
with are the average's, while the optimizer steps the raw weights.

Resuming is exact: a checkpoint holds the weights (and their average), optimizer, scheduler, the
random state of every rank and the data position (epoch and batches consumed), so on CPU N steps + resume + N steps give
the same weights as 2N steps straight. Evaluation, callbacks and checkpoints never change the
training randomness (their RNG use is undone), so the training trajectory does not depend on them
either.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import check
from .batches import batch_size, split_loss, to_device
from .checkpoint import (
    CHECKPOINT_FORMAT,
    MetricsLog,
    atomic_save,
    atomic_write_text,
    batches_to_skip,
    capture_rng,
    check_resumable,
    config_fingerprint,
    load_checkpoint,
    plain_config,
    restore_rng,
    seed_everything,
)
from .config import TrainerConfig
from .distributed import (
    DistEnv,
    ResumableDistributedSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    gradient_sync,
    init_distributed,
    load_model_state,
    load_optimizer_state,
    make_loader,
    model_state,
    optimizer_state,
    resolve_device,
    wrap_model,
)
from .optim import default_optimizer, default_scheduler, lr_multiplier

__all__ = [
    "TrainerConfig",
    "Trainer",
    "Callback",
    "lr_multiplier",
    "default_optimizer",
    "default_scheduler",
]


class Callback:
    """Hooks ``fit`` calls on every rank; set ``trainer.should_stop = True`` to stop after the
    current step.

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


_END = object()


# ---------------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------------


@dataclass
class _EarlyStopping:
    """Best value of the monitored metric, the step it came at, and evaluations without
    improvement."""

    mode: str  # "min" or "max"
    min_delta: float
    patience: int | None
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_step: int | None = None  # step of the latest evaluation
    stopped: bool = False

    _STATE = ("best", "best_step", "bad_evals", "last_step", "stopped")

    def update(self, score: float, step: int) -> bool:
        """Record an evaluation; True when ``score`` is a new best (NaN never is)."""
        self.last_step = step
        if self.best is None:
            better = math.isfinite(score)
        elif self.mode == "min":
            better = score < self.best - self.min_delta
        else:
            better = score > self.best + self.min_delta
        if better:
            self.best, self.best_step, self.bad_evals = score, step, 0
        else:
            self.bad_evals += 1
            self.stopped = self.patience is not None and self.bad_evals >= self.patience
        return better

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state[k])


@dataclass(frozen=True)
class _Position:
    """Where training can resume: after ``step``, ``batch`` batches into ``epoch``, with these RNG
    states."""

    step: int
    epoch: int
    batch: int
    rng: dict[str, Any]  # global generators right after the step
    epoch_rng: dict[
        str, Any
    ]  # global generators when the epoch's iterator was created (replayed on resume)
    # While the work after a step or an epoch (logging, evaluation, callbacks) runs: the history
    # length, early-stopping state, best weights and step stats from before it. A checkpoint written
    # then (Ctrl-C, or a callback) stores these, and the resumed run redoes that work.
    pending: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Train any ``nn.Module`` with a loss, in one process or under ``torchrun`` (DDP or FSDP).

    Parameters
    ----------
    model : nn.Module
        Trained in place; moved to the configured device.
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> loss | (loss, metrics)``; see the module docstring.
    config : TrainerConfig, optional
        Training settings; defaults to ``TrainerConfig()``.
    eval_fn : callable, optional
        ``eval_fn(model, loader) -> dict[str, float] | float``, called in eval mode under
        ``no_grad`` on every rank (results averaged over ranks). Default: the mean of ``loss_fn``
        and its metrics over the validation data, weighted by batch size. Keys are prefixed with
        ``val_``.
    callbacks : sequence of Callback, optional
    optimizer_factory : callable, optional
        ``(model, config) -> Optimizer``; default ``default_optimizer`` (AdamW).
    scheduler_factory : callable, optional
        ``(optimizer, config, total_steps) -> LRScheduler | None``, stepped once per optimizer step;
        default ``default_scheduler`` (warm-up then cosine / linear / constant).
    collate_fn : callable, optional
        For the DataLoaders the trainer builds from Datasets.
    model_config : mapping or object with ``to_dict()``, optional
        Stored in checkpoints with its fingerprint; resuming with a different one raises ValueError.
    fsdp_policy : callable, optional
        With ``strategy="fsdp"``: ``policy(submodule) -> bool`` picks the submodules sharded as
        units (default: the children of every ``nn.ModuleList``).

    Attributes
    ----------
    history_ : list of dict
        One record per logged or evaluated step: ``step``, ``epoch`` and metrics (``loss``, ``lr``,
        ``grad_norm``, ``val_*``).
    global_step_ : int
        Optimizer steps taken.
    epoch_ : int
        0-based epoch in progress (the number of finished epochs between epochs).
    best_score_, best_step_ : float or None, int or None
        Best value of ``monitor`` and the step it was reached at.
    stopped_early_ : bool
        Whether early stopping ended training.
    checkpoint_path_ : Path or None
        Last checkpoint written or resumed from.
    device_ : torch.device
    should_stop : bool
        Set by a callback to stop after the current step.

    Examples
    --------
    >>> trainer = Trainer(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), TrainerConfig(epochs=3))
    >>> trainer.fit(TensorDataset(x, y), val_data=TensorDataset(xv, yv))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        config: TrainerConfig | None = None,
        *,
        eval_fn: Callable[[nn.Module, Iterable[Any]], Mapping[str, float] | float] | None = None,
        callbacks: Sequence[Callback] = (),
        optimizer_factory: Callable[[nn.Module, TrainerConfig], torch.optim.Optimizer]
        | None = None,
        scheduler_factory: Callable[..., Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        model_config: Any = None,
        fsdp_policy: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.eval_fn = eval_fn
        self.callbacks = callbacks
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.collate_fn = collate_fn
        self.model_config = model_config
        self.fsdp_policy = fsdp_policy
        self.should_stop = False

    # -- public entry points -------------------------------------------------------------------

    @property
    def best_score_(self) -> float | None:
        return self._stopping.best

    @property
    def best_step_(self) -> int | None:
        return self._stopping.best_step

    @property
    def stopped_early_(self) -> bool:
        return self._stopping.stopped

    def fit(
        self,
        train_data: Any,
        val_data: Any = None,
        *,
        resume: bool | str | os.PathLike[str] = False,
    ) -> Trainer:
        """Train; returns ``self``. The global random generators are seeded for the run and given
        back as they were when it ends.

        Parameters
        ----------
        train_data : Dataset, DataLoader or re-iterable of batches
        val_data : Dataset, DataLoader or re-iterable of batches, optional
        resume : bool or path
            True: continue from ``checkpoint_dir/last.pt`` if it exists (else start fresh); a path:
            continue from that checkpoint.
        """
        self._caller_rng: dict[str, Any] | None = None
        try:
            self._prepare(train_data, val_data)
            self._run(resume)
        finally:
            if (
                self._caller_rng is not None
            ):  # fit seeds the global generators; the caller gets theirs back
                restore_rng(self._caller_rng, self.device_)
        return self

    def evaluate(self, data: Any) -> dict[str, float]:
        """Validation metrics over ``data`` (keys prefixed ``val_``), averaged over ranks.

        Runs in eval mode under ``no_grad`` and leaves the global random state as it found it.
        """
        check(hasattr(self, "_position"), "call fit() before evaluate()", RuntimeError)
        loader = data if data is self._val_loader else self._loader(data, "data", train=False)[0]
        rng = capture_rng(self.device_)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = (
                    self._eval_custom(loader)
                    if self.eval_fn is not None
                    else self._eval_mean_loss(loader)
                )
        finally:
            self.model.train(training)
            restore_rng(rng, self.device_)
        return {k if k.startswith("val_") else f"val_{k}": v for k, v in metrics.items()}

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the state after the last step to ``path`` (default ``checkpoint_dir/last.pt``)
        atomically.

        Under torchrun every rank must call it (states are gathered); rank 0 writes.
        """
        check(hasattr(self, "_position"), "call fit() before save_checkpoint()", RuntimeError)
        check(
            path is not None or self._cfg.checkpoint_dir is not None,
            "save_checkpoint() needs a path when checkpoint_dir is None",
        )
        target = Path(path) if path is not None else self._checkpoint_file()
        state = self._checkpoint_state(gather=True)
        if state is not None:
            atomic_save(state, target)
            if self._logs is not None:
                self._logs.write_csv(self.history_)
        if self._env.is_distributed:
            barrier()  # the file exists for every rank once this returns
        self.checkpoint_path_ = target
        self._call("on_checkpoint", target)
        return target

    # -- setup ---------------------------------------------------------------------------------

    def _prepare(self, train_data: Any, val_data: Any) -> None:
        """Validate, pick device and ranks, seed, build loaders, wrap the model, build optimizer and
        schedule."""
        cfg = self.config if self.config is not None else TrainerConfig()
        check(
            isinstance(cfg, TrainerConfig),
            f"config must be a TrainerConfig, got {type(cfg).__name__}",
            TypeError,
        )
        cfg.validate()
        model_type = type(self.model).__name__
        check(
            isinstance(self.model, nn.Module),
            f"model must be an nn.Module, got {model_type}",
            TypeError,
        )
        check(
            self.loss_fn is None or callable(self.loss_fn),
            "loss_fn must be callable or None",
            TypeError,
        )
        check(
            self.eval_fn is None or callable(self.eval_fn),
            "eval_fn must be callable or None",
            TypeError,
        )
        check(
            all(isinstance(c, Callback) for c in self.callbacks),
            "callbacks must be Callback instances",
            TypeError,
        )
        check(
            cfg.patience is None or val_data is not None, "patience (early stopping) needs val_data"
        )
        self._cfg = cfg
        self._setup_runtime(cfg)
        self._train_loader, self._epoch_len = self._loader(train_data, "train_data", train=True)
        self._val_loader = (
            None if val_data is None else self._loader(val_data, "val_data", train=False)[0]
        )
        self._wrapped = wrap_model(self.model, self._strategy, self.device_, self.fsdp_policy)
        self.model.train()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        check(len(self._params) > 0, "model has no trainable parameters")
        self._optimizer = (self.optimizer_factory or default_optimizer)(self.model, cfg)
        check(
            isinstance(self._optimizer, torch.optim.Optimizer),
            "optimizer_factory must return an Optimizer",
            TypeError,
        )
        self._epochs = (
            cfg.epochs if cfg.epochs is not None else (1 if cfg.max_steps is None else None)
        )
        self._total_steps = self._count_total_steps()
        self._scheduler = (self.scheduler_factory or default_scheduler)(
            self._optimizer, cfg, self._total_steps
        )
        self._model_config = None if self.model_config is None else plain_config(self.model_config)
        self._fingerprint = (
            None if self.model_config is None else config_fingerprint(self._model_config)
        )
        self._reset_state()

    def _setup_runtime(self, cfg: TrainerConfig) -> None:
        """Device, process group, strategy, precision and seeds."""
        device = resolve_device(cfg.device)
        env = DistEnv() if cfg.strategy == "none" else init_distributed(device)
        self._strategy = (
            ("ddp" if env.is_distributed else "none") if cfg.strategy == "auto" else cfg.strategy
        )
        self._env, self.device_ = env, device
        bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self._amp_dtype = torch.bfloat16 if bf16 else None
        self._caller_rng = capture_rng(device)
        seed_everything(
            cfg.seed + env.rank
        )  # different dropout masks per rank; the data order uses cfg.seed alone

    def _loader(self, data: Any, name: str, *, train: bool) -> tuple[Iterable[Any], int | None]:
        cfg = self._cfg
        return make_loader(
            data,
            name,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle and train,
            drop_last=cfg.drop_last and train,
            seed=cfg.seed,  # not seed + rank: every rank must draw the same permutation
            num_workers=cfg.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device_.type == "cuda",
            env=self._env,
        )

    def _count_total_steps(self) -> int | None:
        """Steps the run will take if nothing stops it early (None if the data length is
        unknown)."""
        cfg = self._cfg
        per_epoch = (
            None if self._epoch_len is None else math.ceil(self._epoch_len / cfg.grad_accum_steps)
        )
        by_epochs = None if self._epochs is None or per_epoch is None else self._epochs * per_epoch
        known = [n for n in (cfg.max_steps, by_epochs) if n is not None]
        return min(known) if known else None

    def _reset_state(self) -> None:
        self.history_: list[dict[str, Any]] = []
        self.global_step_ = 0
        self.epoch_ = 0
        self._batch = 0  # batches of the current epoch consumed by finished steps
        self._stopping = _EarlyStopping(self._cfg.mode, self._cfg.min_delta, self._cfg.patience)
        self.should_stop = False
        self.checkpoint_path_: Path | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._ema: list[torch.Tensor] | None = None  # average of self._params (ema_decay > 0)
        self._stats: dict[str, float] = {}
        self._redo_stats: dict[str, float] | None = (
            None  # resumed inside a step's after-work: its stats
        )
        self._updating = False
        # The random state after each step is snapshot (about 0.2 ms, NumPy's being slow) only when
        # something can need it: a checkpoint (periodic or Ctrl-C) or a callback whose RNG use must
        # be undone.
        self._track_rng = self._cfg.checkpoint_dir is not None or len(self.callbacks) > 0
        self._clear_sums()
        self._epoch_rng = capture_rng(self.device_)
        self._mark()

    def _open_logs(self) -> None:
        cfg, main = self._cfg, self._env.is_main
        self._logs = MetricsLog(cfg.log_dir) if cfg.log_dir is not None and main else None
        if self._logs is not None:
            self._logs.reset(self.history_)
            config_file = Path(cfg.log_dir) / "trainer_config.json"  # type: ignore[arg-type]
            atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", config_file)
        self._bar = tqdm(
            total=self._total_steps,
            initial=self.global_step_ - (self._redo_stats is not None),
            disable=not (cfg.progress and main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    # -- the loop ------------------------------------------------------------------------------

    def _run(self, resume: bool | str | os.PathLike[str]) -> None:
        if resume is not False:
            self._resume(resume)
        self._open_logs()
        self._call("on_fit_start")
        try:
            self._train()
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            self._bar.close()
        self._finish()

    def _train(self) -> None:
        if (
            self._redo_stats is not None
        ):  # the checkpoint came during the last step's after-work: redo it
            self._stats, self._redo_stats = self._redo_stats, None
            if self._after_step():
                return
        while not (self._done() or self._stopping.stopped):
            if self._batch == 0:
                self._call("on_epoch_start", self.epoch_)
            if self._run_epoch() or self._end_epoch():
                return

    def _run_epoch(self) -> bool:
        """Train from the stored position to the end of the epoch; True when training must stop."""
        accum, group = self._cfg.grad_accum_steps, 0
        for batch in self._epoch_batches():
            self._batch += 1
            group += 1
            last = group == accum or self._batch == self._epoch_len
            # all-reduce gradients only on a group's last micro-batch; with an unknown epoch length
            # the last one is only known afterwards, so every micro-batch syncs
            with gradient_sync(self._wrapped, last or self._epoch_len is None):
                loss, metrics = self._loss(self._wrapped, batch)
                check(
                    loss.requires_grad,
                    "the training loss does not require grad (detached, or under no_grad?)",
                )
                (loss / accum).backward()
            self._accumulate(loss, metrics)
            if last:
                self._optimizer_step(group)
                group = 0
                if self._after_step():
                    return True
        if group:  # data of unknown length ended inside an accumulation group
            self._optimizer_step(group)
            if self._after_step():
                return True
        check(self._batch > 0, f"train_data yielded no batches in epoch {self.epoch_}")
        return False

    def _optimizer_step(self, group: int) -> None:
        """Average the accumulated gradients, check the loss, clip and step (one host sync per
        step)."""
        cfg, step = self._cfg, self.global_step_ + 1
        if (
            group != cfg.grad_accum_steps
        ):  # a short last group: make its gradient the mean over `group` micro-batches
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(cfg.grad_accum_steps / group)
        keys = sorted(self._metric_sums)
        stats = torch.stack([self._loss_sum, *(self._metric_sums[k] for k in keys)]) / group
        self._reduce(stats).div_(self._env.world_size)  # every rank logs, and checks, the same mean
        parts = [stats]
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
            norm = (
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )  # a DTensor under FSDP
            parts.append(norm.reshape(1).to(stats))
        values = torch.cat(parts).tolist()
        self._clear_sums()
        norm_value = values[-1] if cfg.grad_clip is not None else 0.0
        bad = (
            "loss"
            if not math.isfinite(values[0])
            else "gradient norm"
            if not math.isfinite(norm_value)
            else None
        )
        if bad is not None:
            self._optimizer.zero_grad(set_to_none=True)
            raise ValueError(
                f"{bad} is {values[0] if bad == 'loss' else norm_value} at step {step} (epoch "
                f"{self.epoch_}, "
                f"batch {self._batch}); weights were not updated. Lower lr, keep grad_clip on, use "
                "precision='fp32' or check the data for NaN/inf"
            )
        lr = float(self._optimizer.param_groups[0]["lr"])  # the rate this step uses
        self._stats = {"loss": values[0], **dict(zip(keys, values[1:])), "lr": lr}
        if cfg.grad_clip is not None:
            self._stats["grad_norm"] = norm_value
        self._updating = True  # an interrupt inside the update leaves no consistent state to save
        self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._update_average()
        self.global_step_ = step
        self._updating = False

    def _after_step(self) -> bool:
        """Log, evaluate, call back and checkpoint after a step; True when training must stop."""
        cfg, step = self._cfg, self.global_step_
        if self._track_rng:
            self._mark(pending=self._stats)
        record: dict[str, Any] = {"step": step, "epoch": self.epoch_}
        if step % cfg.log_every == 0:
            record.update(self._stats)
            self._bar.set_postfix(loss=f"{self._stats['loss']:.4g}", refresh=False)
        if (
            self._val_loader is not None
            and cfg.eval_every is not None
            and step % cfg.eval_every == 0
        ):
            record.update(self._evaluate_and_track())
        if len(record) > 2:
            self._log(record)
        self._bar.update(1)
        self._call("on_step_end", record)
        if self._track_rng:
            self._position = replace(self._position, pending=None)
        if (
            cfg.checkpoint_dir is not None
            and cfg.checkpoint_every is not None
            and step % cfg.checkpoint_every == 0
        ):
            self.save_checkpoint()
        if (
            self._track_rng
        ):  # callbacks leave the training randomness as it was (evaluation restores its own)
            restore_rng(self._position.rng, self.device_)
        return self._sync_stop() or self._done()

    def _end_epoch(self) -> bool:
        """Epoch-end evaluation and callbacks, then on to the next epoch; True when training must
        stop."""
        if (
            self._track_rng
        ):  # a resumed run repeats the epoch end (its position is the epoch's last step)
            self._position = replace(self._position, pending=self._snapshot(None))
        if self._val_loader is not None and self._cfg.eval_every is None:
            self._log(
                {"step": self.global_step_, "epoch": self.epoch_, **self._evaluate_and_track()}
            )
        self._call("on_epoch_end", self.epoch_)
        self.epoch_ += 1
        self._batch = 0
        if self._track_rng:
            self._mark()  # an interrupt from here on resumes at the start of the next epoch
        return self._sync_stop()

    def _finish(self) -> None:
        """Final checkpoint, a last evaluation if the last step had none, best-weight restore."""
        cfg = self._cfg
        self._mark()
        if cfg.checkpoint_dir is not None:
            # before the final evaluation: the checkpoint is the state a resumed run continues from
            self.save_checkpoint()
        if self._val_loader is not None and self._stopping.last_step != self.global_step_:
            self._log(
                {"step": self.global_step_, "epoch": self.epoch_, **self._evaluate_and_track()}
            )
        if (
            cfg.restore_best
            and self._best_state is not None
            and self.best_step_ != self.global_step_
        ):
            load_model_state(self.model, self._best_state)
        elif self._ema is not None:  # the best (or only) weights are the average's
            self._swap_average()
        self._ema = None
        if self._logs is not None:
            self._logs.write_csv(self.history_)
        self._call("on_fit_end")

    # -- pieces of the loop --------------------------------------------------------------------

    def _epoch_batches(self) -> Iterator[Any]:
        """The current epoch's batches from the stored position.

        A resumed epoch replays the random state of the epoch's start (so shuffling, even by a
        user's DataLoader drawing from the global generator, comes out the same), skips the consumed
        batches, then continues with the saved random state.
        """
        loader, skip = self._train_loader, self._batch
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch_)
        # skip inside the sampler (nothing is loaded) unless worker processes hold random state of
        # their own
        in_sampler = (
            isinstance(sampler, ResumableDistributedSampler)
            and getattr(loader, "num_workers", 0) == 0
            and getattr(loader, "batch_size", None) is not None
        )
        if isinstance(sampler, ResumableDistributedSampler):
            sampler.set_start(skip * loader.batch_size if in_sampler else 0)  # type: ignore[attr-defined]
        if skip == 0:
            self._epoch_rng = capture_rng(self.device_)
            return iter(loader)
        current = capture_rng(self.device_)
        restore_rng(self._epoch_rng, self.device_)
        batches = iter(loader)
        for i in range(0 if in_sampler else skip):
            check(
                next(batches, _END) is not _END,
                f"train_data has {i} batches in epoch {self.epoch_}, fewer than the {skip} the "
                "checkpoint "
                "consumed: resume with the same data",
            )
        restore_rng(current, self.device_)
        return batches

    def _loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = to_device(batch, self.device_)
        with self._autocast():
            if self.loss_fn is not None:
                return split_loss(self.loss_fn(model, batch), "loss_fn")
            if isinstance(batch, Mapping):
                return split_loss(model(**batch), "model(**batch)")
            return split_loss(model(batch), "model(batch)")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_.type, dtype=self._amp_dtype)

    def _accumulate(self, loss: torch.Tensor, metrics: Mapping[str, torch.Tensor]) -> None:
        self._loss_sum += loss.detach().float()
        for k, v in metrics.items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v

    def _clear_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device_)
        self._metric_sums: dict[str, torch.Tensor] = {}

    def _mark(self, pending: dict[str, float] | None = None) -> None:
        """Record the resumable position: the step, the data position and the random state now.

        ``pending``: the stats of the step whose after-work starts now (see ``_Position.pending``).
        """
        rng = capture_rng(self.device_)
        snapshot = None if pending is None else self._snapshot(pending)
        self._position = _Position(
            self.global_step_, self.epoch_, self._batch, rng, self._epoch_rng, snapshot
        )

    def _snapshot(self, stats: dict[str, float] | None) -> dict[str, Any]:
        return {
            "history_len": len(self.history_),
            "early_stopping": self._stopping.state_dict(),
            "best_model": self._best_state,
            "stats": stats,
        }

    def _done(self) -> bool:
        cfg = self._cfg
        return (cfg.max_steps is not None and self.global_step_ >= cfg.max_steps) or (
            self._epochs is not None and self.epoch_ >= self._epochs
        )

    def _sync_stop(self) -> bool:
        """Stop requested by early stopping or any rank's callback; every rank agrees."""
        stop = self.should_stop or self._stopping.stopped
        if self._env.is_distributed:
            stop = bool(self._reduce(torch.tensor([float(stop)], device=self.device_)).item())
        self.should_stop = stop
        return stop

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over this run's ranks; a no-op for strategy "none", even inside a torchrun process
        group."""
        return all_reduce_sum(x) if self._env.is_distributed else x

    def _log(self, record: dict[str, Any]) -> None:
        self.history_.append(record)
        if self._logs is not None:
            self._logs.append(record)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate_and_track(self) -> dict[str, float]:
        """Evaluate on the validation data; update the best score and weights and early stopping."""
        cfg, step = self._cfg, self.global_step_
        rng = capture_rng(self.device_)
        with self._averaged_weights():
            metrics = self.evaluate(self._val_loader)
            check(
                cfg.monitor in metrics,
                f"monitor={cfg.monitor!r} is not among the validation metrics {sorted(metrics)}",
            )
            if self._stopping.update(metrics[cfg.monitor], step) and cfg.restore_best:
                self._best_state = model_state(self.model)
        self._call("on_eval_end", metrics)
        restore_rng(rng, self.device_)
        return metrics

    # -- weight average ------------------------------------------------------------------------

    def _update_average(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, after each optimizer step."""
        decay = self._cfg.ema_decay
        if decay == 0:
            return
        with torch.no_grad():
            weights = [p.detach() for p in self._params]
            if self._ema is None:
                self._ema = [w.clone() for w in weights]
            else:
                torch._foreach_lerp_(self._ema, weights, 1.0 - decay)

    def _swap_average(self) -> None:
        """Exchange the model's trainable weights and their average (an involution)."""
        with torch.no_grad():
            for p, e in zip(self._params, self._ema):  # type: ignore[arg-type]
                held = p.detach().clone()
                p.copy_(e)
                e.copy_(held)

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """The average in the model for the block (no-op without one); raw weights back after,
        even on an interrupt, so a checkpoint never stores the average as the weights."""
        if self._ema is None:
            yield
            return
        self._swap_average()
        try:
            yield
        finally:
            self._swap_average()

    def _eval_mean_loss(self, loader: Iterable[Any]) -> dict[str, float]:
        """Mean loss and metrics over ``loader`` weighted by batch size, summed exactly over
        ranks."""
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in loader:
            loss, metrics = self._loss(self.model, batch)
            n = batch_size(batch)
            count += n
            for k, v in {"loss": loss.float(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * n
        keys = sorted(sums)
        totals = torch.stack(
            [*(sums[k] for k in keys), torch.tensor(float(count), device=self.device_)]
        )
        values = self._reduce(totals).tolist()
        check(values[-1] > 0, "validation data yielded no batches")
        return {k: v / values[-1] for k, v in zip(keys, values)}

    def _eval_custom(self, loader: Iterable[Any]) -> dict[str, float]:
        with self._autocast():
            out = self.eval_fn(self.model, loader)  # type: ignore[misc]
        metrics = {"loss": out} if isinstance(out, (numbers.Real, torch.Tensor)) else dict(out)
        keys = sorted(metrics)
        values = torch.tensor(
            [float(metrics[k]) for k in keys], device=self.device_, dtype=torch.float64
        )
        return dict(zip(keys, (self._reduce(values) / self._env.world_size).tolist()))

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_file(self) -> Path:
        return Path(self._cfg.checkpoint_dir) / "last.pt"  # type: ignore[arg-type]

    def _checkpoint_state(self, *, gather: bool) -> dict[str, Any] | None:
        """Everything a resumed run needs, as of the last step; None on ranks other than 0.

        ``gather=False`` (Ctrl-C, when other ranks may be gone) keeps only this rank's random state.
        """
        pos, cfg, env = self._position, self._cfg, self._env
        rng = {"current": pos.rng, "epoch_start": pos.epoch_rng}
        rngs = all_gather_objects(rng) if gather and self._env.is_distributed else [rng]
        sharded = self._strategy == "fsdp"  # gathering shards is collective: every rank takes part
        model = model_state(self.model) if sharded or env.is_main else None
        optim = optimizer_state(self._wrapped, self._optimizer) if sharded or env.is_main else None
        if not env.is_main:
            return None
        before = pos.pending or self._snapshot(
            None
        )  # the tracked state before the after-work in progress
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "optimizer": optim,
            "scheduler": None if self._scheduler is None else self._scheduler.state_dict(),
            "step": pos.step,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch,
            "epoch_len": self._epoch_len,
            "batch_size": cfg.batch_size,
            "world_size": env.world_size,
            "strategy": self._strategy,
            "rng": rngs,
            "early_stopping": before["early_stopping"],
            "best_model": before["best_model"],
            "weight_average": None
            if self._ema is None
            else [e.detach().to("cpu", copy=True) for e in self._ema],
            "history": list(self.history_[: before["history_len"]]),
            "redo_step_stats": before[
                "stats"
            ],  # not None: the resumed run redoes this step's after-work
            "trainer_config": cfg.to_dict(),
            "model_config": self._model_config,
            "fingerprint": self._fingerprint,
            "torch_version": str(torch.__version__),
        }

    def _save_interrupted(self) -> None:
        """Ctrl-C: rank 0 writes the state after the last finished step, without collectives."""
        if self._cfg.checkpoint_dir is None or not self._env.is_main:
            return
        if self._updating or self._strategy == "fsdp":
            why = (
                "it came during an optimizer update"
                if self._updating
                else "gathering FSDP shards needs every rank"
            )
            warnings.warn(f"interrupted: no checkpoint written, {why}", stacklevel=2)
            return
        state = self._checkpoint_state(gather=False)
        atomic_save(state, self._checkpoint_file())
        self.checkpoint_path_ = self._checkpoint_file()
        if self._logs is not None:
            self._logs.write_csv(self.history_)

    def _resume(self, resume: bool | str | os.PathLike[str]) -> None:
        """Load a checkpoint into the freshly prepared run (a missing ``last.pt`` with
        ``resume=True`` starts fresh)."""
        if resume is True:
            check(
                self._cfg.checkpoint_dir is not None,
                "resume=True needs checkpoint_dir (or pass resume=<path>)",
            )
            path = self._checkpoint_file()
            if not path.exists():
                return
        else:
            path = Path(resume)  # type: ignore[arg-type]
        state = load_checkpoint(path)
        check_resumable(
            state,
            f"checkpoint {str(path)!r}",
            shapes={k: v.shape for k, v in self.model.state_dict().items()},
            fingerprint=self._fingerprint,
            model_config=self._model_config,
            strategy=self._strategy,
        )
        load_model_state(self.model, state["model"])
        load_optimizer_state(self._wrapped, self._optimizer, state["optimizer"])
        if self._scheduler is not None and state["scheduler"] is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        self._stopping.load_state_dict(state["early_stopping"])
        self._best_state = state["best_model"]
        average = state.get("weight_average")
        check(
            average is not None or self._cfg.ema_decay == 0 or state["step"] == 0,
            f"checkpoint {str(path)!r} holds no weight average: resume it with ema_decay=0",
        )
        if average is not None:
            check(
                self._cfg.ema_decay > 0 and len(average) == len(self._params),
                f"checkpoint {str(path)!r} holds a weight average but this run has "
                f"ema_decay={self._cfg.ema_decay} and {len(self._params)} trainable tensors",
            )
            self._ema = [a.to(p.device, p.dtype) for a, p in zip(average, self._params)]
        self.history_ = list(state["history"])
        self._redo_stats = state.get("redo_step_stats")
        self.global_step_, self.epoch_ = state["step"], state["epoch"]
        self._batch = batches_to_skip(
            state,
            batch_size=self._cfg.batch_size,
            world_size=self._env.world_size,
            epoch_len=self._epoch_len,
        )
        self._restore_rank_rng(state["rng"])
        self.checkpoint_path_ = path

    def _restore_rank_rng(self, rngs: Sequence[Mapping[str, Any]]) -> None:
        rank = self._env.rank
        if rank < len(rngs):
            restore_rng(rngs[rank]["current"], self.device_)
            self._epoch_rng = dict(rngs[rank]["epoch_start"])
        else:
            # a Ctrl-C checkpoint under DDP holds rank 0's state only, or the run has more ranks now
            warnings.warn(
                f"checkpoint has no random state for rank {rank}: reseeding it", stacklevel=3
            )
            seed_everything(self._cfg.seed + rank + self.global_step_)
            self._epoch_rng = capture_rng(self.device_)
        self._mark()
