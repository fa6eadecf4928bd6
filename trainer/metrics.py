"""Evaluation metrics per task: ROC-AUC, PR-AUC, normalised entropy and calibration.

Computed on the predictions of the whole held-out day, gathered from every rank (exact, unlike
TorchRec's windowed ``RecMetric`` AUC, which suits streaming monitoring rather than a day's
evaluation). NE (He et al. 2014) is the mean log loss divided by the entropy of the base rate, so
1.0 means "no better than predicting the average"; calibration is mean prediction / mean label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision


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
    }
