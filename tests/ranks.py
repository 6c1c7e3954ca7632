"""Runs a function as each rank of a real torch.distributed (gloo) group of processes on this machine, without
Ray: the training loop's multi-rank paths (DDP, all-reduces, uneven batch shares) under test."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init: str, out: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """fn(rank, world, *args) in `world` spawned processes joined in one gloo group; their results, by rank."""
    with tempfile.TemporaryDirectory(prefix="rn50-ranks-") as out:
        init = f"file://{os.path.join(out, 'store')}"
        mp.start_processes(_rank_main, args=(world, init, out, fn, args), nprocs=world, start_method="spawn")
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world)]
