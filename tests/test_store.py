"""Feature store (embeddings/store.py, embeddings/redis_store.py) and publishing
(embeddings/publish.py): one suite run over both backends, the Redis one on a real redis-server."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings.embedded_store import EmbeddedStore
from embeddings.hash_index import build_slots, lookup_rows
from embeddings.publish import main as publish_main
from embeddings.publish import publish
from embeddings.redis_store import RedisStore
from embeddings.store import FeatureStore
from tests.redis_server import redis_url  # noqa: F401  (pytest fixture)

DIM = 8


@dataclasses.dataclass
class Backend:
    open: Callable[[], FeatureStore]
    """A new handle on one fresh store, as another process would open it."""
    cli: list[str]
    """The same store in `python -m embeddings.publish` arguments."""


@pytest.fixture(params=["embedded", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "embedded":
        return Backend(lambda: EmbeddedStore(tmp_path / "store"), ["--store", str(tmp_path / "store")])
    url = request.getfixturevalue("redis_url")
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    return Backend(lambda: RedisStore(url, namespace=namespace), ["--redis", url, "--namespace", namespace])


@pytest.fixture
def store(backend):
    return backend.open()


def const_version(store, name: str, value: float, n: int = 1000, dim: int = DIM) -> None:
    """Version ``name``: ids 0..n-1, every value == ``value`` (versions are told apart by value)."""
    store.write_version(name, np.arange(n), np.full((n, dim), value, np.float32))


def random_version(rng, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.choice(np.arange(-(2**62), 2**62, 2**40, dtype=np.int64), n, replace=False)
    return ids, rng.standard_normal((n, dim)).astype(np.float32)


def assert_serves_value(store, value: float, n: int = 1000) -> None:
    emb, found = store.get(np.arange(n))
    assert found.all() and (emb == value).all()


# --- round trips ------------------------------------------------------------------------------


def test_write_commit_activate_get_round_trip(backend):
    store = backend.open()
    rng = np.random.default_rng(0)
    ids, emb = random_version(rng, 5000)
    assert store.versions() == [] and store.active_version() is None
    with store.begin_version("v1", DIM) as writer:
        for start in range(0, len(ids), 1500):  # in chunks, as publish does
            writer.put(ids[start : start + 1500], emb[start : start + 1500])
        info = writer.commit()
    assert (info.name, info.dim, info.count) == ("v1", DIM, 5000)
    assert store.versions() == ["v1"] and store.active_version() is None  # committed, not active
    store.activate("v1")
    query = rng.permutation(ids)[:1000]
    got, found = backend.open().get(query)  # another handle, as a serving process would have
    assert found.all()
    np.testing.assert_array_equal(got, emb[np.argsort(ids)][np.searchsorted(np.sort(ids), query)])
    got_explicit, _ = store.get(query, version="v1")
    np.testing.assert_array_equal(got_explicit, got)
    assert store.version_info("v1").count == 5000


def test_found_mask_for_missing_ids(store):
    store.write_version("v1", np.array([5, 7, 9]), np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM))
    store.activate("v1")
    emb, found = store.get(np.array([7, 8, 5, 7, -1, 2**62]))
    np.testing.assert_array_equal(found, [True, False, True, True, False, False])
    np.testing.assert_array_equal(emb[0], np.arange(DIM, 2 * DIM))
    np.testing.assert_array_equal(emb[3], emb[0])  # repeats allowed
    assert (emb[~found] == 0).all() and emb.dtype == np.float32
    emb, found = store.get(np.zeros(0, np.int64))
    assert emb.shape == (0, DIM) and found.shape == (0,)


def test_rollback_reactivates_the_previous_version(store):
    for k in (1, 2, 3):
        const_version(store, f"v{k}", k)
    store.activate("v1")
    store.activate("v2")
    store.activate("v2")  # no-op: does not stack v2 on top of itself
    store.activate("v3")
    assert store.rollback() == "v2" and store.active_version() == "v2"
    assert_serves_value(store, 2)
    assert store.rollback() == "v1"
    assert_serves_value(store, 1)
    with pytest.raises(ValueError, match="nothing to roll back to"):
        store.rollback()
    assert store.active_version() == "v1"


def test_delete_version(store):
    for k in (1, 2, 3):
        const_version(store, f"v{k}", k)
    store.activate("v1")
    store.activate("v2")
    store.activate("v3")
    store.delete_version("v2")  # forgotten by the rollback history too
    assert store.versions() == ["v1", "v3"]
    with pytest.raises(ValueError, match="unknown version 'v2'"):
        store.get(np.arange(3), version="v2")
    assert store.rollback() == "v1"
    const_version(store, "v2", 22)  # the name can be used again, for new content
    assert store.get(np.arange(3), version="v2")[0][0, 0] == 22


def test_prune_keeps_the_newest_the_active_and_the_rollback_target(backend, capsys):
    """The retention policy, through the API and the CLI: the KEEP newest versions stay, and so do
    the active one and the one a rollback would re-activate, however old."""
    from embeddings.publish import main

    store = backend.open()
    for k in range(1, 7):
        const_version(store, f"v{k}", k, n=10)
    store.activate("v1")
    store.activate("v2")  # active v2, rollback target v1: both older than the two newest
    assert store.rollback_target() == "v1"
    assert store.prune(keep=2) == ["v3", "v4"]
    assert store.versions() == ["v1", "v2", "v5", "v6"] and store.active_version() == "v2"
    assert store.rollback() == "v1"  # still there to go back to
    with pytest.raises(ValueError, match="keep must be >= 1"):
        store.prune(keep=0)
    assert main([*backend.cli, "--prune", "1"]) == 0  # active v1, no rollback target now
    assert "pruned 2 version(s): v2, v5" in capsys.readouterr().out
    assert backend.open().versions() == ["v1", "v6"]


def test_a_killed_publishers_staging_is_removed_by_the_next_writer(tmp_path):
    """A publisher killed mid-version (here it kills itself with SIGKILL after writing rows) leaves
    its staging folder; the next ``begin_version`` removes it, but never a live writer's."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "store"
    live = EmbeddedStore(root).begin_version("live", DIM)
    live.put(np.arange(10), np.ones((10, DIM), np.float32))
    code = ("import os, signal, numpy as np; from embeddings.embedded_store import EmbeddedStore; "
            f"w = EmbeddedStore({str(root)!r}).begin_version('v9', {DIM}); w.put(np.arange(1000), np.ones((1000, {DIM}), np.float32)); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == -signal.SIGKILL
    assert len(list((root / "staging").glob("v9@*"))) == 1
    with EmbeddedStore(root).begin_version("v10", DIM) as writer:
        writer.put(np.arange(3), np.ones((3, DIM), np.float32))
        writer.commit()
    assert not list((root / "staging").glob("v9@*"))  # the dead writer's rows are gone
    assert live.staging.is_dir()  # the live one's are not
    live.commit()
    assert EmbeddedStore(root).versions() == ["v10", "live"]


# --- failures leave serving untouched ---------------------------------------------------------


def test_interrupted_write_is_invisible_and_not_activatable(store):
    const_version(store, "v1", 1)
    store.activate("v1")
    ones = np.ones((100, DIM), np.float32)
    with pytest.raises(RuntimeError, match="disk full"):
        with store.begin_version("v2", DIM) as writer:
            writer.put(np.arange(100), 2 * ones)
            writer.put(np.arange(100, 200), 2 * ones)
            raise RuntimeError("disk full")  # the publisher dies mid-version
    assert store.versions() == ["v1"] and store.active_version() == "v1"
    with pytest.raises(ValueError, match="unknown version 'v2'"):
        store.activate("v2")
    assert_serves_value(store, 1)

    writer = store.begin_version("v3", DIM)  # still being written (or its writer crashed)
    writer.put(np.arange(100), 3 * ones)
    with pytest.raises(ValueError, match="'v3' is not committed"):
        store.activate("v3")
    with pytest.raises(ValueError, match="'v3' is not committed"):
        store.get(np.arange(3), version="v3")
    assert store.versions() == ["v1"] and store.active_version() == "v1"
    writer.abort()

    const_version(store, "v2", 2)  # the interrupted name is free again
    store.activate("v2")
    assert_serves_value(store, 2)


def test_publish_failing_mid_pool_leaves_the_active_version(backend, tmp_path):
    store = backend.open()
    day = write_pool(tmp_path / "pool" / "ctr" / "user" / "day=2026-01-03", n=3000, buckets=3)
    publish(day, store, "ctr-user-2026-01-03", batch_rows=500)
    bad_day = write_pool(tmp_path / "pool" / "ctr" / "user" / "day=2026-01-04", n=3000, buckets=3, nan_in_bucket=2)
    with pytest.raises(ValueError, match="bucket=0002.parquet: non-finite"):
        publish(bad_day, store, "ctr-user-2026-01-04", batch_rows=500)  # after two buckets were written
    assert store.versions() == ["ctr-user-2026-01-03"]
    assert store.active_version() == "ctr-user-2026-01-03"
    with pytest.raises(ValueError):
        store.activate("ctr-user-2026-01-04")
    # An index build that fails after the commit undoes the commit too.
    pin_day = write_pool(tmp_path / "pool" / "ctr" / "pin" / "day=2026-01-04", n=300, buckets=1)
    (tmp_path / "ann").write_text("not a directory")
    with pytest.raises(OSError):
        publish(pin_day, store, "ctr-pin-2026-01-04", ann_dir=tmp_path / "ann")
    assert store.versions() == ["ctr-user-2026-01-03"]
    assert store.active_version() == "ctr-user-2026-01-03"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.activate("nope"), "unknown version 'nope'"),
        (lambda s: s.get(np.arange(3), version="nope"), "unknown version 'nope'"),
        (lambda s: const_version(s, "v1", 9), "duplicate version 'v1'"),
        (lambda s: s.begin_version("v2", DIM).put(np.arange(3), np.zeros((3, DIM + 1))), "dimension mismatch"),
        (lambda s: s.delete_version("v1"), "refusing to delete the active version 'v1'"),
        (lambda s: s.delete_version("nope"), "unknown version 'nope'"),
        (lambda s: s.activate("a/b"), "bad version name"),
        (lambda s: s.get(np.array([1.5, 2.0])), "integer"),
        (lambda s: s.write_version("v2", np.arange(3), np.zeros((4, DIM))), r"shape \[3, 8\]"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(store, call, message):
    const_version(store, "v1", 1)
    store.activate("v1")
    with pytest.raises(ValueError, match=message):
        call(store)
    assert store.active_version() == "v1"
    assert_serves_value(store, 1)


def test_duplicate_ids_are_refused_at_commit(store):
    with store.begin_version("v1", DIM) as writer:
        writer.put(np.arange(10), np.zeros((10, DIM)))
        writer.put(np.arange(5, 15), np.zeros((10, DIM)))  # 5..9 again, in another chunk
        with pytest.raises(ValueError, match="duplicate ids"):
            writer.commit()
    assert store.versions() == []


def test_get_without_active_version_is_refused(store):
    with pytest.raises(ValueError, match="no active version"):
        store.get(np.arange(3))


# --- atomic activation ------------------------------------------------------------------------


def test_concurrent_reader_never_sees_a_mix_of_versions(backend):
    store = backend.open()
    n = 2000
    for k in (1, 2):
        const_version(store, f"v{k}", k, n=n)
    store.activate("v1")
    reader = backend.open()  # its own handle (and Redis connection), like a serving process
    seen: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            try:
                emb, found = reader.get(rng.integers(0, n, 1000))
            except Exception as e:  # a failed get fails the test, not just this thread
                errors.append(repr(e))
                return
            values = np.unique(emb)
            if not found.all() or len(values) != 1:
                errors.append(f"mixed or missing batch: values {values[:5]}, found {found.mean():.3f}")
            seen.append(float(values[0]))

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        flips = 0
        while time.monotonic() < deadline or len(set(seen)) < 2:
            store.activate("v2" if flips % 2 == 0 else "v1")
            flips += 1
            if time.monotonic() > deadline + 10:
                break
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert set(seen) == {1.0, 2.0} and flips > 10


# --- embedded backend specifics ---------------------------------------------------------------


def test_embedded_get_of_1000_keys(tmp_path):
    rng = np.random.default_rng(0)
    ids, emb = random_version(rng, 200_000, dim=32)
    store = EmbeddedStore(tmp_path / "store")
    store.write_version("v1", ids, emb)
    store.activate("v1")
    query = np.concatenate([rng.choice(ids, 900), rng.integers(-(2**62), 2**62, 100)])
    got, found = store.get(query)
    row = {int(i): r for r, i in enumerate(ids)}  # the obvious reference, once
    want_found = np.array([int(q) in row for q in query])
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(got[found], emb[[row[int(q)] for q in query[found]]])
    assert (got[~found] == 0).all()
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        store.get(query)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.02, f"median get of 1,000 keys took {np.median(times) * 1e3:.1f} ms"
    assert EmbeddedStore(tmp_path / "store").versions() == ["v1"]  # persisted: a new process sees it


def test_embedded_reads_more_versions_than_it_keeps_open(tmp_path):
    store = EmbeddedStore(tmp_path / "store")
    for k in range(6):  # more than OPEN_VERSIONS: old mappings are dropped and reopened
        const_version(store, f"v{k}", k, n=10)
    for k in [0, 1, 2, 3, 4, 5, 0, 5, 1]:
        assert (store.get(np.arange(10), version=f"v{k}")[0] == k).all()


def test_hash_slots_find_ids_that_share_their_low_bits():
    ids = np.sort(np.arange(-500, 500, dtype=np.int64) << 32)  # low 32 bits all zero
    slots = build_slots(ids)
    assert len(slots) >= 2 * len(ids) and sorted(slots[slots >= 0]) == list(range(len(ids)))
    emb = np.arange(len(ids), dtype=np.float32)[:, None]
    got, found = lookup_rows(ids, slots, emb, np.array([ids[7], ids[-1], 12345]))
    np.testing.assert_array_equal(found, [True, True, False])
    np.testing.assert_array_equal(got[:2, 0], [7, len(ids) - 1])


# --- publish and its CLI ----------------------------------------------------------------------


def write_pool(day_dir, n: int, buckets: int, dim: int = DIM, seed: int = 0, nan_in_bucket: int | None = None):
    """A pool day in the aggregator's layout: bucket=NNNN.parquet files of entity_id, embedding."""
    day_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) * 3 + 1
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    for b, part in enumerate(np.array_split(np.arange(n), buckets)):
        values = emb[part].copy()
        if b == nan_in_bucket:
            values[-1, 0] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)
        pq.write_table(pa.table({"entity_id": ids[part], "embedding": column}), day_dir / f"bucket={b:04d}.parquet")
    (day_dir / "_SUCCESS").write_text("{}")  # the aggregator's manifest, written last
    return day_dir


def pool_values(day_dir) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(day_dir)
    return table["entity_id"].to_numpy(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def test_publish_pool_day(backend, tmp_path):
    store = backend.open()
    day = write_pool(tmp_path / "pool" / "ctr" / "pin" / "day=2026-01-03", n=2500, buckets=4)
    report = publish(day, store, "ctr-pin-2026-01-03", ann_dir=tmp_path / "ann", batch_rows=300)
    assert (report.rows, report.dim, report.active) == (2500, DIM, True)
    ids, emb = pool_values(day)
    got, found = store.get(ids)
    assert found.all()
    np.testing.assert_array_equal(got, emb)
    from embeddings.ann import AnnIndex

    index = AnnIndex.load(tmp_path / "ann" / "ctr-pin-2026-01-03")
    top, _ = index.search(emb[:5], k=1)
    np.testing.assert_array_equal(top[:, 0], ids[:5])
    with pytest.raises(ValueError, match="user pool"):
        user_day = write_pool(tmp_path / "pool" / "ctr" / "user" / "day=2026-01-03", n=10, buckets=1)
        publish(user_day, store, "ctr-user-2026-01-03", ann_dir=tmp_path / "ann")
    publish(day, store, "ctr-pin-again", activate=False)
    assert store.active_version() == "ctr-pin-2026-01-03"


def test_publish_cli(backend, tmp_path, capsys):
    where = backend.cli
    for d in ("2026-01-03", "2026-01-04"):
        day = write_pool(tmp_path / "pool" / "ctr" / "user" / f"day={d}", n=200, buckets=2, seed=int(d[-1]))
        assert publish_main([*where, "--pool", str(day), "--version", f"ctr-user-{d}"]) == 0
    assert "published ctr-user-2026-01-04: 200 rows x 8 dims" in capsys.readouterr().out
    assert publish_main([*where, "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("  ctr-user-2026-01-03") and listing[1].startswith("* ctr-user-2026-01-04")
    assert publish_main([*where, "--rollback"]) == 0
    assert "active: ctr-user-2026-01-03" in capsys.readouterr().out
    assert publish_main([*where, "--activate", "ctr-user-2026-01-04"]) == 0
    capsys.readouterr()
    # Bad input: exit 2 and one line on stderr.
    assert publish_main([*where, "--activate", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("publish: error: unknown version 'nope'") and err.count("\n") == 1
    assert publish_main([*where, "--pool", str(tmp_path / "missing"), "--version", "x"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        publish_main([*where, "--pool", str(tmp_path)])  # no --version
    assert exc.value.code == 2
    assert backend.open().active_version() == "ctr-user-2026-01-04"


def test_redis_get_reconnects_after_the_server_drops_the_connection(redis_url):  # noqa: F811
    store = RedisStore(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    const_version(store, "v1", 1.0)
    store.activate("v1")
    assert_serves_value(store, 1.0)  # a pooled connection is open now
    killer = RedisStore(redis_url, namespace="unused").client
    assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    assert_serves_value(store, 1.0)  # the pool notices the closed socket at checkout and reconnects
