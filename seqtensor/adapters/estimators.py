"""scikit-learn estimators for whole sequences: ``SequenceClassifier`` and ``SequenceRegressor``.

Thin shells: ``fit`` validates with scikit-learn's own helpers, builds a
``ModelConfig`` and a small network (input embedding -> ``Encoder`` -> ``SequenceHead``) and trains
it through the one ``seqtensor.Trainer``; nothing here is a training loop.

Input layouts (legend: B samples, n sequence length, C channels per step, V vocabulary, D width):

- ``X`` of shape (B, n): one real value per step (univariate); scikit-learn counts the n steps as
  features, so ``n_features_in_ == n``.
- ``X`` of shape (B, n, C): C real values per step (multivariate); ``n_features_in_ == n`` too and
  ``n_channels_ == C``.
- ``vocab_size=V``: ``X`` of shape (B, n) holds integer tokens in ``[0, V)`` that go through an
  embedding instead of a linear projection.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn
from torch.utils.data import TensorDataset

from .._validation import check, check_choice, is_int
from ..nn import Encoder, ModelConfig, SequenceHead
from ..train.checkpoint import capture_rng, restore_rng
from ..train.trainer import Trainer, TrainerConfig

__all__ = ["SequenceClassifier", "SequenceRegressor", "SequenceNet"]

_PATIENCE = 5  # epochs without a better validation loss before early stopping
_PREDICT_TOKENS = 1 << 16  # tokens per prediction chunk (samples x seq_len)


# ---------------------------------------------------------------------------------------------
# The network: embed each step, encode the sequence, pool to one vector per sample
# ---------------------------------------------------------------------------------------------


class SequenceNet(nn.Module):
    """Step embedding + learned absolute positions -> ``Encoder`` -> ``SequenceHead``.

    The absolute positions give the pooled representation the order of the steps (a mean over
    steps would otherwise forget which value came where); attention still carries the config's
    own positional scheme.

    Parameters
    ----------
    config : ModelConfig of the encoder.
    seq_len : number of steps n (fixed at fit time, as scikit-learn fixes ``n_features_in_``).
    in_channels : C for real-valued inputs (B, n, C); ignored when ``vocab_size`` is set.
    out_dim : outputs per sample (classes or regression targets).
    pooling : "mean", "max", "last" or "first".
    vocab_size : V for integer token inputs (B, n), or None for real-valued inputs.
    """

    def __init__(
        self,
        config: ModelConfig,
        seq_len: int,
        in_channels: int,
        out_dim: int,
        pooling: str = "mean",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        D = config.d_model
        self.embed = (
            nn.Embedding(vocab_size, D) if vocab_size is not None else nn.Linear(in_channels, D)
        )
        self.position = nn.Parameter(torch.randn(seq_len, D) * 0.02)  # (n, D)
        self.encoder = Encoder(config)
        self.head = SequenceHead(D, out_dim, pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, C) float or (B, n) int tokens -> (B, out_dim)."""
        h = self.embed(x) + self.position  # (B, n, D)
        return self.head(self.encoder(h))


# ---------------------------------------------------------------------------------------------
# Shared estimator logic
# ---------------------------------------------------------------------------------------------


class _SequenceEstimator(BaseEstimator):
    """Parameters, validation, model building and prediction shared by both estimators."""

    def __init__(
        self,
        *,
        attention: str = "tensorized",
        fold: Any = None,
        positional: str = "tensor_rope",
        pooling: str = "mean",
        d_model: int = 16,
        n_layers: int = 1,
        n_heads: int = 2,
        dropout: float = 0.0,
        vocab_size: int | None = None,
        max_epochs: int = 20,
        batch_size: int = 32,
        learning_rate: float = 1e-2,
        validation_fraction: float | None = None,
        random_state: int | np.random.RandomState | None = None,
        device: str = "cpu",
        verbose: bool = False,
    ) -> None:
        self.attention = attention
        self.fold = fold
        self.positional = positional
        self.pooling = pooling
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.vocab_size = vocab_size
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = self.vocab_size is None  # (B, n, C) multivariate sequences
        tags.input_tags.two_d_array = True
        # CUDA kernels (atomics in backward) are not bit-reproducible; the CPU path is.
        tags.non_deterministic = self.device != "cpu"
        return tags

    # -- validation ------------------------------------------------------------------------

    def _check_params(self) -> None:
        check_choice("attention", self.attention, ("tensorized", "full"))
        check_choice("pooling", self.pooling, ("mean", "max", "last", "first"))
        for name in ("d_model", "n_layers", "n_heads", "max_epochs", "batch_size"):
            value = getattr(self, name)
            check(
                is_int(value) and value >= 1,
                f"{name} must be an int >= 1, got {value!r}",
            )
        check(
            isinstance(self.learning_rate, numbers.Real) and self.learning_rate > 0,
            f"learning_rate must be > 0, got {self.learning_rate!r}",
        )
        check(
            isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        if self.vocab_size is not None:
            check(
                is_int(self.vocab_size) and self.vocab_size >= 1,
                f"vocab_size must be None or an int >= 1, got {self.vocab_size!r}",
            )
        if self.validation_fraction is not None:
            check(
                isinstance(self.validation_fraction, numbers.Real)
                and 0.0 < self.validation_fraction < 1.0,
                f"validation_fraction must be None or in (0, 1), got {self.validation_fraction!r}",
            )

    def _validate_X(self, X, y=None, *, reset: bool, **y_options):
        """Validate X (and y at fit) with scikit-learn's helpers; return X as (B, n, C) or (B,
        n)."""
        if reset:
            self._check_params()
        tokens = self.vocab_size is not None
        common = dict(allow_nd=not tokens, dtype=None if tokens else np.float64, reset=reset)
        if y is None and not reset:
            X = validate_data(self, X, **common)
        else:
            X, y = validate_data(self, X, y, **common, **y_options)
        if tokens:
            X = self._check_tokens(X)
            if reset:
                self.n_channels_ = 1
        else:
            check(
                X.ndim in (2, 3),
                "X must have shape (n_samples, seq_len) or (n_samples, seq_len, n_features), got "
                f"{X.shape}",
            )
            check(
                X.ndim == 2 or X.shape[2] >= 1,
                f"X must have at least 1 feature per step, got shape {X.shape}",
            )
            X = X.reshape(X.shape[0], X.shape[1], -1)  # (B, n) -> (B, n, 1)
            _check_float32_range("X", X)
            if reset:
                self.n_channels_ = X.shape[2]
            check(
                X.shape[2] == self.n_channels_,
                f"X has {X.shape[2]} features per step, but {type(self).__name__} was fitted with "
                f"{self.n_channels_}",
            )
        return X, y

    def _check_tokens(self, X: np.ndarray) -> np.ndarray:
        check(
            X.ndim == 2,
            f"token input (vocab_size set) must have shape (n_samples, seq_len), got {X.shape}",
        )
        if not np.issubdtype(X.dtype, np.integer):
            check(
                np.issubdtype(X.dtype, np.floating) and np.all(np.mod(X, 1) == 0),
                f"with vocab_size set, X must hold integer token ids, got dtype {X.dtype}",
            )
        check(
            X.size == 0 or (X.min() >= 0 and X.max() < self.vocab_size),
            f"token ids must be in [0, vocab_size={self.vocab_size}), got range [{X.min()}, "
            f"{X.max()}]",
        )
        return X.astype(np.int64)

    # -- model -----------------------------------------------------------------------------

    def _model_config(self, seq_len: int) -> ModelConfig:
        extra = {} if self.fold is None else {"fold": self.fold}
        return ModelConfig(
            max_len=seq_len,  # positions of positional="learned"
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            attention=self.attention,
            positional=self.positional,
            **extra,
        )

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        if self.vocab_size is not None:
            return torch.as_tensor(X, dtype=torch.long)
        X = (X - self.x_mean_) / self.x_scale_  # per-channel standardization (B, n, C)
        return torch.tensor(X, dtype=torch.float32)

    def _fit_network(
        self, X: np.ndarray, targets: torch.Tensor, out_dim: int, loss_fn, stratify=None
    ):
        """Build the network and train it through ``seqtensor.Trainer``; sets fitted attributes."""
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        self.x_mean_, self.x_scale_ = None, None  # token ids are not standardized
        if self.vocab_size is None:
            std = X.std(axis=(0, 1))
            self.x_mean_ = X.mean(axis=(0, 1))  # (C,)
            self.x_scale_ = np.where(std > 0, std, 1.0)
        config = self._model_config(X.shape[1])
        with torch.random.fork_rng(
            devices=[]
        ):  # seed the initialization without touching global RNG
            torch.manual_seed(seed)
            net = SequenceNet(
                config, X.shape[1], self.n_channels_, out_dim, self.pooling, self.vocab_size
            )
        inputs = self._to_tensor(X)
        train, val = _split(inputs, targets, self.validation_fraction, rng, stratify)
        trainer_config = TrainerConfig(
            epochs=self.max_epochs,
            batch_size=self.batch_size,
            lr=self.learning_rate,
            weight_decay=0.0,
            patience=None if val is None else _PATIENCE,
            progress=bool(self.verbose),
            seed=seed,
            device=self.device,
            # an estimator is one process; torchrun users call the Trainer directly
            strategy="none",
        )
        trainer = Trainer(net, _batch_loss(loss_fn), trainer_config)
        global_rng = capture_rng()
        try:  # the trainer seeds the global generators; leave the caller's random state as it was
            trainer.fit(train, val)
        finally:
            restore_rng(global_rng)
        self.model_config_ = config
        # On the CPU, predictions run in float64 so that no sample's output depends on which others
        # share its batch (scikit-learn's subset and order invariance); weights stay exactly as
        # trained.
        self.model_ = net.eval().double() if trainer.device_.type == "cpu" else net.eval()
        self.history_ = trainer.history_
        self.n_iter_ = trainer.epoch_
        self.n_steps_ = trainer.global_step_
        return self

    def _forward(self, X: np.ndarray) -> np.ndarray:
        """Network outputs (B, out_dim) for validated X, as float64 numpy, in chunks of ~64k
        tokens."""
        param = next(self.model_.parameters())
        inputs = self._to_tensor(X)
        if inputs.is_floating_point():
            inputs = inputs.to(param.dtype)
        chunk = max(1, _PREDICT_TOKENS // max(1, X.shape[1]))
        outs = [np.empty((0, self.model_.head.proj.out_features))]
        with torch.inference_mode():
            for start in range(0, len(inputs), chunk):
                out = self.model_(inputs[start : start + chunk].to(param.device))
                outs.append(out.double().cpu().numpy())
        return np.concatenate(outs)


def _split(inputs, targets, fraction, rng, stratify):
    """Hold out ``fraction`` of the samples for early stopping (stratified for classifiers)."""
    if fraction is None:
        return TensorDataset(inputs, targets), None
    n = len(inputs)
    n_val = int(np.ceil(fraction * n))
    check(
        n - n_val >= 1 and n_val >= 1,
        f"validation_fraction={fraction} leaves no training or no validation sample out of "
        f"n_samples={n}",
    )
    idx = np.arange(n)
    try:
        tr, va = train_test_split(idx, test_size=n_val, random_state=rng, stratify=stratify)
    except ValueError:  # too few samples per class to stratify: plain random split
        tr, va = train_test_split(idx, test_size=n_val, random_state=rng)
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    return TensorDataset(inputs[tr], targets[tr]), TensorDataset(inputs[va], targets[va])


# ---------------------------------------------------------------------------------------------
# Public estimators
# ---------------------------------------------------------------------------------------------

_PARAMETERS_DOC = """
    Parameters
    ----------
    attention : {"tensorized", "full"}, default="tensorized"
        Attention in the encoder; the only switch a tensorized-versus-full comparison flips.
    fold : Fold, tuple of ints, fold strategy or None, default=None
        How tensorized attention folds the sequence; stored as given. None uses the
        ``ModelConfig`` default, ``ExtrapolatingFold(64)``.
    positional : str, default="tensor_rope"
        Positional scheme inside attention: "tensor_rope", "rope", "sinusoidal", "learned" or
        "none" (with ``attention="full"``, "tensor_rope" means global "rope"). The step embedding
        always adds learned absolute positions as well.
    pooling : {"mean", "max", "last", "first"}, default="mean"
        How the encoded sequence is pooled to one vector per sample.
    d_model, n_layers, n_heads : int, default=16, 1, 2
        Width, depth and heads of the encoder (small defaults: a quick baseline, not a big model).
    dropout : float, default=0.0
        Dropout on attention and MLP outputs.
    vocab_size : int or None, default=None
        Set it for integer token sequences: X of shape (n_samples, seq_len) with ids in
        ``[0, vocab_size)`` goes through an embedding.
    max_epochs : int, default=20
        Passes over the training data.
    batch_size : int, default=32
        Samples per optimizer step.
    learning_rate : float, default=1e-2
        Peak AdamW learning rate; the trainer decays it along a cosine to a tenth.
    validation_fraction : float or None, default=None
        Hold out this fraction of the training data for early stopping with best-model restore;
        None trains for ``max_epochs`` on all of it.
    random_state : int, RandomState instance or None, default=None
        Seeds initialization, shuffling and the validation split.
    device : str, default="cpu"
        Torch device for training and prediction ("cpu", "cuda", ...). On the CPU, fit and
        predict are reproducible for a fixed ``random_state``; on CUDA they are not bit-exact,
        and the estimator tags say so.
    verbose : bool, default=False
        Show the trainer's progress bar.
"""

_ATTRIBUTES_DOC = """
    n_features_in_ : int
        Sequence length seen in fit (scikit-learn counts the steps of (n_samples, seq_len) input as
        features).
    feature_names_in_ : ndarray of str
        Column names, when X was a DataFrame with string column names.
    n_channels_ : int
        Values per step: C for (n_samples, seq_len, C) input, 1 for 2-D and token input.
    x_mean_, x_scale_ : ndarray of shape (n_channels_,) or None
        Per-channel standardization of real-valued input (None for token input).
    n_iter_ : int
        Epochs trained (fewer than ``max_epochs`` when early stopping ended training).
    n_steps_ : int
        Optimizer steps taken.
    model_config_ : ModelConfig
        Configuration of the fitted encoder.
    model_ : SequenceNet
        The fitted network in eval mode, on the training device; on the CPU it is cast to float64
        (exactly the trained float32 weights) so predictions do not depend on batch composition.
    history_ : list of dict
        The trainer's metrics history.
"""


class SequenceClassifier(ClassifierMixin, _SequenceEstimator):
    __doc__ = (
        """Classify whole sequences with a tensorized-attention encoder.
"""
        + _PARAMETERS_DOC
        + """
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
"""
        + _ATTRIBUTES_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> from seqtensor.adapters.estimators import SequenceClassifier
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(64, 16))
    >>> y = (X[:, 3] > 0).astype(int)
    >>> clf = SequenceClassifier(random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape
    (2, 2)
"""
    )

    def fit(self, X, y):
        """Fit on X (n_samples, seq_len[, n_features]) and labels y (n_samples,). Returns self."""
        X, y = self._validate_X(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        check(
            len(self.classes_) >= 2,
            "SequenceClassifier needs samples of at least 2 classes in y; got 1 class "
            f"({self.classes_[0]!r})",
        )
        targets = torch.as_tensor(encoded, dtype=torch.long)
        return self._fit_network(X, targets, len(self.classes_), _cross_entropy, stratify=encoded)

    def predict_log_proba(self, X) -> np.ndarray:
        """Log class probabilities (a stable log-softmax), shape (n_samples, n_classes)."""
        check_is_fitted(self)
        X, _ = self._validate_X(X, reset=False)
        logits = self._forward(X)
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), columns ordered as ``classes_``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class per sample, shape (n_samples,)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class SequenceRegressor(RegressorMixin, _SequenceEstimator):
    __doc__ = (
        """Regress one or more real targets from whole sequences with a tensorized-attention
        encoder.

    Targets are standardized internally (``y_mean_``, ``y_scale_``) and predictions mapped back.
"""
        + _PARAMETERS_DOC
        + """
    Attributes
    ----------
    y_mean_, y_scale_ : ndarray of shape (n_outputs,)
        Target standardization.
"""
        + _ATTRIBUTES_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> from seqtensor.adapters.estimators import SequenceRegressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(64, 16, 2))
    >>> y = X[:, :4, 0].sum(axis=1)
    >>> SequenceRegressor(random_state=0).fit(X, y).predict(X[:3]).shape
    (3,)
"""
    )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def fit(self, X, y):
        """Fit on X (n_samples, seq_len[, n_features]) and y (n_samples,) or (n_samples, n_outputs).
        Returns self."""
        X, y = self._validate_X(X, y, reset=True, multi_output=True, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        check(
            y.ndim in (1, 2),
            f"y must have shape (n_samples,) or (n_samples, n_outputs), got {y.shape}",
        )
        self._y_ndim = y.ndim
        y2 = y.reshape(len(y), -1)  # (B, outputs)
        _check_float32_range("y", y2)
        self.y_mean_ = y2.mean(axis=0)
        self.y_scale_ = np.where(y2.std(axis=0) > 0, y2.std(axis=0), 1.0)
        targets = torch.tensor((y2 - self.y_mean_) / self.y_scale_, dtype=torch.float32)
        return self._fit_network(X, targets, y2.shape[1], _mse)

    def predict(self, X) -> np.ndarray:
        """Predictions, shape (n_samples,) for 1-D y in fit, else (n_samples, n_outputs)."""
        check_is_fitted(self)
        X, _ = self._validate_X(X, reset=False)
        out = self._forward(X) * self.y_scale_ + self.y_mean_
        return out[:, 0] if self._y_ndim == 1 else out


def _check_float32_range(name: str, values: np.ndarray) -> None:
    """Values beyond float32 (the network's dtype) would become inf: raise instead of predicting
    inf."""
    limit = float(np.finfo(np.float32).max)
    big = float(np.abs(values).max()) if values.size else 0.0
    check(
        big <= limit,
        f"{name} has values up to {big:.3g}, beyond float32 (max {limit:.3g}) the network computes "
        f"in; rescale it first (e.g. divide by a power of 10 or use a StandardScaler)",
    )


def _batch_loss(loss_fn):
    """Adapt ``loss_fn(output, target)`` to the trainer's ``loss_fn(model, batch)``."""

    def batch_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        return loss_fn(model(inputs), target)

    return batch_loss


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(pred, target)
