"""What MSTL's forecast from the whole history costs: building its map, and a whole fit.

1. The forecast map (``seasonality._mstl_core``) for n steps of a half-hourly (48, 336) or 5-minute
   (288, 2016) two-season series: seconds to build (the map is cached per n for the process).
2. The default Forecaster (100 steps) on a 50-series hourly panel of 2,000 steps, with
   ``statistical=None`` and with ``"mstl"``: fit and predict seconds, and the weight chosen.
3. The ridge path of the start at a 4,032-step look-back (3,000 windows, h = 288): building it
   and fitting the five penalties tried, against the eigendecomposition it replaced.

Run: ``python benchmarks/forecast_statistical_cost.py`` (one torch thread; a few minutes);
results: benchmarks/results/forecast_statistical_cost_cpu.json.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.model import _RidgePath
from seqtensor.adapters.forecast.seasonality import _mstl_core

OUT = Path(__file__).parent / "results" / "forecast_statistical_cost_cpu.json"


def panel(n_series: int = 50, steps: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    t = np.arange(steps)
    parts = []
    for s in range(n_series):
        y = (
            10
            + np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6))
            + rng.normal(0, 0.6, 7)[(t // 24) % 7]
            + 0.05 * rng.normal(0, 0.3, steps).cumsum()
        )
        ds = pd.date_range("2024-01-01", periods=steps, freq="h")
        parts.append(pd.DataFrame({"unique_id": f"s{s}", "ds": ds, "y": y}))
    return pd.concat(parts)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    maps = []
    for n, seasons, h in (
        (1008, (48, 336), 48),
        (1344, (48, 336), 48),
        (2016, (48, 336), 48),
        (4032, (288, 2016), 288),
    ):
        start = time.perf_counter()
        _mstl_core(n, h, seasons, 0.2)
        maps.append(
            {"n": n, "seasons": list(seasons), "h": h, "seconds": time.perf_counter() - start}
        )
        print(maps[-1], flush=True)
    df, fits = panel(), []
    for statistical in (None, "mstl"):
        _mstl_core.cache_clear()  # each fit pays for its maps, as a fresh process does
        start = time.perf_counter()
        fc = Forecaster(h=24, statistical=statistical, max_steps=100, verbose=False,
                        random_state=0, device="cpu").fit(df)  # fmt: skip
        fitted = time.perf_counter()
        fc.predict()
        fits.append({
            "statistical": statistical, "fit_seconds": fitted - start,
            "predict_seconds": time.perf_counter() - fitted,
            "weight": fc.statistical_weight_, "seasons": list(fc.statistical_seasons_),
        })  # fmt: skip
        print(fits[-1], flush=True)
    X, Y = torch.randn(3000, 4032, dtype=torch.float64), torch.randn(3000, 288, dtype=torch.float64)
    start = time.perf_counter()
    path = _RidgePath(X, Y)
    built = time.perf_counter()
    for alpha in (1.0, 10.0, 100.0, 1000.0, 10000.0):
        path.fit(torch.zeros(4032, 288, dtype=torch.float64), alpha)
    fitted = time.perf_counter()
    torch.linalg.eigh(path.G)
    ridge = {"build_seconds": built - start, "five_fits_seconds": fitted - built,
             "eigh_seconds": time.perf_counter() - fitted}  # fmt: skip
    print(ridge, flush=True)
    meta = {"device": f"{platform.processor() or platform.machine()} (CPU, 1 torch thread)",
            "torch": torch.__version__}  # fmt: skip
    OUT.write_text(
        json.dumps({"meta": meta, "maps": maps, "panel_fits": fits, "ridge": ridge}, indent=1)
    )


if __name__ == "__main__":
    main()
