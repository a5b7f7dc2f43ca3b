"""What the trainer does with a batch and with what the model returns: device moves, batch size, the
loss.

``split_loss`` enforces the loss contract described in ``seqtensor.train.trainer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._validation import check

__all__ = ["to_device", "batch_size", "split_loss"]

# names the trainer writes into every record itself; a user metric under one would overwrite it
_RESERVED = ("step", "epoch", "loss", "lr", "grad_norm")


def to_device(x: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(to_device(v, device) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def batch_size(x: Any) -> int:
    """Leading size of the first tensor in a batch (1 if it holds none): the weight of its mean
    loss."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim else 1
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in values:
        if isinstance(v, (torch.Tensor, Mapping, list, tuple)):
            return batch_size(v)
    return 1


def split_loss(out: Any, source: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` from what ``loss_fn`` or the model returned."""
    metrics: Mapping[str, Any] = {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        out, metrics = out
    if not isinstance(out, torch.Tensor):
        loss = getattr(out, "loss", None)
        out = out.get("loss") if loss is None and isinstance(out, Mapping) else loss
    shape = f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""
    check(
        isinstance(out, torch.Tensor) and out.numel() == 1,
        f"{source} must return a scalar loss tensor, a (loss, metrics) tuple or an object with "
        f".loss; got {type(out).__name__}{shape}",
        TypeError,
    )
    bad = [k for k in metrics if k in _RESERVED]
    check(not bad, f"{source} returned metrics with reserved names {bad}")
    scalars = {
        str(k): torch.as_tensor(v, dtype=torch.float32, device=out.device)
        for k, v in metrics.items()
    }
    check(
        all(v.numel() == 1 for v in scalars.values()),
        f"{source} returned non-scalar metrics",
        TypeError,
    )
    return out.reshape(()), {k: v.detach().reshape(()) for k, v in scalars.items()}
