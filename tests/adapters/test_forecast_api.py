"""Forecaster API: backtests that leave the model alone, Nixtla-compatible outputs,
future-frame helpers, frequency inference, progress, warnings, warm starts and bad values."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

import seqtensor.adapters.forecast.forecaster as forecaster_module
from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.panel import build_panel, infer_freq

TINY = dict(
    patch_len=8,
    d_model=16,
    n_layers=1,
    n_heads=2,
    max_steps=4,
    batch_size=16,
    random_state=0,
    device="cpu",
    verbose=False,
)


def frame(n=200, ids=("a", "b"), freq="h", start="2021-01-01", noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    t = pd.date_range(start, periods=n, freq=freq)
    parts = [
        pd.DataFrame(
            {
                "unique_id": sid,
                "ds": t,
                "y": 10
                + k
                + 3 * np.sin(2 * np.pi * np.arange(n) / 24)
                + noise * rng.normal(size=n),
            }
        )
        for k, sid in enumerate(ids)
    ]
    return pd.concat(parts, ignore_index=True)


def weights(fc):
    return {k: v.detach().clone() for k, v in fc.model_.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# 3. backtests leave the model alone
# ---------------------------------------------------------------------------------------------


def test_cross_validation_leaves_a_fitted_forecaster_unchanged():
    df = frame()
    fc = Forecaster(h=6, input_size=24, **TINY).fit(df)
    before, w = fc.predict(), weights(fc)
    cv = fc.cross_validation(df, n_windows=2, refit=True)
    after = fc.predict()
    pd.testing.assert_frame_equal(before, after)
    assert all(torch.equal(w[k], v) for k, v in fc.model_.state_dict().items())
    # it still forecasts from the end of the fitted data, not from a backtest's cutoff
    assert after["ds"].min() == df["ds"].max() + pd.Timedelta("1h")
    assert cv["cutoff"].max() < df["ds"].max()


def test_outputs_keep_the_callers_column_names():
    df = frame().rename(columns={"unique_id": "store", "ds": "when", "y": "sales"})
    cols = dict(id_col="store", time_col="when", target_col="sales")
    fc = Forecaster(h=6, input_size=24, **TINY)
    cv = fc.cross_validation(df, n_windows=2, **cols)
    assert list(cv.columns) == ["store", "when", "cutoff", "sales", "Forecaster"]
    last = df[df["when"] > cv["cutoff"].max()]
    np.testing.assert_allclose(
        cv[cv["cutoff"] == cv["cutoff"].max()]["sales"],
        last.sort_values(["store", "when"])["sales"],
    )
    out = fc.fit(df, **cols).predict()
    assert list(out.columns) == ["store", "when", "Forecaster"]


def test_refit_must_be_a_bool_or_positive_int():
    fc = Forecaster(h=6, input_size=24, **TINY)
    for bad in (0, -1, 1.5, "yes"):
        with pytest.raises(ValueError, match="refit must be a bool or a positive int"):
            fc.cross_validation(frame(), n_windows=2, refit=bad)


# ---------------------------------------------------------------------------------------------
# 4. Nixtla-compatible outputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interval_model():
    df = frame(n=240)
    fc = Forecaster(h=6, input_size=24, loss="quantile", level=[80, 95], **TINY).fit(df)
    return fc, df


def test_level_columns_use_nixtla_names(interval_model):
    fc, _ = interval_model
    out = fc.predict()
    names = ["lo-95", "lo-80", "hi-80", "hi-95"]
    assert list(out.columns) == ["unique_id", "ds", "Forecaster"] + [
        f"Forecaster-{n}" for n in names
    ]
    # the interval columns are the trained quantiles 1/2 -+ level/200
    q = fc.predict(quantiles=[0.025, 0.1, 0.5, 0.9, 0.975])
    assert "Forecaster-q0.5" not in q.columns  # the median is the point column
    for side, lv, qq in [("lo", 95, 0.025), ("lo", 80, 0.1), ("hi", 80, 0.9), ("hi", 95, 0.975)]:
        np.testing.assert_array_equal(out[f"Forecaster-{side}-{lv}"], q[f"Forecaster-q{qq:g}"])
    assert fc._quantile_levels() == (0.025, 0.1, 0.5, 0.9, 0.975)


def test_level_needs_quantile_loss_and_valid_values():
    with pytest.raises(ValueError, match="level .* needs loss='quantile'"):
        Forecaster(h=6, input_size=24, level=[80], **TINY).fit(frame())
    with pytest.raises(ValueError, match=r"levels must lie in \(0, 100\)"):
        Forecaster(h=6, input_size=24, loss="quantile", level=[120], **TINY).fit(frame())


def test_forecast_and_backtest_frames_go_into_utilsforecast(interval_model, tmp_path):
    pytest.importorskip("utilsforecast")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from utilsforecast.evaluation import evaluate
    from utilsforecast.losses import coverage, mae
    from utilsforecast.plotting import plot_series

    fc, df = interval_model
    cv = fc.cross_validation(df, n_windows=2)
    scores = evaluate(cv, metrics=[mae, coverage], level=[80, 95])
    assert len(scores) == 2 * 2 * 3  # series x cutoffs x (mae, coverage 80, coverage 95)
    for (sid, cutoff), w in cv.groupby(["unique_id", "cutoff"]):  # independent: by hand
        row = scores[(scores.unique_id == sid) & (scores.cutoff == cutoff)].set_index("metric")
        np.testing.assert_allclose(
            row.loc["mae", "Forecaster"], (w["y"] - w["Forecaster"]).abs().mean()
        )
        inside = (w["y"] >= w["Forecaster-lo-80"]) & (w["y"] <= w["Forecaster-hi-80"])
        np.testing.assert_allclose(row.loc["coverage_level80", "Forecaster"], inside.mean())
    fig = plot_series(df, fc.predict(), level=[80, 95], max_insample_length=48)
    fig.savefig(tmp_path / "series.png")
    assert (tmp_path / "series.png").stat().st_size > 0
    assert fc.plot(df, fc.predict(), history=48) is not None  # the estimator's own plot reads them


def test_make_future_dataframe_and_get_missing_future():
    df = frame(n=200)
    df["hour"] = df["ds"].dt.hour.astype(float)
    fc = Forecaster(h=6, input_size=24, **TINY).fit(df, futr_exog=["hour"])
    future = fc.make_future_dataframe()
    assert list(future.columns) == ["unique_id", "ds"]
    assert len(future) == 12
    for sid, g in future.groupby("unique_id"):
        last = df.loc[df.unique_id == sid, "ds"].max()
        assert list(g["ds"]) == list(pd.date_range(last, periods=7, freq="h")[1:])
    futr = future.assign(hour=future["ds"].dt.hour.astype(float))
    assert fc.get_missing_future(futr).empty
    fc.predict(futr_df=futr)  # complete: predict runs
    holes = futr.drop(index=3).copy()
    holes.loc[7, "hour"] = np.inf
    missing = fc.get_missing_future(holes)
    pd.testing.assert_frame_equal(missing, future.loc[[3, 7]].reset_index(drop=True))
    assert len(fc.make_future_dataframe(h=9)) == 18
    with pytest.raises(ValueError, match="infinite"):
        fc.predict(futr_df=futr.assign(hour=np.where(futr.index == 2, np.inf, futr["hour"])))


# ---------------------------------------------------------------------------------------------
# 5. frequency
# ---------------------------------------------------------------------------------------------


def test_business_days_with_holidays_are_inferred_as_business_days():
    days = pd.bdate_range("2021-01-04", periods=120)
    kept = days.delete([10, 40, 41, 77])  # holidays: absent weekdays
    df = pd.DataFrame({"unique_id": "s", "ds": kept, "y": np.arange(len(kept), dtype=float)})
    panel = build_panel(df)
    assert panel.freq == pd.offsets.BDay()
    assert panel.report["inserted_steps"].tolist() == [4]
    with pytest.warns(UserWarning, match="4 missing target values") as record:
        fc = Forecaster(h=5, input_size=20, **TINY).fit(df)
    assert not any("more than 10%" in str(w.message) for w in record)  # 4 of 120: no alarm
    assert fc.freq_ == pd.offsets.BDay()
    assert (fc.predict()["ds"].dt.day_of_week < 5).all()  # no forecast lands on a weekend


def test_calendar_aliases_given_as_freq():
    days = pd.bdate_range("2021-01-04", periods=60)
    df = pd.DataFrame({"unique_id": "s", "ds": days, "y": np.sin(np.arange(60.0))})
    fc = Forecaster(h=5, input_size=20, **TINY).fit(df, freq="C")
    stamps = fc.predict()["ds"]
    assert list(stamps) == list(pd.bdate_range(days[-1], periods=6)[1:])
    monthly = pd.DataFrame(
        {"unique_id": "m", "ds": pd.date_range("2000-01-01", periods=60, freq="MS"), "y": 1.0}
    )
    assert infer_freq([monthly["ds"]]) == pd.offsets.MonthBegin()


def test_a_tie_between_frequencies_raises_naming_them():
    # Monday..Friday only: a daily and a business-day grid both hold every stamp in 5 steps
    df = pd.DataFrame({"unique_id": "s", "ds": pd.date_range("2021-01-04", periods=5), "y": 1.0})
    with pytest.raises(ValueError, match=r"ambiguous: \['B', 'D'\]"):
        build_panel(df)
    # another series that has a weekend settles it
    other = pd.DataFrame({"unique_id": "t", "ds": pd.date_range("2021-01-01", periods=9), "y": 1.0})
    assert build_panel(pd.concat([df, other])).freq == pd.offsets.Day()


def test_a_stray_close_pair_of_stamps_does_not_make_a_second_grid():
    t = pd.date_range("2000-01-01", periods=5000, freq="h")
    t = t.append(pd.DatetimeIndex([t[-1] + pd.Timedelta("1s"), t[-1] + pd.Timedelta("2s")]))
    df = pd.DataFrame({"unique_id": "s", "ds": t, "y": 1.0})
    # a one-second grid over 5,000 hours would hold 18 million steps; the hourly one is named
    with pytest.raises(ValueError, match="is not on the 'h' grid"):
        build_panel(df)


def test_series_of_different_frequencies_raise():
    hourly = frame(n=100, ids=("a",))
    daily = frame(n=30, ids=("b",), freq="D")
    with pytest.raises(ValueError, match=r"different frequencies: 'D' \(series #1\), 'h'"):
        Forecaster(h=6, input_size=24, **TINY).fit(pd.concat([hourly, daily]))


_HASH_SCRIPT = """
import numpy as np, pandas as pd
from seqtensor.adapters.forecast.panel import build_panel
t = pd.date_range("2021-01-01", periods=400, freq="h")
keep = np.ones(400, bool); keep[np.arange(3, 400, 7)] = False; keep[np.arange(5, 400, 11)] = False
df = pd.DataFrame({"unique_id": "s", "ds": t[keep], "y": 1.0})
print(build_panel(df).freq.freqstr)
"""


def test_inference_does_not_depend_on_the_hash_seed():
    out = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", _HASH_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        out.add(run.stdout.strip())
    assert out == {"h"}


def test_inferred_frequency_is_reported_and_sparse_grids_warn(capsys):
    df = frame(n=200, ids=("a",))
    rng = np.random.default_rng(0)
    sparse = df.drop(index=rng.choice(np.arange(1, 199), 40, replace=False))  # 20% of the grid
    fc = Forecaster(h=6, input_size=24, **{**TINY, "verbose": True})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fc.fit(sparse)
    messages = [str(w.message) for w in record]
    assert sum("more than 10% of the grid steps" in m for m in messages) == 1, messages
    assert sum("40 missing target values" in m for m in messages) == 1, messages
    assert fc.freq_ == pd.offsets.Hour()
    assert "frequency 'h' inferred from 'ds'" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete grid gives no warning at all
        Forecaster(h=6, input_size=24, **TINY).fit(df)
    assert capsys.readouterr().err == ""  # verbose=False: silent


# ---------------------------------------------------------------------------------------------
# 6. progress and warnings
# ---------------------------------------------------------------------------------------------


class _RecordingBar:
    """Stands in for tqdm: records totals, updates and what the bar said, and what it was told."""

    made: list[_RecordingBar] = []

    def __init__(self, *args, disable=False, delay=0.0, **kwargs):
        self.disable, self.delay, self.total, self.n, self.notes = disable, delay, 0, 0, []
        _RecordingBar.made.append(self)

    def reset(self, total=None):
        self.total, self.n = total, 0

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text, refresh=True):
        self.notes.append((self.n, text))

    def set_postfix(self, refresh=True, **kw):
        self.notes.append((self.n, "loss"))

    def close(self):
        pass

    write = staticmethod(lambda *a, **k: None)


def test_progress_bar_covers_setup_and_training(monkeypatch):
    monkeypatch.setattr(forecaster_module, "tqdm", _RecordingBar)
    _RecordingBar.made.clear()
    fc = Forecaster(h=6, input_size=24, n_models=2, **{**TINY, "verbose": True})
    fc.fit(frame())
    bar = _RecordingBar.made[0]
    assert not bar.disable and bar.delay == 2.0  # shown once a fit has run 2 seconds
    assert bar.total == 1 + 1 + 2 * (1 + 4) == bar.n  # panel, windows, per network: ridge + steps
    # the setup stages are named where they happen: windows after the panel, a ridge init
    # before each network's 4 training steps
    assert [n for n, t in bar.notes if t == "windows ready"] == [1]
    assert [n for n, t in bar.notes if t == "ridge init"] == [2, 2 + 1 + 4]
    _RecordingBar.made.clear()
    Forecaster(h=6, input_size=24, **TINY).fit(frame())
    assert _RecordingBar.made[0].disable  # verbose=False


def test_each_warning_once_per_call():
    df = frame(n=200, ids=("a", "b"))
    df.loc[[5, 50, 250], "y"] = np.nan
    fc = Forecaster(h=6, input_size=24, **TINY)
    for call in (
        lambda: fc.fit(df),
        lambda: fc.cross_validation(df, n_windows=3, refit=True),
        lambda: fc.predict(df=df),
    ):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            call()
        messages = [str(w.message) for w in record]
        assert sum("missing target values" in m for m in messages) == 1, messages
        assert len(messages) == len(set(messages)), messages


# ---------------------------------------------------------------------------------------------
# 7. warm start
# ---------------------------------------------------------------------------------------------


def test_warm_start_continues_training_a_fitted_or_loaded_model(tmp_path):
    df = frame(n=300)
    first, later = df[df["ds"] < "2021-01-10"], df
    # val_size=0: no closed-form start kept on held-out steps, so a cold refit moves the weights
    fc = Forecaster(h=6, input_size=24, **TINY, val_size=0).fit(first)
    w = weights(fc)
    # a near-zero learning rate: the weights stay where the first fit left them (no rebuild,
    # no ridge re-initialization), and the forecast starts from the end of the new data
    fc.set_params(warm_start=True, learning_rate=1e-12).fit(later)
    for k, v in fc.model_.state_dict().items():
        torch.testing.assert_close(v, w[k], atol=1e-6, rtol=0)
    assert fc.predict()["ds"].min() == later["ds"].max() + pd.Timedelta("1h")
    cold = clone(fc).set_params(warm_start=False).fit(later)
    assert any(not torch.allclose(v, w[k]) for k, v in cold.model_.state_dict().items())
    # a loaded model trains on: its weights move from the saved ones
    fc.set_params(learning_rate=1e-2).save(tmp_path / "m")
    loaded = Forecaster.load(tmp_path / "m")
    assert loaded.warm_start
    loaded.fit(later)
    assert any(not torch.allclose(v, w[k]) for k, v in loaded.model_.state_dict().items())
    with pytest.raises(ValueError, match="warm_start continues a model fit with futr_exog"):
        loaded.fit(later.assign(x=1.0), futr_exog=["x"])


def test_numpy_integers_work_end_to_end(tmp_path):
    i = np.int64
    fc = Forecaster(h=i(6), input_size=i(24), patch_len=i(8), d_model=i(16), n_layers=i(1),
                    n_heads=i(2), max_steps=i(3), batch_size=i(16), random_state=0, device="cpu",
                    verbose=False)  # fmt: skip
    out = fc.fit(frame()).predict(h=i(4))
    assert len(out) == 8
    fc.save(tmp_path / "m")
    pd.testing.assert_frame_equal(Forecaster.load(tmp_path / "m").predict(h=4), out)


# ---------------------------------------------------------------------------------------------
# 9. bad values
# ---------------------------------------------------------------------------------------------


def test_inf_in_exogenous_columns_raises():
    df = frame()
    df["x"] = 1.0
    df.loc[7, "x"] = -np.inf
    with pytest.raises(ValueError, match="column 'x' has 1 infinite values"):
        Forecaster(h=6, input_size=24, **TINY).fit(df, hist_exog=["x"])


@pytest.mark.parametrize("scale", [1e39, 1e200])
def test_targets_beyond_float32_raise(scale):
    df = frame()
    df["y"] *= scale
    with pytest.raises(ValueError, match="beyond float32"):
        Forecaster(h=6, input_size=24, **TINY).fit(df)


def test_large_but_representable_targets_forecast_finite_values():
    df = frame()
    df["y"] *= 1e30
    out = Forecaster(h=6, input_size=24, **TINY).fit(df).predict()
    assert np.isfinite(out["Forecaster"]).all()
