"""Evaluation metrics per task: ROC-AUC, PR-AUC, normalised entropy and calibration; and the
representation quality of an upstream model's embeddings (:func:`embedding_quality`).

Computed on the predictions of the whole held-out day, gathered from every rank (exact, unlike
TorchRec's windowed ``RecMetric`` AUC, which suits streaming monitoring rather than a day's
evaluation). NE (He et al. 2014) is the mean log loss divided by the entropy of the base rate, so
1.0 means "no better than predicting the average"; calibration is mean prediction / mean label.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from embeddings.representation import popularity_recall_at_k, recall_at_k, spread


def binary_metrics(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """``pred`` probabilities and ``label`` 0/1, both [N] -> the task's metrics (NaN where a
    metric is undefined, e.g. AUC with one class)."""
    label = label.float()
    n, rate = label.numel(), label.mean().item() if label.numel() else float("nan")
    both = 0 < rate < 1
    logloss = F.binary_cross_entropy(pred.clamp(1e-7, 1 - 1e-7), label).item() if n else float("nan")
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if both else float("nan")
    return {
        "roc_auc": binary_auroc(pred, label.long()).item() if both else float("nan"),
        "pr_auc": binary_average_precision(pred, label.long()).item() if both else float("nan"),
        "ne": logloss / entropy if both else float("nan"),
        "calibration": pred.mean().item() / rate if n and rate > 0 else float("nan"),
        "positive_rate": rate,
        "count": n,
        "positives": int(label.sum().item()),
    }


def embedding_quality(
    user: torch.Tensor,
    pin: torch.Tensor,
    user_ids: torch.Tensor,
    pin_ids: torch.Tensor,
    positive: torch.Tensor,
    popularity: Optional[torch.Tensor] = None,
    ks: tuple[int, ...] = (10, 100),
) -> dict[str, float]:
    """Representation quality of an upstream model's embeddings on an evaluation day
    (:mod:`embeddings.representation`; issue 11).

    Args:
        user, pin: [N, E] the rows' user and Pin embeddings.
        user_ids, pin_ids: [N] int64 the rows' entity keys (an entity's last row stands for it).
        positive: [N] bool, rows whose pair engaged (any positive label).
        popularity: [P] engagement counts of the day's distinct Pins (in ``pin_ids.unique()``
            order) from before the day, for the popularity ranking; None leaves it out.
        ks: recall cut-offs.

    Returns:
        ``user_`` / ``pin_`` ``mean_pairwise_cosine`` and ``effective_rank`` over distinct
        entities; ``recall_at_<k>``: the share of positive rows whose Pin is among the k distinct
        Pins of the day nearest the user's embedding (exact inner-product search), and
        ``popularity_recall_at_<k>`` beside it; ``positives`` and ``pins`` (the candidates).
    """
    out: dict[str, float] = {}
    users, pins = _last_per_entity(user_ids), _last_per_entity(pin_ids)  # (distinct ids, row of each)
    for name, emb, (_, rows) in (("user", user, users), ("pin", pin, pins)):
        if len(rows) >= 2:
            for k, v in spread(emb[rows].double().numpy()).items():
                out[f"{name}_{k}"] = v
    distinct, pin_rows = pins
    targets = torch.searchsorted(distinct, pin_ids[positive]).numpy()
    queries = user[positive].double().numpy()
    candidates = pin[pin_rows].double().numpy()
    out.update(positives=int(positive.sum()), pins=len(distinct))
    for k in ks:
        if len(queries):
            out[f"recall_at_{k}"] = round(recall_at_k(queries, targets, candidates, k), 5)
            if popularity is not None:
                out[f"popularity_recall_at_{k}"] = round(popularity_recall_at_k(targets, popularity.numpy(), k), 5)
    return out


def _last_per_entity(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct ids [U], the index of each one's last row [U])."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    last = torch.full((len(distinct),), -1, dtype=torch.int64)
    last.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amax")
    return distinct, last
