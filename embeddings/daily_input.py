"""One day of daily embeddings, as the inference step writes them, read with its contract checked.

Layout (one dataset per source model and entity type, one partition per day)::

    EMB/<source>/<entity>/day=YYYY-MM-DD/part-*.parquet
        entity_id   int64                        one row per entity and day (see dedup_latest)
        embedding   fixed_size_list<float32>[E]  (list<float32> of length E is accepted too)
        event_time  int64                        the entity's last event of the day

Glossary: N rows, E embedding dimension.

Every problem is an ``InputError`` that names the partition or file and the row; nothing is
dropped or guessed (DESIGN.md, "Input contract").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = ("entity_id", "embedding", "event_time")
_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


class InputError(ValueError):
    """Daily embeddings that break the input contract; the message names the file and problem."""


@dataclasses.dataclass(frozen=True)
class DailyBatch:
    """Validated rows of one daily file: ids (N,) int64, event_time (N,) int64, emb (N, E) float32."""

    ids: np.ndarray
    event_time: np.ndarray
    emb: np.ndarray


@dataclasses.dataclass(frozen=True)
class Piece:
    """One row group of one daily file: the unit in which the day is read and shared out."""

    file: Path
    row_group: int
    first_row: int  # the row group's first row in the file, for messages
    num_rows: int


@dataclasses.dataclass(frozen=True)
class DailyPartition:
    """The files of one day (sorted by name: the order rows are read in), their row groups, and E."""

    path: Path
    files: tuple[Path, ...]
    pieces: tuple[Piece, ...]
    dim: int | None  # None only when every file stores variable lists and the day has no rows

    def fingerprint(self) -> list[list]:
        """``[name, size]`` per file: what the pool records as this day's input."""
        return [[f.name, f.stat().st_size] for f in self.files]

    def shares(self, n: int) -> list[tuple[Piece, ...]]:
        """The pieces in read order, cut into at most ``n`` consecutive runs of about equal rows
        (for reading on ``n`` threads; read one after the other they are the whole day in order)."""
        rows = np.array([p.num_rows for p in self.pieces], dtype=np.int64)
        starts = np.cumsum(rows) - rows
        owner = np.minimum(starts * n // max(int(rows.sum()), 1), n - 1)
        return [tuple(p for p, o in zip(self.pieces, owner) if o == k) for k in range(n) if (owner == k).any()]

    def batches(self, batch_rows: int, pieces: tuple[Piece, ...] | None = None) -> Iterator[DailyBatch]:
        """Streams the day's rows (or those of ``pieces``), ``batch_rows`` at a time, each batch
        checked (nulls, finite, E)."""
        for piece in self.pieces if pieces is None else pieces:
            yield from _piece_batches(piece, self.dim, batch_rows)


def emb_days(emb_root: str | Path, source: str, entity: str) -> list[str]:
    """The days (YYYY-MM-DD, ascending) that have a daily partition directory."""
    root = Path(emb_root) / source / entity
    if not root.is_dir():
        return []
    return sorted(m.group(1) for p in root.iterdir() if p.is_dir() and (m := _DAY_DIR.match(p.name)))


def day_partition(emb_root: str | Path, source: str, entity: str, day: str) -> DailyPartition:
    """Lists and schema-checks the day's files (footers only) and fixes E for the day.

    Raises:
        InputError: the partition is missing or has no ``part-*.parquet``; a file is not readable
            Parquet; a column is missing or of the wrong type; two files disagree on E.
    """
    path = Path(emb_root) / source / entity / f"day={day}"
    if not path.is_dir():
        raise InputError(f"{path}: missing daily partition (no daily embeddings for {source}/{entity} on {day})")
    files = tuple(sorted(path.glob("part-*.parquet")))
    if not files:
        raise InputError(f"{path}: daily partition has no part-*.parquet files")
    dim, dim_file, pieces = None, None, []
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{f}: unreadable Parquet ({e})") from None
        file_dim = _check_schema(f, meta.schema.to_arrow_schema())
        first = 0
        for i in range(meta.num_row_groups):
            pieces.append(Piece(f, i, first, meta.row_group(i).num_rows))
            first += meta.row_group(i).num_rows
        if file_dim is not None:
            if dim is not None and file_dim != dim:
                raise InputError(f"{f}: embedding dimension {file_dim} differs from {dim} in {dim_file.name} of the same day")
            dim, dim_file = file_dim, f
    if dim is None:  # variable-length lists only: E comes from the first row
        dim = _first_list_length(files)
    return DailyPartition(path, files, tuple(pieces), dim)


def dedup_latest(ids: np.ndarray, event_time: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keeps one row per entity: the one with the largest event_time (paper Appendix C.1, "retain
    the last embedding of the day"); among equal event_times, the row read last (files in name
    order, rows in file order). The inference step already deduplicates; this does not trust it.

    Returns:
        ids (M,) sorted ascending and unique, emb (M, E), and the number of rows dropped N - M.
    """
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    last = np.ones(len(ids), dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    if not last.all():  # duplicates (rare): order by event_time too; stable, so ties keep read order
        order = np.lexsort((event_time, ids))
        sorted_ids = ids[order]
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[last]
    return ids[keep], emb[keep], len(ids) - len(keep)


def _check_schema(f: Path, schema: pa.Schema) -> int | None:
    """E of a fixed-size-list file, None for variable lists; InputError on a contract break."""
    for name in COLUMNS:
        if schema.get_field_index(name) < 0:
            raise InputError(f"{f}: missing column {name!r} (has {schema.names})")
    for name in ("entity_id", "event_time"):
        if schema.field(name).type != pa.int64():
            raise InputError(f"{f}: column {name!r} must be int64, got {schema.field(name).type}")
    t = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)) or t.value_type != pa.float32():
        raise InputError(f"{f}: column 'embedding' must be fixed_size_list<float32>[E], got {t}")
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def _first_list_length(files: tuple[Path, ...]) -> int | None:
    for f in files:
        for batch in _read(f, 1 << 16):
            col = batch.column("embedding")
            if len(col):
                return int(pc.list_value_length(col)[0].as_py() or 0)
    return None


def _read(f: Path, batch_rows: int, row_groups: list[int] | None = None) -> Iterator[pa.RecordBatch]:
    try:
        # use_threads=False: the caller already reads on one thread per core (BucketedDay.write).
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=list(COLUMNS),
                                                  use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{f}: unreadable Parquet ({e})") from None


def _piece_batches(piece: Piece, dim: int | None, batch_rows: int) -> Iterator[DailyBatch]:
    start = piece.first_row  # row number in the file of the batch's first row, for messages
    for batch in _read(piece.file, batch_rows, [piece.row_group]):
        yield _check_batch(piece.file, batch, dim, start)
        start += batch.num_rows


def _check_batch(f: Path, batch: pa.RecordBatch, dim: int | None, start: int) -> DailyBatch:
    n = batch.num_rows
    for name in COLUMNS:
        col = batch.column(name)
        if col.null_count:
            row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{f}: null {name} in row {row}")
    ids = batch.column("entity_id").to_numpy()
    col = batch.column("embedding")
    if not pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy()
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            i = bad[0]
            raise InputError(f"{f}: embedding of entity_id {ids[i]} (row {start + i}) has length {lengths[i]}, "
                             f"expected {dim} (dimension mismatch within the day)")
    values = col.flatten()
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // dim
        raise InputError(f"{f}: null value inside the embedding of entity_id {ids[row]} (row {start + row})")
    emb = values.to_numpy().reshape(n, dim)
    finite = np.isfinite(emb)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InputError(f"{f}: non-finite embedding (NaN or inf) for entity_id {ids[row]} (row {start + row})")
    return DailyBatch(ids, batch.column("event_time").to_numpy(), emb)
