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


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Initialises the default process group (once) and returns where this rank runs."""
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
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown() -> None:
    """Leave the group cleanly (TORCHREC-NOTES: an unclean exit can abort after the last step)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

