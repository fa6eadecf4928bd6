"""The encoder of one user sequence (paper Appendix A.1, B.1: "user sequence features ... onsite
engagement sequences and offsite conversion sequences"; transformer encoders as in Zhuang et al.).

The unpooled embeddings of a sequence (from an ``EmbeddingCollection``, newest first) are projected
to tokens, enriched with their side lists — categorical ones (action type) through a small embedding
table, numeric ones (age of the event, recency) through a linear map — and a learned position per
slot, then read by a transformer encoder through a learned summary token prepended at position 0::

    h_k = W x_k + Σ_side E_side[a_k] + Σ_value w_value · r_k + P_{k+1}        k = 0 .. L−1
    out = LayerNorm( Encoder([c + P_0, h_0, ..., h_{L−1}], padding masked)[0] )

The summary token is never masked, so an empty sequence (a new user) still yields a defined token.

Glossary: B batch, L max_length, d the table's embedding width, D token width.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from data.spec import SequenceFeature
from modules.attention import TransformerEncoder
from modules.config import SequenceConfig


class SequenceEncoder(nn.Module):
    """One sequence feature -> one token.

    Args:
        feature: the spec of the sequence (its table width, ``max_length`` and side lists).
        token_dim: D.
        config: encoder depth, heads, dropout.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, feature: SequenceFeature, token_dim: int, config: SequenceConfig, device=None) -> None:
        super().__init__()
        self.max_length = feature.max_length
        self.proj = nn.Linear(feature.embedding_dim, token_dim, device=device)
        self.side_ids = nn.ModuleDict(
            {s.name: nn.Embedding(s.num_embeddings, token_dim, device=device) for s in feature.side if s.kind == "id"}
        )
        self.side_values = nn.ModuleDict(
            {s.name: nn.Linear(1, token_dim, device=device) for s in feature.side if s.kind == "value"}
        )
        self.summary = nn.Parameter(torch.randn(token_dim, device=device) * 0.02)
        self.position = nn.Parameter(torch.randn(feature.max_length + 1, token_dim, device=device) * 0.02)
        self.encoder = TransformerEncoder(config.num_layers, token_dim, config.num_heads, 2 * token_dim, config.dropout, device)
        self.norm = nn.LayerNorm(token_dim, device=device)

    def forward(self, sequence: JaggedTensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sequence``: B jagged rows of d-wide embeddings; ``side[name]``: [B, L] -> [B, D]."""
        x = self.proj(sequence.to_padded_dense(desired_length=self.max_length))  # [B, L, D]
        for name, table in self.side_ids.items():
            x = x + table(side[name])
        for name, linear in self.side_values.items():
            x = x + linear(side[name].unsqueeze(-1))
        summary = self.summary.expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([summary, x], dim=1) + self.position  # [B, L + 1, D]
        slots = torch.arange(self.max_length, device=x.device)
        padding = slots.unsqueeze(0) >= sequence.lengths().unsqueeze(1)  # [B, L], True = no item
        mask = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)
        return self.norm(self.encoder(x, mask, num_queries=1)[:, 0])  # only the summary token is read
