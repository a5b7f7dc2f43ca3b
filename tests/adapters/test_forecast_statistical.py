"""MSTL's forecast from the whole history, blended into the Forecaster's output.

Oracles: statsforecast's MSTL (with the same fixed level smoothing) on the same history, the
``mstl_matrix`` map on the last whole cycles, the closed form of a pattern plus a constant (MSTL
continues it exactly), and the blend formula against the network's own forecast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast import forecaster as forecaster_module
from seqtensor.adapters.forecast.seasonality import (
    LEVEL_ALPHA,
    MSTL_LONGEST_SEASON,
    MSTL_MAX_STEPS,
    mstl_components,
    mstl_forecast,
    mstl_matrix,
    mstl_seasons,
)
from seqtensor.adapters.forecast.windows import WindowData, WindowDataset

SMALL = dict(
    patch_len=8, d_model=16, n_layers=1, n_heads=2, batch_size=16, random_state=0, device="cpu"
)
DAY, WEEK = 24, 168


def two_seasons(T: int, seed: int = 0) -> np.ndarray:
    """A constant plus zero-mean daily and weekly patterns: MSTL forecasts it within 0.5%."""
    rng = np.random.default_rng(seed)
    daily, weekly = rng.standard_normal(DAY), rng.standard_normal(7)
    daily -= daily.mean()
    weekly -= weekly.mean()
    t = np.arange(T)
    return 20.0 + daily[t % DAY] + 2.0 * weekly[t // DAY % 7]


def frame(y: np.ndarray) -> pd.DataFrame:
    ds = pd.date_range("2024-01-01", periods=len(y), freq="h")
    return pd.DataFrame({"unique_id": "s", "ds": ds, "y": y})


def test_mstl_forecast_is_statsforecasts_mstl_on_the_whole_history():
    """statsforecast's MSTL with alpha-0.2 smoothing fit on the last whole weeks of each row's
    history; NaN before a row's start is no history; a row without two cycles is NaN."""
    sf = pytest.importorskip("statsforecast.models")
    rng = np.random.default_rng(4)
    T, h = 3 * WEEK + 11, 30
    y = rng.standard_normal((3, T)).cumsum(1) + two_seasons(T)
    y[1, : WEEK - 20] = np.nan  # 2 weeks and 31 steps of history
    y[2, : 2 * WEEK] = np.nan  # 179 steps: only the day has two cycles
    got = mstl_forecast(y, h, (DAY, WEEK))
    mstl = sf.MSTL(season_length=[DAY, WEEK], trend_forecaster=sf.SimpleExponentialSmoothing(0.2))
    np.testing.assert_allclose(got[0], mstl.fit(y[0, -3 * WEEK :]).predict(h)["mean"], atol=1e-9)
    np.testing.assert_allclose(got[1], mstl.fit(y[1, -2 * WEEK :]).predict(h)["mean"], atol=1e-9)
    daily = sf.MSTL(season_length=DAY, trend_forecaster=sf.SimpleExponentialSmoothing(0.2))
    np.testing.assert_allclose(got[2], daily.fit(y[2, -7 * DAY :]).predict(h)["mean"], atol=1e-9)
    assert np.isnan(mstl_forecast(y[:, -40:], h, (DAY, WEEK))).all()


def test_mstl_forecast_reads_at_most_the_cap_and_fills_gaps():
    """A long history uses its last ``MSTL_MAX_STEPS``-bounded whole weeks, the same map as
    ``mstl_matrix``; interior and trailing NaN are filled by linear interpolation, and a
    season too long for two cycles within the cap is left out."""
    T, h = MSTL_MAX_STEPS + 500, 24
    y = np.random.default_rng(5).standard_normal(T).cumsum() + two_seasons(T)
    W = mstl_matrix(MSTL_MAX_STEPS, h, (DAY, WEEK))
    np.testing.assert_allclose(mstl_forecast(y[None], h, (DAY, WEEK))[0], y[-MSTL_MAX_STEPS:] @ W)
    gappy = y.copy()
    gappy[[T - 300, T - 299, T - 5, T - 1]] = np.nan
    filled = y.copy()
    filled[T - 300 : T - 298] = np.interp(
        [T - 300, T - 299], [T - 301, T - 298], y[[T - 301, T - 298]]
    )
    filled[T - 5] = (y[T - 6] + y[T - 4]) / 2
    filled[T - 1] = y[T - 2]
    np.testing.assert_allclose(
        mstl_forecast(gappy[None], h, (DAY, WEEK))[0], filled[-MSTL_MAX_STEPS:] @ W
    )
    for seasons in ((DAY, T // 2 + 1), (1, DAY)):  # a "season" of one step is no season
        np.testing.assert_allclose(
            mstl_forecast(y[None], h, seasons), mstl_forecast(y[None], h, (DAY,))
        )


def test_a_season_past_half_the_cap_is_decomposed_from_two_cycles():
    """Oracle: statsforecast's MSTL on the last two cycles of a season longer than half of
    ``MSTL_MAX_STEPS`` (a week of 5-minute steps is one); a season past ``MSTL_LONGEST_SEASON``
    is left out even with two cycles in the history."""
    sf = pytest.importorskip("statsforecast.models")
    long, h = MSTL_MAX_STEPS // 2 + 28, 40
    T = 2 * long + 300
    t = np.arange(T)
    rng = np.random.default_rng(6)
    y = rng.standard_normal(T).cumsum() + np.sin(2 * np.pi * t / DAY) + 2 * (t % long < 100)
    assert mstl_seasons((DAY, long), T) == (DAY, long)
    mstl = sf.MSTL(season_length=[DAY, long], trend_forecaster=sf.SimpleExponentialSmoothing(0.2))
    want = mstl.fit(y[-2 * long :]).predict(h)["mean"]
    np.testing.assert_allclose(mstl_forecast(y[None], h, (DAY, long))[0], want, atol=1e-9)
    too_long = MSTL_LONGEST_SEASON + 1
    assert mstl_seasons((DAY, too_long), 2 * too_long) == (DAY,)
    assert mstl_seasons((DAY, long), 2 * long - 1) == (DAY,)


@pytest.mark.parametrize(
    "n,h,seasons", [(240, 30, (24,)), (336, 200, (24, 168)), (420, 9, (5, 12, 60))]
)
def test_mstl_map_from_carried_rows_is_the_dense_decomposition(n, h, seasons):
    """The forecast map carries few rows backwards through the decomposition; oracle: the same
    forecast from the dense (n, n) component maps of ``mstl_components``."""
    comp, deseason = mstl_components(n, seasons)
    a = LEVEL_ALPHA
    w = a * (1 - a) ** np.arange(n - 1, -1, -1.0)
    w[0] = (1 - a) ** (n - 1)
    steps = np.arange(h)
    want = np.repeat((w @ deseason)[None], h, 0)
    for p in seasons:
        want = want + comp[p][n - p + steps % p]
    np.testing.assert_allclose(mstl_matrix(n, h, seasons), want.T, atol=1e-12)


def test_mstl_forecast_bad_input_is_named():
    with pytest.raises(ValueError, match="rows, steps"):
        mstl_forecast(np.zeros(10), 3, (2,))
    with pytest.raises(ValueError, match="h must be"):
        mstl_forecast(np.zeros((1, 10)), 0, (2,))


def test_window_history_is_the_series_before_the_cut():
    y = [np.arange(10.0)[None], 100 + np.arange(7.0)[None]]
    data = WindowData(y, [np.zeros((0, 10)), np.zeros((0, 7))], [np.zeros((0, 10))] * 2,
                      np.zeros((2, 0)), L=3, h=2)  # fmt: skip
    got = data.history(np.array([0, 1, 1]), np.array([8, 7, 2]), 5)
    want = [[3, 4, 5, 6, 7], [102, 103, 104, 105, 106], [np.nan] * 3 + [100, 101]]
    np.testing.assert_array_equal(got[:, 0], np.array(want))


def test_history_beyond_the_look_back_forecasts_the_week_the_network_cannot_see():
    """A 48-step look-back holds no week; the history does. MSTL continues the pattern (within
    0.5%), so the held-out windows choose it alone (weight 1) and the forecast is MSTL's, while
    the network alone misses the weekly pattern by far more."""
    T, h = 5 * WEEK, 24
    y = two_seasons(T + h)
    fc = Forecaster(h=h, input_size=48, seasonality=(DAY, WEEK), max_steps=1, verbose=False,
                    **SMALL).fit(frame(y[:T]))  # fmt: skip
    assert fc.seasons_ == (DAY,) and fc.statistical_seasons_ == (DAY, WEEK)
    assert fc.statistical_weight_ == 1.0
    pred = fc.predict()["Forecaster"].to_numpy()
    np.testing.assert_allclose(pred, mstl_forecast(y[None, :T], h, (DAY, WEEK))[0], atol=1e-4)
    assert np.abs(pred - y[T:]).mean() < 0.02
    np.testing.assert_allclose(fc.predict(df=frame(y[:T]))["Forecaster"], pred, atol=1e-9)
    alone = clone(fc).set_params(statistical=None).fit(frame(y[:T]))
    assert alone.statistical_weight_ == 0.0
    assert np.abs(alone.predict()["Forecaster"].to_numpy() - y[T:]).mean() > 0.1


def test_blend_moves_every_quantile_with_the_point_forecast(monkeypatch):
    """Weight 0.5 forced: the point forecast is the mean of the network's (same seed, no blend)
    and MSTL's from the whole history; the interval bounds shift by the same amount."""
    T, h = 4 * WEEK, 24
    y = two_seasons(T, seed=1) + np.random.default_rng(6).standard_normal(T)
    kw = dict(h=h, input_size=48, seasonality=(DAY, WEEK), max_steps=3, loss="quantile",
              level=[80], verbose=False, **SMALL)  # fmt: skip
    alone = Forecaster(statistical=None, **kw).fit(frame(y)).predict()
    monkeypatch.setattr(forecaster_module, "STATISTICAL_WEIGHTS", (0.5,))
    fc = Forecaster(**kw).fit(frame(y))
    assert fc.statistical_weight_ == 0.5
    blended = fc.predict()
    stat = mstl_forecast(y[None], h, (DAY, WEEK))[0]
    np.testing.assert_allclose(
        blended["Forecaster"], 0.5 * (alone["Forecaster"] + stat), rtol=1e-5, atol=1e-4
    )
    shift = blended["Forecaster"] - alone["Forecaster"]
    for col in ("Forecaster-lo-80", "Forecaster-hi-80"):
        np.testing.assert_allclose(blended[col] - alone[col], shift, atol=1e-4)


def test_a_start_that_fits_nothing_chooses_the_weight_on_every_comparable_window():
    """A kept closed-form start (penalty infinity) has seen no target: every window whose
    history holds both seasons, as the series' end does, scores the weight; a ridge fit or a
    trained network is scored on the late held-out windows only."""
    T, h = 5 * WEEK, 24
    y = two_seasons(T)
    fc = Forecaster(h=h, input_size=48, seasonality=(DAY, WEEK), max_steps=1, verbose=False,
                    **SMALL).fit(frame(y))  # fmt: skip
    data = WindowData([y[None]], [np.zeros((0, T))], [np.zeros((0, T))], np.zeros((1, 0)), 48, h)
    train = WindowDataset(data, np.zeros(500, np.int64), np.arange(48, 548))
    val = WindowDataset(data, np.zeros(10, np.int64), np.arange(600, 610))
    late = WindowDataset(data, np.zeros(5, np.int64), np.arange(605, 610))
    fc.selected_, fc.model_.skip_alpha_ = ["start"], float("inf")
    chosen = fc._weight_windows(train, val, late)
    np.testing.assert_array_equal(chosen.t, np.r_[np.arange(2 * WEEK, 548), np.arange(600, 610)])
    fc.model_.skip_alpha_ = 100.0
    assert fc._weight_windows(train, val, late) is late
    fc.selected_, fc.model_.skip_alpha_ = ["trained"], float("inf")
    assert fc._weight_windows(train, val, late) is late


def test_blend_survives_save_load_and_backtests_use_it(tmp_path):
    T, h = 5 * WEEK, 24
    y = two_seasons(T + 2 * h)
    fc = Forecaster(h=h, input_size=48, seasonality=(DAY, WEEK), max_steps=1, verbose=False,
                    **SMALL).fit(frame(y[:T]))  # fmt: skip
    loaded = Forecaster.load(fc.save(tmp_path / "m"))
    assert loaded.statistical_weight_ == fc.statistical_weight_ == 1.0
    assert loaded.statistical_seasons_ == (DAY, WEEK)
    np.testing.assert_allclose(loaded.predict()["Forecaster"], fc.predict()["Forecaster"])
    loaded.set_params(warm_start=True, max_steps=1).fit(frame(y[:T]))  # chosen again
    assert loaded.statistical_weight_ == 1.0
    loaded.set_params(statistical=None).fit(frame(y[:T]))
    assert loaded.statistical_weight_ == 0.0
    cv = fc.cross_validation(frame(y), n_windows=2)
    history = np.stack([np.r_[np.full(h, np.nan), y[:T]], y[: T + h]])  # NaN: no history
    want = mstl_forecast(history, h, (DAY, WEEK)).ravel()
    np.testing.assert_allclose(cv["Forecaster"], want, atol=1e-4)


def test_statistical_setting_is_checked_and_cloned():
    fc = Forecaster(h=4, statistical=None)
    assert fc.get_params()["statistical"] is None and clone(fc).statistical is None
    with pytest.raises(ValueError, match="statistical must be"):
        Forecaster(h=4, statistical="ets", verbose=False).fit(frame(two_seasons(400)))
