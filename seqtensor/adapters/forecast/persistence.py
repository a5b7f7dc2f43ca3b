"""Saving, loading and plotting a ``Forecaster``.

A saved forecaster is a folder of two files, readable without unpickling any code:

- ``forecaster.json``: the manifest: the estimator's parameters, the network config, column
  names, series ids, frequency, scalers, exogenous / static statistics, the fit report, and the
  size and SHA-256 of ``state.pt``;
- ``state.pt``: plain tensors only (network weights and the look-back kept for ``predict``), read
  back with ``torch.load(weights_only=True)``.

Integrity: ``load`` checks the hash, so a torn write, a ``state.pt`` from another save or a
corrupted file fails with an error naming the problem, and it rejects non-finite weights. A save
is written to a fresh folder beside the target and renamed into place; an existing save is
moved aside first and deleted after, so a folder never mixes two saves, and the leftovers of an
interrupted save (``.<name>.tmp-*`` / ``.<name>.old-*`` folders) are removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..._validation import check
from ...core.folds import fold_from_dict, fold_to_dict
from ...train.checkpoint import pid_alive
from ...train.distributed import resolve_device
from .model import ForecastModelConfig
from .panel import Panel, freq_from_json, freq_to_json

__all__ = ["save_forecaster", "load_forecaster", "plot_forecast"]

FORMAT = "seqtensor.forecaster/2"
FORMAT_V1 = "seqtensor.forecaster/1"  # before the manifest hash: loaded unchecked, with a warning
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
    # NumPy scalars (a grid search's np.int64) would come back as floats through JSON
    params = {k: v.item() if isinstance(v, np.generic) else v for k, v in est.get_params().items()}
    if params["level"] is not None:
        params["level"] = [float(v) for v in params["level"]]
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
        "statistical": {
            "weight": float(est.statistical_weight_),
            "seasons": [int(p) for p in est.statistical_seasons_],
        },
    }
    state = {
        "model": {k: v.detach().cpu() for k, v in est.model_.state_dict().items()},
        "panel_y": [torch.from_numpy(v.copy()) for v in panel.y],
        "panel_futr": [torch.from_numpy(v.copy()) for v in panel.futr],
        "panel_hist": [torch.from_numpy(v.copy()) for v in panel.hist],
    }
    _clean_leftovers(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        torch.save(state, tmp / STATE)
        meta["files"] = {
            STATE: {"bytes": (tmp / STATE).stat().st_size, "sha256": _sha256(tmp / STATE)}
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1, default=float))
        for name in (STATE, CONFIG):
            _fsync(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the save from the rest of a team
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the finished save ``tmp`` to ``folder``, moving an existing ``folder`` aside first."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    check(
        folder.is_dir() and (not any(folder.iterdir()) or (folder / CONFIG).is_file()),
        f"{folder} exists and is not a saved forecaster: refusing to replace it",
        FileExistsError,
    )
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{os.getpid()}-", dir=folder.parent))
    os.replace(folder, old / "save")  # a rename: the old save stays whole until the new one is in
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _clean_leftovers(folder: Path) -> None:
    """Remove temporary folders of earlier saves to ``folder`` whose process is gone."""
    parent = folder.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{folder.name}.{kind}-*"):
            pid = path.name[len(f".{folder.name}.{kind}-") :].split("-", 1)[0]
            if path.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def load_forecaster(cls, path: str | Path, device: str | None = None):
    """Read a folder written by ``save_forecaster`` into a fitted ``cls`` instance."""
    folder = Path(path)
    check(
        (folder / CONFIG).is_file() and (folder / STATE).is_file(),
        f"{folder} is not a saved forecaster: expected {CONFIG} and {STATE} in it",
        FileNotFoundError,
    )
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG} is corrupted (not valid JSON): {err}") from err
    check(
        isinstance(meta, dict) and meta.get("format") in (FORMAT, FORMAT_V1),
        f"{folder}: unknown format {meta.get('format') if isinstance(meta, dict) else None!r}, "
        f"expected {FORMAT!r}",
    )
    if meta["format"] == FORMAT_V1:
        warnings.warn(
            f"{folder} was saved without a hash of its weights, which cannot be checked; "
            f"save it again to add one",
            stacklevel=3,
        )
    expected = meta.get("files", {}).get(STATE, {})
    size = (folder / STATE).stat().st_size
    check(
        meta["format"] == FORMAT_V1
        or size == expected.get("bytes")
        and _sha256(folder / STATE) == expected.get("sha256"),
        f"{folder / STATE} does not match the manifest {CONFIG} ({size} bytes, expected "
        f"{expected.get('bytes')}; SHA-256 differs): the save is torn, corrupted, or the file "
        f"comes from another save. Save the model again",
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
    est.input_size_ = est.model_config_.input_size  # the look-back fit chose, when input_size=None
    est.seasons_ = tuple(est.model_config_.seasons)
    est.model_ = est._build_fitted_model(est.model_config_)
    bad = [
        k
        for k, v in state["model"].items()
        if torch.is_floating_point(v) and not torch.isfinite(v).all()
    ]
    check(
        not bad,
        f"{folder / STATE}: the weights {bad[:5]} hold NaN or inf values; the save is corrupted",
    )
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
    stat = meta.get("statistical", {"weight": 0.0, "seasons": []})  # older saves: no blend
    est.statistical_weight_ = float(stat["weight"])
    est.statistical_seasons_ = tuple(int(p) for p in stat["seasons"])
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
    """Plot history, point forecast and quantile bands (pairs q, 1 - q) of up to ``max_series``
    series.

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
    bands = _bands(forecast.columns, model)
    for axis, sid in zip(axes, ids):
        fc = forecast[forecast[id_col] == sid]
        past = df[df[id_col] == sid].sort_values(time_col)
        if history is not None:
            past = past.iloc[-history:]
        axis.plot(past[time_col], past[target_col], color="0.3", lw=1, label="history")
        for k, (level, lo, hi) in enumerate(bands):
            axis.fill_between(
                fc[time_col],
                fc[lo],
                fc[hi],
                color="C0",
                alpha=0.15 + 0.15 * (k == len(bands) - 1),
                label=f"{level:g}% interval",
            )
        axis.plot(fc[time_col], fc[model], color="C0", lw=1.5, label=model)
        if target_col in fc.columns and "cutoff" in fc.columns:
            axis.plot(fc[time_col], fc[target_col], color="C1", lw=1, label="actual")
        axis.set_title(str(sid))
        axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def _bands(columns, model: str) -> list[tuple[float, str, str]]:
    """(level, low column, high column) of every interval in ``columns``, widest first.

    Intervals are ``<model>-lo-<level>`` / ``<model>-hi-<level>`` pairs and symmetric quantile
    pairs ``<model>-q<q>`` / ``<model>-q<1 - q>`` (level 100 (1 - 2q)).
    """
    found: dict[float, tuple[str, str]] = {}
    for c in columns:
        if c.startswith(f"{model}-lo-") and f"{model}-hi-{c[len(model) + 4 :]}" in columns:
            found[float(c[len(model) + 4 :])] = (c, f"{model}-hi-{c[len(model) + 4 :]}")
    prefix = f"{model}-q"
    qs = {float(c[len(prefix) :]): c for c in columns if c.startswith(prefix)}
    for q, c in qs.items():
        match = [c2 for q2, c2 in qs.items() if q < 0.5 and abs(q2 - (1 - q)) < 1e-9]
        if match:
            found.setdefault(round(100 * (1 - 2 * q), 6), (c, match[0]))
    return [(lv, lo, hi) for lv, (lo, hi) in sorted(found.items(), reverse=True)]
