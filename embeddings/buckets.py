"""Hash partitioning of entities into buckets, and the one streaming pass that splits a day by bucket.

The bucket of an entity is ``splitmix64(entity_id) mod num_buckets`` — a fixed 64-bit mix
(Steele, Lea & Flood 2014; the finaliser of Java's SplittableRandom), written in numpy uint64
arithmetic, so it is the same on every run, machine and rank (unlike Python's ``hash``), and
sequential or strided ids spread evenly.

Why a temporary bucketed copy of the day: a bucket's daily rows are scattered over every input
file, and no Parquet statistic can prune by a hash, so selecting one bucket from the input (e.g.
a pyarrow dataset filter on a computed hash column) decodes the whole day again per bucket —
``num_buckets`` scans. Instead ``BucketedDay.write`` reads the day once (its row groups shared out
in order over a few threads), in chunks of bounded size;
sorts each chunk by bucket (a stable radix sort of small ints); and writes it as one uncompressed
Arrow IPC *run* file holding one record batch per bucket. Reading a bucket reads its batch from
every run (the IPC footer says where it lies): about ``rows / num_buckets`` rows, never the whole
day. Plain reads, not memory maps, so pages of other buckets never count against the process.
Memory is one chunk during the pass and one bucket afterwards; disk is the kept rows once. Run
files, not one file per bucket, keep the number of open files independent of ``num_buckets``.

Glossary: N rows, E embedding dimension, B number of buckets.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.files import claim, remove_dead_folders
from embeddings.daily_input import DailyBatch

log = logging.getLogger("derm.embeddings.aggregate")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# Rows per run file: about this many bytes of embeddings (bounds the pass's memory to a few times it).
RUN_BYTES = 64 << 20


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of each int64 id (two's complement as uint64): (N,) int64 -> (N,) uint64.

    ``splitmix64([0])`` is ``0xE220A8397B1DCDAF``, the first output of the reference generator
    seeded with 0. uint64 array arithmetic wraps modulo 2**64, as the algorithm needs.
    """
    z = np.asarray(ids, dtype=np.int64).view(np.uint64) + _GOLDEN
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


def bucket_of(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket of each entity id: (N,) int64 -> (N,) int32 in ``[0, num_buckets)``."""
    return (splitmix64(ids) % np.uint64(num_buckets)).astype(np.int32)


class BucketedDay:
    """The day's daily rows, kept for some buckets only, split by bucket into temporary run files.

    Use as a context manager; the temporary directory is removed on exit.

    Args:
        tmp_dir: a fresh directory is created inside it (same file system as the pool is best).
        num_buckets: B.
        keep: the buckets to keep; rows of other buckets are dropped during the pass.
        dim: E.
    """

    def __init__(self, tmp_dir: str | Path, num_buckets: int, keep: Iterable[int], dim: int):
        if not 1 <= num_buckets <= 1 << 16:
            raise ValueError(f"num_buckets must be in [1, 65536], got {num_buckets}")
        self.dir = Path(tmp_dir) / f"_partition-{uuid.uuid4().hex}"
        self.num_buckets, self.dim = num_buckets, dim
        self.keep = np.zeros(num_buckets, dtype=bool)
        self.keep[list(keep)] = True
        self.rows_read = 0
        self._runs: list[tuple[Path, np.ndarray]] = []  # (run file, (B,) rows per bucket)
        self._schema = pa.schema([("entity_id", pa.int64()), ("event_time", pa.int64()),
                                  ("embedding", pa.list_(pa.float32(), dim))])

    def __enter__(self) -> BucketedDay:
        for dead in remove_dead_folders(self.dir.parent, "_partition-*"):  # left by a killed aggregate
            log.warning("removed %s, the split of an aggregate that was killed", dead)
        self.dir.mkdir(parents=True)
        self._owner = claim(self.dir)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._owner.close()

    def write(self, shares: list[Iterable[DailyBatch]]) -> None:
        """The streaming pass. ``shares`` are consecutive parts of the day in read order; each is
        consumed on its own thread (Parquet decoding releases the GIL), writing a run per
        ~RUN_BYTES of rows. Runs are kept in share order, so a bucket's rows stay in read order."""
        with ThreadPoolExecutor(max_workers=max(1, len(shares)), thread_name_prefix="bucketing") as pool:
            done = list(pool.map(self._write_share, range(len(shares)), shares))
        self.rows_read = sum(rows for rows, _ in done)
        self._runs = [run for _, runs in done for run in runs]

    def _write_share(self, share: int, batches: Iterable[DailyBatch]) -> tuple[int, list[tuple[Path, np.ndarray]]]:
        pending, pending_rows, rows_read, runs = [], 0, 0, []
        run_rows = max(1, RUN_BYTES // (4 * max(self.dim, 1)))
        for batch in batches:
            rows_read += len(batch.ids)
            b = bucket_of(batch.ids, self.num_buckets)
            mask = self.keep[b]
            if not mask.all():
                batch, b = DailyBatch(batch.ids[mask], batch.event_time[mask], batch.emb[mask]), b[mask]
            pending.append((batch, b))
            pending_rows += len(b)
            if pending_rows >= run_rows:
                runs.append(self._write_run(pending, self.dir / f"run-{share:03d}-{len(runs):05d}.arrow"))
                pending, pending_rows = [], 0
        if pending_rows:
            runs.append(self._write_run(pending, self.dir / f"run-{share:03d}-{len(runs):05d}.arrow"))
        return rows_read, runs

    def read(self, bucket: int) -> DailyBatch:
        """The bucket's rows in read order (input files by name, rows in file order). Thread-safe."""
        parts = []
        for path, rows in self._runs:
            if rows[bucket]:
                with pa.OSFile(str(path)) as f:  # a reader per call: IPC readers are not shared across threads
                    parts.append(pa.ipc.open_file(f).get_batch(bucket))
        if not parts:
            return DailyBatch(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.dim), np.float32))
        return DailyBatch(
            np.concatenate([p.column(0).to_numpy() for p in parts]),
            np.concatenate([p.column(1).to_numpy() for p in parts]),
            np.concatenate([p.column(2).flatten().to_numpy().reshape(-1, self.dim) for p in parts]),
        )

    def _write_run(self, pending: list[tuple[DailyBatch, np.ndarray]], path: Path) -> tuple[Path, np.ndarray]:
        ids = np.concatenate([p.ids for p, _ in pending])
        event_time = np.concatenate([p.event_time for p, _ in pending])
        emb = np.concatenate([p.emb for p, _ in pending])
        b = np.concatenate([b for _, b in pending])
        # Stable, so rows of a bucket keep read order (dedup_latest breaks event_time ties by it).
        order = np.argsort(b.astype(np.uint16), kind="stable")  # num_buckets <= 2**16: a radix sort
        rows = np.bincount(b, minlength=self.num_buckets)
        emb = emb[order]  # (N, E), grouped by bucket
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids[order]), pa.array(event_time[order]),
             pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)],
            schema=self._schema,
        )
        start = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self._schema) as writer:
            for n in rows:  # batch i of the file is bucket i (empty ones too, to keep the numbering)
                writer.write_batch(batch.slice(start, n))
                start += n
        return path, rows
