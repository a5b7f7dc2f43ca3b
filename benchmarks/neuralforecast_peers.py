"""Peer runs: NeuralForecast's PatchTST and NHITS under forecast.py's exact protocol.

Same data (Victoria electricity demand, sea-surface temperature), split, z-scoring, test windows
(stride 48 from the test border), validation slice and scoring as ``benchmarks/forecast.py`` (its
helpers are imported, not copied). Look-back 512 for both. PatchTST "paper settings" as in
docs/results.md: patch 16 / stride 8; the rest are NeuralForecast's PatchTST defaults (3 layers,
16 heads, d 128, FFN 256, dropout 0.2, RevIN, lr 1e-4, scaler "identity"). NHITS: NeuralForecast's
defaults. Both with MSE loss, at most 1,000 steps, validation every 100 steps, early stopping
patience 5, one seed:

    python benchmarks/neuralforecast_peers.py --models PatchTST NHITS --datasets electricity sst \
        --horizons 96 336 [--threads 2] [--check] [--windows-batch-size 32]

At NeuralForecast's default 1,024 windows per step a step took ~16 s on this CPU (about 4.5 h for
1,000 steps); the recorded results use 32 (the PatchTST paper's Electricity batch size), ~0.3 s a step.

``--check`` first compares the (unique_id, ds, cutoff) keys of NeuralForecast's cross_validation
with those of seqtensor's (a 5-step DLinearForecaster) on the same cut and stops if they differ.
Results merge into benchmarks/results/forecast_neuralforecast_cpu.json, keyed
``<dataset>|h=<h>|<model>|wbs=<windows per step>`` (the first PatchTST runs are in
forecast_patchtst_cpu.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import warnings
from importlib.metadata import version

import pandas as pd
import torch

# the script's own folder is on the path when it runs, so the sibling benchmark imports directly
from forecast import RESULTS, STRIDE, load, score, test_windows  # noqa: E402
from neuralforecast import NeuralForecast  # noqa: E402
from neuralforecast.losses.pytorch import MSE  # noqa: E402
from neuralforecast.models import NHITS, PatchTST  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

OUT = RESULTS / "forecast_neuralforecast_cpu.json"
MODELS = {"PatchTST": (PatchTST, dict(patch_len=16, stride=8)), "NHITS": (NHITS, {})}
SETTINGS = dict(
    input_size=512,
    max_steps=1000,
    val_check_steps=100,
    early_stop_patience_steps=5,
    random_seed=1,
)


class FitTimer(Callback):
    """Seconds spent in Lightning's fit (training plus validation checks) and the last step."""

    seen: dict = {}  # class-level: NeuralForecast may deep-copy the model and its callbacks

    def on_fit_start(self, trainer, module):
        FitTimer.seen["start"] = time.perf_counter()

    def on_fit_end(self, trainer, module):
        FitTimer.seen.update(
            seconds=time.perf_counter() - FitTimer.seen["start"], steps=trainer.global_step
        )


def keys(cv: pd.DataFrame) -> set:
    return set(
        zip(cv["unique_id"].astype(str), pd.to_datetime(cv["ds"]), pd.to_datetime(cv["cutoff"]))
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizons", nargs="+", type=int, default=[96, 336])
    p.add_argument("--models", nargs="+", default=["PatchTST"], choices=sorted(MODELS))
    p.add_argument("--datasets", nargs="+", default=["electricity"], choices=["electricity", "sst"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--check", action="store_true", help="compare window keys with seqtensor's first"
    )
    p.add_argument(
        "--windows-batch-size",
        type=int,
        default=1024,
        help="windows per step (NeuralForecast default 1024)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="5 training steps, nothing saved (for --check)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"accuracy": {}}
    settings = {
        **SETTINGS,
        "windows_batch_size": args.windows_batch_size,
        **({"max_steps": 5} if args.smoke else {}),
    }
    results["meta"] = {
        "device": "cpu",
        "threads": args.threads,
        "neuralforecast": version("neuralforecast"),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {**settings, "loss": "MSE", "other": "NeuralForecast defaults otherwise"},
    }
    for dataset, name, h in itertools.product(args.datasets, args.models, args.horizons):
        df, _, n_val, n_test = load(dataset)
        cut, n_windows = test_windows(df, n_test, h)
        # NeuralForecast refuses missing targets (sea-surface temperature has 24, all in the
        # training part): it gets them linearly interpolated; the scored test part has none
        filled = cut.assign(
            y=cut.groupby("unique_id")["y"].transform(
                lambda s: s.interpolate(limit_direction="both")
            )
        )
        cls, extra = MODELS[name]
        model = cls(
            h=h,
            loss=MSE(),
            valid_loss=MSE(),
            **settings,
            **extra,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[FitTimer()],
            default_root_dir="/tmp/neuralforecast_peer_logs",
        )
        nf = NeuralForecast(models=[model], freq="30min")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            cv = nf.cross_validation(filled, n_windows=n_windows, step_size=STRIDE, val_size=n_val)
            wall = time.perf_counter() - start
        cv = cv.reset_index() if "unique_id" not in cv.columns else cv
        if args.check:
            check_keys(cv, filled, h, n_windows, n_val)
        row = {
            "dataset": dataset,
            "h": h,
            "look_back": 512,
            "model": f"{name} (NeuralForecast)",
            "windows": n_windows,
            "cutoffs": int(cv["cutoff"].nunique()),
            "train_s": FitTimer.seen["seconds"],
            "wall_s": wall,
            "steps": FitTimer.seen["steps"],
            "windows_batch_size": args.windows_batch_size,
            **score(cv, name),
        }
        results["accuracy"][f"{dataset}|h={h}|{name}|wbs={args.windows_batch_size}"] = row
        print(
            f"{dataset} {name} h={h}: mse {row['mse']:.3f} mae {row['mae']:.3f} "
            f"({row['steps']} steps, train {row['train_s']:.0f} s, wall {wall:.0f} s)",
            flush=True,
        )
        if not args.smoke:
            OUT.write_text(json.dumps(results, indent=1, default=float))


def check_keys(cv: pd.DataFrame, cut: pd.DataFrame, h: int, n_windows: int, n_val: int) -> None:
    """Stop unless NeuralForecast's windows are seqtensor's (same keys, same targets)."""
    from seqtensor.adapters.forecast.baselines import DLinearForecaster

    ours = DLinearForecaster(h=h, input_size=512, loss="mse", max_steps=5, device="cpu")
    ours_cv = ours.cross_validation(cut, n_windows=n_windows, step_size=STRIDE, val_size=n_val)
    same = keys(cv) == keys(ours_cv) and len(cv) == len(ours_cv)
    order = ["unique_id", "cutoff", "ds"]
    y_diff = float(
        abs(
            cv.sort_values(order)["y"].to_numpy() - ours_cv.sort_values(order)["y"].to_numpy()
        ).max()
    )
    print(f"h={h}: {len(cv)} rows; keys equal to seqtensor's: {same}; max |y diff| {y_diff:.2e}")
    if not same or y_diff > 1e-9:
        sys.exit("window keys differ from seqtensor's cross_validation")


if __name__ == "__main__":
    main()
