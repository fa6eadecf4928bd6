"""Representation quality of a day's published user and Pin versions (issue 11; paper §3.1, §4.1):
spread, day-to-day alignment and next-day retrieval, measured on what the lifecycle published
(:mod:`embeddings.daily` calls :func:`write_quality` after publishing; docs/lifecycle.md,
"Representation quality of a published day"). The metrics themselves are
:mod:`embeddings.representation`'s.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.files import write_json_atomic
from embeddings.daily import ENTITIES, ann_dir, store_dir, version_name

if TYPE_CHECKING:
    from data.spec import FeatureSpec
    from embeddings.embedded_store import EmbeddedStore

log = logging.getLogger("derm.embeddings.quality")
QUALITY_ROWS = 20_000
"""Entities sampled per version for spread and alignment, and next-day positives for retrieval:
keeps the SVDs and searches of the quality report to seconds at any pool size."""
RECALL_KS = (10, 100)


def quality_path(work: Path, source: str, day: str) -> Path:
    """The representation-quality report of the day's user and Pin versions (:func:`measure_versions`)."""
    return Path(work) / "quality" / source / f"day={day}.json"


def write_quality(work: Path, data: Path, source: str, day: str) -> dict:
    """Measures the day's versions (:func:`measure_versions`), writes the report to
    :func:`quality_path` whole or not at all, and logs it in one line."""
    report = measure_versions(work, data, source, day)
    write_json_atomic(quality_path(work, source, day), report)
    log.info("%s %s quality: %s", source, day, quality_line(report))
    return report


def quality_line(report: dict) -> str:
    """The report as one log line."""
    def num(v, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    parts = [f"{e} cos {num(report[e]['mean_pairwise_cosine'])} rank {num(report[e]['effective_rank'], '.1f')}/{report[e]['dim']}"
             f" procrustes {num(report[e]['procrustes_residual'])}" for e in ENTITIES]
    r = report["retrieval"]
    if r is None:
        parts.append("no next day: no retrieval")
    else:
        parts.append(f"{r['eval_day']} recall@10 {num(r['recall_at_10'])} @100 {num(r['recall_at_100'])} (popularity "
                     f"{num(r['popularity_recall_at_10'])} / {num(r['popularity_recall_at_100'])}) on {r['queries']} of "
                     f"{r['positives']} positives ({r['search']})")
    return "; ".join(parts)


def measure_versions(work: Path, data: Path, source: str, day: str, max_rows: int = QUALITY_ROWS, seed: int = 0) -> dict:
    """Representation quality of the published user and Pin versions of ``day``
    (:mod:`embeddings.representation`; docs/lifecycle.md, "Representation quality of a published day").

    Per entity: ``mean_pairwise_cosine`` and ``effective_rank`` (of ``dim``) of the version, and
    ``procrustes_residual`` against the entity's previous version on the entities in both (None on
    the first version), each on at most ``max_rows`` entities drawn at random; ``self_cosine``, the
    pool report's ``cos_mean`` (each entity against its own previous vector). ``retrieval`` (None
    when the data has no later day): for the next day's positive pairs (any label > 0.5) whose user
    and Pin are in the versions, at most ``max_rows`` of them, recall@k of the Pin among every Pin of
    the version by cosine to the user's vector (through the version's FAISS index when it was
    built, else exactly), beside the same for Pins ranked by their positives on ``day``.
    """
    from data.loader import day_partitions
    from data.spec import load_spec
    from embeddings.embedded_store import EmbeddedStore
    from embeddings.pool import read_pool, snapshot_dir

    rng = np.random.default_rng(seed)
    report: dict = {"source": source, "day": day}
    stores, ids = {}, {}
    for entity in ENTITIES:
        stores[entity] = EmbeddedStore(store_dir(work, source, entity))
        # The version is the pool snapshot published as is: its ids are the pool's.
        ids[entity] = np.sort(read_pool(work / "pool", source, entity, day, columns=["entity_id"])["entity_id"].to_numpy())
        report[entity] = _version_quality(stores[entity], source, entity, day, ids[entity], max_rows, rng)
        # Beside the rotation-aware residual, the pool's own day-to-day cosine (docs/lifecycle.md).
        pool_report = json.loads((snapshot_dir(work / "pool", source, entity, day) / "report.json").read_text())
        report[entity]["self_cosine"] = pool_report["cos_mean"]
    spec = load_spec(Path(data) / "spec.toml")
    later = [d for d in day_partitions(Path(data) / source, spec.keys.day) if d > day]
    report["retrieval"] = (_retrieval(work, data, spec, source, day, later[0], stores, ids, max_rows, rng)
                           if later else None)
    return report


def _version_quality(store: EmbeddedStore, source: str, entity: str, day: str, ids: np.ndarray, max_rows: int,
                     rng: np.random.Generator) -> dict:
    from embeddings.representation import procrustes_residual, spread

    version, previous = version_name(source, entity, day), _previous_version(store, source, entity, day)
    sample = _sample(ids, max_rows, rng)
    emb, _ = store.get(sample, version=version)  # [S, E]
    out = {"version": version, "entities": len(ids), "dim": store.version_info(version).dim, "sampled": len(sample),
           "mean_pairwise_cosine": None, "effective_rank": None,
           "previous_version": previous, "aligned_entities": 0, "procrustes_residual": None}
    if len(sample) >= 2:
        out.update(spread(emb, max_rows))
    if previous is not None:
        before, found = store.get(sample, version=previous)
        out["aligned_entities"] = int(found.sum())
        if found.sum() >= 2:
            out["procrustes_residual"] = round(procrustes_residual(before[found], emb[found]), 6)
    return out


def _retrieval(work: Path, data: Path, spec: FeatureSpec, source: str, day: str, eval_day: str,
               stores: dict[str, EmbeddedStore], ids: dict[str, np.ndarray],
               max_rows: int, rng: np.random.Generator) -> dict:
    from embeddings.representation import engagement_counts, popularity_recall_at_k, recall_at_k, recall_of_ranked

    users, pins = _positive_pairs(data, spec, source, eval_day)
    known = np.flatnonzero(np.isin(users, ids["user"]) & np.isin(pins, ids["pin"]))
    rows = _sample(known, max_rows, rng)
    out = {"eval_day": eval_day, "positives": len(users), "covered": len(known),
           "coverage": round(len(known) / len(users), 6) if len(users) else None, "queries": len(rows),
           "pins": len(ids["pin"]), "search": None}
    out.update({f"{kind}recall_at_{k}": None for kind in ("", "popularity_") for k in RECALL_KS})
    if not len(rows):
        return out
    queries, _ = stores["user"].get(users[rows], version=version_name(source, "user", day))  # [Q, E]
    targets = np.searchsorted(ids["pin"], pins[rows])  # [Q] rows of ids["pin"]
    index_dir = ann_dir(work, source, day)
    if index_dir.is_dir():
        from embeddings.ann import AnnIndex

        index = AnnIndex.load(index_dir)
        ranked, _ = index.search(queries, max(RECALL_KS))  # [Q, 100] Pin ids, best first
        recall = lambda k: recall_of_ranked(ranked, pins[rows], k)  # noqa: E731
        out["search"] = f"faiss {index.kind}"
    else:
        candidates, _ = stores["pin"].get(ids["pin"], version=version_name(source, "pin", day))  # [P, E]
        # By cosine, as the index ranks: a moving-average pool shrinks norms unevenly.
        norms = np.linalg.norm(candidates, axis=1, keepdims=True)
        candidates = np.divide(candidates, norms, out=np.zeros_like(candidates), where=norms > 0)
        recall = lambda k: recall_at_k(queries, targets, candidates, k)  # noqa: E731
        out["search"] = "exact"
    _, engaged = _positive_pairs(data, spec, source, day)
    counts = engagement_counts(ids["pin"], engaged)  # [P] positives of each Pin on the day itself
    for k in RECALL_KS:
        out[f"recall_at_{k}"] = round(recall(k), 5)
        out[f"popularity_recall_at_{k}"] = round(popularity_recall_at_k(targets, counts, k), 5)
    return out


def _previous_version(store: EmbeddedStore, source: str, entity: str, day: str) -> str | None:
    prefix = version_name(source, entity, "")
    earlier = [v[len(prefix):] for v in store.versions()
               if v.startswith(prefix) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", v[len(prefix):]) and v[len(prefix):] < day]
    return version_name(source, entity, max(earlier)) if earlier else None


def _positive_pairs(data: Path, spec: FeatureSpec, source: str, day: str) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [R], Pin ids [R]) of the rows of ``day`` with any label > 0.5."""
    import pyarrow.dataset as ds

    keys = spec.keys
    positive = functools.reduce(operator.or_, (ds.field(label) > 0.5 for label in spec.source(source).labels))
    table = ds.dataset(Path(data) / source / f"{keys.day}={day}", format="parquet").to_table(
        columns=[keys.user, keys.pin], filter=positive)
    return (table[keys.user].to_numpy().astype(np.int64, copy=False),
            table[keys.pin].to_numpy().astype(np.int64, copy=False))


def _sample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` elements of ``x``, drawn without replacement, in their order in ``x``."""
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]
