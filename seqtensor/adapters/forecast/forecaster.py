"""``Forecaster``: a DataFrame-first, scikit-learn style estimator over the patch forecasting model.

The estimator is a thin shell: ``panel.py`` validates frames and puts series on regular grids,
``windows.py`` cuts look-back / horizon windows, ``forecast_model.py`` holds the network and the
losses, and ``seqtensor.Trainer`` trains it. This file maps settings to those pieces and
DataFrames in and out.

Scales: each series is z-scored with the mean and std of its training steps (``scaler_``, saved
with the model), the network adds per-window instance normalization, and forecasts come back on
the original scale.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from tqdm.auto import tqdm

from ..._validation import check, check_choice
from ...core.folds import ExtrapolatingFold, FoldLike
from ...nn import ModelConfig
from ...train import Callback, Trainer, TrainerConfig
from ...train.distributed import resolve_device
from .model import (
    SIMPLER_MARGIN,
    ForecastEnsemble,
    ForecastModelConfig,
    PatchForecastModel,
    forecast_loss,
)
from .panel import (
    Panel,
    build_panel,
    check_scale,
    freq_to_json,
    future_exog,
    future_times,
    missing_future,
    warn_missing,
)
from .persistence import load_forecaster, plot_forecast, save_forecaster
from .seasonality import (
    MAX_RIDGE_INPUT,
    MSTL_HISTORY,
    combined_start,
    default_input_size,
    mstl_forecast,
    mstl_seasons,
    resolve_seasons,
    start_candidates,
)
from .windows import WindowData, WindowDataset, collate_windows, train_cuts, val_cuts

__all__ = ["Forecaster"]

# Weights of the statistical forecast in the blend, tried on the held-out windows: coarse, because
# those windows are few (a finer grid fits their noise).
STATISTICAL_WEIGHTS = (0.0, 0.5, 1.0)


def _standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(T, F) exogenous values -> z-scores with NaN (unknown) as 0, the training mean."""
    out = (x - mean) / std
    return np.nan_to_num(out, nan=0.0)


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per column of (N, F) with NaN ignored; std 1 for constant or empty columns."""
    if x.shape[1] == 0:
        return np.zeros(0), np.ones(0)
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(x, 0))
        std = np.nan_to_num(np.nanstd(x, 0))
    return mean, np.where(std > 0, std, 1.0)


def _check_levels(level: Sequence[float] | None) -> tuple[float, ...]:
    """Prediction-interval levels (percent) as floats, each in (0, 100)."""
    if level is None:
        return ()
    check(
        not isinstance(level, (str, bytes)) and np.ndim(level) == 1,
        f"level must be a sequence of numbers such as [80, 95], got {level!r}",
        TypeError,
    )
    levels = tuple(float(v) for v in level)
    check(all(0 < v < 100 for v in levels), f"levels must lie in (0, 100), got {list(level)}")
    return levels


def _level_quantiles(level: float) -> tuple[float, float]:
    """Level 80 -> quantiles (0.1, 0.9), rounded so they match the trained ones exactly."""
    lo = round(0.5 - level / 200, 10)
    return lo, round(1 - lo, 10)


def _level_name(level: float) -> str:
    return f"{level:g}"


class _BarCallback(Callback):
    """Advances the estimator's progress bar by one per optimizer step, with the loss."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.bar.update(1)


class Forecaster(BaseEstimator):
    """Forecast many long time series with patch tokens and tensorized attention.

    Parameters
    ----------
    h : int
        Forecast horizon the network is trained for; ``predict(h=...)`` can roll out further.
    input_size : int or None, default None
        Look-back L in steps (2,048-16,384 is cheap with tensorized attention). None: chosen at
        fit from the seasons of the training data (``seasonality.default_input_size``: 7, 4, 3 or 2
        whole cycles of the longest season; 4 cycles or 512 steps without one, capped at half the
        shortest series) and stored in ``input_size_``.
    patch_len : int, default 16
        Steps per token; the encoder sees ceil(L / patch_len) + ceil(h / patch_len) tokens.
    n_models : int, default 1
        Networks trained with different seeds (drawn from ``random_state``) whose forecasts are
        averaged; each is trained (and early-stopped) on its own, so fitting costs n_models times
        as much. The seed-to-seed spread of one network is often larger than the gaps between
        models; the average removes most of it.
    patch_stride : int or None, default None
        Steps between past tokens (None: ``patch_len``, non-overlapping). Smaller values overlap
        the patches, as PatchTST does (stride patch_len / 2), at ceil((L - patch_len) / stride) + 1
        past tokens.
    d_model, n_layers, n_heads : int, default 64, 2, 4
        Encoder width, depth and heads.
    attention : {"tensorized", "full"}, default "tensorized"
        "full" runs the same model with dense attention, for comparisons.
    fold : Fold, tuple of dims or fold strategy, optional
        How tokens are folded for tensorized attention; default ``ExtrapolatingFold(64)``.
    dropout : float, default 0.0
    channel_mixing : bool, default False
        False: every series is a separate sample (channel-independent, PatchTST). True: all series
        (which must share one time grid) form the channels of one sample and each token holds
        every channel's patch.
    linear_skip : bool, default True
        Add a linear look-back -> horizon map (DLinear) to the encoder's forecast.
    skip_ridge : float, default 0.1
        Before training, set that linear map to its closed-form ridge-regression fit on (up to
        8,192) training windows, with this penalty per window (inputs are RevIN-normalized, so
        unit scale); training then refines it with the encoder. 0 starts it at the seasonal
        profile (zero without seasons) instead (as
        does an input_size above 4,096, where the L x L solve would cost more than it gives).
        The fit is pulled towards one of the closed-form forecasts of
        ``seasonality.start_candidates`` (last value, look-back mean, seasonal naive per season,
        level + seasonal profiles, plain or smoothed, MSTL's decomposition forecast), chosen on
        all training windows (``start_``), as an Auto model
        picks among its candidates; the penalty (1x-10,000x this value, or the forecast alone) is
        chosen on three rolling origins, the strongest within 3% of the best.
    seasonality : "auto", int, sequence of int or None, default "auto"
        Seasonal periods in steps (48 and 336 for half-hourly data with daily and weekly cycles).
        The linear map starts from their profiles averaged over the look-back's cycles (an
        MSTL-like decomposition forecast) instead of the window mean. "auto" reads them off the
        training data's autocorrelation (``seasonality.detect_seasonalities``, ``seasons_``),
        snapped to the exact day and week of the data's frequency, and keeps those with two
        whole cycles in the look-back (a given period needs one); a look-back of several cycles
        of the longest one makes the profiles accurate.
    statistical : "mstl" or None, default "mstl"
        "mstl": blend the network's forecast with MSTL's (``seasonality.mstl_forecast``), made
        from each series' whole history (its last ``MSTL_HISTORY`` steps), not the look-back
        alone, with every season found (``statistical_seasons_``), including those too long for
        the look-back. The weight of MSTL's forecast, 0, 0.5 or 1, is chosen on held-out
        windows, or on every comparable window when the kept start fits nothing
        (``statistical_weight_``; 0 without held-out windows); the quantiles move with the
        point forecast. On a few weeks of half-hourly data the look-back cannot hold two weekly
        cycles while the history can (docs/forecasting_results.md). None: the network alone.
    loss : {"mae", "mse", "huber", "quantile"}, default "mae"
    quantiles : sequence of float in (0, 1), optional
        Quantiles for ``loss="quantile"`` (default (0.1, 0.5, 0.9) unless ``level`` is given); 0.5
        is always added and gives the point forecast.
    level : sequence of float in (0, 100), optional
        Prediction intervals (``loss="quantile"``): level 80 trains the quantiles 0.1 and 0.9 and
        outputs ``<alias>-lo-80`` / ``<alias>-hi-80`` columns, as Nixtla's libraries name them.
    max_steps, batch_size, learning_rate : int, int, float, default 500, 32, 3e-4
        Training length (optimizer steps), windows per step, AdamW peak learning rate.
    ema_decay : float, default 0.995
        The network validated and kept is an exponential moving average of the trained weights
        with this decay per step (Polyak averaging; ``TrainerConfig.ema_decay``); 0 keeps the raw
        weights. The decay is capped at ``1 - 2.5 / max_steps`` so that the average spans at most
        the last 40% of a short run instead of lagging behind it. On the public electricity
        protocol at h=336 it lowered the MSE of every seed by 2-3% (``benchmarks/NOTES.md``).
    val_size : int or "auto", default "auto"
        Last steps of each series held out for validation (``fit(val_size=...)`` overrides it).
        "auto": 7h when the shortest series has at least ``input_size + 16h`` steps, 3h with
        ``input_size + 8h``, h with ``input_size + 4h``, else 0. With a held-out part the fit
        is chosen on it: the closed-form
        start (below) is scored before the first step, the network is trained with the best
        validated weights restored, and the start is kept unless training lowered the validation
        loss (over every h-step window of the held-out part) by more than 3%. When the start
        is kept its linear map is refit on every window, held-out part
        included (a closed-form solve, cheap); a trained network is not refit (the held-out
        steps then only inform the choice). ``selected_`` says which was kept.
    val_check_steps : int, default 100
        Validate every this many steps (when ``val_size > 0``).
    early_stopping : int, optional
        Stop after this many validations without improvement; the best weights are restored.
    random_state : int, optional
        Seed for weights and window sampling.
    device : str, default "auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    alias : str, optional
        Name of the forecast column; default "Forecaster".
    verbose : bool, default True
        A progress bar over setup (windows, ridge init) and training, shown once a fit has run
        for 2 seconds, and a line naming the inferred frequency; False silences both.
    warm_start : bool, default False
        True: ``fit`` continues training the fitted (or loaded) network on the new data, for
        ``max_steps`` more steps, instead of building a new one (scikit-learn's convention).

    Attributes
    ----------
    model_ : PatchForecastModel
    model_config_ : ForecastModelConfig
    ids_ : list, the series seen in fit, sorted (categorical ids: in category order)
    freq_ : pandas offset (or int step for integer time)
    scaler_ : pd.DataFrame, per series ``mean`` and ``std`` of the training steps
    missing_report_ : pd.DataFrame, per series steps, missing targets and inserted grid steps
    history_ : list of dict, the trainer's metrics
    input_size_ : int, the look-back used (``input_size``, or the one chosen when it is None)
    seasons_ : tuple of int, the seasonal periods used
    statistical_seasons_ : tuple of int, the seasons of the statistical forecast (every one found)
    statistical_weight_ : float, the weight of the statistical forecast in the output (0: none)
    start_ : str, the closed-form forecast the linear map was pulled towards ("naive", "profile",
        ...; "" without a ridge start)
    val_size_ : int, the held-out steps per series the fit used
    selected_ : list of str, per network "start" (the closed-form start kept: training did not
        lower the validation loss), "trained" (also with ``warm_start``), or "unvalidated" (no
        held-out part)
    fit_time_ : float, seconds spent in training

    Examples
    --------
    >>> fc = Forecaster(h=48, max_steps=200).fit(df)  # doctest: +SKIP
    >>> fc.predict().head()  # doctest: +SKIP
    """

    def __init__(
        self,
        h: int,
        input_size: int | None = None,
        *,
        patch_len: int = 16,
        patch_stride: int | None = None,
        n_models: int = 1,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        attention: str = "tensorized",
        fold: FoldLike | None = None,
        dropout: float = 0.0,
        channel_mixing: bool = False,
        linear_skip: bool = True,
        skip_ridge: float = 0.1,
        seasonality: int | Sequence[int] | str | None = "auto",
        statistical: str | None = "mstl",
        loss: str = "mae",
        quantiles: Sequence[float] | None = None,
        level: Sequence[float] | None = None,
        max_steps: int = 500,
        batch_size: int = 32,
        learning_rate: float = 3e-4,
        ema_decay: float = 0.995,
        val_size: int | str = "auto",
        val_check_steps: int = 100,
        early_stopping: int | None = None,
        random_state: int | None = None,
        device: str = "auto",
        alias: str | None = None,
        verbose: bool = True,
        warm_start: bool = False,
    ) -> None:
        self.h = h
        self.input_size = input_size
        self.patch_len = patch_len
        self.patch_stride = patch_stride
        self.n_models = n_models
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.attention = attention
        self.fold = fold
        self.dropout = dropout
        self.channel_mixing = channel_mixing
        self.linear_skip = linear_skip
        self.skip_ridge = skip_ridge
        self.seasonality = seasonality
        self.statistical = statistical
        self.loss = loss
        self.quantiles = quantiles
        self.level = level
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.ema_decay = ema_decay
        self.val_size = val_size
        self.val_check_steps = val_check_steps
        self.early_stopping = early_stopping
        self.random_state = random_state
        self.device = device
        self.alias = alias
        self.verbose = verbose
        self.warm_start = warm_start

    # -----------------------------------------------------------------------------------------
    # settings
    # -----------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        check(
            self.input_size is None
            or (
                isinstance(self.input_size, (int, np.integer))
                and not isinstance(self.input_size, bool)
                and self.input_size >= 1
            ),
            f"input_size must be None or a positive int, got {self.input_size!r}",
        )
        for name in (
            "h",
            "patch_len",
            "n_models",
            "max_steps",
            "batch_size",
            "val_check_steps",
        ):
            value = getattr(self, name)
            check(
                isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive int, got {value!r}",
            )
        check(
            self.patch_stride is None
            or (
                isinstance(self.patch_stride, (int, np.integer))
                and 1 <= self.patch_stride <= self.patch_len
            ),
            f"patch_stride must be None or an int in [1, patch_len={self.patch_len}], got "
            f"{self.patch_stride!r}",
        )
        check_choice("loss", self.loss, ("mae", "mse", "huber", "quantile"))
        check_choice("attention", self.attention, ("tensorized", "full"))
        check(
            self.statistical in (None, "mstl"),
            f"statistical must be 'mstl' or None, got {self.statistical!r}",
        )
        check(
            self.val_size == "auto"
            or (
                isinstance(self.val_size, (int, np.integer))
                and not isinstance(self.val_size, bool)
                and self.val_size >= 0
            ),
            f"val_size must be 'auto' or an int >= 0, got {self.val_size!r}",
        )
        check(float(self.skip_ridge) >= 0, f"skip_ridge must be >= 0, got {self.skip_ridge!r}")
        check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check(
            isinstance(self.ema_decay, (int, float, np.floating))
            and not isinstance(self.ema_decay, bool)
            and 0 <= self.ema_decay < 1,
            f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}",
        )
        check(
            self.early_stopping is None or int(self.early_stopping) >= 1,
            f"early_stopping must be None or a positive int, got {self.early_stopping!r}",
        )
        check(
            self.quantiles is None or self.loss == "quantile",
            "quantiles are used only with loss='quantile'",
        )
        check(
            self.level is None or self.loss == "quantile",
            "level (prediction intervals) needs loss='quantile'",
        )
        _check_levels(self.level)
        check(
            isinstance(self.warm_start, (bool, np.bool_)),
            f"warm_start must be a bool, got {self.warm_start!r}",
            TypeError,
        )

    @property
    def model_name(self) -> str:
        return self.alias or type(self).__name__

    def _quantile_levels(self) -> tuple[float, ...]:
        """Trained quantiles, sorted, with 0.5 (the point forecast) included; () unless
        loss='quantile'."""
        if self.loss != "quantile":
            return ()
        levels = _check_levels(self.level)
        if self.quantiles is None:
            qs = () if levels else (0.1, 0.5, 0.9)
        else:
            qs = tuple(float(q) for q in self.quantiles)
        check(all(0 < q < 1 for q in qs), f"quantiles must lie in (0, 1), got {qs}")
        for lv in levels:
            qs += _level_quantiles(lv)
        return tuple(sorted(set(qs) | {0.5}))

    def _encoder_config(self) -> ModelConfig:
        # int(): NumPy integers (from a grid search, say) pass the checks but not the configs'
        return ModelConfig(
            d_model=int(self.d_model),
            n_layers=int(self.n_layers),
            n_heads=int(self.n_heads),
            dropout=self.dropout,
            attention=self.attention,
            fold=ExtrapolatingFold(64) if self.fold is None else self.fold,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit(df) first"
            )

    # -----------------------------------------------------------------------------------------
    # arrays in the network's layout
    # -----------------------------------------------------------------------------------------

    def _series_stats(self, panel: Panel) -> tuple[np.ndarray, np.ndarray]:
        """Per-series mean/std: the fitted ones for known ids, the given history's for new ones."""
        known = dict(zip(self.ids_, zip(self.scaler_["mean"], self.scaler_["std"])))
        stats = []
        for sid, y in zip(panel.ids, panel.y):
            if sid in known:
                stats.append(known[sid])
            else:
                check(
                    (~np.isnan(y)).any(),
                    f"series {sid!r} has no observed target value to forecast from",
                )
                std = float(np.nanstd(y))
                stats.append((float(np.nanmean(y)), std if std > 0 else 1.0))
        mean, std = map(np.array, zip(*stats))
        return mean, std

    def _static_matrix(
        self, static_df: pd.DataFrame | None, ids: list, id_col: str, fitting: bool
    ) -> np.ndarray:
        """(S, K) standardized static features of the series ``ids``."""
        if fitting:
            self.static_cols_ = (
                [] if static_df is None else [c for c in static_df.columns if c != id_col]
            )
        cols = self.static_cols_
        if not cols:
            check(
                static_df is None or fitting,
                "the model was fit without static features; static_df is not used",
            )
            return np.zeros((len(ids), 0))
        if static_df is None:
            check(hasattr(self, "static_table_"), "static_df is required")
            table = self.static_table_
        else:
            check(
                isinstance(static_df, pd.DataFrame) and id_col in static_df.columns,
                f"static_df must be a DataFrame with a {id_col!r} column",
                TypeError,
            )
            missing = [c for c in cols if c not in static_df.columns]
            check(not missing, f"static_df is missing columns {missing}")
            check(
                not static_df[id_col].duplicated().any(),
                f"static_df has duplicate {id_col!r} values",
            )
            bad = [c for c in cols if not pd.api.types.is_numeric_dtype(static_df[c])]
            check(
                not bad,
                f"static_df columns {bad} must be numeric (one-hot encode categories first)",
                TypeError,
            )
            check(not static_df[cols].isna().any().any(), "static_df has NaN values")
            table = static_df.set_index(id_col)[cols].astype(float)
        absent = [i for i in ids if i not in table.index]
        if (
            absent and not fitting and hasattr(self, "static_table_")
        ):  # a refit uses only the data it is given
            absent = [i for i in absent if i not in self.static_table_.index]
        check(not absent, f"static features missing for series {absent[:5]}")
        values = np.stack(
            [
                (table.loc[i] if i in table.index else self.static_table_.loc[i]).to_numpy(float)
                for i in ids
            ]
        )
        if fitting:
            self.static_table_ = table
            self.static_mean_, self.static_std_ = _column_stats(values)
        return (values - self.static_mean_) / self.static_std_

    def _groups(self, panel: Panel, static: np.ndarray, futr_ahead: list[np.ndarray] | None = None):
        """Scaled arrays grouped as the network wants them: (y, futr, hist, static, mean, std).

        Channel-independent: one group per series, C = 1. Channel-mixing: one group, C = series.
        ``futr_ahead`` (per series (k, F)) extends the known-future inputs past each series' end.
        """
        mean, std = self._series_stats(panel)
        ys = [((y - m) / s)[None] for y, m, s in zip(panel.y, mean, std)]  # (1, T)
        futr = [_standardize(f, self.futr_mean_, self.futr_std_) for f in panel.futr]
        if futr_ahead is not None:
            futr = [
                np.concatenate([f, _standardize(a, self.futr_mean_, self.futr_std_)])
                for f, a in zip(futr, futr_ahead)
            ]
        futr = [f.T for f in futr]  # (F, T [+ k])
        hist = [_standardize(x, self.hist_mean_, self.hist_std_).T for x in panel.hist]  # (P, T)
        if not self.channel_mixing:
            return ys, futr, hist, static, mean, std
        lengths = {len(y) for y in panel.y}
        check(
            len(lengths) == 1 and len({str(s) for s in panel.starts}) == 1,
            "channel_mixing=True needs every series on one time grid (same start and length)",
        )
        cat = np.concatenate
        return [cat(ys)], [cat(futr)], [cat(hist)], static.reshape(1, -1), mean, std

    def _predict_windows(self, data: WindowData, g: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Forecasts for windows (g, t): (N, C, h, Q) on the training scale, the network's blended
        with the statistical forecast by ``statistical_weight_``."""
        out = self._network_windows(data, g, t)
        weight = getattr(self, "statistical_weight_", 0.0)
        if weight == 0:
            return out
        return self._blend(out, self._statistical_windows(data, g, t), weight)

    def _statistical_windows(self, data: WindowData, g: np.ndarray, t: np.ndarray) -> np.ndarray:
        """MSTL's forecast for windows (g, t) from the history before each cut: (N, C, h), NaN
        where the history holds no two cycles of a season."""
        out = []
        for i in range(0, len(g), 512):  # a window's history is up to MSTL_HISTORY steps
            history = data.history(g[i : i + 512], t[i : i + 512], MSTL_HISTORY)  # (N, C, S)
            N, C, S = history.shape
            rows = mstl_forecast(history.reshape(N * C, S), data.h, self.statistical_seasons_)
            out.append(rows.reshape(N, C, data.h))
        return np.concatenate(out) if out else np.zeros((0, data.C, data.h))

    def _blend(self, net: np.ndarray, stat: np.ndarray, weight: float) -> np.ndarray:
        """net (N, C, h, Q) moved towards stat (N, C, h) by ``weight`` at the point forecast; the
        other quantiles move with it. Where stat is NaN the network's forecast stays."""
        shift = weight * (stat - net[..., self._point_index()])
        return net + np.nan_to_num(shift, nan=0.0)[..., None]

    def _weight_windows(
        self, train: WindowDataset, val: WindowDataset | None, late: WindowDataset | None
    ) -> WindowDataset | None:
        """The windows the statistical weight is chosen on: the late held-out ones, or, when the
        kept network is a closed-form start with nothing fit to the data (penalty infinity),
        every window whose history holds as many seasons as the series' end
        (``mstl_seasons``), so that the statistical forecast is scored as it will be
        made. A few held-out days are a noisy vote: on half-hourly demand 25 late windows chose
        MSTL alone where 481 training windows chose the network, which the test windows
        confirmed (docs/forecasting_results.md)."""
        if late is None or val is None or not self.statistical_seasons_:
            return late
        free = self.selected_[-1] == "start" and getattr(self.model_, "skip_alpha_", 0) == np.inf
        return (self._comparable_windows(train, val) or late) if free else late

    def _comparable_windows(self, train: WindowDataset, val: WindowDataset) -> WindowDataset:
        """The training and held-out windows whose history holds as many statistical seasons
        (``mstl_seasons``) as their series' end, at most 8,192 (as many as the ridge start is
        fit on), evenly spaced."""
        data = train.data
        g, t = np.concatenate([train.g, val.g]), np.concatenate([train.t, val.t])

        def held(steps: np.ndarray) -> np.ndarray:
            unique, inverse = np.unique(np.minimum(steps, MSTL_HISTORY), return_inverse=True)
            counts = [len(mstl_seasons(self.statistical_seasons_, s)) for s in unique.tolist()]
            return np.asarray(counts)[inverse]

        keep = np.flatnonzero(held(t) == held(data.lengths[g]))
        if len(keep) > 8192:
            keep = keep[np.linspace(0, len(keep) - 1, 8192).round().astype(np.int64)]
        return WindowDataset(data, g[keep], t[keep])

    def _choose_statistical_weight(self, windows: WindowDataset | None) -> None:
        """``statistical_weight_``: the one of ``STATISTICAL_WEIGHTS`` with the lowest loss on
        ``windows`` (the smallest on ties); unchanged without them."""
        if not self.statistical or not self.statistical_seasons_ or not windows:
            return
        data, g, t = windows.data, windows.g, windows.t
        net = self._network_windows(data, g, t)
        stat = self._statistical_windows(data, g, t)
        if np.isnan(stat).all():
            return
        target = data.batch(g, t)["target"]
        qs = self._quantile_levels()
        losses = [
            float(forecast_loss(torch.from_numpy(self._blend(net, stat, w)), target, self.loss, qs))
            for w in STATISTICAL_WEIGHTS
        ]
        self.statistical_weight_ = STATISTICAL_WEIGHTS[int(np.argmin(losses))]

    def _network_windows(self, data: WindowData, g: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Network output for windows (g, t): (N, C, h, Q) on the training scale."""
        model, device = self.model_, next(self.model_.parameters()).device
        model.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(g), 256):
                batch = {
                    k: v.to(device) for k, v in data.batch(g[i : i + 256], t[i : i + 256]).items()
                }
                outs.append(model(batch).float().cpu().numpy())
        return np.concatenate(outs)

    # -----------------------------------------------------------------------------------------
    # fit
    # -----------------------------------------------------------------------------------------

    def fit(
        self,
        df: pd.DataFrame,
        static_df: pd.DataFrame | None = None,
        *,
        id_col: str = "unique_id",
        time_col: str = "ds",
        target_col: str = "y",
        futr_exog: Sequence[str] = (),
        hist_exog: Sequence[str] = (),
        val_size: int | None = None,
        freq: Any = None,
    ) -> Forecaster:
        """Train on a long frame (or a wide frame with a DatetimeIndex, one column per series).

        Parameters
        ----------
        df : pd.DataFrame
            Long: one row per series and step, columns ``id_col``, ``time_col``, ``target_col``
            and the exogenous columns. Rows may be in any order. Missing targets may be NaN or
            absent rows; both are masked and reported (a warning and ``missing_report_``).
        static_df : pd.DataFrame, optional
            One row per series: ``id_col`` and numeric static features.
        futr_exog : columns known for the future too (calendars, planned events); ``predict``
            then needs ``futr_df``.
        hist_exog : columns known only up to the present (other sensors).
        val_size : steps held out at the end of each series for validation / early stopping;
            None uses the constructor's ``val_size``.
        freq : pandas frequency or int step; None infers it.

        Returns
        -------
        self
        """
        self._check_params()
        columns = {"id_col": id_col, "time_col": time_col, "target_col": target_col}
        if self.warm_start and hasattr(self, "model_"):
            check(
                columns == self.columns_,
                f"warm_start continues a model fit with columns {self.columns_}; got {columns}",
            )
        with self._progress_bar("fit") as bar:
            bar.reset(total=1 + self._fit_units())
            panel = self._build_panel(df, futr_exog, hist_exog, freq, columns, "fit")
            bar.update(1)
            self.columns_ = columns
            val = self.val_size if val_size is None else val_size
            return self._fit_panel(panel, static_df, val, bar)

    # -----------------------------------------------------------------------------------------
    # setup shared by fit and cross_validation: the panel, progress
    # -----------------------------------------------------------------------------------------

    def _build_panel(
        self,
        df: pd.DataFrame,
        futr_exog: Sequence[str],
        hist_exog: Sequence[str],
        freq: Any,
        columns: dict[str, str],
        where: str,
    ) -> Panel:
        """Validated panel of ``df``, its warnings given once, the inferred frequency reported."""
        if self.warm_start and hasattr(self, "model_") and freq is None:
            freq = self.freq_  # continue on the fitted grid
        panel = build_panel(df, futr_exog=futr_exog, hist_exog=hist_exog, freq=freq, **columns)
        warn_missing(panel.report, where, panel.freq)
        if freq is None and self.verbose:
            tqdm.write(
                f"{self.model_name}.{where}: frequency {freq_to_json(panel.freq)!r} inferred from "
                f"{columns['time_col']!r} ({len(panel.ids)} series, "
                f"{sum(panel.lengths):,} grid steps)",
                file=sys.stderr,
            )
        return panel

    def _fit_units(self) -> int:
        """Progress units of one fit: windows, then per network the ridge init and its steps."""
        return 1 + int(self.n_models) * (1 + int(self.max_steps))

    @contextlib.contextmanager
    def _progress_bar(self, desc: str):
        """A tqdm bar that appears once the work has run 2 s (none when ``verbose=False``)."""
        bar = tqdm(
            total=0,
            desc=f"{self.model_name}.{desc}",
            unit="step",
            delay=2.0,
            disable=not self.verbose,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            yield bar
        finally:
            bar.close()

    def _fit_panel(
        self, panel: Panel, static_df: pd.DataFrame | None, val_size: int, bar: Any = None
    ) -> Forecaster:
        bar = tqdm(disable=True) if bar is None else bar
        warm = bool(self.warm_start) and hasattr(self, "model_")
        h = int(self.h)
        L = self._resolve_look_back(panel, warm)
        if not warm or not self.statistical:  # a warm start keeps its weight unless re-chosen
            self.statistical_weight_ = 0.0
        if isinstance(val_size, str):
            check(val_size == "auto", f"val_size must be 'auto' or an int >= 0, got {val_size!r}")
            val_size = self._auto_val_size(min(panel.lengths))
        self.val_size_ = int(val_size)
        check(
            isinstance(val_size, (int, np.integer)) and val_size >= 0,
            f"val_size must be an int >= 0, got {val_size!r}",
        )
        check(
            val_size == 0 or val_size >= h,
            f"val_size={val_size} must be 0 or at least h={h} (one validation window)",
        )
        short = [sid for sid, T in zip(panel.ids, panel.lengths) if T <= h + val_size]
        check(
            not short,
            f"series {short[:5]} ({len(short)} in all) have <= h + val_size = {h + val_size} "
            "steps: "
            "too short to train (a series shorter than input_size is left-padded and masked; one "
            "shorter "
            f"than the horizon cannot give a target). Drop them or lower h",
        )
        if warm:
            check(
                [*panel.futr_cols] == self.futr_cols_ and [*panel.hist_cols] == self.hist_cols_,
                f"warm_start continues a model fit with futr_exog={self.futr_cols_} and "
                f"hist_exog={self.hist_cols_}; got {list(panel.futr_cols)} and "
                f"{list(panel.hist_cols)}",
            )
            old_scale = dict(zip(self.ids_, zip(self.scaler_["mean"], self.scaler_["std"])))
        self.ids_, self.freq_ = list(panel.ids), panel.freq
        self.missing_report_ = panel.report
        self.futr_cols_, self.hist_cols_ = list(panel.futr_cols), list(panel.hist_cols)
        train_part = lambda arrays: np.concatenate([a[: len(a) - val_size] for a in arrays])  # noqa: E731
        means, stds = [], []
        for sid, y in zip(panel.ids, panel.y):
            y = y[: len(y) - val_size]
            check(
                (~np.isnan(y)).any(), f"series {sid!r} has no observed target in its training steps"
            )
            if warm and sid in old_scale:  # the network learnt on the fitted scale: keep it
                mean, std = old_scale[sid]
            else:
                mean, std = float(np.nanmean(y)), float(np.nanstd(y)) or 1.0
            check_scale(sid, mean, std, self.columns_["target_col"])
            means.append(mean), stds.append(std)
        self.scaler_ = pd.DataFrame(
            {"mean": means, "std": stds}, index=pd.Index(self.ids_, name="unique_id")
        )
        if not warm:  # a warm start keeps the input scales the network learnt on
            self.futr_mean_, self.futr_std_ = _column_stats(train_part(panel.futr))
            self.hist_mean_, self.hist_std_ = _column_stats(train_part(panel.hist))
        static = self._static_matrix(static_df, self.ids_, self.columns_["id_col"], not warm)
        y, futr, hist, static_g, _, _ = self._groups(panel, static)

        C = y[0].shape[0]
        qs = self._quantile_levels()
        config = ForecastModelConfig(
            input_size=int(L),
            h=int(h),
            patch_len=int(self.patch_len),
            patch_stride=None if self.patch_stride is None else int(self.patch_stride),
            n_channels=C,
            n_outputs=max(1, len(qs)),
            n_futr=len(self.futr_cols_),
            n_hist=len(self.hist_cols_),
            n_static=static.shape[1],
            linear_skip=self.linear_skip,
            seasons=self.seasons_,
            encoder=self._encoder_config(),
        )
        if warm:
            old, new = self.model_config_.to_dict(), config.to_dict()
            diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
            check(
                not diff,
                f"warm_start needs the network the model was fit with; these settings differ "
                f"(fitted, now): {diff}",
            )
        self.model_config_ = config
        data = WindowData(y, futr, hist, static_g, L, h)
        train = WindowDataset(data, *train_cuts(y, L, h, val_size))
        val = WindowDataset(data, *val_cuts(y, L, h, val_size)) if val_size else None
        select = self._selection_windows(val, [v.shape[1] for v in y], val_size)
        bar.set_postfix_str("windows ready", refresh=False)
        bar.update(1)
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        previous = []
        if warm:
            previous = (
                list(self.model_.members)
                if isinstance(self.model_, ForecastEnsemble)
                else [self.model_]
            )
        members, self.history_, self.selected_, self.start_ = [], [], [], ""
        start = time.perf_counter()
        for member in range(int(self.n_models)):
            seed = int(rng.randint(np.iinfo(np.int32).max))
            if warm:
                self.model_ = previous[member].to(device)
            else:
                with torch.random.fork_rng(
                    devices=[]
                ):  # seed the initialization without touching the global RNG
                    torch.manual_seed(seed)
                    self.model_ = self._build_model(self.model_config_).to(device)
                bar.set_postfix_str("ridge init", refresh=False)
                self._init_skip(train, seed)
            bar.update(1)
            history = self._train_from_start(train, val, device, seed, bar, warm, select)
            if member == 0:  # before the refit below sees the held-out windows
                self._choose_statistical_weight(self._weight_windows(train, val, select[1]))
            if self.selected_[-1] == "start" and not warm:  # the closed form, on every window
                self._init_skip(WindowDataset(data, *train_cuts(y, L, h, 0)), seed, refit=True)
            self.history_ += (
                history if self.n_models == 1 else [{**r, "member": member} for r in history]
            )
            members.append(self.model_)
        self.fit_time_ = time.perf_counter() - start
        self.model_ = members[0] if len(members) == 1 else ForecastEnsemble(members)
        self.model_.eval()
        # the look-back is all the network needs; the statistical forecast reads further back
        span = max(L, MSTL_HISTORY) if self.statistical_weight_ else L
        keep = [max(0, T - span) for T in panel.lengths]
        self.panel_ = Panel(
            panel.ids,
            [panel.times(s)[k] for s, k in enumerate(keep)],
            panel.freq,
            [v[k:] for v, k in zip(panel.y, keep)],
            [v[k:] for v, k in zip(panel.futr, keep)],
            [v[k:] for v, k in zip(panel.hist, keep)],
            panel.futr_cols,
            panel.hist_cols,
        )
        return self

    def _resolve_look_back(self, panel: Panel, warm: bool) -> int:
        """Set ``seasons_`` and ``input_size_`` (``input_size``, or the default for the seasons
        when it is None) for a fit on ``panel``; a warm start keeps the fitted ones."""
        if warm:
            fitted = int(self.model_config_.input_size)
            check(
                self.input_size is None or int(self.input_size) == fitted,
                f"warm_start continues a model fit with input_size={fitted}; got {self.input_size}",
            )
            self.seasons_ = self.model_config_.seasons
            self.input_size_ = fitted
            return fitted
        # on every step, held-out part included: the periods are structure, not a fit, and on
        # a few weeks of history the held-out days can decide whether a weekly cycle has the two
        # clear cycles detection needs (half-hourly demand lost its week without them)
        found = resolve_seasons(self.seasonality, panel.y, max(panel.lengths), panel.freq)
        self.statistical_seasons_ = found  # the whole history, not the look-back, holds them
        shortest = min(panel.lengths)
        # a given period needs one whole cycle in the look-back, a detected one two: a profile
        # of one cycle is that cycle's noise. On three weeks of half-hourly two-season data
        # (synthetic seeds 0-2) the week in a 384-step look-back scored 2.37 / 1.60 / 1.35x
        # MSTL's MAE, the daily season alone 2.32 / 1.02 / 1.33x (docs/forecasting_results.md)
        cycles = 2 if isinstance(self.seasonality, str) else 1
        if self.input_size is None:
            L = default_input_size(shortest, int(self.h), found)
            while found and cycles * found[-1] > L:  # the look-back for the seasons it keeps
                found = found[:-1]
                L = default_input_size(shortest, int(self.h), found)
            if self.verbose:
                tqdm.write(
                    f"{self.model_name}.fit: look-back input_size={L} steps (seasons "
                    f"{list(found) or 'none'}, shortest series {shortest:,} steps)",
                    file=sys.stderr,
                )
        else:
            L = int(self.input_size)
        self.seasons_ = tuple(p for p in found if cycles * p <= L)
        self.input_size_ = L
        return L

    def _auto_val_size(self, shortest: int) -> int:
        """Held-out steps for ``val_size="auto"``: 7h, 3h, h or 0 as the shortest series allows.

        More held-out windows (origins) make the start-versus-network choice less of a coin
        toss: on hourly air temperature 3 days kept a network that lost to its start later.
        """
        L, h = int(self.input_size_), int(self.h)
        for k, need in ((7, 16), (3, 8), (1, 4)):
            if shortest >= L + need * h:
                return k * h
        return 0

    def _selection_windows(
        self, val: WindowDataset | None, lengths: list[int], val_size: int
    ) -> tuple[WindowDataset | None, WindowDataset | None]:
        """(early-stopping windows, start-versus-network windows) from the held-out ones.

        The trainer restores the checkpoint with the best validation loss, so that loss is the
        minimum over checkpoints, biased low against the start's single score: on sea-surface
        temperature a network 9% better than its start there was 26% worse on the next week.
        With a held-out part of at least 2h the choice is made on its second half, the
        checkpoint on the windows whose targets end before it; else both use every window.
        """
        half = val_size // 2
        if val is None or half < self.h:
            return val, val
        T = np.asarray(lengths)[val.g]
        late = val.t >= T - half
        early = val.t + self.h <= T - half
        if not late.any() or not early.any():
            return val, val
        return WindowDataset(val.data, val.g[early], val.t[early]), WindowDataset(
            val.data, val.g[late], val.t[late]
        )

    def _val_loss(self, val: WindowDataset, device: torch.device) -> float:
        """The training loss of ``model_`` over the validation windows (observed steps weighted)."""
        kind, qs = self.loss, self._quantile_levels()
        self.model_.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), 256):
                batch = val.__getitems__(np.arange(i, min(i + 256, len(val))))
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int((~torch.isnan(batch["target"])).sum())
                loss = forecast_loss(self.model_(batch), batch["target"], kind, qs)
                total, count = total + float(loss) * n, count + n
        return total / max(count, 1)

    def _train_from_start(
        self,
        train: WindowDataset,
        val: WindowDataset | None,
        device: torch.device,
        seed: int,
        bar: Any,
        warm: bool,
        select: tuple[WindowDataset | None, WindowDataset | None] | None = None,
    ) -> list[dict]:
        """Train ``model_``; with validation windows, keep its start unless training beats it.

        The trainer validates every ``val_check_steps`` steps and restores its best weights, but
        never before the first step; the start (the closed-form forecast chosen on held-out
        windows) is scored here, and restored when the trained network does not improve on it:
        on a few weeks of history, training often makes that start worse.
        """
        if val is None or len(val) == 0 or warm:  # a warm start trains on, as asked
            self.selected_.append("trained" if warm else "unvalidated")
            return self._train(train, val, device, seed, bar)
        stop, choose = select if select is not None else (val, val)
        before = self._val_loss(choose, device)
        state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
        history = self._train(train, stop, device, seed, bar)
        after = self._val_loss(choose, device)
        # the simpler model wins unless training beats it clearly: the held-out days are few
        if after < (1 - SIMPLER_MARGIN) * before:
            self.selected_.append("trained")
        else:
            self.model_.load_state_dict(state)
            self.selected_.append("start")
        history.insert(0, {"step": 0, "val_loss": before, "start": True})
        return history

    def _init_skip(self, train: WindowDataset, seed: int, refit: bool = False) -> None:
        """Solve the linear skip in closed form (ridge) on up to 8,192 training windows.

        The windows go in time order (cut point), so the ridge's held-out fifth is the latest
        across series; ``refit=True`` keeps the chosen start and penalty and refits on ``train``.
        """
        alpha = float(self.skip_ridge)
        if (
            alpha <= 0
            or not isinstance(self.model_, PatchForecastModel)
            or self.model_.skip is None
        ):
            return
        if self.input_size_ > MAX_RIDGE_INPUT:  # an L x L solve: past it the skip starts at zero
            return
        model = self.model_
        if refit:
            if not hasattr(model, "skip_start_") or model.skip_alpha_ == float("inf"):
                return  # the prior alone does not depend on the data
            priors = {model.skip_start_: combined_start(self._start_priors(), model.skip_start_)}
            alpha = model.skip_alpha_
        else:
            priors = self._start_priors()
        idx = np.arange(len(train))
        if len(idx) > 8192:
            idx = np.sort(np.random.default_rng(seed).choice(idx, 8192, replace=False))
        idx = idx[np.argsort(train.t[idx], kind="stable")]
        batch = train.__getitems__(idx)
        device = model.skip.weight.device
        fitted = model.init_skip_ridge(
            batch["y"].to(device),
            batch["target"].to(device),
            alpha,
            priors,
            choose=not refit,
            times=torch.from_numpy(train.t[idx]),
        )
        if fitted and not self.start_:
            self.start_ = model.skip_start_

    def _start_priors(self) -> dict[str, np.ndarray]:
        """The closed-form forecasts the linear skip may start from (``start_candidates``)."""
        c = self.model_config_
        return start_candidates(c.input_size, c.h, c.seasons)

    def _build_model(self, config: ForecastModelConfig) -> torch.nn.Module:
        """The network for ``config`` (subclasses swap it, e.g. ``baselines.DLinearForecaster``)."""
        return PatchForecastModel(config)

    def _build_fitted_model(self, config: ForecastModelConfig) -> torch.nn.Module:
        """What ``fit`` leaves in ``model_``: one network, or the ensemble of ``n_models``."""
        if self.n_models == 1:
            return self._build_model(config)
        return ForecastEnsemble([self._build_model(config) for _ in range(int(self.n_models))])

    def _train(
        self,
        train: WindowDataset,
        val: WindowDataset | None,
        device: torch.device,
        seed: int,
        bar: Any = None,
    ) -> list[dict]:
        """Train ``model_`` through the shared Trainer; returns its metrics history."""
        kind, qs = self.loss, self._quantile_levels()
        callbacks = () if bar is None or bar.disable else (_BarCallback(bar),)

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return forecast_loss(model(batch), batch["target"], kind, qs)

        config = TrainerConfig(
            max_steps=int(self.max_steps),
            batch_size=int(self.batch_size),
            lr=float(self.learning_rate),
            # an average spanning ~1/(1 - decay) steps lags a run not much longer than that
            ema_decay=max(0.0, min(float(self.ema_decay), 1 - 2.5 / int(self.max_steps))),
            warmup_steps=int(self.max_steps) // 20,
            eval_every=int(self.val_check_steps) if val is not None else None,
            patience=None
            if val is None or self.early_stopping is None
            else int(self.early_stopping),
            progress=False,  # the estimator's own bar covers setup and training
            seed=seed,
            device=str(device),
            strategy="none",
        )
        trainer = Trainer(
            self.model_,
            loss_fn,
            config,
            collate_fn=collate_windows,
            model_config=self.model_config_,
            callbacks=callbacks,
        )
        trainer.fit(train, val)
        if bar is not None:  # an early stop skips steps: the bar still ends at the member's end
            bar.update(max(0, int(self.max_steps) - trainer.global_step_))
        return list(trainer.history_)

    # -----------------------------------------------------------------------------------------
    # predict
    # -----------------------------------------------------------------------------------------

    def predict(
        self,
        h: int | None = None,
        df: pd.DataFrame | None = None,
        futr_df: pd.DataFrame | None = None,
        quantiles: Sequence[float] | None = None,
        *,
        level: Sequence[float] | None = None,
        static_df: pd.DataFrame | None = None,
    ) -> pd.DataFrame:
        """Forecast the h steps after the end of each series.

        Parameters
        ----------
        h : int, optional
            Steps to forecast; default the trained horizon. A longer h rolls out recursively: the
            point forecast is appended to the history and the network run again (past-only
            exogenous inputs are unknown there and set to their training mean).
        df : pd.DataFrame, optional
            History to forecast from, same columns as in fit; series unseen in fit are allowed
            (scaled by their own history). Default: the end of the training data.
        futr_df : pd.DataFrame, optional
            Rows ``id_col``, ``time_col`` and the ``futr_exog`` columns for every step of the
            horizon of every series (required when the model has known-future inputs). Extra rows
            are ignored, except the rows up to the end of the model's window when h is shorter
            (so predict(h=k) equals the first k steps of predict()); a missing row or column raises
            ValueError.
        quantiles : sequence of float, optional
            Quantiles to return as ``<alias>-q<q>`` columns (a subset of the trained ones).
        level : sequence of float, optional
            Prediction intervals to return as ``<alias>-lo-<level>`` / ``<alias>-hi-<level>``
            columns (their quantiles must have been trained). Default (neither given): the
            constructor's ``level`` intervals and the other trained quantiles.
        static_df : pd.DataFrame, optional
            Static features for series unseen in fit.

        Returns
        -------
        pd.DataFrame
            ``unique_id, ds, <alias>`` (the median for quantile models) and the interval /
            quantile columns; ``unique_id`` and ``ds`` carry the names given in fit (``id_col``,
            ``time_col``). It goes straight into ``utilsforecast.plotting.plot_series``.
        """
        self._check_fitted()
        h = self.h if h is None else h
        check(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1,
            f"h must be a positive int, got {h!r}",
        )
        h = int(h)
        q_cols = self._quantile_columns(quantiles, level)
        panel = self._history(df)
        static = self._static_matrix(static_df, panel.ids, self.columns_["id_col"], fitting=False)
        if self.channel_mixing:
            check(
                list(panel.ids) == list(self.ids_),
                f"channel_mixing=True forecasts exactly the fitted series {self.ids_}",
            )
        cols = {"id_col": self.columns_["id_col"], "time_col": self.columns_["time_col"]}
        span = -(-h // self.h) * self.h  # the network sees whole windows of h_trained steps
        ahead = None
        if (
            self.futr_cols_ and span > h
        ):  # so the first h steps match a longer forecast, use futr_df's later rows
            try:
                ahead = future_exog(futr_df, panel, span, **cols)
            except ValueError:
                pass
        if ahead is None:
            ahead = future_exog(
                futr_df, panel, h, **cols
            )  # raises when the requested steps are missing
            if self.futr_cols_ and span > h:
                warnings.warn(
                    f"futr_df gives the {h} requested steps but not all {span} of the model's "
                    "window: the "
                    "rest use the training mean, so these steps can differ from a forecast with a "
                    "longer futr_df",
                    stacklevel=2,
                )
        out = self._roll_out(panel, static, ahead, h)  # (S, h, Q) original scale
        return self._frame(panel, out, h, q_cols)

    def _history(self, df: pd.DataFrame | None) -> Panel:
        """The panel to forecast from: the fitted look-back, or ``df`` on the fitted grid."""
        if df is None:
            return self.panel_
        panel = build_panel(
            df,
            futr_exog=self.futr_cols_,
            hist_exog=self.hist_cols_,
            freq=self.freq_,
            **self.columns_,
        )
        warn_missing(panel.report, "predict", panel.freq)
        return panel

    def make_future_dataframe(self, h: int | None = None, df: pd.DataFrame | None = None):
        """The ``id_col`` / ``time_col`` rows of the h steps ``predict`` forecasts (default h).

        Fill in the ``futr_exog`` columns and pass it as ``futr_df``; ``df`` as in ``predict``.
        """
        self._check_fitted()
        h = self.h if h is None else h
        check(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1,
            f"h must be a positive int, got {h!r}",
        )
        panel = self._history(df)
        id_col, time_col = self.columns_["id_col"], self.columns_["time_col"]
        parts = [
            pd.DataFrame(
                {id_col: [sid] * int(h), time_col: future_times(panel.last(s), panel.freq, int(h))}
            )
            for s, sid in enumerate(panel.ids)
        ]
        return pd.concat(parts, ignore_index=True)

    def get_missing_future(
        self, futr_df: pd.DataFrame, h: int | None = None, df: pd.DataFrame | None = None
    ) -> pd.DataFrame:
        """The rows of ``make_future_dataframe(h, df)`` that ``futr_df`` lacks (or has NaN in).

        An empty frame means ``predict(h, df, futr_df)`` has every known-future value it needs.
        """
        future = self.make_future_dataframe(h, df)
        return missing_future(futr_df, future, self.futr_cols_, **self._id_time())

    def _id_time(self) -> dict[str, str]:
        return {"id_col": self.columns_["id_col"], "time_col": self.columns_["time_col"]}

    def _roll_out(
        self, panel: Panel, static: np.ndarray, ahead: list[np.ndarray], h: int
    ) -> np.ndarray:
        """Recursive forecast: (S, h, Q) on the original scale."""
        y, futr, hist, static_g, mean, std = self._groups(panel, static, ahead)
        point = self._point_index()
        chunks, done = [], 0
        while done < h:
            G = len(y)
            data = WindowData(y, futr, hist, static_g, self.input_size_, self.h)
            pred = self._predict_windows(
                data, np.arange(G), np.array([v.shape[1] for v in y])
            )  # (G, C, h_m, Q)
            chunks.append(pred)
            y = [np.concatenate([v, p[..., point]], 1) for v, p in zip(y, pred)]
            hist = [np.concatenate([x, np.zeros((x.shape[0], self.h))], 1) for x in hist]
            done += self.h
        pred = np.concatenate(chunks, 2)[:, :, :h]  # (G, C, h, Q)
        pred = pred.reshape(-1, h, pred.shape[-1])  # (S, h, Q): groups x channels are the series
        return pred * std[:, None, None] + mean[:, None, None]

    def _point_index(self) -> int:
        qs = self._quantile_levels()
        return qs.index(0.5) if qs else 0

    def _quantile_columns(
        self, quantiles: Sequence[float] | None, level: Sequence[float] | None = None
    ) -> list[tuple[int, str]]:
        """(output index, column name) of the interval and quantile columns to return.

        Intervals are ``<alias>-lo-<level>`` / ``<alias>-hi-<level>`` (Nixtla's names), other
        quantiles ``<alias>-q<q>``; the median is the ``<alias>`` column itself, never repeated.
        Default: the constructor's levels and the other trained quantiles.
        """
        trained = self._quantile_levels()
        if quantiles is None and level is None:
            levels = _check_levels(self.level)
            in_levels = {q for lv in levels for q in _level_quantiles(lv)}
            chosen = [q for q in trained if q not in in_levels]
        else:
            check(bool(trained), "quantile forecasts need a model fit with loss='quantile'")
            levels = _check_levels(level)
            chosen = [] if quantiles is None else [float(q) for q in quantiles]
            unknown = [q for q in chosen if q not in trained]
            check(not unknown, f"quantiles {unknown} were not trained; trained: {trained}")
        lows, highs = [], []
        for lv in sorted(set(levels), reverse=True):
            lo, hi = _level_quantiles(lv)
            check(
                lo in trained and hi in trained,
                f"level {lv:g} needs the quantiles {lo:g} and {hi:g}, which were not trained "
                f"(trained: {trained}); fit with level=[{lv:g}]",
            )
            lows.append((trained.index(lo), f"{self.model_name}-lo-{_level_name(lv)}"))
            highs.insert(0, (trained.index(hi), f"{self.model_name}-hi-{_level_name(lv)}"))
        cols = [(trained.index(q), f"{self.model_name}-q{q:g}") for q in chosen if q != 0.5]
        return lows + highs + cols

    def _frame(
        self, panel: Panel, pred: np.ndarray, h: int, q_cols: list[tuple[int, str]]
    ) -> pd.DataFrame:
        id_col, time_col = self.columns_["id_col"], self.columns_["time_col"]
        parts = []
        for s, sid in enumerate(panel.ids):
            part = {
                id_col: [sid] * h,
                time_col: future_times(panel.last(s), panel.freq, h),
                self.model_name: pred[s, :, self._point_index()],
            }
            part.update({name: pred[s, :, q] for q, name in q_cols})
            parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    # -----------------------------------------------------------------------------------------
    # backtest
    # -----------------------------------------------------------------------------------------

    def cross_validation(
        self,
        df: pd.DataFrame,
        n_windows: int = 1,
        step_size: int | None = None,
        refit: bool | int = False,
        *,
        static_df: pd.DataFrame | None = None,
        id_col: str = "unique_id",
        time_col: str = "ds",
        target_col: str = "y",
        futr_exog: Sequence[str] = (),
        hist_exog: Sequence[str] = (),
        val_size: int | None = None,
        freq: Any = None,
        level: Sequence[float] | None = None,
    ) -> pd.DataFrame:
        """Rolling-origin backtest: forecast ``n_windows`` windows of h steps at the end of each
        series.

        The last window ends at each series' last step; earlier ones start ``step_size`` (default
        h) steps apart. A copy of this estimator (same settings) is fit on the steps before the
        first cutoff and forecasts every window from its true history (``refit=False``), or is
        refit before every window (``refit=True``) or every k-th window (``refit=k``). This
        estimator itself is left as it was: fitted or not, ``predict`` still forecasts from the
        end of the data it was fit on. With ``warm_start=True`` each refit continues training the
        previous window's network. Known-future inputs of the windows are read from ``df``.

        Returns
        -------
        pd.DataFrame
            ``id_col, time_col, cutoff, target_col, <alias>`` (+ interval / quantile columns, as
            in ``predict``; ``level`` picks intervals); ``cutoff`` is the last step of the history
            each forecast was made from. It goes straight into ``utilsforecast.evaluate``.
        """
        self._check_params()
        step = self.h if step_size is None else step_size
        check(
            isinstance(n_windows, (int, np.integer))
            and not isinstance(n_windows, bool)
            and n_windows >= 1,
            f"n_windows must be a positive int, got {n_windows!r}",
        )
        check(
            isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 1,
            f"step_size must be a positive int, got {step!r}",
        )
        check(
            isinstance(refit, (bool, np.bool_))
            or (isinstance(refit, (int, np.integer)) and refit >= 1),
            "refit must be a bool or a positive int (refit every that many windows), "
            f"got {refit!r}",
        )
        every = (
            (n_windows if not refit else 1) if isinstance(refit, (bool, np.bool_)) else int(refit)
        )
        columns = {"id_col": id_col, "time_col": time_col, "target_col": target_col}
        with self._progress_bar("cross_validation") as bar:
            panel = self._build_panel(df, futr_exog, hist_exog, freq, columns, "cross_validation")
            T = np.array(panel.lengths)
            ends = [
                T - self.h - step * (n_windows - 1 - k) for k in range(n_windows)
            ]  # history lengths per window
            check(
                (ends[0] >= 1).all(),
                f"n_windows={n_windows} x step_size={step} + h={self.h} does not fit in "
                f"series of {int(T.min())} steps",
            )
            val = self.val_size if val_size is None else val_size
            est = clone(self)  # never this estimator: a backtest must not replace its fit
            est.columns_ = columns
            fits = -(-n_windows // every)
            bar.reset(total=fits * est._fit_units())
            preds = []
            for first in range(0, n_windows, every):
                est._fit_panel(panel.head(ends[first]), static_df, val, bar)
                preds += est._backtest(panel, ends[first : first + every])
        return est._cv_frame(panel, ends, preds, level)

    def _backtest(self, panel: Panel, ends: list[np.ndarray]) -> list[np.ndarray]:
        """Forecasts (S, h, Q) on the original scale for each list of history lengths in
        ``ends``."""
        static = self._static_matrix(None, panel.ids, self.columns_["id_col"], fitting=False)
        y, futr, hist, static_g, mean, std = self._groups(panel, static)
        data = WindowData(y, futr, hist, static_g, self.input_size_, self.h)
        G = len(y)
        g = np.tile(np.arange(G), len(ends))
        t = np.concatenate(
            [e[:G] for e in ends]
        )  # channel-mixing: one group, all series end together
        pred = self._predict_windows(data, g, t)  # (W*G, C, h, Q)
        pred = pred.reshape(len(ends), -1, self.h, pred.shape[-1])  # (W, S, h, Q)
        return list(pred * std[None, :, None, None] + mean[None, :, None, None])

    def _cv_frame(
        self,
        panel: Panel,
        ends: list[np.ndarray],
        preds: list[np.ndarray],
        level: Sequence[float] | None = None,
    ) -> pd.DataFrame:
        id_col, time_col = self.columns_["id_col"], self.columns_["time_col"]
        target_col = self.columns_["target_col"]
        point, q_cols = self._point_index(), self._quantile_columns(None, level)
        parts = []
        for s, sid in enumerate(panel.ids):
            times = panel.times(s)
            for e, pred in zip(ends, preds):
                e = int(e[s])
                part = {
                    id_col: [sid] * self.h,
                    time_col: times[e : e + self.h],
                    "cutoff": times[e - 1],
                    target_col: panel.y[s][e : e + self.h],
                    self.model_name: pred[s, :, point],
                }
                part.update({name: pred[s, :, q] for q, name in q_cols})
                parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    # -----------------------------------------------------------------------------------------
    # persistence and plots
    # -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Save to the folder ``path``: ``forecaster.json`` (settings, scalers) and ``state.pt``
        (tensors)."""
        return save_forecaster(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Forecaster:
        """Read a forecaster written by ``save`` (no code is unpickled); ``device`` overrides the
        saved one."""
        return load_forecaster(cls, path, device)

    def plot(
        self,
        df: pd.DataFrame,
        forecast: pd.DataFrame,
        *,
        history: int | None = None,
        max_series: int = 4,
    ):
        """Plot the history in ``df``, the forecast and its quantile bands (needs matplotlib);
        returns the Figure."""
        self._check_fitted()
        return plot_forecast(
            df,
            forecast,
            model=self.model_name,
            history=history,
            max_series=max_series,
            **self.columns_,
        )
