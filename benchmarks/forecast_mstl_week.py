"""MSTL's forecast from the whole history alone, with and without the week, on 5-minute data.

The synthetic two-season series of ``forecast_synthetic.py`` (``--day`` steps a day, default 288:
5-minute), its last ``--windows`` windows of one day: ``seasonality.mstl_forecast`` from all the
data before each window with the day alone and with the day and the week (2,016 steps, decomposed
from its last two cycles), against StatsForecast's MSTL with both seasons refit per window. MAE
per seed. This is what the Forecaster's blend can reach at weight 1.

Run: ``python benchmarks/forecast_mstl_week.py --weeks 3 4 --seeds 0 1 2`` (needs statsforecast; 7
minutes here);
results: benchmarks/results/forecast_mstl_week_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from forecast_synthetic import series  # noqa: E402

from seqtensor.adapters.forecast.seasonality import mstl_forecast  # noqa: E402

OUT = Path(__file__).parent / "results" / "forecast_mstl_week_cpu.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weeks", type=int, nargs="+", default=[3, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--day", type=int, default=288)
    p.add_argument("--windows", type=int, default=5)
    args = p.parse_args()
    from statsforecast.models import MSTL

    day, week, W = args.day, 7 * args.day, args.windows
    rows = []
    for weeks in args.weeks:
        for seed in args.seeds:
            y = series(seed, weeks, day)["y"].to_numpy()
            errors: dict[str, list[float]] = {"day": [], "day+week": [], "statsforecast": []}
            for k in range(W):
                end = len(y) - (W - k) * day
                truth = y[end : end + day]
                for name, seasons in (("day", (day,)), ("day+week", (day, week))):
                    f = mstl_forecast(y[None, :end], day, seasons)[0]
                    errors[name].append(float(np.abs(f - truth).mean()))
                f = MSTL(season_length=[day, week]).fit(y[:end]).predict(day)["mean"]
                errors["statsforecast"].append(float(np.abs(f - truth).mean()))
            row = {
                "weeks": weeks,
                "seed": seed,
                "mae": {m: float(np.mean(e)) for m, e in errors.items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": f"{platform.processor() or platform.machine()} (CPU)", "args": vars(args)}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
