"""MovieLens ratings as impressions of the input contract: sampled negatives, strictly-earlier
newest-first sequences, bucketed user and movie features, the spec, and ``convert``, which writes
the dataset (docs/movielens.md)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.dataset_writer import staged_output, write_part
from data.movielens.atomic import MovieLens, MovieLensError
from data.movielens.source import read_movielens
from data.rawlog import RawLogError, sample_negatives
from data.spec import DenseFeature, FeatureSpec, Keys, SequenceFeature, SideList, Source, SparseFeature

log = logging.getLogger("derm.data.movielens")

EMBEDDING_DIM = 16  # small tables; a multiple of 4 as FBGEMM requires
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
"""Age bucket edges: MovieLens-1M's seven groups (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+)."""
YEAR_EDGES = np.array([1940, 1950, 1960, 1970, 1980, 1990, 1993, 1995, 1996, 1997, 1998])
"""Release-year bucket edges: decades, finer in the 1990s, where 80% of the movies are. Bucket 0 is
"unknown" (two ML-100K items have no year: 'unkonwn' and 'V'), 1 is before 1940, 12 is 1998 on."""
ZIP_HASH_BUCKETS = 100
"""Non-numeric zip prefixes (Canadian postal codes in ML-100K) are hashed into ids 1000..1099."""
SECONDS_PER_DAY = 86_400


def _vocab_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Strings -> ids by their position in the sorted vocabulary; returns (ids, vocabulary size)."""
    vocab, ids = np.unique(values, return_inverse=True)
    return ids.astype(np.int64), len(vocab)


def _zip3(zip_code: np.ndarray) -> np.ndarray:
    """First three characters of the zip: their number where they are digits (0..999, US zips), else
    FNV-1a (32-bit) of their UTF-8 bytes modulo ``ZIP_HASH_BUCKETS``, plus 1000 (stable across runs,
    unlike Python's ``hash``)."""
    head = np.char.encode(np.char.upper(zip_code), "utf-8").astype("S3")  # (U,) bytes, zero-padded
    numeric = np.char.isdigit(head) & (np.char.str_len(head) == 3)
    b = head.view(np.uint8).reshape(len(head), 3).astype(np.uint64)
    h = np.full(len(head), 2166136261, np.uint64)
    for k in range(3):  # over the three byte positions, not over rows
        h = ((h ^ b[:, k]) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
    hashed = 1000 + (h % ZIP_HASH_BUCKETS).astype(np.int64)
    return np.where(numeric, np.where(numeric, head, b"0").astype(np.int64), hashed)  # "0": parse only digits


def _year_bucket(year: np.ndarray) -> np.ndarray:
    known = np.char.isdigit(year) & (np.char.str_len(year) == 4)
    y = np.where(known, year, "0").astype(np.int64)
    return np.where(known, np.searchsorted(YEAR_EDGES, y, side="right") + 1, 0)


def _genre_ids(genres: pa.ListArray) -> tuple[pa.ListArray, int]:
    """list<string> genres -> list<int64> ids in the sorted genre vocabulary."""
    ids, n = _vocab_ids(genres.flatten().to_numpy(zero_copy_only=False).astype(str))
    return pa.ListArray.from_arrays(genres.offsets, pa.array(ids)), n


def _history(ml: MovieLens, order: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, pa.Array, pa.Array, pa.Array]:
    """Each rating's strictly-earlier ratings by the same user, newest first, at most ``max_seq_len``.

    ``order`` sorts the ratings by (user, time, file position). Returns, in that order, the number
    of strictly-earlier ratings (N,) and list arrays (N,) of their item ids, ratings and ages in days.
    """
    u, t, n = ml.user[order], ml.time[order], len(order)
    idx = np.arange(n)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_second = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))  # first rating of the user
    second_start = np.maximum.accumulate(np.where(new_second, idx, 0))  # first of the user's same second
    n_prior = second_start - user_start  # same-second ratings excluded: they would leak the label
    length = np.minimum(n_prior, max_seq_len)
    offsets = np.r_[0, np.cumsum(length)]
    row = np.repeat(idx, length)  # (sum length,) the rating each sequence element belongs to
    back = np.arange(offsets[-1]) - offsets[row]  # 0 = the newest earlier rating
    pos = order[second_start[row] - 1 - back]  # file positions of the sequence elements

    def lists(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))

    age_days = ((t[row] - ml.time[pos]) / SECONDS_PER_DAY).astype(np.float32)
    return n_prior, lists(ml.item[pos]), lists(ml.rating[pos].astype(np.int32)), lists(age_days)


def _sample_negatives(ml: MovieLens, user_row: np.ndarray, item_row: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(N, K) item rows, distinct within a rating and never rated by its user, drawn by popularity
    (the item's number of ratings in the whole file): ``data.rawlog.sample_negatives``."""
    n_items = len(ml.item_ids)
    rated = np.unique(user_row * n_items + item_row)  # sorted (user, item) pair keys
    try:
        neg, _ = sample_negatives(user_row, rated, np.bincount(item_row, minlength=n_items), k, rng, names=ml.user_ids)
    except RawLogError as e:
        raise MovieLensError(str(e)) from None
    log.info("sampled %d negatives", neg.size)
    return neg


def _count_before(row: np.ndarray, t: np.ndarray, query_row: np.ndarray, query_t: np.ndarray) -> np.ndarray:
    """For each query, the number of (row, t) events with the same row and t strictly earlier.
    Keys pack (row, rank of t) into one int64, so one sorted array answers all queries."""
    times = np.unique(t)
    width = len(times) + 1
    keys = np.sort(row * width + np.searchsorted(times, t))
    lo = np.searchsorted(keys, query_row * width)
    return np.searchsorted(keys, query_row * width + np.searchsorted(times, query_t)) - lo


# ---- the dataset ----------------------------------------------------------------------------------


def build_impressions(ml: MovieLens, negatives: int = 4, max_seq_len: int = 50,
                      seed: int = 0) -> tuple[pa.Table, dict[str, int]]:
    """All R impressions, sorted by event_time (ties: user, file position, the positive first), with
    both labels; and the vocabulary sizes the spec needs."""
    user_row = np.searchsorted(ml.user_ids, ml.user)
    item_row = np.searchsorted(ml.item_ids, ml.item)
    neg = _sample_negatives(ml, user_row, item_row, negatives, np.random.default_rng(seed))

    order = np.lexsort((ml.time, ml.user))  # (user, time, file position): the sequences' order
    n_prior, seq_items, seq_rating, seq_age = _history(ml, order, max_seq_len)
    # (N, 1 + K) -> R rows: the rating's own movie, then its negatives, at the rating's second.
    pin_row = np.concatenate([item_row[order, None], neg[order]], axis=1).ravel()
    of = np.repeat(np.arange(len(order)), 1 + negatives)  # (R,) position in `order`
    positive = np.tile(np.arange(1 + negatives) == 0, len(order))
    by_time = np.argsort(ml.time[order][of], kind="stable")
    of, pin_row, positive = of[by_time], pin_row[by_time], positive[by_time]
    rating_of = order[of]  # (R,) file position of the rating behind each row
    t = ml.time[rating_of]
    u = user_row[rating_of]

    rating = np.where(positive, ml.rating[rating_of], 0).astype(np.int8)
    gender, n_gender = _vocab_ids(ml.gender)
    occupation, n_occupation = _vocab_ids(ml.occupation)
    genres, n_genres = _genre_ids(ml.genres)
    take = pa.array(of)
    cols = {
        "user_id": ml.user_ids[u],
        "pin_id": ml.item_ids[pin_row],
        "event_time": t,
        "click": (rating >= 4).astype(np.int8),
        "conversion": (rating == 5).astype(np.int8),
        "rating": rating,
        "user_age_bucket": np.searchsorted(AGE_EDGES, ml.age, side="right")[u],
        "user_gender": gender[u],
        "user_occupation": occupation[u],
        "user_zip3": _zip3(ml.zip_code)[u],
        "pin_release_year": _year_bucket(ml.release_year)[pin_row],
        "pin_genres": genres.take(pa.array(pin_row)),
        "hour_of_day": t // 3600 % 24,
        "day_of_week": (t // SECONDS_PER_DAY + 3) % 7,  # Monday = 0; 1970-01-01 was a Thursday
        "seq_pin_ids": seq_items.take(take),
        "seq_rating": seq_rating.take(take),
        "seq_age_days": seq_age.take(take),
        "user_num_prior_ratings": n_prior[of].astype(np.float32),
        "pin_num_prior_ratings": _count_before(item_row, ml.time, pin_row, t).astype(np.float32),
    }
    table = pa.table(cols)
    sizes = {"users": int(ml.user_ids[-1]) + 1, "items": int(ml.item_ids[-1]) + 1, "gender": n_gender,
             "occupation": n_occupation, "genres": n_genres}
    return table, sizes


def build_spec(sizes: dict[str, int], max_seq_len: int) -> FeatureSpec:
    """The feature spec of the converted data (vocabulary sizes from :func:`build_impressions`)."""
    d = EMBEDDING_DIM
    sparse = [
        SparseFeature("user_id", "user", sizes["users"], d),
        SparseFeature("user_age_bucket", "user", len(AGE_EDGES) + 1, d),
        SparseFeature("user_gender", "user", sizes["gender"], d),
        SparseFeature("user_occupation", "user", sizes["occupation"], d),
        SparseFeature("user_zip3", "user", 1000 + ZIP_HASH_BUCKETS, d),
        SparseFeature("pin_id", "pin", sizes["items"], d),
        SparseFeature("pin_release_year", "pin", len(YEAR_EDGES) + 2, d),
        SparseFeature("pin_genres", "pin", sizes["genres"], d, multi=True, pooling="mean"),
        SparseFeature("hour_of_day", "interaction", 24, d),
        SparseFeature("day_of_week", "interaction", 7, d),
    ]
    side = (SideList("seq_rating", "seq_rating", "id", num_embeddings=6),
            SideList("seq_age_days", "seq_age_days", "value", transform="log1p"))
    sequence = [SequenceFeature("user_seq", "user", sizes["items"], d, max_seq_len, column="seq_pin_ids", side=side)]
    dense = [DenseFeature("user_num_prior_ratings", "user", transform="log1p"),
             DenseFeature("pin_num_prior_ratings", "pin", transform="log1p")]
    return FeatureSpec(name="movielens-100k", keys=Keys(),
                       sources=(Source("ctr", ("click",)), Source("cvr", ("conversion",))),
                       sparse=tuple(sparse), sequence=tuple(sequence), dense=tuple(dense))


def convert(out_dir: str | Path, source_dir: str | Path | None = None, wheel: str | Path | None = None,
            negatives: int = 4, max_seq_len: int = 50, seed: int = 0, overwrite: bool = False) -> dict:
    """Writes MovieLens-100K (or the atomic files in ``source_dir``) as a DERM dataset in ``out_dir``.

    Args:
        out_dir: dataset root; built in a staging folder and moved there only when complete.
        source_dir: folder with one ``*.inter``, ``*.user`` and ``*.item`` atomic file each.
        wheel: the RecBole 1.2.1 wheel (default: fetched into ``.cache/recbole``).
        negatives: K, sampled negative impressions per rating.
        max_seq_len: L, the longest user sequence kept.
        seed: seed of the negative sampling; equal seeds give identical files.
        overwrite: replace a non-empty ``out_dir``.

    Returns the summary: ratings, users, items, days, rows per source, clicks, conversions.
    """
    if negatives < 0 or max_seq_len < 1:
        raise MovieLensError(f"need negatives >= 0 and max_seq_len >= 1, got {negatives} and {max_seq_len}")
    start = time.perf_counter()
    with staged_output(out_dir, overwrite) as stage:
        ml = read_movielens(source_dir, wheel)
        log.info("read %d ratings of %d users on %d items", len(ml.user), len(ml.user_ids), len(ml.item_ids))
        table, sizes = build_impressions(ml, negatives, max_seq_len, seed)
        build_spec(sizes, max_seq_len).dump(stage / "spec.toml")
        day = table["event_time"].to_numpy() // SECONDS_PER_DAY  # non-decreasing: rows are in time order
        cuts = np.r_[0, np.flatnonzero(np.diff(day)) + 1, len(day)]
        for source, other_label in (("ctr", "conversion"), ("cvr", "click")):
            part = table.drop_columns([other_label])
            for a, b in zip(cuts[:-1], cuts[1:]):
                write_part(part.slice(a, b - a), stage, source, str(np.datetime64(int(day[a]), "D")), 0)
            log.info("wrote %s: %d rows in %d days", source, len(part), len(cuts) - 1)
    summary = {
        "out": str(out_dir), "ratings": len(ml.user), "users": len(ml.user_ids), "items": len(ml.item_ids),
        "days": len(cuts) - 1, "first_day": str(np.datetime64(int(day[0]), "D")),
        "last_day": str(np.datetime64(int(day[-1]), "D")), "rows": {"ctr": len(table), "cvr": len(table)},
        "clicks": int((ml.rating >= 4).sum()), "conversions": int((ml.rating == 5).sum()),
        "negatives": negatives, "max_seq_len": max_seq_len, "seed": seed,
        "mean_seq_len": round(float(pc.mean(pc.list_value_length(table["seq_pin_ids"])).as_py()), 2),
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("summary: %s", summary)
    return summary
