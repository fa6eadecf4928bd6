"""Sharding a model with TorchRec: fused embedding optimizers, the planner, DistributedModelParallel,
and the dense optimizer beside the fused one — in that order (the recipe of TORCHREC-NOTES.md).

Order matters: the fused optimizer must be attached to the embedding tables *before* the planner
and DMP see them (``apply_optimizer_in_backward``), and the dense optimizer built *after* DMP, over
the parameters DMP leaves to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,  # fused Adam is CUDA-only in FBGEMM
}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class OptimizerConfig:
    sparse: str = "rowwise_adagrad"
    """Fused optimizer of the embedding tables: rowwise_adagrad, adagrad, sgd, adam (CUDA only)."""
    sparse_lr: float = 0.05
    dense: str = "adam"
    """Optimizer of everything else: adam, adagrad, sgd."""
    dense_lr: float = 1e-3

    def check(self, device: torch.device) -> None:
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(f"optimizer.sparse must be one of {sorted(SPARSE_OPTIMIZERS)}, got {self.sparse!r}")
        if self.dense not in DENSE_OPTIMIZERS:
            raise ValueError(f"optimizer.dense must be one of {sorted(DENSE_OPTIMIZERS)}, got {self.dense!r}")
        if self.sparse == "adam" and device.type != "cuda":
            raise ValueError("optimizer.sparse = 'adam' needs CUDA (FBGEMM has no fused Adam on CPU); use rowwise_adagrad")


def shard_model(
    module: nn.Module,
    device: torch.device,
    optimizer: OptimizerConfig = OptimizerConfig(),
    pg: dist.ProcessGroup | None = None,
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shards ``module``'s embedding collections across the ranks of ``pg`` (dense parts stay
    data-parallel) and returns the DMP-wrapped module with one optimizer for all parameters.

    ``module``'s collections are expected on ``meta``; its dense parts on ``device``.
    """
    optimizer.check(device)
    pg = pg if pg is not None else dist.group.WORLD
    tables = [p for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[optimizer.sparse], tables, {"lr": optimizer.sparse_lr})
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    topology = Topology(world_size=dist.get_world_size(pg), compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, debug=False).collective_plan(module, sharders, pg)
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders)
    dense_cls = DENSE_OPTIMIZERS[optimizer.dense]
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: dense_cls(params, lr=optimizer.dense_lr),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])
