"""The Forecaster's closed-form start chosen on held-out windows, and validation before training.

Oracles: the candidate maps against the forecasts they stand for (last value, repeated cycle),
the eigen-decomposed ridge path against NumPy's float64 solve of the normal equations, and on a
random walk / a noiseless seasonal series the candidate that is known to be best.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.model import _RidgePath
from seqtensor.adapters.forecast.seasonality import seasonal_profile_matrix, start_candidates

SMALL = dict(
    patch_len=8, d_model=16, n_layers=1, n_heads=2, batch_size=16, random_state=0, device="cpu"
)


def frame(y: np.ndarray) -> pd.DataFrame:
    t = pd.date_range("2024-01-01", periods=len(y), freq="h")
    return pd.DataFrame({"unique_id": "s", "ds": t, "y": y})


def seasonal(T: int, period: int = 24) -> np.ndarray:
    t = np.arange(T)
    return 10 + 3 * np.sin(2 * np.pi * t / period) + np.cos(6 * np.pi * t / period)


def test_candidates_are_the_forecasts_they_name():
    L, h = 96, 30
    x = np.random.default_rng(0).standard_normal(L)
    c = start_candidates(L, h, (24, 48, 200))  # 200 has no whole cycle in 96 steps: dropped
    assert set(c) == {
        "naive",
        "mean",
        "seasonal_naive_24",
        "seasonal_naive_48",
        "profile",
        "profile_recent",
    }
    np.testing.assert_allclose(x @ c["naive"], np.full(h, x[-1]))
    np.testing.assert_allclose(x @ c["mean"], np.full(h, x.mean()))
    for p in (24, 48):
        want = np.array([x[L - p + j % p] for j in range(h)])
        np.testing.assert_allclose(x @ c[f"seasonal_naive_{p}"], want)
    np.testing.assert_allclose(c["profile"], seasonal_profile_matrix(L, h, (24, 48)))
    # the recent level: a step at the start of the look-back moves the level of all cycles only
    step = np.zeros(L)
    step[0] = 1.0
    assert abs(step @ c["profile_recent"]).max() < abs(step @ c["profile"]).max() + 1e-12
    level = np.ones(L) * 5.0  # a flat look-back: every candidate forecasts the flat value
    for W in c.values():
        np.testing.assert_allclose(level @ W, np.full(h, 5.0), atol=1e-12)


def test_ridge_path_matches_the_normal_equations():
    rng = np.random.default_rng(1)
    N, L, h = 200, 12, 5
    X, Y, W0 = rng.standard_normal((N, L)), rng.standard_normal((N, h)), rng.standard_normal((L, h))
    path = _RidgePath(torch.from_numpy(X), torch.from_numpy(Y))
    for alpha in (1e-3, 0.1, 10.0):
        W, b = path.fit(torch.from_numpy(W0), alpha)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        want = W0 + np.linalg.solve(Xc.T @ Xc + alpha * N * np.eye(L), Xc.T @ (Yc - Xc @ W0))
        np.testing.assert_allclose(W.numpy(), want, atol=1e-9)
        np.testing.assert_allclose(b.numpy(), Y.mean(0) - X.mean(0) @ want, atol=1e-9)
    W, b = path.fit(torch.from_numpy(W0), float("inf"))
    np.testing.assert_allclose(W.numpy(), W0), np.testing.assert_allclose(b.numpy(), 0.0)


def test_random_walk_starts_from_the_last_value():
    y = 100 + np.cumsum(np.random.default_rng(2).standard_normal(1500))
    fc = Forecaster(h=12, input_size=96, max_steps=1, verbose=False, **SMALL).fit(frame(y))
    assert fc.seasons_ == () and fc.start_ == "naive"
    assert fc.val_size_ == 36  # "auto": 3h, the series holds input_size + 8h
    assert fc.model_.skip_alpha_ >= 0.1 * 1e3  # pulled hard towards the last value


def test_noiseless_seasonal_series_starts_from_a_seasonal_forecast_and_keeps_it():
    """Training at a learning rate that wrecks the network cannot beat the exact start: the
    evaluation before the first step keeps it, and the forecast is the seasonal oracle."""
    T, h, L = 1200, 24, 96
    y = seasonal(T + h)
    fc = Forecaster(
        h=h,
        input_size=L,
        max_steps=30,
        learning_rate=0.5,
        val_check_steps=10,
        verbose=False,
        **SMALL,
    ).fit(frame(y[:T]))
    assert fc.seasons_ == (24,)
    assert fc.start_ in {"seasonal_naive_24", "profile", "profile_recent"}
    assert fc.selected_ == ["start"]
    assert fc.history_[0]["step"] == 0 and fc.history_[0]["val_loss"] < 1e-4
    pred = fc.predict()["Forecaster"].to_numpy()
    np.testing.assert_allclose(pred, y[T:], atol=1e-3)


def test_training_is_kept_when_it_beats_the_start(monkeypatch):
    """An oracle 'training' that sets the linear map to the exact seasonal forecast beats the
    look-back-mean start (no seasons, no ridge), so the trained network is kept."""
    T, h, L = 1200, 24, 96
    y = seasonal(T + h)

    def oracle_train(self, train, val, device, seed, bar=None):
        W = torch.from_numpy(start_candidates(L, h, (24,))["seasonal_naive_24"]).float()
        with torch.no_grad():
            self.model_.skip.weight.copy_(W.T)
        return []

    monkeypatch.setattr(Forecaster, "_train", oracle_train)
    fc = Forecaster(
        h=h, input_size=L, seasonality=None, skip_ridge=0.0, verbose=False, **SMALL
    ).fit(frame(y[:T]))
    assert fc.selected_ == ["trained"] and fc.start_ == ""
    np.testing.assert_allclose(fc.predict()["Forecaster"].to_numpy(), y[T:], atol=1e-3)

    def worse_train(self, train, val, device, seed, bar=None):
        with torch.no_grad():
            self.model_.skip.bias.add_(1.0)
        return []

    monkeypatch.setattr(Forecaster, "_train", worse_train)
    fc.fit(frame(y[:T]))
    assert fc.selected_ == ["start"]
    window = y[T - L : T]  # the kept start: the look-back mean
    np.testing.assert_allclose(fc.predict()["Forecaster"].to_numpy(), window.mean(), atol=1e-3)


def test_auto_val_size_follows_the_series_length_and_explicit_values_win():
    y = seasonal(400)
    fc = Forecaster(h=12, input_size=96, max_steps=1, verbose=False, **SMALL)
    assert fc.fit(frame(y)).val_size_ == 36  # 400 >= 96 + 8 * 12
    assert fc.fit(frame(y[:160])).val_size_ == 12  # 96 + 4 * 12 <= 160 < 96 + 8 * 12
    assert fc.fit(frame(y[:130])).val_size_ == 0
    assert fc.selected_ == ["unvalidated"]
    assert fc.fit(frame(y), val_size=0).val_size_ == 0
    assert fc.set_params(val_size=24).fit(frame(y)).val_size_ == 24


@pytest.mark.parametrize("bad", ["last", -1, 1.5, True])
def test_bad_val_size_is_named(bad):
    with pytest.raises(ValueError, match="val_size"):
        Forecaster(h=12, input_size=96, val_size=bad, verbose=False, **SMALL).fit(
            frame(seasonal(400))
        )
