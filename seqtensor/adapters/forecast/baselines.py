"""Forecasting baselines: seasonal naive and DLinear.

Legend: N windows, C channels, L look-back, h horizon, Q outputs per step.

- ``seasonal_naive``: repeat the last season of the look-back (Hyndman & Athanasopoulos, FPP3
  section 5.2, https://otexts.com/fpp3/simple-methods.html).
- ``DLinear``: split the look-back into a moving-average trend and a remainder and map each to the
  horizon with one linear layer (Zeng et al. 2023, https://arxiv.org/abs/2205.13504).
  ``DLinearForecaster`` is the ``Forecaster`` with DLinear as its network, so it has the same
  fit / predict / cross_validation / save verbs and trains through the same Trainer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..._validation import check
from .forecaster import Forecaster
from .model import ForecastModelConfig

__all__ = ["seasonal_naive", "DLinear", "DLinearForecaster"]


def seasonal_naive(history: np.ndarray, h: int, season: int) -> np.ndarray:
    """Forecast (..., h) from history (..., L): step i repeats history[L - season + i % season].

    ``season=1`` is the naive (last value) forecast. NaN in the repeated season stays NaN.
    """
    history = np.asarray(history, dtype=float)
    L = history.shape[-1]
    check(
        isinstance(season, (int, np.integer)) and 1 <= season <= L,
        f"season must be an int in [1, {L}], got {season!r}",
    )
    idx = L - season + np.arange(h) % season
    return history[..., idx]


class DLinear(nn.Module):
    """forward(batch) -> (N, C, h, 1): trend and remainder of ``batch["y"]`` (N, C, L), one linear
    map each.

    Missing values (NaN) are replaced by the window's observed mean first. Weights are shared
    across channels, as in the paper's default.
    """

    def __init__(self, input_size: int, h: int, kernel_size: int = 25) -> None:
        super().__init__()
        check(kernel_size % 2 == 1, f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.trend = nn.Linear(input_size, h)
        self.remainder = nn.Linear(input_size, h)
        for layer in (
            self.trend,
            self.remainder,
        ):  # start as the window mean, as the reference code does
            nn.init.constant_(layer.weight, 1.0 / input_size)
            nn.init.zeros_(layer.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["y"]  # (N, C, L)
        observed = ~torch.isnan(y)
        mean = torch.where(observed, y, 0).sum(-1, keepdim=True) / observed.sum(
            -1, keepdim=True
        ).clamp_min(1)
        x = torch.where(observed, y, mean)
        pad = (self.kernel_size - 1) // 2
        padded = F.pad(
            x, (pad, pad), mode="replicate"
        )  # repeat the ends so the average keeps the level
        trend = F.avg_pool1d(padded, self.kernel_size, stride=1)  # (N, C, L)
        return (self.trend(trend) + self.remainder(x - trend))[..., None]  # (N, C, h, 1)


class DLinearForecaster(Forecaster):
    """``Forecaster`` whose network is ``DLinear``; encoder settings (d_model, ...) are unused.

    ``patch_len`` and the exogenous inputs are ignored by the network; point losses only.
    ``statistical=None`` keeps DLinear's own forecast (the default blends MSTL's in, as the
    ``Forecaster`` does).
    """

    def _build_model(self, config: ForecastModelConfig) -> nn.Module:
        check(
            config.n_outputs == 1,
            "DLinearForecaster gives point forecasts only: use loss 'mae', 'mse' or 'huber'",
        )
        return DLinear(config.input_size, config.h)
