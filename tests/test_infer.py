"""Daily inference and back-inference: dedup keeps each entity's last row, 2 ranks equal 1 rank,
the embeddings are the towers' outputs for those rows, and existing outputs are not replaced."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from common.config import from_dict
from data.loader import EventLog
from data.spec import load_spec
from embeddings.infer import _last_per_entity
from modules.config import DERMConfig
from modules.derm import build_derm
from sharding.checkpoint import load_unsharded, read_meta
from tests.distributed import run_ranks
from tests.helpers import INFER_DAYS as DAYS
from tests.helpers import infer_days


def _read(out, entity, day) -> dict[int, tuple[np.ndarray, int]]:
    t = ds.dataset(f"{out}/cvr/{entity}/day={day}", format="parquet").to_table()
    emb = np.stack(t["embedding"].to_numpy(zero_copy_only=False))
    return {int(i): (e, int(ts)) for i, e, ts in zip(t["entity_id"].to_numpy(), emb, t["event_time"].to_numpy())}


def test_last_per_entity_prefers_latest_time_then_later_row():
    ids = np.array([5, 3, 5, 3, 5])
    times = np.array([10, 7, 30, 7, 30])
    assert sorted(_last_per_entity(ids, times).tolist()) == [3, 4]


@pytest.fixture(scope="module")
def inferred(tiny_snapshot, tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    two = run_ranks(infer_days, 2, str(tiny_snapshot), str(tiny_world), str(out / "two"), True)
    one = run_ranks(infer_days, 1, str(tiny_snapshot), str(tiny_world), str(out / "one"), True)
    every_row = run_ranks(infer_days, 1, str(tiny_snapshot), str(tiny_world), str(out / "rows"), False)
    return out, two, one, every_row


@pytest.mark.slow
def test_two_ranks_equal_one_and_dedup_keeps_the_last_event(inferred, tiny_world):
    out, two, one, every_row = inferred
    for day in DAYS:
        raw = EventLog(tiny_world, "cvr", days=[day])
        table = ds.dataset([str(f.path) for f in raw.files], format="parquet").to_table(columns=["user_id", "pin_id", "event_time"])
        for entity, column in (("user", "user_id"), ("pin", "pin_id")):
            a, b, c = (_read(out / name, entity, day) for name in ("two", "one", "rows"))
            ids = table[column].to_numpy()
            assert sorted(a) == sorted(b) == sorted(c) == sorted(set(ids.tolist()))  # every entity, once
            assert sum(r[day][entity] for r in two) == len(a)  # split across ranks
            last_time = {}
            for i, t in zip(ids, table["event_time"].to_numpy()):
                last_time[int(i)] = max(last_time.get(int(i), t), t)
            for i in a:
                np.testing.assert_allclose(a[i][0], b[i][0], atol=1e-5)
                np.testing.assert_allclose(a[i][0], c[i][0], atol=1e-5)  # dedup-first changes nothing
                assert a[i][1] == last_time[i]
                assert abs(np.linalg.norm(a[i][0]) - 1) < 1e-4
    assert "exists; pass --overwrite" in two[0]["refused"]


@pytest.mark.slow
def test_embeddings_are_the_towers_outputs_for_the_last_row(inferred, tiny_snapshot, tiny_world):
    out, *_ = inferred
    meta = read_meta(tiny_snapshot)
    spec = load_spec(tiny_world / "spec.toml")
    task = build_derm(spec, "cvr", from_dict(DERMConfig, meta["model"], "model"), device=torch.device("cpu"))
    load_unsharded(tiny_snapshot, task)
    task.eval()
    day = DAYS[1]
    users = _read(out / "two", "user", day)
    events = EventLog(tiny_world, "cvr", days=[day])
    table = ds.dataset([str(f.path) for f in events.files], format="parquet").to_table(columns=events.reader.columns)
    uid = table["user_id"].to_numpy()
    some = sorted(users)[:5]
    rows = [int(np.flatnonzero((uid == u) & (table["event_time"].to_numpy() == users[u][1]))[-1]) for u in some]
    batch = events.reader.to_batch(table.take(rows))
    with torch.no_grad():
        expected = task.model(batch).user_embedding.numpy()
    np.testing.assert_allclose(np.stack([users[u][0] for u in some]), expected, atol=1e-5)


def test_infer_component_runs_the_script_under_torchrun():
    from torchx_components.lifecycle import infer

    app = infer(snapshot="run/snapshots/day=2026-01-03", data="data", days="2026-01-01,2026-01-02", out="emb", j="2x4")
    role = app.roles[0]
    command = " ".join(role.args)  # bash -c "torchrun ... embeddings/infer.py ..."
    assert role.image == "derm-trainer:latest" and role.num_replicas == 2
    assert command.startswith("-c torchrun") and "--nproc_per_node 4" in command
    assert "embeddings/infer.py --snapshot run/snapshots/day=2026-01-03 --data data --days 2026-01-01,2026-01-02 --out emb" in command


def test_aggregate_and_publish_components():
    from torchx_components.lifecycle import aggregate, publish

    app = aggregate(emb="emb", pool="pool", source="ctr", entity="user", day="2026-01-03", method="ma", alpha=0.8)
    role = app.roles[0]
    assert role.entrypoint == "python" and role.args[:2] == ["-m", "embeddings.aggregate"]
    assert role.args[role.args.index("--alpha") + 1] == "0.8" and role.args[role.args.index("--method") + 1] == "ma"
    app = publish(pool_day="pool/ctr/pin/day=2026-01-03", version="ctr-pin-2026-01-03", redis="redis://r:6379/0", ann_dir="ann")
    args = app.roles[0].args
    assert args[:2] == ["-m", "embeddings.publish"] and "--redis" in args and "--ann-dir" in args
    with pytest.raises(ValueError, match="exactly one of --store DIR and --redis URL"):
        publish(pool_day="p", version="v")


def test_lifecycle_dry_runs_for_kubernetes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchx = str(Path(sys.executable).parent / "torchx")
    for component, args in (
        ("torchx_components/lifecycle.py:infer", ["--snapshot", "s", "--data", "d", "--days", "2026-01-01", "--out", "o"]),
        ("torchx_components/lifecycle.py:aggregate", ["--emb", "e", "--pool", "p", "--source", "ctr", "--entity", "user", "--day", "2026-01-01"]),
        ("torchx_components/lifecycle.py:publish", ["--pool_day", "p/day=2026-01-01", "--version", "v1", "--store", "s"]),
    ):
        done = subprocess.run([torchx, "run", "--dryrun", "-s", "kubernetes", component, *args], cwd=repo,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "derm-trainer:latest" in done.stdout + done.stderr
