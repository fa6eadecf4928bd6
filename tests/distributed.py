"""Runs a function on N real processes joined in a gloo process group (CPU multi-rank tests)."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn: Callable, rank: int, world_size: int, store: str, queue: Any, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    from common.log import setup_logging

    setup_logging(rank=rank)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue would pass tensors through shared memory that
        # disappears when this process exits, before the parent reads them.
        queue.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:  # report, so the parent fails with the child's traceback
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; their results by rank.
    ``fn`` must be importable (defined at module level). The ranks meet through a file store: a TCP
    store on a probed port can lose the port to another process before it binds."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store_dir = tempfile.TemporaryDirectory(prefix="derm-ranks-")
    store = str(Path(store_dir.name) / "store")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        store_dir.cleanup()
    return [results[r] for r in range(world_size)]
