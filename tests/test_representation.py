"""Representation-quality metrics (embeddings/representation.py) on constructed embeddings whose
answer is known: collapsed, isotropic, planted retrieval, rotated versions."""

from __future__ import annotations

import numpy as np
import pytest

from embeddings.representation import effective_rank, mean_pairwise_cosine, popularity_recall_at_k, procrustes_residual, recall_at_k, spread

N, E = 2000, 32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_collapsed_embeddings_score_cosine_one_and_rank_one():
    rng = np.random.default_rng(0)
    common = rng.normal(size=E)
    collapsed = _unit(common + 1e-4 * rng.normal(size=(N, E)))  # every entity the same direction
    assert mean_pairwise_cosine(collapsed) > 0.999
    assert effective_rank(collapsed) < 1.05


def test_a_thin_entity_layer_on_a_common_offset_still_reads_as_collapsed():
    # What issue 11 measured: ~95 % of each embedding's squared norm one shared vector.
    rng = np.random.default_rng(0)
    x = _unit(4.0 * _unit(rng.normal(size=(1, E))) + 0.2 * rng.normal(size=(N, E)))
    assert mean_pairwise_cosine(x) > 0.9
    assert effective_rank(x) < E / 2


def test_isotropic_embeddings_score_cosine_zero_and_full_rank():
    x = _unit(np.random.default_rng(1).normal(size=(N, E)))
    assert abs(mean_pairwise_cosine(x)) < 0.01
    assert effective_rank(x) > 0.9 * E
    s = spread(x, max_rows=500)
    assert abs(s["mean_pairwise_cosine"]) < 0.02 and s["effective_rank"] > 0.8 * E


def test_planted_retrieval_has_recall_one_and_popularity_its_own_floor():
    rng = np.random.default_rng(2)
    pins = _unit(rng.normal(size=(500, E)))
    targets = rng.integers(0, 500, 300)
    users = pins[targets] + 0.01 * rng.normal(size=(300, E))  # each user next to its Pin
    assert recall_at_k(users, targets, pins, k=1) == 1.0
    assert recall_at_k(-users, targets, pins, k=10) == 0.0  # pointing away: never in the top 10
    counts = np.zeros(500)
    counts[targets[:100]] = 1000  # the first 100 pairs' Pins are the most engaged
    assert popularity_recall_at_k(targets[:100], counts, k=100) == 1.0
    assert popularity_recall_at_k(targets, counts, k=500) == 1.0  # every Pin is in a top-500 of 500


def test_procrustes_residual_ignores_rotations_and_sees_changes():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(N, E))
    rotation, _ = np.linalg.qr(rng.normal(size=(E, E)))
    assert procrustes_residual(a, a @ rotation) < 1e-10
    assert procrustes_residual(a, rng.normal(size=(N, E))) > 0.9


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        mean_pairwise_cosine(np.array([[np.nan, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_cosine(np.ones((1, 4)))
    with pytest.raises(ValueError, match="row indices"):
        recall_at_k(np.ones((2, 4)), np.array([0, 9]), np.ones((3, 4)), k=1)
    with pytest.raises(ValueError, match="same shape"):
        procrustes_residual(np.ones((3, 4)), np.ones((2, 4)))


def test_embedding_quality_of_an_eval_day():
    """The trainer's summary of a day: distinct entities (an entity's last row), positives'
    recall among the day's distinct Pins, and the popularity floor."""
    import torch

    from trainer.metrics import embedding_quality

    g = torch.Generator().manual_seed(0)
    pins = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    pin_ids = torch.randint(0, 50, (400,), generator=g) * 7 + 3  # raw keys, not row indices
    user_ids = torch.randint(0, 80, (400,), generator=g)
    pin_emb = pins[(pin_ids - 3) // 7]
    positive = torch.rand(400, generator=g) < 0.3
    user_emb = torch.where(positive.unsqueeze(1), pin_emb, torch.nn.functional.normalize(torch.randn(400, 16, generator=g), dim=1))
    counts = torch.zeros(len(pin_ids.unique()))
    q = embedding_quality(user_emb, pin_emb, user_ids, pin_ids, positive, counts)
    assert q["recall_at_10"] == 1.0  # every positive user sits on its Pin
    assert q["positives"] == int(positive.sum()) and q["pins"] == len(pin_ids.unique())
    assert 0 <= q["popularity_recall_at_10"] <= q["popularity_recall_at_100"] == 1.0  # 100 >= the day's Pins
    assert abs(q["pin_mean_pairwise_cosine"]) < 0.2 and q["pin_effective_rank"] > 8
