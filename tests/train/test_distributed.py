"""Distributed plumbing: torchrun detection, the resumable sampler, and DDP / FSDP over gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from seqtensor.train.distributed import (
    DistEnv,
    ResumableDistributedSampler,
    all_gather_objects,
    detect_env,
    gradient_sync,
    init_distributed,
    model_state,
    rank_zero_only,
    wrap_model,
)

ROOT = Path(__file__).resolve().parents[2]


def test_detect_env_reads_torchrun_variables():
    assert detect_env({}) == DistEnv(1, 0, 0)
    env = detect_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert env == DistEnv(4, 3, 1) and env.is_distributed and not env.is_main
    with pytest.raises(ValueError, match="RANK must be in"):
        detect_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        detect_env({"WORLD_SIZE": "two"})


def test_single_process_fallbacks(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == DistEnv()
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert rank_zero_only(lambda: 7)() == 7
    model = nn.Linear(2, 2)
    assert wrap_model(model, "none", torch.device("cpu")) is model
    with gradient_sync(model, enabled=False):
        pass
    assert set(model_state(model)) == {"weight", "bias"}
    with pytest.raises(ValueError, match="needs a process group: launch with torchrun"):
        wrap_model(model, "ddp", torch.device("cpu"))


def test_sampler_shards_like_one_process_and_resumes_mid_epoch():
    data = TensorDataset(torch.arange(10))
    one = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=3)
    ranks = [ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1)
    order = list(one)
    # step k of a 2-rank run with per-rank batch 2 sees exactly what one process with batch 4 sees
    shards = [list(s) for s in ranks]
    assert sorted(shards[0][:2] + shards[1][:2]) == sorted(order[:4])
    one.set_start(4)
    assert list(one) == order[4:] and len(one) == 6
    one.set_epoch(2)
    one.set_start(0)
    assert list(one) != order  # a new permutation each epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: str) -> None:
    """Run ``script`` on 2 CPU processes with gloo, on a free port of 127.0.0.1."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        *args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # gloo picks its interface from the host name, which may not resolve in a sandbox: use loopback
    env.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, strategy):
    """2 ranks with half the batch each == 1 process with the global batch (benchmarks/ddp_check.py)."""
    out = tmp_path / "result.json"
    _torchrun(
        ROOT / "benchmarks" / "ddp_check.py",
        "--device",
        "cpu",
        "--strategy",
        strategy,
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["allclose"] and result["max_abs_diff"] < 1e-5
    assert (result["world_size"], result["strategy"], result["backend"]) == (2, strategy, "gloo")


def test_two_gloo_processes_resume_exactly(tmp_path):
    """N + resume + N == 2N under DDP and FSDP, with per-rank dropout streams; rank 0 alone writes files."""
    out = tmp_path / "result.json"
    _torchrun(Path(__file__).with_name("_ddp_worker.py"), str(tmp_path), str(out))
    results = json.loads(out.read_text())
    for strategy in ("ddp", "fsdp"):
        r = results[strategy]
        assert r["equal"] and r["history_equal"] and r["ranks_agree"], (strategy, r)
        assert r["files"] == ["last.pt", "metrics.csv", "metrics.jsonl", "trainer_config.json"]
