"""Where a pretrained causal LM's attention goes, measured against the tensorized pattern.

Legend: B batch, H query heads, Hkv kv heads, n tokens, m fold order, dims ``(n_1, ..., n_m)``
coarsest first (docs/semantics.md), ``S_j = n_{j+1} * ... * n_m`` the token stride of dim j.

The stock model (eager attention, no tensorization) runs once; a registered attention function
hands every layer's probabilities ``p`` (B, H, n, n) to the analysis and drops them, so memory is
one layer's maps. For each layer and head it measures, averaged over batch rows and queries:

(a) Coverage by the fold (docs/semantics.md, "Causal attention and coverage"; core/plan.py). For a
    query t and an earlier key s <= t, s is

    - ``local``: in t's finest block (same ``t // n_m``): a key of the finest hop, exact;
    - ``direct``: otherwise a key of one of t's coarse hops: along dim j (same block of
      ``n_j * S_j`` tokens, smaller digit ``i_j``) either a fibre key (same finer coordinates,
      ``s = t (mod S_j)``) or, with ``coverage="full"``, a summary key (the last token of an earlier
      sibling block, ``s = S_j - 1 (mod S_j)``): attended to with its own score;
    - ``indirect``: reachable, but only through other tokens' mixtures (a summary token's block, or
      a chain of hops): the pattern can weight it only through those tokens, at block granularity;
    - ``rest``: no path from t (``coverage="axial"``: a digit of s exceeds t's); always 0 under
      ``"full"``, where every earlier token is reachable.

    ``covered = local + direct + indirect = 1 - rest``. ``level_mass[l]`` splits the same mass by
    distance: keys whose smallest common block with t holds ``n_{m-l} * ... * n_m`` tokens (l = 0:
    the finest block, l = m - 1: the whole sequence).
(b) Retrieval coverage (``retrieval=RetrievalConfig``): the mass on the keys the retrieval hop
    (adapters/text/retrieval.py) gives query t: its local window (``local = n_m``), the sink tokens
    before it, and every non-sink token of the top-k blocks ``retrieval_selection`` picks (one
    selection per kv head, shared by its query heads), for each k in ``ks``.
(c) Structure of the maps (per head, the mean over batch rows):

    - ``svd_energy[r]``: query-block x key-block maps ``p[Q_a, K_b]`` (blocks of ``n_m`` tokens,
      key block strictly earlier): the share of their total squared Frobenius norm held by each
      block's top-r singular values. A block near rank 1 is one a summary key can express (one
      weight per query times one mixture over the block).
    - ``kron_energy[split][r]``: for each split of the fold ``n = N_1 x N_2``
      (``N_1 = n_1 ... n_j``, ``N_2 = n_{j+1} ... n_m``, the map zero-padded to ``N_1 N_2``), the
      share of ``||p||_F^2`` held by the top-r Kronecker terms ``sum_i A_i (x) B_i`` (Van Loan and
      Pitsianis: the top singular values of the ``N_1^2 x N_2^2`` rearrangement of p).

>>> a = analyze_attention(model, ids, fold=(16, 64), retrieval=RetrievalConfig(block=16, sinks=4))
>>> a.to_frame().groupby("layer").mean()                              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._validation import check, check_choice, is_int
from ...core.folds import Fold
from ...core.plan import COVERAGES
from .cache import CausalFold
from .retrieval import RetrievalConfig, retrieval_selection
from .tensorize import is_tensorized

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "seqtensor.adapters.text.analysis needs transformers: pip install 'seqtensor[text]'"
    ) from err

__all__ = [
    "AttentionAnalysis",
    "attention_maps",
    "analyze_attention",
    "plot_attention_analysis",
    "for_each_layer",
    "coverage_shares",
    "region_labels",
    "retrieval_coverage",
    "block_svd_energy",
    "kronecker_rearrangement",
    "top_energy",
]

ANALYSIS_NAME = "seqtensor_analysis"
REGIONS = ("local", "direct", "indirect", "rest")
# Above this many rows the Kronecker rearrangement's top singular values are found by a randomized
# SVD (torch.svd_lowrank); below it exactly, from the Gram matrix of the smaller side.
_EXACT_KRON_SIDE = 1024


# ----------------------------------------------------------------------------- the stock maps


class _Done(Exception):
    """Raised by the hook after the last requested layer: the rest of the forward is not needed."""


def _analysis_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The model family's own eager attention; its probabilities go to the hook, not the caller."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    scale = module.scaling if scaling is None else scaling
    out, weights = eager(module, query, key, value, attention_mask, scale, 0.0, **kwargs)
    hook = getattr(module, "_seqtensor_analysis", None)
    if hook is not None:
        hook(module.layer_idx, query, key, weights)
    return out, None


AttentionInterface.register(ANALYSIS_NAME, _analysis_attention)
AttentionMaskInterface.register(ANALYSIS_NAME, eager_mask)


def _check_model(model: nn.Module) -> list[nn.Module]:
    check(
        isinstance(model, nn.Module),
        f"model must be a transformers causal LM, got {type(model).__name__}",
        TypeError,
    )
    check(
        not is_tensorized(model),
        "model is tensorized: analyze the stock model (untensorize(model) first)",
    )
    layers = getattr(getattr(model, "model", None), "layers", None)
    check(
        layers is not None and all(hasattr(x, "self_attn") for x in layers),
        f"{type(model).__name__} has no model.model.layers[i].self_attn: a Llama / Mistral / "
        "Qwen2-family ...ForCausalLM is needed",
    )
    attns = [layer.self_attn for layer in layers]
    for attn in attns:
        family = sys.modules[type(attn).__module__]
        check(
            hasattr(family, "eager_attention_forward") and hasattr(attn, "layer_idx"),
            f"{type(attn).__name__} has no eager attention function to read probabilities from",
        )
        check(
            getattr(attn, "is_causal", False) is True,
            f"{type(attn).__name__} (layer {attn.layer_idx}) is not causal: the analysis compares "
            "a causal model's attention with the causal tensorized pattern",
        )
    return attns


def _check_ids(input_ids: Any) -> torch.Tensor:
    check(
        isinstance(input_ids, torch.Tensor),
        f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}",
        TypeError,
    )
    check(
        input_ids.ndim == 2 and input_ids.shape[0] >= 1 and input_ids.shape[1] >= 1,
        f"input_ids must be (batch, tokens) with both >= 1, got shape {tuple(input_ids.shape)}",
    )
    check(
        not input_ids.is_floating_point() and not input_ids.is_complex(),
        f"input_ids must be integer token ids, got {input_ids.dtype}",
        TypeError,
    )
    return input_ids


def _check_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    layers = list(layers)
    check(len(layers) > 0, "layers must not be empty (None: every layer)")
    for i in layers:
        check(is_int(i) and 0 <= i < count, f"layers must be ints in [0, {count}), got {layers}")
    return sorted({int(i) for i in layers})


def for_each_layer(
    model: nn.Module,
    input_ids: torch.Tensor,
    fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Run the stock model on ``input_ids`` and call ``fn(layer, q, k, p)`` for each requested
    layer: q (B, H, n, d) and k (B, Hkv, n, d) as the attention receives them (after RoPE),
    p (B, H, n, n) the probabilities. Returns the layers visited."""
    attns = _check_model(model)
    input_ids = _check_ids(input_ids)
    wanted = _check_layers(layers, len(attns))
    last = wanted[-1]

    def hook(layer: int, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> None:
        if layer in wanted:
            fn(layer, q, k, p)
        if layer == last:
            raise _Done

    config = model.config
    previous = config._attn_implementation
    _set_attn_implementation(model, ANALYSIS_NAME)
    for attn in attns:
        attn._seqtensor_analysis = hook
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _Done:
        pass
    finally:
        for attn in attns:
            del attn._seqtensor_analysis
        _set_attn_implementation(model, previous)
    return wanted


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # versions without the setter
        model.config._attn_implementation = name


def attention_maps(
    model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """The stock model's attention probabilities: {layer: (B, H, n, n) float32}, from the model
    family's eager attention. Keeps every requested map: for long inputs, ask for few layers (or
    use ``analyze_attention``, which keeps one layer at a time)."""
    maps: dict[int, torch.Tensor] = {}
    for_each_layer(model, input_ids, lambda i, q, k, p: maps.__setitem__(i, p.float()), layers)
    return maps


# ----------------------------------------------------------------------------- the fold's regions


def _fold_dims(fold: Sequence[int] | Fold | CausalFold, n: int) -> tuple[int, ...]:
    """The fold's dims for n tokens, the coarsest cut to the blocks that hold tokens."""
    if isinstance(fold, CausalFold):
        dims = fold.for_length(n).dims
    else:
        check(
            isinstance(fold, (Fold, tuple, list)),
            f"fold must be a tuple of dims, a Fold or a CausalFold, got {type(fold).__name__}",
            TypeError,
        )
        dims = (fold if isinstance(fold, Fold) else Fold(tuple(fold))).for_length(n).dims
    block = math.prod(dims[1:])
    return (min(dims[0], -(-n // block)),) + tuple(dims[1:])


def region_labels(
    dims: Sequence[int], n: int, coverage: str = "full", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(region, level) labels of every (query t, key s) pair, both (n, n) int8: region 0..3 are
    ``REGIONS`` (local, direct, indirect, rest) and -1 for s > t; level as in ``level_mass``."""
    check_choice("coverage", coverage, COVERAGES)
    return _labels(
        tuple(int(d) for d in dims), int(n), coverage, str(torch.device(device or "cpu"))
    )


@functools.lru_cache(maxsize=2)  # a sweep of layers reuses one fold's labels (int8: n^2 bytes each)
def _labels(dims: tuple[int, ...], n: int, coverage: str, device: str):
    m = len(dims)
    t = torch.arange(n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    causal = s <= t
    strides = [math.prod(dims[j + 1 :]) for j in range(m)]
    local = (s // dims[-1] == t // dims[-1]) & causal
    direct = torch.zeros_like(causal)
    reachable = causal.clone() if coverage == "full" else torch.ones_like(causal)
    for j in range(m):
        S, nj = strides[j], dims[j]
        earlier = (s // S) % nj < (t // S) % nj
        if coverage == "axial":
            reachable &= (s // S) % nj <= (t // S) % nj
        if j == m - 1:
            continue  # the finest hop's keys are the local block
        same = s // (S * nj) == t // (S * nj)
        keys = s % S == t % S
        if coverage == "full":
            keys = keys | (s % S == S - 1)
        direct |= same & earlier & keys
    direct &= causal & ~local
    region = torch.full((n, n), -1, dtype=torch.int8, device=device)
    region[causal & ~reachable] = 3
    region[reachable & causal & ~local & ~direct] = 2
    region[direct] = 1
    region[local] = 0
    level = torch.zeros((n, n), dtype=torch.int8, device=device)
    for ell in range(1, m):
        width = math.prod(dims[m - ell :])  # tokens in a level-(ell - 1) block
        level[s // width != t // width] = ell
    return region, level


def coverage_shares(
    p: torch.Tensor,
    fold: Sequence[int] | Fold | CausalFold,
    coverage: str = "full",
    min_query: int = 0,
) -> torch.Tensor:
    """(a) for one layer's maps p (B, H, n, n): (H, 4) float64 mean shares of ``REGIONS``, then
    (H, m) by level, concatenated -> (H, 4 + m)."""
    n = p.shape[-1]
    dims = _fold_dims(fold, n)
    region, level = region_labels(dims, n, coverage, p.device)
    rows = slice(min_query, n)
    return torch.cat(
        [_label_mass(p, region, len(REGIONS), rows), _label_mass(p, level, len(dims), rows)], 1
    )


def _label_mass(p: torch.Tensor, labels: torch.Tensor, count: int, rows: slice) -> torch.Tensor:
    """Mean over batch rows and the queries ``rows`` of the mass on each label: p (B, H, n, n)
    -> (H, count) float64. Labels are shared by every batch row, so the rows are summed first;
    one weighted histogram per head (label -1, the future, goes to a dropped bin)."""
    B, H = p.shape[:2]
    weights = p[:, :, rows].sum(0)  # (H, R, n)
    index = (labels[rows].long() + 1).flatten()
    out = torch.zeros(H, count, dtype=torch.float64)
    for h in range(H):
        hist = torch.bincount(index, weights=weights[h].flatten().double(), minlength=count + 1)
        out[h] = hist[1 : count + 1].cpu() / (B * weights.shape[1])
    return out


# ----------------------------------------------------------------------------- retrieval


def _unrotate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Undo the model's RoPE on x (B, h, n, d) at positions 0..n-1 (q and k as the attention
    receives them, back to what ``positional="tensor_rope"`` hands the retrieval hop)."""
    n = x.shape[2]
    pos = torch.arange(n, device=x.device)[None]
    cos, sin = model.model.rotary_emb(x.transpose(1, 2), pos)  # (1, n, d), times attention_scaling
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    norm = cos**2 + sin**2  # the scaled rotation's inverse is its transpose over its squared norm
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x * cos - rotated_half * sin) / norm


def retrieval_coverage(
    q: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    local: int,
    config: RetrievalConfig | dict[str, Any],
    ks: Sequence[int],
    min_query: int = 0,
    rope_theta: float | None = None,
) -> torch.Tensor:
    """(b) for one layer: q (B, H, n, d), k (B, Hkv, n, d) as the retrieval hop receives them, p
    (B, H, n, n) the maps -> (H, len(ks)) float64: the mean over batch rows and queries from
    ``min_query`` of the mass on the hop's keys (local window of ``local`` tokens, sinks, the
    non-sink tokens of the top-k blocks ``retrieval_selection`` picks with the config's ranking:
    chunk, sharing, representative and memory anchor)."""
    ks = _check_ints("ks (top-k values)", ks, 0)
    config = RetrievalConfig.from_value(config)
    check(config is not None, "retrieval_coverage needs a RetrievalConfig")
    rows = slice(min_query, p.shape[2])
    B, H, n, _ = p.shape
    Hkv, G, block = k.shape[1], H // k.shape[1], config.block
    kmax = max(ks)
    pos = torch.arange(n, device=p.device)
    if config.sliding:
        starts = (pos - local + 1).clamp(min=0) // block * block
    else:
        starts = pos // local * local
    cum = torch.nn.functional.pad(p.cumsum(-1), (1, 0))  # (B, H, n, n + 1)
    rowsel = pos[:, None]

    def span(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # mass on keys [a_i, b_i)
        return cum.gather(-1, b.expand(B, H, n, 1)) - cum.gather(-1, a.expand(B, H, n, 1))

    base = span(starts[:, None], rowsel + 1) + span(
        torch.zeros_like(rowsel), starts.clamp(max=config.sinks)[:, None]
    )
    base = base[..., 0]  # (B, H, n)
    nb = -(-n // block)
    bm = torch.nn.functional.pad(p, (0, nb * block - n)).unflatten(-1, (nb, block))
    bm = (bm * (torch.arange(nb * block, device=p.device) >= config.sinks).view(nb, block)).sum(-1)
    if kmax > 0:
        selected = retrieval_selection(
            q,
            k,
            local,
            block,
            kmax,
            config.sinks,
            sliding=config.sliding,
            rope_theta=rope_theta,
            memory_distance=config.memory_distance,
            chunk=config.chunk,
            shared=config.shared,
            representative=config.representative,
            memory_anchor=config.memory_anchor,
        )
        sel = torch.full((B, Hkv, n, kmax), -1, dtype=torch.long, device=p.device)
        for i, blocks in enumerate(selected):
            sel[:, :, i, : blocks.shape[-1]] = blocks
        sel = sel.repeat_interleave(G, 1)  # (B, H, n, kmax): a kv head's selection, per query head
        got = bm.gather(-1, sel.clamp(min=0)) * (sel >= 0)
        got = torch.nn.functional.pad(got.cumsum(-1), (1, 0))  # got[..., k]: the top k blocks
    out = torch.zeros(H, len(ks), dtype=torch.float64)
    for c, kk in enumerate(ks):
        mass = base + (got[..., min(kk, kmax)] if kmax > 0 else 0)
        out[:, c] = mass[:, :, rows].double().mean((0, 2)).cpu()
    return out


# ----------------------------------------------------------------------------- structure


def top_energy(mats: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """For a batch of matrices (..., a, b): sum over the batch of each one's top-r squared singular
    values, over the sum of their squared Frobenius norms, for each r -> (len(ranks),) float64."""
    total = mats.double().square().sum().cpu()
    out = torch.zeros(len(ranks), dtype=torch.float64)
    if total == 0:
        return out
    a, b = mats.shape[-2:]
    # float64 where it is cheap (CPU); float32 on an accelerator, enough for 3-digit shares
    mats = mats.double() if mats.device.type == "cpu" else mats.float()
    if min(a, b) <= _EXACT_KRON_SIDE:
        gram = mats @ mats.transpose(-1, -2) if a <= b else mats.transpose(-1, -2) @ mats
        # eigenvalues on the host in float64: these Gram matrices are small, and float64 keeps
        # shares near 1 exact
        sq = torch.linalg.eigvalsh(gram.cpu().double()).clamp(min=0).flip(-1)  # descending
    else:
        q = min(max(ranks) + 16, a, b)
        sq = torch.svd_lowrank(mats, q=q, niter=6)[1].cpu().double().square()
    for c, r in enumerate(ranks):
        out[c] = sq[..., :r].sum() / total
    return out


def block_svd_energy(
    p: torch.Tensor,
    block: int,
    ranks: Sequence[int],
    max_pairs: int = 512,
    min_key_block: int = 0,
) -> torch.Tensor:
    """(c) p (B, H, n, n) -> (H, len(ranks)) ``svd_energy`` over (query block, earlier key block)
    pairs of ``block`` tokens, key blocks from ``min_key_block`` on (1: leave out the block holding
    the attention sinks, whose one strong column is rank 1 and outweighs the rest); at most
    ``max_pairs`` pairs, evenly spaced in the list ordered by query block then key block."""
    B, H, n, _ = p.shape
    nb = -(-n // block)
    pairs = [(a, b) for a in range(nb) for b in range(min_key_block, a)]
    out = torch.zeros(H, len(ranks), dtype=torch.float64)
    if not pairs:
        return out
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)]
    qa = torch.tensor([a for a, _ in pairs], device=p.device)
    kb = torch.tensor([b for _, b in pairs], device=p.device)
    padded = torch.nn.functional.pad(p, (0, nb * block - n, 0, nb * block - n))
    for h in range(H):
        blocks = padded[:, h].unflatten(1, (nb, block)).unflatten(3, (nb, block))
        blocks = blocks.permute(0, 1, 3, 2, 4)[:, qa, kb]  # (B, pairs, block, block)
        out[h] = top_energy(blocks, ranks)
    return out


def kronecker_rearrangement(p: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Van Loan's rearrangement: p (..., n, n) with n <= n1 n2, zero-padded to n1 n2 ->
    (..., n1^2, n2^2), row (i1, j1) holding the (i1, j1) block of n2 x n2. ``A (x) B`` becomes the
    rank-1 matrix ``vec(A) vec(B)^T``, so Kronecker rank = the rank of this matrix."""
    n = p.shape[-1]
    check(n <= n1 * n2, f"a {n} x {n} map does not fit {n1} x {n2} blocks")
    pad = n1 * n2 - n
    x = torch.nn.functional.pad(p, (0, pad, 0, pad)).unflatten(-1, (n1, n2)).unflatten(-3, (n1, n2))
    return x.movedim(-2, -3).flatten(-4, -3).flatten(-2, -1)


# ----------------------------------------------------------------------------- the analysis


@dataclass
class AttentionAnalysis:
    """Per layer and head measurements (see the module docstring); arrays indexed [layer row, head].

    local, direct, indirect, rest : (L, H) shares of the stock attention mass (sum to 1).
    level_mass : (L, H, m) the mass by level (0: finest block).
    retrieval : (L, H, len(ks)) mass on the retrieval hop's keys, or None without ``retrieval``.
    svd_energy : (L, H, len(ranks)); kron_energy : (L, H, len(splits), len(ranks)).
    """

    layers: list[int]
    heads: int
    n: int
    dims: tuple[int, ...]
    coverage: str
    min_query: int
    local: np.ndarray
    direct: np.ndarray
    indirect: np.ndarray
    rest: np.ndarray
    level_mass: np.ndarray
    ranks: tuple[int, ...]
    svd_block: int
    svd_energy: np.ndarray
    splits: tuple[tuple[int, int], ...]
    kron_energy: np.ndarray
    ks: tuple[int, ...] = ()
    retrieval_config: dict[str, Any] | None = None
    retrieval: np.ndarray | None = None

    @property
    def covered(self) -> np.ndarray:
        """(L, H) mass the pattern reaches: local + direct + indirect."""
        return 1.0 - self.rest

    def to_frame(self):
        """One row per (layer, head): the regions, ``level_<l>``, ``retrieval_k<k>``,
        ``svd_r<r>`` and ``kron_<N1>x<N2>_r<r>`` columns (needs pandas)."""
        import pandas as pd

        rows = []
        for li, layer in enumerate(self.layers):
            for h in range(self.heads):
                row: dict[str, Any] = {"layer": layer, "head": h}
                for name in REGIONS:
                    row[name] = float(getattr(self, name)[li, h])
                row["covered"] = float(self.covered[li, h])
                for ell in range(self.level_mass.shape[-1]):
                    row[f"level_{ell}"] = float(self.level_mass[li, h, ell])
                if self.retrieval is not None:
                    for c, k in enumerate(self.ks):
                        row[f"retrieval_k{k}"] = float(self.retrieval[li, h, c])
                for c, r in enumerate(self.ranks):
                    row[f"svd_r{r}"] = float(self.svd_energy[li, h, c])
                for si, (n1, n2) in enumerate(self.splits):
                    for c, r in enumerate(self.ranks):
                        row[f"kron_{n1}x{n2}_r{r}"] = float(self.kron_energy[li, h, si, c])
                rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Means over layers and heads (what a results file or a docs table reports)."""
        out: dict[str, Any] = {name: float(getattr(self, name).mean()) for name in REGIONS}
        out["covered"] = float(self.covered.mean())
        out["level_mass"] = self.level_mass.mean((0, 1)).tolist()
        if self.retrieval is not None:
            out["retrieval"] = dict(zip(map(str, self.ks), self.retrieval.mean((0, 1)).tolist()))
        out["svd_energy"] = dict(zip(map(str, self.ranks), self.svd_energy.mean((0, 1)).tolist()))
        out["kron_energy"] = {
            f"{n1}x{n2}": dict(zip(map(str, self.ranks), e.tolist()))
            for (n1, n2), e in zip(self.splits, self.kron_energy.mean((0, 1)))
        }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, arrays as nested lists, and ``summary()``."""
        out = {}
        for key, value in asdict(self).items():
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
        out["dims"] = list(self.dims)
        out["splits"] = [list(s) for s in self.splits]
        out["summary"] = self.summary()
        return out


def _check_ints(name: str, values: Sequence[int], low: int) -> tuple[int, ...]:
    values = tuple(values)
    check(len(values) > 0, f"{name} must not be empty")
    for v in values:
        check(is_int(v) and v >= low, f"{name} must be ints >= {low}, got {values}")
    return tuple(int(v) for v in values)


def analyze_attention(
    model: nn.Module,
    input_ids: torch.Tensor,
    fold: Sequence[int] | Fold | CausalFold,
    *,
    retrieval: RetrievalConfig | dict[str, Any] | None = None,
    ks: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
    ranks: Sequence[int] = (1, 2, 4, 8),
    layers: Sequence[int] | None = None,
    coverage: str = "full",
    positional: str = "rope",
    min_query: int = 0,
    max_block_pairs: int = 512,
) -> AttentionAnalysis:
    """Measure the stock model's attention on ``input_ids`` (B, n) against ``fold`` (dims, a
    ``Fold`` or a ``CausalFold``; it must cover n) and, with ``retrieval``, the retrieval hop at
    each top-k in ``ks``. One layer's maps are alive at a time.

    ``coverage``: the fold's causal coverage ("full" or "axial"). ``positional``: the q/k the
    retrieval hop would rank blocks with, "rope" (the model's, at true positions) or
    "tensor_rope" (unrotated, the hop rotating the query to its memory distance).
    ``min_query``: queries before it are left out of (a) and (b) (e.g. the first block, where
    every pattern is exact). ``max_block_pairs``: block pairs per head in ``svd_energy``.
    """
    check_choice("coverage", coverage, COVERAGES)
    check_choice("positional", positional, ("rope", "tensor_rope"))
    input_ids = _check_ids(input_ids)
    n = input_ids.shape[1]
    dims = _fold_dims(fold, n)
    ranks = _check_ints("ranks", ranks, 1)
    check(
        is_int(min_query) and 0 <= min_query < n, f"min_query must be in [0, {n}), got {min_query}"
    )
    check(is_int(max_block_pairs) and max_block_pairs >= 1, "max_block_pairs must be an int >= 1")
    config = RetrievalConfig.from_value(retrieval)
    if config is not None:
        ks = _check_ints("ks (top-k values)", ks, 0)
        check(
            dims[-1] % config.block == 0,
            f"the retrieval block ({config.block}) must divide the fold's finest dim ({dims[-1]})",
        )
    m = len(dims)
    splits = tuple((math.prod(dims[:j]), math.prod(dims[j:])) for j in range(1, m))
    rows = slice(min_query, n)
    theta = None
    if positional == "tensor_rope":
        params = getattr(model.config, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta") or getattr(model.config, "rope_theta", 10000.0))
    results: dict[int, dict[str, torch.Tensor]] = {}
    labels: dict[str, torch.Tensor] = {}

    def measure(layer: int, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> None:
        p = p.float()
        if not labels:
            labels["region"], labels["level"] = region_labels(dims, n, coverage, p.device)
        r: dict[str, torch.Tensor] = {
            "regions": _label_mass(p, labels["region"], len(REGIONS), rows),
            "levels": _label_mass(p, labels["level"], m, rows),
            "svd": block_svd_energy(p, dims[-1], ranks, max_block_pairs),
            "kron": torch.stack(
                [
                    torch.stack(
                        [
                            top_energy(kronecker_rearrangement(p[:, h], *s), ranks)
                            for h in range(p.shape[1])
                        ]
                    )
                    for s in splits
                ],
                1,
            )
            if splits
            else torch.zeros(p.shape[1], 0, len(ranks), dtype=torch.float64),
        }
        if config is not None:
            qq, kk = q.float(), k.float()
            if theta is not None:
                qq, kk = _unrotate(model, qq), _unrotate(model, kk)
            r["retrieval"] = retrieval_coverage(
                qq, kk, p, dims[-1], config, ks, min_query=min_query, rope_theta=theta
            )
        results[layer] = r

    visited = for_each_layer(model, input_ids, measure, layers)
    get = lambda key: np.stack([results[i][key].numpy() for i in visited])  # noqa: E731
    regions = get("regions")
    return AttentionAnalysis(
        layers=visited,
        heads=regions.shape[1],
        n=n,
        dims=dims,
        coverage=coverage,
        min_query=min_query,
        local=regions[..., 0],
        direct=regions[..., 1],
        indirect=regions[..., 2],
        rest=regions[..., 3],
        level_mass=get("levels"),
        ranks=ranks,
        svd_block=dims[-1],
        svd_energy=get("svd"),
        splits=splits,
        kron_energy=get("kron"),
        ks=tuple(ks) if config is not None else (),
        retrieval_config=None if config is None else config.to_dict(),
        retrieval=get("retrieval") if config is not None else None,
    )


# ----------------------------------------------------------------------------- the plot


def plot_attention_analysis(analysis: AttentionAnalysis, path: str) -> None:
    """Heatmaps (layer x head) of local, local + direct, retrieval at the middle k, top-1 block SVD
    energy and Kronecker rank-1 energy of the first split, and coverage against k (needs
    matplotlib)."""
    try:  # a Figure, not pyplot: no backend or global state of the caller's is touched
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_attention_analysis needs matplotlib: pip install matplotlib"
        ) from err
    a = analysis
    panels = [("local block", a.local), ("local + direct keys", a.local + a.direct)]
    if a.retrieval is not None:
        mid = len(a.ks) // 2
        panels.append((f"retrieval, k={a.ks[mid]}", a.retrieval[..., mid]))
    panels.append((f"block SVD energy, r={a.ranks[0]}", a.svd_energy[..., 0]))
    if a.splits:
        n1, n2 = a.splits[0]
        panels.append((f"Kronecker {n1}x{n2}, r={a.ranks[0]}", a.kron_energy[:, :, 0, 0]))
    count = len(panels) + (a.retrieval is not None)
    cols = min(3, count)
    rows = -(-count // cols)
    height = 1.6 + 0.09 * len(a.layers)
    fig = Figure(figsize=(4.2 * cols, height * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    axes = axes.flatten()
    for ax in axes[count:]:
        ax.axis("off")
    step = max(1, len(a.layers) // 10)
    for ax, (title, values) in zip(axes, panels):
        im = ax.imshow(values, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(a.heads), [str(h) for h in range(a.heads)], fontsize=7)
        ticks = range(0, len(a.layers), step)
        ax.set_yticks(ticks, [str(a.layers[t]) for t in ticks], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if a.retrieval is not None:
        ax = axes[count - 1]
        per_layer = a.retrieval.mean(1)  # (L, len(ks))
        for li in range(len(a.layers)):
            ax.plot(
                a.ks,
                per_layer[li],
                color=colormaps["viridis"](li / max(1, len(a.layers) - 1)),
                lw=0.7,
            )
        ax.plot(a.ks, a.retrieval.mean((0, 1)), color="k", lw=2, label="mean")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-k blocks")
        ax.set_ylabel("stock mass covered")
        ax.set_title("retrieval coverage vs k (per layer)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"attention of {len(a.layers)} layers, n={a.n}, fold {a.dims}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
