"""The default Forecaster against MSTL on synthetic plain two-season series (a check of generality).

Each seed draws a series of ``--weeks`` weeks, ``--day`` steps a day (48: half-hourly): a daily
pattern (two harmonics, random phases), a weekly pattern (one random level per weekday, weekends lower), a slow level swing and
AR(1) noise (coefficient 0.8). The last ``--windows`` windows of h steps are forecast: the
Forecaster fit once on the data before them (``cross_validation(refit=False)``), StatsForecast's
MSTL with the true seasons (day, week) and the weekly seasonal naive forecast refit per window.
MAE per seed, the Forecaster / MSTL ratio, the detected seasons and the chosen start.

Usage: ``python benchmarks/forecast_synthetic.py --seeds 0 1 2 3 4 5 --out
benchmarks/results/forecast_synthetic_cpu.json`` (about a minute a seed on one CPU core; needs
statsforecast).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster


def series(seed: int, weeks: int, day: int = 48) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = weeks * 7 * day
    t = np.arange(n)
    phase = rng.uniform(0, 2 * np.pi, 2)
    daily = np.sin(2 * np.pi * t / day + phase[0]) + 0.5 * np.sin(4 * np.pi * t / day + phase[1])
    weekday = rng.normal(0, 0.6, 7)
    weekday[5:] -= 1.0
    noise, shocks = np.zeros(n), rng.normal(0, 0.3, n)
    for i in range(1, n):
        noise[i] = 0.8 * noise[i - 1] + shocks[i]
    y = 10 + 0.5 * np.sin(2 * np.pi * t / (1.5 * n)) + daily + weekday[(t // day) % 7] + noise
    ds = pd.date_range("2024-01-01", periods=n, freq=f"{24 * 60 // day}min")
    return pd.DataFrame({"unique_id": "s", "ds": ds, "y": y})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--weeks", type=int, default=6)
    p.add_argument(
        "--day", type=int, default=48, help="steps per day (48: half-hourly, 288: 5-min)"
    )
    p.add_argument("--h", type=int, default=None, help="horizon (default: one day)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument(
        "--statistical", default="mstl", help="the Forecaster's statistical setting ('none': off)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, SeasonalNaive

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    day = args.day
    h, W, rows = args.h or day, args.windows, []
    for seed in args.seeds:
        df = series(seed, args.weeks, day)
        start = time.perf_counter()
        statistical = None if args.statistical == "none" else args.statistical
        model = Forecaster(h=h, statistical=statistical, verbose=False).fit(df.iloc[: -W * h])
        cv = model.cross_validation(df, n_windows=W, step_size=h, refit=False)
        seconds = time.perf_counter() - start
        peers = StatsForecast(
            models=[MSTL(season_length=[day, 7 * day]), SeasonalNaive(7 * day)],
            freq=f"{24 * 60 // day}min",
        ).cross_validation(df=df, h=h, n_windows=W, step_size=h)
        cv = cv.merge(peers[["ds", "MSTL", "SeasonalNaive"]], on="ds")
        mae = {
            c: float((cv[c] - cv["y"]).abs().mean())
            for c in ("Forecaster", "MSTL", "SeasonalNaive")
        }
        row = {
            "seed": seed,
            "mae": mae,
            "ratio_to_mstl": mae["Forecaster"] / mae["MSTL"],
            "seasons": list(model.seasons_),
            "start": model.start_,
            "statistical_seasons": list(model.statistical_seasons_),
            "statistical_weight": model.statistical_weight_,
            "selected": model.selected_,
            "seconds": seconds,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratios = [r["ratio_to_mstl"] for r in rows]
    summary = {
        "geo_mean_ratio": float(np.exp(np.mean(np.log(ratios)))),
        "mstl_beaten": int(sum(r < 1 for r in ratios)),
        "of": len(ratios),
    }
    print(summary)
    if args.out:
        meta = {"device": f"{platform.processor() or platform.machine()} (CPU, 1 torch thread)",
                "torch": torch.__version__, "args": vars(args)}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
