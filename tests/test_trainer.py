"""The trainer on 2 gloo ranks: initial then incremental training with snapshots, exact resume
(2N steps == N + save + load + N), a 2-rank snapshot serving one unsharded process, and the
command line refusing bad input without touching what exists."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import dump_config, load_config
from data.loader import make_loader
from data.spec import load_spec
from modules.config import DERMConfig
from modules.derm import build_derm
from sharding.checkpoint import load_unsharded
from tests.distributed import run_ranks
from tests.helpers import SMALL_MODEL
from trainer.config import DataConfig, RunConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"
MODEL = SMALL_MODEL


def _config(root: str, run_dir: str, **train) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=root, source="cvr", batch_size=200, eval_batch_size=500, synthetic_preset=""),
        train=TrainConfig(run_dir=run_dir, log_every=4, **train),
        model=MODEL,
    )


def _local_state(model) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor in the (sharded) state dict."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "local_shards"):
            shards = v.local_shards()
            v = torch.cat([s.tensor.flatten() for s in shards]) if shards else torch.zeros(0)
        elif hasattr(v, "to_local"):
            v = v.to_local()
        out[k] = v.detach().clone().float()
    return out


def _two_ranks(rank: int, world_size: int, root: str, run_dir: str) -> dict:
    from sharding.distributed import DistContext
    from trainer.loop import Trainer, run

    ctx = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo")
    out: dict = {}
    initial = _config(root, run_dir, days=(D1, D2), eval_day=D3)
    out["initial"] = run(initial, ctx)
    incremental = _config(root, run_dir, mode="incremental", day=D3)
    out["incremental"] = run(incremental, ctx)

    # Embeddings of rank 0's first batch, from D3's snapshot, under DMP.
    trainer = Trainer(incremental, ctx)
    trainer.load(trainer.snapshot_path(D3))
    trainer.model.eval()
    trainer.model.module.set_mixed_precision("none", "cpu")  # float32, as the unsharded check computes
    batch = next(iter(make_loader(root, "cvr", 64, days=[D1], rank=rank, world_size=world_size)))
    with torch.no_grad():
        _, (_, emb) = trainer.model(batch)
    out["embeddings"] = (emb.user_embedding, emb.pin_embedding)

    # 2N steps in one go == N steps, snapshot, a fresh trainer (other seed) loads it, N more.
    scratch = f"{run_dir}-resume"
    straight = Trainer(_config(root, scratch), ctx)
    straight.train_day(D1, max_steps=6)
    first = Trainer(_config(root, scratch), ctx)
    first.train_day(D1, max_steps=3)
    first.save(Path(scratch) / "half", D1, 3)
    second = Trainer(dataclasses.replace(_config(root, scratch), train=TrainConfig(run_dir=scratch, seed=7)), ctx)
    meta = second.load(Path(scratch) / "half")
    second.train_day(D1, start_step=meta["day_step"], max_steps=3)
    a, b = _local_state(straight.model), _local_state(second.model)
    out["resume_max_diff"] = max((a[k] - b[k]).abs().max().item() for k in a if a[k].numel())
    out["resume_keys"] = sorted(a) == sorted(b)
    out["norm_stats"] = [t.clone() for t in straight.norm_stats]
    fresh = _local_state(Trainer(_config(root, scratch), ctx).model)
    out["trained_vs_fresh"] = max((a[k] - fresh[k]).abs().max().item() for k in a if a[k].numel())
    return out


@pytest.fixture(scope="module")
def two_rank_run(tiny_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "cvr"
    ranks = run_ranks(_two_ranks, 2, str(tiny_world), str(run_dir), timeout=600)
    return ranks, run_dir


@pytest.mark.slow
def test_the_dry_run_predicts_the_plan_training_used(two_rank_run, tiny_world):
    """``sharding.plan_cli.dry_run`` of the run's config (source, batch, model, sparse optimizer)
    on as many ranks gives the plan the 2-rank training used, which it saved beside each snapshot."""
    import json

    from data.spec import load_spec
    from sharding.plan_cli import dry_run
    from sharding.planner import plan_to_json

    _, run_dir = two_rank_run
    config = _config(str(tiny_world), str(run_dir))
    saved = [json.loads((s / "plan.json").read_text()) for s in sorted((run_dir / "snapshots").glob("day=*"))]
    assert len(saved) == 3 and all(p == saved[0] for p in saved)
    predicted = dry_run(load_spec(tiny_world / "spec.toml"), config.data.source, world_size=2, device_type="cpu",
                        batch_size=config.data.batch_size, model_config=config.model, sparse_optimizer=config.optimizer.sparse)
    assert predicted.fits
    assert json.loads(json.dumps(plan_to_json(predicted.plan))) == saved[0]
    layouts = {t["sharding_type"] for tables in saved[0].values() for t in tables.values()}
    assert layouts <= {"data_parallel", "table_wise", "column_wise", "row_wise"} and "table_wise" in layouts
    # Another batch size is another plan request: the dry run sizes buffers from it, as training does.
    assert dry_run(load_spec(tiny_world / "spec.toml"), "cvr", 2, "cpu", batch_size=4096, model_config=config.model).fits


@pytest.mark.slow
def test_initial_training_lowers_the_loss_and_evaluates(two_rank_run):
    ranks, run_dir = two_rank_run
    summary = ranks[0]["initial"]
    assert [d["day"] for d in summary["days"]] == [D1, D2]
    assert summary["days"][1]["mean_loss"] < summary["days"][0]["mean_loss"]
    conv = summary["eval"]["conversion"]
    assert summary["eval_day"] == D3 and conv["count"] == 2000  # both ranks' rows, gathered
    assert 0.5 < conv["roc_auc"] < 1 and 0 < conv["ne"] and "oracle_roc_auc" in conv
    assert ranks[1]["initial"]["eval"] == summary["eval"]
    # Representation quality of the eval day's embeddings, over both ranks' rows (issue 11).
    quality = summary["embedding_quality"]
    assert quality == ranks[1]["initial"]["embedding_quality"]
    assert -1 <= quality["user_mean_pairwise_cosine"] <= 1 and -1 <= quality["pin_mean_pairwise_cosine"] <= 1
    assert 1 <= quality["user_effective_rank"] <= MODEL.embedding_dim and 1 <= quality["pin_effective_rank"] <= MODEL.embedding_dim
    assert quality["positives"] > 0 and 0 <= quality["popularity_recall_at_10"] <= quality["popularity_recall_at_100"] <= 1
    assert 0 <= quality["recall_at_10"] <= quality["recall_at_100"] <= 1
    assert quality["ln_batch"] == pytest.approx(math.log(500), abs=1e-4) and quality["contrastive_loss"] > 0
    for day in (D1, D2, D3):
        snap = run_dir / "snapshots" / f"day={day}"
        assert (snap / "meta.json").exists() and (snap / ".metadata").exists()
    assert not list((run_dir / "snapshots").glob(".*"))  # no staging directories left
    assert (run_dir / "summary.json").exists() and list((run_dir / "tb").iterdir())


@pytest.mark.slow
def test_incremental_day_starts_from_the_previous_snapshot(two_rank_run):
    ranks, run_dir = two_rank_run
    inc = ranks[0]["incremental"]
    assert inc["mode"] == "incremental" and [d["day"] for d in inc["days"]] == [D3]
    # global steps continue from D2's snapshot rather than restarting
    assert inc["global_step"] == ranks[0]["initial"]["global_step"] + inc["days"][0]["steps"]


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(two_rank_run):
    ranks, _ = two_rank_run
    for r in ranks:
        assert r["resume_keys"]
        assert r["resume_max_diff"] < 1e-5, r["resume_max_diff"]
        assert r["trained_vs_fresh"] > 1e-3  # training moved the weights: the comparison means something
    # Each rank normalises its own rows, yet both hold the same running statistics afterwards.
    assert ranks[0]["norm_stats"] and all(torch.equal(a, b) for a, b in zip(ranks[0]["norm_stats"], ranks[1]["norm_stats"]))


@pytest.mark.slow
def test_two_rank_snapshot_serves_one_unsharded_process(two_rank_run, tiny_world):
    ranks, run_dir = two_rank_run
    spec = load_spec(tiny_world / "spec.toml")
    task = build_derm(spec, "cvr", MODEL, device=torch.device("cpu"))
    meta = load_unsharded(run_dir / "snapshots" / f"day={D3}", task)
    assert meta["world_size"] == 2 and meta["day"] == D3
    task.eval()
    batch = next(iter(make_loader(tiny_world, "cvr", 64, days=[D1], rank=0, world_size=2)))
    with torch.no_grad():
        out = task.model(batch)
    user, pin = ranks[0]["embeddings"]
    torch.testing.assert_close(out.user_embedding, user, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pin_embedding, pin, atol=1e-5, rtol=1e-4)


# ---- the command line and bad input -------------------------------------------------------------


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "trainer/main.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_unknown_or_bad_config_is_refused_before_anything_starts(tmp_path, capsys):
    from trainer.main import main

    assert main([f"--train.run_dir={tmp_path / 'run'}", "--train.colour=red"]) == 2
    assert "train: unknown key(s) ['colour']" in capsys.readouterr().err
    assert main(["--mode", "incremental"]) == 2
    assert "needs train.day" in capsys.readouterr().err
    assert main(["--data.batch_size=0"]) == 2
    assert "data.batch_size must be >= 1" in capsys.readouterr().err
    assert main(["--task", "downstream", "--kind=ranking"]) == 2
    assert "kind must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"model.user_dhen: dhen.layers\[0\] must be two of"):
        load_config(None, ['model.user_dhen.layers=[["lstm", "mlp"]]'], RunConfig)


@pytest.mark.slow
def test_bad_snapshots_are_refused_and_nothing_is_touched(two_rank_run, tiny_world, tmp_path):
    _, run_dir = two_rank_run
    world, copy, cfg = tmp_path / "world", tmp_path / "run", tmp_path / "run.toml"
    shutil.copytree(tiny_world, world)
    shutil.copytree(run_dir, copy)
    (copy / "snapshots" / f"day={D3}").rename(copy / "snapshots" / ".retrain")  # so D3 can be trained again
    before = sorted(p.name for p in (copy / "snapshots").iterdir())

    def main_with(config: RunConfig) -> subprocess.CompletedProcess:
        dump_config(config, cfg)
        return _main("--config", str(cfg))

    done = main_with(_config(str(world), str(tmp_path / "empty"), mode="incremental", day=D2))
    assert done.returncode == 2 and f"no snapshot before {D2}" in done.stderr, done.stderr[-2000:]

    other_model = dataclasses.replace(_config(str(world), str(copy), mode="incremental", day=D3), model=DERMConfig(token_dim=16))
    done = main_with(other_model)
    assert done.returncode == 2 and "its model differs from the model config" in done.stderr, done.stderr[-2000:]

    spec = load_spec(world / "spec.toml")
    grown = tuple(dataclasses.replace(f, num_embeddings=f.num_embeddings + 8) if f.name == "user_id" else f for f in spec.sparse)
    dataclasses.replace(spec, sparse=grown).dump(world / "spec.toml")
    done = main_with(_config(str(world), str(copy), mode="incremental", day=D3))
    assert done.returncode == 2 and "its spec differs from" in done.stderr, done.stderr[-2000:]
    assert "sparse.user_id.num_embeddings: " in done.stderr and " in the snapshot, " in done.stderr, done.stderr[-2000:]

    done = main_with(_config(str(world), str(copy), days=(D1,)))
    assert done.returncode == 2 and "exists (made by another run); set train.overwrite = true to retrain" in done.stderr
    assert sorted(p.name for p in (copy / "snapshots").iterdir()) == before  # nothing written or replaced


@pytest.mark.slow
def test_the_users_torchx_command_trains_two_ranks_and_snapshots(tiny_world, tmp_path):
    """`torchx run -s local_cwd dist.ddp -j 1x2 trainer/main.py` (the README's command, 2 ranks)."""
    import os

    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # torchx calls torchrun by name
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "trainer/main.py",
         f"--data.root={tiny_world}", f"--train.run_dir={run_dir}", f"--train.days=[\"{D1}\"]", "--train.max_steps_per_day=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    meta = (run_dir / "snapshots" / f"day={D1}" / "meta.json").read_text()
    assert '"world_size": 2' in meta
    assert "roc_auc" in (run_dir / "summary.json").read_text()


def test_a_spec_or_model_difference_is_named_down_to_the_field():
    from trainer.loop import _differences

    saved = {"name": "w", "sparse": [{"name": "user_id", "num_embeddings": 100}, {"name": "pin_id", "num_embeddings": 50}]}
    now = {"name": "w", "sparse": [{"name": "pin_id", "num_embeddings": 50}, {"name": "user_id", "num_embeddings": 108}],
           "dense": [{"name": "age"}]}
    assert _differences(saved, now) == ["dense: not in the snapshot", "sparse.user_id.num_embeddings: 100 in the snapshot, 108 now"]
    assert _differences({"token_dim": 16}, {"token_dim": 32}) == ["token_dim: 16 in the snapshot, 32 now"]


def test_summary_table_shows_no_oracle_column_on_real_data():
    from types import SimpleNamespace

    from trainer.main import _summary_table

    summary = {"model": "downstream ctr", "source": "ctr", "mode": "initial", "world_size": 1, "eval_day": "2026-01-02",
               "days": [{"day": "2026-01-01", "steps": 3, "examples": 300, "seconds": 1.0}], "snapshot": "s",
               "eval": {"click": {"roc_auc": 0.6, "pr_auc": 0.1, "ne": 0.99, "calibration": 1.0, "positives": 42}},
               "coverage": {"ctr_user": 0.11}}
    config = SimpleNamespace(train=SimpleNamespace(run_dir="r"))
    text = _summary_table(summary, config)
    assert "nan" not in text and "oracle" not in text and "42" in text and "ctr_user 11.0%" in text
    summary["eval"]["click"]["oracle_roc_auc"] = 0.8
    assert "oracle AUC" in _summary_table(summary, config) and "0.8000" in _summary_table(summary, config)
