"""Reading a raw log for :mod:`data.rawlog`: its files, their record batches, and the checks every
batch passes before it is split by UTC day — keys read as exact text (:func:`key_text`), labels
exactly 0/1 (:meth:`Label.evaluate`), times as seconds since the epoch (:func:`epoch_seconds`,
:func:`check_times`). Bad input is a :class:`RawLogError` naming the file, the row, the column and
the problem (docs/your-data.md)."""

from __future__ import annotations

import argparse
import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.files import naming

SECONDS_PER_DAY = 86_400
BATCH_ROWS = 65_536
TIME_UNITS = ("s", "ms", "iso")


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
