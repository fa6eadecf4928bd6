"""Reading and checking RecBole atomic files (``*.inter``, ``*.user``, ``*.item``: tab-separated,
``name:type`` header) from a folder or from the RecBole wheel; every error names the file, the
column and the problem."""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv


class MovieLensError(ValueError):
    """Input that breaks the contract; the message names the file, the column and the problem."""


@dataclasses.dataclass(frozen=True)
class MovieLens:
    """The three atomic files, parsed and checked. Users and items are sorted by id."""

    user: np.ndarray  # (N,) int64 user id of each rating
    item: np.ndarray  # (N,) int64 item id
    rating: np.ndarray  # (N,) int8 in 1..5
    time: np.ndarray  # (N,) int64 seconds since the epoch
    user_ids: np.ndarray  # (U,) int64, sorted, unique
    age: np.ndarray  # (U,) int64 years
    gender: np.ndarray  # (U,) str
    occupation: np.ndarray  # (U,) str
    zip_code: np.ndarray  # (U,) str
    item_ids: np.ndarray  # (I,) int64, sorted, unique
    release_year: np.ndarray  # (I,) str; not always a number
    genres: pa.ListArray  # (I,) list<string>


def parse_movielens(raw: dict[str, tuple[str, bytes]]) -> MovieLens:
    """The ratings, users and items of ``raw`` (kind -> (file name for messages, its bytes); kinds
    ``inter``, ``user``, ``item``), parsed and checked."""
    users, items = _read_users(*raw["user"]), _read_items(*raw["item"])
    return _read_ratings(*raw["inter"], users, items, raw["user"][0], raw["item"][0])


def _read_users(file: str, data: bytes) -> dict[str, np.ndarray]:
    cols = _read_atomic(file, data, ["user_id", "age", "gender", "occupation", "zip_code"])
    ids = _ints(cols["user_id"], file, "user_id")
    by_id = _unique_order(ids, cols["user_id"], file, "user_id")
    out = {c: _strings(cols[c], file, c)[by_id] for c in ("gender", "occupation", "zip_code")}
    return {"user_ids": ids[by_id], "age": _ints(cols["age"], file, "age")[by_id], **out}


def _read_items(file: str, data: bytes) -> dict[str, np.ndarray | pa.ListArray]:
    cols = _read_atomic(file, data, ["item_id", "release_year", "class"])
    ids = _ints(cols["item_id"], file, "item_id")
    by_id = _unique_order(ids, cols["item_id"], file, "item_id")
    # The year stays text: ML-100K has two items without one ("unkonwn" and "V"), see _year_bucket.
    year = pc.utf8_trim_whitespace(cols["release_year"]).to_numpy(zero_copy_only=False).astype(str)
    genres = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(cols["class"]))  # token_seq: space-separated
    return {"item_ids": ids[by_id], "release_year": year[by_id], "genres": genres.take(pa.array(by_id))}


def _read_ratings(file: str, data: bytes, users: dict, items: dict, user_file: str, item_file: str) -> MovieLens:
    cols = _read_atomic(file, data, ["user_id", "item_id", "rating", "timestamp"])
    if len(cols["user_id"]) == 0:
        raise MovieLensError(f"{file}: no ratings")
    user, item = _ints(cols["user_id"], file, "user_id"), _ints(cols["item_id"], file, "item_id")
    rating = _numbers(cols["rating"], file, "rating")  # RecBole types it float; ML-100K writes whole stars
    _check(~((rating >= 1) & (rating <= 5) & (rating == np.round(rating))), cols["rating"], file, "rating",
           "is not a whole number of stars in 1..5")
    stamp = pc.replace_substring_regex(pc.utf8_trim_whitespace(cols["timestamp"]), r"\.0*$", "")  # "8.0" is 8
    t = _ints(stamp, file, "timestamp", nonnegative=False)
    # Every rating must name a known user and item: nothing is dropped silently.
    for ids, known, col, other in ((user, users["user_ids"], "user_id", user_file),
                                   (item, items["item_ids"], "item_id", item_file)):
        pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        _check(known[pos] != ids, cols[col], file, col, f"is not in {other}")
    return MovieLens(user=user, item=item, rating=rating.astype(np.int8), time=t, **users, **items)


def _read_atomic(file: str, data: bytes, want: Sequence[str]) -> dict[str, pa.Array]:
    """The ``want`` columns of a RecBole atomic file as strings; columns are matched by the name
    before ``:`` in the header (``user_id:token`` is ``user_id``); quotes are plain characters."""
    header = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    names = [h.split(":", 1)[0].strip() for h in header.split("\t")]
    missing = [w for w in want if w not in names]
    if missing:
        raise MovieLensError(f"{file}: missing column(s) {missing}; the header has {names}")
    generic = [f"c{i}" for i in range(len(names))]  # header names may repeat; positions do not
    pick = {w: generic[names.index(w)] for w in want}
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=generic),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(include_columns=list(pick.values()), strings_can_be_null=False,
                                                 column_types={g: pa.string() for g in pick.values()}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise MovieLensError(f"{file}: not a valid tab-separated atomic file: {e}") from None
    return {w: table[g].combine_chunks() for w, g in pick.items()}


def _check(bad: np.ndarray, values: pa.Array, file: str, col: str, problem: str) -> None:
    """Raises naming the first bad row (1-based, counting data rows after the header)."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MovieLensError(f"{file}: column '{col}', row {i + 1}: {values[i].as_py()!r} {problem} "
                             f"({int(bad.sum())} bad row(s) in all)")


def _numbers(values: pa.Array, file: str, col: str) -> np.ndarray:
    text = pc.utf8_trim_whitespace(values)
    _check(~pc.match_substring_regex(text, r"^-?[0-9]+(\.[0-9]*)?$").to_numpy(zero_copy_only=False), values,
           file, col, "is not a number")
    return pc.cast(text, pa.float64()).to_numpy()


def _ints(values: pa.Array, file: str, col: str, nonnegative: bool = True) -> np.ndarray:
    text = pc.utf8_trim_whitespace(values)
    pattern = r"^[0-9]+$" if nonnegative else r"^-?[0-9]+$"
    _check(~pc.match_substring_regex(text, pattern).to_numpy(zero_copy_only=False), values, file, col,
           "is not a non-negative integer" if nonnegative else "is not an integer")
    try:
        return pc.cast(text, pa.int64()).to_numpy()
    except pa.ArrowInvalid as e:
        raise MovieLensError(f"{file}: column '{col}': {e}") from None


def _strings(values: pa.Array, file: str, col: str) -> np.ndarray:
    text = pc.utf8_trim_whitespace(values).to_numpy(zero_copy_only=False).astype(str)
    _check(text == "", values, file, col, "is empty")
    return text


def _unique_order(ids: np.ndarray, values: pa.Array, file: str, col: str) -> np.ndarray:
    """The permutation that sorts ``ids``; raises if an id repeats."""
    order = np.argsort(ids, kind="stable")
    repeat = np.zeros(len(ids), bool)
    repeat[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    _check(repeat, values, file, col, "appears more than once")
    return order
