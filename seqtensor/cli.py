"""The ``seqtensor`` command: forecast or backtest a CSV / Parquet file with the ``Forecaster``.

    seqtensor forecast data.csv --h 48 [--freq h] [--level 80 95] --out forecast.csv --plot
    forecast.png seqtensor backtest data.parquet --h 48 --n-windows 3 [--refit 2] --out backtest.csv

The file is long (one row per series and step: ``unique_id``, ``ds``, ``y``, or the names given
with ``--id-col`` / ``--time-col`` / ``--target-col``) or wide (a time column, then one numeric
column per series). Output frames are long, in Nixtla's layout (``unique_id, ds, Forecaster``
and ``Forecaster-lo-80`` / ``-hi-80`` interval columns), written as CSV or Parquet by the
extension of ``--out`` (stdout as CSV without ``--out``). Bad files or columns exit with status 2
and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "read_frame"]

_PARQUET = (".parquet", ".pq")


class CliError(Exception):
    """A problem with the user's files or options: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqtensor",
        description="Forecast long time series with tensorized attention (the Forecaster).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("forecast", "fit on the whole file and forecast the h steps after each series"),
        ("backtest", "rolling-origin backtest: forecast the last n_windows windows of h steps"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "data", help="CSV (.csv, .csv.gz) or Parquet (.parquet) file, long or wide"
        )
        sub.add_argument("--h", type=int, required=True, help="forecast horizon (steps)")
        sub.add_argument(
            "--freq",
            help="pandas frequency ('h', 'D', 'B', 'MS', ...) or an int step; inferred if absent",
        )
        sub.add_argument("--level", type=float, nargs="+", help="prediction intervals, e.g. 80 95")
        sub.add_argument("--out", help="output file (.csv or .parquet); stdout (CSV) if absent")
        sub.add_argument("--plot", help="save a plot of the forecasts (.png, .pdf, .svg)")
        sub.add_argument("--id-col", default="unique_id", help="series id column (long files)")
        sub.add_argument("--time-col", default="ds", help="time column")
        sub.add_argument("--target-col", default="y", help="target column (long files)")
        sub.add_argument(
            "--input-size",
            type=int,
            help="look-back in steps (default: whole cycles of the detected seasons, "
            "as Forecaster(input_size=None) chooses)",
        )
        sub.add_argument("--max-steps", type=int, default=500, help="training steps")
        sub.add_argument("--patch-len", type=int, default=16, help="steps per token")
        sub.add_argument("--d-model", type=int, default=64, help="encoder width")
        sub.add_argument("--n-layers", type=int, default=2, help="encoder depth")
        sub.add_argument("--n-heads", type=int, default=4, help="attention heads")
        sub.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
        sub.add_argument("--seed", type=int, default=0, help="random seed")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "backtest":
            sub.add_argument("--n-windows", type=int, default=1, help="windows to forecast")
            sub.add_argument("--step-size", type=int, help="steps between windows (default h)")
            sub.add_argument(
                "--refit",
                type=int,
                default=0,
                help="refit every k windows (0: fit once, before the first window)",
            )
    return parser


def read_frame(path: str | Path, id_col: str, time_col: str, target_col: str) -> Any:
    """Read a long or wide CSV / Parquet file into what ``Forecaster.fit`` takes.

    Long (``id_col``, ``time_col``, ``target_col`` present): as is, with the time column parsed.
    Wide: ``time_col`` (or else the first column) becomes a DatetimeIndex, every other column a
    series.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    name = path.name.lower()
    try:
        if name.endswith(_PARQUET):
            df = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".txt")):
            df = pd.read_csv(path)
        else:
            raise CliError(f"{path}: unknown file type; use .csv, .csv.gz or .parquet")
    except ImportError as err:
        raise CliError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow): {err}"
        ) from err
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise CliError(f"{path}: cannot be read as {path.suffix[1:]}: {err}") from err
    if len(df) == 0:
        raise CliError(f"{path}: the file has no rows")
    if id_col in df.columns or target_col in df.columns:  # long
        missing = [c for c in (id_col, time_col, target_col) if c not in df.columns]
        if missing:
            raise CliError(
                f"{path}: missing columns {missing} (it has {list(df.columns)}); name them with "
                f"--id-col / --time-col / --target-col"
            )
        return df.assign(**{time_col: _parse_time(df[time_col], path)})
    time = time_col if time_col in df.columns else df.columns[0]
    series = [c for c in df.columns if c != time]
    if not series:
        raise CliError(f"{path}: a wide file needs a time column and one column per series")
    wide = df.set_index(pd.DatetimeIndex(_parse_time(df[time], path), name=time_col))[series]
    bad = [c for c in series if not pd.api.types.is_numeric_dtype(wide[c])]
    if bad:
        raise CliError(
            f"{path}: read as a wide file (time column {time!r}, no {id_col!r} / {target_col!r} "
            f"columns), but the columns {bad[:5]} are not numeric"
        )
    wide.columns = [str(c) for c in wide.columns]
    return wide


def _parse_time(values: Any, path: Path) -> Any:
    import pandas as pd

    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    try:
        return pd.to_datetime(values)
    except (ValueError, TypeError) as err:
        raise CliError(f"{path}: the time column {values.name!r} is not dates: {err}") from err


def _long(df: Any, id_col: str, time_col: str, target_col: str) -> Any:
    """The long form of a frame ``read_frame`` returned (for plots)."""
    if id_col in getattr(df, "columns", ()):
        return df
    long = df.melt(ignore_index=False, var_name=id_col, value_name=target_col)
    return long.rename_axis(time_col).reset_index()


def _write(frame: Any, out: str | None) -> None:
    if out is None:
        frame.to_csv(sys.stdout, index=False)
        return
    path = Path(out)
    if path.name.lower().endswith(_PARQUET):
        try:
            frame.to_parquet(path, index=False)
        except ImportError as err:
            raise CliError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow)") from err
    else:
        frame.to_csv(path, index=False)


def _run(args: argparse.Namespace) -> None:
    for name in ("h", "max_steps", "patch_len", "input_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.freq is not None and args.freq.isdigit():  # integer time steps take an int step
        args.freq = int(args.freq)
    df = read_frame(args.data, args.id_col, args.time_col, args.target_col)
    from .adapters.forecast import Forecaster  # after the file checks: torch takes seconds

    cols = dict(id_col=args.id_col, time_col=args.time_col, target_col=args.target_col)
    fc = Forecaster(
        h=args.h,
        input_size=args.input_size,
        patch_len=args.patch_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        max_steps=args.max_steps,
        loss="quantile" if args.level else "mae",
        level=args.level,
        random_state=args.seed,
        device=args.device,
        verbose=not args.quiet,
    )
    if args.command == "forecast":
        fc.fit(df, freq=args.freq, **cols)
        result = fc.predict()
    else:
        result = fc.cross_validation(
            df,
            n_windows=args.n_windows,
            step_size=args.step_size,
            refit=args.refit if args.refit > 0 else False,
            freq=args.freq,
            **cols,
        )
        errors = result[args.target_col] - result[fc.model_name]
        print(
            f"{fc.model_name}: MAE {errors.abs().mean():.6g}  MSE {(errors**2).mean():.6g}  "
            f"({result['cutoff'].nunique()} cutoffs, {len(result)} forecasts)",
            file=sys.stderr,
        )
    _write(result, args.out)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window
        if args.command == "forecast":
            fig = fc.plot(_long(df, **cols), result)
        else:
            from .adapters.forecast.persistence import plot_forecast

            fig = plot_forecast(_long(df, **cols), result, model=fc.model_name, **cols)
        fig.savefig(args.plot, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seqtensor`` console script; returns the exit status."""
    args = _parser().parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"seqtensor {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # one line per warning, not the library's source line
            warnings.showwarning = show
            _run(args)
    except CliError as err:
        print(f"seqtensor {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError) as err:  # the library's checks name the problem
        message = err.args[0] if err.args else repr(err)
        print(f"seqtensor {args.command}: error: {args.data}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
