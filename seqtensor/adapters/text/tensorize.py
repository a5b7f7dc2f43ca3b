"""Tensorize a pretrained Hugging Face causal LM in place: Llama, Mistral and Qwen2 families.

Legend: B batch, H query heads, Hkv kv heads, L tokens in this call, T tokens in the cache
(padding included), n sequence length, d head dim, m fold order.

>>> model = AutoModelForCausalLM.from_pretrained(...)              # doctest: +SKIP
>>> tensorize(model, fold=(16, 32, 32))                            # doctest: +SKIP
>>> model.generate(**tokenizer("Hello", return_tensors="pt"))      # doctest: +SKIP

How it plugs into transformers (docs/data.md, "Transformers integration facts")
------------------------------------------------------------------------------------
- One attention function and one mask function are registered under the name ``"seqtensor"`` in
  ``AttentionInterface`` / ``AttentionMaskInterface``; ``tensorize`` switches the model to it.
  The mask function hands the attention the 2-D padding mask itself (or None: no padding), so no
  n x n mask is ever built. A None mask is a causal call without padding.
- RoPE is applied before the attention function. With ``positional="tensor_rope"`` the model's
  rotary embedding is replaced by an identity (cos = 1, sin = 0, exact) and tensor RoPE (frequencies
  from the model's rope_theta, without its RoPE scaling such as llama3's; position = coordinate in
  the hop's dim) is applied inside every hop; the Hugging Face cache then holds unrotated keys.
  ``positional="rope"`` keeps the model's RoPE (and its configured scaling): with an order-1 fold
  this is the stock model.
- Padding: tokens are compacted (real tokens first, in order) before folding, so a token's fold
  coordinates are its index among the real tokens and do not shift with left padding; the
  padding then sits after the sequence, where causal attention never reads it.
- ``position_ids`` are used by the model's own RoPE (``positional="rope"``); the tensorized
  positions come from the fold coordinates, as the method defines them.
- Sliding windows (Mistral, Qwen2) are turned off: the fold already decides which tokens meet,
  and incremental decoding needs every key in the cache. ``untensorize`` restores them.
- Generation: the incremental state of ``text_cache.LayerCache`` is attached to the Hugging Face
  cache object (``cache._seqtensor_states[layer_idx]``), so it lives and dies with it, and is
  reordered with it (beam search). Prefill with a cache also computes the value levels that
  decoding needs (sum_{l<m} l extra hops); pass ``use_cache=False`` for scoring. V rows that no
  later step reads (older than the current finest block) are dropped from ``DynamicCache`` layers.

Saving: ``save_pretrained`` writes the weights and ``config.seqtensor`` (the settings);
``load_tensorized(path)`` is ``from_pretrained`` + ``tensorize`` with those settings.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..._validation import check, check_choice
from ...attention import resolve_backend, tensorized_attention
from ...core.folds import Fold
from ...core.plan import COVERAGES
from ...core.positional import TensorRoPE
from .cache import CausalFold, LayerCache, block_levels
from .retrieval import RetrievalConfig, RetrievalState, retrieval_tensorized_attention

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "seqtensor.adapters.text.tensorize needs transformers: pip install 'seqtensor[text]'"
    ) from err

__all__ = [
    "CausalFold",
    "TextAdapterConfig",
    "tensorize",
    "untensorize",
    "is_tensorized",
    "load_tensorized",
    "cache_memory_bytes",
    "ATTENTION_NAME",
]

ATTENTION_NAME = "seqtensor"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_POSITIONALS = ("tensor_rope", "rope", "none")


@dataclass
class TextAdapterConfig:
    """Settings of a tensorized model; stored as ``model.config.seqtensor`` (a dict).

    Attributes
    ----------
    fold : dims of the ``CausalFold`` (coarsest first; the coarsest grows with n).
    positional : "tensor_rope" (RoPE on hop coordinates), "rope" (the model's own RoPE on the
        global index, with its configured scaling) or "none".
    coverage : causal coverage, "full" (every earlier token reachable) or "axial".
    backend : tensorized-attention backend, "auto", "reference" or "triton".
    top_level_cache : how generation stores the top hop's input, the largest part of the cache:
        "native" (the model's dtype; exact) or "int8" (a per-row scale; ~1% error, half the bytes
        of bf16).
    hop_gate : None (the method as docs/semantics.md defines it) or the initial value in (0, 1) of learned hop
        gates: per layer, head and coarse level, ``V <- V + g * (hop(V) - V)``
        (``tensorized_attention(hop_gates=...)``). Levels beyond those trained use the coarsest
        trained gate.
    retrieval : None, or the settings of the retrieval hop (``RetrievalConfig`` or its dict): it
        replaces the finest hop, each query also attending to its top-k earlier blocks.
    """

    fold: tuple[int, ...] = (32, 32, 32)  # CausalFold dims, coarsest first
    positional: str = "tensor_rope"  # where positions come from (see above)
    coverage: str = "full"  # causal coverage scheme
    backend: str = "auto"  # "auto": Triton on CUDA, the reference elsewhere
    top_level_cache: str = "native"  # "native" or "int8"
    hop_gate: float | None = None  # initial learned gate of the coarse hops; None: no gates
    retrieval: dict[str, Any] | None = None  # RetrievalConfig as a dict; None: no retrieval hop

    def __post_init__(self) -> None:
        self.fold = CausalFold(tuple(self.fold)).dims
        check(
            self.hop_gate is None
            or (
                isinstance(self.hop_gate, (int, float))
                and not isinstance(self.hop_gate, bool)
                and 0 < self.hop_gate < 1
            ),
            f"hop_gate must be None or a number in (0, 1), got {self.hop_gate!r}",
        )
        check(
            self.hop_gate is None or len(self.fold) >= 2,
            f"hop_gate needs a fold of order >= 2 (coarse hops to gate), got {self.fold}",
        )
        check_choice("positional", self.positional, _POSITIONALS)
        check_choice("coverage", self.coverage, COVERAGES)
        check_choice("top_level_cache", self.top_level_cache, ("native", "int8"))
        retrieval = RetrievalConfig.from_value(self.retrieval)
        if retrieval is not None:
            self.retrieval = retrieval.to_dict()
            check(
                self.fold[-1] % retrieval.block == 0,
                f"retrieval block {retrieval.block} must divide the finest fold dim "
                f"{self.fold[-1]}",
            )
            check(
                self.hop_gate is None,
                "hop_gate with the retrieval hop is not supported: the coarse hops after it run "
                "ungated",
            )
            check(
                not retrieval.coarse_hops or len(self.fold) == 1 or self.coverage == "axial",
                "retrieval with coarse_hops=True needs coverage='axial' (summary keys after the "
                "retrieval hop are not implemented)",
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fold"] = list(self.fold)
        return out

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TextAdapterConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.items() if k in known})


class _LayerSettings:
    """What the attention function needs for one model (shared by its layers)."""

    def __init__(self, config: TextAdapterConfig, head_dim: int, rope_theta: float) -> None:
        self.config = config
        self.fold = CausalFold(config.fold)
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self.retrieval = RetrievalConfig.from_value(config.retrieval)
        self._positional: dict[torch.device, TensorRoPE] = {}

    def positional(self, device: torch.device) -> TensorRoPE | None:
        """Per-hop scheme on ``device`` (cached: no host-to-device copy per call)."""
        if self.config.positional != "tensor_rope":
            return None
        if device not in self._positional:
            self._positional[device] = TensorRoPE(self.head_dim, base=self.rope_theta).to(device)
        return self._positional[device]


class _IdentityRotary(nn.Module):
    """Stands in for the model's rotary embedding: cos = 1, sin = 0, so RoPE is the identity.

    Keeps the original as a submodule (no persistent buffers: the state dict is unchanged).
    """

    def __init__(self, original: nn.Module, head_dim: int) -> None:
        super().__init__()
        self.original, self.head_dim = original, head_dim

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)  # (B|1, L, d), broadcast views: no allocation
        return x.new_ones(()).expand(shape), x.new_zeros(()).expand(shape)


# ----------------------------------------------------------------------------- registry functions


def _padding_mask(
    *args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, **kwargs
):
    """Mask function: the 2-D (B, T) keep-mask when some token is padding, else None."""
    if attention_mask is None or attention_mask.ndim != 2:
        return attention_mask
    mask = attention_mask.to(torch.bool)
    if kv_length is not None:
        mask = mask[:, -kv_length:]
    return None if bool(mask.all()) else mask


def _key_mask(
    attention_mask: torch.Tensor | None, L: int, T: int, validate: bool = True
) -> torch.Tensor | None:
    """(B, T) bool keep-mask from what transformers passes (2-D from ours, 4-D if a user built one).

    A 4-D mask must be causal attention over the kept keys, nothing else (packed documents or other
    patterns would be silently ignored by the fold, so they raise; ``validate=False`` skips that
    check).
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 4:
        full = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        check(
            full.shape[-2:] == (L, T),
            f"4-D attention mask of shape {tuple(full.shape)}, expected (..., {L}, {T})",
        )
        keep = full[:, 0, -1, :]  # the last query row of a causal mask sees every kept key
        causal = (
            torch.arange(T, device=full.device)
            <= torch.arange(T - L, T, device=full.device)[:, None]
        )  # (L, T)
        real_rows = keep[:, None, T - L :, None]
        # a padding query's row sees nothing, or everything (transformers unmasks such rows for
        # SDPA)
        blank = full.all(-1, keepdim=True) | ~full.any(-1, keepdim=True)
        check(
            not validate
            or bool(((full == (causal & keep[:, None, None, :])) | (~real_rows & blank)).all()),
            "a 4-D attention mask other than causal attention over the kept tokens (e.g. packed "
            "documents) is not "
            "supported by tensorized attention: the fold decides which tokens meet; run documents "
            "as separate rows",
        )
        attention_mask = keep
    check(
        attention_mask.shape[-1] == T,
        f"attention mask covers {attention_mask.shape[-1]} keys, expected {T}",
    )
    return attention_mask.to(torch.bool)


def _check_one_sequence_per_row(
    position_ids: torch.Tensor | None, mask: torch.Tensor | None
) -> None:
    """Packed documents (position ids restarting inside a row, which transformers turns into a
    block-diagonal mask) would attend to each other through the fold: refuse them."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return
    falls = position_ids[..., 1:] <= position_ids[..., :-1]
    if mask is not None:  # left padding carries arbitrary positions
        falls = falls & mask[:, 1:] & mask[:, :-1]
    check(
        not bool(falls.any()),
        "position_ids restart inside a row (packed documents): tensorized attention cannot keep "
        "documents "
        "apart within one row; run them as separate rows (with left padding)",
    )


def _common_dtype(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype. Under autocast with fp32 weights the model's RoPE multiplies bf16
    projections by fp32 cos/sin, so q and k arrive in fp32 and v in bf16; SDPA would run in the
    autocast dtype, and so do we."""
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1:
        return xs
    device_type = xs[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = functools.reduce(torch.promote_types, dtypes)
    return tuple(x.to(dtype) for x in xs)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function. query (B, H, L, d), key/value (B, Hkv, T, d) -> ((B, L, H,
    d), None).

    T == L is a prefill; T > L means T - L tokens come from the cache (incremental decoding).
    Attention-probability dropout is not applied (none of the supported models train with it).
    """
    settings: _LayerSettings | None = getattr(module, "_seqtensor", None)
    check(
        settings is not None,
        f"{type(module).__name__} was switched to '{ATTENTION_NAME}' attention without "
        "seqtensor.adapters.text.tensorize.tensorize",
    )
    L, T = query.shape[2], key.shape[2]
    query, key, value = _common_dtype(query, key, value)
    scale = module.scaling if scaling is None else scaling
    first_layer = (
        module.layer_idx == 0
    )  # checks that read the device once per forward, not per layer
    mask = _key_mask(attention_mask, L, T, validate=first_layer)
    cache = getattr(module, "_seqtensor_cache", None)
    if cache is not None:
        _check_dynamic(cache, module.layer_idx)
    if settings.retrieval is not None:
        out = _retrieval_call(
            settings, query, key, value, mask, scale, L, T, cache, module.layer_idx
        )
        return out.transpose(1, 2).contiguous(), None
    if T == L:
        if first_layer:
            _check_one_sequence_per_row(kwargs.get("position_ids"), mask)
        gates = _hop_gates(module, settings.fold.order)
        out, state = _prefill(
            settings, query, key, value, mask, scale, with_state=cache is not None, hop_gates=gates
        )
        if cache is not None:
            _states(cache)[module.layer_idx] = state
            _trim_values(cache, module.layer_idx, state)
    else:
        state = _states(cache).get(module.layer_idx) if cache is not None else None
        check(
            isinstance(state, LayerCache),
            f"layer {module.layer_idx}: the cache holds {T - L} tokens that were not prefilled by "
            "tensorized attention without the retrieval hop (prefill after tensorize, with the "
            "cache object that generation then uses)",
        )
        check(
            state.stored == T - L,
            f"layer {module.layer_idx}: the cache holds {T - L} tokens but the tensorized state "
            f"{state.stored} "
            "(was the cache cropped or edited outside generation?)",
        )
        check(
            (state.fold, state.coverage) == (settings.fold, settings.config.coverage)
            and (state.positional is None) == (settings.config.positional != "tensor_rope"),
            f"layer {module.layer_idx}: the cache was prefilled with fold {state.fold.dims} "
            f"({state.coverage}) but the "
            f"model is now tensorized with {settings.fold.dims} ({settings.config.coverage}, "
            f"{settings.config.positional}): "
            "prefill again after tensorize",
        )
        check(
            mask is None or not first_layer or bool(mask[:, T - L :].all()),
            "padding among the new tokens of a cached call: tensorized generation supports left "
            "padding in the "
            "prefill only",
        )
        out = state.step(query, key, value, plan=_shared_plan(cache, state, L, query.dtype))
        _trim_values(cache, module.layer_idx, state)
    return out.transpose(1, 2).contiguous(), None


def _retrieval_call(
    settings: _LayerSettings, query, key, value, mask, scale, L: int, T: int, cache, layer: int
):
    """The retrieval hop (and the coarse hops after it, if on). The Hugging Face cache keeps every
    key and value; a ``RetrievalState`` attached to it (prefilled with the cache) keeps the block
    representatives and recent ranking queries, so a step ranks blocks without reading every key.
    The hop never reads a token after the query, so a step equals the whole-sequence call."""
    cfg, retrieval = settings.config, settings.retrieval
    check(
        mask is None or bool(mask.all()),
        "padding is not supported with the retrieval hop: one unpadded sequence per row",
    )
    # "rope": q and k arrive rotated at their true positions; "tensor_rope": unrotated, and the hop
    # applies the model's RoPE with retrieved tokens at a fixed distance; "none": no positions
    theta = settings.rope_theta if cfg.positional == "tensor_rope" else None
    options = dict(
        retrieval.hop_options(), local=settings.fold.dims[-1], scale=scale, rope_theta=theta
    )
    if T == L:
        if cache is None or (retrieval.coarse_hops and settings.fold.order > 1):
            return retrieval_tensorized_attention(
                query,
                key,
                value,
                settings.fold.dims,
                retrieval,
                scale=scale,
                rope_theta=theta,
                coverage=cfg.coverage,
                positional=settings.positional(query.device),
                backend=cfg.backend,
            )
        out, _states(cache)[layer] = RetrievalState.prefill(query, key, value, options)
        return out
    check(
        not retrieval.coarse_hops or settings.fold.order == 1,
        "cached generation with coarse hops after the retrieval hop is not implemented: "
        "use_cache=False, or coarse_hops=False",
        NotImplementedError,
    )
    state = _states(cache).get(layer) if cache is not None else None
    check(
        isinstance(state, RetrievalState) and state.options == options,
        f"layer {layer}: the cache holds {T - L} tokens that were not prefilled by this "
        "retrieval hop (prefill after tensorize, with the cache object that generation then uses)",
    )
    return state.step(query, key, value)


def _check_dynamic(cache, layer_idx: int) -> None:
    """Fixed-size cache layers (static, sliding window) hold max_cache_len slots, not the tokens
    seen."""
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    check(
        getattr(layer, "max_cache_len", None) is None,
        f"{type(layer).__name__} caches are not supported by tensorized generation (its K/V length "
        "is the fixed "
        "max_cache_len, not the tokens seen): use the default DynamicCache (no "
        "cache_implementation)",
    )


def _trim_values(cache, layer_idx: int, state: LayerCache) -> None:
    """Drop the V rows of a ``DynamicLayer`` that no later step reads
    (``LayerCache.values_needed_from``).

    Trimmed once at least a finest block's worth is droppable, into a copy of at most two finest
    blocks (a slice would keep the whole tensor alive). Other cache layers (static, sliding-window,
    quantized) keep all of V. A cache trimmed this way has V shorter than K: it can only be
    continued by a tensorized model.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or type(layers[layer_idx]) is not DynamicLayer:
        return
    keep = state.values_needed_from()
    if keep is None or keep - state.v_start < state.fold.hop_size(0):
        return
    layer = layers[layer_idx]
    layer.values = layer.values[:, :, keep - state.v_start :].clone()
    state.v_start = keep


def _shared_plan(cache, state: LayerCache, L: int, dtype: torch.dtype):
    """The step's key indices and rotation tables, built by the first layer and reused by the
    rest."""
    key = (state.stored, L, dtype, state.length.device)
    cached = getattr(cache, "_seqtensor_plan", None)
    if cached is None or cached[0] != key:
        cached = (key, state.plan(L, dtype))
        cache._seqtensor_plan = cached
    return cached[1]


def _hop_gates(module: nn.Module, m: int) -> torch.Tensor | None:
    """The layer's (H, m - 1) gates for an order-m fold: levels past the trained ones repeat the
    coarsest."""
    logits = getattr(module, "hop_gate_logits", None)
    if logits is None:
        return None
    extra = m - 1 - logits.shape[1]
    if extra > 0:
        logits = torch.cat([logits, logits[:, -1:].expand(-1, extra)], dim=1)
    return logits[:, : m - 1].sigmoid()


def _prefill(
    settings: _LayerSettings,
    q,
    k,
    v,
    mask,
    scale,
    *,
    with_state: bool,
    hop_gates: torch.Tensor | None = None,
):
    """Whole-sequence tensorized attention on the compacted sequence, and the decoding state."""
    B, H, n, _ = q.shape
    device = q.device
    order = None
    if mask is not None:
        # real tokens first, in order: fold coordinates ignore padding
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, n)
        q, k, v = (x.gather(2, order[:, None, :, None].expand_as(x)) for x in (q, k, v))
    cfg = settings.config
    positional = settings.positional(device)
    out = tensorized_attention(
        q,
        k,
        v,
        settings.fold.for_length(n),
        causal=True,
        coverage=cfg.coverage,
        positional=positional,
        scale=scale,
        backend=cfg.backend,
        hop_gates=hop_gates,
    )  # (B, H, n, dv), compact order
    state = None
    if with_state:
        length = torch.full((B,), n, device=device) if mask is None else mask.sum(1)
        offset = n - length
        if mask is not None:
            left = torch.arange(n, device=device) >= offset[:, None]
            check(
                bool((left == mask).all()),
                "cached generation with tensorized attention needs left padding (pad tokens first)",
            )
        levels = block_levels(
            q,
            k,
            v,
            settings.fold,
            coverage=cfg.coverage,
            positional=positional,
            scale=scale,
            backend=cfg.backend,
            hop_gates=hop_gates,
        )
        state = LayerCache(
            settings.fold,
            coverage=cfg.coverage,
            positional=positional,
            scale=scale,
            length=length,
            offset=offset,
            levels=levels,
            stored=n,
            top_int8=cfg.top_level_cache == "int8",
            hop_gates=None if hop_gates is None else hop_gates.detach(),
        )
    if order is not None:
        out = out.gather(2, torch.argsort(order, dim=1)[:, None, :, None].expand_as(out))
        out = out * mask[:, None, :, None]
    return out, state


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


# ----------------------------------------------------------------------------- cache integration


def _states(cache) -> dict[int, LayerCache | RetrievalState]:
    """The per-layer decoding states attached to a Hugging Face cache object."""
    states = getattr(cache, "_seqtensor_states", None)
    if states is None:
        states = {}
        cache._seqtensor_states = states
        _follow_batch_edits(cache)
    return states


class _FollowBatchEdit:
    """``cache.<name>(arg)`` (beam search's batch edits), then the same rows kept in the tensorized
    states.

    Stored on the cache, it holds the cache only weakly: a strong reference would be a cycle, and
    the cache (gigabytes at long contexts) would outlive its last user until the cyclic collector
    runs. A deep copy of the cache (branching a prefilled prompt) gets an edit bound to the copy.
    """

    def __init__(self, cache, name: str) -> None:
        self.cache, self.name = weakref.ref(cache), name

    def __deepcopy__(self, memo) -> _FollowBatchEdit:
        # the cache being copied is registered in memo before its attributes are copied
        copied = memo.get(id(self.cache()))
        return _FollowBatchEdit(copied if copied is not None else self.cache(), self.name)

    def __call__(self, arg) -> None:
        cache = self.cache()
        getattr(type(cache), self.name)(cache, arg)
        states = cache._seqtensor_states
        if not states:
            return
        index = arg
        if self.name == "batch_repeat_interleave":
            index = torch.arange(next(iter(states.values())).length.shape[0]).repeat_interleave(arg)
        for state in states.values():
            state.select(index.to(state.length.device))


def _refuse_crop(*args, **kwargs):
    raise NotImplementedError(
        "a tensorized cache cannot be cropped (assisted / speculative decoding): its value levels "
        "are rings that keep only the current blocks"
    )


def _follow_batch_edits(cache) -> None:
    """Make the cache's batch edits (beam search) apply to our states too; refuse crops."""
    for name in ("reorder_cache", "batch_select_indices", "batch_repeat_interleave"):
        if hasattr(cache, name):
            setattr(cache, name, _FollowBatchEdit(cache, name))
    if hasattr(cache, "crop"):
        cache.crop = _refuse_crop


def _capture_cache(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook on attention modules: remember the cache of this call (5.x: ``cache``,
    older: ``past_key_values``)."""
    module._seqtensor_cache = kwargs.get("cache", kwargs.get("past_key_values"))


def _release_cache(module: nn.Module, args, kwargs, output) -> None:
    module._seqtensor_cache = None


def cache_memory_bytes(cache) -> dict[str, int]:
    """Bytes of a generation cache: the Hugging Face K/V tensors and the tensorized value levels."""
    kv = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor):
                kv += x.numel() * x.element_size()
    levels = sum(s.memory_bytes() for s in getattr(cache, "_seqtensor_states", {}).values())
    return {"kv": kv, "levels": levels, "total": kv + levels}


# ----------------------------------------------------------------------------- public entry points


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def _check_supported(model: nn.Module) -> None:
    """Raise a ValueError naming what a non-Llama-family model lacks."""
    check(
        isinstance(model, nn.Module),
        f"model must be a transformers causal LM, got {type(model).__name__}",
        TypeError,
    )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    missing = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        missing.append(f"config.model_type in {SUPPORTED_MODEL_TYPES} (got {model_type!r})")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        missing.append("model.model.layers (the decoder stack)")
    else:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling"):
            if not all(hasattr(getattr(layer, "self_attn", None), name) for layer in layers):
                missing.append(f"model.model.layers[i].self_attn.{name}")
    if not hasattr(base, "rotary_emb"):
        missing.append("model.model.rotary_emb (RoPE applied before the attention function)")
    if config is not None and getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        missing.append("full rotary embedding (partial_rotary_factor is 1)")
    if missing:
        raise ValueError(
            f"tensorize supports Llama / Mistral / Qwen2-family ...ForCausalLM models; "
            f"{type(model).__name__} lacks: " + "; ".join(missing)
        )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # versions without the setter, or that refuse it
        model.config._attn_implementation = name


def _as_fold_dims(fold) -> tuple[int, ...]:
    if isinstance(fold, CausalFold):
        return fold.dims
    if isinstance(fold, Fold):
        return fold.dims
    if isinstance(fold, (tuple, list)):
        return tuple(fold)
    raise TypeError(
        "fold must be a tuple of dims, a Fold or a CausalFold: a decoder needs coordinates that do "
        "not "
        f"move as the sequence grows, which a length-dependent strategy like {type(fold).__name__} "
        "does not give"
    )


def is_tensorized(model: nn.Module) -> bool:
    """Whether ``tensorize`` was applied (and not undone)."""
    return getattr(model, "_seqtensor_restore", None) is not None


def tensorize(
    model: nn.Module,
    *,
    fold: Sequence[int] | Fold | CausalFold = (32, 32, 32),
    positional: str = "tensor_rope",
    coverage: str = "full",
    backend: str = "auto",
    top_level_cache: str = "native",
    hop_gate: float | None = None,
    retrieval: RetrievalConfig | dict[str, Any] | None = None,
) -> nn.Module:
    """Switch a loaded Llama / Mistral / Qwen2-family causal LM to tensorized attention, in place.

    Parameters
    ----------
    model : a ``...ForCausalLM`` from transformers (any device / dtype).
    fold : dims of a ``CausalFold`` (coarsest first; the coarsest grows with the input), e.g.
        ``(16, 32, 32)`` for 16k-token training, ``CausalFold.extrapolating((16, 32, 32), 131072)``
        to run at 128k with every coordinate inside the training range.
    positional : "tensor_rope" (default), "rope" (the model's own RoPE, e.g. with YaRN scaling in
        its config) or "none".
    coverage : "full" (default) or "axial".
    backend : "auto" (Triton on CUDA), "reference" or "triton".
    top_level_cache : "native" (default, exact) or "int8": generation stores the top hop's input,
        the largest part of the cache, as int8 rows with a scale each (cache ~1.5x SDPA's instead
        of 2.5x with 32/8 heads; outputs within ~1%). An order-1 fold has no levels: no effect.
    hop_gate : None (default) or the initial value in (0, 1) of learned hop gates (see
        ``TextAdapterConfig``). A model that already has learned gates keeps them, and this
        setting, when tensorized again (``untensorize`` first to drop them).
    retrieval : None (default) or a ``RetrievalConfig`` (or its dict): the finest hop becomes the
        retrieval hop (local block + top-k earlier blocks + sinks, one softmax); its coarse hops
        run after it only with ``coarse_hops=True`` (axial coverage). Kept by save_pretrained.

    Returns
    -------
    The same model. Calling ``tensorize`` again replaces the settings (e.g. a longer fold).
    """
    _check_supported(model)
    previous = model.config.seqtensor if is_tensorized(model) else {}
    if (
        hop_gate is None and previous.get("hop_gate") is not None
    ):  # keep the learned gates (see above)
        hop_gate = previous["hop_gate"]
    config = TextAdapterConfig(
        fold=_as_fold_dims(fold),
        positional=positional,
        coverage=coverage,
        backend=backend,
        top_level_cache=top_level_cache,
        hop_gate=hop_gate,
        retrieval=None if retrieval is None else RetrievalConfig.from_value(retrieval).to_dict(),
    )
    resolve_backend(backend, next(model.parameters()).device)  # fail now on an unknown backend
    trained_gates = [getattr(attn, "hop_gate_logits", None) for attn in _attention_modules(model)]
    if is_tensorized(model):
        untensorize(model)
    mc = model.config
    restore = {
        "attn_implementation": mc._attn_implementation,
        "sliding_window": getattr(mc, "sliding_window", None),
        "layer_types": list(mc.layer_types)
        if getattr(mc, "layer_types", None) is not None
        else None,
        "hooks": [],
    }
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    settings = _LayerSettings(config, head_dim, _rope_theta(mc))
    # Sliding windows off; the cache then keeps every key. Models with layer_types (Qwen2) still
    # build their sliding masks from config.sliding_window: there only the layer types change.
    if restore["layer_types"] is not None:
        mc.layer_types = ["full_attention"] * len(restore["layer_types"])
    elif hasattr(mc, "sliding_window"):
        mc.sliding_window = None
    if config.positional != "rope":
        model.model.rotary_emb = _IdentityRotary(model.model.rotary_emb, head_dim)
    restore["module_windows"] = [
        getattr(attn, "sliding_window", None) for attn in _attention_modules(model)
    ]
    for attn, gates in zip(_attention_modules(model), trained_gates):
        attn._seqtensor = settings
        attn._seqtensor_cache = None
        if (
            config.hop_gate is not None
        ):  # a re-tensorized model (e.g. a longer fold) keeps its learned gates
            attn.hop_gate_logits = (
                gates
                if gates is not None
                else _new_gate_logits(attn, mc.num_attention_heads, config)
            )
        if hasattr(attn, "sliding_window"):
            attn.sliding_window = None
        restore["hooks"].append(attn.register_forward_pre_hook(_capture_cache, with_kwargs=True))
        # always_call: a forward that raises (e.g. out of memory) must not keep the cache alive
        restore["hooks"].append(
            attn.register_forward_hook(_release_cache, with_kwargs=True, always_call=True)
        )
    _set_attn_implementation(model, ATTENTION_NAME)
    # instance attributes holding the model weakly (no cycle): see _Guarded
    model.set_attn_implementation = _Guarded(model, "set_attn_implementation")
    model.save_pretrained = _Guarded(model, "save_pretrained")
    # the sliding windows switched off above, saved beside the settings: config.json holds the
    # edited values, and load_tensorized puts these back so that untensorize restores them
    stock = {k: restore[k] for k in ("sliding_window", "layer_types", "module_windows")}
    mc.seqtensor = {**config.to_dict(), "stock_windows": stock}
    model._seqtensor_restore = restore
    return model


# A checkpoint saved from a tensorized model carries this prefix on its model_type, so that stock
# ``AutoModelForCausalLM.from_pretrained`` refuses it (naming the type) instead of silently loading
# a stock model; ``load_tensorized`` reads the original type from ``config.seqtensor``.
TENSORIZED_MODEL_TYPE_PREFIX = "seqtensor_tensorized_"


class _Guarded:
    """``set_attn_implementation`` / ``save_pretrained`` of a tensorized model, bound to the model
    through a weak reference (a bound method stored on the model would be a reference cycle)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = weakref.ref(model), name

    def __call__(self, *args, **kwargs):
        model = self.model()
        original = getattr(type(model), self.name)
        if self.name == "set_attn_implementation":
            requested = args[0] if args else kwargs.get("attn_implementation")
            check(
                requested == ATTENTION_NAME,
                f"set_attn_implementation({requested!r}) on a tensorized model: its RoPE is "
                "applied "
                "inside the tensorized attention, so another implementation would run without "
                "positions. Call seqtensor.adapters.text.untensorize(model) first.",
            )
            return original(model, *args, **kwargs)
        result = original(model, *args, **kwargs)
        folder = args[0] if args else kwargs["save_directory"]
        _mark_tensorized_checkpoint(folder, model.config.model_type)
        return result


def _mark_tensorized_checkpoint(folder, model_type: str) -> None:
    """Prefix the saved config's model_type (see TENSORIZED_MODEL_TYPE_PREFIX); keep the
    original."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = TENSORIZED_MODEL_TYPE_PREFIX + model_type
    config["seqtensor"] = {**config.get("seqtensor", {}), "model_type": model_type}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _new_gate_logits(attn: nn.Module, heads: int, config: TextAdapterConfig) -> nn.Parameter:
    weight = attn.q_proj.weight
    logit = math.log(config.hop_gate / (1 - config.hop_gate))
    return nn.Parameter(
        torch.full((heads, len(config.fold) - 1), logit, dtype=weight.dtype, device=weight.device)
    )


def untensorize(model: nn.Module) -> nn.Module:
    """Undo ``tensorize``: stock attention, RoPE and sliding windows again (learned hop gates are
    dropped). Returns the model."""
    restore = getattr(model, "_seqtensor_restore", None)
    check(restore is not None, "untensorize: this model is not tensorized")
    for handle in restore["hooks"]:
        handle.remove()
    for name in ("set_attn_implementation", "save_pretrained"):
        if isinstance(model.__dict__.get(name), _Guarded):
            del model.__dict__[name]
    if isinstance(model.model.rotary_emb, _IdentityRotary):
        model.model.rotary_emb = model.model.rotary_emb.original
    mc = model.config
    if hasattr(mc, "sliding_window"):
        mc.sliding_window = restore["sliding_window"]
    if restore["layer_types"] is not None:
        mc.layer_types = restore["layer_types"]
    for attn, window in zip(_attention_modules(model), restore["module_windows"]):
        del attn._seqtensor, attn._seqtensor_cache
        if hasattr(attn, "hop_gate_logits"):
            del attn.hop_gate_logits
        if hasattr(attn, "sliding_window"):
            attn.sliding_window = window
    _set_attn_implementation(model, restore["attn_implementation"])
    if hasattr(mc, "seqtensor"):
        del mc.seqtensor
    model._seqtensor_restore = None
    return model


def load_tensorized(path: str, **from_pretrained_kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, ...)`` then ``tensorize`` with the saved
    settings.

    A model tensorized and then saved with ``save_pretrained`` carries its settings in
    ``config.seqtensor``; extra keyword arguments go to ``from_pretrained`` (dtype, device_map...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(path)  # config.json as saved
    spec = config_dict.get("seqtensor")
    check(
        spec is not None,
        f"{path} has no config.seqtensor: it was not saved from a tensorized model",
    )
    model_type = spec.get("model_type", config_dict["model_type"])
    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **fields)
    from_pretrained_kwargs.setdefault("attn_implementation", "sdpa")
    model = AutoModelForCausalLM.from_pretrained(path, config=config, **from_pretrained_kwargs)
    stock = spec.get("stock_windows")
    if stock is not None:  # the stock sliding windows, as tensorize found them (see tensorize)
        if stock["layer_types"] is not None:
            model.config.layer_types = list(stock["layer_types"])
            if hasattr(model.model, "has_sliding_layers"):  # Qwen2 reads it, set at construction
                model.model.has_sliding_layers = "sliding_attention" in stock["layer_types"]
            for attn, layer_type in zip(_attention_modules(model), stock["layer_types"]):
                if hasattr(attn, "layer_type"):
                    attn.layer_type = layer_type
        elif hasattr(model.config, "sliding_window"):
            model.config.sliding_window = stock["sliding_window"]
        for attn, window in zip(_attention_modules(model), stock["module_windows"]):
            if hasattr(attn, "sliding_window"):
                attn.sliding_window = window
    config = TextAdapterConfig.from_dict({k: v for k, v in spec.items() if k != "model_type"})
    tensorize(model, **config.__dict__)
    if config.hop_gate is not None:
        _load_gate_logits(model, path)
    return model


def _load_gate_logits(model: nn.Module, path: str) -> None:
    """The learned hop gates from a local checkpoint folder (stock ``from_pretrained`` skips
    them)."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    saved = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            saved.update(
                {key: f.get_tensor(key) for key in f.keys() if key.endswith("hop_gate_logits")}
            )
    params = {name: p for name, p in model.named_parameters() if name.endswith("hop_gate_logits")}
    check(
        set(saved) == set(params),
        f"{path} was saved with hop gates but holds {len(saved)} of the model's {len(params)} gate "
        "tensors "
        "(load_tensorized reads them from the folder's .safetensors files)",
    )
    for name, p in params.items():
        # as saved: the levels they were trained for (a model saved with a longer fold keeps fewer
        # columns)
        module = model.get_submodule(name.rsplit(".", 1)[0])
        module.hop_gate_logits = nn.Parameter(saved[name].to(dtype=p.dtype, device=p.device))
