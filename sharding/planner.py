"""The sharding planner and the rules it plans under: which layouts each embedding table may take
on the device we train on, and the topology (ranks, memory per rank) it packs them into.

TorchRec's ``EmbeddingShardingPlanner`` proposes, for every table, a sharding type and a compute
kernel, then packs the shards onto ranks within each rank's memory. Left alone it proposes every
layout the sharders *declare*, and some of those are declared but break later, or fit on paper and
hurt in practice. ``sharding_constraints`` narrows each table to the layouts below, so a plan the
planner returns is one DMP can run (docs/sharding.md has the longer story):

====================  ===========================================  ======================================
table                 CPU (gloo)                                   CUDA (nccl)
====================  ===========================================  ======================================
pooled (EBC), small   data_parallel, table_wise, column_wise,      data_parallel, table_wise, column_wise,
                      table_column_wise                            table_column_wise
pooled (EBC), large   table_wise, column_wise, table_column_wise   row_wise, table_row_wise
sequence (EC), small  table_wise, row_wise                         table_wise, column_wise
sequence (EC), large  table_wise, row_wise                         row_wise
====================  ===========================================  ======================================

"Large" is ``LARGE_TABLE_ROWS`` (100k) rows or more; column_wise and table_column_wise apply only
to tables of 256 columns or more. Why:

- **EBC row-wise is CUDA-only.** FBGEMM has no CPU kernels for row-wise bags: the EBC sharder does
  not offer row_wise / table_row_wise on CPU, and forcing them fails planning ("No available
  sharding type and compute kernel combination"; TORCHREC-NOTES.md).
- **EC data_parallel is never allowed.** On CPU the sharder offers it but the forward pass fails
  (``split_with_sizes expects split_sizes to sum ...``; TORCHREC-NOTES.md). On CUDA it is
  unverified and would replicate an item-id table on every rank anyway. EC column_wise is
  untested on CPU, so CPU keeps to the two verified layouts, table_wise and row_wise.
- **Large tables are never data_parallel**: that replicates the whole table on every rank and
  all-reduces its *dense* gradient every step; right for gender or hour-of-day, ruinous for an
  entity-id table.
- **On CUDA, large tables are split by rows across ranks** (row_wise, or table_row_wise: rows
  across the GPUs of one host). Table- and column-wise layouts put a 128-dim table on one GPU
  (TorchRec's column-wise shards are at least 128 columns), where it fits on paper but leaves that
  GPU full and makes it the hot spot every lookup of the table goes to. Small tables stay off
  row-wise: splitting 24 rows over 64 GPUs buys nothing and costs an all-to-all.
- **Column-wise layouts only for tables of at least 256 columns.** TorchRec cuts column-wise
  shards at least ``MIN_CW_DIM`` = 128 wide, so a narrower table is one shard: table_wise under
  another name, and a coin-flip between equal options (TorchRec enumerates layouts from a set)
  that made the same model plan differently from run to run.
- **On CPU, large pooled tables** can only be table-wise (or column-wise, when wide); there are no
  row-wise kernels, so a table must fit one rank's memory (or its column shards must).
- **Compute kernels**: tables live in HBM on CUDA (``fused``; ``dense`` for data-parallel) unless
  ``allow_uvm``, which lets the planner move tables it cannot fit to host memory behind the GPU
  (``fused_uvm``, ``fused_uvm_caching``: HBM as a cache). UVM is much slower, so it is opt-in: a
  plan that does not fit in HBM fails loudly instead of quietly training at a fraction of the speed.

Example::

    # local: no process group needed; training passes its group (``pg``) and gets the same plan
    plan = plan_sharding(model_on_meta, spec.for_source("ctr"), world_size=64, device_type="cuda", batch_size=2048, hbm_gb=80)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterable, Optional, Union

import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import MIN_CW_DIM
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, Stats, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig

from data.spec import FeatureSpec

DEVICE_TYPES = ("cpu", "cuda")

LARGE_TABLE_ROWS = 100_000
"""Tables with at least this many rows are "large": never data-parallel, row-split on CUDA. A
100k x 64 fp32 replica is 25 MB, all-reduced every step if data-parallel."""

BATCH_SIZE = 512
"""Default per-rank batch the planner sizes input/output buffers and communication for
(TorchRec's own default)."""

RESERVED_HBM_FRACTION = 0.15
"""Share of each GPU's HBM kept free as a margin for what the estimates miss (activations,
allocator fragmentation), on top of the dense model and input buffers it reserves."""

_DP, _TW, _CW, _TWCW, _RW, _TWRW = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
)

# (collection, device) -> (types of small tables, types of large tables): the table in the module
# docstring, which says why.
_ALLOWED: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("ebc", "cpu"): ((_DP, _TW, _CW, _TWCW), (_TW, _CW, _TWCW)),
    ("ebc", "cuda"): ((_DP, _TW, _CW, _TWCW), (_RW, _TWRW)),
    ("ec", "cpu"): ((_TW, _RW), (_TW, _RW)),
    ("ec", "cuda"): ((_TW, _CW), (_RW,)),
}

_HBM_KERNELS = (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value)
_UVM_KERNELS = (EmbeddingComputeKernel.FUSED_UVM.value, EmbeddingComputeKernel.FUSED_UVM_CACHING.value)


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders of the two collections DERM models use: pooled bags and sequences."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def allowed_sharding_types(
    collection: str, device_type: str, num_embeddings: int, embedding_dim: int, large_table_rows: int = LARGE_TABLE_ROWS
) -> list[str]:
    """Sharding types a table of ``num_embeddings`` x ``embedding_dim`` may take; ``collection`` is
    "ebc" (pooled, ``EmbeddingBagCollection``) or "ec" (sequence, ``EmbeddingCollection``)."""
    _check_device_type(device_type)
    if collection not in ("ebc", "ec"):
        raise ValueError(f"collection must be 'ebc' or 'ec', got {collection!r}")
    small, large = _ALLOWED[(collection, device_type)]
    types = large if num_embeddings >= large_table_rows else small
    if embedding_dim < 2 * MIN_CW_DIM:  # column-wise would be one shard: table_wise by another name
        types = tuple(t for t in types if t not in (_CW, _TWCW))
    return list(types)


def allowed_compute_kernels(device_type: str, allow_uvm: bool = False) -> list[str]:
    """Compute kernels the planner may choose: tables in device memory (HBM on CUDA, host memory
    on CPU), plus UVM placements on CUDA when ``allow_uvm``."""
    _check_device_type(device_type)
    if allow_uvm and device_type != "cuda":
        raise ValueError("allow_uvm puts tables in host memory behind a GPU; it only applies to device_type='cuda'")
    return list(_HBM_KERNELS + (_UVM_KERNELS if allow_uvm else ()))


def sharding_constraints(
    tables: Union[FeatureSpec, nn.Module, Iterable[BaseEmbeddingConfig]],
    device_type: str,
    large_table_rows: int = LARGE_TABLE_ROWS,
    allow_uvm: bool = False,
    spec: Optional[FeatureSpec] = None,
) -> dict[str, ParameterConstraints]:
    """Per-table ``ParameterConstraints``, keyed by table name (``t_<table>``), that allow only the
    layouts and kernels of the module docstring's table on ``device_type``.

    Args:
        tables: a feature spec (restricted to the model's source with ``spec.for_source``), a
            module holding ``EmbeddingBagCollection``s / ``EmbeddingCollection``s, or their table
            configs.
        device_type: "cpu" or "cuda".
        large_table_rows: tables with at least this many rows are "large".
        allow_uvm: CUDA only; let the planner put tables in host memory (UVM) when HBM is short.
        spec: with a module or table configs, the spec their features come from: it gives the
            pooling factors below (features it does not name keep TorchRec's default).

    From a spec, each table also gets its features' pooling factors (ids per row: 1 for a single
    id, ``max_length`` for a sequence), so the planner sizes lookups and outputs from the data
    rather than its default of one id per feature. (A multi-id feature's list length is not in the
    spec; it keeps TorchRec's default of 1.)
    """
    _check_device_type(device_type)
    if large_table_rows < 1:
        raise ValueError(f"large_table_rows must be >= 1, got {large_table_rows}")
    kernels = allowed_compute_kernels(device_type, allow_uvm)
    out: dict[str, ParameterConstraints] = {}
    for name, (kind, rows, dim, features, pooling) in _tables(tables, spec).items():
        out[name] = ParameterConstraints(
            sharding_types=allowed_sharding_types(kind, device_type, rows, dim, large_table_rows),
            compute_kernels=kernels,
            feature_names=features,
            **({"pooling_factors": pooling} if pooling else {}),
        )
    return out


def make_topology(
    world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    local_world_size: Optional[int] = None,
) -> Topology:
    """The ranks and their memory, as the planner sees them (arguments as in ``make_planner``)."""
    _check_device_type(device_type)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if local_world_size is not None and (local_world_size < 1 or world_size % local_world_size):
        raise ValueError(f"local_world_size (ranks per host) must divide world_size={world_size}, got {local_world_size}")
    if hbm_gb is not None and device_type != "cuda":
        raise ValueError("hbm_gb is GPU memory; it only applies to device_type='cuda'")
    for name, gb in (("hbm_gb", hbm_gb), ("ddr_gb", ddr_gb)):
        if gb is not None and gb <= 0:
            raise ValueError(f"{name} must be > 0, got {gb}")
    return TopologyFactory.create_topology(
        TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=_bytes(hbm_gb),
            ddr_cap_bytes=_bytes(ddr_gb),
        ),
        kernel_config=KernelConfig(compute_device=device_type),
    )


def make_planner(
    world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    batch_size: int = BATCH_SIZE,
    constraints: Optional[dict[str, ParameterConstraints]] = None,
    *,
    local_world_size: Optional[int] = None,
    stats: Optional[list[Stats]] = None,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` for ``world_size`` ranks of ``device_type``.

    Args:
        world_size: ranks the tables are spread over.
        device_type: "cpu" (tables in host memory) or "cuda" (tables in HBM; in host memory too
            when the constraints allow UVM kernels).
        hbm_gb: GPU memory per rank in GiB (CUDA only; TorchRec's default is 32).
        ddr_gb: host memory per rank in GiB (TorchRec's default is 128).
        batch_size: per-rank batch, for the input/output buffer and comms estimates.
        constraints: per-table constraints, normally ``sharding_constraints(...)``; without them
            the planner may pick layouts that fail on CPU (see the module docstring).
        local_world_size: ranks per host (default: all on one host); table_row_wise spreads a
            table over one host's ranks, and the planner prices cross-host traffic from it.
        stats: planner stats loggers (default: TorchRec's ``EmbeddingStats``, which logs its
            table at INFO level).

    The planner reserves, on every rank, memory for the dense model (6x its parameters: weights,
    gradients, optimizer state, DDP buckets), for input buffers (from ``batch_size``) and, on
    CUDA, ``RESERVED_HBM_FRACTION`` of HBM as margin; tables get the rest.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    topology = make_topology(world_size, device_type, hbm_gb, ddr_gb, local_world_size)
    if constraints and topology.local_world_size == world_size:
        constraints = _one_host(constraints)
    with warnings.catch_warnings():
        # TorchRec warns at every construction that the heuristic over-estimates dense storage of
        # unmaterialised modules; ours builds its dense towers for real (or on meta, with sizes).
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(percentage=RESERVED_HBM_FRACTION)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=reservation,
        constraints=constraints,
        stats=stats,
        debug=False,
    )


def plan_sharding(
    module: nn.Module,
    spec: Optional[FeatureSpec],
    world_size: int,
    device_type: str,
    batch_size: int = BATCH_SIZE,
    *,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    local_world_size: Optional[int] = None,
    allow_uvm: bool = False,
    stats: Optional[list[Stats]] = None,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """The sharding plan of ``module``'s tables: the one planning function, called by training
    (``sharding.dmp.shard_model``) and by the dry run (``sharding.plan_cli``), so that a dry run
    of a config predicts the plan its training uses (tests/test_trainer.py checks it).

    Constraints come from the module's tables and the layouts of the module docstring; pooling
    factors from ``spec`` (the model's source's spec; ``None``: TorchRec's default of one id per
    feature); input buffers from ``batch_size``, the per-rank batch the run trains with. With
    ``pg``, rank 0 plans and the other ranks of ``pg`` receive its plan (collective); without,
    the plan is made locally (a dry run needs no process group). Other arguments as in
    :func:`make_planner` and :func:`sharding_constraints`.
    """
    constraints = sharding_constraints(module, device_type, allow_uvm=allow_uvm, spec=spec)
    planner = make_planner(world_size, device_type, hbm_gb, ddr_gb, batch_size, constraints,
                           local_world_size=local_world_size, stats=stats)
    if pg is not None:
        return planner.collective_plan(module, sharders(), pg)
    return planner.plan(module, sharders())


def plan_to_json(plan: ShardingPlan) -> dict[str, dict[str, dict]]:
    """The plan as plain JSON (``plan.json`` beside each snapshot): per collection and table, its
    sharding type, compute kernel and shards (rank, row and column offsets, sizes)."""
    out: dict[str, dict[str, dict]] = {}
    for module_path, params in sorted(plan.plan.items()):
        for name, p in sorted(params.items()):
            shards = []
            if p.sharding_spec is not None:
                shards = [{"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
                          for s in p.sharding_spec.shards]
            out.setdefault(module_path, {})[name] = {
                "sharding_type": p.sharding_type, "compute_kernel": p.compute_kernel,
                "ranks": list(p.ranks) if p.ranks is not None else None, "shards": shards,
            }
    return out


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: ``model.ebc.t_user_id: table_wise/fused on ranks [0]``."""
    return "\n".join(f"{m}.{t}: {p['sharding_type']}/{p['compute_kernel']} on ranks {p['ranks'] or 'all'}"
                     for m, tables in plan_to_json(plan).items() for t, p in tables.items())


# ---- helpers ---------------------------------------------------------------------------------


def _one_host(constraints: dict[str, ParameterConstraints]) -> dict[str, ParameterConstraints]:
    """On one host table_row_wise *is* row_wise (rows over the host's ranks = all ranks); keeping
    both makes the planner pick between equals at random (it enumerates layouts from a set)."""
    out = {}
    for name, c in constraints.items():
        types = c.sharding_types
        if types and _RW in types and _TWRW in types:
            c = dataclasses.replace(c, sharding_types=[t for t in types if t != _TWRW])
        out[name] = c
    return out


def _check_device_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type must be one of {DEVICE_TYPES}, got {device_type!r}")


def _bytes(gb: Optional[float]) -> Optional[int]:
    return None if gb is None else int(gb * 1024**3)


def _pooling_factors(spec: FeatureSpec) -> dict[str, float]:
    """Feature name -> ids per row: 1 for a single id, ``max_length`` for a sequence."""
    return {**{f.name: 1.0 for f in spec.sparse}, **{f.name: float(f.max_length) for f in spec.sequence}}


def _tables(
    tables: Union[FeatureSpec, nn.Module, Iterable[BaseEmbeddingConfig]],
    spec: Optional[FeatureSpec] = None,
) -> dict[str, tuple[str, int, int, list[str], list[float]]]:
    """Table name -> (collection "ebc"/"ec", rows, dim, feature names, pooling factors or [])."""
    out: dict[str, tuple[str, int, int, list[str], list[float]]] = {}
    if isinstance(tables, FeatureSpec):
        # Spec order, as modules/embedding_tables.py lists a table's features; the
        # pooling factors must follow that order.
        for kind, features in (("ebc", tables.sparse), ("ec", tables.sequence)):
            for f in features:
                entry = out.setdefault(f"t_{f.table}", (kind, f.num_embeddings, f.embedding_dim, [], []))
                entry[3].append(f.name)
                entry[4].append(float(f.max_length) if kind == "ec" else 1.0)
        return out
    if isinstance(tables, nn.Module):
        configs: list[BaseEmbeddingConfig] = []
        for m in tables.modules():
            if isinstance(m, EmbeddingBagCollection):
                configs.extend(m.embedding_bag_configs())
            elif isinstance(m, EmbeddingCollection):
                configs.extend(m.embedding_configs())
        tables = configs
    pooling = _pooling_factors(spec) if spec is not None else {}
    for cfg in tables:
        kind = "ebc" if isinstance(cfg, EmbeddingBagConfig) else "ec"
        features = list(cfg.feature_names)
        factors = [pooling[f] for f in features] if pooling and all(f in pooling for f in features) else []
        out[cfg.name] = (kind, cfg.num_embeddings, cfg.embedding_dim, features, factors)
    return out
