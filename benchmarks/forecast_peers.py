"""The default Forecaster against StatsForecast's peers on short real series (weeks of history).

What a practitioner sees first: a few weeks of one real series, a rolling-origin backtest of
``--windows`` windows of h steps (step h) at its end, and MAE / MSE (original scale) per model.
Peers: StatsForecast ``MSTL`` (seasons detected on the training part, as the Forecaster does),
``AutoETS`` (season = the shortest detected, when <= 24 steps; else non-seasonal), ``SeasonalNaive``
(the longest season), ``Naive``; ``AutoARIMA`` with ``--arima`` (slow past daily seasons of 24).
The Forecaster runs with its defaults (``input_size=None``: ``seasonality.default_input_size``,
7, 4, 3 or 2 whole cycles of the longest detected season, as many as leave max(one cycle, 8h)
training steps; else 4 cycles or 512 without a season, capped at half the training steps).

``--set extra`` (or ``all``) runs more slices of the same public series (other start offsets of sea-surface
temperature, glucose, demand, electricity temperature, air temperature and irradiance, and two
more weather channels), so that a change is judged on more than the table's rows; their rows
carry ``"set": "extra"`` (recorded in benchmarks/results/forecast_peers_extra_cpu.json).

``--set months`` runs 12-week slices of half-hourly demand (months of history, a 7-week
look-back): a two-season series longer than the 6-week rows (rows carry ``"set": "months"``,
benchmarks/results/forecast_peers_months_mstl_cpu.json).

``--neural`` adds NeuralForecast's ``NHITS`` and ``PatchTST`` to rows already in the results file
(without re-running the others): their defaults, input size = the Forecaster's look-back for the
row, at most 500 steps of 64 windows, early stopping on the last h steps before the first window
(patience 5 checks of 50 steps), seed 1, trained once and forecasting each window without refit.

Run: ``pip install statsforecast`` then ``python benchmarks/forecast_peers.py [--set extra --out forecast_peers_extra_cpu.json]``;
results: benchmarks/results/forecast_peers_cpu.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.seasonality import calendar_periods, detect_seasonalities
from seqtensor.datasets.timeseries import (
    load_electricity_demand,
    load_glucose,
    load_sea_surface_temperature,
    load_tmy_weather,
)

RESULTS = Path(__file__).parent / "results"


# Extra slices (start offsets) per series: 8 weeks of sea-surface temperature (30 min), 3 weeks
# of glucose (5 min), 6 weeks of demand and temperature (30 min), 8 weeks of hourly weather.
EXTRA = {
    "sst": (0, 6000, 9000, 12000, 15000),
    "glucose": (0, 10000, 30000, 40000, 50000),
    "Demand": (1000, 4000, 8000, 11000, 14000),
    "Temperature": (0, 3000, 6000, 12000, 15000),
    "temp_air": (2000, 6000),
    "ghi": (1000, 6000),
    "wind_speed": (4000,),
    "relative_humidity": (4000,),
}


def extra_datasets() -> dict[str, tuple[pd.DataFrame, int, str]]:
    """The ``EXTRA`` slices, named as the table's rows with ``_at<start>``; half-hourly and
    5-minute series first (the kinds of data the Forecaster is judged on)."""
    out = {}
    try:
        e = load_electricity_demand()
    except ImportError:
        e = None
    for sid in ("Demand", "Temperature") if e is not None else ():
        s = e[e["unique_id"] == sid][["unique_id", "ds", "y"]]
        for start in EXTRA[sid]:
            out[f"elec_{sid.lower()}_6w_at{start}"] = (s.iloc[start : start + 42 * 48], 48, "30min")
    g = load_glucose()[["unique_id", "ds", "y"]]
    for start in EXTRA["glucose"]:
        out[f"glucose_3w_at{start}"] = (g.iloc[start : start + 21 * 288], 288, "5min")
    sst = load_sea_surface_temperature()
    for start in EXTRA["sst"]:
        out[f"sst_8w_at{start}"] = (sst.iloc[start : start + 56 * 48], 48, "30min")
    w = load_tmy_weather()
    for ch in ("temp_air", "ghi", "wind_speed", "relative_humidity"):
        s = w[w["unique_id"] == ch][["unique_id", "ds", "y"]]
        for start in EXTRA[ch] if len(s) else ():
            out[f"tmy_{ch}_8w_at{start}"] = (s.iloc[start : start + 56 * 24], 24, "h")
    return out


def months_datasets() -> dict[str, tuple[pd.DataFrame, int, str]]:
    """12-week slices of half-hourly demand (``elec_demand_12w_at<start>``)."""
    try:
        e = load_electricity_demand()
    except ImportError:
        return {}
    s = e[e["unique_id"] == "Demand"][["unique_id", "ds", "y"]]
    return {
        f"elec_demand_12w_at{start}": (s.iloc[start : start + 84 * 48], 48, "30min")
        for start in (0, 3000, 6000, 9000, 12000, 13400)
    }


def datasets() -> dict[str, tuple[pd.DataFrame, int, str]]:
    """name -> (frame of one series with its history, horizon, pandas freq)."""
    out = {}
    sst = load_sea_surface_temperature()
    out["sst_8w"] = (sst.iloc[3000 : 3000 + 56 * 48], 48, "30min")
    g = load_glucose()[["unique_id", "ds", "y"]]
    out["glucose_3w"] = (g.iloc[20000 : 20000 + 21 * 288], 288, "5min")
    w = load_tmy_weather()
    for ch in ("temp_air", "ghi"):
        if ch in set(w["unique_id"]):
            s = w[w["unique_id"] == ch][["unique_id", "ds", "y"]]
            out[f"tmy_{ch}_8w"] = (s.iloc[4000 : 4000 + 56 * 24], 24, "h")
    if "temp_air" in set(w["unique_id"]):  # a second slice: spring, not summer
        s = w[w["unique_id"] == "temp_air"][["unique_id", "ds", "y"]]
        out["tmy_temp_air_8w_at1000"] = (s.iloc[1000 : 1000 + 56 * 24], 24, "h")
    try:
        e = load_electricity_demand()
    except ImportError:
        return out
    for sid, start in (("Demand", 5000), ("Temperature", 9000)):
        s = e[e["unique_id"] == sid][["unique_id", "ds", "y"]]
        out[f"elec_{sid.lower()}_6w"] = (s.iloc[start : start + 42 * 48], 48, "30min")
    # more slices of demand: one slice does not tell a better start from a lucky one
    s = e[e["unique_id"] == "Demand"][["unique_id", "ds", "y"]]
    for start in (0, 2000, 6000, 9000, 12000, 15000):
        out[f"elec_demand_6w_at{start}"] = (s.iloc[start : start + 42 * 48], 48, "30min")
    return out


def stats_peers(df, h, freq, n_windows, seasons, arima):
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoARIMA, AutoETS, Naive, SeasonalNaive

    short = seasons[0] if seasons and seasons[0] <= 24 else 1
    models = [
        AutoETS(season_length=short),
        SeasonalNaive(season_length=seasons[-1] if seasons else 1, alias="SeasonalNaive"),
        Naive(),
    ]
    if seasons:
        models.insert(0, MSTL(season_length=list(seasons)))
    if arima:
        models.append(AutoARIMA(season_length=short))
    filled = df.assign(y=df["y"].interpolate().bfill().ffill())
    sf = StatsForecast(models=models, freq=freq)
    start = time.perf_counter()
    cv = sf.cross_validation(df=filled, h=h, n_windows=n_windows, step_size=h)
    return cv, time.perf_counter() - start


def neural_peers(df, h, freq, n_windows, input_size):
    """NeuralForecast's NHITS and PatchTST on the same windows (gaps filled, as for the others)."""
    import logging

    from neuralforecast import NeuralForecast
    from neuralforecast.models import NHITS, PatchTST

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    common = dict(
        h=h,
        input_size=input_size,
        max_steps=500,
        windows_batch_size=64,
        val_check_steps=50,
        early_stop_patience_steps=5,
        random_seed=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    filled = df.assign(y=df["y"].interpolate().bfill().ffill())
    nf = NeuralForecast(models=[NHITS(**common), PatchTST(**common)], freq=freq)
    start = time.perf_counter()
    cv = nf.cross_validation(df=filled, n_windows=n_windows, step_size=h, val_size=h)
    return cv, time.perf_counter() - start


def score_peers(row: dict, cv: pd.DataFrame, y: np.ndarray, seconds: float) -> None:
    """MAE / MSE of each model column of a Nixtla backtest frame, on the truth's finite steps."""
    ok = np.isfinite(y)
    models = [c for c in cv.columns if c not in ("unique_id", "ds", "cutoff", "y")]
    for m in models:
        err = cv[m].to_numpy() - y
        row[m] = {
            "mae": float(np.abs(err)[ok].mean()),
            "mse": float((err**2)[ok].mean()),
            "seconds": seconds / len(models),
        }


def backtest(fc: Forecaster, df: pd.DataFrame, h: int, n_windows: int) -> pd.DataFrame:
    """Fit once before the first window, then forecast each window from its true history.

    The same forecasts as ``cross_validation(refit=False)``, with the fitted estimator kept, so
    the start it chose (``start_``) and what validation kept (``selected_``) can be recorded.
    """
    n_train = len(df) - n_windows * h
    fc.fit(df.iloc[:n_train])
    parts = []
    for k in range(n_windows):
        end = n_train + k * h
        pred = fc.predict(df=df.iloc[:end])
        pred["y"] = df["y"].to_numpy()[end : end + h]
        parts.append(pred)
    return pd.concat(parts, ignore_index=True)


def _param(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value) if value[:1] in "0123456789[-nt" else value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--arima", action="store_true")
    p.add_argument("--neural", action="store_true", help="add NHITS and PatchTST to existing rows")
    p.add_argument("--set", choices=("table", "extra", "months", "all"), default="table")
    p.add_argument(
        "--param", nargs="*", type=_param, help="Forecaster settings, e.g. max_steps=200 val_size=0"
    )
    p.add_argument("--out", default="forecast_peers_cpu.json", help="file under benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out_path = RESULTS / args.out
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": {}}
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "cpu",
    )
    meta = {
        "device": f"{cpu} (CPU, 1 torch thread)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "windows": args.windows,
        "params": dict(args.param or []),
    }
    if args.neural:  # the other models' provenance stays as it was
        from importlib.metadata import version

        meta = {
            **results.get("meta", {}),
            "neural": {**meta, "neuralforecast": version("neuralforecast")},
        }
    results["meta"] = meta
    data, sets = {}, {}
    for which, make in (
        ("table", datasets),
        ("extra", extra_datasets),
        ("months", months_datasets),
    ):
        if args.set in (which, "all"):
            part = make()
            data.update(part)
            sets.update(dict.fromkeys(part, which))
    for name, (df, h, freq) in data.items():
        if args.only and name not in args.only:
            continue
        df = df.reset_index(drop=True)
        n_train = len(df) - args.windows * h
        if args.neural:
            row = results["rows"].get(name)
            if row is None:
                continue
            ncv, t_nf = neural_peers(df, h, freq, args.windows, row["look_back"])
            score_peers(row, ncv, df["y"].to_numpy()[n_train:], t_nf)
            out_path.write_text(json.dumps(results, indent=1))
            print(name, {m: round(row[m]["mae"], 4) for m in ("NHITS", "PatchTST")}, flush=True)
            continue
        seasons = detect_seasonalities(  # MSTL's, as the fit's
            df["y"].to_numpy()[:n_train], calendar=calendar_periods(freq)
        )
        start = time.perf_counter()
        fc = Forecaster(h=h, random_state=0, device="cpu", verbose=False)  # input_size=None
        fc.set_params(**dict(args.param or []))
        cv = backtest(fc, df, h, args.windows)  # what cross_validation(refit=False) does
        t_fc = time.perf_counter() - start
        L = fc.input_size_
        scv, t_sf = stats_peers(df, h, freq, args.windows, seasons, args.arima)
        y = cv["y"].to_numpy()
        ok = np.isfinite(y)
        row = {"h": h, "look_back": L, "seasons": list(seasons), "steps": len(df)}
        row["set"] = sets[name]
        alpha = getattr(fc.model_, "skip_alpha_", None)  # the ridge penalty; inf: the start alone
        row["fit"] = {
            "start": fc.start_,
            "penalty": None if alpha is None else str(alpha),
            "selected": fc.selected_,
            "val_size": fc.val_size_,
            "statistical_weight": fc.statistical_weight_,
        }
        row["Forecaster"] = {
            "mae": float(np.abs(cv["Forecaster"].to_numpy() - y)[ok].mean()),
            "mse": float(((cv["Forecaster"].to_numpy() - y) ** 2)[ok].mean()),
            "seconds": t_fc,
        }
        score_peers(row, scv, y, t_sf)  # the same steps (the peers' frame has gaps filled)
        results["rows"][name] = row
        out_path.write_text(json.dumps(results, indent=1))
        print(
            name,
            row["fit"],
            {k: round(v["mae"], 4) for k, v in row.items() if isinstance(v, dict) and "mae" in v},
            flush=True,
        )
    print_table(results)


def print_table(results: dict) -> None:
    models = ["Forecaster", "MSTL", "AutoETS", "SeasonalNaive", "Naive", "AutoARIMA", "NHITS"]
    models.append("PatchTST")
    print("\n| series | h | seasons | look-back | " + " | ".join(models) + " |")
    print("|---" * (4 + len(models)) + "|")
    for name, row in results["rows"].items():
        cells = [f"{row[m]['mae']:.4g}" if m in row else "-" for m in models]
        seasons = ",".join(map(str, row["seasons"])) or "none"
        print(
            f"| {name} | {row['h']} | {seasons} | {row['look_back']} | " + " | ".join(cells) + " |"
        )
    ratios = {
        name: row["Forecaster"]["mae"] / row["MSTL"]["mae"]
        for name, row in results["rows"].items()
        if "MSTL" in row
    }
    if ratios:
        geo = float(np.exp(np.mean(np.log(list(ratios.values())))))
        wins = sum(r < 1 for r in ratios.values())
        print(
            f"\nForecaster / MSTL MAE: geometric mean {geo:.3f}, MSTL beaten on {wins} of "
            f"{len(ratios)} rows"
        )


if __name__ == "__main__":
    main()
