"""Time a Forecaster's first fit in a fresh process, tensorized against full attention.

Each run is a new Python process fitting ``Forecaster(h=48, input_size=512, max_steps=20)`` on
the vendored sea-surface temperature, then fitting a second, identical forecaster in the same
process. first - second is what the process paid once: kernel compilation (Triton for tensorized
attention; none for full attention on flash attention), CUDA context and cuBLAS setup. Runs go in
the order tensorized, full, tensorized, full, so the second tensorized process finds Triton's
on-disk cache warm (a user's second session).

Run: ``python benchmarks/forecast_first_fit.py --device cuda``; results in
benchmarks/results/forecast_first_fit_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = """
import json, time, warnings
import torch
from seqtensor.adapters.forecast import Forecaster
from seqtensor.datasets.timeseries import load_sea_surface_temperature

warnings.simplefilter("ignore")
df = load_sea_surface_temperature().iloc[:4000]
times = []
for _ in range(2):
    t0 = time.perf_counter()
    Forecaster(h=48, input_size=512, max_steps=20, val_size=0, attention={attention!r},
               device={device!r}, verbose=False, random_state=0).fit(df)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. the tuning mode)")
    args = p.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for attention in ("tensorized", "full"):
            code = CHILD.format(attention=attention, device=args.device)
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            first, second = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "round": round_,
                    "attention": attention,
                    "first_fit_s": first,
                    "second_fit_s": second,
                    "once_s": first - second,
                    "process_s": time.perf_counter() - t0,
                }
            )
            print(rows[-1], flush=True)
    import torch

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tag = f"_{args.tag}" if args.tag else ""
    out = RESULTS / f"forecast_first_fit_{name.split()[1].lower()}{tag}.json"
    env = {k: os.environ.get(k) for k in ("SEQTENSOR_AUTOTUNE", "TRITON_CACHE_DIR")}
    out.write_text(
        json.dumps({"device": name, "torch": torch.__version__, "env": env, "rows": rows}, indent=1)
    )
    print(f"results in {out}")


if __name__ == "__main__":
    main()
