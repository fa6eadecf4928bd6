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

1. (:mod:`data.rawlog_input`) :func:`input_files` lists the log's files; :func:`read_batches` streams each in record batches
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
import json
import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.files import claim, os_error_line, remove_dead_folders
from data.rawlog_input import TIME_UNITS, Label, RawLogError, input_files, split_by_day, write_table  # noqa: F401 (the API)
from data.dataset_writer import staged_output, write_part
from data.spec import DenseFeature, FeatureSpec, Keys, SequenceFeature, Source, SparseFeature

log = logging.getLogger("derm.data.rawlog")
SAMPLINGS = ("popularity", "uniform")


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
