"""Representation quality of the lifecycle's published versions (embeddings/version_quality.py,
``measure_versions``): the pure pieces it adds to embeddings/representation.py, then two days of
the lifecycle on the tiny world, each leaving its report beside the versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings.daily import ENTITIES, run_day
from embeddings.embedded_store import EmbeddedStore
from embeddings.representation import engagement_counts, recall_of_ranked
from embeddings.version_quality import measure_versions, quality_line, quality_path
from tests.distributed import run_ranks

D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"


def test_recall_of_ranked_counts_targets_within_the_cut_off():
    ranked = np.array([[5, 7, 9], [1, 2, -1], [4, 3, 8]])  # -1: a short list's padding
    targets = np.array([7, 1, 6])
    assert recall_of_ranked(ranked, targets, 1) == pytest.approx(1 / 3)
    assert recall_of_ranked(ranked, targets, 2) == pytest.approx(2 / 3)
    assert recall_of_ranked(ranked, targets, 3) == pytest.approx(2 / 3)  # 6 is nowhere
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        recall_of_ranked(ranked, targets, 4)
    with pytest.raises(ValueError, match="targets"):
        recall_of_ranked(ranked, targets[:2], 1)


def test_engagement_counts_ignore_ids_that_are_no_candidates():
    counts = engagement_counts(np.array([10, 20, 30]), np.array([30, 99, 10, 30, 5]))
    assert counts.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="increasing order"):
        engagement_counts(np.array([20, 10]), np.array([10]))


def _run_day(rank: int, world_size: int, snapshot: str, world: str, work: str, day: str, ann: bool) -> dict:
    return run_day(Path(snapshot), Path(world), day, Path(work), "ma", 0.9, ann, 300, "cpu")


@pytest.mark.slow
def test_each_published_day_gets_a_quality_report(tiny_snapshot, tiny_world, tmp_path):
    work = tmp_path / "work"
    run_ranks(_run_day, 1, str(tiny_snapshot), str(tiny_world), str(work), D1, True)  # Pins searched with FAISS
    run_ranks(_run_day, 1, str(tiny_snapshot), str(tiny_world), str(work), D2, False)  # exactly
    first, second = (json.loads(quality_path(work, "cvr", d).read_text()) for d in (D1, D2))

    for report, eval_day in ((first, D2), (second, D3)):
        for entity in ENTITIES:
            q = report[entity]
            info = EmbeddedStore(work / "store" / f"cvr-{entity}").version_info(q["version"])
            assert q["entities"] == q["sampled"] == info.count and q["dim"] == info.dim
            assert -1.0 <= q["mean_pairwise_cosine"] <= 1.0 and 1.0 <= q["effective_rank"] <= q["dim"]
        r = report["retrieval"]
        assert r["eval_day"] == eval_day and 0 < r["queries"] == r["covered"] <= r["positives"]
        assert r["coverage"] == pytest.approx(r["covered"] / r["positives"], abs=1e-6)
        for kind in ("", "popularity_"):
            assert 0.0 <= r[f"{kind}recall_at_10"] <= r[f"{kind}recall_at_100"] <= 1.0
        assert eval_day in quality_line(report)
    assert first["retrieval"]["search"] == "faiss flat" and second["retrieval"]["search"] == "exact"
    assert first["user"]["previous_version"] is None and first["user"]["procrustes_residual"] is None
    assert first["user"]["self_cosine"] is None  # a first pool has nothing to compare with
    for entity in ENTITIES:  # day 2 against day 1, on the entities of both
        q = second[entity]
        assert q["previous_version"] == f"cvr-{entity}-{D1}" and 0 < q["aligned_entities"] <= q["entities"]
        assert 0.0 <= q["procrustes_residual"] < 1.0 and -1.0 <= q["self_cosine"] <= 1.0

    # The FAISS index (flat at this size) and the exact search rank alike.
    shutil.move(work / "ann" / f"cvr-pin-{D1}", tmp_path / "moved")
    exact = measure_versions(work, tiny_world, "cvr", D1)["retrieval"]
    assert exact["search"] == "exact"
    for k in ("recall_at_10", "recall_at_100"):
        assert exact[k] == pytest.approx(first["retrieval"][k], abs=0.02)

    # A finished day is skipped without touching its report; one killed between the publish and
    # the report writes only the report (no process group: this test process has none).
    path = quality_path(work, "cvr", D2)
    stamp = path.stat().st_mtime_ns
    assert _run_day(0, 1, str(tiny_snapshot), str(tiny_world), str(work), D2, False)["skipped"]
    assert path.stat().st_mtime_ns == stamp
    path.unlink()
    assert _run_day(0, 1, str(tiny_snapshot), str(tiny_world), str(work), D2, False)["skipped"]
    assert json.loads(path.read_text()) == second


def test_a_day_without_a_next_one_has_no_retrieval_line():
    entity = {"mean_pairwise_cosine": 0.5, "effective_rank": 3.25, "dim": 8, "procrustes_residual": None}
    line = quality_line({"user": entity, "pin": entity, "retrieval": None})
    assert line == "user cos 0.500 rank 3.2/8 procrustes -; pin cos 0.500 rank 3.2/8 procrustes -; no next day: no retrieval"
