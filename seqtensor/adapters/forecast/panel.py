"""From a user's DataFrame to a validated panel of regular series (the Forecaster's data layer).

A *panel* holds each series on its own regular time grid, as NumPy arrays: the target (NaN where
missing) and the exogenous columns. Every "bad input" rule of the Forecaster lives here, in one
place, each with a clear error or a documented behaviour:

- long frame (``id_col``, ``time_col``, ``target_col``) or wide frame (DatetimeIndex, one column per
  series); categorical ids keep their values (unused categories do not become series);
- series are ordered by id (categorical ids by category order) and rows by time, so unsorted rows
  give the same result as sorted ones; duplicate ``(id, time)`` pairs raise;
- the frequency is inferred (or given); timestamps off that grid raise (resample first); missing
  grid steps are inserted as NaN targets, masked in inputs and loss, and reported;
- NaN targets are masked and reported; inf raises; a non-numeric target raises ``TypeError``;
- timezone-aware timestamps are kept: forecasts come back in the same zone;
- integer time steps (1, 2, 3, ...) work as well as timestamps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..._validation import check

__all__ = [
    "Panel",
    "to_long",
    "build_panel",
    "infer_freq",
    "future_times",
    "freq_to_json",
    "freq_from_json",
    "check_scale",
    "missing_future",
]


# ---------------------------------------------------------------------------------------------
# frequency helpers
# ---------------------------------------------------------------------------------------------


def infer_freq(times: Sequence[pd.Series]) -> Any:
    """The step of a set of series: a pandas offset for timestamps, an int for integer steps.

    Each series gets its own frequency: the candidates are ``pd.infer_freq`` of the whole series
    (it knows calendar steps such as "MS" or "B"), of windows of 3 stamps spread over it (so a few
    gaps do not hide a calendar step), business days when every stamp is a weekday, and
    otherwise the most common step. The candidate whose grid holds every stamp with the fewest
    steps wins; candidates in a tie raise, naming them, as do series of different frequencies.
    The result never depends on hash order, so it is the same in every process.
    """
    integer = pd.api.types.is_integer_dtype(times[0].dtype)
    per_series = [(k, _series_freqs(t, integer)) for k, t in enumerate(times)]
    per_series = [(k, best) for k, best in per_series if best]
    if not per_series:
        raise ValueError(
            "cannot infer the frequency from series of one step each (or of no regular step); "
            "pass freq="
        )
    common = set(per_series[0][1])
    for _, best in per_series[1:]:
        common &= set(best)
    if len(common) == 1:
        return per_series[0][1][common.pop()]
    if len(common) > 1:
        raise ValueError(
            f"the frequency is ambiguous: {sorted(common)} each put every stamp on a grid of the "
            f"same size; pass freq= with the one you mean"
        )
    seen: dict[str, int] = {}
    for k, best in per_series:
        for name in best:
            seen.setdefault(name, k)
    listing = ", ".join(f"{name!r} (series #{k})" for name, k in sorted(seen.items()))
    raise ValueError(
        f"the series have different frequencies: {listing}. Fit series of one frequency "
        f"together (resample the others first), or pass freq= to put all on one grid"
    )


def _series_freqs(t: pd.Series, integer: bool) -> dict[str, Any]:
    """One series' best frequencies by name (see ``infer_freq``; several on a tie, none for 1
    stamp)."""
    if len(t) < 2:
        return {}
    if integer:
        values = t.to_numpy()
        diffs = np.diff(values)
        steps, counts = np.unique(diffs[diffs > 0], return_counts=True)
        candidates = {str(int(v)): int(v) for v in steps[counts == counts.max()]}
        fits = {
            name: len(range(values[0], values[-1] + 1, c))
            for name, c in candidates.items()
            if ((values - values[0]) % c == 0).all()
        }
        return _best(fits, candidates)
    names: set[str] = set()
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset
        warnings.simplefilter("ignore")
        if len(t) >= 3:
            whole = pd.infer_freq(t)
            if whole is not None:
                names.add(whole)
            else:  # gaps: most short windows are still complete
                for i in _window_starts(len(t)):
                    f = pd.infer_freq(t.iloc[i : i + 3])
                    if f is not None:
                        names.add(f)
    offsets = {}
    for name in names:
        offset = pd.tseries.frequencies.to_offset(name)
        offsets[offset.freqstr] = offset
    if not offsets:
        for d in t.diff().dropna().mode():
            if d > pd.Timedelta(0):
                offset = pd.tseries.frequencies.to_offset(d)
                offsets[offset.freqstr] = offset
    if "D" in offsets and (pd.DatetimeIndex(t).day_of_week < 5).all():
        offsets["B"] = pd.offsets.BusinessDay()  # weekdays only: days lost to weekends are no gaps
    fits = {}
    span = t.iloc[-1] - t.iloc[0]
    for name, offset in offsets.items():
        if isinstance(offset, pd.offsets.Tick) and span.value // offset.nanos > 50 * len(t) + 1000:
            continue  # a grid of mostly inserted steps (a stray close pair of stamps): no candidate
        grid = pd.date_range(t.iloc[0], t.iloc[-1], freq=offset)
        if len(grid) and grid[0] == t.iloc[0] and (grid.get_indexer(pd.Index(t)) >= 0).all():
            fits[name] = len(grid)
    return _best(fits, offsets)


def _best(fits: dict[str, int], candidates: dict[str, Any]) -> dict[str, Any]:
    """The candidates with the smallest grid holding every stamp (several on a tie).

    When none holds every stamp, the first by name, so the off-grid error names it.
    """
    if not fits:
        return {min(candidates): candidates[min(candidates)]} if candidates else {}
    least = min(fits.values())
    return {name: candidates[name] for name in sorted(fits) if fits[name] == least}


def _window_starts(n: int, count: int = 32) -> np.ndarray:
    """Starts of up to ``count`` windows of 3 stamps spread over a series of n >= 3 stamps."""
    return np.unique(np.linspace(0, n - 3, min(count, n - 2)).astype(int))


def future_times(last: Any, freq: Any, h: int) -> pd.Index:
    """The h stamps after ``last`` at ``freq`` (int steps or a pandas offset, tz kept)."""
    if isinstance(freq, (int, np.integer)):
        return pd.Index(last + freq * np.arange(1, h + 1), dtype="int64")
    return pd.date_range(last, periods=h + 1, freq=freq)[1:]


def _grid(start: Any, end: Any, freq: Any) -> pd.Index:
    if isinstance(freq, (int, np.integer)):
        return pd.Index(np.arange(start, end + 1, freq), dtype="int64")
    return pd.date_range(start, end, freq=freq)


def freq_to_json(freq: Any) -> Any:
    return int(freq) if isinstance(freq, (int, np.integer)) else freq.freqstr


def freq_from_json(value: Any) -> Any:
    return int(value) if isinstance(value, int) else pd.tseries.frequencies.to_offset(value)


# ---------------------------------------------------------------------------------------------
# the panel
# ---------------------------------------------------------------------------------------------


@dataclass
class Panel:
    """Series on regular grids. Series s has ``lengths[s]`` steps from ``starts[s]`` at ``freq``."""

    ids: list  # series ids, sorted (categorical ids: in category order)
    starts: list  # first stamp of each series
    freq: Any  # pandas offset, or int step for integer time
    y: list[np.ndarray]  # per series (T_s,) float64, NaN = missing
    futr: list[np.ndarray]  # per series (T_s, F) float64, known-future exogenous
    hist: list[np.ndarray]  # per series (T_s, P) float64, past-only exogenous
    futr_cols: tuple[str, ...] = ()
    hist_cols: tuple[str, ...] = ()
    report: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # per series: steps, missing y, inserted steps

    @property
    def lengths(self) -> list[int]:
        return [len(v) for v in self.y]

    def times(self, s: int) -> pd.Index:
        if isinstance(self.freq, (int, np.integer)):
            return pd.Index(self.starts[s] + self.freq * np.arange(self.lengths[s]), dtype="int64")
        return pd.date_range(self.starts[s], periods=self.lengths[s], freq=self.freq)

    def last(self, s: int) -> Any:
        return self.times(s)[-1]

    def head(self, ends: Sequence[int]) -> Panel:
        """The panel cut to the first ``ends[s]`` steps of each series (a backtest's history)."""
        return Panel(
            self.ids,
            self.starts,
            self.freq,
            [v[:e] for v, e in zip(self.y, ends)],
            [v[:e] for v, e in zip(self.futr, ends)],
            [v[:e] for v, e in zip(self.hist, ends)],
            self.futr_cols,
            self.hist_cols,
            self.report,
        )


def to_long(df: pd.DataFrame, id_col: str, time_col: str, target_col: str) -> pd.DataFrame:
    """A long frame as is; a wide frame (DatetimeIndex, one numeric column per series) melted."""
    check(
        isinstance(df, pd.DataFrame),
        f"df must be a pandas DataFrame, got {type(df).__name__}",
        TypeError,
    )
    check(len(df) > 0, "df is empty")
    if id_col in df.columns or time_col in df.columns:
        return df
    check(
        isinstance(df.index, pd.DatetimeIndex),
        f"df has no {id_col!r}/{time_col!r} columns: pass a long frame with those columns "
        f"(or rename them with id_col=, time_col=), or a wide frame with a DatetimeIndex",
    )
    wide = df
    long = wide.melt(ignore_index=False, var_name=id_col, value_name=target_col)
    long = long.rename_axis(time_col).reset_index()
    return long[[id_col, time_col, target_col]]


def _check_columns(df: pd.DataFrame, id_col, time_col, target_col, exog: Sequence[str]) -> None:
    needed = [id_col, time_col, target_col, *exog]
    missing = [c for c in needed if c not in df.columns]
    check(not missing, f"df is missing columns {missing}; it has {list(df.columns)}")
    check(len(set(exog)) == len(exog), f"exogenous columns are listed twice: {list(exog)}")
    check(
        not {id_col, time_col, target_col} & set(exog),
        "exogenous columns must differ from id, time and target columns",
    )
    for col in (target_col, *exog):
        dtype = df[col].dtype
        ok = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        check(
            ok or pd.api.types.is_bool_dtype(dtype) and col != target_col,
            f"column {col!r} must be numeric, got dtype {dtype}; convert it first, "
            f"e.g. pd.to_numeric(df[{col!r}], errors='coerce') (non-numbers become NaN and are "
            "masked)",
            TypeError,
        )
    time = df[time_col]
    check(
        pd.api.types.is_datetime64_any_dtype(time) or pd.api.types.is_integer_dtype(time),
        f"column {time_col!r} must hold timestamps (datetime64) or integer steps, got dtype "
        f"{time.dtype}; "
        f"parse it with pd.to_datetime",
        TypeError,
    )
    check(
        not time.isna().any(),
        f"column {time_col!r} has {int(time.isna().sum())} missing timestamps",
    )
    check(
        not df[id_col].isna().any(),
        f"column {id_col!r} has {int(df[id_col].isna().sum())} missing ids",
    )
    for col in (target_col, *exog):
        values = df[col].to_numpy(float)
        check(
            not np.isinf(values).any(),
            f"column {col!r} has {int(np.isinf(values).sum())} infinite values",
        )
        big = np.nanmax(np.abs(values)) if (~np.isnan(values)).any() else 0.0
        check(
            big <= FLOAT32_MAX,
            f"column {col!r} has values up to {big:.3g}, beyond float32 (max {FLOAT32_MAX:.3g}) "
            f"the network computes in; rescale it first (e.g. divide by a power of 10)",
        )


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_scale(sid: Any, mean: float, std: float, target_col: str = "y") -> None:
    """Raise when a series' scale cannot be represented: its values would overflow as z-scores."""
    check(
        np.isfinite(mean) and np.isfinite(std) and abs(mean) <= FLOAT32_MAX and std <= FLOAT32_MAX,
        f"series {sid!r}: {target_col!r} has mean {mean:.3g} and std {std:.3g}, beyond float32 "
        f"(max {FLOAT32_MAX:.3g}); rescale the target first (e.g. divide by a power of 10)",
    )


def build_panel(
    df: pd.DataFrame,
    *,
    id_col: str = "unique_id",
    time_col: str = "ds",
    target_col: str = "y",
    futr_exog: Sequence[str] = (),
    hist_exog: Sequence[str] = (),
    freq: Any = None,
    require_target: bool = True,
) -> Panel:
    """Validate a long (or wide) frame and put every series on a regular grid.

    Parameters
    ----------
    df : long frame (one row per series and step) or wide frame (see :func:`to_long`).
    id_col, time_col, target_col : column names.
    futr_exog, hist_exog : known-future and past-only exogenous columns.
    freq : pandas frequency (str or offset), int step, or None to infer it.
    require_target : False for frames that carry only exogenous values (``futr_df``).

    Raises
    ------
    ValueError
        missing columns, duplicate (id, time) pairs, timestamps off the inferred grid, inf targets.
    TypeError
        non-numeric target or exogenous columns, non-datetime/int time column.
    """
    futr_exog, hist_exog = tuple(futr_exog), tuple(hist_exog)
    df = to_long(df, id_col, time_col, target_col)
    if not require_target and target_col not in df.columns:
        df = df.assign(**{target_col: np.nan})
    _check_columns(df, id_col, time_col, target_col, futr_exog + hist_exog)
    dup = df.duplicated([id_col, time_col])
    if dup.any():
        first = df.loc[dup, [id_col, time_col]].iloc[0].tolist()
        raise ValueError(
            f"df has {int(dup.sum())} duplicate ({id_col}, {time_col}) rows, first {first}; "
            f"aggregate them first, e.g. df.groupby([{id_col!r}, {time_col!r}], "
            "as_index=False).mean()"
        )
    # Series sorted by id (categorical ids: in category order) and rows by time, so the row order of
    # the frame never changes a result.
    codes, uniques = pd.factorize(df[id_col], sort=True)
    df = df.assign(_series=codes).sort_values(["_series", time_col], kind="stable")
    groups = [g for _, g in df.groupby("_series", sort=True)]
    times = [g[time_col].reset_index(drop=True) for g in groups]
    if freq is None:
        freq = infer_freq(times)
    else:
        integer_time, integer_freq = (
            pd.api.types.is_integer_dtype(times[0].dtype),
            isinstance(freq, (int, np.integer)),
        )
        check(
            integer_time == integer_freq and not isinstance(freq, bool),
            f"freq={freq!r} does not fit the {times[0].dtype} time column {time_col!r}: integer "
            "time steps take an "
            "int freq, timestamps a pandas frequency such as 'h' or 'MS'",
            TypeError,
        )
        if not integer_freq:
            freq = pd.tseries.frequencies.to_offset(freq)
    ys, futrs, hists, rows = [], [], [], []
    for g, t in zip(groups, times):
        sid = g[id_col].iloc[0]
        grid = _grid(t.iloc[0], t.iloc[-1], freq)
        pos = grid.get_indexer(pd.Index(t))
        if (pos < 0).any():
            bad = t[pos < 0].iloc[0]
            raise ValueError(
                f"series {sid!r}: timestamp {bad} is not on the {freq_to_json(freq)!r} grid "
                "starting at "
                f"{t.iloc[0]} ({int((pos < 0).sum())} such stamps): the timestamps are irregular. "
                "Resample "
                f"first, e.g. df.set_index({time_col!r}).groupby({id_col!r}).resample(...).mean(), "
                "or pass freq="
            )
        y = np.full(len(grid), np.nan)
        y[pos] = g[target_col].to_numpy(float)

        def exog(cols: tuple[str, ...]) -> np.ndarray:
            out = np.full((len(grid), len(cols)), np.nan)
            out[pos] = g[list(cols)].to_numpy(float) if cols else out[pos]
            return out

        ys.append(y), futrs.append(exog(futr_exog)), hists.append(exog(hist_exog))
        rows.append(
            {
                "unique_id": sid,
                "steps": len(grid),
                "missing_y": int(np.isnan(y).sum()),
                "inserted_steps": len(grid) - len(g),
            }
        )
    ids = [uniques[i] for i in range(len(uniques))]
    ids = [x.item() if isinstance(x, np.generic) else x for x in ids]
    starts = [t.iloc[0] for t in times]
    return Panel(ids, starts, freq, ys, futrs, hists, futr_exog, hist_exog, pd.DataFrame(rows))


def warn_missing(report: pd.DataFrame, where: str, freq: Any = None) -> None:
    """One warning for missing targets and one for grids more than 10% inserted (a wrong freq?)."""
    if len(report):
        share = report["inserted_steps"] / report["steps"].clip(lower=1)
        sparse = report[share > 0.1]
        if len(sparse):
            first = sparse.iloc[0]
            name = "?" if freq is None else freq_to_json(freq)
            warnings.warn(
                f"{where}: at frequency {name!r}, more than 10% of the grid steps of {len(sparse)} "
                f"series are absent from the frame and were inserted as missing (series "
                f"{first['unique_id']!r}: {int(first['inserted_steps'])} of "
                f"{int(first['steps'])}). "
                f"If that is not the data's frequency, pass freq= (e.g. 'B' for business days)",
                stacklevel=4,
            )
    bad = report[(report["missing_y"] > 0) | (report["inserted_steps"] > 0)]
    if len(bad):
        total = int(bad["missing_y"].sum())
        inserted = int(bad["inserted_steps"].sum())
        warnings.warn(
            f"{where}: {total} missing target values in {len(bad)} series ({inserted} of them at "
            "grid steps "
            f"absent from the frame); they are masked in the inputs and the loss. "
            f"Per-series counts: the `missing_report_` attribute.",
            stacklevel=4,
        )


def future_exog(
    futr_df: pd.DataFrame | None,
    panel: Panel,
    h: int,
    *,
    id_col: str,
    time_col: str,
) -> list[np.ndarray]:
    """Known-future exogenous values for the h steps after each series' end: per series (h, F).

    Raises ValueError naming the missing columns, or the first series and stamp with no row.
    Extra rows (other series, later stamps) are ignored.
    """
    cols = list(panel.futr_cols)
    if not cols:
        return [np.zeros((h, 0)) for _ in panel.ids]
    check(
        futr_df is not None,
        f"the model was fit with futr_exog={cols}: predict needs futr_df with those columns "
        f"for the {h} steps after each series' end",
    )
    check(
        isinstance(futr_df, pd.DataFrame),
        f"futr_df must be a DataFrame, got {type(futr_df).__name__}",
        TypeError,
    )
    missing = [c for c in (id_col, time_col, *cols) if c not in futr_df.columns]
    check(not missing, f"futr_df is missing columns {missing}; it has {list(futr_df.columns)}")
    check(
        not futr_df.duplicated([id_col, time_col]).any(),
        f"futr_df has duplicate ({id_col}, {time_col}) rows",
    )
    indexed = futr_df.set_index([id_col, time_col])[cols]
    out = []
    for s, sid in enumerate(panel.ids):
        stamps = future_times(panel.last(s), panel.freq, h)
        key = pd.MultiIndex.from_arrays([[sid] * h, stamps])
        pos = indexed.index.get_indexer(key)
        if (pos < 0).any():
            first = stamps[int(np.flatnonzero(pos < 0)[0])]
            raise ValueError(
                f"futr_df has no row for series {sid!r} at {first} ({int((pos < 0).sum())} of the "
                f"{h} future steps "
                f"missing): it needs every step from {stamps[0]} to {stamps[-1]}"
            )
        values = indexed.to_numpy(float)[pos]
        check(
            not np.isnan(values).any(),
            f"futr_df has NaN in {cols} for series {sid!r} within the horizon",
        )
        check(
            np.isfinite(values).all(),
            f"futr_df has infinite values in {cols} for series {sid!r} within the horizon",
        )
        out.append(values)
    return out


def missing_future(
    futr_df: pd.DataFrame | None,
    future: pd.DataFrame,
    cols: Sequence[str],
    *,
    id_col: str,
    time_col: str,
) -> pd.DataFrame:
    """The rows of ``future`` (id, time) with no row in ``futr_df`` or a non-finite value in
    ``cols``."""
    if futr_df is None:
        return future if len(cols) else future.iloc[:0]
    check(
        isinstance(futr_df, pd.DataFrame),
        f"futr_df must be a DataFrame, got {type(futr_df).__name__}",
        TypeError,
    )
    missing = [c for c in (id_col, time_col, *cols) if c not in futr_df.columns]
    check(not missing, f"futr_df is missing columns {missing}; it has {list(futr_df.columns)}")
    known = futr_df[[id_col, time_col, *cols]]
    finite = np.isfinite(known[list(cols)].to_numpy(float)).all(1) if cols else True
    known = known[finite].drop_duplicates([id_col, time_col])[[id_col, time_col]]
    merged = future.merge(known, on=[id_col, time_col], how="left", indicator=True)
    return merged.loc[merged["_merge"] == "left_only", [id_col, time_col]].reset_index(drop=True)
