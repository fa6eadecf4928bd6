"""Representation quality of published entity embeddings: do different entities get different
vectors, and do those vectors carry the signal (paper §3.1, §4.1; issue 11)?

The lifecycle's day report (:mod:`embeddings.quality`) compares each entity with its own earlier
version, so a space in which *every* entity points the same way scores perfectly there. These
metrics look across entities and at the task:

- **spread**: :func:`mean_pairwise_cosine` of random pairs of *different* entities (≈ 1 when the
  embeddings have collapsed onto a common direction, ≈ 0 for isotropic ones) and
  :func:`effective_rank` (exp of the entropy of the normalised singular values; 1 for a rank-one
  set, E for an isotropic one; Roy & Vetterli 2007);
- **retrieval**: :func:`recall_at_k`, the share of positive (user, Pin) pairs whose Pin is among
  the k Pins nearest the user's embedding (or :func:`recall_of_ranked` on the result of a search
  done elsewhere), beside :func:`popularity_recall_at_k`, the same for a ranking of Pins by an
  engagement count (:func:`engagement_counts`; the floor an embedding must beat);
- **alignment**: :func:`procrustes_residual` between two versions of the same entities after the
  best orthogonal map, so that a retrain which merely rotates the space is told from one that
  changes it.

All take numpy arrays and are pure: no files, no process groups.

Glossary: N entities, E embedding width, Q queries, P candidate Pins, k cut-off.
"""

from __future__ import annotations

import numpy as np


def _rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{what} must be a non-empty [N, E] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds non-finite values")
    return x


def mean_pairwise_cosine(emb: np.ndarray, pairs: int = 100_000, seed: int = 0) -> float:
    """Mean cosine of ``pairs`` random pairs of different rows of ``emb`` [N, E] (N >= 2)."""
    x = _rows(emb, "emb")
    if len(x) < 2:
        raise ValueError("mean_pairwise_cosine needs at least two entities")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), pairs)
    j = (i + rng.integers(1, len(x), pairs)) % len(x)  # never i itself
    norms = np.linalg.norm(x, axis=1)
    ok = (norms[i] > 0) & (norms[j] > 0)
    cos = np.einsum("ij,ij->i", x[i[ok]], x[j[ok]]) / (norms[i[ok]] * norms[j[ok]])
    return float(cos.mean()) if len(cos) else 0.0


def effective_rank(emb: np.ndarray) -> float:
    """exp(H(σ / Σσ)) of the singular values σ of ``emb`` [N, E], uncentred: a common offset
    shared by every entity counts as one dominant direction, which is the collapse to detect."""
    s = np.linalg.svd(_rows(emb, "emb"), compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def recall_at_k(queries: np.ndarray, targets: np.ndarray, candidates: np.ndarray, k: int) -> float:
    """Share of queries whose target is among the ``k`` candidates of highest inner product.

    Args:
        queries: [Q, E] user embeddings, one per positive pair.
        targets: [Q] int, each pair's Pin as a row index into ``candidates``.
        candidates: [P, E] the Pin embeddings searched (exactly, by inner product).
        k: cut-off (at most P counts).
    """
    q, c = _rows(queries, "queries"), _rows(candidates, "candidates")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(q),) or (targets < 0).any() or (targets >= len(c)).any():
        raise ValueError(f"targets must be [{len(q)}] row indices into the {len(c)} candidates")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits, step = 0, max(1, min(4096, (1 << 24) // len(c)))  # [step, P] scores at a time: <= 128 MB
    for start in range(0, len(q), step):
        scores = q[start : start + step] @ c.T
        own = scores[np.arange(len(scores)), targets[start : start + step]]
        # Rank of the target = candidates scoring strictly higher; ties count in its favour.
        hits += int(((scores > own[:, None]).sum(axis=1) < k).sum())
    return hits / len(q)


def recall_of_ranked(ranked: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of queries whose target is among the first ``k`` of their ranked candidates: recall@k
    of a search done elsewhere (a FAISS index, :mod:`embeddings.ann`).

    Args:
        ranked: [Q, K] candidate ids per query, best first (K >= k; -1 pads a short list).
        targets: [Q] each query's target id.
        k: cut-off.
    """
    ranked, targets = np.asarray(ranked), np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (len(ranked),):
        raise ValueError(f"ranked must be [Q, K] and targets [Q], got {ranked.shape} and {targets.shape}")
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"k must be in [1, {ranked.shape[1]}] (the ranked lists' length), got {k}")
    if not len(targets):
        raise ValueError("recall_of_ranked needs at least one query")
    return float((ranked[:, :k] == targets[:, None]).any(axis=1).mean())


def engagement_counts(candidates: np.ndarray, engaged: np.ndarray) -> np.ndarray:
    """[P] how often each of the sorted candidate ids ``candidates`` [P] occurs in ``engaged`` [R]
    (ids not among the candidates are ignored): the counts a popularity ranking orders by."""
    candidates, engaged = np.asarray(candidates), np.asarray(engaged)
    if candidates.ndim != 1 or (np.diff(candidates) <= 0).any():
        raise ValueError("candidates must be a 1-D array of distinct ids in increasing order")
    engaged = engaged[np.isin(engaged, candidates)]
    return np.bincount(np.searchsorted(candidates, engaged), minlength=len(candidates))


def popularity_recall_at_k(targets: np.ndarray, counts: np.ndarray, k: int) -> float:
    """Recall@k of one ranking for every query: candidates by ``counts`` [P] (e.g. the previous
    day's engagements), ties broken by index. ``targets`` [Q] are row indices as in
    :func:`recall_at_k`."""
    counts = np.asarray(counts, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = np.argsort(-counts, kind="stable")[:k]
    return float(np.isin(targets, top).mean()) if len(targets) else 0.0


def procrustes_residual(previous: np.ndarray, current: np.ndarray) -> float:
    """‖current − previous·R‖_F / ‖current‖_F for the orthogonal R that minimises it (Schönemann
    1966): 0 when ``current`` [N, E] is a rotation of ``previous`` [N, E] (same entities, same
    row order), near 1 when it is unrelated."""
    a, b = _rows(previous, "previous"), _rows(current, "current")
    if a.shape != b.shape:
        raise ValueError(f"previous and current must have the same shape, got {a.shape} and {b.shape}")
    u, _, vt = np.linalg.svd(a.T @ b)
    residual = b - a @ (u @ vt)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(residual) / norm) if norm > 0 else 0.0


def spread(emb: np.ndarray, max_rows: int = 20_000, seed: int = 0) -> dict[str, float]:
    """``mean_pairwise_cosine`` and ``effective_rank`` of ``emb`` [N, E], on at most ``max_rows``
    rows drawn at random (the SVD is O(N·E²))."""
    x = _rows(emb, "emb")
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    return {"mean_pairwise_cosine": round(mean_pairwise_cosine(x, seed=seed), 6), "effective_rank": round(effective_rank(x), 3)}
