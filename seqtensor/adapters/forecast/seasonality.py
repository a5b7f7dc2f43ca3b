"""Seasonal periods from data, and the seasonal-profile forecast the network starts from.

Legend: T steps of a series, L look-back, h horizon, p a seasonal period in steps.

- ``detect_seasonalities``: periods read off the autocorrelation function (ACF) of the detrended
  series. The first prominent ACF peak is the shortest season; a longer season is a multiple of it
  whose ACF stands above the neighbouring multiples (a week of half-hours, 336, stands above 288 and
  384 when weekdays differ from weekends). Given the data's clock (``calendar_periods``), peaks
  snap to the exact day or week in steps. This is the periodicity test of Hyndman and
  Athanasopoulos, FPP3 section 2.8 (https://otexts.com/fpp3/acf.html), made automatic.
- ``seasonal_profile_matrix``: the linear map (L, h) of a classical additive decomposition
  forecast, as MSTL's seasonal part does it (Bandara et al. 2021, https://arxiv.org/abs/2107.13462):
  level = mean of the last whole cycles of the longest season, each season's profile = the mean over
  its whole cycles in the look-back of what the shorter seasons left, and the forecast repeats
  level + profiles. Averaging over cycles is what beats the seasonal naive forecast on noisy data.
- ``mstl_matrix``: MSTL's forecast (Bandara et al. 2021) as a linear map: STL without robustness
  weights is a chain of fixed local regressions and moving averages, so each seasonal component
  is a matrix times the look-back (``mstl_components``, equal to statsmodels' STL as MSTL calls
  it); the forecast repeats each component's last cycle and adds a smoothed level.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

from ..._validation import check

__all__ = [
    "autocorrelation",
    "calendar_periods",
    "combined_start",
    "default_input_size",
    "detect_seasonalities",
    "mstl_components",
    "mstl_forecast",
    "mstl_matrix",
    "mstl_seasons",
    "seasonal_profile_matrix",
    "start_candidates",
    "trend_profile_matrix",
]

# The "profile_smooth" start: recent cycles weigh more in the profile (each older cycle 0.7x) and
# the level is smoothed with alpha 0.2. With it the default Forecaster's MAE relative to MSTL
# fell by 9% (geometric mean) over 10 real slices and rose on one (1.7%), see
# docs/forecasting_results.md; the two values were not tuned past a small grid.
PROFILE_DECAY = 0.7
LEVEL_ALPHA = 0.2
# The "profile_fast" start: the same profiles with a level that follows faster (alpha 0.5), as an
# ETS level fit to a drifting series does. With it (and the best-two combination, model.py) the
# chosen start's MAE relative to MSTL fell by 5% (geometric mean) over 32 real slices, 22 -> 23
# beaten (docs/forecasting_results.md).
FAST_LEVEL_ALPHA = 0.5
# An L x L ridge solve past this look-back costs more than it gives (the Forecaster then starts
# its linear map at zero), so the default look-back stays within it.
MAX_RIDGE_INPUT = 4096
# MSTL decomposes at most this many last steps of whole cycles of the longest season (a look-back
# for the "mstl" start, a whole history for the statistical forecast): MSTL fit on the last 3
# weeks of half-hourly demand scored as well as on all 5 (docs/forecasting_results.md).
MSTL_MAX_STEPS = 1344
# A season longer than half of MSTL_MAX_STEPS is decomposed from exactly two cycles, up to a week
# of 5-minute steps: on 3 weeks of 5-minute two-season data MSTL with the week scored 0.54x the
# MAE of MSTL without it (geometric mean of 3 seeds, benchmarks/forecast_mstl_week.py). Its map
# (4,032 steps) is the costliest one built, once per process and horizon
# (benchmarks/forecast_statistical_cost.py).
MSTL_LONGEST_SEASON = 2016
# The most steps of history the statistical forecast reads.
MSTL_HISTORY = max(MSTL_MAX_STEPS, 2 * MSTL_LONGEST_SEASON)
# Cycles of the longest season in the default look-back, most first: a week of a daily season
# (7) scored 5% better than 4 (MAE relative to MSTL over 32 slices); 10 helped hourly data and
# hurt 5-minute glucose.
LOOK_BACK_CYCLES = (7, 4, 3, 2)


def autocorrelation(y: np.ndarray, max_lag: int) -> np.ndarray:
    """ACF (max_lag + 1,) of a linearly detrended series; NaN are interpolated first."""
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    check(ok.sum() >= 3, "autocorrelation needs at least 3 observed values")
    t = np.arange(len(y))
    y = np.interp(t, t[ok], y[ok])  # gaps: straight lines, which add no false period
    y = y - np.polyval(np.polyfit(t, y, 1), t)
    n = len(y)
    spec = np.fft.rfft(y, 2 * n)  # zero-padded: a linear, not circular, correlation
    acf = np.fft.irfft(spec * np.conj(spec))[: max_lag + 1]
    return acf / acf[0] if acf[0] > 0 else np.zeros(max_lag + 1)


def calendar_periods(freq: object) -> tuple[int, ...]:
    """Steps per hour, day, week and year at a pandas frequency (those of at least 2 steps).

    A clock or calendar cycle has an exact length in steps, which the ACF peak only estimates: on
    5-minute data noise put the daily peak at 287 and the week at 2,009 steps, and a profile of 287
    steps drifts a step a day. ``detect_seasonalities(calendar=...)`` snaps peaks to these.
    Integer steps and frequencies pandas cannot measure give ().
    """
    if freq is None or isinstance(freq, (int, np.integer)):
        return ()
    try:
        offset = pd.tseries.frequencies.to_offset(freq)
    except (TypeError, ValueError):
        return ()
    name = offset.name.split("-")[0]
    n = max(int(getattr(offset, "n", 1)), 1)
    by_name = {"B": (5,), "C": (5,), "W": (52,), "MS": (12,), "ME": (12,), "M": (12,),
               "SMS": (24,), "SME": (24,), "QS": (4,), "QE": (4,), "Q": (4,)}  # fmt: skip
    if name in by_name:
        return tuple(p // n for p in by_name[name] if p % n == 0 and p // n >= 2)
    try:
        step = pd.Timedelta(offset).total_seconds()
    except (TypeError, ValueError):
        return ()
    cycles = (3600.0, 86400.0, 7 * 86400.0, 365 * 86400.0)
    return tuple(int(c // step) for c in cycles if step > 0 and c % step == 0 and c // step >= 2)


def _snap(period: int, calendar: Sequence[int]) -> int:
    """``period``, or the calendar period within 3% of it (under 17 steps: only an equal one)."""
    near = [c for c in calendar if abs(period - c) <= round(0.03 * c)]
    return min(near, key=lambda c: abs(period - c)) if near else period


def _peak_near(acf: np.ndarray, lag: int, tol: int) -> int:
    """The lag of the largest ACF value within ``tol`` of ``lag``."""
    lo, hi = max(lag - tol, 1), min(lag + tol, len(acf) - 1)
    return lo + int(np.argmax(acf[lo : hi + 1]))


def _stands_out(acf: np.ndarray, lag: int, p: int, tol: int, margin: float) -> bool:
    """Whether the ACF peak near ``lag`` exceeds the peaks one period ``p`` either side by
    ``margin``."""
    here = acf[_peak_near(acf, lag, tol)]
    side = max(acf[_peak_near(acf, lag - p, tol)], acf[_peak_near(acf, lag + p, tol)])
    return here - side > margin


def detect_seasonalities(
    y: np.ndarray | Sequence[np.ndarray],
    max_seasons: int = 2,
    min_cycles: int = 2,
    threshold: float = 0.2,
    calendar: Sequence[int] = (),
) -> tuple[int, ...]:
    """Seasonal periods (ascending, each a multiple of the one before) found in the ACF.

    Parameters
    ----------
    y : one series (T,) or several (their ACFs are averaged); NaN allowed.
    max_seasons : the most periods returned.
    min_cycles : a period needs this many whole cycles in the (longest) series.
    threshold : the ACF at a period must exceed this (and stand ``threshold / 4`` above the ACF
        half a period earlier) to count as a season.
    calendar : exact clock and calendar periods in steps (``calendar_periods(freq)``). The first
        period snaps to one within 3% of it. A longer season that is one of them is kept when it
        stands above its neighbouring multiples, even where the series is too short to show the
        second cycle the generic test asks for (a week in 2-4 weeks of data).

    Returns () when the series has no season (white noise, a random walk, a trend).
    """
    series = [np.asarray(y, float)] if np.ndim(y[0]) == 0 else [np.asarray(v, float) for v in y]
    series = [v for v in series if np.isfinite(v).sum() >= 8]
    check(bool(series), "detect_seasonalities needs a series with at least 8 observed values")
    check(
        isinstance(max_seasons, int) and max_seasons >= 0,
        f"max_seasons must be an int >= 0, got {max_seasons!r}",
    )
    check(
        isinstance(min_cycles, int) and min_cycles >= 1,
        f"min_cycles must be an int >= 1, got {min_cycles!r}",
    )
    max_lag = max(len(v) for v in series) // min_cycles
    if max_lag < 4 or max_seasons == 0:
        return ()
    acfs = [autocorrelation(v, max_lag) for v in series if len(v) // min_cycles >= 4]
    width = min(len(a) for a in acfs)
    acf = np.mean([a[:width] for a in acfs], 0)
    max_lag = width - 1
    # Prominent local maxima: above the threshold and above the trough half a period before.
    first = None
    for k in range(2, max_lag):
        if acf[k] >= acf[k - 1] and acf[k] >= acf[k + 1] and acf[k] > threshold:
            trough = acf[k // 2 : k].min()
            if acf[k] - trough > threshold / 4:
                first = k
                break
    if first is None:
        return ()
    # Noise moves a single peak by a step or two; the multiples of the true period line up, so
    # the period is the one whose first few multiples hold the most correlation.
    tol = max(1, first // 10)
    cands = range(max(2, first - tol), first + tol + 1)
    first = max(cands, key=lambda p: sum(acf[m * p] for m in range(1, min(5, max_lag // p) + 1)))
    seasons = [_snap(first, calendar)]
    while len(seasons) < max_seasons:
        p = seasons[-1]
        tol = max(1, p // 50)
        found = None
        for m in range(2, max_lag // p):  # candidates m * p
            if (m + 1) * p > max_lag:
                break
            here = _peak_near(acf, m * p, tol)
            before = acf[_peak_near(acf, (m - 1) * p, tol)]
            after = acf[_peak_near(acf, (m + 1) * p, tol)]
            if acf[here] > threshold and acf[here] - max(before, after) > threshold / 4:
                # A season repeats: where its second multiple fits, it must stand out there too
                # (a few-day weather spell shows one bump, a week shows one every week).
                if (2 * m + 1) * p > max_lag:
                    if m * p not in calendar:
                        continue
                elif not _stands_out(acf, 2 * m * p, p, tol, threshold / 8):
                    continue
                found = m * p  # an exact multiple: nested seasons stay aligned
                break
        if found is None:
            break
        seasons.append(found)
    return tuple(seasons)


def seasonal_profile_matrix(
    input_size: int,
    h: int,
    seasons: Sequence[int],
    level_cycles: int | None = None,
    cycle_decay: float = 1.0,
    level_alpha: float | None = None,
) -> np.ndarray:
    """W (L, h) with ``forecast = lookback @ W``: level plus seasonal profiles averaged over cycles.

    Seasons that do not fit one whole cycle in the look-back are dropped; with none left the map is
    the look-back mean (what a zero skip gives after instance normalization). ``level_cycles``:
    the level is the mean of this many last cycles of the longest season (default: all whole
    cycles in the look-back); 1 follows a drifting level sooner, at more noise. ``cycle_decay``
    in (0, 1]: cycle c of k (0 the oldest) weighs ``cycle_decay ** (k - 1 - c)`` in each profile
    (1: the plain mean), so a pattern that changes is followed. ``level_alpha`` in (0, 1]: the
    level is instead simple exponential smoothing of the deseasonalized look-back (level_0 = d_0,
    level_t = alpha d_t + (1 - alpha) level_{t-1}), as MSTL's trend forecast does it.
    """
    L = int(input_size)
    check(L >= 1 and h >= 1, f"input_size and h must be >= 1, got {input_size}, {h}")
    check(0 < cycle_decay <= 1, f"cycle_decay must be in (0, 1], got {cycle_decay!r}")
    check(
        level_alpha is None or 0 < level_alpha <= 1,
        f"level_alpha must be None or in (0, 1], got {level_alpha!r}",
    )
    used = sorted({int(p) for p in seasons if 1 < int(p) <= L})
    eye = np.eye(L)  # row i: the look-back with a unit at step i; the map is linear
    if not used:
        return np.full((L, h), 1.0 / L)
    longest = used[-1]
    K = L // longest if level_cycles is None else max(1, min(int(level_cycles), L // longest))
    level = eye[:, L - K * longest :].mean(1, keepdims=True)  # (L, 1) whole cycles
    rest = eye - level  # (L, L): what the level leaves
    out = np.zeros((L, h))
    season = np.zeros((L, L))  # the seasonal part laid over the look-back
    for p in used:
        k = L // p
        cycles = rest[:, L - k * p :].reshape(L, k, p)  # (L, k cycles, p phases)
        w = float(cycle_decay) ** np.arange(k - 1, -1, -1.0)
        profile = np.einsum("lkp,k->lp", cycles, w / w.sum())  # (L, p), phase 0 = the step p
        profile -= profile.mean(1, keepdims=True)  # before the forecast's first; adds no level
        out += profile[:, np.arange(h) % p]
        # the next (longer) season sees what this one left, laid over the whole look-back
        phase = (np.arange(L) - L) % p
        rest = rest - profile[:, phase]
        season += profile[:, phase]
    if level_alpha is not None:
        a = float(level_alpha)
        w = a * (1 - a) ** np.arange(L - 1, -1, -1.0)  # the smoothing recursion, unrolled
        w[0] = (1 - a) ** (L - 1)  # level_0 = d_0: the weights sum to 1
        level = (eye - season) @ w[:, None]
    return out + level


def trend_profile_matrix(input_size: int, h: int, seasons: Sequence[int]) -> np.ndarray | None:
    """W (L, h): level + linear trend + the longest season's phase effects, fit jointly by least
    squares over the look-back's whole cycles and extrapolated (the trend undamped).

    A series that is a linear trend plus any pattern of the longest season's period (shorter
    seasons that divide it included) is forecast exactly; fitting the three jointly keeps the
    trend out of the phase effects (a profile of a trended series would carry a sawtooth). None
    when the look-back holds fewer than two whole cycles (the trend would not be identified).
    """
    L, h = int(input_size), int(h)
    check(L >= 1 and h >= 1, f"input_size and h must be >= 1, got {input_size}, {h}")
    used = sorted({int(p) for p in seasons if 1 < int(p) <= L})
    if not used or L // used[-1] < 2:
        return None
    p = used[-1]
    n = L // p * p  # the last whole cycles
    A = np.zeros((n, 1 + p))
    A[:, 0] = np.arange(n) - (n - 1.0)  # slope column, 0 at the last step
    A[np.arange(n), 1 + np.arange(n) % p] = 1.0  # a level per phase: level + phase effects
    F = np.zeros((h, 1 + p))
    F[:, 0] = np.arange(1, h + 1)
    F[np.arange(h), 1 + (n + np.arange(h)) % p] = 1.0
    W = np.zeros((L, h))
    W[L - n :] = (F @ np.linalg.pinv(A)).T
    return W


def _loess_weights(n: int, q: int, degree: int, x: int, left: int, right: int) -> np.ndarray | None:
    """Weights (n,) of STL's local regression at 1-based position ``x`` from points
    ``left..right`` (tricube in distance, local linear when ``degree`` is 1): the ``est`` routine
    of Cleveland et al. (1990), as statsmodels ports it. None when every weight is zero."""
    w = np.zeros(n)
    span = max(x - left, right - x) + (max(q - n, 0) // 2)  # a window wider than the data
    j = np.arange(left, right + 1, dtype=float)
    r = np.abs(j - x)
    v = (
        np.ones_like(r)
        if span <= 0
        else np.where(r <= 0.001 * span, 1.0, (1 - (r / span) ** 3) ** 3)
    )
    v = np.where(r <= 0.999 * span, v, 0.0) if span > 0 else v
    if v.sum() <= 0:
        return None
    v = v / v.sum()
    if span > 0 and degree > 0:
        mid = (v * j).sum()
        c = (v * (j - mid) ** 2).sum()
        if np.sqrt(c) > 0.001 * (n - 1):  # a local line, unless the points barely spread
            v = v * ((x - mid) / c * (j - mid) + 1)
    w[left - 1 : right] = v
    return w


def _loess_matrix(n: int, q: int, degree: int) -> np.ndarray:
    """(n, n): STL's loess smoother of window ``q`` at every point (jump 1); the window slides
    with the point and stops at the ends."""
    E = np.eye(n)  # a point without weights keeps its value, as in STL
    if n < 2:
        return E
    left, right, half = 1, min(q, n), (q + 2) // 2
    for i in range(1, n + 1):
        if q < n and i > half and right != n:
            left, right = left + 1, right + 1
        row = _loess_weights(n, q, degree, i, left, right)
        if row is not None:
            E[i - 1] = row
    return E


def _banded_product(A: np.ndarray, B: np.ndarray, block: int = 256) -> np.ndarray:
    """A @ B where each row of A is zero outside a window (a loess matrix): each block of rows
    multiplies only the columns it touches, so a window of q costs about q / n of the product."""
    out = np.empty((A.shape[0], B.shape[1]))
    for i in range(0, A.shape[0], block):
        touched = np.flatnonzero(A[i : i + block].any(0))
        lo, hi = (touched[0], touched[-1] + 1) if len(touched) else (0, 0)
        out[i : i + block] = A[i : i + block, lo:hi] @ B[lo:hi]
    return out


def _stl_operators(n: int, p: int, seasonal: int) -> tuple[np.ndarray, np.ndarray]:
    """(G, E), each (n, n), of STL (period p, seasonal window ``seasonal``, degree 0, trend and
    low-pass windows and degrees at statsmodels' defaults, no robustness weights): G maps a
    detrended series to its seasonal component, E a deseasonalized one to its trend."""
    trend = int(np.ceil(1.5 * p / (1 - 1.5 / seasonal)))
    trend += trend % 2 == 0
    low = p + 1 + (p % 2 == 1)  # the smallest odd window past p
    # Cycle-subseries: each phase j smoothed across its k cycles (R, (k + 2, k)) and extended one
    # cycle either side, C[c p + j, m p + j] = R[c, m] for c < k + 2, m < k. The middle rows are
    # the seasonal estimate; all of them go through moving averages p, p and 3 (one kernel of
    # 2p + 1 taps), then loess, and that low-pass is taken off: what is left repeats and has no
    # level. C is sparse, so the averaged rows are summed per cycle instead of over a dense C.
    kernel = np.convolve(np.convolve(np.ones(p) / p, np.ones(p) / p), np.ones(3) / 3)
    # toeplitz[r, j] = kernel[2p + j - r] (0 outside the kernel), r < 3p, j < p
    padded = np.concatenate([np.zeros(p - 1), kernel, np.zeros(p - 1)])
    toeplitz = np.lib.stride_tricks.sliding_window_view(padded, p)[::-1]
    phases = np.arange(p)
    cycles = (n - 1 - phases) // p + 1  # phases have n // p or n // p + 1 cycles
    smoothed, averaged = np.zeros((n, n)), np.zeros((n, n))
    for k in np.unique(cycles).tolist():
        J = phases[cycles == k]
        R = np.zeros((k + 2, k))
        R[1:-1] = _loess_matrix(k, seasonal, 0)
        first = _loess_weights(k, seasonal, 0, 0, 1, min(seasonal, k))
        last = _loess_weights(k, seasonal, 0, k + 1, max(1, k - seasonal + 1), k)
        R[0] = R[1] if first is None else first
        R[-1] = R[-2] if last is None else last
        m = np.arange(k)
        cols = (m[:, None] * p + J).ravel()  # (k |J|), cycle-major
        rows = (m[:, None, None] * p + J).repeat(k, 1).reshape(k, -1)  # (k, k |J|)
        smoothed[rows, cols[None]] = np.repeat(R[1:-1], len(J), 1)
        whole = len(J) == p  # every phase has k cycles: C's columns are in (cycle, phase) order
        # row c p + j of C reaches averaged rows (c - 2) p + r, r < 3p
        taps = toeplitz if whole else toeplitz[:, J]
        block = averaged.reshape(n, k, p) if whole else np.zeros((n, k, len(J)))
        for c in range(k + 2):
            lo, hi = max(0, (c - 2) * p), min(n, (c + 1) * p)
            if lo < hi:
                part = taps[lo - (c - 2) * p : hi - (c - 2) * p]
                block[lo:hi] += part[:, None, :] * R[c][None, :, None]
        if not whole:
            averaged[:, cols] = block.reshape(n, -1)
    smoothed -= _banded_product(_loess_matrix(n, low, 1), averaged)  # the low-pass
    return smoothed, _loess_matrix(n, trend, 1)


def _stl_seasonal(n: int, p: int, seasonal: int, inner: int = 5) -> np.ndarray:
    """(n, n): the seasonal component of STL (``_stl_operators``) after ``inner`` passes, as a
    map of the series."""
    G, E = _stl_operators(n, p, seasonal)
    # the inner loop: S = G (y - T), T = E (y - S); as maps T_next = (E - EG) + EG T
    EG = E @ G
    T = np.zeros((n, n))
    for _ in range(inner - 1):
        T = E - EG + EG @ T
    return G - G @ T


def _rows_through_stl(X: np.ndarray, G: np.ndarray, Et: np.ndarray, inner: int = 5) -> np.ndarray:
    """X @ ``_stl_seasonal`` for X (r, n), without the (n, n) map; ``Et`` is E transposed
    (contiguous). The seasonal map is G - G T with T = sum_{j < inner - 1} (EG)^j (E - EG), so
    rows pass through E and G in turn (2 inner - 1 products of (r, n) by (n, n) instead of
    about 2 inner of (n, n) by (n, n))."""
    XG = X @ G
    XGT, Z = np.zeros_like(XG), XG
    for _ in range(inner - 1):
        ZE = _banded_product(Et, Z.T).T  # E is a loess matrix: banded
        Z = ZE @ G
        XGT += ZE - Z
    return XG - XGT


def mstl_components(n: int, seasons: Sequence[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """MSTL's decomposition of n steps as linear maps: ({p: (n, n) seasonal component}, (n, n)
    deseasonalized series), so that ``components[p] @ y`` is the season-p component of y.

    As ``statsforecast``'s ``mstl`` (after R's ``forecast::mstl``): seasons shortest first, each
    estimated by STL (seasonal window 7 + 4k for the k-th, degree 0) from the series minus the
    other seasons' current estimates, two passes (one with a single season).
    """
    n = int(n)
    used = sorted({int(p) for p in seasons})
    check(n >= 2 and all(2 <= p <= n for p in used), f"bad n={n} or seasons={seasons!r}")
    stl = {p: _stl_seasonal(n, p, 7 + 4 * k) for k, p in enumerate(used, start=1)}
    deseason = np.eye(n)
    comp = {p: np.zeros((n, n)) for p in used}
    for _ in range(2 if len(used) > 1 else 1):
        for p in used:
            deseason = deseason + comp[p]
            comp[p] = stl[p] @ deseason
            deseason = deseason - comp[p]
    return comp, deseason


@lru_cache(maxsize=16)
def _mstl_core(n: int, h: int, seasons: tuple[int, ...], level_alpha: float) -> np.ndarray:
    """F (n, h): MSTL's forecast from exactly n steps (whole cycles of the longest season),
    cached: refits and forecasts from histories of other lengths ask for the same map again.

    The forecast reads few rows of the decomposition (each component's last min(h, p) steps and
    the smoothed level), so those rows are carried backwards through the passes of
    ``mstl_components`` (each component is STL of the series minus the other components'
    current estimates) instead of building the (n, n) maps: about a sixth of the work at 4,032
    steps.
    """
    a = float(level_alpha)
    w = a * (1 - a) ** np.arange(n - 1, -1, -1.0)  # simple exponential smoothing, unrolled
    w[0] = (1 - a) ** (n - 1)  # level_0 = the first value: the weights sum to 1
    operators = {}  # p -> (G, E transposed once: each version of p multiplies rows by E)
    for k, p in enumerate(seasons, start=1):
        G, E = _stl_operators(n, p, 7 + 4 * k)
        operators[p] = G, np.ascontiguousarray(E.T)
    # the passes as versions of components: (season, the other seasons' versions it subtracts)
    versions: list[tuple[int, list[int]]] = []
    current: dict[int, int] = {}
    for _ in range(2 if len(seasons) > 1 else 1):
        for p in seasons:
            versions.append((p, [v for q, v in current.items() if q != p]))
            current[p] = len(versions) - 1
    # output rows: each season's last min(h, p) steps, then the level (w @ deseasonalized)
    offset = np.cumsum([0] + [min(h, p) for p in seasons])
    R = int(offset[-1]) + 1
    adjoint = [np.zeros((R, n)) for _ in versions]
    for i, p in enumerate(seasons):
        r = np.arange(min(h, p))
        adjoint[current[p]][offset[i] + r, n - p + r] = 1.0
        adjoint[current[p]][-1] -= w  # deseasonalized = the series minus the final components
    rows = np.zeros((R, n))
    rows[-1] = w
    for v in range(len(versions) - 1, -1, -1):
        p, subtracted = versions[v]
        Y = _rows_through_stl(adjoint[v], *operators[p])
        rows += Y
        for u in subtracted:
            adjoint[u] -= Y
    steps = np.arange(h)
    F = np.repeat(rows[-1:], h, 0)  # (h, n): the level, flat
    for i, p in enumerate(seasons):
        F += rows[offset[i] + steps % p]  # each component's last cycle, repeated
    F = np.ascontiguousarray(F.T)
    F.setflags(write=False)  # cached: callers must not change it
    return F


def mstl_seasons(seasons: Sequence[int], available: int) -> tuple[int, ...]:
    """The seasons MSTL's forecast decomposes from ``available`` steps, shortest first: periods
    of at least 2 and at most ``MSTL_LONGEST_SEASON`` steps with two whole cycles available."""
    periods = {int(p) for p in seasons}
    return tuple(sorted(p for p in periods if 2 <= p <= MSTL_LONGEST_SEASON and 2 * p <= available))


def _mstl_span(available: int, longest: int) -> int:
    """Steps MSTL decomposes: whole cycles of the longest season, at most ``MSTL_MAX_STEPS``
    (two cycles when one is longer than half of it)."""
    return min(available // longest, max(MSTL_MAX_STEPS // longest, 2)) * longest


def _mstl_map(L: int, h: int, seasons: tuple[int, ...], level_alpha: float) -> np.ndarray:
    """``mstl_matrix`` for checked arguments: the core map on the look-back's last whole cycles."""
    n = _mstl_span(L, seasons[-1])
    W = np.zeros((L, h))
    W[L - n :] = _mstl_core(n, h, seasons, level_alpha)
    return W


def mstl_matrix(
    input_size: int, h: int, seasons: Sequence[int], level_alpha: float = LEVEL_ALPHA
) -> np.ndarray | None:
    """W (L, h): MSTL's forecast as a linear map of the look-back.

    The last whole cycles of the longest season in the look-back (at most ``MSTL_MAX_STEPS``
    steps) are decomposed as ``mstl_components`` does; the forecast repeats each seasonal
    component's last cycle (statsforecast's MSTL) and adds simple exponential smoothing
    (``level_alpha``) of the deseasonalized steps, a fixed-parameter stand-in for the AutoETS that
    MSTL fits on them. A constant look-back maps to itself; a series that is any patterns of the
    seasons plus a constant is forecast exactly. None without two whole cycles of the longest
    season (STL then has no cycle-subseries to smooth).
    """
    L, h = int(input_size), int(h)
    check(L >= 1 and h >= 1, f"input_size and h must be >= 1, got {input_size}, {h}")
    check(0 < level_alpha <= 1, f"level_alpha must be in (0, 1], got {level_alpha!r}")
    used = tuple(sorted({int(p) for p in seasons if 1 < int(p) <= L}))
    if not used or L // used[-1] < 2:
        return None
    return _mstl_map(L, h, used, float(level_alpha))


def mstl_forecast(
    history: np.ndarray, h: int, seasons: Sequence[int], level_alpha: float = LEVEL_ALPHA
) -> np.ndarray:
    """MSTL's forecast (as ``mstl_matrix``) of each row of ``history`` (R, T) from its whole
    history: (R, h).

    NaN before a row's first observation is no history; NaN after it is filled by linear
    interpolation (the last value carried forward at the end). Each row uses ``mstl_seasons`` of
    its history and decomposes the last whole cycles of the longest of them (at most
    ``MSTL_MAX_STEPS`` steps, or two cycles of a longer season); a row where no season has two
    cycles gets NaN.
    """
    history = np.asarray(history, dtype=np.float64)
    check(history.ndim == 2, f"history must be (rows, steps), got shape {history.shape}")
    h = int(h)
    check(h >= 1, f"h must be >= 1, got {h}")
    check(0 < level_alpha <= 1, f"level_alpha must be in (0, 1], got {level_alpha!r}")
    R, T = history.shape
    seen = np.isfinite(history)
    available = np.where(seen.any(1), T - seen.argmax(1), 0)
    out = np.full((R, h), np.nan)
    keys: dict[tuple[tuple[int, ...], int], list[np.ndarray]] = {}
    lengths, which = np.unique(available, return_inverse=True)
    for k, a in enumerate(lengths.tolist()):
        used = mstl_seasons(seasons, a)
        if used:
            keys.setdefault((used, _mstl_span(a, used[-1])), []).append(np.flatnonzero(which == k))
    steps = np.arange(T)
    for (used, n), parts in keys.items():
        rows = np.concatenate(parts)
        segment = history[rows, T - n :].copy()
        for i in np.flatnonzero(~np.isfinite(segment).all(1)):
            ok = np.isfinite(segment[i])
            if ok.any():
                segment[i] = np.interp(steps[:n], steps[:n][ok], segment[i][ok])
        out[rows] = segment @ _mstl_core(n, h, used, float(level_alpha))
    return out


def start_candidates(input_size: int, h: int, seasons: Sequence[int]) -> dict[str, np.ndarray]:
    """Closed-form forecasts the network can start from, each a linear map W (L, h) of the
    look-back.

    The simple forecasts that StatsForecast's baselines and an MSTL-like decomposition make, so
    the fit can pick the one that suits the data on held-out windows (``PatchForecastModel.
    init_skip_ridge``), as an Auto model picks among its candidates:

    - ``"naive"``: the last value (a random walk's best forecast);
    - ``"mean"``: the look-back mean (a level without season, noise around it);
    - ``"seasonal_naive_<p>"``: the last cycle of season p, repeated;
    - ``"profile"``: level + seasonal profiles averaged over the look-back's cycles
      (``seasonal_profile_matrix``);
    - ``"profile_recent"``: the same with the level of the last cycle of the longest season only
      (when the look-back holds more than one);
    - ``"profile_smooth"``: profiles weighted towards recent cycles (``PROFILE_DECAY`` a cycle)
      and an exponentially smoothed level (``LEVEL_ALPHA``) of the deseasonalized look-back, as
      MSTL forecasts (when the look-back holds more than one cycle of the longest season);
    - ``"profile_fast"``: the same with a faster level (``FAST_LEVEL_ALPHA``);
    - ``"profile_trend"``: level, linear trend and phase effects fit jointly
      (``trend_profile_matrix``), for a series that grows or falls;
    - ``"mstl"``: MSTL's forecast (``mstl_matrix``): each season re-estimated by STL's local
      regression across cycles, so a daily pattern that drifts over the weeks is followed, with
      the level smoothed as ``"profile_smooth"``'s.

    Every map reproduces a constant look-back (its columns sum to 1), so it commutes with the
    network's per-window normalization. The fit may also combine the best two (``model.py``).

    Seasons without one whole cycle in the look-back give no candidate.
    """
    L, h = int(input_size), int(h)
    check(L >= 1 and h >= 1, f"input_size and h must be >= 1, got {input_size}, {h}")
    steps = np.arange(h)
    naive = np.zeros((L, h))
    naive[L - 1] = 1.0
    out = {"naive": naive, "mean": np.full((L, h), 1.0 / L)}
    used = sorted({int(p) for p in seasons if 1 < int(p) <= L})
    for p in used:
        W = np.zeros((L, h))
        W[L - p + steps % p, steps] = 1.0
        out[f"seasonal_naive_{p}"] = W
    if used:
        out["profile"] = seasonal_profile_matrix(L, h, used)
        if L // used[-1] > 1:
            out["profile_recent"] = seasonal_profile_matrix(L, h, used, level_cycles=1)
            out["profile_smooth"] = seasonal_profile_matrix(
                L, h, used, cycle_decay=PROFILE_DECAY, level_alpha=LEVEL_ALPHA
            )
            out["profile_fast"] = seasonal_profile_matrix(
                L, h, used, cycle_decay=PROFILE_DECAY, level_alpha=FAST_LEVEL_ALPHA
            )
            out["profile_trend"] = trend_profile_matrix(L, h, used)
            out["mstl"] = mstl_matrix(L, h, used)
    return out


def combined_start(candidates: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The map of the start ``name``: a candidate, or ``"a+b"``, the mean of candidates a and b
    (a forecast combination: the mean of two good forecasts is rarely worse than the better one
    and often better than both, https://otexts.com/fpp3/combinations.html)."""
    parts = name.split("+")
    missing = [p for p in parts if p not in candidates]
    check(not missing, f"unknown start {name!r}: {missing} not in {sorted(candidates)}")
    return sum(candidates[p] for p in parts) / len(parts)


def default_input_size(n_steps: int, h: int, seasons: Sequence[int]) -> int:
    """A look-back for ``n_steps`` training steps: whole cycles of the longest season.

    The profile start averages each season over the look-back's cycles, so more cycles mean less
    noise, but every step in the look-back is a window fewer to choose and fit on. The rule: k
    cycles of the longest season, k the largest of ``LOOK_BACK_CYCLES`` (7, 4, 3, 2) that leaves
    max(one cycle, 8h) steps after the look-back (the windows the start, the penalty and the
    held-out choice are made on) and stays within ``MAX_RIDGE_INPUT`` steps. Without a season,
    or when two cycles do not fit: min(4 cycles or 512, n_steps // 2, ``MAX_RIDGE_INPUT``).
    Half-hourly demand over 5 weeks (1,680 steps, h=48, seasons 48 and 336) gets 3 weeks (1,008):
    2.5 cycles cut the weekly profile to 2, and 4 leave one week of windows; 5-minute data with
    a weekly season (2,016) gets 2 weeks at most.
    """
    n, h = int(n_steps), int(h)
    check(n >= 1 and h >= 1, f"n_steps and h must be >= 1, got {n_steps}, {h}")
    longest = max((int(p) for p in seasons), default=0)
    for k in LOOK_BACK_CYCLES if longest else ():
        if n - k * longest >= max(longest, 8 * h) and k * longest <= MAX_RIDGE_INPUT:
            return k * longest
    return max(1, min(4 * longest if longest else 512, n // 2, MAX_RIDGE_INPUT))


def resolve_seasons(
    setting: int | Sequence[int] | str | None,
    series: Sequence[np.ndarray],
    input_size: int,
    freq: object = None,
) -> tuple[int, ...]:
    """The seasons a model uses: ``"auto"`` detects them in ``series`` (training steps only; with
    ``freq``, snapped to its clock and calendar cycles), an int or ints are taken as given, None
    or () means none. Periods longer than ``input_size`` are dropped (the look-back must hold a
    whole cycle)."""
    if setting is None:
        return ()
    if isinstance(setting, str):
        check(
            setting == "auto", f"seasonality must be 'auto', an int, ints or None, got {setting!r}"
        )
        found = detect_seasonalities(
            [v for v in series if np.isfinite(v).sum() >= 8] or [[0.0] * 8],
            calendar=calendar_periods(freq),
        )
        return tuple(p for p in found if p <= input_size)
    values = [setting] if np.ndim(setting) == 0 else list(setting)
    check(
        all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 2 for p in values
        ),
        f"seasonality periods must be ints >= 2, got {setting!r}",
    )
    return tuple(sorted(int(p) for p in values if p <= input_size))
