"""What is read back is what was written (issue 29): store versions and ANN indexes carry
manifests checked on open (embeddings/embedded_store.py, embeddings/ann.py, common/digest.py);
Redis staging of a killed publisher is removed by the next publish (embeddings/redis_store.py);
a full disk under an aggregate is one line naming the path (embeddings/aggregate.py)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common.digest
from common.digest import IntegrityError
from embeddings.ann import AnnIndex
from embeddings.embedded_store import EmbeddedStore
from embeddings.redis_store import RedisStore
from tests.conftest import fill
from tests.redis_server import redis_url  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
DIM = 8


def flip_byte(path: Path, offset: int = -3) -> None:
    """Flips one bit of ``path`` at ``offset`` (from the end by default: inside the data, past any header)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)


def store_version(root: Path, n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Version 'v1' of the store at ``root``: ids 0..n-1 shuffled, random rows; returns them."""
    rng = np.random.default_rng(0)
    ids, emb = rng.permutation(n), rng.standard_normal((n, DIM)).astype(np.float32)
    EmbeddedStore(root).write_version("v1", ids, emb)
    return ids, emb


# --- embedded store ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["emb.npy", "ids.npy", "slots.npy", "meta.json"])
def test_a_flipped_byte_in_a_store_version_is_refused_naming_the_file(tmp_path, name):
    ids, emb = store_version(tmp_path / "store")
    version = tmp_path / "store" / "versions" / "v1"
    flip_byte(version / name, offset=-3 if name != "meta.json" else 2)
    with pytest.raises(IntegrityError) as e:
        EmbeddedStore(tmp_path / "store").get(ids, version="v1")
    message = str(e.value)
    assert f"{version / name} is damaged" in message and "'v1'" in message and "\n" not in message


def test_a_version_is_verified_when_first_opened_not_per_get(tmp_path, monkeypatch):
    ids, emb = store_version(tmp_path / "store")
    hashed = []
    digest_file = common.digest.digest_file
    monkeypatch.setattr(common.digest, "digest_file", lambda path: hashed.append(Path(path).name) or digest_file(path))
    for _ in range(3):  # one process, several handles (a reader may open the store per call)
        store = EmbeddedStore(tmp_path / "store")
        for _ in range(3):
            got, found = store.get(ids[:100], version="v1")
            assert found.all() and (got == emb[:100]).all()
    assert sorted(hashed) == ["emb.npy", "ids.npy", "meta.json", "slots.npy"]
    assert EmbeddedStore(tmp_path / "store", verify=False).get(ids[:3], version="v1")[1].all()


def test_a_version_written_before_manifests_opens_with_one_warning(tmp_path, caplog):
    ids, emb = store_version(tmp_path / "store")
    (tmp_path / "store" / "versions" / "v1" / "MANIFEST.json").unlink()
    with caplog.at_level(logging.WARNING, logger="derm.embeddings.store"):
        for _ in range(2):
            got, found = EmbeddedStore(tmp_path / "store").get(ids, version="v1")
            assert found.all() and (got == emb).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'v1'" in warnings[0] and "no MANIFEST.json" in warnings[0]


@pytest.mark.parametrize("manifest", [True, False])
def test_a_truncated_emb_npy_is_one_line_naming_the_file(tmp_path, manifest):
    ids, _ = store_version(tmp_path / "store")
    version = tmp_path / "store" / "versions" / "v1"
    if not manifest:  # a version written before manifests: numpy's own check must be named too
        (version / "MANIFEST.json").unlink()
    (version / "emb.npy").write_bytes((version / "emb.npy").read_bytes()[:-1000])
    with pytest.raises(IntegrityError) as e:
        EmbeddedStore(tmp_path / "store").get(ids, version="v1")
    message = str(e.value)
    assert str(version / "emb.npy") in message and "\n" not in message and "mmap length" not in message
    assert ("is damaged" if manifest else "is truncated") in message


# --- ANN index --------------------------------------------------------------------------------


def ann_index(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A saved exact index over 2,000 random Pins; returns its folder and the Pins' vectors."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2000, DIM)).astype(np.float32)
    return AnnIndex.build(np.arange(2000) * 7, emb).save(tmp_path / "ann" / "pin-v1"), emb


@pytest.mark.parametrize("name", ["index.faiss", "ids.npy", "ann.json"])
def test_a_flipped_byte_in_an_ann_index_is_refused_on_load(tmp_path, name):
    path, _ = ann_index(tmp_path)
    flip_byte(path / name, offset=-3 if name != "ann.json" else 5)
    with pytest.raises(IntegrityError) as e:
        AnnIndex.load(path)
    assert f"{path / name} is damaged" in str(e.value) and "\n" not in str(e.value)


def test_an_ann_index_without_manifest_loads_and_a_truncated_one_is_named(tmp_path, caplog):
    path, emb = ann_index(tmp_path)
    (path / "MANIFEST.json").unlink()
    with caplog.at_level(logging.WARNING, logger="derm.embeddings.ann"):
        ids, _ = AnnIndex.load(path).search(emb[:5], k=1)
    assert (ids[:, 0] == np.arange(5) * 7).all()
    assert any("no MANIFEST.json" in r.getMessage() for r in caplog.records)
    (path / "index.faiss").write_bytes((path / "index.faiss").read_bytes()[:-1000])
    with pytest.raises(IntegrityError) as e:
        AnnIndex.load(path)
    assert f"{path / 'index.faiss'} is truncated or unreadable" in str(e.value) and "\n" not in str(e.value)


# --- Redis ------------------------------------------------------------------------------------


def test_a_killed_redis_publishers_staging_is_removed_by_the_next_writer(redis_url):  # noqa: F811
    """A publisher killed mid-version (SIGKILL after writing rows) leaves its staging hash; once its
    owner key, which a live writer keeps refreshing, has expired, the next ``begin_version``
    removes it. A live writer's staging stays, however long it takes between puts."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_url, namespace=namespace, writer_ttl_s=1.5)
    live = store.begin_version("live", DIM)
    live.put(np.arange(10), np.ones((10, DIM), np.float32))
    code = ("import os, signal, numpy as np; from embeddings.redis_store import RedisStore; "
            f"w = RedisStore({redis_url!r}, namespace={namespace!r}, writer_ttl_s=1.5).begin_version('v9', {DIM}); "
            f"w.put(np.arange(1000), np.ones((1000, {DIM}), np.float32)); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == -signal.SIGKILL
    client = store.client
    assert len(client.keys(f"{namespace}:staging:v9:*")) == 1
    time.sleep(3.0)  # past the dead writer's owner key; the live writer refreshed its own meanwhile
    with store.begin_version("v10", DIM) as writer:
        writer.put(np.arange(3), np.ones((3, DIM), np.float32))
        writer.commit()
    assert client.keys(f"{namespace}:staging:v9:*") == [] and not client.exists(f"{namespace}:pending:v9")
    with pytest.raises(ValueError, match="unknown version 'v9'"):  # no longer 'a write was started'
        store.activate("v9")
    live.put(np.arange(10, 20), np.ones((10, DIM), np.float32))
    live.commit()
    assert store.versions() == ["v10", "live"] and store.version_info("live").count == 20


def test_a_redis_writer_whose_claim_lapsed_cannot_commit(redis_url):  # noqa: F811
    """If a writer's owner key lapses (a process stopped for longer than its TTL), the next
    publisher may remove its staging: the writer must then never commit (the rows would be partial)."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_url, namespace=namespace)
    writer = store.begin_version("v1", DIM)
    writer.put(np.arange(10), np.ones((10, DIM), np.float32))
    assert store.client.delete(*store.client.keys(f"{namespace}:owner:*")) == 1  # as if it expired
    with pytest.raises(ValueError, match="'v1'.*claim"):
        writer.commit()
    assert store.versions() == [] and store.client.keys(f"{namespace}:staging:*") == []


def test_a_redis_row_of_the_wrong_length_is_refused(redis_url):  # noqa: F811
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_url, namespace=namespace)
    store.write_version("v1", np.arange(10), np.ones((10, DIM), np.float32))
    key = f"{namespace}:data:v1"
    field = lambda i: np.int64(i).astype("<i8").tobytes()  # noqa: E731
    store.client.hset(key, field(2), b"\0" * (4 * DIM - 4))  # a row written by something else
    with pytest.raises(IntegrityError, match=r"version 'v1': the 10 rows read hold 316 bytes, not 10 x 32"):
        store.get(np.arange(10), version="v1")  # before: numpy's "cannot reshape array of size 79 into shape (8)"


# --- a real full disk -------------------------------------------------------------------------


def test_a_full_disk_under_an_aggregate_is_one_line_naming_the_path(small_disk, tmp_path, monkeypatch, capsys):
    """The pool on a 5 MiB tmpfs, the day's 20,000 x 64 daily rows (5 MB) on the ordinary disk:
    the kernel's ENOSPC, wherever it comes from (pyarrow, numpy), is one line naming a path."""
    import common.log
    from embeddings.aggregate import main

    n = 20_000
    rng = np.random.default_rng(0)
    day = tmp_path / "emb" / "ctr" / "user" / "day=2026-01-01"
    day.mkdir(parents=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 64).astype(np.float32)), 64)
    pq.write_table(pa.table({"entity_id": pa.array(np.arange(n)), "embedding": emb,
                             "event_time": pa.array(np.full(n, 1000))}), day / "part-00000.parquet")
    monkeypatch.setattr(common.log, "setup_logging", lambda: None)
    args = ["--emb", str(tmp_path / "emb"), "--pool", str(small_disk / "pool"), "--source", "ctr", "--entity", "user",
            "--day", "2026-01-01", "--method", "acc", "--num-buckets", "4"]
    split_elsewhere = ["--tmp-dir", str(tmp_path / "split")]  # then the pool's own bucket files fill it
    for extra in ([], split_elsewhere, "fill"):
        if extra == "fill":  # and when even the first small write fails
            fill(small_disk)
        assert main(args + (extra if extra != "fill" else [])) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: disk full") and f"({small_disk}/pool/" in err, err


# ---- rollbacks are recorded, so readers by name can leave them out (issue 29 item 4) -------------


def _rollback_record_behaves(store) -> None:
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        store.write_version(f"ctr-user-{day}", np.arange(3), np.full((3, 4), float(day[-1]), np.float32))
    store.activate("ctr-user-2026-01-01")
    store.activate("ctr-user-2026-01-02")
    assert store.rolled_back() == set()
    assert store.rollback() == "ctr-user-2026-01-01"
    assert store.rolled_back() == {"ctr-user-2026-01-02"}
    store.activate("ctr-user-2026-01-03")  # a later day goes on: the rolled-back one stays recorded
    assert store.rolled_back() == {"ctr-user-2026-01-02"}
    store.activate("ctr-user-2026-01-02")  # activated on purpose: served again
    assert store.rolled_back() == set()
    store.rollback()
    store.activate("ctr-user-2026-01-01")
    store.delete_version("ctr-user-2026-01-02")
    assert store.rolled_back() == set()


def test_the_embedded_store_records_rollbacks(tmp_path):
    from embeddings.embedded_store import EmbeddedStore

    _rollback_record_behaves(EmbeddedStore(tmp_path / "store"))


def test_the_redis_store_records_rollbacks(redis_url):  # noqa: F811
    from embeddings.redis_store import RedisStore

    _rollback_record_behaves(RedisStore(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}"))
