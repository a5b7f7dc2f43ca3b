"""Save / load integrity of a Forecaster and the trainer's temp-file cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import seqtensor.adapters.forecast.persistence as persistence
from seqtensor.adapters.forecast import Forecaster
from seqtensor.train.checkpoint import atomic_save, pid_alive

TINY = dict(
    patch_len=8,
    d_model=16,
    n_layers=1,
    n_heads=2,
    max_steps=3,
    batch_size=16,
    device="cpu",
    verbose=False,
)


def frame(n=160, shift=0.0):
    t = pd.date_range("2021-01-01", periods=n, freq="h")
    y = 5 + shift + np.sin(2 * np.pi * np.arange(n) / 24)
    return pd.DataFrame({"unique_id": "s", "ds": t, "y": y})


@pytest.fixture(scope="module")
def two_models():
    a = Forecaster(h=6, input_size=24, random_state=0, **TINY).fit(frame())
    b = Forecaster(h=6, input_size=24, random_state=1, **TINY).fit(frame(shift=3.0))
    return a, b


def dead_pid() -> int:
    """The pid of a process that has exited (reaped), so no process has it right now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_manifest_carries_the_weights_hash(two_models, tmp_path):
    a, _ = two_models
    folder = a.save(tmp_path / "m")
    assert sorted(os.listdir(folder)) == ["forecaster.json", "state.pt"]
    meta = json.loads((folder / "forecaster.json").read_text())
    import hashlib

    digest = hashlib.sha256((folder / "state.pt").read_bytes()).hexdigest()
    assert meta["files"]["state.pt"] == {
        "bytes": (folder / "state.pt").stat().st_size,
        "sha256": digest,
    }
    pd.testing.assert_frame_equal(Forecaster.load(folder).predict(), a.predict())


def test_swapped_state_file_fails_to_load(two_models, tmp_path):
    a, b = two_models
    a.save(tmp_path / "a"), b.save(tmp_path / "b")
    os.replace(tmp_path / "b" / "state.pt", tmp_path / "a" / "state.pt")
    with pytest.raises(ValueError, match="does not match the manifest"):
        Forecaster.load(tmp_path / "a")


def test_nan_written_into_the_weights_fails_to_load(two_models, tmp_path):
    a, _ = two_models
    folder = a.save(tmp_path / "m")
    state = torch.load(folder / "state.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, folder / "state.pt")
    with pytest.raises(ValueError, match="does not match the manifest"):
        Forecaster.load(folder)
    # even with the manifest rewritten to match, non-finite weights are refused
    meta = json.loads((folder / "forecaster.json").read_text())
    meta["files"]["state.pt"] = {
        "bytes": (folder / "state.pt").stat().st_size,
        "sha256": persistence._sha256(folder / "state.pt"),
    }
    (folder / "forecaster.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"weights \\['{name}'\\] hold NaN or inf"):
        Forecaster.load(folder)


def test_torn_missing_or_corrupted_files_fail_to_load(two_models, tmp_path):
    a, _ = two_models
    folder = a.save(tmp_path / "m")
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])  # a write cut short
    with pytest.raises(ValueError, match="torn, corrupted"):
        Forecaster.load(folder)
    (folder / "state.pt").write_bytes(data)
    Forecaster.load(folder)  # intact again
    text = (folder / "forecaster.json").read_text()
    (folder / "forecaster.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupted \\(not valid JSON\\)"):
        Forecaster.load(folder)
    (folder / "forecaster.json").unlink()
    with pytest.raises(FileNotFoundError, match="expected forecaster.json and state.pt"):
        Forecaster.load(folder)


def test_saving_over_a_save_replaces_it_whole(two_models, tmp_path):
    a, b = two_models
    a.save(tmp_path / "m")
    b.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or old folders left
    pd.testing.assert_frame_equal(Forecaster.load(tmp_path / "m").predict(), b.predict())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved forecaster"):
        a.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_an_interrupted_save_leaves_the_old_save_and_no_temp(two_models, tmp_path, monkeypatch):
    a, b = two_models
    a.save(tmp_path / "m")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        b.save(tmp_path / "m")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["m"]
    pd.testing.assert_frame_equal(Forecaster.load(tmp_path / "m").predict(), a.predict())
    # a save killed outright (no cleanup ran) leaves a folder that the next save removes
    pid = dead_pid()
    stale = tmp_path / f".m.tmp-{pid}-abc"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"x" * 100)
    live = tmp_path / f".m.tmp-{os.getpid()}-def"  # a save in progress (this process): kept
    live.mkdir()
    b.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == [live.name, "m"]


def test_checkpoint_writes_remove_temp_files_of_killed_writers(tmp_path):
    target = tmp_path / "last.pt"
    pid = dead_pid()
    stale = tmp_path / f".last.pt.{pid}-x1y2.tmp"
    stale.write_bytes(b"\0" * 1000)
    mine = tmp_path / f".last.pt.{os.getpid()}-z9.tmp"  # a live writer's: kept
    mine.write_bytes(b"\0")
    other = tmp_path / f".other.pt.{pid}-q.tmp"  # another target's: not ours to touch
    other.write_bytes(b"\0")
    atomic_save({"w": torch.ones(3)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "last.pt"])
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))


def test_checkpoint_write_killed_by_a_signal_is_cleaned_up_by_the_next(tmp_path):
    """A real SIGKILL mid-write: the temp file stays, and the next write removes it."""
    script = f"""
import os, signal
from pathlib import Path
from seqtensor.train.checkpoint import atomic_write
def write(f):
    f.write(b"x" * 4096); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write(Path({str(tmp_path)!r}) / "last.pt", write)
"""
    run = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert run.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".last.pt.") and left[0].endswith(".tmp")
    atomic_save({"w": torch.zeros(1)}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_saves_of_the_first_format_load_with_a_warning(two_models, tmp_path):
    a, _ = two_models
    folder = a.save(tmp_path / "m")
    meta = json.loads((folder / "forecaster.json").read_text())
    meta["format"] = "seqtensor.forecaster/1"
    del meta["files"], meta["params"]["level"], meta["params"]["warm_start"]
    (folder / "forecaster.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="saved without a hash"):
        loaded = Forecaster.load(folder)
    pd.testing.assert_frame_equal(loaded.predict(), a.predict())
