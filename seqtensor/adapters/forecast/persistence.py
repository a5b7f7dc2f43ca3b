"""Saving, loading and plotting a ``Forecaster``.

A saved forecaster is a folder of two files, readable without unpickling any code:

- ``forecaster.json``: the estimator's parameters, the network config, column names, series ids,
  frequency, scalers, exogenous / static statistics and the fit report;
- ``state.pt``: plain tensors only (network weights and the look-back kept for ``predict``), read
  back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..._validation import check
from ...core.folds import fold_from_dict, fold_to_dict
from ...train.checkpoint import atomic_save, atomic_write_text
from ...train.distributed import resolve_device
from .model import ForecastModelConfig
from .panel import Panel, freq_from_json, freq_to_json

__all__ = ["save_forecaster", "load_forecaster", "plot_forecast"]

FORMAT = "seqtensor.forecaster/1"
CONFIG, STATE = "forecaster.json", "state.pt"


def _stamp_to_json(ts: Any) -> Any:
    if isinstance(ts, (int, np.integer)):
        return int(ts)
    return {"iso": ts.isoformat(), "tz": None if ts.tz is None else str(ts.tz)}


def _stamp_from_json(value: Any) -> Any:
    if isinstance(value, int):
        return value
    ts = pd.Timestamp(value["iso"])
    return ts if value["tz"] is None else ts.tz_convert(value["tz"])


def _json_id(x: Any) -> Any:
    check(
        isinstance(x, (str, int)) and not isinstance(x, bool),
        f"series id {x!r} ({type(x).__name__}) cannot be saved: save needs str or int ids",
        TypeError,
    )
    return x


def _floats(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=float)]


def save_forecaster(est, path: str | Path) -> Path:
    """Write a fitted forecaster to the folder ``path`` (created if needed)."""
    est._check_fitted()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    params = est.get_params()
    if params["fold"] is not None:
        params["fold"] = fold_to_dict(params["fold"])
    if params["quantiles"] is not None:
        params["quantiles"] = [float(q) for q in params["quantiles"]]
    panel = est.panel_
    static = getattr(est, "static_table_", None)
    meta = {
        "format": FORMAT,
        "params": params,
        "model_config": est.model_config_.to_dict(),
        "columns": est.columns_,
        "ids": [_json_id(i) for i in est.ids_],
        "freq": freq_to_json(est.freq_),
        "scaler": {"mean": _floats(est.scaler_["mean"]), "std": _floats(est.scaler_["std"])},
        "futr_cols": est.futr_cols_,
        "hist_cols": est.hist_cols_,
        "exog_stats": {
            k: _floats(getattr(est, k))
            for k in ("futr_mean_", "futr_std_", "hist_mean_", "hist_std_")
        },
        "static": {
            "cols": est.static_cols_,
            "ids": [] if static is None else [_json_id(i) for i in static.index],
            "values": [] if static is None else static.to_numpy(float).tolist(),
            "mean": _floats(getattr(est, "static_mean_", [])),
            "std": _floats(getattr(est, "static_std_", [])),
        },
        "panel_starts": [_stamp_to_json(s) for s in panel.starts],
        "missing_report": est.missing_report_.to_dict(orient="list"),
        "fit_time": est.fit_time_,
    }
    state = {
        "model": {k: v.detach().cpu() for k, v in est.model_.state_dict().items()},
        "panel_y": [torch.from_numpy(v.copy()) for v in panel.y],
        "panel_futr": [torch.from_numpy(v.copy()) for v in panel.futr],
        "panel_hist": [torch.from_numpy(v.copy()) for v in panel.hist],
    }
    atomic_save(state, folder / STATE)
    atomic_write_text(json.dumps(meta, indent=1, default=float), folder / CONFIG)
    return folder


def load_forecaster(cls, path: str | Path, device: str | None = None):
    """Read a folder written by ``save_forecaster`` into a fitted ``cls`` instance."""
    folder = Path(path)
    check(
        (folder / CONFIG).is_file() and (folder / STATE).is_file(),
        f"{folder} is not a saved forecaster: expected {CONFIG} and {STATE} in it",
        FileNotFoundError,
    )
    meta = json.loads((folder / CONFIG).read_text())
    check(
        meta.get("format") == FORMAT,
        f"{folder}: unknown format {meta.get('format')!r}, expected {FORMAT!r}",
    )
    params = dict(meta["params"])
    if isinstance(params.get("fold"), dict):
        fold = fold_from_dict(params["fold"])
        params["fold"] = fold
    if device is not None:
        params["device"] = device
    h, input_size = params.pop("h"), params.pop("input_size")
    est = cls(h, input_size, **params)
    state = torch.load(folder / STATE, weights_only=True, map_location="cpu")
    est.model_config_ = ForecastModelConfig.from_dict(meta["model_config"])
    est.model_ = est._build_fitted_model(est.model_config_)
    est.model_.load_state_dict(state["model"])
    est.model_.to(resolve_device(est.device)).eval()
    est.columns_ = meta["columns"]
    est.ids_ = meta["ids"]
    est.freq_ = freq_from_json(meta["freq"])
    est.scaler_ = pd.DataFrame(meta["scaler"], index=pd.Index(est.ids_, name="unique_id"))
    est.futr_cols_, est.hist_cols_ = meta["futr_cols"], meta["hist_cols"]
    for key, values in meta["exog_stats"].items():
        setattr(est, key, np.array(values, dtype=float))
    st = meta["static"]
    est.static_cols_ = st["cols"]
    if st["cols"]:
        est.static_table_ = pd.DataFrame(st["values"], index=st["ids"], columns=st["cols"])
        est.static_mean_, est.static_std_ = np.array(st["mean"]), np.array(st["std"])
    numpy = lambda key: [t.numpy() for t in state[key]]  # noqa: E731
    est.panel_ = Panel(
        est.ids_,
        [_stamp_from_json(s) for s in meta["panel_starts"]],
        est.freq_,
        numpy("panel_y"),
        numpy("panel_futr"),
        numpy("panel_hist"),
        tuple(est.futr_cols_),
        tuple(est.hist_cols_),
    )
    est.missing_report_ = pd.DataFrame(meta["missing_report"])
    est.fit_time_ = meta["fit_time"]
    est.history_ = []
    return est


def plot_forecast(
    df: pd.DataFrame,
    forecast: pd.DataFrame,
    *,
    model: str,
    id_col: str = "unique_id",
    time_col: str = "ds",
    target_col: str = "y",
    history: int | None = None,
    max_series: int = 4,
    ax=None,
):
    """Plot history, point forecast and quantile bands (pairs q, 1 - q) of up to ``max_series`` series.

    Returns the matplotlib Figure. Needs matplotlib (``pip install seqtensor[plot]``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # optional dependency
        raise ImportError(
            "plot needs matplotlib: pip install matplotlib (or seqtensor[plot])"
        ) from err
    ids = list(pd.unique(forecast[id_col]))[:max_series]
    if ax is None:
        fig, axes = plt.subplots(len(ids), 1, figsize=(10, 2.8 * len(ids)), squeeze=False)
        axes = axes[:, 0]
    else:
        check(len(ids) == 1, "ax= is for a single series; pass max_series=1")
        axes, fig = [ax], ax.figure
    prefix = f"{model}-q"
    levels = sorted(float(c[len(prefix) :]) for c in forecast.columns if c.startswith(prefix))
    for axis, sid in zip(axes, ids):
        fc = forecast[forecast[id_col] == sid]
        past = df[df[id_col] == sid].sort_values(time_col)
        if history is not None:
            past = past.iloc[-history:]
        axis.plot(past[time_col], past[target_col], color="0.3", lw=1, label="history")
        for q in levels:
            if q < 0.5 and 1 - q in levels:
                lo, hi = fc[f"{prefix}{q:g}"], fc[f"{prefix}{1 - q:g}"]
                axis.fill_between(
                    fc[time_col],
                    lo,
                    hi,
                    color="C0",
                    alpha=0.15 + 0.15 * (q > 0.2),
                    label=f"{round(100 * (1 - 2 * q))}% interval",
                )
        axis.plot(fc[time_col], fc[model], color="C0", lw=1.5, label=model)
        if "y" in fc.columns and "cutoff" in fc.columns:
            axis.plot(fc[time_col], fc["y"], color="C1", lw=1, label="actual")
        axis.set_title(str(sid))
        axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
