"""Logistic regression over a source's features: the floor a DERM model has to beat.

One weight per id of every sparse and sequence feature (an ``nn.EmbeddingBag`` of width 1 per
feature, summed; sequences as bags of their ids) and one per dense value, plus a bias, per task::

    logit_t = b_t + Σ_f Σ_{id ∈ row_f} w_{t,f}[id] + Σ_k v_{t,k} x_k

No crosses: what it cannot express — user × Pin affinity — is what the towers are for.

Glossary: B batch, T tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from data.batch import Batch
from data.spec import FeatureSpec


class LogisticRegression(nn.Module):
    """Per-task logistic regression over every feature of a one-source spec."""

    def __init__(self, spec: FeatureSpec, device=None) -> None:
        super().__init__()
        if len(spec.sources) != 1:
            raise ValueError("LogisticRegression is built for one source; use spec.for_source(name)")
        T = len(spec.sources[0].labels)
        self.sparse = nn.ModuleDict(
            {f.name: nn.EmbeddingBag(f.num_embeddings, T, mode="sum", include_last_offset=True, device=device) for f in spec.sparse}
        )
        self.sequences = nn.ModuleDict(
            {f.name: nn.EmbeddingBag(f.num_embeddings, T, mode="mean", include_last_offset=True, device=device) for f in spec.sequence}
        )
        self.dense_names = [f.name for f in spec.dense]
        width = sum(f.width for f in spec.dense)
        self.dense = nn.Linear(width, T, device=device) if width else None
        self.bias = nn.Parameter(torch.zeros(T, device=device))
        for bag in [*self.sparse.values(), *self.sequences.values()]:
            nn.init.zeros_(bag.weight)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits [B, T]."""
        logit = self.bias.expand(batch.batch_size, -1)
        for kjt, bags in ((batch.sparse, self.sparse), (batch.sequence, self.sequences)):
            jagged = kjt.to_dict()
            for name, bag in bags.items():
                jt = jagged[name]
                logit = logit + bag(jt.values(), jt.offsets())
        if self.dense is not None:
            logit = logit + self.dense(torch.cat([batch.dense[n] for n in self.dense_names], dim=1))
        return logit
