"""The pool on disk: one immutable snapshot per day, hash-partitioned into bucket files.

Layout::

    POOL/<source>/<entity>/
        day=2026-01-03/                 a complete snapshot (only directories with _SUCCESS count)
            bucket=0000.parquet         the entities with splitmix64(id) % B == 0, sorted by id
            ...                           entity_id int64, embedding fixed_size_list<float32>[E],
            bucket=0063.parquet           last_daily (same type), last_day date32, first_day date32,
                                          updates int32, all non-null; key-value metadata
                                          "derm.pool": the bucket's run and BucketStats (quality.py)
            report.json                 the day's quality report
            _SUCCESS                    the manifest (JSON), written last
        _staging/day=2026-01-04/        buckets being computed (possibly by several processes)
        _trash/                         a replaced snapshot, between the two renames of a commit

A snapshot is written into ``_staging/day=D`` and then renamed to ``day=D`` (if ``day=D`` existed,
it is first renamed into ``_trash`` and deleted after). Readers never see a half-written snapshot;
a crash between the two renames leaves ``day=D`` absent, which the next run reports as a gap and
``aggregate_day`` recomputes. Names starting with ``_`` are skipped by pyarrow datasets; read a
snapshot with ``read_pool`` (or a dataset of its ``bucket=*.parquet`` files: report.json is not
Parquet).

Glossary: N rows, E embedding dimension, B number of buckets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import atomic_path, naming
from embeddings.heuristics import PoolColumns

FORMAT = "derm-pool/1"
META_KEY = b"derm.pool"
_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
# Embeddings are incompressible floats, and dictionary encoding never pays off for them or for
# unique ids: plain, uncompressed pages write and read at memory speed.
_WRITE_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=["entity_id"])
# Rows per row group: the writer holds one encoded row group, the reader decodes one at a time.
ROW_GROUP_ROWS = 1 << 16


class PoolError(ValueError):
    """The pool's state does not allow the request (gap, mismatched settings, incomplete day)."""


def pool_dir(pool_root: str | Path, source: str, entity: str) -> Path:
    return Path(pool_root) / source / entity


def snapshot_dir(pool_root: str | Path, source: str, entity: str, day: str) -> Path:
    return pool_dir(pool_root, source, entity) / f"day={day}"


def staging_dir(pool_root: str | Path, source: str, entity: str, day: str) -> Path:
    return pool_dir(pool_root, source, entity) / "_staging" / f"day={day}"


def bucket_file(num_buckets: int, bucket: int) -> str:
    """``bucket=0007.parquet``: zero-padded to at least 4 digits, so names sort numerically."""
    return f"bucket={bucket:0{max(4, len(str(num_buckets - 1)))}d}.parquet"


def pool_days(pool_root: str | Path, source: str, entity: str) -> list[str]:
    """The days (ascending) with a complete snapshot."""
    root = pool_dir(pool_root, source, entity)
    if not root.is_dir():
        return []
    return sorted(m.group(1) for p in root.iterdir() if (m := _DAY_DIR.match(p.name)) and (p / "_SUCCESS").is_file())


def read_manifest(snapshot: Path) -> dict:
    """The snapshot's ``_SUCCESS`` manifest (settings, inputs, buckets)."""
    return json.loads((snapshot / "_SUCCESS").read_text())


def manifest_digest(snapshot: Path) -> str:
    """sha256 of the manifest bytes: ties a day's run to the exact previous snapshot it read."""
    return hashlib.sha256((snapshot / "_SUCCESS").read_bytes()).hexdigest()


def pool_schema(dim: int) -> pa.Schema:
    """Every field non-null (a pool has no nulls; Parquet then stores no definition levels)."""
    emb = pa.list_(pa.field("element", pa.float32(), nullable=False), dim)
    return pa.schema([pa.field(name, t, nullable=False) for name, t in (
        ("entity_id", pa.int64()), ("embedding", emb), ("last_daily", emb),
        ("last_day", pa.date32()), ("first_day", pa.date32()), ("updates", pa.int32()))])


def read_bucket(path: Path, dim: int) -> PoolColumns:
    """A bucket file as numpy columns, decoded a row group at a time into arrays of the bucket's size."""
    try:
        f = pq.ParquetFile(path)
        out = PoolColumns.empty(f.metadata.num_rows, dim)
        start = 0
        for i in range(f.num_row_groups):
            rg = f.read_row_group(i)
            end = start + rg.num_rows
            out.ids[start:end] = rg.column("entity_id").to_numpy()
            out.updates[start:end] = rg.column("updates").to_numpy()
            for name in ("last_day", "first_day"):
                getattr(out, name)[start:end] = rg.column(name).cast(pa.int32()).to_numpy()
            for name in ("embedding", "last_daily"):
                getattr(out, name)[start:end] = rg.column(name).combine_chunks().flatten().to_numpy().reshape(-1, dim)
            start = end
    except (pa.ArrowException, OSError) as e:
        raise PoolError(f"{path}: unreadable pool bucket ({e})") from None
    return out


def write_bucket(path: Path, cols: PoolColumns, meta: dict) -> None:
    """Writes a bucket file atomically (temporary name, then rename) with ``meta`` in its footer."""
    schema = pool_schema(cols.embedding.shape[1]).with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})

    def fsl(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=schema.field("embedding").type)

    table = pa.Table.from_arrays(
        [pa.array(cols.ids), fsl(cols.embedding), fsl(cols.last_daily), pa.array(cols.last_day).cast(pa.date32()),
         pa.array(cols.first_day).cast(pa.date32()), pa.array(cols.updates)],
        schema=schema,
    )
    with naming(path), atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, **_WRITE_OPTIONS)


def bucket_meta(path: Path) -> dict:
    """The ``meta`` a bucket file was written with (footer only)."""
    try:
        return json.loads(pq.read_schema(path).metadata[META_KEY])
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as e:
        raise PoolError(f"{path}: not a readable pool bucket ({e!r}); remove it and recompute that bucket") from None


def commit(staging: Path, final: Path, manifest: dict, report: dict) -> None:
    """Writes report and manifest into the staged snapshot, then moves it to ``final``."""
    for name, text in (("report.json", json.dumps(report, indent=2)), ("_SUCCESS", json.dumps(manifest, indent=2, sort_keys=True))):
        with naming(staging / name):
            (staging / name).write_text(text + "\n")
    trash = final.parent / "_trash" / f"{final.name}.{uuid.uuid4().hex}"
    if final.exists():
        trash.parent.mkdir(exist_ok=True)
        os.rename(final, trash)
    os.rename(staging, final)
    for old in trash.parent.glob(f"{final.name}.*"):  # ours, and any left by a crashed commit of this day
        shutil.rmtree(old, ignore_errors=True)
    try:
        trash.parent.rmdir()  # if no other commit is under way
    except OSError:
        pass


def read_pool(pool_root: str | Path, source: str, entity: str, day: str | None = None, *,
              buckets: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """A pool snapshot as one Arrow table (entity_id sorted within each bucket, buckets in order).

    Args:
        day: YYYY-MM-DD; default the latest complete snapshot.
        buckets: read only these buckets (a pool larger than memory is read a bucket at a time).
        columns: default all (see the module docstring).

    Raises:
        PoolError: no complete snapshot (of ``day``, or at all).
    """
    days = pool_days(pool_root, source, entity)
    if day is None and not days:
        raise PoolError(f"{pool_dir(pool_root, source, entity)}: no complete pool snapshot")
    if day is not None and day not in days:
        raise PoolError(f"{snapshot_dir(pool_root, source, entity, day)}: no complete pool snapshot for {day} "
                        f"(latest: {days[-1] if days else 'none'})")
    snap = snapshot_dir(pool_root, source, entity, day or days[-1])
    manifest = read_manifest(snap)
    n = manifest["num_buckets"]
    chosen = range(n) if buckets is None else buckets
    if any(not 0 <= b < n for b in chosen):
        raise ValueError(f"buckets must be in [0, {n}) for {snap}, got {buckets!r}")
    tables = [pq.read_table(snap / bucket_file(n, b), columns=columns) for b in chosen]
    schema = pool_schema(manifest["dim"])
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables]) if tables else schema.empty_table()
