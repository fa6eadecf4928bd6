"""One optimizer step of the DMP-sharded model equals the same step of the plain model: the
sharded lookups (FBGEMM's fused kernels for table-wise/row-wise tables, its dense kernel for
data-parallel ones) give the same losses and the same updated weights as nn-level TorchRec
collections. SGD on both sides, so the update is exactly lr x gradient."""

from __future__ import annotations

import pytest
import torch

from data.loader import make_loader
from data.spec import load_spec
from modules.derm import build_derm
from sharding.config import OptimizerConfig
from tests.distributed import run_ranks
from tests.helpers import SMALL_MODEL

LR = 0.1


def _step(rank: int, world_size: int, root: str, tmp: str) -> dict:
    import torch.distributed.checkpoint as dcp

    from sharding.dmp import shard_model

    cpu = torch.device("cpu")
    spec = load_spec(f"{root}/spec.toml")
    batch = next(iter(make_loader(root, "cvr", 256, days=["2026-01-03"])))  # same rows on every rank

    torch.manual_seed(0)
    plain = build_derm(spec, "cvr", SMALL_MODEL, device=cpu)
    if rank == 0:
        dcp.save({"model": plain.state_dict()}, checkpoint_id=f"{tmp}/init", no_dist=True)
    torch.distributed.barrier()

    sharded = build_derm(spec, "cvr", SMALL_MODEL, device=cpu, embedding_device=torch.device("meta"))
    dmp, optimizer = shard_model(sharded, cpu, OptimizerConfig(sparse="sgd", sparse_lr=LR, dense="sgd", dense_lr=LR))
    state = {"model": dmp.state_dict()}
    dcp.load(state, checkpoint_id=f"{tmp}/init")
    dmp.load_state_dict(state["model"])

    loss, _ = dmp(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    dcp.save({"model": dmp.state_dict()}, checkpoint_id=f"{tmp}/after")
    plan = {t: p.sharding_type for tables in dmp.plan.plan.values() for t, p in tables.items()}
    return {"loss": loss.item(), "plan": plan}


@pytest.mark.slow
def test_one_sharded_step_equals_one_plain_step(tiny_world, tmp_path):
    (result,) = run_ranks(_step, 1, str(tiny_world), str(tmp_path))
    assert {"data_parallel", "table_wise"} <= set(result["plan"].values()), result["plan"]

    spec = load_spec(tiny_world / "spec.toml")
    batch = next(iter(make_loader(tiny_world, "cvr", 256, days=["2026-01-03"])))
    torch.manual_seed(0)
    plain = build_derm(spec, "cvr", SMALL_MODEL, device=torch.device("cpu"))
    loss, _ = plain(batch)
    assert abs(loss.item() - result["loss"]) < 1e-5
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    after = build_derm(spec, "cvr", SMALL_MODEL, device=torch.device("cpu"))
    _load_plain(tmp_path / "after", after)
    mine, theirs = plain.state_dict(), after.state_dict()
    worst = max(((mine[k].float() - theirs[k].float()).abs().max().item(), k) for k in mine if mine[k].numel())
    assert worst[0] < 1e-5, worst


def _load_plain(path, module) -> None:
    """The DCP checkpoint's weights (saved sharded) into an unsharded module."""
    import torch.distributed.checkpoint as dcp

    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    module.load_state_dict(state["model"])
