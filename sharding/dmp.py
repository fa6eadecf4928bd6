"""Sharding a model with TorchRec: fused embedding optimizers, the planner, DistributedModelParallel,
and the dense optimizer beside the fused one — in that order (the recipe of TORCHREC-NOTES.md).

Order matters: the fused optimizer must be attached to the embedding tables *before* the planner
and DMP see them (``apply_optimizer_in_backward``; the planner counts its state), and the dense
optimizer built *after* DMP, over the parameters DMP leaves to it. The planner and the layouts it
may choose per device are ``sharding/planner.py``'s.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from data.spec import FeatureSpec
from sharding.config import DENSE_OPTIMIZER_NAMES, SPARSE_OPTIMIZER_NAMES, OptimizerConfig
from sharding.planner import BATCH_SIZE, plan_sharding, sharders

SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,  # fused Adam is CUDA-only in FBGEMM
}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
assert tuple(SPARSE_OPTIMIZERS) == SPARSE_OPTIMIZER_NAMES and tuple(DENSE_OPTIMIZERS) == DENSE_OPTIMIZER_NAMES


def shard_model(
    module: nn.Module,
    device: torch.device,
    optimizer: OptimizerConfig = OptimizerConfig(),
    pg: dist.ProcessGroup | None = None,
    plan: Optional[ShardingPlan] = None,
    *,
    spec: Optional[FeatureSpec] = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shards ``module``'s embedding collections across the ranks of ``pg`` (dense parts stay
    data-parallel) and returns the DMP-wrapped module with one optimizer for all parameters.

    ``module``'s collections are expected on ``meta``; its dense parts on ``device``.

    Args:
        plan: a ready plan (e.g. from a dry run); skips planning. It must cover every table.
        spec: the spec of the model's source (``spec.for_source(source)``): the tables' pooling
            factors for the planner (``sharding.planner.plan_sharding``, which the dry run calls too).
        batch_size: the per-rank batch the run trains with, for the planner's buffer estimates.
    """
    optimizer.check(device.type)
    pg = pg if pg is not None else dist.group.WORLD
    tables = [p for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[optimizer.sparse], tables, {"lr": optimizer.sparse_lr})
    if plan is None:
        world_size = dist.get_world_size(pg)
        plan = plan_sharding(module, spec, world_size, device.type, batch_size, hbm_gb=_hbm_gb(device),
                             local_world_size=_local_world_size(world_size), pg=pg)  # rank 0 plans, the others receive it
    # One rank has no peer to all-reduce dense gradients with, yet DDP would still copy them into
    # its buckets each step (7 % of a one-rank DERM step on CPU, bench/bench_train.py). State-dict
    # keys are the same either way (DMP strips DDP's prefix), so snapshots reshard across both.
    dmp = DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders(),
        init_data_parallel=dist.get_world_size(pg) > 1,
    )
    dense_cls = DENSE_OPTIMIZERS[optimizer.dense]
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        # fused=True: one kernel per step over all dense tensors (PyTorch's fused CPU and CUDA
        # implementations) instead of a Python loop over ~220 parameters, each several kernels.
        lambda params: dense_cls(params, lr=optimizer.dense_lr, fused=optimizer.fused_dense),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _hbm_gb(device: torch.device) -> Optional[float]:
    """The GPU's own memory, not TorchRec's default of 32 GB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def _local_world_size(world_size: int) -> int:
    """Ranks per host, as torchrun/TorchX set it (all ranks on one host when unset or odd)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return local if 1 <= local <= world_size and world_size % local == 0 else world_size
