"""The day's quality report: coverage and day-to-day stability of a pool (paper Appendix C.2).

Each bucket contributes a ``BucketStats`` (counts, and the cosine similarities between pool_d and
pool_{d-1} as an exact sum and a histogram), stored with the bucket, so buckets computed by
different processes add up to the same report as one process computing them all.

Report fields (all counts are entities):

    pool_size, prev_pool_size   rows of pool_d and of the previous snapshot
    daily_rows, daily_entities  the day's input rows and distinct ids (duplicates_dropped = the
                                difference; the row with the latest event_time is kept)
    new_entities                daily entities not in the previous pool (they enter as is)
    updated_entities            daily entities already in the previous pool
    carried_over                pool entities without a daily embedding today, kept unchanged
    expired                     pool entities dropped by the TTL today
    coverage                    updated_entities / daily_entities: the share of today's entities
                                the pool already had (None on an empty day)
    cos_mean, cos_p10           cos(pool_d, pool_{d-1}) over entities in both (updated + carried;
                                a carried entity counts as exactly 1)
    cos_updated_mean, _p10      the same over updated entities only, where the heuristic acts

``pool_size = prev_pool_size - expired + new_entities`` always. The pool holds exactly the
entities with a daily embedding in the last ``ttl_days`` days (plus today) since its first day,
so "pool size / distinct entities seen in the TTL window" is 1 by construction and not reported.
Means are exact (float64 sums); p10 is read off a histogram of 20,000 bins over [-1, 1) and
one for exactly 1 (a bin's centre, so within 5e-5): the smallest value with at least 10 % of the
entities at or below it. A zero vector has cosine 0 with anything.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

COS_BINS = 20_000  # over [-1, 1); bin COS_BINS holds cosines of exactly 1 (unchanged embeddings)
_BIN = 2.0 / COS_BINS


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity: (K, E) x (K, E) -> (K,) float64 in [-1, 1]."""
    dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64) * np.einsum("ij,ij->i", b, b, dtype=np.float64))
    out = np.zeros(len(a))
    np.divide(dot, norms, out=out, where=norms > 0)
    return np.clip(out, -1.0, 1.0)


@dataclasses.dataclass
class BucketStats:
    """One bucket's share of the report (module docstring); JSON-serialisable via ``asdict``."""

    daily_rows: int = 0
    daily_entities: int = 0
    prev_pool_size: int = 0
    pool_size: int = 0
    new_entities: int = 0
    updated_entities: int = 0
    carried_over: int = 0
    expired: int = 0
    cos_updated_sum: float = 0.0
    cos_updated_hist: dict[str, int] = dataclasses.field(default_factory=dict)  # bin index -> count, non-zero bins only

    def add_cosines(self, cos: np.ndarray) -> None:
        """Records the cosines of the updated entities: (K,) in [-1, 1]."""
        self.cos_updated_sum = float(np.sum(cos))
        bins = np.where(cos >= 1.0, COS_BINS, np.minimum(((cos + 1.0) / _BIN).astype(np.int64), COS_BINS - 1))
        idx, counts = np.unique(bins, return_counts=True)
        self.cos_updated_hist = {str(i): int(c) for i, c in zip(idx, counts)}


def day_report(stats: list[BucketStats], header: dict) -> dict:
    """Adds up the buckets' stats into the day's report (``header`` first: source, day, method...)."""
    total = {f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(BucketStats)
             if f.name not in ("cos_updated_sum", "cos_updated_hist")}
    hist = np.zeros(COS_BINS + 1, dtype=np.int64)
    for s in stats:
        for i, c in s.cos_updated_hist.items():
            hist[int(i)] += c
    cos_sum = math.fsum(s.cos_updated_sum for s in stats)
    updated, carried = total["updated_entities"], total["carried_over"]
    both = hist.copy()
    both[-1] += carried  # carried entities: pool_d == pool_{d-1}, cosine exactly 1
    report = {
        **header,
        **total,
        "duplicates_dropped": total["daily_rows"] - total["daily_entities"],
        "coverage": _ratio(updated, total["daily_entities"]),
        "cos_entities": updated + carried,
        "cos_mean": _ratio(cos_sum + carried, updated + carried),
        "cos_p10": _quantile(both, 0.1),
        "cos_updated_mean": _ratio(cos_sum, updated),
        "cos_updated_p10": _quantile(hist, 0.1),
    }
    return report


def _ratio(num: float, den: int) -> float | None:
    return round(num / den, 6) if den else None


def _quantile(hist: np.ndarray, q: float) -> float | None:
    n = int(hist.sum())
    if not n:
        return None
    k = max(1, math.ceil(q * n))  # the k-th smallest value
    b = int(np.searchsorted(np.cumsum(hist), k))
    return 1.0 if b == COS_BINS else round(-1.0 + (b + 0.5) * _BIN, 5)
