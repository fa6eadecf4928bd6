"""Joining the process group: under torchrun / TorchX (RANK, WORLD_SIZE, MASTER_ADDR set) or as a
plain single process (a one-rank group on an in-memory store: no port to pick, so nothing to race
for), choosing CPU+gloo or CUDA+nccl once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: int = 1800, threads: int = 0) -> DistContext:
    """Initialises the default process group (once), sets this rank's intra-op threads
    (:func:`set_threads`) and returns where this rank runs."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device = cuda but CUDA is not available here; use cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun / TorchX: the env:// rendezvous they set up
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain `python trainer/main.py`: one rank. A TCP store on a probed "free" port
            # can lose that port to another process before it binds (EADDRINUSE in CI).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    set_threads(threads)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def set_threads(threads: int = 0) -> int:
    """Sets torch's intra-op threads for this rank; -> the number set.

    ``threads`` > 0 is taken as it is. 0 (the default) takes ``DERM_THREADS`` from the environment
    when set (the daily pipeline sets it for jobs that share one host), else gives each rank its
    share of the cores this process may run on: cores // ranks on this host (``LOCAL_WORLD_SIZE``,
    1 for a plain process), at least 1. torchrun itself sets ``OMP_NUM_THREADS=1`` for every rank, which leaves a one-rank
    job on an 8-core box one core; this policy replaces that. On a machine shared with other jobs,
    set ``train.threads`` to the cores that are really yours: an OpenMP region whose threads lose
    their core to another process stalls (2-thread steps slowed 5-13x under contention here).
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: cores // local ranks), got {threads}")
    if threads == 0 and os.environ.get("DERM_THREADS", "").strip():
        threads = int(os.environ["DERM_THREADS"])
        if threads < 1:
            raise ValueError(f"DERM_THREADS must be >= 1, got {threads}")
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)
    return threads


def shutdown(failed: bool = False) -> None:
    """Leave the group: cleanly after success (a barrier first; TORCHREC-NOTES: an unclean exit can
    abort after the last step); at once after a failure. A failed rank must not wait in a barrier
    while its peers wait in a training collective: it leaves, its process exits non-zero, and
    torchrun stops the peers within seconds instead of at the process-group timeout."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()

