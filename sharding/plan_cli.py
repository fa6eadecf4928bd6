"""Plan dry-run: how the embedding tables of a DERM model would shard over a cluster, and whether
they fit, without the cluster.

The model is built on ``meta`` (shapes, no memory), the planner of ``sharding/planner.py`` runs
locally (no process group), and the plan is printed: per table its sharding type, compute kernel,
ranks and shard sizes; per rank the estimated HBM/DDR use against its capacity. Exit status 0 when
the plan fits, 1 (with the reason) when it does not, 2 on a bad argument.

Usage::

    # the production-sized example of docs/sharding.md: 500M users, 100M Pins, 128-dim, 64 x 80 GB
    python -m sharding.plan_cli --users 500000000 --pins 100000000 --dim 128 \\
        --world-size 64 --device cuda --hbm-gb 80
    python -m sharding plan --synthetic-preset large --world-size 8 --device cuda --hbm-gb 16
    python -m sharding plan --spec runs/data/tiny/spec.toml --source cvr --world-size 2 --device cpu

``--users/--pins/--dim`` scale the entity tables of the chosen spec (by default the synthetic
``large`` one): the table on the spec's user key, and the tables of Pin ids (the Pin key and every
sequence). Planning takes seconds, whatever the table sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Stats, Storage, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from common.log import setup_logging
from data.spec import FeatureSpec, SpecError, load_spec
from data.synthetic.config import PRESETS
from data.synthetic.features import synthetic_spec
from modules.config import DERMConfig
from modules.derm import build_derm
from sharding.config import OptimizerConfig
from sharding.dmp import SPARSE_OPTIMIZERS
from sharding.planner import BATCH_SIZE, RESERVED_HBM_FRACTION, make_topology, plan_sharding, sharders, sharding_constraints

GPUS_PER_HOST = 8
"""Default ranks per host on CUDA (one host = 8 GPUs); table_row_wise spreads a table over them."""
MAX_RANK_ROWS = 32
"""Rows of the per-rank table (ranks with equal load share one); beyond it, the most loaded."""


# ---- the spec ------------------------------------------------------------------------------


def scale_entity_tables(spec: FeatureSpec, users: Optional[int] = None, pins: Optional[int] = None, dim: Optional[int] = None) -> FeatureSpec:
    """``spec`` with its entity tables resized: ``users`` rows for the table(s) of the user key
    column, ``pins`` rows for those of the Pin key and of every sequence (sequences are Pin ids),
    and ``dim`` columns for all of them. Other tables keep their size."""
    user_tables = {f.table for f in spec.sparse if f.column == spec.keys.user}
    pin_tables = {f.table for f in spec.sparse if f.column == spec.keys.pin} | {f.table for f in spec.sequence}
    if users is not None and not user_tables:
        raise ValueError(f"--users: spec {spec.name!r} has no sparse feature on the user key column {spec.keys.user!r}")
    if pins is not None and not pin_tables:
        raise ValueError(f"--pins: spec {spec.name!r} has no sparse feature on the Pin key column {spec.keys.pin!r} and no sequence")

    def resize(f):
        rows = users if f.table in user_tables else pins if f.table in pin_tables else None
        if f.table not in user_tables | pin_tables or (rows is None and dim is None):
            return f
        return dataclasses.replace(f, num_embeddings=rows or f.num_embeddings, embedding_dim=dim or f.embedding_dim)

    # FeatureSpec validates again on construction (dims a multiple of 4, shared tables agree).
    return dataclasses.replace(spec, sparse=tuple(map(resize, spec.sparse)), sequence=tuple(map(resize, spec.sequence)))


# ---- the dry run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TablePlan:
    """Where one table goes."""

    name: str
    module: str
    """Path of its collection in the model, e.g. ``model.ebc``."""
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    """Rank of each shard (every rank, for data_parallel)."""
    shard_sizes: tuple[tuple[int, int], ...]
    """(rows, columns) of each shard, in the order of ``ranks``."""
    shard_storage: tuple[Storage, ...]
    """Estimated bytes of each shard: weights, optimizer state, lookup buffers."""

    @property
    def storage(self) -> Storage:
        """All shards together."""
        return _sum_storage(self.shard_storage)


@dataclass(frozen=True)
class RankUsage:
    """Estimated memory of one rank, in bytes."""

    rank: int
    tables: Storage
    """The shards it holds."""
    reserved: Storage
    """Set aside by the planner: dense model (x6), input buffers, and the HBM margin."""
    capacity: Storage

    @property
    def total(self) -> Storage:
        return self.tables + self.reserved


@dataclass(frozen=True)
class DryRun:
    """A plan and its memory, or why there is none."""

    device_type: str
    world_size: int
    batch_size: int
    tables: tuple[TablePlan, ...]
    ranks: tuple[RankUsage, ...]
    seconds: float
    error: str = ""
    """Empty when the plan fits; otherwise what does not fit and what to try."""
    plan: Optional[ShardingPlan] = None
    """The plan itself (``sharding.planner.plan_to_json`` writes it as training does)."""

    @property
    def fits(self) -> bool:
        return not self.error


class _PlanRecorder(Stats):
    """Keeps what the planner hands its stats loggers: the chosen sharding options (with shard
    ranks and storage estimates) and the topology left after its reservation."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.reserved_topology: Optional[Topology] = None

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time, best_plan, *args, **kwargs) -> None:  # noqa: ANN001
        self.best_plan = list(best_plan)
        self.reserved_topology = storage_reservation.last_reserved_topology


def build_meta_model(spec: FeatureSpec, source: str, sparse_optimizer: str = "rowwise_adagrad",
                     model_config: DERMConfig = DERMConfig()) -> nn.Module:
    """The train task of ``source`` on ``meta``, its tables under the fused optimizer (whose state
    the planner counts), as ``shard_model`` would see it."""
    task = build_derm(spec, source, model_config, device=torch.device("meta"))
    tables = [p for m in task.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse_optimizer], tables, {"lr": 0.01})
    return task


def dry_run(
    spec: FeatureSpec,
    source: str,
    world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    batch_size: int = BATCH_SIZE,
    local_world_size: Optional[int] = None,
    allow_uvm: bool = False,
    sparse_optimizer: str = "rowwise_adagrad",
    verbose: bool = False,
    model_config: DERMConfig = DERMConfig(),
) -> DryRun:
    """Plans ``source``'s model of ``spec`` for ``world_size`` ranks of ``device_type``, locally,
    with the planning function training uses (``sharding.planner.plan_sharding``): a run config's
    ``data.batch_size``, ``model`` and ``optimizer.sparse`` given here give the plan its training
    makes on as many ranks (``plan``; tests/test_trainer.py).

    Arguments as in ``sharding.planner.make_planner``; ``allow_uvm`` lets tables spill to host
    memory (CUDA); ``verbose`` adds TorchRec's own stats table to the log. Raises ``ValueError``
    on a bad argument; a plan that does not fit is returned with its ``error``.
    """
    OptimizerConfig(sparse=sparse_optimizer).check(device_type)
    model = build_meta_model(spec, source, sparse_optimizer, model_config)
    spec = spec.for_source(source)
    recorder = _PlanRecorder()
    stats: list[Stats] = [recorder, EmbeddingStats()] if verbose else [recorder]
    topology = make_topology(world_size, device_type, hbm_gb, ddr_gb, local_world_size)
    start = time.perf_counter()
    error, plan = "", None
    try:
        plan = plan_sharding(model, spec, world_size, device_type, batch_size, hbm_gb=hbm_gb, ddr_gb=ddr_gb,
                             local_world_size=local_world_size, allow_uvm=allow_uvm, stats=stats)
    except PlannerError as e:
        constraints = sharding_constraints(model, device_type, allow_uvm=allow_uvm, spec=spec)
        logging.getLogger(__name__).info("planner: %s", e)  # its full report, for --verbose
        error = _explain_no_plan(e, model, topology, recorder.reserved_topology, batch_size, constraints)
    seconds = time.perf_counter() - start
    tables = tuple(_table_plan(so) for so in recorder.best_plan) if not error else ()
    return DryRun(device_type, world_size, batch_size, tables, _rank_usage(tables, topology, recorder.reserved_topology), seconds,
                  error, plan)


def _table_plan(so: ShardingOption) -> TablePlan:
    rows, dim = so.tensor.shape
    return TablePlan(
        name=so.name,
        module=so.path,
        rows=rows,
        dim=dim,
        sharding_type=so.sharding_type,
        compute_kernel=so.compute_kernel,
        ranks=tuple(s.rank for s in so.shards),
        shard_sizes=tuple((s.size[0], s.size[1]) for s in so.shards),
        shard_storage=tuple(s.storage for s in so.shards),
    )


def _rank_usage(tables: Sequence[TablePlan], topology: Topology, reserved: Optional[Topology]) -> tuple[RankUsage, ...]:
    per_rank = [Storage(0, 0) for _ in range(topology.world_size)]
    for t in tables:
        for rank, storage in zip(t.ranks, t.shard_storage):
            per_rank[rank] += Storage(storage.hbm, storage.ddr)
    out = []
    for rank, device in enumerate(topology.devices):
        cap = Storage(device.storage.hbm, device.storage.ddr)
        left = reserved.devices[rank].storage if reserved is not None else cap
        out.append(RankUsage(rank, per_rank[rank], Storage(cap.hbm - left.hbm, cap.ddr - left.ddr), cap))
    return tuple(out)


def _explain_no_plan(error: PlannerError, model: nn.Module, topology: Topology, reserved: Optional[Topology], batch_size: int, constraints) -> str:  # noqa: ANN001
    """What does not fit, in numbers: the tables in their smallest allowed layouts against the
    memory the ranks have left for tables after the planner's reservation, and any table whose
    smallest shard is bigger than a rank."""
    planner_says = f"  (TorchRec: {str(error).strip().splitlines()[0].rstrip(' .')}; --verbose for its full report)"
    if reserved is None:  # the reservation itself failed: the dense model and buffers alone do not fit
        return "  The dense model and input buffers alone do not fit a rank.\n" + str(error).strip()
    bytes_of = lambda s: s.hbm + s.ddr  # noqa: E731
    smallest: dict[str, Storage] = {}  # table -> its smallest layout, all shards
    smallest_shard: dict[str, tuple[Storage, str]] = {}  # table -> its smallest biggest shard, and layout
    options = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints).enumerate(model, sharders())
    for so in options:
        if so.name not in smallest or bytes_of(so.total_storage) < bytes_of(smallest[so.name]):
            smallest[so.name] = so.total_storage
        biggest = max((s.storage for s in so.shards), key=bytes_of)
        if so.name not in smallest_shard or bytes_of(biggest) < bytes_of(smallest_shard[so.name][0]):
            smallest_shard[so.name] = (biggest, so.sharding_type)
    need = _sum_storage(smallest.values())
    have = _sum_storage(Storage(d.storage.hbm, d.storage.ddr) for d in reserved.devices)
    rank_has = reserved.devices[0].storage
    per_rank_reserved = topology.devices[0].storage - rank_has
    lines = []
    for t in (t for t in ("hbm", "ddr") if getattr(need, t) > 0):
        lines.append(
            f"  {t.upper()}: the tables need at least {_size(getattr(need, t))} (each in its smallest allowed layout); "
            f"{topology.world_size} ranks x {_size(getattr(topology.devices[0].storage, t))} leave {_size(getattr(have, t))} "
            f"for tables after reserving {_size(getattr(per_rank_reserved, t))} per rank (dense model, input buffers, margin)"
        )
    too_big = {n: v for n, v in smallest_shard.items() if v[0].hbm > rank_has.hbm or v[0].ddr > rank_has.ddr}
    for name, (shard, layout) in sorted(too_big.items()):
        lines.append(
            f"  {name}: its smallest shard ({layout}) needs {_size(bytes_of(shard))}, more than a rank has for tables "
            f"({_size(rank_has.hbm or rank_has.ddr)})"
            + ("; row-wise sharding, which splits it over ranks, needs CUDA" if topology.compute_device == "cpu" else "")
        )
    # More ranks help unless a table is too big for a rank in layouts that do not split by rows.
    more_ranks_help = not too_big or all(layout in ("row_wise", "table_row_wise") for _, layout in too_big.values())
    lines.append(
        "  Try: "
        + ("more ranks (--world-size), " if more_ranks_help else "")
        + "more memory per rank (--hbm-gb/--ddr-gb), "
        + ("--allow-uvm (tables in host memory, slower), " if topology.compute_device == "cuda" else "")
        + "a smaller --batch-size, or smaller tables."
    )
    lines.append(planner_says)
    return "\n".join(lines)


def _sum_storage(storages) -> Storage:  # noqa: ANN001
    total = Storage(0, 0)
    for s in storages:
        total += Storage(s.hbm, s.ddr)
    return total


# ---- printing ------------------------------------------------------------------------------


def format_dry_run(run: DryRun, all_ranks: bool = False) -> str:
    """The plan as the CLI prints it: ranks, tables, memory per rank, then the verdict."""
    cap = run.ranks[0].capacity
    # Memory tiers worth columns: the device's own (HBM on cuda, DDR on cpu) and any other in use.
    tiers = [t for t in ("hbm", "ddr") if getattr(cap, t) and (t == _home_tier(run) or any(getattr(r.total, t) for r in run.ranks))]
    memory = " + ".join(f"{_size(getattr(cap, t))} {t.upper()}" for t in ("hbm", "ddr") if getattr(cap, t))
    out = [f"Ranks: {run.world_size} x {run.device_type}, {memory} each; batch {run.batch_size} per rank", ""]
    if run.tables:
        out.append("Tables (memory: weights + optimizer state + lookup buffers, all shards together):")
        header = ("table", "module", "rows", "dim", "sharding", "kernel", "ranks", "shards (rows x cols)", *(t.upper() for t in tiers))
        rows = [
            (t.name, t.module, f"{t.rows:,}", str(t.dim), t.sharding_type, t.compute_kernel, _ranks(t.ranks, run.world_size),
             _shards(t.shard_sizes), *(_size(getattr(t.storage, tier)) for tier in tiers))
            for t in sorted(run.tables, key=lambda t: (-(t.storage.hbm + t.storage.ddr), t.name))
        ]
        out += _table(header, rows, right={2, 3, *range(8, 8 + len(tiers))})
        out.append("")

        # Neighbouring ranks whose totals print the same share a row ("16-63"), showing its most
        # loaded rank: a 3-row table on rank 17 should not cost a line of its own.
        cells = lambda r: tuple(_size(getattr(s, t)) for t in tiers for s in (r.tables, r.reserved, r.total)) + tuple(  # noqa: E731
            f"{100 * getattr(r.total, t) / getattr(cap, t):.1f}%" for t in tiers)
        key = (lambda r: r.rank) if all_ranks else (lambda r: tuple(_size(getattr(r.total, t)) for t in tiers))
        load = lambda r: r.total.hbm + r.total.ddr  # noqa: E731
        groups: list[tuple[list[int], RankUsage]] = []
        for r in run.ranks:
            if groups and key(groups[-1][1]) == key(r):
                ranks, shown = groups[-1]
                groups[-1] = (ranks + [r.rank], max(shown, r, key=load))
            else:
                groups.append(([r.rank], r))
        note = ""
        if len(groups) > MAX_RANK_ROWS and not all_ranks:
            groups = sorted(groups, key=lambda g: -load(g[1]))[:MAX_RANK_ROWS]
            note = f", the {MAX_RANK_ROWS} most loaded rows (--all-ranks lists all)"
        margin = f", {RESERVED_HBM_FRACTION:.0%} of HBM as margin" if "hbm" in tiers else ""
        same = "" if all_ranks else "; ranks with equal totals share a row, showing its most loaded"
        out.append(f"Per rank (reserved: dense model x6, input buffers{margin}{same}){note}:")
        header = ("ranks", *(f"{t.upper()} {c}" for t in tiers for c in ("tables", "reserved", "total")), *(f"of {_size(getattr(cap, t))} {t.upper()}" for t in tiers))
        out += _table(header, [(_ranks(ranks, 0), *cells(r)) for ranks, r in groups], right=set(range(1, len(header))))
        out.append("")

        for t in tiers:
            total = sum(getattr(r.tables, t) for r in run.ranks)
            worst = max(run.ranks, key=lambda r: getattr(r.total, t))
            used, of = getattr(worst.total, t), getattr(cap, t)
            out.append(
                f"{t.upper()}: tables {_size(total)} over {run.world_size} ranks; "
                f"max per rank {_size(used)} of {_size(of)} ({100 * used / of:.1f}%), rank {worst.rank}"
            )
    if run.fits:
        out.append(f"FITS (planned in {run.seconds:.1f} s)")
    else:
        out.append(f"DOES NOT FIT (planned in {run.seconds:.1f} s)")
        out.append(run.error)
    return "\n".join(out)


def _home_tier(run: DryRun) -> str:
    return "hbm" if run.device_type == "cuda" else "ddr"


def _size(n: float) -> str:
    """Bytes, human-readable: "0", "812 B", "48.1 KiB", "30.8 GiB"."""
    if n == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _ranks(ranks: Sequence[int], world_size: int) -> str:
    """Shard ranks as spans: "all 64", "8-15", "3", "0-3,8"."""
    distinct = sorted(set(ranks))
    if len(distinct) == world_size > 1:
        return f"all {world_size}"
    spans: list[list[int]] = []
    for r in distinct:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _shards(sizes: Sequence[tuple[int, int]]) -> str:
    return " + ".join(f"{n} x {r:,} x {c}" for (r, c), n in Counter(sizes).items())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return ["  " + fmt(header)] + ["  " + fmt(r) for r in rows]


# ---- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.plan_cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", help="feature spec (spec.toml) to plan for")
    src.add_argument("--synthetic-preset", choices=sorted(PRESETS), help="the synthetic world's spec at this preset (default: large)")
    p.add_argument("--users", type=int, help="rows of the user-id table (production size: 500000000)")
    p.add_argument("--pins", type=int, help="rows of the Pin-id and sequence tables (production size: 100000000)")
    p.add_argument("--dim", type=int, help="width of those entity tables (a multiple of 4)")
    p.add_argument("--source", default="ctr", help="which source's model to plan (default: ctr)")
    p.add_argument("--world-size", type=int, required=True, help="ranks to shard over")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="device type of the ranks (default: cuda)")
    p.add_argument("--hbm-gb", type=float, help="GPU memory per rank, GiB (cuda; default: TorchRec's 32)")
    p.add_argument("--ddr-gb", type=float, help="host memory per rank, GiB (default: TorchRec's 128)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"per-rank batch (default: {BATCH_SIZE})")
    p.add_argument("--ranks-per-host", type=int, help=f"ranks per host (default: {GPUS_PER_HOST} on cuda when it divides the world size; else all on one host)")
    p.add_argument("--allow-uvm", action="store_true", help="cuda: let tables spill to host memory (UVM; slower) when HBM is short")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=sorted(SPARSE_OPTIMIZERS), help="fused optimizer whose state is counted (default: rowwise_adagrad)")
    p.add_argument("--all-ranks", action="store_true", help="one row per rank in the per-rank table (default: equal neighbours share a row, at most "
                   f"{MAX_RANK_ROWS} rows)")
    p.add_argument("--verbose", action="store_true", help="also log TorchRec's planner messages and stats table")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    # The planner warns about things a dry run does not care about (one root-logger line per
    # data-parallel table: "Sharding spec not found"); keep them for --verbose.
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        spec = load_spec(args.spec) if args.spec else synthetic_spec(PRESETS[args.synthetic_preset or "large"])
        if args.users is not None or args.pins is not None or args.dim is not None:
            spec = scale_entity_tables(spec, args.users, args.pins, args.dim)
        local = args.ranks_per_host
        if local is None and args.device == "cuda":
            local = GPUS_PER_HOST if args.world_size % GPUS_PER_HOST == 0 else args.world_size
        run = dry_run(
            spec, args.source, args.world_size, args.device, args.hbm_gb, args.ddr_gb, args.batch_size,
            local_world_size=local, allow_uvm=args.allow_uvm, sparse_optimizer=args.sparse_optimizer, verbose=args.verbose,
        )
    except (ValueError, SpecError) as e:  # SpecError is a ValueError; named for the reader
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_describe(spec.for_source(args.source), args.source))
    print(format_dry_run(run, all_ranks=args.all_ranks))
    return 0 if run.fits else 1


def _describe(spec: FeatureSpec, source: str) -> str:
    """One line on what is planned: the spec, the source and how big its tables are."""
    tables = {f.table: f for f in (*spec.sparse, *spec.sequence)}.values()
    params = sum(f.num_embeddings * f.embedding_dim for f in tables)
    return f"Plan of spec {spec.name!r}, source {source!r}: {len(tables)} tables, {_count(params)} embedding parameters ({_size(params * 4)} in fp32)"


if __name__ == "__main__":
    raise SystemExit(main())
