"""The aggregation heuristics (paper §3.1, §4.1.1 Table 1, Appendix C.2) and the merge of one bucket.

On day d, for an entity with a daily embedding ``daily_d`` that is already in the pool:

    ACC    pool_d = daily_d                               keep the latest daily embedding
    MA(α)  pool_d = α · pool_{d-1} + (1 − α) · daily_d    α is the weight on the PAST; 0 <= α < 1
    AP     pool_d = (daily_d + last_daily) / 2            last_daily: the entity's previous daily
                                                          embedding, whichever earlier day it was

(The paper's formula lost its symbols in our copy; its text says MA weighs the previous pooled
embedding and the new one, and that more weight on the past works best, Table 1. α = 0 is ACC.)
A new entity enters with its daily embedding (for every heuristic). An entity without a daily
embedding on d keeps its pooled embedding unchanged (carry-over, C.2), until its last daily
embedding is more than ``ttl_days`` days old: kept while ``d − last_day <= ttl_days``, dropped
the day after (C.2: "active in the past three months"; the default TTL is 90 days).

All arithmetic is float32, elementwise, in the order written above, so results are reproducible
bit for bit. Why our own code: pyarrow joins would do the id matching but not the row-wise blend
with carried state, and a bucket's merge is three ``searchsorted`` calls and a few scatters.

Glossary: P rows in the previous pool bucket, M daily entities of the bucket (sorted, unique),
N rows in the new pool bucket, E embedding dimension; days are int32 days since 1970-01-01.
"""

from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("acc", "ma", "ap")


@dataclasses.dataclass(frozen=True)
class Heuristic:
    """An aggregation heuristic; validated on construction (ValueError naming the fix).

    Args:
        method: ``acc``, ``ma`` or ``ap``.
        alpha: MA only: the weight on the previous pooled embedding, in [0, 1); the paper's best is
            the larger weight on the past (e.g. 0.9).
    """

    method: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown aggregation method {self.method!r}; choose one of {list(METHODS)}")
        if self.method == "ma":
            if self.alpha is None:
                raise ValueError("method 'ma' needs alpha, the weight on the previous pooled embedding, in [0, 1)")
            if not 0.0 <= self.alpha < 1.0:  # also refuses NaN
                raise ValueError(f"alpha must be in [0, 1) (the weight on the previous pooled embedding), got {self.alpha}")
        elif self.alpha is not None:
            raise ValueError(f"alpha applies to method 'ma' only, not {self.method!r}")

    def combine(self, prev_emb: np.ndarray, prev_last_daily: np.ndarray, daily: np.ndarray) -> np.ndarray:
        """The new pooled embedding of entities in the pool that have a daily one: (K, E) x3 -> (K, E)."""
        if self.method == "acc":
            return daily.copy()
        if self.method == "ma":
            out = prev_emb * np.float32(self.alpha)
            out += daily * np.float32(1.0 - self.alpha)
            return out
        out = prev_last_daily + daily
        out *= np.float32(0.5)
        return out


@dataclasses.dataclass
class PoolColumns:
    """One bucket of a pool, sorted by entity id.

    ids (N,) int64; embedding (N, E) float32 (the pooled one); last_daily (N, E) float32 (the
    latest daily embedding, which AP needs); last_day, first_day (N,) int32 (days of the latest
    and first daily embedding); updates (N,) int32 (days with a daily embedding).
    """

    ids: np.ndarray
    embedding: np.ndarray
    last_daily: np.ndarray
    last_day: np.ndarray
    first_day: np.ndarray
    updates: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def empty(n: int, dim: int) -> PoolColumns:
        return PoolColumns(np.empty(n, np.int64), np.empty((n, dim), np.float32), np.empty((n, dim), np.float32),
                           np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32))


@dataclasses.dataclass
class Merge:
    """A merged bucket and where its rows came from (for the quality report).

    updated_prev / updated_out: rows of entities with a daily embedding that were in the pool,
    in the previous and the new bucket (K,); carried: entities kept without one; new; expired.
    """

    pool: PoolColumns
    updated_prev: np.ndarray
    updated_out: np.ndarray
    carried: int
    new: int
    expired: int


def merge_bucket(prev: PoolColumns, ids: np.ndarray, daily: np.ndarray, day: int, heuristic: Heuristic, ttl_days: int) -> Merge:
    """Applies day ``day`` to one bucket: blend, carry-over, TTL (module docstring).

    Args:
        prev: the bucket of the previous pool (P rows; empty on the first day).
        ids: (M,) the bucket's daily entity ids, sorted ascending and unique.
        daily: (M, E) their daily embeddings.
    """
    n_prev = len(prev)
    pos = np.searchsorted(prev.ids, ids)  # (M,) where each daily id is, or would be, in prev
    found = np.zeros(len(ids), dtype=bool)
    if n_prev:
        found = (pos < n_prev) & (prev.ids[np.minimum(pos, n_prev - 1)] == ids)
    updated_prev = pos[found]  # (K,) ascending
    has_daily = np.zeros(n_prev, dtype=bool)
    has_daily[updated_prev] = True
    # Only entities without a daily embedding today can expire (an updated one is 0 days old).
    expired = ~has_daily & (day - prev.last_day > ttl_days)
    n_expired = int(expired.sum())
    kept = np.flatnonzero(~expired) if n_expired else None  # None: all of prev (saves a gather)
    kept_ids = prev.ids[kept] if n_expired else prev.ids
    new_rows = np.flatnonzero(~found)
    new_ids = ids[new_rows]

    # Both id lists are sorted and disjoint: a row's place in the merged order is its index plus
    # the number of rows of the other list before it. Every column is then written once by scatter.
    at_kept = np.arange(len(kept_ids)) + np.searchsorted(new_ids, kept_ids)
    at_new = np.arange(len(new_ids)) + np.searchsorted(kept_ids, new_ids)
    out = PoolColumns.empty(len(kept_ids) + len(new_ids), daily.shape[1])
    for name in ("ids", "embedding", "last_daily", "last_day", "first_day", "updates"):
        col = getattr(prev, name)
        getattr(out, name)[at_kept] = col[kept] if n_expired else col
    out.ids[at_new] = new_ids
    out.embedding[at_new] = daily[new_rows]
    out.last_daily[at_new] = daily[new_rows]
    out.last_day[at_new] = day
    out.first_day[at_new] = day
    out.updates[at_new] = 1

    # An updated entity never expires, so its old row is among the kept ones.
    updated_out = at_kept[np.searchsorted(kept, updated_prev)] if n_expired else at_kept[updated_prev]
    todays = daily[found]
    out.embedding[updated_out] = heuristic.combine(prev.embedding[updated_prev], prev.last_daily[updated_prev], todays)
    out.last_daily[updated_out] = todays
    out.last_day[updated_out] = day
    out.updates[updated_out] += 1
    return Merge(out, updated_prev, updated_out, carried=len(kept_ids) - len(updated_prev), new=len(new_ids), expired=n_expired)
