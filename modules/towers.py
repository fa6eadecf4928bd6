"""The three towers of the upstream DERM model (paper §3.1, Appendix A).

Every tower first turns its features into tokens of width D (:class:`FeatureTokens`):

- each pooled sparse feature (read from the ``EmbeddingBagCollection`` output by name): one token,
  through its own linear map from the table's width;
- each sequence feature: one token from its :class:`~modules.sequence.SequenceEncoder`;
- the scalar dense features of the tower together (counting features): one token;
- each dense vector (pretrained representations): one token.

The user and Pin towers (:class:`EntityTower`, Appendix A.1/A.2) run a DHEN over their tokens down to
``embedding_tokens`` tokens, flattened and L2-normalised into the entity embedding [B, E]. The
interaction tower (:class:`InteractionTower`, A.3) runs a DHEN over both towers' output tokens plus
the context and interaction features (plus the token-wise product of the two towers' outputs: the
"interactions between the outputs of the above two towers", §3.1), and one MLP head per task gives a
logit. Keeping context
features out of the entity towers is what keeps the embeddings free of it (paper §1, bullet 1).

Glossary: B batch, D token width, E embedding width, T tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import JaggedTensor

from data.spec import FeatureSpec
from modules.config import DERMConfig, DHENConfig
from modules.dhen import DHEN
from modules.sequence import SequenceEncoder


@torch.fx.wrap
def _batch_norm(x, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm``, but a one-row batch in training is normalised with the running statistics
    (left as they are). A leaf for torch.fx, which cannot trace the branch on the batch size."""
    if training and x.shape[0] == 1:
        training = False
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also takes a one-row batch in training, normalising it with the
    running statistics where ``BatchNorm1d`` raises: a day's last batch on a rank can hold a single
    row. Statistics are per rank, as DLRM-style dense layers keep them; with the default per-rank
    batches (hundreds of rows and more) they are stable. (Fixed momentum only.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)


class FeatureTokens(nn.Module):
    """One tower's features -> [B, num_tokens, D] (see the module docstring).

    Args:
        spec: the source's feature spec; only features whose ``tower`` matches are used.
        tower: ``user``, ``pin`` or ``interaction``.
        config: token width and sequence encoder settings.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, spec: FeatureSpec, tower: str, config: DERMConfig, device=None) -> None:
        super().__init__()
        D = config.token_dim
        self.sparse = nn.ModuleDict(
            {f.name: nn.Linear(f.embedding_dim, D, device=device) for f in spec.sparse if f.tower == tower}
        )
        self.sequences = nn.ModuleDict(
            {f.name: SequenceEncoder(f, D, config.sequence, device) for f in spec.sequence if f.tower == tower}
        )
        self.scalar_names = [f.name for f in spec.dense if f.tower == tower and f.width == 1]
        self.scalars = nn.Linear(len(self.scalar_names), D, device=device) if self.scalar_names else None
        self.scalar_norm = (
            BatchNorm(len(self.scalar_names), device=device)
            if self.scalar_names and config.dense_norm == "batch" else nn.Identity()
        )
        self.vectors = nn.ModuleDict(
            {f.name: nn.Linear(f.width, D, device=device) for f in spec.dense if f.tower == tower and f.width > 1}
        )
        self.num_tokens = len(self.sparse) + len(self.sequences) + len(self.vectors) + (1 if self.scalar_names else 0)

    def forward(
        self,
        pooled: dict[str, torch.Tensor],
        sequences: dict[str, JaggedTensor],
        sequence_side: dict[str, dict[str, torch.Tensor]],
        dense: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Pooled embeddings by feature name ([B, d_f] each), sequence embeddings, their side lists
        and dense features ([B, W] each) -> tokens [B, num_tokens, D]."""
        tokens = [proj(pooled[name]) for name, proj in self.sparse.items()]
        tokens += [enc(sequences[name], sequence_side[name]) for name, enc in self.sequences.items()]
        if self.scalars is not None:
            tokens.append(self.scalars(self.scalar_norm(torch.cat([dense[n] for n in self.scalar_names], dim=1))))
        tokens += [proj(dense[name]) for name, proj in self.vectors.items()]
        return torch.stack(tokens, dim=1)


class EntityTower(nn.Module):
    """User or Pin tower: features -> tokens -> DHEN -> ``embedding_tokens`` tokens and the unit
    embedding (their flattening, L2-normalised; Appendix A.1)."""

    def __init__(self, spec: FeatureSpec, tower: str, config: DERMConfig, dhen: DHENConfig, device=None) -> None:
        super().__init__()
        self.inputs = FeatureTokens(spec, tower, config, device)
        if self.inputs.num_tokens == 0:
            raise ValueError(f"the {tower} tower has no features: give some spec features tower = \"{tower}\"")
        self.dhen = DHEN(self.inputs.num_tokens, config.token_dim, dhen, out_tokens=config.embedding_tokens, device=device)
        self.center = (
            BatchNorm(config.embedding_dim, affine=False, device=device) if tower in config.center else nn.Identity()
        )

    def forward(self, pooled, sequences, sequence_side, dense) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [B, embedding_tokens, D], embedding [B, E] with unit L2 norm)."""
        tokens = self.dhen(self.inputs(pooled, sequences, sequence_side, dense))
        return tokens, F.normalize(self.center(tokens.flatten(1)), dim=1)


class InteractionTower(nn.Module):
    """Overall interaction tower (Appendix A.3): DHEN over user tokens, Pin tokens and the context
    and interaction features, then one MLP head per task."""

    def __init__(self, spec: FeatureSpec, config: DERMConfig, num_tasks: int, device=None) -> None:
        super().__init__()
        self.inputs = FeatureTokens(spec, "interaction", config, device)
        num_tokens = 3 * config.embedding_tokens + self.inputs.num_tokens
        self.dhen = DHEN(num_tokens, config.token_dim, config.interaction_dhen, device=device)
        width = self.dhen.output_dim()
        self.heads = nn.ModuleList(
            nn.Sequential(MLP(width, list(config.head_hidden), device=device), nn.Linear(config.head_hidden[-1], 1, device=device))
            if config.head_hidden
            else nn.Linear(width, 1, device=device)
            for _ in range(num_tasks)
        )
        self.has_context = self.inputs.num_tokens > 0

    def forward(self, user_tokens, pin_tokens, pooled, sequences, sequence_side, dense) -> torch.Tensor:
        """-> logits [B, T]."""
        # The towers' outputs, and their token-wise products: summed over D these are the pieces
        # of <user, Pin>, the bilinear interaction an MLP would otherwise have to approximate.
        parts = [user_tokens, pin_tokens, user_tokens * pin_tokens]
        if self.has_context:
            parts.append(self.inputs(pooled, sequences, sequence_side, dense))
        h = self.dhen(torch.cat(parts, dim=1)).flatten(1)
        return torch.cat([head(h) for head in self.heads], dim=1)
