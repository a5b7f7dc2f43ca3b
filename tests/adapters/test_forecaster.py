"""Forecaster: learning, the DataFrame verbs, persistence, sklearn conventions and every bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.model import ForecastModelConfig, PatchForecastModel, forecast_loss
from seqtensor.core.folds import BlockFold, resolve_fold
from seqtensor.nn import FullAttention, ModelConfig, TensorizedAttention

TINY = dict(
    patch_len=8,
    d_model=16,
    n_layers=1,
    n_heads=2,
    max_steps=8,
    batch_size=16,
    random_state=0,
    device="cpu",
)


def seasonal_frame(
    n=400, ids=("a", "b"), freq="h", start="2021-01-01", period=24, noise=0.0, seed=0
):
    rng = np.random.default_rng(seed)
    t = pd.date_range(start, periods=n, freq=freq)
    parts = []
    for k, sid in enumerate(ids):
        y = (
            10
            + k
            + 3 * np.sin(2 * np.pi * np.arange(n) / period + k)
            + noise * rng.standard_normal(n)
        )
        parts.append(pd.DataFrame({"unique_id": sid, "ds": t, "y": y}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def fitted():
    df = seasonal_frame()
    return Forecaster(h=12, input_size=48, **TINY).fit(df), df


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["tensorized", "full"])
def test_learns_noiseless_seasonal_series(attention):
    n = 600
    t = np.arange(n)
    y = 10 + 3 * np.sin(2 * np.pi * t / 24) + np.sin(2 * np.pi * t / 7)
    df = pd.DataFrame(
        {"unique_id": "s", "ds": pd.date_range("2021-01-01", periods=n, freq="h"), "y": y}
    )
    fc = Forecaster(
        h=12,
        input_size=96,
        patch_len=8,
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_steps=100,
        learning_rate=3e-3,
        random_state=0,
        attention=attention,
        device="cpu",
    )
    cv = fc.cross_validation(df, n_windows=4, step_size=12)
    mae = float(np.abs(cv["y"] - cv["Forecaster"]).mean())
    assert mae < 0.1, mae  # amplitude 4; seasonal naive at 24 would err by up to ~1.5
    fc.set_params(max_steps=1).fit(df)
    kind = TensorizedAttention if attention == "tensorized" else FullAttention
    assert isinstance(fc.model_.encoder.blocks[0].attn, kind)


def test_validation_early_stopping_and_best_restore():
    df = seasonal_frame(n=300, ids=("a",))
    fc = Forecaster(
        h=12,
        input_size=48,
        **{**TINY, "max_steps": 20},
        val_size=24,
        val_check_steps=4,
        early_stopping=2,
    )
    fc.fit(df)
    vals = [r["val_loss"] for r in fc.history_ if "val_loss" in r]
    assert len(vals) >= 2


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def test_predict_frame_and_timestamps(fitted):
    fc, df = fitted
    out = fc.predict()
    assert list(out.columns) == ["unique_id", "ds", "Forecaster"]
    assert len(out) == 2 * 12
    for sid, g in out.groupby("unique_id"):
        last = df.loc[df.unique_id == sid, "ds"].max()
        expected = pd.date_range(last + pd.Timedelta(hours=1), periods=12, freq="h")
        assert (g["ds"].to_numpy() == expected.to_numpy()).all()
    assert np.isfinite(out["Forecaster"]).all()


@pytest.mark.parametrize(
    "freq, start, step",
    [
        ("D", "2020-01-01", pd.Timedelta(days=1)),
        ("MS", "2000-01-01", pd.DateOffset(months=1)),
        ("15min", "2020-03-01", pd.Timedelta(minutes=15)),
    ],
)
def test_predict_continues_at_inferred_frequency(freq, start, step):
    df = seasonal_frame(n=120, ids=("x",), freq=freq, start=start, period=12)
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 2}).fit(df)
    out = fc.predict()
    last = df["ds"].iloc[-1]
    assert list(out["ds"]) == [last + (i + 1) * step for i in range(6)]


def test_calendar_frequency_with_missing_steps_is_inferred():
    """Month starts with gaps (31-day steps are the most common difference, yet not a grid): the
    calendar step is still found and the missing months are inserted."""
    df = seasonal_frame(n=60, ids=("x", "y"), freq="MS", start="2000-01-01", period=12).drop(
        index=[10, 11, 75]
    )
    fc = Forecaster(h=3, input_size=12, **{**TINY, "patch_len": 4, "max_steps": 1})
    with pytest.warns(UserWarning, match="missing"):
        fc.fit(df)
    assert fc.freq_ == pd.tseries.frequencies.to_offset("MS")
    assert list(fc.missing_report_["inserted_steps"]) == [2, 1]


def test_freq_of_the_wrong_kind_for_the_time_column_raises():
    df = seasonal_frame(n=60, ids=("x",))
    with pytest.raises(TypeError, match="freq=1 does not fit the datetime64"):
        Forecaster(h=3, input_size=12, **TINY).fit(df, freq=1)
    with pytest.raises(TypeError, match="freq='D' does not fit the int64"):
        Forecaster(h=3, input_size=12, **TINY).fit(df.assign(ds=np.arange(len(df))), freq="D")
    fc = Forecaster(h=3, input_size=12, **{**TINY, "max_steps": 1}).fit(df)
    with pytest.raises(
        TypeError, match="does not fit the int64"
    ):  # predict from a frame with other time steps
        fc.predict(df=df.assign(ds=np.arange(len(df))))
    with pytest.raises(ValueError, match="h must be a positive int"):
        fc.predict(h=True)
    with pytest.raises(ValueError, match="n_windows must be a positive int"):
        fc.cross_validation(df, n_windows=True)


def test_integer_time_steps():
    df = seasonal_frame(n=100, ids=("x",))
    df["ds"] = np.arange(10, 10 + 3 * len(df), 3)
    fc = Forecaster(h=5, input_size=24, **{**TINY, "max_steps": 2}).fit(df)
    assert list(fc.predict()["ds"]) == [int(df["ds"].iloc[-1]) + 3 * (i + 1) for i in range(5)]


def test_recursive_roll_out_beyond_horizon(fitted):
    fc, _ = fitted
    direct = fc.predict()
    long = fc.predict(h=30)
    assert len(long) == 2 * 30
    first = long.groupby("unique_id").head(12).reset_index(drop=True)
    np.testing.assert_allclose(first["Forecaster"], direct["Forecaster"], rtol=1e-5, atol=1e-5)
    for _, g in long.groupby("unique_id"):
        assert g["ds"].diff().dropna().eq(pd.Timedelta(hours=1)).all()


def test_predict_from_new_history_and_new_series(fitted):
    fc, df = fitted
    new = df[df.unique_id == "a"].assign(unique_id="z", y=lambda d: d["y"] * 2 + 5)
    out = fc.predict(df=new)
    assert set(out["unique_id"]) == {"z"}
    # a series seen in fit, given its full history again, forecasts as from the stored history
    again = fc.predict(df=df)
    np.testing.assert_allclose(
        again["Forecaster"], fc.predict()["Forecaster"], rtol=1e-5, atol=1e-5
    )


def test_wide_frame_is_accepted():
    long = seasonal_frame(n=200)
    wide = long.pivot(index="ds", columns="unique_id", values="y")
    a = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(long).predict()
    b = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(wide).predict()
    pd.testing.assert_frame_equal(a, b)


def test_renamed_columns():
    df = seasonal_frame(n=200).rename(columns={"unique_id": "store", "ds": "when", "y": "sales"})
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 2}).fit(
        df, id_col="store", time_col="when", target_col="sales"
    )
    out = fc.predict()
    assert list(out.columns) == ["store", "when", "Forecaster"]
    assert (
        len(
            fc.cross_validation(
                df, n_windows=2, id_col="store", time_col="when", target_col="sales"
            )
        )
        == 2 * 2 * 6
    )


def test_quantiles_columns_and_subset():
    df = seasonal_frame(n=200, noise=0.3)
    fc = Forecaster(
        h=6, input_size=24, loss="quantile", quantiles=(0.1, 0.9), **{**TINY, "max_steps": 20}
    ).fit(df)
    out = fc.predict()
    # the median is the point column itself, never repeated as "-q0.5"
    assert list(out.columns) == [
        "unique_id",
        "ds",
        "Forecaster",
        "Forecaster-q0.1",
        "Forecaster-q0.9",
    ]
    assert list(fc.predict(quantiles=[0.9]).columns)[-1] == "Forecaster-q0.9"
    # the trained 0.1 / 0.9 pair is the 80% interval, under Nixtla's column names
    lv = fc.predict(level=[80])
    assert list(lv.columns) == [
        "unique_id",
        "ds",
        "Forecaster",
        "Forecaster-lo-80",
        "Forecaster-hi-80",
    ]
    np.testing.assert_allclose(lv["Forecaster-lo-80"], out["Forecaster-q0.1"])
    np.testing.assert_allclose(lv["Forecaster-hi-80"], out["Forecaster-q0.9"])
    with pytest.raises(ValueError, match="level 95 needs the quantiles 0.025 and 0.975"):
        fc.predict(level=[95])
    with pytest.raises(ValueError, match="not trained"):
        fc.predict(quantiles=[0.25])


def test_quantiles_need_quantile_loss(fitted):
    fc, _ = fitted
    with pytest.raises(ValueError, match="loss='quantile'"):
        fc.predict(quantiles=[0.1])
    with pytest.raises(ValueError, match="quantiles are used only"):
        Forecaster(h=2, input_size=8, quantiles=(0.1,)).fit(seasonal_frame(n=50))


@pytest.mark.parametrize("loss", ["mse", "huber", "mae"])
def test_point_losses_train(loss):
    fc = Forecaster(h=6, input_size=24, loss=loss, **{**TINY, "max_steps": 3}).fit(
        seasonal_frame(n=100)
    )
    assert np.isfinite(fc.predict()["Forecaster"]).all()


# ---------------------------------------------------------------------------------------------
# exogenous, static, channel mixing
# ---------------------------------------------------------------------------------------------


def exog_frame(n=240):
    df = seasonal_frame(n=n)
    df["promo"] = (df["ds"].dt.hour % 6 == 0).astype(float)
    df["y"] = df["y"] + 2 * df["promo"]
    df["sensor"] = np.random.default_rng(1).standard_normal(len(df))
    return df


def future_frame(fc_df, h, ids=("a", "b")):
    last = fc_df["ds"].max()
    stamps = pd.date_range(last + pd.Timedelta(hours=1), periods=h, freq="h")
    parts = [
        pd.DataFrame({"unique_id": s, "ds": stamps, "promo": (stamps.hour % 6 == 0).astype(float)})
        for s in ids
    ]
    return pd.concat(parts, ignore_index=True)


def test_exogenous_and_static_features_round_trip(tmp_path):
    df = exog_frame()
    static = pd.DataFrame({"unique_id": ["a", "b"], "size": [1.0, 3.0]})
    # val_size=0: the trained network, not a closed-form start chosen on held-out steps, which
    # reads no exogenous input
    fc = Forecaster(h=8, input_size=32, **{**TINY, "max_steps": 5}, val_size=0)
    fc.fit(df, static, futr_exog=["promo"], hist_exog=["sensor"])
    assert (fc.model_config_.n_futr, fc.model_config_.n_hist, fc.model_config_.n_static) == (
        1,
        1,
        1,
    )
    futr = future_frame(df, 8)
    out = fc.predict(futr_df=futr)
    assert len(out) == 16
    # the known-future input reaches the forecast
    changed = fc.predict(futr_df=futr.assign(promo=1 - futr["promo"]))
    assert not np.allclose(out["Forecaster"], changed["Forecaster"])
    fc.save(tmp_path / "m")
    loaded = Forecaster.load(tmp_path / "m")
    pd.testing.assert_frame_equal(loaded.predict(futr_df=futr), out)


def test_futr_df_missing_rows_or_columns(tmp_path):
    df = exog_frame()
    fc = Forecaster(h=8, input_size=32, **{**TINY, "max_steps": 2}).fit(df, futr_exog=["promo"])
    futr = future_frame(df, 8)
    with pytest.raises(ValueError, match="needs futr_df"):
        fc.predict()
    with pytest.raises(ValueError, match=r"missing columns \['promo'\]"):
        fc.predict(futr_df=futr.drop(columns="promo"))
    with pytest.raises(ValueError, match="no row for series 'b'"):
        fc.predict(futr_df=futr[futr.unique_id == "a"])
    with pytest.raises(ValueError, match="no row for series 'a'"):
        fc.predict(futr_df=futr.iloc[1:])
    # extra rows (longer horizons, other series) are ignored
    extra = pd.concat([future_frame(df, 20), future_frame(df, 8, ids=("zz",))])
    pd.testing.assert_frame_equal(fc.predict(futr_df=extra), fc.predict(futr_df=futr))


def test_shorter_h_with_known_future_inputs_matches_the_full_forecast():
    """predict(h=k) with a futr_df covering the model's window equals the first k steps of predict();
    a futr_df of only k steps is used, with a warning that the rest of the window is unknown."""
    df = exog_frame()
    fc = Forecaster(h=8, input_size=32, **{**TINY, "max_steps": 3}).fit(df, futr_exog=["promo"])
    futr = future_frame(df, 8)
    full = fc.predict(futr_df=futr)
    part = fc.predict(h=3, futr_df=futr)
    pd.testing.assert_frame_equal(part, full.groupby("unique_id").head(3).reset_index(drop=True))
    with pytest.warns(UserWarning, match="not all 8 of the model's window"):
        assert len(fc.predict(h=3, futr_df=future_frame(df, 3))) == 6


def test_refit_does_not_reuse_old_static_features():
    """A refit reads static features only from its own static_df, as a fresh estimator does."""
    df = seasonal_frame(n=120)
    fc = Forecaster(h=4, input_size=16, **{**TINY, "max_steps": 1})
    fc.fit(df, pd.DataFrame({"unique_id": ["a", "b"], "size": [0.0, 1.0]}))
    with pytest.raises(ValueError, match=r"static features missing for series \['b'\]"):
        fc.fit(df, pd.DataFrame({"unique_id": ["a"], "size": [5.0]}))
    # predicting for a fitted series still falls back to the fitted table
    out = fc.predict(static_df=pd.DataFrame({"unique_id": ["a"], "size": [0.0]}))
    assert len(out) == 8


def test_channel_mixing():
    df = seasonal_frame(n=200, ids=("a", "b", "c"))
    fc = Forecaster(h=6, input_size=24, channel_mixing=True, **{**TINY, "max_steps": 3}).fit(df)
    assert fc.model_config_.n_channels == 3
    assert len(fc.predict()) == 18
    cv = fc.cross_validation(df, n_windows=2)
    assert len(cv) == 3 * 2 * 6
    ragged = df.iloc[:-1]
    with pytest.raises(ValueError, match="one time grid"):
        Forecaster(h=6, input_size=24, channel_mixing=True, **TINY).fit(ragged)


# ---------------------------------------------------------------------------------------------
# cross-validation
# ---------------------------------------------------------------------------------------------


def test_cross_validation_windows_and_cutoffs_match_direct_computation():
    df = seasonal_frame(n=300)
    fc = Forecaster(h=10, input_size=40, **{**TINY, "max_steps": 5})
    cv = fc.cross_validation(df, n_windows=3, step_size=7)
    assert list(cv.columns) == ["unique_id", "ds", "cutoff", "y", "Forecaster"]
    for sid, g in df.groupby("unique_id"):
        stamps = g["ds"].to_numpy()
        T = len(g)
        got = cv[cv.unique_id == sid]
        expected_cutoffs = [stamps[T - 10 - 7 * (2 - k) - 1] for k in range(3)]
        assert list(got["cutoff"].unique()) == list(expected_cutoffs)
        for k, cutoff in enumerate(expected_cutoffs):
            w = got[got.cutoff == cutoff]
            start = T - 10 - 7 * (2 - k)
            assert (w["ds"].to_numpy() == stamps[start : start + 10]).all()
            np.testing.assert_allclose(w["y"], g["y"].to_numpy()[start : start + 10])
    # refit=False: one model, fit before the first cutoff; each window = predict from its history
    ref = clone(fc).fit(df[df["ds"] <= cv["cutoff"].min()])
    for cutoff in cv["cutoff"].unique():
        hist = df[df["ds"] <= cutoff]
        direct = ref.predict(df=hist)
        np.testing.assert_allclose(
            cv.loc[cv.cutoff == cutoff, "Forecaster"], direct["Forecaster"], rtol=1e-5, atol=1e-5
        )
    assert not hasattr(fc, "model_")  # the backtest left the estimator as it was


@pytest.mark.parametrize("refit, fit_at", [(True, [0, 1, 2]), (2, [0, 0, 2])])
def test_cross_validation_refit_every_k_windows(refit, fit_at):
    """Window k is forecast by a model fit on the history up to cutoff fit_at[k]."""
    df = seasonal_frame(n=200, ids=("a",), noise=0.2)
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3})
    cv = fc.cross_validation(df, n_windows=3, refit=refit)
    cutoffs = sorted(cv["cutoff"].unique())
    assert len(cutoffs) == 3
    for k, cutoff in enumerate(cutoffs):
        ref = clone(fc).fit(df[df["ds"] <= cutoffs[fit_at[k]]])
        direct = ref.predict(df=df[df["ds"] <= cutoff])
        np.testing.assert_allclose(
            cv.loc[cv.cutoff == cutoff, "Forecaster"], direct["Forecaster"], rtol=1e-5, atol=1e-5
        )


def test_cross_validation_too_many_windows():
    with pytest.raises(ValueError, match="does not fit"):
        Forecaster(h=10, input_size=20, **TINY).cross_validation(seasonal_frame(n=50), n_windows=6)


# ---------------------------------------------------------------------------------------------
# persistence, plots, sklearn conventions
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_identical(fitted, tmp_path):
    fc, df = fitted
    path = fc.save(tmp_path / "fc")
    assert sorted(p.name for p in path.iterdir()) == ["forecaster.json", "state.pt"]
    torch.load(path / "state.pt", weights_only=True)  # plain tensors only
    loaded = Forecaster.load(path)
    pd.testing.assert_frame_equal(loaded.predict(), fc.predict())
    pd.testing.assert_frame_equal(loaded.predict(df=df.iloc[:-30]), fc.predict(df=df.iloc[:-30]))
    assert loaded.get_params() == fc.get_params()


def test_save_load_tz_aware_and_quantiles(tmp_path):
    df = seasonal_frame(n=150, ids=("a",))
    df["ds"] = df["ds"].dt.tz_localize("Europe/Berlin")
    fc = Forecaster(h=6, input_size=24, loss="quantile", **{**TINY, "max_steps": 2}).fit(df)
    loaded = Forecaster.load(fc.save(tmp_path / "q"))
    pd.testing.assert_frame_equal(loaded.predict(), fc.predict())


def test_season_block_fold_trains_saves_and_loads(tmp_path):
    """fold=BlockFold(season) (README): the finest hop spans one period; kept through save/load."""
    df = seasonal_frame(n=200, ids=("a",))
    fc = Forecaster(
        h=12, input_size=48, fold=BlockFold(24), **{**TINY, "patch_len": 1, "max_steps": 2}
    ).fit(df)
    attn = fc.model_.encoder.blocks[0].attn
    assert isinstance(attn, TensorizedAttention) and resolve_fold(attn.fold, 60).dims == (
        3,
        24,
    )  # 48 + 12 tokens
    loaded = Forecaster.load(fc.save(tmp_path / "season"))
    assert loaded.fold == BlockFold(24)
    pd.testing.assert_frame_equal(loaded.predict(), fc.predict())


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved forecaster"):
        Forecaster.load(tmp_path)


def test_plot(fitted, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    fc, df = fitted
    fig = fc.plot(df, fc.predict(), history=100)
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "f.png")


def test_sklearn_conventions(fitted):
    fc, _ = fitted
    params = fc.get_params()
    assert params["h"] == 12 and params["input_size"] == 48 and params["d_model"] == 16
    twin = clone(fc)
    assert twin.get_params() == params and not hasattr(twin, "model_")
    twin.set_params(d_model=32, attention="full")
    assert twin.d_model == 32 and fc.d_model == 16
    with pytest.raises(NotFittedError):
        twin.predict()
    fitted_attrs = [a for a in vars(fc) if a.endswith("_") and not a.startswith("_")]
    assert {"model_", "scaler_", "ids_", "freq_", "history_", "missing_report_"} <= set(
        fitted_attrs
    )
    assert Forecaster(h=3, input_size=10, fold=None).fold is None  # __init__ stores, no validation


@pytest.mark.parametrize(
    "params, match",
    [
        ({"loss": "l1"}, "loss"),
        ({"h": 0}, "h must"),
        ({"attention": "flash"}, "attention"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": "0.9"}, "ema_decay"),
        ({"patch_len": 4, "patch_stride": 5}, "patch_stride"),
        ({"patch_stride": 0}, "patch_stride"),
    ],
)
def test_bad_params_raise_in_fit(params, match):
    fc = Forecaster(**{"h": 4, "input_size": 8, **params})
    with pytest.raises(ValueError, match=match):
        fc.fit(seasonal_frame(n=40))


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error or a documented behaviour
# ---------------------------------------------------------------------------------------------


def test_nan_targets_are_masked_and_reported():
    df = seasonal_frame(n=200)
    df.loc[[10, 11, 12, 150], "y"] = np.nan
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3})
    with pytest.warns(UserWarning, match="4 missing target values in 1 series"):
        fc.fit(df)
    report = fc.missing_report_.set_index("unique_id")
    assert report.loc["a", "missing_y"] == 4 and report.loc["b", "missing_y"] == 0
    assert np.isfinite(fc.predict()["Forecaster"]).all()
    # NaN in the history of a prediction is masked too
    with pytest.warns(UserWarning):
        out = fc.predict(df=df.assign(y=df["y"].where(df.index % 3 != 0)))
    assert np.isfinite(out["Forecaster"]).all()


def test_missing_steps_are_inserted_masked_and_reported():
    df = seasonal_frame(n=200, ids=("a",)).drop(index=range(50, 60))
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 2})
    with pytest.warns(UserWarning, match="10 missing target values"):
        fc.fit(df)
    assert fc.missing_report_.loc[0, "inserted_steps"] == 10
    assert fc.freq_ == pd.tseries.frequencies.to_offset("h")


def test_irregular_timestamps_raise():
    df = seasonal_frame(n=100, ids=("a",))
    df.loc[40, "ds"] = df.loc[40, "ds"] + pd.Timedelta(minutes=7)
    with pytest.raises(ValueError, match="not on the 'h' grid.*irregular"):
        Forecaster(h=4, input_size=16, **TINY).fit(df)


def test_duplicate_rows_raise():
    df = seasonal_frame(n=100)
    with pytest.raises(ValueError, match="1 duplicate"):
        Forecaster(h=4, input_size=16, **TINY).fit(pd.concat([df, df.iloc[[5]]]))


def test_unsorted_rows_are_sorted():
    df = seasonal_frame(n=150)
    shuffled = df.sample(frac=1.0, random_state=0)
    a = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(df).predict()
    b = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(shuffled).predict()
    pd.testing.assert_frame_equal(a, b)


def test_series_shorter_than_look_back_is_left_padded():
    long = seasonal_frame(n=200, ids=("a",))
    short = seasonal_frame(n=30, ids=("s",))
    fc = Forecaster(h=6, input_size=64, **{**TINY, "max_steps": 3}).fit(pd.concat([long, short]))
    out = fc.predict()
    assert out.groupby("unique_id").size().to_dict() == {"a": 6, "s": 6}
    assert np.isfinite(out["Forecaster"]).all()


def test_series_too_short_to_train_raise():
    df = pd.concat([seasonal_frame(n=200, ids=("a",)), seasonal_frame(n=6, ids=("tiny",))])
    with pytest.raises(ValueError, match=r"\['tiny'\].*too short to train"):
        Forecaster(h=6, input_size=24, **TINY).fit(df)


def test_non_numeric_target_raises():
    df = seasonal_frame(n=60)
    df["y"] = df["y"].astype(str)
    with pytest.raises(TypeError, match="column 'y' must be numeric.*pd.to_numeric"):
        Forecaster(h=4, input_size=16, **TINY).fit(df)


def test_infinite_target_raises():
    df = seasonal_frame(n=60)
    df.loc[3, "y"] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        Forecaster(h=4, input_size=16, **TINY).fit(df)


def test_string_timestamps_raise():
    df = seasonal_frame(n=60)
    df["ds"] = df["ds"].astype(str)
    with pytest.raises(TypeError, match="pd.to_datetime"):
        Forecaster(h=4, input_size=16, **TINY).fit(df)


def test_tz_aware_timestamps_are_kept():
    df = seasonal_frame(n=150)
    aware = df.assign(ds=df["ds"].dt.tz_localize("UTC").dt.tz_convert("Australia/Melbourne"))
    a = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(df).predict()
    b = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 3}).fit(aware).predict()
    assert str(b["ds"].dt.tz) == "Australia/Melbourne"
    assert (b["ds"].dt.tz_convert("UTC").dt.tz_localize(None) == a["ds"]).all()
    np.testing.assert_allclose(a["Forecaster"], b["Forecaster"], rtol=1e-5)


def test_categorical_ids():
    df = seasonal_frame(n=150)
    df["unique_id"] = pd.Categorical(df["unique_id"], categories=["b", "a", "unused"])
    fc = Forecaster(h=6, input_size=24, **{**TINY, "max_steps": 2}).fit(df)
    out = fc.predict()
    assert fc.ids_ == ["b", "a"]  # unused categories are no series; category order
    assert list(out["unique_id"].unique()) == ["b", "a"]


def test_missing_columns_and_empty_frames():
    fc = Forecaster(h=4, input_size=16, **TINY)
    with pytest.raises(ValueError, match="missing columns"):
        fc.fit(seasonal_frame(n=60).drop(columns="y"))
    with pytest.raises(ValueError, match="empty"):
        fc.fit(seasonal_frame(n=60).iloc[:0])
    with pytest.raises(TypeError, match="DataFrame"):
        fc.fit(np.zeros((10, 3)))


def test_static_df_problems():
    df = seasonal_frame(n=100)
    fc = Forecaster(h=4, input_size=16, **TINY)
    with pytest.raises(ValueError, match="missing for series"):
        fc.fit(df, pd.DataFrame({"unique_id": ["a"], "size": [1.0]}))
    with pytest.raises(TypeError, match="numeric"):
        fc.fit(df, pd.DataFrame({"unique_id": ["a", "b"], "kind": ["x", "y"]}))


# ---------------------------------------------------------------------------------------------
# the network and the loss
# ---------------------------------------------------------------------------------------------


def test_loss_ignores_missing_targets():
    pred = torch.zeros(2, 1, 4, 1)
    target = torch.tensor([[[1.0, np.nan, 1.0, np.nan]], [[np.nan, np.nan, np.nan, 3.0]]])
    assert forecast_loss(pred, target, "mae").item() == pytest.approx(5 / 3)
    assert forecast_loss(pred, target, "mse").item() == pytest.approx(11 / 3)
    q = forecast_loss(torch.zeros(2, 1, 4, 2), target, "quantile", (0.1, 0.9))
    assert q.item() == pytest.approx(
        0.5 * 5 / 3
    )  # pinball of an under-forecast, averaged over 0.1 and 0.9


def test_model_is_equivariant_to_scale_and_masks_missing_history():
    torch.manual_seed(0)
    cfg = ForecastModelConfig(
        input_size=40, h=8, patch_len=8, encoder=ModelConfig(d_model=16, n_layers=1, n_heads=2)
    )
    model = PatchForecastModel(cfg).eval()
    y = torch.randn(3, 1, 40)
    batch = {
        "y": y,
        "futr": torch.zeros(3, 0, 48),
        "hist": torch.zeros(3, 0, 40),
        "static": torch.zeros(3, 0),
    }
    out = model(batch)
    assert out.shape == (3, 1, 8, 1)
    scaled = model({**batch, "y": y * 5 + 2})
    torch.testing.assert_close(scaled, out * 5 + 2, rtol=1e-4, atol=1e-3)
    # missing history (here a left-padded start) is masked: the forecast stays finite and ignores it
    a = y.clone()
    a[:, :, :20] = float("nan")
    b = a.clone()
    b[:, :, 20:] = b[:, :, 20:] * 3 - 1  # rescaling what is observed rescales the forecast
    torch.testing.assert_close(
        model({**batch, "y": b}), model({**batch, "y": a}) * 3 - 1, rtol=1e-4, atol=1e-3
    )
    assert torch.isfinite(model({**batch, "y": a})).all()


def test_skip_ridge_init_recovers_a_linear_map():
    """init_skip_ridge solves the linear skip in closed form on the RevIN-normalized windows."""
    torch.manual_seed(0)
    L, h = 32, 8
    model = PatchForecastModel(
        ForecastModelConfig(
            input_size=L, h=h, patch_len=8, encoder=ModelConfig(d_model=16, n_layers=1, n_heads=2)
        )
    )
    y = torch.randn(512, 1, L) * 3 + 5
    z, mean, std, _ = model._revin(y)
    W = torch.randn(h, L) * 0.1
    target = (z @ W.T + 0.2) * std + mean  # (B, 1, h)
    target[0, 0, 3] = float("nan")  # a window with a missing target is left out
    assert model.init_skip_ridge(y, target, alpha=1e-8)
    # every normalized window sums to 0, so the map is identified up to that direction: compare outputs
    with torch.no_grad():
        torch.testing.assert_close(model.skip(z), z @ W.T + 0.2, atol=1e-3, rtol=1e-3)
    assert not PatchForecastModel(
        ForecastModelConfig(input_size=L, h=h, linear_skip=False)
    ).init_skip_ridge(y, target)


def test_skip_ridge_default_and_off():
    df = seasonal_frame(200, noise=0.1)
    on = Forecaster(h=12, input_size=48, **{**TINY, "max_steps": 1, "learning_rate": 1e-12}).fit(df)
    off = Forecaster(
        h=12,
        input_size=48,
        skip_ridge=0,
        seasonality=None,  # with seasons the skip starts at their profile (test_forecast_accuracy)
        **{**TINY, "max_steps": 1, "learning_rate": 1e-12},
    ).fit(df)
    assert on.model_.skip.weight.abs().sum() > 0
    assert off.model_.skip.weight.abs().max() < 1e-6
    with pytest.raises(ValueError, match="skip_ridge"):
        Forecaster(h=12, input_size=48, skip_ridge=-1, **TINY).fit(df)


# ---------------------------------------------------------------------------------------------
# overlapping patches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L, P, stride", [(20, 4, 2), (21, 4, 3), (3, 4, 2), (16, 4, 4), (17, 5, 1)]
)
def test_past_patches_match_a_loop(L, P, stride):
    from seqtensor.adapters.forecast.model import _patches

    cfg = ForecastModelConfig(input_size=L, h=4, patch_len=P, patch_stride=stride)
    x = torch.arange(1.0, L + 1).view(1, 1, L)
    got = _patches(x, P, cfg.n_past, True, stride)[0]  # (n_past, P)
    # oracle: the last patch ends at the last step; each earlier one starts `stride` steps before
    want = []
    for i in range(cfg.n_past):
        end = L - (cfg.n_past - 1 - i) * stride
        want.append([float(t) if 1 <= t <= L else 0.0 for t in range(end - P + 1, end + 1)])
    assert got.tolist() == want
    first = L - (cfg.n_past - 1) * stride - P + 1  # first step of the first patch
    assert 1 - stride < first <= 1  # it covers step 1, and one patch fewer would not


def test_stride_equal_to_patch_len_is_the_default_model():
    enc = ModelConfig(d_model=16, n_layers=1, n_heads=2)
    a = PatchForecastModel(ForecastModelConfig(input_size=40, h=8, patch_len=8, encoder=enc))
    b = PatchForecastModel(
        ForecastModelConfig(input_size=40, h=8, patch_len=8, patch_stride=8, encoder=enc)
    )
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(0)
    for layer in (a, b):  # non-zero readouts, so the encoder's tokens matter
        torch.nn.init.normal_(layer.head.weight, generator=torch.Generator().manual_seed(1))
    batch = {
        "y": torch.randn(3, 1, 40, generator=g),
        "futr": torch.zeros(3, 0, 48),
        "hist": torch.zeros(3, 0, 40),
        "static": torch.zeros(3, 0),
    }
    torch.testing.assert_close(a(batch), b(batch))


def test_overlapping_patches_fit_predict_save_load(tmp_path):
    df = seasonal_frame(n=160, ids=("a",))
    fc = Forecaster(
        h=6,
        input_size=32,
        patch_len=8,
        patch_stride=4,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_steps=5,
        random_state=0,
        device="cpu",
    ).fit(df)
    assert fc.model_config_.n_past == 7  # ceil((32 - 8) / 4) + 1
    assert fc.get_params()["patch_stride"] == 4 and clone(fc).patch_stride == 4
    loaded = Forecaster.load(fc.save(tmp_path / "fc"))
    pd.testing.assert_frame_equal(loaded.predict(), fc.predict())


# ---------------------------------------------------------------------------------------------
# seed ensembles
# ---------------------------------------------------------------------------------------------


def test_ensemble_averages_independently_trained_members(tmp_path):
    from seqtensor.adapters.forecast.model import ForecastEnsemble

    df = seasonal_frame(n=160, ids=("a", "b"), noise=0.3)
    kw = dict(
        h=6,
        input_size=32,
        patch_len=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_steps=20,
        random_state=3,
        device="cpu",
        val_size=0,  # every member trained and kept (a kept closed-form start is the same in all)
    )
    single = Forecaster(**kw).fit(df)
    ens = Forecaster(n_models=3, **kw).fit(df)
    assert isinstance(ens.model_, ForecastEnsemble) and len(ens.model_.members) == 3
    assert {r["member"] for r in ens.history_} == {0, 1, 2} and len(ens.history_) == 3 * len(
        single.history_
    )
    # member 0 uses the first seed drawn from random_state: it is the single model
    for a, b in zip(
        single.model_.state_dict().values(), ens.model_.members[0].state_dict().values()
    ):
        torch.testing.assert_close(a, b)
    # the ensemble's forecast is the mean of its members' forecasts
    ensemble_model, member_preds = ens.model_, []
    for member in ensemble_model.members:
        ens.model_ = member
        member_preds.append(ens.predict()[ens.model_name].to_numpy())
    ens.model_ = ensemble_model
    np.testing.assert_allclose(
        ens.predict()[ens.model_name].to_numpy(), np.mean(member_preds, 0), rtol=1e-5, atol=1e-6
    )
    assert np.ptp(np.array(member_preds), 0).max() > 0  # the members differ
    loaded = Forecaster.load(ens.save(tmp_path / "ens"))
    pd.testing.assert_frame_equal(loaded.predict(), ens.predict())
    assert loaded.get_params()["n_models"] == 3


def test_n_models_must_be_positive():
    with pytest.raises(ValueError, match="n_models"):
        Forecaster(h=4, input_size=8, n_models=0).fit(seasonal_frame(n=40))


# ---------------------------------------------------------------------------------------------
# input_size=None: the look-back chosen from the detected seasons
# ---------------------------------------------------------------------------------------------


def test_default_input_size_follows_the_detected_season(tmp_path, capsys):
    """input_size=None: 7 whole cycles of the detected period 24 (default_input_size's rule:
    400 steps leave max(24, 8h=96) after 7 cycles), kept by save/load and clone."""
    from seqtensor.adapters.forecast.seasonality import default_input_size

    df = seasonal_frame(n=400, ids=("a",), noise=0.1)
    fc = Forecaster(h=12, **{**TINY, "verbose": True}).fit(df)
    assert fc.seasons_ == (24,)
    assert fc.input_size_ == default_input_size(400, 12, (24,)) == 168
    assert fc.model_config_.input_size == 168 and fc.get_params()["input_size"] is None
    assert "look-back input_size=168" in capsys.readouterr().err
    # the same fit as the look-back given explicitly
    ref = Forecaster(h=12, input_size=168, **TINY).fit(df)
    pd.testing.assert_frame_equal(fc.predict(), ref.predict())
    loaded = Forecaster.load(fc.save(tmp_path / "auto"))
    assert loaded.input_size is None and loaded.input_size_ == 168
    pd.testing.assert_frame_equal(loaded.predict(), fc.predict())
    twin = clone(fc)
    assert twin.input_size is None and not hasattr(twin, "input_size_")


def test_default_input_size_without_a_season_is_half_the_history():
    """No season (white noise): min(512, n // 2) steps."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"unique_id": "a", "ds": pd.date_range("2021", periods=300, freq="h"),
         "y": rng.standard_normal(300)}
    )  # fmt: skip
    fc = Forecaster(h=6, **TINY, verbose=False).fit(df)
    assert fc.seasons_ == () and fc.input_size_ == 150


def test_default_input_size_in_a_backtest_is_chosen_per_fit():
    """cross_validation fits a copy on the steps before the first cutoff: the look-back is the
    default for those steps, and the estimator itself is left unfitted."""
    df = seasonal_frame(n=400, ids=("a",))
    fc = Forecaster(h=12, **TINY, verbose=False)
    cv = fc.cross_validation(df, n_windows=2)
    assert len(cv) == 24 and not hasattr(fc, "input_size_")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "auto"])
def test_bad_input_size_is_named(bad):
    with pytest.raises(ValueError, match="input_size must be None or a positive int"):
        Forecaster(h=6, input_size=bad, **TINY).fit(seasonal_frame(n=100, ids=("a",)))


def test_weight_average_decay_is_capped_by_the_run_length():
    """A short run averages over at most its last 40%: decay min(ema_decay, 1 - 2.5/max_steps)."""
    df = seasonal_frame(n=300, noise=0.3)
    settings = {**TINY, "max_steps": 40, "val_size": 0, "verbose": False}

    def forecast(decay):
        return Forecaster(h=12, input_size=48, ema_decay=decay, **settings).fit(df).predict()

    capped = forecast(0.995)
    pd.testing.assert_frame_equal(capped, forecast(1 - 2.5 / 40))  # the cap is what ran
    assert not np.allclose(capped["Forecaster"], forecast(0.5)["Forecaster"])  # the decay acts
