"""Positional schemes, each a small module applied to q and k.

Two kinds (``per_hop``):

- per-hop (``TensorRoPE``): applied inside every hop, with the token's coordinate along that
  hop's dim as its position. Positions stay below n_j whatever n is, which is what lets a model
  extrapolate far past its training length (docs/semantics.md, "Positions").
- global (``RoPE``, ``Sinusoidal``, ``Learned``): applied once to q and k before folding, with the
  global token index (or caller-given ``positions``) as position.

Rotary convention: Llama / Hugging Face ``rotate_half`` (the two halves of the head dim pair up),
so a pretrained model's q and k rotate exactly as they did in training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import check, check_choice

__all__ = [
    "PositionalScheme",
    "TensorRoPE",
    "RoPE",
    "Sinusoidal",
    "Learned",
    "make_positional",
    "POSITIONAL_CHOICES",
    "rotate",
]


def _angles(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, device
) -> torch.Tensor:
    """Rotary angles ``positions x inv_freq``: (..., L) -> (..., L, d/2) in ``dtype``."""
    return positions.to(dtype).unsqueeze(-1) * inv_freq.to(device=device, dtype=dtype)


def rotate(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0
) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., L, d) at ``positions`` broadcastable to (..., L).

    Angles are computed in float32 (float64 for float64 inputs) and the result cast back.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = _angles(positions, inv_freq, work, x.device)  # (..., L, d/2)
    cos = torch.cos(angles) * mscale
    sin = torch.sin(angles) * mscale
    x1, x2 = x.to(work).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


class PositionalScheme(nn.Module):
    """Base class. ``per_hop`` schemes implement ``hop``; global ones implement ``apply``.

    ``dim``: the head dim the scheme was built for (None: any).
    """

    per_hop: bool = False
    dim: int | None = None

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16) would round inv_freq, and the angles at position ~4k would then be off
        # by radians: the buffer follows the device, never a lower precision
        inv = getattr(self, "inv_freq", None)
        super()._apply(fn, recurse)
        if inv is not None and self.inv_freq.dtype != inv.dtype:
            self.inv_freq = inv.to(self.inv_freq.device)
        return self

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global schemes: return q, k (B, H, n, d) with positions applied (identity by default)."""
        return q, k

    def hop(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Per-hop schemes: x (..., n_j, d) at coordinates ``positions`` (n_j,) (identity by
        default)."""
        return x


class TensorRoPE(PositionalScheme):
    """RoPE whose position in hop j is the coordinate i_j (summary tokens: b_j).

    Parameters
    ----------
    head_dim : even head dim d.
    base : RoPE base (theta).
    """

    per_hop = True

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check(
            head_dim > 0 and head_dim % 2 == 0,
            f"head_dim must be a positive even int, got {head_dim}",
        )
        check(base > 1.0, f"base must be > 1, got {base}")
        self.head_dim, self.base = head_dim, float(base)
        self.dim = head_dim
        self.register_buffer("inv_freq", _inv_freq(head_dim, base), persistent=False)

    def hop(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, positions, self.inv_freq)

    def rotation_table(self, positions: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(>= positions, d) contiguous [cos | sin] of ``pos * inv_freq`` for pos = 0, 1, ...

        The kernels' table, built once per (dtype, device) and grown when more positions are asked
        for: rebuilding it per call cost a host-to-device copy and several launches. Rebuilt if
        ``inv_freq`` changes (moved, replaced or edited in place).
        """
        device = torch.device(device)
        key = (dtype, device)
        f = self.inv_freq
        stamp = (f.data_ptr(), f._version, f.device, f.dtype)
        tables = self.__dict__.setdefault("_rotation_tables", {})
        hit = tables.get(key)
        if hit is not None and hit[0] == stamp and hit[1].shape[0] >= positions:
            return hit[1]
        rows = max(positions, 0 if hit is None else hit[1].shape[0])
        pos = torch.arange(rows, dtype=torch.float64, device=device)
        angles = pos[:, None] * f.to(device=device, dtype=torch.float64)[None, :]
        table = torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype).contiguous()
        # inv_freq is kept alive with the stamp, so its data_ptr cannot be reused by another tensor
        tables[key] = (stamp, table, f)
        return table

    def phase(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rotation as unit complex numbers (len(positions), d/2) for real ``dtype`` float32/64:
        ``view_as_complex`` of interleaved pairs (x1_i, x2_i) times it equals ``hop``."""
        angles = _angles(positions, self.inv_freq, dtype, positions.device)
        return torch.polar(torch.ones_like(angles), angles)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


class RoPE(PositionalScheme):
    """Ordinary 1-D RoPE on the global index, applied once before folding.

    Parameters
    ----------
    head_dim : even head dim d.
    base : RoPE base (theta).
    scaling : None, "linear" (position interpolation), "ntk" (base stretched by
        ``factor ** (d / (d - 2))``) or "yarn" (frequency-wise blend + attention factor).
    factor : context extension factor for the scaling.
    original_max_len : training context of the model (YaRN needs it).
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        scaling: str | None = None,
        factor: float = 1.0,
        original_max_len: int = 4096,
    ) -> None:
        super().__init__()
        check(
            head_dim > 0 and head_dim % 2 == 0,
            f"head_dim must be a positive even int, got {head_dim}",
        )
        check_choice("scaling", scaling, (None, "linear", "ntk", "yarn"))
        check(factor >= 1.0, f"factor must be >= 1, got {factor}")
        self.head_dim, self.base, self.scaling, self.factor = (
            head_dim,
            float(base),
            scaling,
            float(factor),
        )
        self.dim = head_dim
        self.original_max_len = original_max_len
        self.position_scale, self.mscale = 1.0, 1.0
        if scaling == "linear":
            inv_freq = _inv_freq(head_dim, base)
            self.position_scale = 1.0 / factor
        elif scaling == "ntk":
            inv_freq = _inv_freq(head_dim, base * factor ** (head_dim / (head_dim - 2)))
        elif scaling == "yarn":
            inv_freq, self.mscale = _yarn_inv_freq(head_dim, base, factor, original_max_len)
        else:
            inv_freq = _inv_freq(head_dim, base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def apply(self, q, k, positions=None):
        n = q.shape[-2]
        if positions is None:
            positions = torch.arange(n, device=q.device)
        positions = positions * self.position_scale
        if positions.ndim == 2:  # (B, n) -> broadcast over heads
            positions = positions[:, None, :]
        return rotate(q, positions, self.inv_freq, self.mscale), rotate(
            k, positions, self.inv_freq, self.mscale
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, scaling={self.scaling}, "
            f"factor={self.factor}"
        )


def _yarn_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    original_max_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
):
    """YaRN (Peng et al. 2023, arXiv 2309.00071): interpolate low frequencies only, scale logits."""

    def correction_dim(rotations: float) -> float:
        return (
            head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    extrapolation = _inv_freq(head_dim, base)
    interpolation = extrapolation / factor
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(
        0, 1
    )
    keep = 1.0 - ramp  # 1 where frequencies are high (kept), 0 where interpolated
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, mscale


class Sinusoidal(PositionalScheme):
    """Absolute sinusoidal encoding (Vaswani et al.) added to q and k."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check(dim > 0 and dim % 2 == 0, f"dim must be a positive even int, got {dim}")
        self.dim = dim
        self.register_buffer("inv_freq", _inv_freq(dim, base), persistent=False)

    def encoding(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        angles = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(positions.device)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)

    def apply(self, q, k, positions=None):
        if positions is None:
            positions = torch.arange(q.shape[-2], device=q.device)
        if positions.ndim == 2:
            positions = positions[:, None, :]
        pe = self.encoding(positions, q.dtype)
        return q + pe, k + pe


class Learned(PositionalScheme):
    """Learned absolute position vectors added to q and k (positions must be < max_len)."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        check(max_len > 0 and dim > 0, f"max_len and dim must be positive, got {max_len}, {dim}")
        self.max_len, self.dim = max_len, dim
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def apply(self, q, k, positions=None):
        n = q.shape[-2]
        if positions is None:
            check(n <= self.max_len, f"sequence length {n} exceeds Learned max_len={self.max_len}")
            positions = torch.arange(n, device=q.device)
        elif int(positions.max()) >= self.max_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds Learned max_len={self.max_len}"
            )
        if positions.ndim == 2:
            positions = positions[:, None, :]
        pe = self.embedding(positions).to(q.dtype)
        return q + pe, k + pe


# The names make_positional accepts: the one list every config of a positional scheme checks
# against.
POSITIONAL_CHOICES = ("tensor_rope", "rope", "sinusoidal", "learned", "none")


def make_positional(
    spec: str | PositionalScheme | None, head_dim: int, max_len: int = 8192
) -> PositionalScheme | None:
    """Build a scheme from a name ("tensor_rope", "rope", "sinusoidal", "learned", "none") or pass
    one through."""
    if spec is None or isinstance(spec, PositionalScheme):
        return spec
    check_choice("positional", spec, POSITIONAL_CHOICES)
    if spec == "tensor_rope":
        return TensorRoPE(head_dim)
    if spec == "rope":
        return RoPE(head_dim)
    if spec == "sinusoidal":
        return Sinusoidal(head_dim)
    if spec == "learned":
        return Learned(max_len, head_dim)
    return None
