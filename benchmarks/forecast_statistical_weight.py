"""How the Forecaster's statistical weight is chosen, against the weight the test windows favour.

For each slice of ``forecast_peers.py`` (``--set table / extra / months``) or each seed of
``forecast_synthetic.py`` (``--set synth3`` / ``synth4``: weeks of history), the default Forecaster
is fit once before the test windows, exactly as those benchmarks do. The fit's window sets are
recorded as the weight is chosen: the MAE of weights 0 / 0.5 / 1 on the late held-out windows
(``late``), on all held-out windows (``val``) and on every window whose history holds as many
seasons as the series' end (``comp``), with ``free`` (the kept network is a closed-form start that
fits nothing). Then the test MAE of each weight (``test``) and the weight chosen (``chosen``).
Rules for the choice can then be compared offline on the same fits.

Run: ``python benchmarks/forecast_statistical_weight.py --set table`` (the data come from the two
benchmarks named; about a minute a slice on one CPU core); results merge into
benchmarks/results/forecast_statistical_weight_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import forecast_peers  # noqa: E402
import forecast_synthetic  # noqa: E402

from seqtensor.adapters.forecast import Forecaster  # noqa: E402
from seqtensor.adapters.forecast.model import forecast_loss  # noqa: E402
from seqtensor.adapters.forecast.windows import WindowDataset  # noqa: E402

WEIGHTS = (0.0, 0.5, 1.0)
RESULTS = Path(__file__).parent / "results" / "forecast_statistical_weight_cpu.json"


def blend_losses(fc: Forecaster, windows: WindowDataset | None) -> list[float] | None:
    """MAE of each weight's blend on ``windows`` (training scale)."""
    if windows is None or len(windows) == 0:
        return None
    data, g, t = windows.data, windows.g, windows.t
    net, stat = fc._network_windows(data, g, t), fc._statistical_windows(data, g, t)
    target = data.batch(g, t)["target"]
    return [
        float(forecast_loss(torch.from_numpy(fc._blend(net, stat, w)), target, "mae"))
        for w in WEIGHTS
    ]


def record_choice(record: dict) -> None:
    """Wrap ``Forecaster._weight_windows`` so each fit records its window sets' losses."""
    choose = Forecaster._weight_windows

    def spy(self, train, val, late):
        record.clear()
        record["late"], record["val"] = blend_losses(self, late), blend_losses(self, val)
        alpha = getattr(self.model_, "skip_alpha_", 0)
        record["free"] = bool(self.selected_[-1] == "start" and alpha == np.inf)
        if self.statistical_seasons_ and val is not None:
            comparable = self._comparable_windows(train, val)
            record["n_comp"] = len(comparable)
            record["comp"] = blend_losses(self, comparable)
        return choose(self, train, val, late)

    Forecaster._weight_windows = spy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, choices=("table", "extra", "months", "synth3", "synth4"))
    which = p.parse_args().set
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if which.startswith("synth"):
        weeks, n_windows = int(which[-1]), 5
        cases = {
            f"synth{weeks}w_s{seed}": (forecast_synthetic.series(seed, weeks), 48)
            for seed in range(6)
        }
    else:
        make = {
            "table": forecast_peers.datasets,
            "extra": forecast_peers.extra_datasets,
            "months": forecast_peers.months_datasets,
        }[which]
        cases = {name: (df, h) for name, (df, h, _) in make().items()}
        n_windows = 7
    record: dict = {}
    record_choice(record)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    results["meta"] = {
        "device": f"{platform.processor() or platform.machine()} (CPU, 1 torch thread)",
        "torch": torch.__version__,
    }
    for name, (df, h) in cases.items():
        df = df.reset_index(drop=True)
        n_train = len(df) - n_windows * h
        fc = Forecaster(h=h, random_state=0, device="cpu", verbose=False).fit(df.iloc[:n_train])
        row = {**record, "chosen": fc.statistical_weight_, "selected": fc.selected_, "test": []}
        y = df["y"].to_numpy()
        for w in WEIGHTS:
            fc.statistical_weight_ = w
            errors = []
            for k in range(n_windows):
                end = n_train + k * h
                pred = fc.predict(df=df.iloc[:end])["Forecaster"].to_numpy()
                e = np.abs(pred - y[end : end + h])
                errors.append(e[np.isfinite(e)])
            row["test"].append(float(np.concatenate(errors).mean()))
        results["rows"][name] = row
        RESULTS.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
