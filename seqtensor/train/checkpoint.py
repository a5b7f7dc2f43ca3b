"""Durable files for training: atomic writes, RNG snapshots, checkpoint reading and checks, metrics
logs.

A checkpoint or a rewritten log goes to a temporary file in the destination folder, is fsynced and
then moved over the old one with ``os.replace`` (atomic on POSIX and Windows), so a crash leaves
either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .._validation import check

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write",
    "atomic_save",
    "atomic_write_text",
    "pid_alive",
    "capture_rng",
    "restore_rng",
    "seed_everything",
    "plain_config",
    "config_fingerprint",
    "check_resumable",
    "batches_to_skip",
    "load_checkpoint",
    "check_state_compatible",
    "MetricsLog",
]

CHECKPOINT_FORMAT = "seqtensor.train.trainer/1"


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then atomically replace ``path``.

    Parameters
    ----------
    path : path-like
        Destination; its folder is created if missing.
    write : callable
        Writes the whole content to the binary file object it receives.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    # same folder as the target: os.replace is only atomic within one file system. The pid in
    # the name lets a later write remove what a killed process left (see _remove_stale_temps).
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    try:
        os.chmod(
            tmp, 0o644
        )  # mkstemp's 0600 would make checkpoints unreadable to the rest of a team
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours, or the platform cannot say: keep its files
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of earlier writes to ``path`` whose process is gone.

    A write killed between mkstemp and os.replace (SIGKILL, power loss) cannot clean up after
    itself; without this, every such kill leaves a checkpoint-sized ``.tmp`` file behind.
    """
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{_glob_escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _unlink_quietly(str(tmp))


def _glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped (file names may contain ``[``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _unlink_quietly(path: str) -> None:
    """Remove ``path`` if it exists (cleanup of a failed atomic write)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort (Windows and some network file systems cannot)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Snapshot of the global generators; NumPy's as tensors so ``torch.load(weights_only=True)``
    reads it.

    Parameters
    ----------
    device : torch.device, optional
        A CUDA device whose generator is included.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Restore a snapshot from ``capture_rng``."""
    version, internal, gauss = state["python"]
    random.setstate(
        (version, tuple(internal), gauss)
    )  # tuples, whatever serialiser the state went through
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Checkpoint contents
# ---------------------------------------------------------------------------------------------


def plain_config(config: Any) -> dict[str, Any]:
    """A model config (a mapping, or an object with ``to_dict()``) as plain JSON types."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    check(
        isinstance(data, Mapping),
        f"model_config must be a mapping or have to_dict(), got {type(config).__name__}",
        TypeError,
    )
    # through JSON: only plain types remain, which torch.load(weights_only=True) reads back
    return json.loads(json.dumps(dict(data), sort_keys=True, default=str))


def config_fingerprint(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of a model config's canonical JSON."""
    text = json.dumps(plain_config(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by ``Trainer`` onto the CPU, with a clear error if it is not one.

    Loads with ``weights_only=True``: a checkpoint holds tensors and plain Python values only, so
    reading one never executes code from the file.
    """
    path = Path(path)
    check(path.is_file(), f"checkpoint {str(path)!r} does not exist", FileNotFoundError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary classes, e.g. from a custom scheduler's state_dict
        reason = next(
            (line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
            str(err),
        )
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects safe loading refuses: {reason}"
        ) from err
    except (zipfile.BadZipFile, EOFError, RuntimeError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable (truncated or not a torch file): {err}"
        ) from err
    check(
        isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT,
        f"{str(path)!r} is not a seqtensor trainer checkpoint (expected format "
        f"{CHECKPOINT_FORMAT!r})",
    )
    return state


def check_state_compatible(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped keys between a model and a state
    dict.

    Parameters
    ----------
    expected : mapping
        Parameter/buffer name -> shape of the model being loaded into.
    state : mapping
        The state dict read from ``source``.
    source : str
        Where ``state`` came from, for the message.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_head(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_head(shapes)}")
    check(
        not problems,
        f"{source} does not match this model (another model config?): " + "; ".join(problems),
    )


def check_resumable(
    state: Mapping[str, Any],
    source: str,
    *,
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    fingerprint: str | None,
    model_config: Mapping[str, Any] | None,
    strategy: str,
) -> None:
    """Raise ValueError if checkpoint ``state`` belongs to another model or cannot load under
    ``strategy``.

    Parameters
    ----------
    state : mapping
        From ``load_checkpoint``.
    source : str
        Where it came from, for messages.
    shapes : mapping
        Name -> shape of the model's state dict.
    fingerprint, model_config : str and mapping, or None
        This run's model config and its fingerprint, if the caller gave one.
    strategy : str
        This run's strategy: FSDP optimizer state is keyed by parameter name, the others' by index.
    """
    theirs = state.get("fingerprint")
    if theirs is not None and fingerprint is not None and theirs != fingerprint:
        diff = _dict_diff(state.get("model_config") or {}, model_config or {})
        raise ValueError(
            f"{source} was written for another model config (fingerprint {theirs}, this model "
            f"{fingerprint}); differing fields: {diff}"
        )
    check_state_compatible(shapes, state["model"], source)
    written = state["strategy"]
    check(
        (written == "fsdp") == (strategy == "fsdp"),
        f"{source} was written with strategy={written!r}; its optimizer state loads only with "
        f"{'fsdp' if written == 'fsdp' else 'none or ddp'}, not {strategy!r}",
    )


def batches_to_skip(
    state: Mapping[str, Any], *, batch_size: int, world_size: int, epoch_len: int | None
) -> int:
    """Batches of the current epoch a resumed run skips; mapped by samples seen if the global batch
    changed."""
    old = state["batch_size"] * state["world_size"]
    new = batch_size * world_size
    if old == new and state["epoch_len"] == epoch_len:
        return state["batch_in_epoch"]
    warnings.warn(
        "resuming with a different global batch size or data length: the data position is mapped "
        "by "
        "samples seen, and the run is not an exact continuation",
        stacklevel=3,
    )
    batch = round(state["batch_in_epoch"] * old / new)
    return batch if epoch_len is None else min(batch, epoch_len)


def _dict_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    diffs = [
        f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return _head(diffs) if diffs else "(none recorded)"


def _head(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


# ---------------------------------------------------------------------------------------------
# Metrics logs
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """A metrics history on disk: ``metrics.jsonl`` (one append per record) and ``metrics.csv``.

    A record is appended with a single ``os.write`` on an O_APPEND file, so a line is whole or
    absent; ``reset`` rewrites the JSONL atomically (on resume: from the checkpoint's history,
    dropping records of steps that are redone). The CSV, whose columns are the union of the records'
    keys, is always rewritten atomically.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.jsonl = Path(folder) / "metrics.jsonl"
        self.csv = Path(folder) / "metrics.csv"

    def reset(self, history: Sequence[Mapping[str, Any]]) -> None:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in history), self.jsonl)
        self.write_csv(history)

    def append(self, record: Mapping[str, Any]) -> None:
        fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    def write_csv(self, history: Sequence[Mapping[str, Any]]) -> None:
        columns = list(dict.fromkeys(k for r in history for k in r))  # first-seen order
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(buf.getvalue(), self.csv)
