"""The ``seqtensor`` command line, run as a subprocess as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pandas as pd
import pytest

FAST = [
    "--input-size",
    "24",
    "--max-steps",
    "3",
    "--patch-len",
    "8",
    "--d-model",
    "16",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--device",
    "cpu",
    "--quiet",
]


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "seqtensor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def long_frame(n=120):
    t = pd.date_range("2021-01-01", periods=n, freq="h")
    return pd.concat(
        [
            pd.DataFrame({"unique_id": sid, "ds": t, "y": k + np.sin(np.arange(n) / 3.8)})
            for k, sid in enumerate(["a", "b"])
        ],
        ignore_index=True,
    )


def test_console_script_is_declared():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "seqtensor"]
    assert script.value == "seqtensor.cli:main"


def test_forecast_long_csv_with_intervals_and_plot(tmp_path):
    long_frame().to_csv(tmp_path / "data.csv", index=False)
    run = cli(
        "forecast",
        tmp_path / "data.csv",
        "--h",
        6,
        "--level",
        80,
        "--out",
        tmp_path / "fc.csv",
        "--plot",
        tmp_path / "fc.png",
        *FAST,
    )
    assert run.returncode == 0, run.stderr
    out = pd.read_csv(tmp_path / "fc.csv", parse_dates=["ds"])
    assert list(out.columns) == [
        "unique_id",
        "ds",
        "Forecaster",
        "Forecaster-lo-80",
        "Forecaster-hi-80",
    ]
    expected = pd.date_range("2021-01-06 00:00", periods=6, freq="h")  # after 120 hourly steps
    for sid in ("a", "b"):
        assert list(out.loc[out.unique_id == sid, "ds"]) == list(expected)
    assert np.isfinite(out.drop(columns=["unique_id", "ds"]).to_numpy()).all()
    assert (tmp_path / "fc.png").read_bytes()[:4] == b"\x89PNG"


def test_wide_parquet_backtest_to_stdout(tmp_path):
    pytest.importorskip("pyarrow")
    wide = long_frame().pivot(index="ds", columns="unique_id", values="y").reset_index()
    wide.columns = ["when", "north", "south"]
    wide.to_parquet(tmp_path / "wide.parquet")
    run = cli(
        "backtest",
        tmp_path / "wide.parquet",
        "--h",
        6,
        "--n-windows",
        2,
        "--refit",
        1,
        "--time-col",
        "when",
        *FAST,
    )
    assert run.returncode == 0, run.stderr
    from io import StringIO

    cv = pd.read_csv(StringIO(run.stdout), parse_dates=["when", "cutoff"])
    assert list(cv.columns) == ["unique_id", "when", "cutoff", "y", "Forecaster"]
    assert sorted(cv["unique_id"].unique()) == ["north", "south"]
    assert cv["cutoff"].nunique() == 2
    # the truth column is the file's values at those stamps
    truth = wide.set_index("when")
    for _, row in cv.sample(5, random_state=0).iterrows():
        assert row["y"] == pytest.approx(truth.loc[row["when"], row["unique_id"]])
    mae = (cv["y"] - cv["Forecaster"]).abs().mean()
    assert f"MAE {mae:.6g}" in run.stderr


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["missing.csv"], "missing.csv: no such file"),
        (lambda p: p.write_text("x"), ["data.xlsx"], "unknown file type"),
        (
            lambda p: long_frame().to_csv(p, index=False),
            ["data.csv", "--target-col", "sales"],
            "missing columns ['sales']",
        ),
        (
            lambda p: long_frame().assign(y="high").to_csv(p, index=False),
            ["data.csv"],
            "column 'y' must be numeric",
        ),
        (
            lambda p: long_frame().assign(ds="soon").to_csv(p, index=False),
            ["data.csv"],
            "the time column 'ds' is not dates",
        ),
    ],
)
def test_bad_files_and_columns_give_one_clear_line(tmp_path, make, args, message):
    if make is not None:
        make(tmp_path / args[0])
    run = cli("forecast", *args, "--h", 6, *FAST, cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_warnings_are_one_line_each(tmp_path):
    df = long_frame()
    df.loc[[3, 4], "y"] = np.nan
    df.to_csv(tmp_path / "data.csv", index=False)
    run = cli("forecast", tmp_path / "data.csv", "--h", 6, "--out", tmp_path / "fc.csv", *FAST)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "missing target values" in line]
    assert len(lines) == 1 and lines[0].startswith("seqtensor forecast: warning: fit: 2 missing")


def test_integer_time_steps_and_an_int_freq(tmp_path):
    df = long_frame().assign(ds=lambda d: d.groupby("unique_id").cumcount() * 5)
    df.to_csv(tmp_path / "steps.csv", index=False)
    run = cli(
        "forecast",
        tmp_path / "steps.csv",
        "--h",
        4,
        "--freq",
        5,
        "--out",
        tmp_path / "fc.parquet" if _has_pyarrow() else tmp_path / "fc.csv",
        *FAST,
    )
    assert run.returncode == 0, run.stderr
    out_path = tmp_path / ("fc.parquet" if _has_pyarrow() else "fc.csv")
    out = pd.read_parquet(out_path) if _has_pyarrow() else pd.read_csv(out_path)
    assert list(out.loc[out.unique_id == "a", "ds"]) == [600, 605, 610, 615]  # 120 steps of 5


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
