"""Launch policy of the Triton hop kernels (``triton_hops``): block sizes, warps, autotuning.

The table (``gpu_config``) was swept on the devices in ``TABLE_GPUS`` (benchmarks/attention.py
--sweep); elsewhere hops are autotuned once per process and fibre-length bucket over the candidates
below. Nothing here knows the kernels' arguments: ``launch`` takes the kernel and its arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton

__all__ = ["Config", "config", "launch", "block_size", "INTERPRET", "MAX_BLOCK"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# rows per block, at most: a table for rotation on load covers the fibre's positions + one block
MAX_BLOCK = 256


@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per program (forward)
    block_n: int  # key rows per inner step (forward)
    block: int  # rows per block in the backward (keys in phase 1, queries in phase 2)
    num_warps: int  # warps per forward program
    num_stages: int  # software-pipelining depth of the inner loops
    bwd_warps: (
        int  # warps per backward program (more: dk, dv and dq accumulators live in registers)
    )


# Benchmarks set fields here (e.g. {"bwd_warps": 4}) to compare configs without editing the table
# below. A non-empty override also turns autotuning off, so the configs compared are the ones that
# run.
CONFIG_OVERRIDE: dict = {}
# None (default): on CUDA GPUs the table was not tuned on, hops are autotuned once per process and
# fibre-length bucket (``_tuner``: triton.autotune over the candidates below, the table's among
# them). On the H200, where the table was swept, autotune's picks were mixed (faster forwards on
# 128-long fibres, up to 20% slower elsewhere: the backward's timings include restoring dq and dk)
# and tuning at 128k took over a minute (docs/performance.md), so the table stays. True / False:
# always / never; the environment variable SEQTENSOR_AUTOTUNE=1 / 0 sets it for a process (and the
# processes it starts). The interpreter and CONFIG_OVERRIDE always use the table.
AUTOTUNE: bool | None = {"1": True, "0": False}.get(os.environ.get("SEQTENSOR_AUTOTUNE", ""))
TABLE_GPUS = ("NVIDIA H200",)  # devices the table was tuned on (benchmarks/attention.py --sweep)


def config(nj: int, d: int, dv: int) -> Config:
    """Fixed meta-parameters: 16-row blocks under the interpreter, else sized to the fibre and head
    dim."""
    base = Config(16, 16, 16, 1, 1, 1) if INTERPRET else gpu_config(nj, d, dv)
    cfg = dataclasses.replace(base, **CONFIG_OVERRIDE)
    assert max(cfg.block_m, cfg.block_n, cfg.block) <= MAX_BLOCK, cfg
    return cfg


def gpu_config(nj: int, d: int, dv: int) -> Config:
    """Blocks as large as useful: the fibre rounded up, capped by the register room of the head
    dim."""
    fib = block_size(nj)
    wide = max(d, dv) > 128
    bm = min(fib, 64 if wide else 128)
    bn = min(fib, 32 if wide else 64)
    bb = min(fib, 32 if wide else 64)
    # bwd_warps 4: 20.1 ms against 25.0 ms with 8 (128k causal fwd+bwd, H200, docs/performance.md)
    return Config(bm, bn, bb, 8 if bm >= 128 else 4, 2, 4)


def use_autotune(device: torch.device) -> bool:
    if INTERPRET or CONFIG_OVERRIDE or AUTOTUNE is False:
        return False
    return AUTOTUNE or device_name(device) not in TABLE_GPUS


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


# Autotune candidates (block_m, block_n, warps, stages) and (block, warps, stages), clipped to the
# hop by the prune functions below (the table's blocks are the largest useful); the table's config
# is always among them.
FWD_CANDIDATES = (
    (128, 64, 8, 2),
    (128, 64, 4, 2),
    (128, 32, 8, 3),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
)
BWD_CANDIDATES = ((64, 4, 2), (64, 8, 2), (64, 4, 3), (32, 4, 2), (32, 4, 3), (32, 8, 2))
# Tuned once per fibre-length bucket (a power of two: one tuner each, ``_tuner``) and these
# settings, not per shape: P, S and the coarsest n_j change with every sequence length, and retuning
# each would stall variable-length inputs (a text model's prompts) for seconds per new length.
TUNE_KEY = [
    "D1",
    "D2",
    "NDV",
    "CAUSAL",
    "SUMMARY",
    "ROPE",
    "ROPE_K",
    "ROPE_Q",
    "ROPE_GRAD",
    "MASKED",
]


def fwd_candidates(configs, named_args, **kwargs) -> list:
    """Forward configs for this hop: blocks no larger than the fibre or the head dim's register
    room."""
    table = gpu_config(named_args["NJ"], kwargs["D1"] + kwargs["D2"], kwargs["NDV"])
    seen = {(table.block_m, table.block_n, table.num_warps, table.num_stages): None}
    for bm, bn, warps, stages in FWD_CANDIDATES:
        bm, bn = min(bm, table.block_m), min(bn, table.block_n)
        seen.setdefault((bm, bn, warps if bm >= 64 else 4, stages), None)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in seen
    ]


def bwd_candidates(configs, named_args, **kwargs) -> list:
    """Backward configs: one block per fibre when SINGLE (the fibre rounded up), else blocks below
    it."""
    table = gpu_config(named_args["NJ"], kwargs["D1"] + kwargs["D2"], kwargs["NDV"])
    seen = {(table.block, table.bwd_warps, table.num_stages): None}
    for block, warps, stages in BWD_CANDIDATES:
        seen.setdefault(
            (table.block if kwargs["SINGLE"] else min(block, table.block), warps, stages), None
        )
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in seen]


TUNERS: dict[tuple[str, int], triton.runtime.Autotuner] = {}


def tuner(direction: str, nj: int, kernel) -> triton.runtime.Autotuner:
    """The autotuned kernel of one direction for fibres of up to ``block_size(nj)`` rows (one
    clipped candidate list).

    triton.autotune only tunes when it holds more than one config: it gets the unclipped candidates,
    and the prune functions replace them with the hop's clipped list. The backward accumulates dq
    and dk in place across hops, so every timed run restores them.
    """
    key = (direction, block_size(nj))
    if key not in TUNERS:
        if direction == "fwd":
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in FWD_CANDIDATES
            ]
            tune = triton.autotune(
                configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": fwd_candidates}
            )
            TUNERS[key] = tune(kernel)
        else:
            configs = [
                triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in BWD_CANDIDATES
            ]
            tune = triton.autotune(
                configs,
                key=TUNE_KEY,
                prune_configs_by={"early_config_prune": bwd_candidates},
                restore_value=["DQ", "DK"],
            )
            TUNERS[key] = tune(kernel)
    return TUNERS[key]


def launch(
    kernel, direction: str, programs: int, nj: int, fixed: dict, device, args: tuple, meta: dict
) -> None:
    """``kernel`` (the hop kernel of ``direction``) over ``programs`` fibres (x the fibre's row
    blocks): autotuned, or with the table's meta-parameters ``fixed``."""
    block = "BLOCK_M" if direction == "fwd" else "BLOCK"
    if use_autotune(device):
        tuner(direction, nj, kernel)[lambda c: (programs * triton.cdiv(nj, c[block]),)](
            *args, **meta
        )
    else:
        kernel[(programs * triton.cdiv(nj, fixed[block]),)](*args, **meta, **fixed)


def block_size(x: int) -> int:
    """``x`` rounded up to a power of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, triton.next_power_of_2(x))
