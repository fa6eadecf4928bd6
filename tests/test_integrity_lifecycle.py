"""Integrity of the embedding lifecycle (issue 29, items 3, 4, 8 and 13c): a job killed between a
version's commit and its activation is completed by its re-run (and an old day's re-run never
activates over a newer day); a version the store does not serve is never joined onto downstream
rows; inference refuses non-finite embeddings before it writes any; a publish that fills the disk
says so in one line naming the store and leaves nothing half-visible.

Kills are real: the job runs in a child process that ``os._exit``s at ``embeddings.publish.on_commit``,
the seam between a version's commit and its activation, as ``kill -9`` or a lost node would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

import common.log
from data.loader import make_loader
from embeddings.aggregate import aggregate_day
from embeddings.ann import AnnIndex
from embeddings.daily import ENTITIES, run_day, store_dir, version_name
from embeddings.embedded_store import EmbeddedStore
from embeddings.features import DERMFeatureJoin, DERMSource
from embeddings.infer import Embedder, infer_day
from embeddings.publish import main as publish_main
from embeddings.publish import publish
from embeddings.version_quality import quality_path
from tests.distributed import run_ranks
from tests.helpers import D1, D2, D3

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _pytest_keeps_its_logging(monkeypatch):
    """The CLIs' ``setup_logging`` would replace pytest's log capture (caplog)."""
    monkeypatch.setattr(common.log, "setup_logging", lambda *args, **kwargs: None)


def _pool_day(pool_root: Path, source: str, entity: str, day: str, ids: np.ndarray, dim: int = 8, seed: int = 0) -> Path:
    """A pool day as publish reads it: one bucket file (entity_id, embedding [E]) and _SUCCESS."""
    day_dir = pool_root / source / entity / f"day={day}"
    day_dir.mkdir(parents=True)
    emb = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    table = pa.table({"entity_id": pa.array(np.asarray(ids, np.int64)),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)})
    pq.write_table(table, day_dir / "bucket=0000.parquet")
    (day_dir / "_SUCCESS").write_text("{}")
    return day_dir


def _pool_rows(day_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(day_dir / "bucket=0000.parquet")
    return table["entity_id"].to_numpy(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def _killed_at_commit(code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``code`` (``sys.argv[1:]`` are ``args``) in a child process that dies at
    ``embeddings.publish.on_commit`` for the versions whose name contains ``args[0]``."""
    prelude = ("import os, sys\n"
               "import embeddings.publish\n"
               "embeddings.publish.on_commit = lambda version, at=sys.argv[1]: os._exit(9) if at in version else None\n"
               "sys.argv[1:] = sys.argv[2:]\n")
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


# ---- item 3: a publish killed between its commit and its activation -------------------------------


def test_a_publish_killed_between_commit_and_activation_is_completed_by_its_rerun(tmp_path, capsys):
    store_path, ann = tmp_path / "store", tmp_path / "ann"
    first = _pool_day(tmp_path / "pool", "ctr", "pin", D1, np.arange(50))
    second = _pool_day(tmp_path / "pool", "ctr", "pin", D2, np.arange(10, 70), seed=1)
    assert publish_main(["--store", str(store_path), "--pool", str(first), "--version", "v1", "--ann-dir", str(ann)]) == 0
    args = ["--store", str(store_path), "--pool", str(second), "--version", "v2", "--ann-dir", str(ann)]

    killed = _killed_at_commit("sys.exit(embeddings.publish.main(sys.argv[1:]))", "v2", *args)
    assert killed.returncode == 9, killed.stderr[-2000:]
    store = EmbeddedStore(store_path)
    assert store.versions() == ["v1", "v2"] and store.active_version() == "v1"  # committed, never activated
    assert not (ann / "v2").exists()

    capsys.readouterr()
    assert publish_main(args) == 0  # before: "duplicate version 'v2'", exit 2, and v2 never served
    out = capsys.readouterr().out
    assert "v2 was committed already" in out and "(active)" in out
    assert store.active_version() == "v2" and store.rollback_target() == "v1"
    ids, emb = _pool_rows(second)
    got, found = store.get(ids)
    assert found.all() and np.array_equal(got, emb)
    index = AnnIndex.load(ann / "v2")  # the index the kill prevented is built by the re-run
    assert sorted(index.search(emb[:3], 60)[0].ravel().tolist())[-1] == 69


def test_a_publish_rerun_never_activates_over_a_later_version_nor_accepts_other_rows(tmp_path, capsys):
    store = EmbeddedStore(tmp_path / "store")
    pools = tmp_path / "pool"
    publish(_pool_day(pools, "ctr", "user", D1, np.arange(20)), store, "v1")
    second = _pool_day(pools, "ctr", "user", D2, np.arange(30), seed=2)
    publish(second, store, "v2", activate=False)  # what a kill between commit and activation leaves
    publish(_pool_day(pools, "ctr", "user", D3, np.arange(40), seed=3), store, "v3")  # a later version, served since

    capsys.readouterr()
    assert publish_main(["--store", str(store.root), "--pool", str(second), "--version", "v2"]) == 0
    out = capsys.readouterr().out
    assert store.active_version() == "v3"
    assert "v2 was committed already" in out and "not activated over v3" in out and "--activate v2" in out

    other = _pool_day(tmp_path / "other", "ctr", "user", D2, np.arange(30), seed=4)  # same ids, other vectors
    assert publish_main(["--store", str(store.root), "--pool", str(other), "--version", "v2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "duplicate version 'v2'" in err and "other rows than" in err and str(other) in err
    assert store.versions() == ["v1", "v2", "v3"] and store.active_version() == "v3"


def test_a_publish_rerun_never_undoes_a_rollback(tmp_path, capsys):
    store = EmbeddedStore(tmp_path / "store")
    pools = tmp_path / "pool"
    publish(_pool_day(pools, "ctr", "user", D1, np.arange(20)), store, "v1")
    second = _pool_day(pools, "ctr", "user", D2, np.arange(30), seed=2)
    publish(second, store, "v2")
    store.rollback()  # v2's embeddings are bad
    capsys.readouterr()
    assert publish_main(["--store", str(store.root), "--pool", str(second), "--version", "v2"]) == 0  # a scheduler's retry
    out = capsys.readouterr().out
    assert store.active_version() == "v1" and store.rolled_back() == {"v2"}
    assert "not activated over v1, a rollback moved serving away from it" in out and "--activate v2" in out


def test_a_lifecycle_rerun_never_serves_a_rolled_back_day_again(tmp_path):
    from embeddings.daily import serve

    store = EmbeddedStore(tmp_path / "store")
    for day in (D1, D2):
        store.write_version(f"ctr-user-{day}", np.arange(3), np.ones((3, 4), np.float32))
        store.activate(f"ctr-user-{day}")
    store.rollback()
    assert serve(store, "ctr", "user", D2) is False and store.active_version() == f"ctr-user-{D1}"


# ---- item 3: the lifecycle day killed between a version's commit and its activation ---------------


def _daily_embeddings(world: Path, emb_root: Path, day: str, dim: int = 8) -> None:
    """What inference writes for ``day`` (cvr): a unit vector for each of the day's users and Pins."""
    keys = pq.read_table(world / "cvr" / f"day={day}", columns=["user_id", "pin_id", "event_time"])
    g = np.random.default_rng(int(day[-2:]))
    for entity in ENTITIES:
        ids, times = keys[f"{entity}_id"].to_numpy(), keys["event_time"].to_numpy()
        order = np.lexsort((times, ids))
        last = np.r_[ids[order][1:] != ids[order][:-1], True]
        ids, times = ids[order][last], times[order][last]
        emb = g.standard_normal((ids.size, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        out = emb_root / "cvr" / entity / f"day={day}"
        out.mkdir(parents=True)
        pq.write_table(pa.table({"entity_id": pa.array(ids.astype(np.int64)),
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
                                 "event_time": pa.array(times.astype(np.int64))}), out / "part-r00000.parquet")


@pytest.fixture(scope="module")
def _pools(tiny_world, tmp_path_factory) -> Path:
    """A work folder with the complete pools of the tiny world's three cvr days (MA 0.9)."""
    work = tmp_path_factory.mktemp("lifecycle") / "work"
    for day in (D1, D2, D3):
        _daily_embeddings(tiny_world, work / "emb", day)
        for entity in ENTITIES:
            aggregate_day(work / "emb", work / "pool", "cvr", entity, day, "ma", 0.9, num_buckets=2, workers=1)
    return work


@pytest.fixture
def lifecycle(_pools, tiny_world, tmp_path) -> SimpleNamespace:
    """A fresh copy of the pools, a stand-in snapshot (only its meta's source is read: with the day's
    pools complete, ``run_day`` infers nothing) and the two stores."""
    work = tmp_path / "work"
    shutil.copytree(_pools, work)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "meta.json").write_text(json.dumps({"source": "cvr"}))
    args = [str(snapshot), str(tiny_world), str(work)]

    def day(d: str) -> dict:
        return run_day(snapshot, tiny_world, d, work, "ma", 0.9, False, 300, "cpu")

    stores = {e: EmbeddedStore(store_dir(work, "cvr", e)) for e in ENTITIES}
    return SimpleNamespace(work=work, args=args, run_day=day, stores=stores)


def _active(lifecycle) -> dict[str, str | None]:
    return {e: s.active_version() for e, s in lifecycle.stores.items()}


def _served(day: str) -> dict[str, str]:
    return {e: version_name("cvr", e, day) for e in ENTITIES}


RUN_DAY = ("from pathlib import Path\n"
           "from embeddings.daily import run_day\n"
           "snapshot, world, work, day = sys.argv[1:]\n"
           "run_day(Path(snapshot), Path(world), day, Path(work), 'ma', 0.9, False, 300, 'cpu')\n")


@pytest.mark.slow
def test_a_day_killed_between_commit_and_activation_is_activated_by_its_rerun(lifecycle):
    lifecycle.run_day(D1)
    killed = _killed_at_commit(RUN_DAY, version_name("cvr", "user", D2), *lifecycle.args, D2)
    assert killed.returncode == 9, killed.stderr[-2000:]
    users, pins = lifecycle.stores["user"], lifecycle.stores["pin"]
    assert version_name("cvr", "user", D2) in users.versions() and _active(lifecycle) == _served(D1)
    assert not quality_path(lifecycle.work, "cvr", D2).exists()

    lifecycle.run_day(D2)  # before: the day counted done with users on day 1 and Pins on day 2
    assert _active(lifecycle) == _served(D2)
    assert quality_path(lifecycle.work, "cvr", D2).is_file()
    lifecycle.run_day(D3)
    assert users.rollback_target() == version_name("cvr", "user", D2)  # before: day 1, skipping a day
    assert pins.rollback_target() == version_name("cvr", "pin", D2)


def test_an_old_days_rerun_never_activates_its_versions_over_a_newer_days(lifecycle):
    lifecycle.run_day(D1)
    users = lifecycle.stores["user"]
    user_pool = lifecycle.work / "pool" / "cvr" / "user" / f"day={D2}"
    publish(user_pool, users, version_name("cvr", "user", D2), activate=False)  # day 2 killed after its first commit
    lifecycle.run_day(D3)
    assert _active(lifecycle) == _served(D3)

    report = lifecycle.run_day(D2)  # completes day 2's versions, serves day 3's still
    assert _active(lifecycle) == _served(D3)
    assert all(version_name("cvr", e, D2) in s.versions() for e, s in lifecycle.stores.items())
    assert quality_path(lifecycle.work, "cvr", D2).is_file() and not report["skipped"]
    assert lifecycle.run_day(D2)["skipped"]  # and the day is done


# ---- item 4: the downstream join reads what the store serves --------------------------------------


def _marker_store(path: Path, ids: np.ndarray, days: list[str]) -> EmbeddedStore:
    """Versions ``ctr-user-DAY`` with every value i + 1 for the i-th day, none activated."""
    store = EmbeddedStore(path)
    for i, day in enumerate(days):
        store.write_version(f"ctr-user-{day}", ids, np.full((ids.size, 4), i + 1.0, np.float32))
    return store


def test_a_rolled_back_version_is_never_joined_its_rows_read_the_served_one(tiny_world, tmp_path, caplog):
    batch = next(iter(make_loader(tiny_world, "ctr", 100, days=[D3])))  # rows of day 3 read day 2's version
    store = _marker_store(tmp_path / "users", np.unique(batch.user_id.numpy()), [D1, D2])
    store.activate(f"ctr-user-{D1}")
    store.activate(f"ctr-user-{D2}")
    join = DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])
    assert torch.all(join(batch)["ctr_user"] == 2.0)

    store.rollback()  # day 2's embeddings are bad: serving reads day 1's again
    join.reset_counts()  # the next training day or evaluation resolves its versions afresh
    derm = join(batch)
    assert torch.all(derm["ctr_user"] == 1.0) and torch.all(derm["ctr_user_missing"] == 0)  # before: 2.0
    assert f"does not serve ctr-user-{D2} (rolled back from it)" in caplog.text and f"read ctr-user-{D1}" in caplog.text

    fresh = DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])
    assert torch.all(fresh(batch)["ctr_user"] == 1.0)

    # a later day goes on: day 2's version is older than the active one now, and still not joined
    # (the store records the rollback); its rows cannot read day 3's (leakage): they get it as missing
    store.write_version(f"ctr-user-{D3}", np.unique(batch.user_id.numpy()),
                        np.full((np.unique(batch.user_id.numpy()).size, 4), 3.0, np.float32))
    store.activate(f"ctr-user-{D3}")
    join.reset_counts()
    derm = join(batch)
    assert torch.all(derm["ctr_user"] == 0.0) and torch.all(derm["ctr_user_missing"] == 1)  # before: 2.0


def test_a_version_never_activated_is_not_joined_and_an_unknown_active_one_is_refused(tiny_world, tmp_path):
    batch = next(iter(make_loader(tiny_world, "ctr", 100, days=[D3])))
    users = np.unique(batch.user_id.numpy())
    store = _marker_store(tmp_path / "users", users, [D1, D2])
    store.activate(f"ctr-user-{D1}")  # day 2's is committed only (its publish was killed, or is a canary)
    assert torch.all(DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])(batch)["ctr_user"] == 1.0)

    store.write_version("hotfix", users, np.zeros((users.size, 4), np.float32))
    store.activate("hotfix")
    with pytest.raises(ValueError, match="active version 'hotfix'.*ctr-user-\\{day\\}"):
        DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])(batch)


# ---- item 13c: inference refuses non-finite embeddings --------------------------------------------


class _Towers(torch.nn.Module):
    """Stands in for a snapshot's model: every embedding ones, except NaN for the users with
    id % 7 == 3 (and, with ``only_rank``, only on that rank)."""

    def __init__(self, only_rank: int | None = None) -> None:
        super().__init__()
        self.poisoned = only_rank is None or dist.get_rank() == only_rank

    def forward(self, batch):
        user = torch.ones(batch.user_id.numel(), 4)
        if self.poisoned:
            user[batch.user_id % 7 == 3] = float("nan")
        out = SimpleNamespace(user_embedding=user, pin_embedding=torch.ones(batch.pin_id.numel(), 4))
        return None, (None, out)


def _bad_users(world: Path, day: str) -> tuple[int, int]:
    users = np.unique(pq.read_table(world / "cvr" / f"day={day}", columns=["user_id"])["user_id"].to_numpy())
    return int((users % 7 == 3).sum()), int(users.size)


def _infer_poisoned(rank: int, world_size: int, world: str, out: str, only_rank: int | None) -> str:
    embedder = Embedder(Path("runs/cvr/snapshots/day=x"), Path(world), "cvr", _Towers(only_rank), torch.device("cpu"), 4)
    try:
        infer_day(embedder, D2, out, batch_size=64)
    except ValueError as e:
        return str(e)
    return "written"




def test_inference_refuses_non_finite_embeddings_naming_the_count_before_writing(tiny_world, tmp_path, one_rank):
    bad, users = _bad_users(tiny_world, D2)
    assert 0 < bad < users
    message = _infer_poisoned(0, 1, str(tiny_world), str(tmp_path / "emb"), None)  # before: "written", NaN and all
    assert message.startswith(f"cvr {D2}: {bad:,} of {users:,} users and 0 of ") and "Pins got non-finite" in message
    assert "runs/cvr/snapshots/day=x" in message
    assert not (tmp_path / "emb").exists() or not any(p.is_file() for p in (tmp_path / "emb").rglob("*"))


@pytest.mark.slow
def test_non_finite_embeddings_on_one_rank_fail_every_rank_before_writing(tiny_world, tmp_path):
    bad, users = _bad_users(tiny_world, D2)
    messages = run_ranks(_infer_poisoned, 2, str(tiny_world), str(tmp_path / "emb"), 1, timeout=300)
    assert messages[0] == messages[1] and " users and 0 of " in messages[0]  # rank 1's count, on both ranks
    assert 0 < int(messages[0].split(": ")[1].split(" of ")[0]) <= bad
    assert not any(p.is_file() for p in (tmp_path / "emb").rglob("*"))


# ---- item 8: a publish that fills the disk ---------------------------------------------------------


def test_a_publish_that_fills_the_disk_is_one_line_naming_the_store_and_leaves_nothing(small_disk, tmp_path):
    store_path = small_disk / "store"
    small = _pool_day(tmp_path / "pool", "ctr", "user", D1, np.arange(100))
    large = _pool_day(tmp_path / "pool", "ctr", "user", D2, np.arange(30_000), dim=64)  # 7.7 MB > the disk's 5 MiB
    cli = [sys.executable, "-m", "embeddings.publish", "--store", str(store_path)]
    done = subprocess.run([*cli, "--pool", str(small), "--version", "v1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    done = subprocess.run([*cli, "--pool", str(large), "--version", "v2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr  # before: "OSError: [Errno 28] No space left on device"
    assert done.stderr.startswith(f"publish: error: disk full: no space left on the device ({store_path}")
    assert done.stderr.rstrip().endswith("free space or write elsewhere, then run the same command again")
    store = EmbeddedStore(store_path)
    assert store.versions() == ["v1"] and store.active_version() == "v1"
    assert list((store_path / "staging").iterdir()) == []  # nothing half-written is left either
    got, found = store.get(np.arange(100))
    assert found.all() and np.array_equal(got, _pool_rows(small)[1])
