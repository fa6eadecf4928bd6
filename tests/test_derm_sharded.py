"""The DERM model under DistributedModelParallel on 2 gloo ranks: it shards, trains, and keeps the
logQ frequency estimator identical on every rank."""

from __future__ import annotations

import math

import pytest
import torch

from data.loader import make_loader
from data.spec import load_spec
from modules.derm import build_derm
from sharding.collectives import all_gather_ids
from sharding.dmp import shard_model
from tests.distributed import run_ranks
from tests.helpers import SMALL_MODEL

STEPS = 8


def _train(rank: int, world_size: int, root: str) -> dict:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    spec = load_spec(f"{root}/spec.toml")
    task = build_derm(spec, "cvr", SMALL_MODEL, device=cpu, embedding_device=torch.device("meta"), gather=all_gather_ids())
    dmp, optimizer = shard_model(task, cpu)
    losses, norms = [], []
    for _, batch in zip(range(STEPS), make_loader(root, "cvr", batch_size=200, rank=rank, world_size=world_size)):
        loss, (_, out) = dmp(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        norms.append(out.user_embedding.norm(dim=1).mean().item())
    estimator = dmp.module.loss.estimator
    plan = {f"{module}.{table}": p.sharding_type for module, tables in dmp.plan.plan.items() for table, p in tables.items()}
    return {
        "losses": losses,
        "norms": norms,
        "estimator": (int(estimator.step), float(estimator.gap.sum()), int(estimator.last_step.sum())),
        "plan": plan,
    }


@pytest.mark.slow
def test_derm_shards_trains_and_keeps_the_estimator_in_step(tiny_world):
    ranks = run_ranks(_train, 2, str(tiny_world))
    for r in ranks:
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
        assert all(abs(n - 1) < 1e-4 for n in r["norms"])
    # Both collections are sharded (the planner picks the layout), tables listed by module.
    plan = ranks[0]["plan"]
    assert any(k.startswith("model.ebc.") for k in plan) and any(k.startswith("model.ec.") for k in plan)
    assert ranks[0]["plan"] == ranks[1]["plan"]
    # Pin ids are all-gathered, so the estimator counted the global batch on both ranks alike.
    assert ranks[0]["estimator"] == ranks[1]["estimator"] and ranks[0]["estimator"][0] == STEPS
