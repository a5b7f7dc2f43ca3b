"""Baselines: seasonal naive against a direct computation; DLinear's decomposition and training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from seqtensor.adapters.forecast.baselines import DLinear, DLinearForecaster, seasonal_naive


def test_seasonal_naive_repeats_the_last_season():
    history = np.arange(20.0).reshape(2, 10)
    out = seasonal_naive(history, h=7, season=3)
    expected = np.stack([[row[10 - 3 + i % 3] for i in range(7)] for row in history])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(seasonal_naive(history, h=2, season=1), history[:, [-1, -1]])
    with pytest.raises(ValueError, match="season"):
        seasonal_naive(history, h=2, season=11)


def test_dlinear_starts_as_window_mean_and_handles_missing():
    model = DLinear(input_size=30, h=5)
    y = torch.randn(4, 2, 30)
    out = model({"y": y})
    assert out.shape == (4, 2, 5, 1)
    # at initialization trend and remainder maps average the window: their sum is the window mean
    torch.testing.assert_close(
        out[..., 0], y.mean(-1, keepdim=True).expand(4, 2, 5), rtol=1e-4, atol=1e-5
    )
    y[0, 0, :4] = float("nan")
    assert torch.isfinite(model({"y": y})).all()


def test_dlinear_forecaster_learns_a_seasonal_trend():
    n = 400
    t = np.arange(n)
    df = pd.DataFrame(
        {
            "unique_id": "s",
            "ds": pd.date_range("2020-01-01", periods=n, freq="h"),
            "y": 0.01 * t + np.sin(2 * np.pi * t / 24),
        }
    )
    fc = DLinearForecaster(
        h=12, input_size=48, max_steps=300, learning_rate=1e-2, random_state=0, device="cpu"
    )
    cv = fc.cross_validation(df, n_windows=3)
    assert list(cv.columns)[-1] == "DLinearForecaster"
    naive = np.concatenate(
        [seasonal_naive(df["y"].to_numpy()[: n - 12 * (3 - k)], 12, 24) for k in range(3)]
    )
    err = np.abs(cv["DLinearForecaster"] - cv["y"]).mean()
    assert err < 0.5 * np.abs(naive - cv["y"]).mean() + 1e-3, err  # beats seasonal naive on a trend
