"""Forecast a real series end to end: fit, backtest, predict, plot (`make demo`, < 5 min on 2 CPU cores).

Data: sea-surface temperature at buoy B01 in the Gulf of Maine, every 30 minutes, Feb 2016 - Mar
2017 (public domain, vendored under datasets/; 24 missing half-hours, masked). The Forecaster reads
a 10.7-day look-back (512 steps: 32 patch tokens and 3 future tokens through tensorized attention) and forecasts the
next day (48 steps) with 10-90% quantile bands.

1. backtest: ``cross_validation`` fits on the data before the last 40 days and forecasts 40 daily
   windows from their true history, scored against the naive (last value) and seasonal naive
   (same half-hour yesterday) forecasts and DLinear;
2. predict: the day after the end of the data, from the full history, without refitting;
3. plot: the last week, the backtest windows and the forecast with its bands, as a PNG.

Run: ``python examples/forecast_demo.py [--out forecast_demo.png] [--max-steps 300]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.baselines import DLinearForecaster, seasonal_naive
from seqtensor.datasets.timeseries import load_sea_surface_temperature

H, LOOK_BACK, DAY = 48, 512, 48
N_WINDOWS = 40  # backtest days


def baseline_forecasts(df: pd.DataFrame, cv: pd.DataFrame) -> pd.DataFrame:
    """Naive and seasonal-naive forecasts for every backtest window, from the history before its cutoff."""
    y = df.set_index("ds")["y"]
    y = y.ffill()  # baselines need a value at the last step: carry the last observation over gaps
    out = []
    for cutoff, window in cv.groupby("cutoff", sort=True):
        history = y.loc[:cutoff].to_numpy()
        out.append(
            window.assign(
                Naive=seasonal_naive(history, H, 1), SeasonalNaive=seasonal_naive(history, H, DAY)
            )
        )
    return pd.concat(out)


def scores(cv: pd.DataFrame, models: list[str], train_y: np.ndarray) -> pd.DataFrame:
    """MAE, RMSE and MASE (MAE over the in-sample one-day seasonal-naive MAE) per model."""
    scale = np.nanmean(np.abs(train_y[DAY:] - train_y[:-DAY]))
    rows = []
    for m in models:
        err = (cv[m] - cv["y"]).to_numpy()
        err = err[np.isfinite(err)]
        rows.append(
            {
                "model": m,
                "MAE": np.abs(err).mean(),
                "RMSE": np.sqrt((err**2).mean()),
                "MASE": np.abs(err).mean() / scale,
            }
        )
    return pd.DataFrame(rows).set_index("model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="forecast_demo.png", help="where to write the plot")
    parser.add_argument("--max-steps", type=int, default=300, help="training steps")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    df = load_sea_surface_temperature()
    print(
        f"sea-surface temperature, buoy B01: {len(df):,} half-hours, {int(df['y'].isna().sum())} missing (masked)"
    )

    common = dict(
        h=H,
        input_size=LOOK_BACK,
        max_steps=args.max_steps,
        batch_size=32,
        val_size=10 * DAY,
        val_check_steps=50,
        early_stopping=4,
        random_state=0,
        device=args.device,
    )
    model = Forecaster(
        patch_len=16,
        d_model=32,
        n_layers=2,
        n_heads=4,
        learning_rate=1e-3,
        loss="quantile",
        quantiles=(0.1, 0.9),
        **common,
    )
    dlinear = DLinearForecaster(learning_rate=3e-3, loss="mae", **common)

    start = time.perf_counter()
    cv = model.cross_validation(df, n_windows=N_WINDOWS, step_size=DAY)
    t_model = time.perf_counter() - start
    start = time.perf_counter()
    cv_dl = dlinear.cross_validation(df, n_windows=N_WINDOWS, step_size=DAY)
    t_dlinear = time.perf_counter() - start
    cv["DLinearForecaster"] = cv_dl["DLinearForecaster"].to_numpy()
    cv = baseline_forecasts(df, cv)

    first_cutoff = cv["cutoff"].min()
    train_y = df.loc[df["ds"] <= first_cutoff, "y"].to_numpy()
    table = scores(cv, ["Forecaster", "DLinearForecaster", "SeasonalNaive", "Naive"], train_y)
    inside = ((cv["y"] >= cv["Forecaster-q0.1"]) & (cv["y"] <= cv["Forecaster-q0.9"])).mean()
    print(
        f"\nbacktest: {N_WINDOWS} one-day windows after {first_cutoff} (deg C; MASE < 1 beats the in-sample "
        f"seasonal naive)\n"
    )
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\n10-90% band coverage: {inside:.0%} (nominal 80%)")
    print(
        f"train time: Forecaster {t_model:.0f} s ({model.fit_time_:.0f} s fitting), DLinear {t_dlinear:.0f} s"
    )

    forecast = model.predict(df=df)  # the day after the data, from the full history, no refit
    print("\nnext day (first rows):")
    print(forecast.head(4).to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    import matplotlib

    matplotlib.use("Agg")
    fig = model.plot(df, forecast, history=7 * DAY, max_series=1)
    ax = fig.axes[0]
    last = cv[cv["cutoff"] == cv["cutoff"].max()]
    ax.plot(last["ds"], last["Forecaster"], color="C2", lw=1, ls="--", label="last backtest window")
    ax.set_ylabel("sea-surface temperature (deg C)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()  # again: the label set after plot() needs room
    fig.savefig(args.out, dpi=120)
    print(f"\nplot written to {args.out}")


if __name__ == "__main__":
    main()
