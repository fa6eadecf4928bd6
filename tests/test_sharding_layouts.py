"""Every table layout this project plans on CPU, checked against the unsharded model on 2 gloo ranks:
pooled tables (``EmbeddingBagCollection``) data-parallel, table-wise and column-wise, sequence
tables (``EmbeddingCollection``) table-wise and row-wise (sharding/planner.py's CPU rows). For
each layout every table is forced into it, and one SGD step on each rank's own half of the rows
must give (1) each rank the unsharded model's outputs for its half and (2) the weights of one
unsharded SGD step on the mean loss of both halves: embedding gradients are averaged over ranks
like DDP's dense ones (TorchRec's gradient division), so the sharded step is the plain one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from modules.embedding_tables import embedding_bag_configs, embedding_configs
from tests.distributed import run_ranks
from tests.helpers import random_batch, tiny_spec

LR = 0.5
ROWS = 24  # per rank
LAYOUTS = {  # name -> (layout of pooled tables, layout of sequence tables)
    "data_parallel": ("data_parallel", "table_wise"),  # EC data-parallel fails on CPU (TORCHREC-NOTES.md)
    "table_wise": ("table_wise", "table_wise"),
    "column_wise": ("column_wise", "row_wise"),
    "row_wise": ("table_wise", "row_wise"),
}


class TablesModel(nn.Module):
    """Every table of the tiny spec's cvr source, pooled and sequence, into one linear head."""

    def __init__(self, device: torch.device, table_device: torch.device) -> None:
        super().__init__()
        spec = tiny_spec().for_source("cvr")
        bags, seqs = embedding_bag_configs(spec), embedding_configs(spec)
        self.ebc = EmbeddingBagCollection(tables=bags, device=table_device)
        self.ec = EmbeddingCollection(tables=seqs, device=table_device)
        self.lengths = {f.name: f.max_length for f in spec.sequence}
        width = sum(c.embedding_dim * len(c.feature_names) for c in bags + seqs)
        self.head = nn.Linear(width, 1, device=device)

    def forward(self, batch) -> torch.Tensor:
        pooled = self.ebc(batch.sparse)
        parts = [pooled[k] for k in sorted(pooled.keys())]  # by name: a sharded collection reorders keys
        seq = self.ec(batch.sequence)
        parts += [seq[k].to_padded_dense(desired_length=n).sum(1) for k, n in sorted(self.lengths.items())]
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def _loss(out: torch.Tensor, batch) -> torch.Tensor:
    return ((out - batch.labels[:, 0]) ** 2).mean()


def _constraints(module: nn.Module, ebc_layout: str, ec_layout: str) -> dict:
    from torchrec.distributed.planner import ParameterConstraints

    out = {}
    for m, layout in ((module.ebc, ebc_layout), (module.ec, ec_layout)):
        configs = m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection) else m.embedding_configs()
        for c in configs:
            kernel = "dense" if layout == "data_parallel" else "fused"
            # Column shards of half the table's width, so that column-wise really splits it.
            extra = {"min_partition": c.embedding_dim // 2} if layout == "column_wise" else {}
            out[c.name] = ParameterConstraints(sharding_types=[layout], compute_kernels=[kernel], **extra)
    return out


def _step(rank: int, world_size: int, tmp: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from sharding.config import OptimizerConfig
    from sharding.dmp import shard_model
    from sharding.planner import make_planner, plan_to_json, sharders

    cpu = torch.device("cpu")
    batch = random_batch(tiny_spec(), "cvr", ROWS, seed=rank)
    out = {}
    for name, (ebc_layout, ec_layout) in LAYOUTS.items():
        module = TablesModel(cpu, torch.device("meta"))
        planner = make_planner(world_size, "cpu", constraints=_constraints(module, ebc_layout, ec_layout))
        plan = planner.collective_plan(module, sharders(), dist.group.WORLD)
        dmp, optimizer = shard_model(module, cpu, OptimizerConfig(sparse="sgd", sparse_lr=LR, dense="sgd", dense_lr=LR), plan=plan)
        state = {"model": dmp.state_dict()}
        dcp.load(state, checkpoint_id=f"{tmp}/init")
        dmp.load_state_dict(state["model"])
        output = dmp(batch)
        optimizer.zero_grad()
        _loss(output, batch).backward()
        optimizer.step()
        dcp.save({"model": dmp.state_dict()}, checkpoint_id=f"{tmp}/after-{name}")
        out[name] = {"output": output.detach(), "plan": plan_to_json(plan)}
    return out


@pytest.mark.slow
def test_every_layout_steps_like_the_unsharded_model(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    plain = TablesModel(torch.device("cpu"), torch.device("cpu"))
    for p in plain.parameters():  # tables start far from zero: a wrong row or column shows
        nn.init.normal_(p, std=0.5)
    dcp.save({"model": plain.state_dict()}, checkpoint_id=str(tmp_path / "init"), no_dist=True)
    ranks = run_ranks(_step, 2, str(tmp_path), timeout=600)

    batches = [random_batch(tiny_spec(), "cvr", ROWS, seed=r) for r in range(2)]
    outputs = [plain(b) for b in batches]
    loss = sum(_loss(o, b) for o, b in zip(outputs, batches)) / 2  # the mean over ranks
    loss.backward()
    with torch.no_grad():
        expected = {k: (p - LR * p.grad).clone() for k, p in plain.named_parameters()}

    for name, (ebc_layout, ec_layout) in LAYOUTS.items():
        plan = ranks[0][name]["plan"]
        layouts = {t: p["sharding_type"] for tables in plan.values() for t, p in tables.items()}
        ebc_tables = {c.name for c in plain.ebc.embedding_bag_configs()}
        assert {layouts[t] for t in ebc_tables} == {ebc_layout} and {layouts[t] for t in set(layouts) - ebc_tables} == {ec_layout}
        if "wise" in ebc_layout + ec_layout and ebc_layout != "data_parallel":
            spread = {s["rank"] for tables in plan.values() for p in tables.values() for s in p["shards"]}
            assert spread == {0, 1}, f"{name}: the shards do not use both ranks ({plan})"
        for r in range(2):
            torch.testing.assert_close(ranks[r][name]["output"], outputs[r].detach(), atol=1e-5, rtol=1e-5, msg=f"{name} rank {r}")
        after = TablesModel(torch.device("cpu"), torch.device("cpu"))
        state = {"model": after.state_dict()}
        dcp.load(state, checkpoint_id=str(tmp_path / f"after-{name}"), no_dist=True)
        after.load_state_dict(state["model"])
        for k, p in after.named_parameters():
            torch.testing.assert_close(p.detach(), expected[k], atol=1e-5, rtol=1e-5, msg=f"{name}: {k} after one step")
