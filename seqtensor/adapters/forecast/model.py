"""The forecasting network: patches of a long look-back and future query tokens through an encoder.

Legend: B batch, C channels per sample, L look-back, h horizon, P patch length, s patch stride,
n_p = ceil((L - P) / s) + 1 past tokens, n_f = ceil(h / P) future tokens, n = n_p + n_f, D width, Q
outputs per step (1, or the number of quantiles), F / Hx / K known-future / past-only / static
features per channel.

1. Instance normalization (RevIN, Kim et al. 2022, https://openreview.net/forum?id=cGDAkQo1C0p):
   each window is shifted and scaled by the mean and std of its observed look-back, and the
   forecast scaled back, so the network sees stationary inputs.
2. Patching (PatchTST, Nie et al. 2023, https://arxiv.org/abs/2211.14730): the look-back is cut
   into patches of P steps, one token each, starting every ``patch_stride`` steps (default P:
   non-overlapping; PatchTST uses P / 2); a token also carries its observed-mask
   patch (missing values are zeros plus a 0 in the mask) and its exogenous patches.
3. Future query tokens: n_f tokens after the past ones carry the known-future inputs of the
   horizon and a learned "future" embedding; the encoder (tensorized attention over n tokens)
   mixes them with the past, and each reads out P forecast steps. Unlike PatchTST's flatten head,
   no parameter grows with L, which keeps 16k-step look-backs cheap.
4. A linear skip (L -> h) on the normalized look-back, as DLinear (Zeng et al. 2023,
   https://arxiv.org/abs/2205.13504) shows a linear map is a strong forecaster on its own. The skip
   and the encoder's readout start at zero (the first forecast is the window mean), so the encoder
   only adds what lowers the loss; a random readout cost 0.04 MSE on electricity demand (h=96).
   The Forecaster then sets the skip to its closed-form ridge fit (``init_skip_ridge``), so the
   linear part starts converged instead of being cut short by the early stop the encoder's
   over-fitting triggers (at h=336 the best validation came at step 200 of 1,000), and the
   encoder learns only the residual. ``linear_skip=False`` removes the skip.

Channel-independent (C = 1, each series a sample) or channel-mixing (C series per sample, a token
holding the patch of every channel) differ only in C.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._validation import check
from ...nn import Encoder, ModelConfig
from .seasonality import seasonal_profile_matrix

# How much better (relative error) a more complex candidate must be to replace a simpler one: the
# ridge fit over its closed-form start, the trained network over the fit it started from.
SIMPLER_MARGIN = 0.03

__all__ = [
    "SIMPLER_MARGIN",
    "ForecastEnsemble",
    "ForecastModelConfig",
    "PatchForecastModel",
    "forecast_loss",
]


@dataclass
class ForecastModelConfig:
    """Everything that shapes the forecasting network; round-trips through a dict / JSON."""

    input_size: int  # look-back L
    h: int  # horizon the network outputs in one pass
    patch_len: int = 16  # steps per token P
    patch_stride: int | None = None  # steps between past tokens (None = P: non-overlapping patches)
    n_channels: int = 1  # C: 1 channel-independent, else the number of mixed series
    n_outputs: int = 1  # Q: 1 point forecast, or one per quantile
    n_futr: int = 0  # F: known-future features per channel
    n_hist: int = 0  # Hx: past-only features per channel
    n_static: int = 0  # K: static features per channel
    linear_skip: bool = True  # add a linear L -> h map of the normalized look-back
    seasons: tuple[int, ...] = ()  # seasonal periods the skip starts from (seasonality.py)
    encoder: ModelConfig = field(default_factory=ModelConfig)  # the attention stack

    def __post_init__(self) -> None:
        for name in ("input_size", "h", "patch_len", "n_channels", "n_outputs"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}"
            )
        check(
            self.patch_stride is None
            or (isinstance(self.patch_stride, int) and 1 <= self.patch_stride <= self.patch_len),
            f"patch_stride must be None or an int in [1, patch_len={self.patch_len}], got "
            f"{self.patch_stride!r}",
        )
        check(
            all(isinstance(p, int) and p >= 2 for p in self.seasons),
            f"seasons must be ints >= 2, got {self.seasons!r}",
        )
        self.seasons = tuple(int(p) for p in self.seasons)  # JSON gives a list
        if isinstance(self.encoder, dict):
            self.encoder = ModelConfig.from_dict(self.encoder)

    @property
    def stride(self) -> int:
        return self.patch_len if self.patch_stride is None else self.patch_stride

    @property
    def n_past(self) -> int:
        return math.ceil(max(self.input_size - self.patch_len, 0) / self.stride) + 1

    @property
    def n_future(self) -> int:
        return math.ceil(self.h / self.patch_len)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["encoder"] = self.encoder.to_dict()
        out["seasons"] = list(self.seasons)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForecastModelConfig:
        known = {f.name for f in fields(cls)}
        check(
            not set(data) - known,
            f"unknown ForecastModelConfig fields: {sorted(set(data) - known)}",
        )
        return cls(**data)


def _patches(
    x: torch.Tensor, P: int, n_tokens: int, left: bool, stride: int | None = None
) -> torch.Tensor:
    """(B, X, T) -> (B, n_tokens, X * P), zero-padded on the left (past) or right (future).

    Past tokens start every ``stride`` steps (default P), the last one ending at the last step.
    """
    B, X, T = x.shape
    stride = P if stride is None else stride
    pad = (n_tokens - 1) * stride + P - T
    x = F.pad(x, (pad, 0) if left else (0, pad))  # (B, X, (n_tokens - 1) * stride + P)
    x = x.unfold(-1, P, stride).permute(0, 2, 1, 3)  # (B, n_tokens, X, P)
    return x.reshape(B, n_tokens, X * P)


class PatchForecastModel(nn.Module):
    """forward(batch) -> (B, C, h, Q) forecasts on the scale of ``batch["y"]``.

    ``batch``: ``y`` (B, C, L) with NaN for missing, ``futr`` (B, C*F, L + h), ``hist``
    (B, C*Hx, L), ``static`` (B, C*K); extra keys are ignored.
    """

    def __init__(self, config: ForecastModelConfig) -> None:
        super().__init__()
        self.config = c = config
        C, P, D = c.n_channels, c.patch_len, c.encoder.d_model
        token_in = C * P * (2 + c.n_hist + c.n_futr)  # values, observed mask, exogenous patches
        self.embed = nn.Linear(token_in, D)
        self.future_token = nn.Parameter(torch.randn(D) * 0.02)
        self.static = nn.Linear(C * c.n_static, D) if c.n_static else None
        self.encoder = Encoder(c.encoder)
        self.head = nn.Linear(D, C * P * c.n_outputs)
        self.skip = nn.Linear(c.input_size, c.h) if c.linear_skip else None
        # The encoder's readout starts at zero, so training starts from the linear skip alone and
        # the encoder only adds what lowers the loss.
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        if self.skip is not None:  # with both at zero the first forecast is the window mean
            nn.init.zeros_(self.skip.bias)
            with torch.no_grad():
                self.skip.weight.copy_(self.skip_prior().T)

    def skip_prior(self) -> torch.Tensor:
        """(L, h) map the skip starts from: the seasonal-profile forecast of ``config.seasons``
        (level plus per-season profiles averaged over the look-back's cycles), zero without seasons
        (the window mean after instance normalization)."""
        c = self.config
        if not c.seasons:
            return torch.zeros(c.input_size, c.h)
        W = seasonal_profile_matrix(c.input_size, c.h, c.seasons)
        return torch.from_numpy(W).float()

    @staticmethod
    def _revin(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, L) with NaN -> normalized z (0 where missing), mean, std (B, C, 1), observed
        mask."""
        observed = ~torch.isnan(y)  # (B, C, L)
        obs = observed.to(y.dtype)
        # RevIN statistics over the observed look-back; a window with nothing observed gets (0, 1).
        count = obs.sum(-1, keepdim=True)  # (B, C, 1)
        y0 = torch.where(observed, y, torch.zeros_like(y))
        mean = y0.sum(-1, keepdim=True) / count.clamp_min(1)
        var = ((y0 - mean) * obs).pow(2).sum(-1, keepdim=True) / count.clamp_min(1)
        std = torch.sqrt(var + 1e-5)
        return (y0 - mean) / std * obs, mean, std, obs

    @torch.no_grad()
    def init_skip_ridge(
        self,
        y: torch.Tensor,
        target: torch.Tensor,
        alpha: float = 1.0,
        priors: Mapping[str, Any] | None = None,
        choose: bool = True,
        times: torch.Tensor | None = None,
    ) -> bool:
        """Set the linear skip to the ridge-regression fit of the normalized targets on the
        look-back.

        ``y`` (B, C, L), ``target`` (B, C, h) from training windows in time order (NaN = missing;
        windows with a missing target are left out). The skip is a linear least-squares problem,
        so its optimum is solved in closed form instead of being approached by the same SGD steps
        (and the same early stop) as the encoder: the encoder then starts from a converged
        DLinear-like forecast and learns only the residual. ``alpha`` is the ridge penalty per
        window (features have unit scale). ``priors``: name -> (L, h) closed-form forecasts the fit
        is pulled towards (``seasonality.start_candidates``; default ``skip_prior()``).

        The prior is the one with the lowest MAE over all windows (a prior alone fits nothing, so
        every window is out of sample for it), or the mean of the best two (named ``"a+b"``)
        when that scores lower still; the penalty (``alpha * 10^k``, k = 0..4, or inf:
        the prior alone) is chosen on rolling origins (``_rolling_folds``: the last three blocks
        of an eighth of the windows, each scored after a purged fit on the windows before it):
        the strongest within ``SIMPLER_MARGIN`` of the lowest MAE. The choice is kept in
        ``skip_start_`` (prior name), ``skip_alpha_`` and ``skip_errors_`` ({(name, alpha): MAE;
        alpha inf on all windows for each prior, then the chosen prior's folds}). ``times`` (B,),
        the windows' cut points, purges the fits. ``choose=False`` fits
        the first prior with ``alpha`` as given, on every window. Returns False
        (nothing changed) without a skip or a usable window.
        """
        if self.skip is None:
            return False
        z, mean, std, _ = self._revin(y.double())
        t = (target.double() - mean) / std  # (B, C, h) on the window's scale
        X, Y = z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])
        ok = ~torch.isnan(Y).any(-1)
        X, Y = X[ok], Y[ok]
        if times is not None:
            times = times.repeat_interleave(z.shape[1])[ok.cpu()]
        if len(X) < 2:
            return False
        if priors is None:
            priors = {"prior": self.skip_prior()}
        check(len(priors) >= 1, "priors must name at least one (L, h) map")
        W0s = {k: torch.as_tensor(v).to(X) for k, v in priors.items()}
        # A few weeks of history give a few hundred overlapping windows, where an L x h fit with
        # alpha alone doubled the error of the seasonal prior on half-hourly demand: the penalty
        # strength and the prior are chosen on held-out windows.
        name = next(iter(W0s))
        self.skip_errors_ = {}
        folds = _rolling_folds(len(X), times, Y.shape[-1]) if choose else []
        if folds:
            # A prior alone fits nothing, so every window is held out for it: the prior is chosen
            # on all windows (weeks, not the last days: a weekly pattern needs them).
            for key, W0 in W0s.items():
                self.skip_errors_[(key, float("inf"))] = float((X @ W0 - Y).abs().mean())
            if len(W0s) >= 2:
                # The mean of the best two (a forecast combination, seasonality.combined_start):
                # over 32 real slices it lowered the chosen start's MAE relative to MSTL by 3%
                # (geometric mean) and was chosen on most (docs/forecasting_results.md).
                a, b = sorted(W0s, key=lambda k: self.skip_errors_[(k, float("inf"))])[:2]
                W0s[f"{a}+{b}"] = (W0s[a] + W0s[b]) / 2
                err = float((X @ W0s[f"{a}+{b}"] - Y).abs().mean())
                self.skip_errors_[(f"{a}+{b}", float("inf"))] = err
            name = min(W0s, key=lambda k: self.skip_errors_[(k, float("inf"))])
            # The penalty on rolling origins: each fold fits on the windows before it (purged) and
            # scores the next block, so one odd day cannot decide. alpha = inf is the prior itself.
            alphas = [alpha * 10.0**k for k in range(5)] + [float("inf")]
            sums, count = dict.fromkeys(alphas, 0.0), 0
            for fit, held in folds:
                path, X_ho, Y_ho = _RidgePath(X[fit], Y[fit]), X[held], Y[held]
                for a in alphas:
                    W, b = path.fit(W0s[name], a)
                    sums[a] += float((X_ho @ W + b - Y_ho).abs().sum())
                count += Y_ho.numel()
            errors = {a: e / count for a, e in sums.items()}
            for a, e in errors.items():
                self.skip_errors_[(name, a)] = e
            # the strongest penalty within SIMPLER_MARGIN of the best: the simpler model wins
            # ties, since a fit that only ties the prior on a few days loses later
            alpha = max(
                a for a, e in errors.items() if e <= (1 + SIMPLER_MARGIN) * min(errors.values())
            )
        W, b = _RidgePath(X, Y).fit(W0s[name], alpha)
        self.skip.weight.copy_(W.T.to(self.skip.weight.dtype))
        self.skip.bias.copy_(b.to(self.skip.bias.dtype))
        self.skip_alpha_, self.skip_start_ = alpha, name
        return True

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        y = batch["y"]
        B, C, L = y.shape
        check(
            C == c.n_channels and L == c.input_size,
            f"y must be (B, {c.n_channels}, {c.input_size}), got {tuple(y.shape)}",
        )
        z, mean, std, obs = self._revin(y)  # z (B, C, L), 0 where missing
        if torch.is_grad_enabled() or self.head.weight.any() or self.head.bias.any():
            out = self._encode(batch, z, obs)  # (B, C, h, Q)
        else:  # a zero readout (a kept closed-form start): the encoder cannot change the output
            out = z.new_zeros(B, C, c.h, c.n_outputs)
        if self.skip is not None:
            out = out + self.skip(z)[..., None]  # (B, C, h, 1)
        return out * std[..., None] + mean[..., None]  # back to the scale of y

    def _encode(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor, obs: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's forecast (B, C, h, Q) of the normalized look-back z and its mask obs."""
        c = self.config
        B, C, L = z.shape
        P, n_p, n_f, s = c.patch_len, c.n_past, c.n_future, c.stride
        futr = batch["futr"]  # (B, C*F, L + h)
        past_parts = [_patches(z, P, n_p, True, s), _patches(obs, P, n_p, True, s)]
        if c.n_hist:
            past_parts.append(_patches(batch["hist"], P, n_p, True, s))
        if c.n_futr:
            past_parts.append(_patches(futr[..., :L], P, n_p, True, s))
        past = torch.cat(past_parts, -1)  # (B, n_p, token_in)
        future = past.new_zeros(B, n_f, past.shape[-1])  # (B, n_f, token_in)
        if c.n_futr:
            future[..., -C * c.n_futr * P :] = _patches(futr[..., L:], P, n_f, False)
        is_future = torch.arange(n_p + n_f, device=z.device).ge(n_p).to(z.dtype)  # (n,)
        x = (
            self.embed(torch.cat([past, future], 1)) + is_future[:, None] * self.future_token
        )  # (B, n, D)
        if self.static is not None:
            x = x + self.static(batch["static"])[:, None, :]

        keep_past = past_parts[1].amax(-1) > 0  # (B, n_p): tokens with an observed step
        keep = torch.cat([keep_past, keep_past.new_ones(B, n_f)], 1)  # (B, n)
        x = self.encoder(x, None if bool(keep.all()) else keep)  # (B, n, D)

        out = self.head(x[:, n_p:])  # (B, n_f, C*P*Q)
        out = (
            out.view(B, n_f, C, P, c.n_outputs)
            .permute(0, 2, 1, 3, 4)
            .reshape(B, C, n_f * P, c.n_outputs)
        )
        return out[:, :, : c.h]


def _rolling_folds(
    n: int, times: torch.Tensor | None, h: int, n_folds: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rolling-origin folds over n windows in time order: (fit mask, held-out mask) per fold.

    The last ``n_folds`` blocks of n // 8 windows are held out in turn; each fold fits on the
    windows whose targets end before its block starts (with ``times``, the cut points: a purged
    split, as overlapping targets leak the block and an L x h map memorizes them). Folds with
    fewer than 2 windows to fit on are dropped.
    """
    block = max(1, n // 8)
    idx, out = torch.arange(n), []
    for f in range(n_folds, 0, -1):
        lo, hi = n - f * block, n - (f - 1) * block
        if lo < 2:
            continue
        held = (idx >= lo) & (idx < hi)
        fit = idx < lo
        if times is not None:
            purged = fit & (times <= times[lo:hi].min() - h)
            fit = purged if int(purged.sum()) >= 2 else fit
        out.append((fit, held))
    return out


class _RidgePath:
    """Ridge fits of Y (N, h) on X (N, L) towards priors W0, for several penalties on one Gram.

    The intercept b is a column of ones, penalized like the map: alpha * N * (||W - W0||^2 +
    ||b||^2). So the fit moves smoothly from least squares (alpha -> 0) to exactly the prior
    (alpha -> inf, b -> 0); an unpenalized intercept stays free however large alpha grows.
    With X1 = [X, 1] and V0 = [W0; 0]: V = V0 + (X1'X1 + alpha N I)^-1 X1'(Y - X1 V0), one
    Cholesky solve per penalty (a third of an eigendecomposition's work each, for the five
    penalties tried: at a 4,032-step look-back the eigendecomposition took 10 s on one core).
    """

    def __init__(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self.n = len(X)
        X1 = torch.cat([X, X.new_ones(len(X), 1)], 1)  # (N, L + 1)
        self.G, self.XtY = X1.T @ X1, X1.T @ Y  # (L+1, L+1), (L+1, h)

    def fit(self, W0: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (L, h), b (h,)); alpha = inf gives the prior alone, without bias."""
        W0 = W0.to(self.G)
        if alpha == float("inf"):
            return W0, W0.new_zeros(W0.shape[1])
        V0 = torch.cat([W0, W0.new_zeros(1, W0.shape[1])], 0)  # (L + 1, h)
        A = self.G + alpha * self.n * torch.eye(
            len(self.G), dtype=self.G.dtype, device=self.G.device
        )
        V = V0 + torch.cholesky_solve(self.XtY - self.G @ V0, torch.linalg.cholesky(A))
        return V[:-1], V[-1]


class ForecastEnsemble(nn.Module):
    """Networks trained independently (different seeds); ``forward`` averages their forecasts.

    On electricity demand (h=96) one network's test MSE moves by 0.01-0.02 with the seed; the
    average of three is below every one of them (docs/performance.md).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        check(len(members) >= 1, "an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([member(batch) for member in self.members]).mean(0)


def forecast_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    quantiles: tuple[float, ...] = (),
    delta: float = 1.0,
) -> torch.Tensor:
    """Mean loss over observed targets. pred (B, C, h, Q), target (B, C, h) with NaN = missing.

    kind: "mae", "mse", "huber" (on output 0), or "quantile" (pinball loss averaged over the Q
    quantiles, Koenker and Bassett 1978).
    """
    observed = ~torch.isnan(target)
    y = torch.where(observed, target, torch.zeros_like(target))
    w = observed.to(pred.dtype)
    if kind == "quantile":
        q = torch.tensor(quantiles, dtype=pred.dtype, device=pred.device)  # (Q,)
        err = y[..., None] - pred  # (B, C, h, Q)
        per_step = torch.maximum(q * err, (q - 1) * err).mean(-1)
    elif kind == "mae":
        per_step = (pred[..., 0] - y).abs()
    elif kind == "mse":
        per_step = (pred[..., 0] - y).pow(2)
    else:
        per_step = F.huber_loss(pred[..., 0], y, reduction="none", delta=delta)
    return (per_step * w).sum() / w.sum().clamp_min(1)
