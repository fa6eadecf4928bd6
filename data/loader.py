"""Streaming loader: a source's Parquet days -> :class:`~data.batch.Batch`es for one rank.

Partitioning. The chosen days' rows, in file order (days ascending, part files by name), form one
sequence of N rows. Shard ``s`` of ``S = world_size * num_workers`` reads the contiguous rows
``[s * N // S, (s + 1) * N // S)`` (shard = ``rank * num_workers + worker``), so every row is read
by exactly one worker of one rank, shards differ by at most one row, and each reads only the row
groups it needs. Row order within a shard is the stored (time) order, as daily incremental training
wants (paper Appendix B.2).

Memory. Files are read one Arrow record batch at a time (at most ``READ_ROWS`` rows of the needed
columns), so memory is bounded by the batch size, not by the dataset or its row groups.

Resuming. :class:`BatchLoader` counts the batches it has handed out; ``state_dict()`` records that
count with the layout it depends on, and a loader built the same way resumes after the last batch
without reading the skipped rows (DataLoader hands batches out round-robin over workers, and
earlier worker shards never hold fewer batches, so the count splits across shards exactly).

Usage::

    loader = make_loader("runs/data/tiny", "ctr", batch_size=512, rank=rank, world_size=world)
    for batch in loader:            # Batch(sparse=KeyedJaggedTensor, dense=..., labels=[B, T], ...)
        ...
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Batch
from data.columns import ColumnReader, DataError
from data.spec import FeatureSpec, load_spec

log = logging.getLogger("derm.data.loader")

READ_ROWS = 16_384
"""Rows decoded at a time from a file: with the batch buffer, what bounds the loader's memory."""


def day_partitions(src: Path, key: str = "day") -> list[str]:
    """The days of a source folder's ``<key>=YYYY-MM-DD`` partitions, sorted ([] when it has none
    or does not exist)."""
    prefix = f"{key}="
    if not src.is_dir():
        return []
    return sorted(p.name[len(prefix):] for p in src.iterdir() if p.is_dir() and p.name.startswith(prefix))


def shard_range(num_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``shard``: contiguous, balanced to within one row."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside [0, {num_shards})")
    return shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards


def _check_day(meta: pq.ParquetFile, path: Path, day: str, time_column: str) -> None:
    """Refuses a file of partition ``day`` whose event times (its footer's row-group statistics;
    no data is read) fall outside that UTC day. The contract's days are UTC days: a row of day d
    reads the embeddings published for d − 1 by its UTC event time, so partitions cut in another
    time zone would silently pair rows with the wrong versions."""
    start = int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc).timestamp())
    column = meta.schema_arrow.get_field_index(time_column)
    if column < 0:
        return  # check_schema has already named a missing column
    for i in range(meta.metadata.num_row_groups):
        stats = meta.metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            continue
        lo, hi = int(stats.min), int(stats.max)
        if lo < start or hi >= start + 86_400:
            def utc(t: int) -> str:
                try:
                    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                except (ValueError, OverflowError, OSError):  # far outside any calendar: not seconds
                    return f"{t} s"

            raise DataError(
                f"{path}: {time_column} spans {utc(lo)} .. {utc(hi)} UTC, outside its partition's day {day} (UTC); "
                "day partitions are UTC days of the event time: re-partition by the UTC day "
                "(event_time // 86400), or fix the times' unit (seconds since the epoch)")


@dataclass(frozen=True)
class _File:
    path: Path
    day: str
    first_row: int  # global index of its first row
    num_rows: int


class EventLog:
    """The Parquet files of one source over chosen days: found, footers read and schemas checked
    up front, so a bad file fails before training starts rather than hours in."""

    def __init__(
        self,
        root: str | os.PathLike,
        source: str,
        days: Iterable[str | dt.date] | None = None,
        spec: FeatureSpec | None = None,
    ) -> None:
        self.root = Path(root)
        self.spec = spec if spec is not None else load_spec(self.root / "spec.toml")
        self.source = source
        self.reader = ColumnReader(self.spec, source)
        src = self.root / source
        if not src.is_dir():
            raise DataError(f"{src}: no such source directory (the spec's sources: {self.spec.source_names})")
        prefix = f"{self.spec.keys.day}="
        available = day_partitions(src, self.spec.keys.day)
        chosen = available if days is None else [d.isoformat() if isinstance(d, dt.date) else str(d) for d in days]
        if not chosen:
            raise DataError(f"{src}: no day partitions ({prefix}YYYY-MM-DD directories)")
        self.days = chosen
        self.files: list[_File] = []
        first_types: dict[str, tuple[pa.DataType, Path]] = {}
        total = 0
        for day in chosen:
            d = src / f"{prefix}{day}"
            if not d.is_dir():
                raise DataError(f"{d}: no such day partition; available days: {_summarise(available)}")
            # Spark and Hadoop writers leave _SUCCESS, _temporary-*, .crc and .part-* beside the data.
            paths = sorted(p for p in d.glob("*.parquet") if not p.name.startswith(("_", ".")))
            if not paths:
                raise DataError(f"{d}: empty partition (no .parquet files)")
            day_rows = 0
            for path in paths:
                try:
                    meta = pq.ParquetFile(path)
                    schema, rows = meta.schema_arrow, meta.metadata.num_rows
                except (pa.ArrowException, OSError) as e:
                    raise DataError(f"{path}: unreadable Parquet file ({e})") from None
                self.reader.check_schema(schema, str(path))
                self._check_same_types(schema, path, first_types)
                _check_day(meta, path, day, self.spec.keys.time)
                if rows:
                    self.files.append(_File(path, day, total, rows))
                total += rows
                day_rows += rows
            if day_rows == 0:
                raise DataError(f"{d}: empty partition (its files hold no rows)")
        self.num_rows = total

    def _check_same_types(self, schema: pa.Schema, path: Path, first: dict[str, tuple[pa.DataType, Path]]) -> None:
        """Every file holds each needed column in one type (batches concatenate rows across files)."""
        for column in self.reader.needs:
            t = schema.field(column).type
            seen = first.setdefault(column, (t, path))
            if seen[0] != t:
                raise DataError(f"{path}: column '{column}' has type {t}, but {seen[1]} has it as {seen[0]}; "
                                "write every file of a source with the same column types")

    def read(self, start: int, stop: int) -> Iterator[pa.Table]:
        """Checked tables covering rows ``[start, stop)`` in order, each at most ``READ_ROWS``."""
        for f in self.files:
            lo, hi = max(start, f.first_row), min(stop, f.first_row + f.num_rows)
            if lo >= hi:
                continue
            try:
                pf = pq.ParquetFile(f.path)
                # Decode only the row groups that overlap [lo, hi).
                groups, offset, pos = [], None, f.first_row
                for i in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(i).num_rows
                    if pos + n > lo and pos < hi:
                        offset = pos if offset is None else offset  # global index of the next decoded row
                        groups.append(i)
                    pos += n
                for rb in pf.iter_batches(batch_size=READ_ROWS, row_groups=groups, columns=self.reader.columns):
                    a, b = max(lo, offset), min(hi, offset + rb.num_rows)
                    if a < b:
                        table = pa.Table.from_batches([rb.slice(a - offset, b - a)])
                        self.reader.check_values(table, str(f.path), a - f.first_row)
                        yield table
                    offset += rb.num_rows
                    if offset >= hi:
                        break
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f.path}: unreadable Parquet data ({e})") from None


class ShardedBatches(IterableDataset):
    """Batches of one rank's shard, split further across DataLoader workers (module docstring)."""

    def __init__(self, events: EventLog, batch_size: int, rank: int = 0, world_size: int = 1, skip_batches: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.events, self.batch_size = events, batch_size
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches

    def worker_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        return shard_range(self.events.num_rows, self.rank * num_workers + worker, self.world_size * num_workers)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader hands batches out round-robin from worker 0, and the next batch due after
        # `n` is the (n % W)-th worker shard's, so on a resume worker w takes over shard (w + n) % W.
        n = self.skip_batches
        shard = (worker + n) % num_workers
        start, stop = self.worker_range(shard, num_workers)
        skip = n // num_workers + (shard < n % num_workers)
        start = min(stop, start + skip * self.batch_size)
        pending: list[pa.Table] = []
        buffered = 0
        for table in self.events.read(start, stop):
            pending.append(table)
            buffered += table.num_rows
            while buffered >= self.batch_size:
                rows = pa.concat_tables(pending)
                yield self.events.reader.to_batch(rows.slice(0, self.batch_size))
                rest = rows.slice(self.batch_size)
                pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
        if buffered:
            yield self.events.reader.to_batch(pa.concat_tables(pending))


class BatchLoader:
    """One rank's batches, optionally through DataLoader worker processes, with a resumable
    position (see the module docstring)."""

    def __init__(
        self,
        events: EventLog,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = ShardedBatches(events, batch_size, rank, world_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = 0  # batches handed out in the current pass
        self.passes = 0  # completed passes

    def __len__(self) -> int:
        """Batches this rank yields in a full pass (ranks may differ by one: the trainer decides
        whether to stop all ranks at the smallest count)."""
        B = self.dataset.batch_size
        W = max(self.num_workers, 1)
        return sum(-(-(b - a) // B) for a, b in (self.dataset.worker_range(w, W) for w in range(W)))

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.skip_batches = self.position
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            multiprocessing_context="fork" if self.num_workers else None,
        )
        for batch in loader:
            self.position += 1
            yield batch
        self.position, self.passes = 0, self.passes + 1

    def _layout(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "source": d.events.source,
            "days": d.events.days,
            "num_rows": d.events.num_rows,
            "batch_size": d.batch_size,
            "rank": d.rank,
            "world_size": d.world_size,
            "num_workers": self.num_workers,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "passes": self.passes, "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self._layout():
            diff = {k: (v, self._layout()[k]) for k, v in state["layout"].items() if self._layout().get(k) != v}
            raise DataError(f"cannot resume the loader: its layout changed (saved, now): {diff}")
        self.position, self.passes = int(state["position"]), int(state["passes"])


def make_loader(
    root: str | os.PathLike,
    source: str,
    batch_size: int,
    days: Iterable[str | dt.date] | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    spec: FeatureSpec | None = None,
    pin_memory: bool = False,
) -> BatchLoader:
    """The loader of ``source`` under ``root`` (spec from ``root/spec.toml`` unless given)."""
    events = EventLog(root, source, days=days, spec=spec)
    log.info("%s/%s: %d rows over %d day(s) in %d file(s)", root, source, events.num_rows, len(events.days), len(events.files))
    return BatchLoader(events, batch_size, rank, world_size, num_workers, pin_memory)


def _summarise(days: list[str]) -> str:
    if not days:
        return "none"
    return ", ".join(days) if len(days) <= 6 else f"{days[0]} .. {days[-1]} ({len(days)} days)"


__all__ = ["BatchLoader", "DataError", "EventLog", "ShardedBatches", "make_loader", "shard_range"]
