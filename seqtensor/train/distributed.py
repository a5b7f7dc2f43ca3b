"""Distributed training plumbing for ``Trainer``: torchrun detection, process groups, samplers,
wrapping.

A run launched by ``torchrun`` has WORLD_SIZE / RANK / LOCAL_RANK in its environment; everything
here reads them once through ``detect_env`` and degrades to a single process (world size 1, rank 0)
without them. Gradients are averaged by ``DistributedDataParallel`` ("ddp") or sharded with torch's
``fully_shard`` ("fsdp", https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .._validation import check, check_choice

__all__ = [
    "DistEnv",
    "detect_env",
    "launched_by_torchrun",
    "init_distributed",
    "destroy_distributed",
    "current_env",
    "default_device",
    "resolve_device",
    "is_main_process",
    "rank_zero_only",
    "barrier",
    "all_reduce_sum",
    "all_gather_objects",
    "ResumableDistributedSampler",
    "make_loader",
    "STRATEGIES",
    "wrap_model",
    "gradient_sync",
    "model_state",
    "load_model_state",
    "optimizer_state",
    "load_optimizer_state",
]

STRATEGIES = ("none", "ddp", "fsdp")
_F = TypeVar("_F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------
# Environment and process group
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a run: ``world_size`` processes, this one ``rank`` (``local_rank``
    on its host)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's WORLD_SIZE, RANK and LOCAL_RANK (absent: a single process).

    Parameters
    ----------
    environ : mapping, optional
        Environment to read; ``os.environ`` by default.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank)
    check(world >= 1, f"WORLD_SIZE must be >= 1, got {world}")
    check(0 <= rank < world, f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    check(local >= 0, f"LOCAL_RANK must be >= 0, got {local}")
    return DistEnv(world, rank, local)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when the rendezvous variables torchrun sets are present."""
    environ = os.environ if environ is None else environ
    return "WORLD_SIZE" in environ and "MASTER_ADDR" in environ


def current_env() -> DistEnv:
    """The env of the initialized process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        local = _env_int(os.environ, "LOCAL_RANK", dist.get_rank())
        return DistEnv(dist.get_world_size(), dist.get_rank(), local)
    return DistEnv()


def default_device(env: DistEnv | None = None) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    env = current_env() if env is None else env
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(
    device: torch.device | str | None = "auto", env: DistEnv | None = None
) -> torch.device:
    """The device this process trains on: "auto"/None -> ``default_device``; "cuda" ->
    ``cuda:<local_rank>``."""
    env = detect_env() if env is None else env
    if device is None or device == "auto":
        return default_device(env)
    device = torch.device(device)
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"device={str(device)!r} but CUDA is not available")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return device


def init_distributed(
    device: torch.device | str | None = None, backend: str | None = None
) -> DistEnv:
    """Initialise the default process group when launched by torchrun; idempotent.

    Parameters
    ----------
    device : torch.device or str, optional
        Device this process trains on; picks the backend (NCCL for CUDA, gloo otherwise) and, on
        CUDA, becomes the current device so NCCL and ``all_gather_object`` use the right GPU.
    backend : str, optional
        Override the backend.

    Returns
    -------
    DistEnv
        The env of the process group (a single process when not launched by torchrun).
    """
    if dist.is_available() and dist.is_initialized():
        return current_env()
    if not (dist.is_available() and launched_by_torchrun()):
        return DistEnv()
    env = detect_env()
    device = resolve_device(device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    # device_id binds NCCL to this GPU eagerly (avoids a guessed device in the first barrier)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, world_size=env.world_size, rank=env.rank, **kwargs)
    return env


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (call at the normal end of every rank)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()  # no rank closes its gloo pairs while another still has work in flight
        gc.collect()  # wrappers holding pending gloo work must go first, or teardown can SIGABRT
        dist.destroy_process_group()


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return current_env().is_main


def rank_zero_only(fn: _F) -> _F:
    """Decorate ``fn`` so it runs on rank 0 only (returning None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _group_active():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks in place and return it (gloo has no AVG, so callers divide)."""
    if _group_active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if not _group_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start mid-epoch, so a resumed run skips consumed samples
    unread.

    The order is DistributedSampler's (a permutation seeded by ``seed + epoch``, padded to a
    multiple of ``num_replicas``, rank ``r`` taking every ``num_replicas``-th index from ``r``): the
    ranks of a step together see the same samples one process with the global batch would.
    With ``num_replicas=1`` it is a plain seeded shuffle, so one code path serves both cases.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0  # samples of this rank's epoch already consumed

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the epoch."""
        check(start >= 0, f"start must be >= 0, got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_loader(
    data: Any,
    name: str = "data",
    *,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    env: DistEnv | None = None,
) -> tuple[Iterable[Any], int | None]:
    """A loader over ``data`` for this rank, and its batches per epoch (None when unknown).

    A torch map-style ``Dataset`` gets a DataLoader with a ``ResumableDistributedSampler`` (seeded
    shuffle, sharded over ``env``'s ranks); an ``IterableDataset`` a plain DataLoader (sharding it
    is up to the dataset); a ``DataLoader`` or any re-iterable of batches is used as given.

    Parameters
    ----------
    data : Dataset, IterableDataset, DataLoader or re-iterable of batches
    name : str
        Argument name for error messages.
    batch_size, shuffle, drop_last, seed, num_workers, collate_fn, pin_memory
        DataLoader and sampler settings for Datasets (``drop_last`` drops an incomplete last batch).
    env : DistEnv, optional
        Ranks to shard over; the initialized process group's by default.
    """
    env = current_env() if env is None else env
    if isinstance(data, DataLoader):
        loader: Iterable[Any] = data
        sharded = isinstance(data.sampler, DistributedSampler) or isinstance(
            data.dataset, IterableDataset
        )
        if env.is_distributed and not sharded:
            warnings.warn(
                f"{name} has no DistributedSampler: every rank reads all of it", stacklevel=3
            )
    elif isinstance(data, IterableDataset):
        loader = DataLoader(
            data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn
        )
    elif isinstance(data, Dataset):
        check(
            hasattr(data, "__len__"),
            f"{name} must define __len__ (or be an IterableDataset)",
            TypeError,
        )
        check(len(data) > 0, f"{name} is empty (0 samples)")  # type: ignore[arg-type]
        sampler = ResumableDistributedSampler(
            data, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed
        )
        loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
        )
    elif isinstance(data, Iterable) and not isinstance(data, (Iterator, str, bytes)):
        loader = data
    else:
        raise TypeError(
            f"{name} must be a torch Dataset, a DataLoader or a re-iterable of batches (a list, "
            "not a "
            f"generator, which is used up after one pass); got {type(data).__name__}"
        )
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = None
    check(
        n != 0,
        f"{name} yields no batches (empty, or fewer samples than batch_size with drop_last=True)",
    )
    return loader, n


# ---------------------------------------------------------------------------------------------
# Wrapping and state dicts
# ---------------------------------------------------------------------------------------------


def wrap_model(
    model: nn.Module,
    strategy: str,
    device: torch.device,
    fsdp_policy: Callable[[nn.Module], bool] | None = None,
) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it for ``strategy``; returns the module to call in
    training.

    Parameters
    ----------
    model : nn.Module
        The model; for "fsdp" it is sharded in place (its class becomes an FSDP module).
    strategy : {"none", "ddp", "fsdp"}
        "ddp" averages gradients with DistributedDataParallel; "fsdp" shards parameters, gradients
        and optimizer state with ``fully_shard``. Both need an initialized process group.
    device : torch.device
        This process's device.
    fsdp_policy : callable, optional
        ``fsdp_policy(submodule) -> bool`` picks submodules sharded as their own unit (gathered one
        at a time in forward/backward); the root is always sharded last. Default: the children of
        every ``nn.ModuleList``.
    """
    check_choice("strategy", strategy, STRATEGIES)
    if strategy == "none":
        return model.to(device)
    check(
        dist.is_available() and dist.is_initialized(),
        f"strategy={strategy!r} needs a process group: launch with torchrun (torchrun "
        "--nproc_per_node 2 script.py)",
    )
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(device)
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if _is_fsdp(model):  # sharded by an earlier fit
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if fsdp_policy is None:
        units = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    else:
        units = [m for m in model.modules() if m is not model and fsdp_policy(m)]
    # fully_shard moves each unit to the mesh's device as it shards it, so the whole model never has
    # to fit on one GPU unsharded (only one unit at a time does)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Context in which backward all-reduces gradients only if ``enabled`` (skip on accumulation
    micro-steps)."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if _is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _full_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full CPU copy of the model's state dict (``module.`` prefixes of DDP removed).

    Collective for FSDP models (every rank must call it); there only rank 0 receives the tensors and
    the other ranks get an empty dict.
    """
    model = _unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a full state dict from ``model_state``; collective for FSDP (read from rank 0)."""
    model = _unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, dict(state), options=_full_options(broadcast_from_rank0=True))
        return
    model.load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict, full (unsharded, rank 0) for FSDP models; collective for FSDP."""
    model = _unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a state dict from ``optimizer_state``; collective for FSDP."""
    model = _unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(
            model, optimizer, dict(state), options=_full_options(broadcast_from_rank0=True)
        )
        return
    optimizer.load_state_dict(state)
