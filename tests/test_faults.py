"""Faults and bad input (issue 14): what a crafted, broken or unexpected file does to a job."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sharding.checkpoint import SnapshotError, _rng_state, _set_rng_state, load_rng_state


class _Payload:
    """Unpickling this runs a shell command: what a crafted rng-rank0.pt in a snapshot would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_snapshots_rng_file_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "rng-rank0.pt"
    torch.save({"torch": _Payload(str(marker))}, crafted)
    with pytest.raises(SnapshotError, match="not a plain RNG state"):
        load_rng_state(crafted)
    assert not marker.exists()


def test_rng_states_round_trip_as_plain_tensors(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    _set_rng_state(load_rng_state(tmp_path / "rng.pt"))  # weights_only=True
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]


# ---- a non-finite loss, NaN weights, a failing rank ---------------------------------------------

D1, D2 = "2026-01-01", "2026-01-02"
REPO = Path(__file__).resolve().parents[1]


def _copy_with(world: Path, out: Path, day: str, column: str, value: float, rows: slice) -> Path:
    """A copy of ``world`` whose ctr ``day`` has ``value`` in ``column`` at ``rows`` of its last file."""
    shutil.copytree(world, out)
    path = sorted((out / "ctr" / f"day={day}").glob("part-*.parquet"))[-1]
    table = pq.read_table(path)
    values = table[column].to_numpy().copy()
    values[rows] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values, table[column].type)), path)
    return out


def _train_then_poison(rank: int, world_size: int, root: str, run_dir: str) -> dict:
    """Training that diverges (a dense learning rate of 1e30); then a snapshot with a NaN weight is
    handed to inference. (Extreme feature values no longer do it: the dense BatchNorm absorbs a
    feature of 1e30.)"""
    from embeddings.infer import Embedder
    from sharding.config import OptimizerConfig
    from sharding.distributed import DistContext
    from trainer.config import DataConfig, RunConfig, TrainConfig
    from trainer.loop import NonFiniteLoss, Trainer, run

    ctx = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo")
    config = RunConfig(data=DataConfig(root=root, source="ctr", batch_size=256, synthetic_preset=""),
                       train=TrainConfig(run_dir=run_dir, days=(D1, D2), eval_day="none", log_every=2, max_steps_per_day=4),
                       optimizer=OptimizerConfig(dense_lr=1e30))
    out = {}
    try:
        run(config, ctx)
    except NonFiniteLoss as e:
        out["error"] = str(e)
    out["snapshots"] = sorted(p.name for p in (Path(run_dir) / "snapshots").glob("day=*"))
    trainer = Trainer(dataclasses.replace(config, train=TrainConfig(run_dir=run_dir + "-nan"), optimizer=OptimizerConfig()), ctx)
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.is_floating_point() and p.dim() == 2).fill_(float("nan"))
    path = trainer.snapshot_path(D1)
    trainer.save(path, D1, 0)
    trainer.close()
    try:
        Embedder.load(path, root, torch.device("cpu"))
    except SnapshotError as e:
        out["inference"] = str(e)
    return out


@pytest.mark.slow
def test_a_non_finite_loss_stops_before_any_snapshot_and_inference_refuses_nan_weights(tiny_world, tmp_path):
    from tests.distributed import run_ranks

    (out,) = run_ranks(_train_then_poison, 1, str(tiny_world), str(tmp_path / "run"), timeout=600)
    assert "day 2026-01-01: the training loss became nan" in out["error"]
    assert out["snapshots"] == []  # the diverged weights were never saved
    assert "weights with NaN or infinite values" in out["inference"]


@pytest.mark.slow
def test_a_data_error_on_one_rank_fails_the_job_in_seconds(tiny_world, tmp_path):
    """NaN in one row that only rank 1 reads: rank 1 raises while rank 0 waits in a collective.
    Before, rank 1 waited in a barrier and the job hung until the 30-minute process-group timeout."""
    root = _copy_with(tiny_world, tmp_path / "world", D2, "user_ctr_smoothed", float("nan"), slice(-1, None))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "trainer/main.py",
           f"--data.root={root}", "--data.source=ctr", "--data.synthetic_preset=", "--data.batch_size=256",
           f"--train.run_dir={tmp_path / 'run'}", f"--days={D1},{D2}", "--eval-day=none"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert done.returncode != 0 and "has NaN or infinite values" in done.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"


# ---- secrets -----------------------------------------------------------------------------------


def test_a_redis_password_never_goes_into_a_config_and_comes_from_the_environment(tmp_path, monkeypatch):
    from embeddings.redis_store import redact, redis_client
    from trainer.config import DERMJoinConfig

    with pytest.raises(ValueError, match=r"carries a password \(redis://:\*\*\*@db:6379/0\).*DERM_REDIS_PASSWORD"):
        DERMJoinConfig(features=("ctr_user",), redis_url="redis://:hunter2@db:6379/0")
    assert redact("redis://app:hunter2@db:6379/0") == "redis://app:***@db:6379/0"
    monkeypatch.setenv("DERM_REDIS_PASSWORD", "hunter2")
    assert redis_client("redis://db:6379/0").connection_pool.connection_kwargs["password"] == "hunter2"
    monkeypatch.delenv("DERM_REDIS_PASSWORD")
    (tmp_path / "pw").write_text("s3cret\n")
    monkeypatch.setenv("DERM_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    assert redis_client("redis://db:6379/0").connection_pool.connection_kwargs["password"] == "s3cret"


# ---- a killed run resumes -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_mid_day_resumes_and_ends_with_the_uninterrupted_weights(tiny_world, tmp_path):
    """``kill -9`` of a training job on its second day, after a mid-day checkpoint; the same
    command again keeps day 1, resumes day 2 at the checkpoint's step (each example once) and ends
    with the weights of a run that was never interrupted (same RNG streams restored: within
    1e-5, the tolerance of the in-process resume test)."""
    import json

    from common.config import dump_config
    from data.spec import load_spec
    from modules.derm import build_derm
    from sharding.checkpoint import load_unsharded
    from tests.helpers import D1, D2, SMALL_MODEL
    from trainer.config import DataConfig, RunConfig, TrainConfig

    def command(run_dir: Path) -> list[str]:
        config = RunConfig(data=DataConfig(root=str(tiny_world), source="cvr", batch_size=32, synthetic_preset=""),
                           train=TrainConfig(run_dir=str(run_dir), days=(D1, D2), eval_day="none", checkpoint_every=4,
                                             log_every=50, threads=1),
                           model=SMALL_MODEL)
        dump_config(config, run_dir.with_suffix(".toml"))
        return [sys.executable, "trainer/main.py", "--config", str(run_dir.with_suffix(".toml"))]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run(command(straight), cwd=REPO, capture_output=True, timeout=600).returncode == 0

    job = subprocess.Popen(command(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed / "snapshots" / "partial" / "meta.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        try:
            if json.loads(partial.read_text())["day"] == D2:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    assert job.poll() is None, "the job ended before a checkpoint of day 2 was seen"
    job.kill()
    job.wait()
    assert not (killed / "snapshots" / f"day={D2}").exists()

    again = subprocess.run(command(killed), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "going on" in again.stderr or "resuming" in again.stderr
    summary = json.loads((killed / "summary.json").read_text())
    day1, day2 = summary["days"]
    assert day1["resumed"] and day2["resumed_at_step"] > 0 and not (killed / "snapshots" / "partial").exists()
    full = json.loads((straight / "summary.json").read_text())["days"]
    assert day2["resumed_at_step"] + day2["steps"] == full[1]["steps"]  # every batch of day 2 trained on once
    assert summary["global_step"] == json.loads((straight / "summary.json").read_text())["global_step"]

    spec = load_spec(tiny_world / "spec.toml")
    weights = []
    for run in (straight, killed):
        model = build_derm(spec, "cvr", SMALL_MODEL, device=torch.device("cpu"))
        load_unsharded(run / "snapshots" / f"day={D2}", model)
        weights.append(model.state_dict())
    worst = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0] if weights[0][k].numel())
    assert worst < 1e-5, worst


# ---- one-line errors ------------------------------------------------------------------------------


def test_disk_full_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno

    import common.log
    import embeddings.aggregate as aggregate
    from common.files import os_error_line

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pool" / "part.parquet"))
    assert os_error_line(full) == (f"disk full: no space left on the device ({tmp_path}/pool/part.parquet); free space or "
                                   "write elsewhere, then run the same command again")

    def no_space(*args, **kwargs):
        raise full

    monkeypatch.setattr(common.log, "setup_logging", lambda: None)
    monkeypatch.setattr(aggregate, "aggregate_day", no_space)
    assert aggregate.main(["--emb", str(tmp_path), "--pool", str(tmp_path / "pool"), "--source", "ctr", "--entity", "user",
                           "--day", "2026-01-01", "--method", "acc"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: disk full") and "part.parquet" in err


@pytest.mark.slow
def test_an_unreachable_redis_is_one_line_naming_the_host(tiny_world, tmp_path):
    done = subprocess.run([sys.executable, "trainer/main.py", "--task", "downstream", '--derm.features=["ctr_user"]',
                           "--derm.redis_url=redis://127.0.0.1:1/0", f"--data.root={tiny_world}", "--data.source=ctr",
                           "--data.synthetic_preset=", f"--train.run_dir={tmp_path / 'run'}", "--days", "2026-01-02",
                           "--eval-day", "none"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "feature store (Redis) unreachable or failing: Error 111 connecting to 127.0.0.1:1" in done.stderr
