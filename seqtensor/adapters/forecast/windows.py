"""Forecast windows: a look-back of L steps and the h steps after it, cut from padded series.

Legend: N windows, C channels per sample (1 when channel-independent, the number of series when
channels are mixed), L look-back (input_size), h horizon, F / P / K known-future / past-only /
static features per channel.

Series are stored once, concatenated along time, each with L steps of left padding (NaN targets,
zero exogenous values) and h steps of right padding; a window is a gather of index ranges, so
nothing is copied per window until a batch is drawn. A window with cut point t (series-local)
has history [t - L, t) and target [t, t + h); history before the series start is padding, masked
like any missing value (series shorter than the look-back are left-padded, not dropped).
"""

from __future__ import annotations

import numpy as np
import torch

from ..._validation import check

__all__ = ["WindowData", "WindowDataset", "train_cuts", "val_cuts", "collate_windows"]


class WindowData:
    """Padded, concatenated series of G groups; ``batch(g, t)`` gathers windows.

    Parameters
    ----------
    y : per group (C, T_g) targets on the training scale, NaN = missing.
    futr : per group (C*F, T_g + extra_g) known-future inputs (may extend past T_g by up to h).
    hist : per group (C*P, T_g) past-only inputs.
    static : (G, C*K) static features.
    L, h : look-back and horizon.
    """

    def __init__(self, y, futr, hist, static, L: int, h: int) -> None:
        self.L, self.h = L, h
        self.lengths = np.array([v.shape[1] for v in y], dtype=np.int64)
        lead, tail = L, h

        def pack(parts, rows: int, fill: float) -> torch.Tensor:
            chunks = []
            for part, T in zip(parts, self.lengths):
                buf = np.full((rows, lead + T + tail), fill, dtype=np.float32)
                width = min(part.shape[1], T + tail)
                buf[:, lead : lead + width] = part[:, :width]
                chunks.append(buf)
            return torch.from_numpy(np.concatenate(chunks, axis=1))

        self.offsets = np.concatenate([[0], np.cumsum(self.lengths + lead + tail)[:-1]]).astype(
            np.int64
        )
        self.C = y[0].shape[0]
        self.y = pack(y, self.C, np.nan)  # (C, total)
        self.futr = pack(futr, futr[0].shape[0], 0.0)  # (C*F, total)
        self.hist = pack(hist, hist[0].shape[0], 0.0)  # (C*P, total)
        self.static = torch.as_tensor(np.asarray(static, dtype=np.float32))  # (G, C*K)

    def batch(self, g: np.ndarray, t: np.ndarray) -> dict[str, torch.Tensor]:
        """Windows of groups g (N,) at cut points t (N,) -> dict of (N, ...) tensors."""
        L, h = self.L, self.h
        base = torch.from_numpy(self.offsets[g] + t)  # position of local step t - L
        past = base[:, None] + torch.arange(L)  # (N, L)
        ahead = base[:, None] + L + torch.arange(h)  # (N, h)
        both = torch.cat([past, ahead], 1)  # (N, L + h)
        return {
            "y": self.y[:, past].transpose(0, 1),  # (N, C, L)
            "target": self.y[:, ahead].transpose(0, 1),  # (N, C, h)
            "futr": self.futr[:, both].transpose(0, 1),  # (N, C*F, L + h)
            "hist": self.hist[:, past].transpose(0, 1),  # (N, C*P, L)
            "static": self.static[torch.from_numpy(np.asarray(g))],  # (N, C*K)
        }

    def history(self, g: np.ndarray, t: np.ndarray, span: int) -> np.ndarray:
        """The ``span`` target steps before cut points t of groups g: (N, C, span), NaN before
        each series' start (as many steps as exist, however long the look-back)."""
        g, t = np.asarray(g, np.int64), np.asarray(t, np.int64)
        start = self.offsets[g] + self.L  # position of each series' first step
        pos = (start + t - span)[:, None] + np.arange(span)  # (N, span)
        out = self.y[:, torch.from_numpy(np.maximum(pos, 0))].numpy().transpose(1, 0, 2)
        return np.where((pos < start[:, None])[:, None], np.nan, out)


class WindowDataset(torch.utils.data.Dataset):
    """Windows (g, t) of a ``WindowData``; ``__getitems__`` gathers a whole batch at once."""

    def __init__(self, data: WindowData, g: np.ndarray, t: np.ndarray) -> None:
        self.data, self.g, self.t = data, np.asarray(g, np.int64), np.asarray(t, np.int64)

    def __len__(self) -> int:
        return len(self.g)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.data.batch(self.g[idx], self.t[idx])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def collate_windows(batch):
    """DataLoader collate for ``WindowDataset``: its ``__getitems__`` already returns a batch."""
    return batch


def _observed_cumsum(y: np.ndarray) -> np.ndarray:
    """(C, T) -> (T + 1,) running count of steps where any channel is observed."""
    obs = (~np.isnan(y)).any(0)
    return np.concatenate([[0], np.cumsum(obs)])


def _keep(cum: np.ndarray, t: np.ndarray, L: int, h: int) -> np.ndarray:
    """Windows with at least one observed step in both the history and the target."""
    lo = np.maximum(t - L, 0)
    return (cum[t] - cum[lo] > 0) & (cum[t + h] - cum[t] > 0)


def train_cuts(y: list[np.ndarray], L: int, h: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """Training cut points: targets end before the last ``holdout`` steps of each group.

    A long group gives every window with a full look-back; a group shorter than L + h gives the
    windows with the longest history it has, left-padded (at least one, cut at T - holdout - h).
    """
    gs, ts = [], []
    for g, v in enumerate(y):
        end = v.shape[1] - holdout - h  # last cut point
        if end < 1:
            continue
        t = np.arange(min(L, end), end + 1)
        t = t[_keep(_observed_cumsum(v), t, L, h)]
        gs.append(np.full(len(t), g)), ts.append(t)
    g = np.concatenate(gs) if gs else np.zeros(0, np.int64)
    t = np.concatenate(ts) if ts else np.zeros(0, np.int64)
    check(
        len(g) > 0,
        f"no training window: every series needs more than h + val_size = {h + holdout} steps "
        f"with observed values in both the look-back and the horizon",
    )
    return g, t


def val_cuts(
    y: list[np.ndarray], L: int, h: int, val_size: int, max_per_group: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Validation cut points: targets inside the last ``val_size`` steps, at most ``max_per_group``
    evenly spaced."""
    gs, ts = [], []
    for g, v in enumerate(y):
        T = v.shape[1]
        t = np.arange(T - val_size, T - h + 1)
        if len(t) > max_per_group:
            t = t[np.linspace(0, len(t) - 1, max_per_group).round().astype(np.int64)]
        t = t[(t >= 1)]
        t = t[_keep(_observed_cumsum(v), t, L, h)]
        gs.append(np.full(len(t), g)), ts.append(t)
    return np.concatenate(gs), np.concatenate(ts)
