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
from seqtensor.adapters.forecast.model import (
    SIMPLER_MARGIN,
    ForecastModelConfig,
    PatchForecastModel,
    _RidgePath,
    _rolling_folds,
)
from seqtensor.adapters.forecast.seasonality import (
    FAST_LEVEL_ALPHA,
    combined_start,
    default_input_size,
    mstl_components,
    mstl_matrix,
    seasonal_profile_matrix,
    start_candidates,
    trend_profile_matrix,
)

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
        "profile_smooth",
        "profile_fast",
        "profile_trend",
        "mstl",
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


def _smooth_profile_loop(x, h, p, decay, alpha):
    """One season, by hand: weighted per-phase means of the whole cycles, the level smoothed by
    the recursion level_t = alpha d_t + (1 - alpha) level_(t-1) over the deseasonalized x."""
    L, k = len(x), len(x) // p
    prof, total = np.zeros(p), 0.0
    for c in range(k):  # c = 0 the oldest whole cycle
        w = decay ** (k - 1 - c)
        prof += w * x[L - k * p + c * p : L - k * p + (c + 1) * p]
        total += w
    prof = prof / total
    prof -= prof.mean()
    d = [x[t] - prof[(t - L) % p] for t in range(L)]
    level = d[0]
    for t in range(1, L):
        level = alpha * d[t] + (1 - alpha) * level
    return np.array([level + prof[j % p] for j in range(h)])


@pytest.mark.parametrize("L,p,decay,alpha", [(96, 24, 0.7, 0.2), (100, 12, 0.5, 1.0)])
def test_smooth_profile_is_weighted_cycles_plus_a_smoothed_level(L, p, decay, alpha):
    h = 30
    x = np.random.default_rng(1).standard_normal(L)
    W = seasonal_profile_matrix(L, h, (p,), cycle_decay=decay, level_alpha=alpha)
    np.testing.assert_allclose(x @ W, _smooth_profile_loop(x, h, p, decay, alpha), atol=1e-12)
    # defaults of the start candidate
    c = start_candidates(96, h, (24,))
    want = _smooth_profile_loop(x[:96], h, 24, 0.7, 0.2)
    np.testing.assert_allclose(x[:96] @ c["profile_smooth"], want, atol=1e-12)
    want = _smooth_profile_loop(x[:96], h, 24, 0.7, FAST_LEVEL_ALPHA)
    np.testing.assert_allclose(x[:96] @ c["profile_fast"], want, atol=1e-12)


def test_trend_profile_forecasts_a_trend_plus_two_seasons_exactly():
    """Oracle: y = a + b t + two sinusoids (periods 24 and 96, nested) continues exactly; the
    profile without a trend does not (its phase means carry the trend as a sawtooth)."""
    L, h = 4 * 96, 60
    t = np.arange(L + h)
    y = 5 + 0.03 * t + 2 * np.sin(2 * np.pi * t / 24) + np.cos(2 * np.pi * t / 96 + 1)
    W = trend_profile_matrix(L, h, (24, 96))
    np.testing.assert_allclose(y[:L] @ W, y[L:], atol=1e-9)
    np.testing.assert_allclose(y[:L] @ start_candidates(L, h, (24, 96))["profile_trend"], y[L:])
    assert np.abs(y[:L] @ seasonal_profile_matrix(L, h, (24, 96)) - y[L:]).max() > 0.1
    # any pattern of the longest period plus a trend, and a constant gives the constant
    pattern = np.random.default_rng(4).standard_normal(96)
    z = pattern[t % 96] - 0.5 * t
    np.testing.assert_allclose(z[:L] @ W, z[L:], atol=1e-9)
    np.testing.assert_allclose(np.full(L, 3.0) @ W, np.full(h, 3.0), atol=1e-12)
    # fewer than two whole cycles: no trend can be told from the pattern
    assert trend_profile_matrix(150, h, (96,)) is None


def test_mstl_components_are_a_pattern_and_a_level_exactly():
    """Closed form: y = c + a zero-mean daily pattern, decomposed with seasons (24, 168): the daily
    component is the pattern, the weekly one zero, the deseasonalized series c, and the forecast
    continues y exactly (a constant maps to itself)."""
    L, h = 3 * 168, 50
    t = np.arange(L + h)
    pattern = np.random.default_rng(2).standard_normal(24)
    pattern -= pattern.mean()
    y = 7.0 + pattern[t % 24]
    comp, deseason = mstl_components(L, (24, 168))
    np.testing.assert_allclose(comp[24] @ y[:L], pattern[t[:L] % 24], atol=1e-9)
    np.testing.assert_allclose(comp[168] @ y[:L], 0.0, atol=1e-9)
    np.testing.assert_allclose(deseason @ y[:L], 7.0, atol=1e-9)
    W = mstl_matrix(L, h, (24, 168))
    np.testing.assert_allclose(y[:L] @ W, y[L:], atol=1e-9)
    np.testing.assert_allclose(np.full(L, 3.0) @ W, np.full(h, 3.0), atol=1e-12)
    # fewer than two whole cycles of the longest season: no candidate
    assert mstl_matrix(300, h, (24, 168)) is None
    assert "mstl" not in start_candidates(300, h, (168,))


def test_mstl_matrix_is_statsforecasts_mstl_with_a_fixed_level():
    """Oracle: statsforecast's MSTL (statsmodels' STL inside) with simple exponential smoothing
    (alpha 0.2) as its trend forecaster gives the same forecast as the linear map, on a random
    walk plus two seasons; the map uses only the last MSTL_MAX_STEPS-bounded whole cycles."""
    sf = pytest.importorskip("statsforecast.models")
    rng = np.random.default_rng(3)
    L, h = 2 * 168 + 5, 30  # 5 steps past the whole cycles: left out of the decomposition
    t = np.arange(L)
    y = rng.standard_normal(L).cumsum() + 3 * np.sin(2 * np.pi * t / 24) + (t // 24 % 7 > 4)
    model = sf.MSTL(season_length=[24, 168], trend_forecaster=sf.SimpleExponentialSmoothing(0.2))
    want = model.fit(y[5:]).predict(h)["mean"]
    W = mstl_matrix(L, h, (24, 168))
    np.testing.assert_allclose(y @ W, want, atol=1e-9)
    assert np.all(W[:5] == 0)
    np.testing.assert_allclose(start_candidates(L, h, (24, 168))["mstl"], W)
    one = sf.MSTL(season_length=24, trend_forecaster=sf.SimpleExponentialSmoothing(0.5))
    want = one.fit(y[-96:]).predict(h)["mean"]
    np.testing.assert_allclose(
        y[-96:] @ mstl_matrix(96, h, (24,), level_alpha=0.5), want, atol=1e-9
    )


def test_combined_start_is_the_mean_of_its_parts():
    c = start_candidates(96, 12, (24,))
    np.testing.assert_allclose(combined_start(c, "naive+profile"), (c["naive"] + c["profile"]) / 2)
    np.testing.assert_array_equal(combined_start(c, "mean"), c["mean"])
    with pytest.raises(ValueError, match="unknown start 'naive\\+bogus'"):
        combined_start(c, "naive+bogus")


def test_the_mean_of_the_best_two_starts_is_chosen_when_it_scores_best():
    """Oracle: targets that are the average of the last-value and the look-back-mean forecasts
    (and a worse third candidate): the combination of the two is exact and kept as it is."""
    L, h, N = 24, 6, 400
    rng = np.random.default_rng(5)
    X = rng.standard_normal((N, L))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    c = start_candidates(L, h, (6,))
    priors = {k: c[k] for k in ("naive", "mean", "seasonal_naive_6")}
    Y = X @ (priors["naive"] + priors["mean"]) / 2 + 0.05 * rng.standard_normal((N, h))
    m = _choose(X, Y, priors)
    assert set(m.skip_start_.split("+")) == {"naive", "mean"} and m.skip_alpha_ == float("inf")
    with torch.no_grad():
        want = (c["naive"] + c["mean"]) / 2
        np.testing.assert_allclose(m.skip.weight.double().numpy().T, want, atol=1e-6)
    # one exact candidate: it alone is kept, the combination with the next is worse
    m = _choose(X, X @ priors["seasonal_naive_6"] + 0.05 * rng.standard_normal((N, h)), priors)
    assert m.skip_start_ == "seasonal_naive_6"


def test_smooth_profile_limits():
    L, h, p = 96, 30, 24
    x = np.random.default_rng(2).standard_normal(L)
    # no decay and no smoothing setting: the plain profile
    np.testing.assert_allclose(
        seasonal_profile_matrix(L, h, (p,), cycle_decay=1.0), seasonal_profile_matrix(L, h, (p,))
    )
    # alpha 1: the level is the last deseasonalized value, so with a decay towards 0 (only the
    # last cycle counts) the forecast repeats the last cycle: the seasonal naive forecast
    W = seasonal_profile_matrix(L, h, (p,), cycle_decay=1e-12, level_alpha=1.0)
    np.testing.assert_allclose(x @ W, x[L - p + np.arange(h) % p], atol=1e-9)


@pytest.mark.parametrize("kw", [{"cycle_decay": 0.0}, {"cycle_decay": 1.5}, {"level_alpha": 0.0}])
def test_smooth_profile_bad_settings_are_named(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        seasonal_profile_matrix(96, 24, (24,), **kw)


def test_ridge_path_matches_the_normal_equations():
    """The intercept is penalized like the map: float64 normal equations of [X, 1] towards [W0; 0]."""
    rng = np.random.default_rng(1)
    N, L, h = 200, 12, 5
    X, Y, W0 = rng.standard_normal((N, L)), rng.standard_normal((N, h)), rng.standard_normal((L, h))
    path = _RidgePath(torch.from_numpy(X), torch.from_numpy(Y))
    X1, V0 = np.hstack([X, np.ones((N, 1))]), np.vstack([W0, np.zeros((1, h))])
    for alpha in (1e-3, 0.1, 10.0):
        W, b = path.fit(torch.from_numpy(W0), alpha)
        want = V0 + np.linalg.solve(X1.T @ X1 + alpha * N * np.eye(L + 1), X1.T @ (Y - X1 @ V0))
        np.testing.assert_allclose(W.numpy(), want[:-1], atol=1e-9)
        np.testing.assert_allclose(b.numpy(), want[-1], atol=1e-9)
    W, b = path.fit(torch.from_numpy(W0), float("inf"))
    np.testing.assert_allclose(W.numpy(), W0), np.testing.assert_allclose(b.numpy(), 0.0)


def test_large_penalties_converge_to_the_start():
    """With the data far from the start (an offset the intercept could take), the fit still
    approaches the start as the penalty grows: the gap shrinks like 1 / alpha."""
    rng = np.random.default_rng(3)
    N, L, h = 300, 16, 4
    X = rng.standard_normal((N, L))
    W0 = torch.from_numpy(start_candidates(L, h, (4,))["profile"])
    Y = X @ rng.standard_normal((L, h)) + 5.0
    path = _RidgePath(torch.from_numpy(X), torch.from_numpy(Y))
    gaps = []
    for alpha in (1e2, 1e4, 1e6):
        W, b = path.fit(W0, alpha)
        gaps.append(max(float((W - W0).abs().max()), float(b.abs().max())))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    assert gaps[1] / gaps[2] > 50  # O(1 / alpha)


def test_rolling_folds_are_purged_and_in_time_order():
    n, h = 80, 5
    times = torch.arange(n) + 100
    folds = _rolling_folds(n, times, h)
    assert len(folds) == 3
    for k, (fit, held) in enumerate(folds):
        lo = n - (3 - k) * (n // 8)
        assert held.nonzero().flatten().tolist() == list(range(lo, lo + n // 8))
        # every fitted window's target ends before the block's first cut point
        assert int(times[fit].max()) + h <= int(times[held].min())
        assert int(fit.sum()) == lo - h + 1


def _choose(X: np.ndarray, Y: np.ndarray, priors: dict) -> PatchForecastModel:
    """init_skip_ridge on look-backs X (rows already zero-mean, unit-std, so instance
    normalization leaves them alone) and normalized targets Y."""
    L, h = X.shape[1], Y.shape[1]
    m = PatchForecastModel(ForecastModelConfig(input_size=L, h=h))
    Xt = torch.from_numpy(X)[:, None]
    std = torch.sqrt(Xt.var(-1, unbiased=False, keepdim=True) + 1e-5)  # RevIN's epsilon
    m.init_skip_ridge(
        Xt, torch.from_numpy(Y)[:, None] * std, 0.1, priors, times=torch.arange(len(X))
    )
    return m


def test_an_exact_start_is_kept_and_a_wrong_one_is_refit():
    """Oracles: targets that are the start's own forecast (plus noise) keep the start itself
    (alpha = inf, the simpler model within the margin); targets from another map, with a
    start far from it, pick a weak penalty that beats the start by more than the margin."""
    L, h, N = 24, 6, 400
    rng = np.random.default_rng(0)
    W0 = start_candidates(L, h, (6,))["seasonal_naive_6"]
    X = rng.standard_normal((N, L))
    X = (X - X.mean(1, keepdims=True)) / X.std(1, keepdims=True)
    Y = X @ W0 + 0.05 * rng.standard_normal((N, h))
    m = _choose(X, Y, {"seasonal_naive_6": W0})
    assert m.skip_alpha_ == float("inf") and m.skip_start_ == "seasonal_naive_6"
    with torch.no_grad():
        np.testing.assert_allclose(m.skip.weight.double().numpy().T, W0, atol=1e-6)
        assert float(m.skip.bias.abs().max()) == 0.0

    W_true = rng.standard_normal((L, h)) / np.sqrt(L)
    Y = X @ W_true + 0.05 * rng.standard_normal((N, h))
    m = _choose(X, Y, {"seasonal_naive_6": W0})
    assert m.skip_alpha_ <= 1.0
    errors = {a: e for (k, a), e in m.skip_errors_.items() if k == "seasonal_naive_6"}
    assert errors[m.skip_alpha_] < (1 - SIMPLER_MARGIN) * errors[float("inf")]


def test_default_input_size_takes_whole_cycles_the_data_allows():
    # 5 weeks of half-hours, h = 48: 4 weeks would leave one week, 3 leave two
    assert default_input_size(1680, 48, (48, 336)) == 3 * 336
    assert default_input_size(8 * 336, 48, (48, 336)) == 4 * 336
    assert default_input_size(1176, 24, (24,)) == 168  # hourly, 7 weeks: 7 days
    assert default_input_size(300, 24, (24,)) == 96  # 7 days would leave less than 8h
    # 5-minute data with a weekly season: 2 weeks, within the ridge solve's limit of 4,096 steps
    assert default_input_size(8 * 2016, 288, (288, 2016)) == 2 * 2016
    assert default_input_size(700, 48, (48, 336)) == 350  # not 2 weeks: half the steps
    assert default_input_size(4000, 48, ()) == 512
    assert default_input_size(600, 48, ()) == 300
    with pytest.raises(ValueError, match="n_steps"):
        default_input_size(0, 48, ())


def test_random_walk_starts_from_the_last_value():
    y = 100 + np.cumsum(np.random.default_rng(2).standard_normal(1500))
    fc = Forecaster(h=12, input_size=96, max_steps=1, verbose=False, **SMALL).fit(frame(y))
    assert fc.seasons_ == () and fc.start_ == "naive"
    assert fc.val_size_ == 84  # "auto": 7h, the series holds input_size + 16h
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
    exact = {"seasonal_naive_24", "profile", "profile_recent", "profile_smooth", "profile_fast"}
    assert set(fc.start_.split("+")) <= exact | {"profile_trend"}
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
    assert fc.fit(frame(y)).val_size_ == 84  # 400 >= 96 + 16 * 12
    assert fc.fit(frame(y[:250])).val_size_ == 36  # 96 + 8 * 12 <= 250 < 96 + 16 * 12
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


@pytest.mark.parametrize(
    "after, kept", [(0.99, "start"), (1 - SIMPLER_MARGIN + 0.001, "start"), (0.9, "trained")]
)
def test_training_must_beat_the_start_by_the_margin(monkeypatch, after, kept):
    """Oracle validation losses (start 1.0, trained ``after``): a network within the margin of
    its start is not kept; the simpler start wins."""
    losses = iter([1.0, after])
    monkeypatch.setattr(Forecaster, "_val_loss", lambda self, val, device: next(losses))
    monkeypatch.setattr(Forecaster, "_train", lambda self, *a, **k: [])
    fc = Forecaster(h=12, input_size=48, verbose=False, **SMALL).fit(frame(seasonal(400)))
    assert fc.selected_ == [kept]


def test_selection_windows_split_the_held_out_part_without_overlap():
    """The checkpoint is chosen on the first half of the held-out part (targets ending before
    the second half), the start-versus-network choice on the second half."""
    from seqtensor.adapters.forecast.windows import WindowData, WindowDataset, val_cuts

    T, L, h, val_size = 400, 48, 12, 84
    y = [np.ones((1, T)), np.ones((1, T - 30))]
    data = WindowData(
        y,
        [np.zeros((0, T)), np.zeros((0, T - 30))],
        [np.zeros((0, T)), np.zeros((0, T - 30))],
        np.zeros((2, 0)),
        L,
        h,
    )
    val = WindowDataset(data, *val_cuts(y, L, h, val_size))
    fc = Forecaster(h=h, input_size=L, verbose=False, **SMALL)
    stop, choose = fc._selection_windows(val, [T, T - 30], val_size)
    for g, length in enumerate([T, T - 30]):
        s, c = stop.t[stop.g == g], choose.t[choose.g == g]
        assert (s + h <= length - 42).all() and (c >= length - 42).all()
        assert len(s) == 42 - h + 1 and len(c) == 42 - h + 1
    assert fc._selection_windows(val, [T, T - 30], 2 * h - 1) == (val, val)  # too short to split


def test_trended_two_season_series_is_forecast_from_the_trend_start():
    """The Forecaster (input_size=None) on a noiseless trend + two given seasons: the start
    that fits trend and phases jointly is exact, is chosen, and is kept over training."""
    T, h = 1500, 24
    t = np.arange(T + h)
    y = 50 + 0.02 * t + 3 * np.sin(2 * np.pi * t / 24) + np.sin(2 * np.pi * t / 168)
    fc = Forecaster(h=h, seasonality=(24, 168), max_steps=2, verbose=False, **SMALL)
    fc.fit(frame(y[:T]))
    assert fc.seasons_ == (24, 168) and fc.input_size_ == 7 * 168
    assert fc.start_ == "profile_trend" and fc.selected_ == ["start"]
    np.testing.assert_allclose(fc.predict()["Forecaster"].to_numpy(), y[T:], atol=1e-3)


def test_a_zero_readout_skips_the_encoder_without_changing_the_forecast(monkeypatch):
    """A kept start has a zero readout: without gradients the forecast is the linear skip alone
    (oracle: the same model with the encoder run), and the encoder is not called; with a
    nonzero readout, or with gradients on, it runs."""
    L, h = 48, 12
    torch.manual_seed(0)
    m = PatchForecastModel(ForecastModelConfig(input_size=L, h=h, patch_len=8)).eval()
    batch = {
        "y": torch.randn(5, 1, L),
        "futr": torch.zeros(5, 0, L + h),
        "hist": torch.zeros(5, 0, L),
        "static": torch.zeros(5, 0),
    }
    with torch.no_grad():
        z, mean, std, obs = m._revin(batch["y"])
        encoded = m._encode(batch, z, obs)
        want = (encoded + m.skip(z)[..., None]) * std[..., None] + mean[..., None]
        calls = []
        encode = m._encode
        monkeypatch.setattr(m, "_encode", lambda *a: calls.append(1) or encode(*a))
        torch.testing.assert_close(m(batch), want)
        assert calls == []
        m.head.bias.fill_(0.1)  # a readout that adds 0.1 before the scale is undone
        torch.testing.assert_close(m(batch), want + 0.1 * std[..., None])
        assert calls == [1]
    m.head.bias.data.zero_()
    m(batch)  # gradients on: the encoder runs, so its weights get gradients
    assert calls == [1, 1]
