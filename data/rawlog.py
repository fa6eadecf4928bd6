"""Your own interaction log → the project's input contract (docs/your-data.md).

One row per event of a raw log — CSV with a header, Parquet, or JSON lines; one file, a folder of
parts or a glob — with a user key, an
item ("Pin") key, a time and the labels becomes one source of a dataset (``ROOT/spec.toml``,
``ROOT/<source>/day=YYYY-MM-DD/part-00000.parquet``) that every job of the project reads::

    # an impression log with real negatives: every row is an impression, click is 0 or 1
    python -m data.rawlog --input clicks.csv --out runs/data/mylog --source ctr \\
        --user user --item ad --time ts --labels click
    # a log without impressions (views and buys): every row is an interaction; 4 sampled
    # non-interactions per view, drawn by popularity, stand in for the impressions
    python -m data.rawlog --input events.jsonl --out runs/data/shop --source cvr \\
        --user visitor --item product --time ts --time-unit ms \\
        --labels "view=event==view" "buy=event==transaction" --negatives 4

The steps, each a function of its own, in the order they run:

1. :func:`input_files` lists the log's files; :func:`read_batches` streams each in record batches
   (memory bounded by the batch, not the file); :func:`split_by_day` checks every batch — keys read
   as exact text (:func:`key_text`), labels exactly 0/1 (:meth:`Label.evaluate`), times turned into
   seconds since the epoch by :func:`epoch_seconds` (``s``, ``ms`` or ISO 8601 strings, naive ones
   read in ``--tz``) and checked by :func:`check_times` — and writes its rows into a claimed scratch
   folder by their **UTC** day (the contract's day partitions; the loader refuses anything else).
2. Day by day, ascending, each day in time order (memory bounded by a day):
   - :class:`IdMap` maps raw keys to dense ids in order of first appearance; the maps are saved as
     ``ROOT/ids/{user,item}.parquet`` (raw key, id) to translate back;
   - :func:`sample_negatives` (``--negatives K``): for each row whose first label is 1, K items
     the user had no positive with that day, by popularity (positives before the day, + 1) or
     uniformly; their probability under the sampler goes into ``sample_prob`` (NaN on logged
     rows), for logQ corrections and for reading evaluations on sampled negatives;
   - :class:`History`: each user's items with a positive first label on earlier days, newest
     first (``user_seq``), and the user's and item's rows and positives of the day before
     (``*_events_1d``, ``*_positives_1d``): features as of the start of the day, so nothing of
     the day itself leaks into them;
   - ``hour_of_day`` of the UTC time.
3. :func:`build_spec` writes the spec of what was written, and the dataset moves into place only
   when complete (``dataset_writer.staged_output``).

Bad input is refused naming the file, the row, the column and the problem (:class:`RawLogError`),
never rounded, parsed into another value or guessed; an OS error (a full disk) is one line naming
the path. The scratch and staging folders of a killed conversion are removed by the next one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.files import claim, naming, os_error_line, remove_dead_folders
from data.dataset_writer import staged_output, write_part
from data.spec import DenseFeature, FeatureSpec, Keys, SequenceFeature, Source, SparseFeature

log = logging.getLogger("derm.data.rawlog")
SECONDS_PER_DAY = 86_400
BATCH_ROWS = 65_536
TIME_UNITS = ("s", "ms", "iso")
SAMPLINGS = ("popularity", "uniform")


class RawLogError(ValueError):
    """Bad input: the message names the file, the column and the problem."""


@dataclass(frozen=True)
class Label:
    """One label of the output: an existing 0/1 column, a test ``column == value``, or 1."""

    name: str
    column: str | None = None
    value: str | None = None

    @staticmethod
    def parse(text: str) -> "Label":
        """``click`` (a 0/1 column), ``buy=event==transaction`` or ``click=1`` (every row)."""
        name, sep, rule = text.partition("=")
        if not name.isidentifier():
            raise RawLogError(f"--labels {text!r}: the label name must be an identifier")
        if not sep:
            return Label(name, name)
        if rule == "1":
            return Label(name)
        column, eq, value = rule.partition("==")
        if not eq or not column:
            raise RawLogError(f"--labels {text!r}: expected NAME, NAME=COLUMN==VALUE or NAME=1")
        return Label(name, column, value)

    def columns(self) -> list[str]:
        return [self.column] if self.column else []

    def evaluate(self, table: pa.Table, where: Where) -> np.ndarray:
        """[N] int8 0/1 of this label on ``table``'s rows. A 0/1 column must hold exactly 0 or 1:
        integers, floats equal to 0.0 or 1.0, booleans, or the texts "0" and "1"; anything else
        (0.9, "yes", an empty value) is refused naming the row, never rounded or guessed."""
        if self.column is None:
            return np.ones(table.num_rows, np.int8)
        col = table[self.column]
        if self.value is not None:
            return np.asarray(pc.fill_null(pc.equal(pc.cast(col, pa.string()), self.value), False), np.int8)
        what = f"column {self.column!r} (label {self.name!r})"
        if pa.types.is_boolean(col.type):
            ok, values = pc.is_valid(col), pc.cast(pc.fill_null(col, False), pa.int8())
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            ok = pc.fill_null(pc.is_in(col, value_set=pa.array([0, 1], col.type)), False)
            values = pc.cast(pc.if_else(ok, col, pa.scalar(0, col.type)), pa.int8())
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            ok = pc.fill_null(pc.is_in(col, value_set=pa.array(["0", "1"], col.type)), False)
            values = pc.cast(pc.if_else(ok, col, "0"), pa.int8())
        else:
            raise RawLogError(f"{where}: {what} must be 0 or 1, but its type is {col.type}")
        ok = np.asarray(ok)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            hint = f"; for a text label give --labels {self.name}={self.column}==VALUE" \
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else ""
            raise RawLogError(f"{where.row(row)}: {what} must be 0 or 1; it has {col[row].as_py()!r}{hint}")
        return np.asarray(values)


@dataclass(frozen=True)
class Where:
    """Where a batch of rows came from, for error messages: the file and the batch's first row."""

    path: Path
    first_row: int = 0
    day: str | None = None

    def __str__(self) -> str:
        return f"{self.path}" + (f" (day {self.day})" if self.day else "")

    def row(self, i: int) -> str:
        """``FILE row N`` (N counted from 1 over the data rows of the file: for CSV, line N + 1)."""
        return f"{self.path} row {self.first_row + i + 1:,}"


# ---- 1. reading and splitting by day ----------------------------------------------------------

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv", ".tsv": "tsv", ".jsonl": "json",
           ".json": "json", ".ndjson": "json"}


def _format_of(path: Path) -> str | None:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    return FORMATS.get(suffix.lower())


def input_files(spec: str) -> list[Path]:
    """The files of ``--input``: one file, a folder of parts (its data files, recursively, in name
    order; names starting with ``_`` or ``.``, such as Spark's ``_SUCCESS`` and ``.crc`` files, are
    not data), or a glob pattern (``logs/day=*/part-*.csv``)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts))
        where = f"{path}: a folder with"
    elif any(c in spec for c in "*?["):
        parts = path.parts
        fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        anchor = Path(*parts[:fixed]) if fixed else Path(".")
        files = sorted(p for p in anchor.glob(str(Path(*parts[fixed:]))) if p.is_file() and not p.name.startswith(("_", ".")))
        where = f"{spec}: a pattern matching"
    else:
        raise RawLogError(f"{path}: no such file or folder")
    if not files:
        raise RawLogError(f"{where} no data files")
    unknown = [p for p in files if _format_of(p) is None]
    if unknown:
        raise RawLogError(f"{unknown[0]}: unknown format; give .csv, .tsv, .parquet or .jsonl files ({where} {len(unknown)} such)")
    return files


def read_batches(path: Path, columns: Sequence[str], keys: Sequence[str] = ()) -> Iterator[pa.Table]:
    """The file's rows in tables of at most ``BATCH_ROWS``, only ``columns`` (refused when absent).
    CSV ``keys`` columns are read as raw bytes, never parsed as numbers (``007`` stays ``007``;
    a 20-digit id stays exact)."""
    fmt = _format_of(path)
    if not path.is_file():
        raise RawLogError(f"{path}: no such file")
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            _require(pf.schema_arrow.names, columns, path)
            for rb in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
                yield pa.Table.from_batches([rb])
        elif fmt in ("csv", "tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            convert = pacsv.ConvertOptions(column_types={k: pa.binary() for k in keys}, include_columns=list(columns))
            header = pacsv.open_csv(path, parse_options=parse, read_options=pacsv.ReadOptions(block_size=1 << 16))
            _require(header.schema.names, columns, path)
            reader = pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                                    read_options=pacsv.ReadOptions(block_size=1 << 22))
            for rb in reader:
                yield pa.Table.from_batches([rb]).select(list(columns))
        elif fmt == "json":
            with open(path, "rb") as f:
                while True:
                    lines = f.readlines(1 << 22)
                    if not lines:
                        break
                    table = pajson.read_json(io.BytesIO(b"".join(lines)))
                    _require(table.column_names, columns, path)
                    yield table.select(list(columns))
        else:
            raise RawLogError(f"{path}: unknown format {path.suffix!r}; give .csv, .tsv, .parquet or .jsonl")
    except pa.ArrowInvalid as e:
        raise RawLogError(f"{path}: unreadable ({e})") from None
    except OSError as e:
        if e.errno is not None:  # a real OS error (disk, permissions): the caller names the path
            raise
        raise RawLogError(f"{path}: unreadable ({e})") from None


def _require(have: Sequence[str], want: Sequence[str], path: Path) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise RawLogError(f"{path}: missing column(s) {missing}; it has {list(have)}")


def key_text(values: pa.ChunkedArray | pa.Array, column: str, where: Where) -> pa.Array:
    """A key column as exact text: strings as they are, bytes decoded as UTF-8, integers written
    out. Keys are compared as text, so ``007`` and ``7`` stay two keys. Floating-point keys are
    refused: a float cannot hold every id exactly (2^63 and 2^63 + 1 are one float64), so two users
    would silently become one."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if values.null_count:
        row = int(np.flatnonzero(np.asarray(pc.is_null(values)))[0])
        raise RawLogError(f"{where.row(row)}: column {column!r} has an empty key ({values.null_count} in this batch)")
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values.cast(pa.string())
    if pa.types.is_integer(kind):
        return pc.cast(values, pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return pc.cast(values, pa.string())
        except pa.ArrowInvalid:
            row = next(i for i, b in enumerate(values.to_pylist()) if not _is_utf8(b))  # the error path only
            raise RawLogError(f"{where.row(row)}: column {column!r} holds a key that is not UTF-8 text "
                              f"({values[row].as_py()[:40]!r}); write the keys as UTF-8") from None
    if pa.types.is_floating(kind):
        raise RawLogError(f"{where}: column {column!r} holds keys as floating-point numbers ({kind}, e.g. {values[0].as_py()!r}), "
                          "which cannot tell every id apart; write them as strings (JSON) or integers (Parquet)")
    raise RawLogError(f"{where}: column {column!r} holds keys of type {kind}; keys must be strings or integers")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def epoch_seconds(values: pa.ChunkedArray | pa.Array, unit: str, tz: str, where: Where | str) -> np.ndarray:
    """[N] int64 seconds since the epoch of a time column: numbers in ``s`` or ``ms``, or ISO 8601
    strings (``iso``; fractional seconds are floored; strings without an offset are local times of ``tz``)."""
    if values.null_count:
        raise RawLogError(f"{where}: the time column has {values.null_count} empty value(s)")
    if unit in ("s", "ms"):
        try:
            t = np.asarray(pc.cast(values, pa.float64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise RawLogError(f"{where}: the time column is not numeric ({values.type}); give --time-unit iso for dates") from None
        return np.floor(t / (1000 if unit == "ms" else 1)).astype(np.int64)
    if unit != "iso":
        raise RawLogError(f"--time-unit must be one of {TIME_UNITS}, got {unit!r}")
    text = pc.cast(values, pa.string())
    try:
        aware = pc.cast(pc.cast(pc.match_substring_regex(text, r"(Z|[+-]\d\d:?\d\d)$"), pa.int8()), pa.bool_())
        if pc.any(aware).as_py():
            if not pc.all(aware).as_py():
                raise RawLogError(f"{where}: the time column mixes times with and without a UTC offset")
            stamps = pc.cast(text, pa.timestamp("ns", tz="UTC"))
        else:
            stamps = pc.assume_timezone(pc.cast(text, pa.timestamp("ns")), tz)
    except pa.ArrowInvalid as e:
        raise RawLogError(f"{where}: the time column is not ISO 8601 ({e})") from None
    return np.floor_divide(np.asarray(pc.cast(stamps, pa.int64())), 1_000_000_000)


EARLIEST = 31_536_000  # 1971-01-01
LATEST = 4_102_444_800  # 2100-01-01


def check_times(t: np.ndarray, unit: str, where: Where) -> None:
    """Refuses times outside 1970..2100 (milliseconds read as seconds land past 2100) and a batch
    whose times all fall in 1970 (seconds read as milliseconds land in its first weeks)."""
    if not t.size:
        return
    stamp = lambda s: dt.datetime.fromtimestamp(int(s), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # noqa: E731
    if t.min() < 0 or t.max() > LATEST:
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise RawLogError(f"{where}: times outside 1970..2100 (e.g. {bad} s since the epoch, with --time-unit {unit}); "
                          "check --time-unit")
    if t.max() < EARLIEST:
        raise RawLogError(f"{where}: every time falls in 1970 ({stamp(t.min())} .. {stamp(t.max())} with --time-unit {unit}): "
                          f"{'seconds read as milliseconds? ' if unit == 'ms' else ''}check --time-unit")


def split_by_day(files: Sequence[Path], args: argparse.Namespace, labels: Sequence[Label], scratch: Path) -> list[str]:
    """Reads every file of the log and writes its rows, checked and normalised (keys as text, times
    as seconds in ``_t``, each label as int8 ``_y_<name>``), into ``scratch/day=D/chunk-N.parquet``
    by UTC day; returns the days, ascending."""
    columns = list(dict.fromkeys([args.user, args.item, args.time, *(c for lab in labels for c in lab.columns())]))
    days: set[str] = set()
    n = 0
    for path in files:
        first_row = 0
        for table in read_batches(path, columns, keys=(args.user, args.item)):
            where = Where(path, first_row)
            t = epoch_seconds(table[args.time], args.time_unit, args.tz, where)
            check_times(t, args.time_unit, where)
            rows = pa.table({"_user": key_text(table[args.user], args.user, where), "_item": key_text(table[args.item], args.item, where),
                             "_t": pa.array(t), **{f"_y_{lab.name}": pa.array(lab.evaluate(table, where)) for lab in labels}})
            day = t // SECONDS_PER_DAY
            for d in np.unique(day):
                name = (dt.date(1970, 1, 1) + dt.timedelta(days=int(d))).isoformat()
                out = scratch / f"day={name}"
                out.mkdir(parents=True, exist_ok=True)
                write_table(rows.filter(pa.array(day == d)), out / f"chunk-{n:06d}.parquet")
                days.add(name)
            first_row += table.num_rows
            n += 1
    if not days:
        raise RawLogError(f"{files[0] if len(files) == 1 else args.input}: no rows")
    return sorted(days)


def write_table(table: pa.Table, path: Path, **kwargs) -> None:
    """``pq.write_table`` whose OS errors name the file (pyarrow's own say only "Error writing bytes")."""
    with naming(path):
        pq.write_table(table, path, **kwargs)


# ---- 2. per day: ids, negatives, history -------------------------------------------------------


class IdMap:
    """Raw keys (any type, compared as text) → dense ids 0, 1, ... in order of first appearance."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, values: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
        if values.null_count:
            raise RawLogError(f"{where}: {values.null_count} empty key(s)")
        text = pc.cast(values, pa.string())
        uniques = pc.unique(text)
        for key in uniques.to_pylist():  # only the day's distinct keys, in first-appearance order
            self.ids.setdefault(key, len(self.ids))
        id_of = np.fromiter((self.ids[k] for k in uniques.to_pylist()), np.int64, len(uniques))
        return id_of[np.asarray(pc.index_in(text, value_set=uniques))]

    def keys(self) -> list[str]:
        """The raw keys by dense id (for messages)."""
        return list(self.ids)

    def table(self) -> pa.Table:
        return pa.table({"raw": pa.array(list(self.ids)), "id": pa.array(list(self.ids.values()), pa.int64())})


def sample_negatives(users: np.ndarray, excluded: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
                     names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``users`` [N] (dense ids), ``k`` distinct items drawn with probability ∝
    ``weights`` [I] (non-negative integer counts: an item of weight 0 is never drawn), none a
    (user, item) pair of ``excluded`` (sorted keys ``user * I + item``, e.g. the users' positives of
    the day); -> items [N, k] and their sampling probabilities [N, k]. Rejection sampling, redrawing
    only the rejected slots each round, vectorised over rows. A user with fewer than ``k`` items
    left to draw is refused up front, named by ``names[user]`` (default: its dense id)."""
    if k == 0 or users.size == 0:
        return np.zeros((users.size, k), np.int64), np.zeros((users.size, k), np.float32)
    weights = np.asarray(weights)
    if not np.issubdtype(weights.dtype, np.integer) or (weights < 0).any() or weights.sum() == 0:
        raise ValueError("sample_negatives: weights must be non-negative integer counts, not all zero")
    n_items = len(weights)
    drawable = weights > 0
    excluded_users, excluded_items = np.divmod(excluded, n_items)
    room = np.count_nonzero(drawable) - np.bincount(excluded_users[drawable[excluded_items]], minlength=int(users.max()) + 1)
    short = np.flatnonzero(room[users] < k)
    if short.size:
        u = users[short[0]]
        raise RawLogError(f"user {u if names is None else names[u]} has only {room[u]} items to draw from (weight > 0, "
                          f"not excluded), fewer than the {k} negatives asked for; lower --negatives")
    cum = np.cumsum(weights)
    out = np.empty((users.size, k), np.int64)
    todo = np.arange(out.size)  # flat slots still to fill
    for _ in range(10_000):
        out.flat[todo] = np.searchsorted(cum, rng.integers(0, cum[-1], todo.size), side="right")
        rows = np.unique(todo // k)
        draws = out[rows]  # [R, k]
        key = users[rows, None] * n_items + draws
        seen = excluded[np.minimum(np.searchsorted(excluded, key), max(excluded.size - 1, 0))] == key if excluded.size \
            else np.zeros_like(key, bool)
        order = np.argsort(draws, axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(seen)  # a later copy of an item drawn earlier in the row
        np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
        r, c = np.nonzero(seen | repeat)
        todo = rows[r] * k + c
        if todo.size == 0:
            return out, (weights / weights.sum())[out].astype(np.float32)
    raise RawLogError(f"could not draw {k} distinct negatives per row in 10,000 rounds; lower --negatives")


class History:
    """What is known of every user and item at the start of a day: positives on earlier days
    (``seq``), and the previous day's rows and positives per user and item.

    Arrays indexed by dense id, updated a day at a time without a loop over rows: ``seq`` [U, L]
    holds each user's last ``L = seq_len`` positive items, newest first, ``seq_length`` [U] how
    many of them are filled (memory: 8 bytes x U x L)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.seq = np.zeros((0, seq_len), np.int64)
        self.seq_length = np.zeros(0, np.int64)
        self.counts = {k: np.zeros(0, np.int64) for k in ("user_events", "user_positives", "item_events", "item_positives")}
        self.item_positives_total = np.zeros(0, np.int64)
        self.last_day: str | None = None

    def features(self, users: np.ndarray, items: np.ndarray) -> dict[str, pa.Array]:
        """The rows' sequences and 1-day counters, as of the start of the day."""
        def count(name: str, ids: np.ndarray) -> np.ndarray:
            c, out = self.counts[name], np.zeros(ids.size, np.float32)
            known = ids < c.size  # new entities: no history
            out[known] = c[ids[known]]
            return out

        length = np.zeros(users.size, np.int64)
        known = users < self.seq_length.size
        length[known] = self.seq_length[users[known]]
        offsets = np.r_[0, np.cumsum(length)]
        row = np.repeat(np.arange(users.size), length)  # the row each sequence element belongs to
        values = self.seq[users[row], np.arange(offsets[-1]) - offsets[row]]
        seqs = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))
        return {"seq_item_ids": seqs,
                "user_events_1d": count("user_events", users), "user_positives_1d": count("user_positives", users),
                "item_events_1d": count("item_events", items), "item_positives_1d": count("item_positives", items)}

    def start_of_day(self, day: str) -> None:
        """The 1-day counters describe the calendar day before ``day``: zero after a day without rows."""
        if self.last_day is not None and dt.date.fromisoformat(day) - dt.date.fromisoformat(self.last_day) > dt.timedelta(days=1):
            self.counts = {k: np.zeros(0, np.int64) for k in self.counts}

    def end_of_day(self, day: str, users: np.ndarray, items: np.ndarray, positive: np.ndarray, n_users: int, n_items: int) -> None:
        """Takes in the day's logged rows (time order) so that they count from the next day on."""
        self.counts = {
            "user_events": np.bincount(users, minlength=n_users), "user_positives": np.bincount(users[positive], minlength=n_users),
            "item_events": np.bincount(items, minlength=n_items), "item_positives": np.bincount(items[positive], minlength=n_items),
        }
        total = np.zeros(n_items, np.int64)
        total[: self.item_positives_total.size] = self.item_positives_total
        self.item_positives_total = total + self.counts["item_positives"]
        self._append(users[positive], items[positive], n_users)
        self.last_day = day

    def _append(self, users: np.ndarray, items: np.ndarray, n_users: int) -> None:
        """Appends the day's positive (user, item) pairs, in time order, to the users' sequences."""
        grow = n_users - self.seq_length.size
        if grow > 0:
            self.seq = np.concatenate([self.seq, np.zeros((grow, self.seq_len), np.int64)])
            self.seq_length = np.r_[self.seq_length, np.zeros(grow, np.int64)]
        if users.size == 0 or self.seq_len == 0:
            return
        by_user = np.argsort(users, kind="stable")  # each user's items stay in time order
        users, items = users[by_user], items[by_user]
        start = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # first pair of each user (sorted already)
        touched, count = users[start], np.diff(np.r_[start, users.size])
        m = np.arange(self.seq_len)[None, :]  # [1, L] positions, 0 = newest
        fresh = np.minimum(count, self.seq_len)[:, None]  # [A, 1] of today's items that fit
        newest = (start + count - 1)[:, None] - m  # [A, L] index of today's m-th newest item
        older = np.take_along_axis(self.seq[touched], np.clip(m - fresh, 0, None), axis=1)  # shifted back by `fresh`
        self.seq[touched] = np.where(m < fresh, items[np.maximum(newest, 0)], older)
        self.seq_length[touched] = np.minimum(self.seq_length[touched] + count, self.seq_len)


def convert_day(day: str, rows: pa.Table, args: argparse.Namespace, labels: list[Label], users_map: IdMap, items_map: IdMap,
                history: History, rng: np.random.Generator, where: str) -> pa.Table:
    """One day of checked rows (:func:`split_by_day`) → the day's output rows (logged rows and their
    sampled negatives)."""
    history.start_of_day(day)
    rows = rows.take(pc.sort_indices(rows, [("_t", "ascending")]))
    users, items = users_map(rows["_user"], f"{where}: column {args.user!r}"), items_map(rows["_item"], f"{where}: column {args.item!r}")
    t = np.asarray(rows["_t"])
    y = {lab.name: np.asarray(rows[f"_y_{lab.name}"]) for lab in labels}
    first = y[labels[0].name].astype(bool)
    k = args.negatives
    weights = (np.ones(len(items_map), np.int64) if args.sampling == "uniform"
               else np.r_[history.item_positives_total, np.zeros(len(items_map) - history.item_positives_total.size, np.int64)] + 1)
    anchor = np.flatnonzero(first)
    excluded = np.unique(users[first] * len(items_map) + items[first])
    try:
        neg_items, neg_prob = sample_negatives(users[anchor], excluded, weights, k, rng, names=users_map.keys())
    except RawLogError as e:
        raise RawLogError(f"{where}: {e} (or convert without the days with fewer items)") from None
    # logged rows, then each anchor's negatives right after it, at its time
    order_user = np.r_[users, np.repeat(users[anchor], k)]
    order_item = np.r_[items, neg_items.ravel()]
    order_t = np.r_[t, np.repeat(t[anchor], k)]
    position = np.r_[np.arange(t.size, dtype=np.float64), np.repeat(anchor, k) + 0.5]
    order = np.lexsort((position, order_t))
    out_users, out_items, out_t = order_user[order], order_item[order], order_t[order]
    cols: dict[str, pa.Array | np.ndarray] = {"user_id": out_users, "pin_id": out_items, "event_time": out_t}
    for name, v in y.items():
        cols[name] = np.r_[v, np.zeros(anchor.size * k, np.int8)][order]
    cols["sample_prob"] = np.r_[np.full(t.size, np.nan, np.float32), neg_prob.ravel()][order]
    cols["hour_of_day"] = (out_t // 3600 % 24).astype(np.int64)
    cols.update(history.features(out_users, out_items))
    history.end_of_day(day, users, items, first, len(users_map), len(items_map))
    return pa.table(cols)


# ---- 3. the spec and the dataset ---------------------------------------------------------------


def build_spec(source: str, labels: list[str], n_users: int, n_items: int, seq_len: int, dim: int) -> FeatureSpec:
    """The spec of a converted log: ids, hour of day, the positive-item sequence and the counters."""
    return FeatureSpec(
        name=f"rawlog-{source}", keys=Keys(), sources=(Source(source, tuple(labels)),),
        sparse=(SparseFeature("user_id", "user", max(n_users, 1), dim), SparseFeature("pin_id", "pin", max(n_items, 1), dim),
                SparseFeature("hour_of_day", "interaction", 24, dim)),
        sequence=(SequenceFeature("user_seq", "user", max(n_items, 1), dim, seq_len, column="seq_item_ids"),),
        dense=tuple(DenseFeature(name, tower, transform="log1p") for name, tower in (
            ("user_events_1d", "user"), ("user_positives_1d", "user"), ("item_events_1d", "pin"), ("item_positives_1d", "pin"))),
    )


@contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A scratch folder ``.rawlog-*`` beside ``out``, claimed while this process runs
    (``common.files.claim``) and removed after; those of killed conversions are removed first."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    for dead in remove_dead_folders(parent, ".rawlog-*"):
        log.warning("removed %s, left by a conversion that was killed", dead)
    with tempfile.TemporaryDirectory(prefix=".rawlog-", dir=parent) as scratch:
        owner = claim(scratch)
        try:
            yield Path(scratch)
        finally:
            owner.close()


def convert(args: argparse.Namespace) -> dict:
    """Converts ``args.input`` into ``args.out`` (see the module docstring); returns a summary."""
    labels = [Label.parse(t) for t in args.labels]
    if len({lab.name for lab in labels}) != len(labels):
        raise RawLogError(f"--labels: a name appears twice in {args.labels}")
    if args.negatives < 0 or args.seq_len < 1 or args.dim < 4 or args.dim % 4:
        raise RawLogError("--negatives must be >= 0, --seq-len >= 1, --dim a multiple of 4")
    files = input_files(args.input)
    rng = np.random.default_rng(args.seed)
    users, items, history = IdMap(), IdMap(), History(args.seq_len)
    rows_out = 0
    with scratch_dir(Path(args.out)) as scratch, staged_output(args.out, overwrite=args.overwrite) as stage:
        days = split_by_day(files, args, labels, scratch)
        log.info("%s: %d file(s), %d day(s), %s .. %s", args.input, len(files), len(days), days[0], days[-1])
        for day in days:
            raw = pq.read_table(scratch / f"day={day}")
            table = convert_day(day, raw, args, labels, users, items, history, rng, f"{args.input} (day {day})")
            write_part(table, stage, args.source, day, 0)
            rows_out += table.num_rows
            shutil.rmtree(scratch / f"day={day}")
            log.info("day %s: %d logged rows -> %d rows", day, raw.num_rows, table.num_rows)
        spec = build_spec(args.source, [lab.name for lab in labels], len(users), len(items), args.seq_len, args.dim)
        spec.dump(stage / "spec.toml")
        (stage / "ids").mkdir()
        write_table(users.table(), stage / "ids" / "user.parquet")
        write_table(items.table(), stage / "ids" / "item.parquet")
    return {"out": str(args.out), "source": args.source, "files": len(files), "days": len(days), "rows": rows_out, "users": len(users), "items": len(items)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.rawlog", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the raw log: a .csv, .tsv, .parquet or .jsonl file, a folder of such parts "
                   "(names starting with _ or . skipped), or a quoted glob ('logs/day=*/part-*.csv')")
    p.add_argument("--out", required=True, help="dataset root to write (spec.toml, <source>/day=..., ids/)")
    p.add_argument("--source", default="ctr", help="the source's name (default ctr); the pipeline runs one model per source")
    p.add_argument("--user", default="user_id", help="column of the user key")
    p.add_argument("--item", default="item_id", help="column of the item (Pin, ad) key")
    p.add_argument("--time", default="event_time", help="column of the event time")
    p.add_argument("--time-unit", choices=TIME_UNITS, default="s", help="s or ms since the epoch, or iso (ISO 8601)")
    p.add_argument("--tz", default="UTC", help="time zone of ISO times without an offset (default UTC)")
    p.add_argument("--labels", nargs="+", required=True,
                   help="NAME (a 0/1 column), NAME=COLUMN==VALUE, or NAME=1 (every logged row); the first drives "
                        "negatives, sequences and the positive counters")
    p.add_argument("--negatives", type=int, default=0, help="sampled non-interactions per positive row (logs without impressions)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="popularity")
    p.add_argument("--seq-len", type=int, default=32, help="longest positive-item sequence kept per user")
    p.add_argument("--dim", type=int, default=16, help="embedding width of the spec's tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    args = p.parse_args(argv)

    from common.log import setup_logging

    setup_logging()
    try:
        summary = convert(args)
    except (RawLogError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
