"""Training downstream models on DERM embeddings (trainer/main.py --task downstream) on 2 gloo ranks through
TorchRec's train pipeline: the batches carry version d − 1 for day d (never the day's own), an
entity absent from the store gets the missing indicator, initial then incremental training
snapshots and evaluates; and the config refuses what it cannot serve. Also: the upstream trainer
under ``train.mixed_precision = bf16``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from common.config import load_config
from data.loader import make_loader
from embeddings.embedded_store import EmbeddedStore
from modules.config import DHENConfig, SequenceConfig
from modules.downstream_config import DownstreamConfig
from tests.distributed import run_ranks
from trainer.config import DataConfig, DERMJoinConfig, DownstreamRunConfig, TrainConfig, load_run_config

D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"
VALUE = {D1: 1.0, D2: 2.0, D3: 3.0}  # every embedding of version d holds VALUE[d]
MODEL = DownstreamConfig(
    token_dim=16, sequence=SequenceConfig(num_heads=2), num_experts=2, cross_layers=1, low_rank=4,
    expert_hidden=(16,), tower_hidden=(8,),
    dhen=DHENConfig(layers=(("transformer", "mlp"),), out_tokens=2, mlp_hidden=16),
)


def _publish_markers(root, store_root) -> dict[str, np.ndarray]:
    """Versions ``{source}-{entity}-{d}`` for every day, every value VALUE[d]; entities with
    id % 5 == 0 are never published. Returns the published ids per entity."""
    keys = pq.read_table(root / "cvr", columns=["user_id", "pin_id"])
    published = {}
    for entity in ("user", "pin"):
        ids = np.unique(keys.column(f"{entity}_id").to_numpy())
        ids = ids[ids % 5 != 0]
        published[entity] = ids
        for source in ("ctr", "cvr"):
            store = EmbeddedStore(store_root / f"{source}-{entity}")
            for day, value in VALUE.items():
                store.write_version(f"{source}-{entity}-{day}", ids, np.full((ids.size, 6), value, np.float32))
    return published


def _config(root, store_root, run_dir, kind="cvr", **train) -> DownstreamRunConfig:
    return DownstreamRunConfig(
        kind=kind,
        data=DataConfig(root=str(root), source="cvr", batch_size=100, eval_batch_size=400, synthetic_preset=""),
        train=TrainConfig(run_dir=str(run_dir), log_every=5, **train),
        model=MODEL,
        derm=DERMJoinConfig(features=("ctr_user", "cvr_pin"), store_root=str(store_root), projection_dim=4),
    )


def _two_ranks(rank: int, world_size: int, root: str, store_root: str, run_dir: str, users: np.ndarray, kind: str) -> dict:
    from sharding.distributed import DistContext
    from trainer.downstream import DownstreamTrainer, run_downstream

    ctx = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo")
    config = _config(root, store_root, run_dir, kind, days=(D2,), eval_day=D3)
    out = {}

    trainer = DownstreamTrainer(config, ctx)
    loader = make_loader(root, "cvr", 300, days=[D3], rank=rank, world_size=world_size)
    batch = next(trainer._prepare(iter(loader)))
    known = torch.from_numpy(np.isin(batch.user_id.numpy(), users))
    out["values_known"] = torch.unique(batch.derm["ctr_user"][known]).tolist()
    out["values_unknown"] = torch.unique(batch.derm["ctr_user"][~known]).tolist()
    out["missing_matches"] = bool(torch.equal(batch.derm["ctr_user_missing"][:, 0], (~known).float()))
    out["dims"] = [(f.name, f.dim, f.output_dim) for f in trainer.model_config.derm]
    trainer.close()

    out["initial"] = run_downstream(config, ctx)
    incremental = dataclasses.replace(config, train=TrainConfig(run_dir=run_dir, mode="incremental", day=D3, eval_day="none"))
    out["incremental"] = run_downstream(incremental, ctx)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ctr", "cvr"])
def test_two_ranks_train_on_yesterdays_embeddings(tiny_world, tmp_path, kind):
    store_root, run_dir = tmp_path / "store", tmp_path / "run"
    published = _publish_markers(tiny_world, store_root)
    ranks = run_ranks(_two_ranks, 2, tiny_world, store_root, str(run_dir), published["user"], kind, timeout=600)
    for r in ranks:
        assert r["values_known"] == [2.0]  # day 3 reads version 2, never its own day's 3.0
        assert r["values_unknown"] in ([0.0], [])
        assert r["missing_matches"]
        assert r["dims"] == [("ctr_user", 6, 4), ("cvr_pin", 6, 4)]  # widths read from the stores
    summary = ranks[0]["initial"]
    assert summary["model"] == f"downstream {kind}"
    assert summary["derm"] == ["ctr_user", "cvr_pin"]
    assert summary["days"][0]["steps"] > 0 and np.isfinite(summary["days"][0]["mean_loss"])
    assert set(summary["eval"]) == {"conversion", "click_conversion", "view_conversion"}
    assert 0.0 <= summary["eval"]["conversion"]["roc_auc"] <= 1.0
    assert (run_dir / "summaries" / f"{D2}.json").is_file() and (run_dir / "summaries" / f"{D3}.json").is_file()
    assert (run_dir / "snapshots" / f"day={D3}" / "meta.json").is_file()
    assert ranks[0]["incremental"]["mode"] == "incremental"
    # Coverage: the share of the eval day's rows (both ranks') whose entity had a version d - 1.
    rows = list(make_loader(tiny_world, "cvr", 10_000, days=[D3]))
    users, pins = (np.concatenate([getattr(b, k).numpy() for b in rows]) for k in ("user_id", "pin_id"))
    expected = {"ctr_user": np.isin(users, published["user"]).mean(), "cvr_pin": np.isin(pins, published["pin"]).mean()}
    assert 0.5 < expected["ctr_user"] < 1.0
    assert summary["coverage"] == pytest.approx(expected, abs=1e-5)
    assert set(summary["days"][0]["coverage"]) == {"ctr_user", "cvr_pin"}


def test_bad_downstream_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'user_ctr' is not"):
        DERMJoinConfig(features=("user_ctr",), store_root="x")
    with pytest.raises(ValueError, match="needs derm.store_root"):
        DERMJoinConfig(features=("ctr_user",))
    with pytest.raises(ValueError, match="kind must be one of"):
        DownstreamRunConfig(kind="ranking")
    with pytest.raises(ValueError, match=r"\[derm\] features"):
        load_config(None, ["model.derm=[{name = 'ctr_user', dim = 8}]"], cls=DownstreamRunConfig)
    with pytest.raises(ValueError, match="similarity needs a source's user and Pin"):
        DERMJoinConfig(features=("ctr_user", "cvr_pin"), store_root="x", similarity=True)
    pairs = DERMJoinConfig(features=("cvr_pin", "ctr_user", "ctr_pin", "cvr_user"), store_root="x", similarity=True).similarity_pairs()
    assert pairs == (("cvr_user", "cvr_pin"), ("ctr_user", "ctr_pin"))
    config = load_config(None, ["kind=cvr", 'derm.features=["cvr_user"]', "derm.store_root=s", "derm.lag_days=0"],
                         cls=DownstreamRunConfig)
    assert (config.kind, config.derm.features, config.derm.lag_days) == ("cvr", ("cvr_user",), 0)


def test_store_without_versions_is_refused_naming_it(tiny_world, tmp_path):
    from sharding.distributed import init_distributed, shutdown
    from trainer.downstream import DownstreamTrainer

    EmbeddedStore(tmp_path / "store" / "ctr-user")  # exists, nothing published
    config = _config(tiny_world, tmp_path / "store", tmp_path / "run")
    config = dataclasses.replace(config, derm=dataclasses.replace(config.derm, features=("ctr_user",)))
    ctx = init_distributed("cpu")
    try:  # the process group must not outlive the test: a later one would find it initialised
        with pytest.raises(ValueError, match=r"ctr_user: its store EmbeddedStore\('.*ctr-user'\) has no versions"):
            DownstreamTrainer(config, ctx)
        config = dataclasses.replace(config, derm=dataclasses.replace(config.derm, store_root=str(tmp_path / "typo")))
        with pytest.raises(ValueError, match=r"derm.features ctr_user: no feature store at .*typo/ctr-user"):
            DownstreamTrainer(config, ctx)
    finally:
        shutdown()
    assert not (tmp_path / "typo").exists()


def test_bf16_mixed_precision_trains_with_float32_losses(tiny_world, tmp_path):
    from sharding.distributed import init_distributed
    from tests.helpers import SMALL_MODEL as UPSTREAM
    from trainer.config import RunConfig
    from trainer.loop import Trainer

    config = RunConfig(
        data=DataConfig(root=str(tiny_world), source="cvr", batch_size=200, synthetic_preset=""),
        train=TrainConfig(run_dir=str(tmp_path / "run"), max_steps_per_day=3, mixed_precision="bf16"),
        model=UPSTREAM,
    )
    trainer = Trainer(config, init_distributed("cpu"))
    try:
        stats = trainer.train_day(D1)
        metrics = trainer.evaluate(D2)
        batch = next(iter(make_loader(tiny_world, "cvr", 64, days=[D2])))
        loss, (parts, out) = trainer.model(batch)
    finally:
        trainer.close()
    assert out.logits.dtype == out.user_embedding.dtype == torch.bfloat16  # the towers ran under autocast
    assert loss.dtype == parts["contrastive"].dtype == torch.float32  # the losses did not
    assert stats["steps"] == 3 and np.isfinite(stats["mean_loss"])
    assert 0.0 <= metrics["conversion"]["roc_auc"] <= 1.0
    with pytest.raises(ValueError, match="mixed_precision must be one of auto, none, bf16"):
        load_run_config("upstream", None, ["train.mixed_precision=fp16"])
    with pytest.raises(ValueError, match="train.threads must be >= 0"):
        load_run_config("upstream", None, ["train.threads=-1"])
