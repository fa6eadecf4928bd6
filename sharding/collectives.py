"""Collectives the model's rank-free modules are handed by the sharding layer."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def all_gather_ids(pg: dist.ProcessGroup | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that returns the concatenation, in rank order, of every rank's 1-D id tensor.

    Ranks may hold different numbers of ids (gloo's all_gather needs equal sizes, so ids are
    padded to the longest and trimmed after). The frequency estimator of the contrastive loss
    (modules/losses.py) uses it so that every rank counts the global batch and all ranks keep
    identical state.
    """

    def gather(ids: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size(pg)
        if world == 1:
            return ids
        size = torch.tensor([ids.numel()], device=ids.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=pg)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=ids.dtype, device=ids.device)
        padded[: ids.numel()] = ids
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=pg)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    return gather
