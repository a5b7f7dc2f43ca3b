"""Forecast a real series end to end against the statistical peers: backtest, predict, plot.

Data: a continuous glucose monitor, every 5 minutes (public domain, vendored under datasets/;
gaps masked). Three weeks of history; the Forecaster (defaults, seasons read from the data) reads
a look-back of whole detected cycles (input_size=None) and forecasts the next day (288 steps).
Peers from StatsForecast: MSTL (the same seasons), AutoETS, SeasonalNaive, Naive (last value).

1. fit once on the history before the backtest (the Forecaster holds out its last days to choose
   between its closed-form start and the trained network);
2. backtest: 7 one-day windows at the end of the history, every model forecasting each from its
   true history, without refitting; MAE / RMSE per model;
3. predict: the day after the data, from the full history;
4. plot: truth against the Forecaster over the backtest windows and the future, as a PNG.

Setup: ``pip install -e . statsforecast matplotlib``.
Run: ``python examples/forecast_demo.py [--out forecast_demo.png]`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.seasonality import calendar_periods, detect_seasonalities
from seqtensor.datasets.timeseries import load_glucose

H, N_WINDOWS, START, DAYS = 288, 7, 20000, 21  # a day of 5-minute steps; 3 weeks of history


def peers(df: pd.DataFrame, seasons: tuple[int, ...]) -> pd.DataFrame:
    """StatsForecast's backtest on the same windows (gaps filled: its models need values)."""
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoETS, Naive, SeasonalNaive

    models = [AutoETS(), SeasonalNaive(season_length=seasons[-1] if seasons else H), Naive()]
    if seasons:
        models.insert(0, MSTL(season_length=list(seasons)))
    filled = df.assign(y=df["y"].interpolate().bfill().ffill())
    sf = StatsForecast(models=models, freq="5min")
    return sf.cross_validation(df=filled, h=H, n_windows=N_WINDOWS, step_size=H)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="forecast_demo.png", help="where to write the plot")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the network")
    args = parser.parse_args()
    # small batches of a small network: more than two threads mostly wait on each other
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.simplefilter("ignore")  # gap and convergence notices of the peers

    df = load_glucose()[["unique_id", "ds", "y"]].iloc[START : START + DAYS * 288]
    df = df.reset_index(drop=True)
    n_train = len(df) - N_WINDOWS * H
    seasons = detect_seasonalities(  # for MSTL, as the fit does
        df["y"].to_numpy()[:n_train], calendar=calendar_periods("5min")
    )
    print(
        f"glucose, 5-minute steps: {len(df):,} steps ({DAYS} days), "
        f"{int(df['y'].isna().sum())} missing (masked); seasons found: {seasons or 'none'}"
    )

    # One fit, on the history before the first backtest window; each window is then forecast
    # from its true history (what cross_validation(refit=False) does) and the future from all of
    # it, so the demo trains once.
    model = Forecaster(h=H, max_steps=args.steps, random_state=0, device=args.device)
    start = time.perf_counter()
    model.fit(df.iloc[:n_train])
    parts = []
    for k in range(N_WINDOWS):
        end = n_train + k * H
        part = model.predict(df=df.iloc[:end])
        part["cutoff"], part["y"] = df["ds"].iloc[end - 1], df["y"].to_numpy()[end : end + H]
        parts.append(part)
    cv = pd.concat(parts, ignore_index=True)
    forecast = model.predict(df=df)
    t_model = time.perf_counter() - start
    start = time.perf_counter()
    scv = peers(df, seasons)
    t_peers = time.perf_counter() - start

    names = ["Forecaster"] + [c for c in scv.columns if c not in ("unique_id", "ds", "cutoff", "y")]
    y = cv["y"].to_numpy()
    ok = np.isfinite(y)
    rows = []
    for m in names:
        err = (cv[m] if m == "Forecaster" else scv[m]).to_numpy() - y
        err = err[ok]
        rows.append({"model": m, "MAE": np.abs(err).mean(), "RMSE": np.sqrt((err**2).mean())})
    table = pd.DataFrame(rows).set_index("model").sort_values("MAE")
    print(f"\nbacktest: {N_WINDOWS} one-day windows, look-back {model.input_size_} steps (mg/dL)\n")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    print(
        f"\nForecaster: start {model.start_!r}, kept {model.selected_[0]!r} after validation on "
        f"{model.val_size_} held-out steps; weight of MSTL's forecast from the whole history "
        f"{model.statistical_weight_:g}"
    )
    print(f"time: Forecaster fit + forecasts {t_model:.0f} s, StatsForecast peers {t_peers:.0f} s")
    print("\nnext day (first rows):")
    print(forecast.head(3).to_string(index=False, float_format=lambda v: f"{v:.1f}"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.5))
    recent = df.iloc[-(N_WINDOWS + 2) * H :]
    ax.plot(recent["ds"], recent["y"], color="k", lw=0.8, label="truth")
    for i, (_, w) in enumerate(cv.groupby("cutoff")):
        ax.plot(w["ds"], w["Forecaster"], color="C0", lw=1, label="backtest" if i == 0 else None)
    ax.plot(forecast["ds"], forecast["Forecaster"], color="C3", lw=1.2, label="forecast")
    ax.set_ylabel("glucose (mg/dL)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot written to {args.out}")


if __name__ == "__main__":
    main()
