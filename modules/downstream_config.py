"""Typed configuration of the downstream models that consume DERM embeddings (paper §3.2, Appendix D).

One :class:`DownstreamConfig` sizes both the CTR model (concatenation → MMoE of DCNv2 experts →
task towers) and the CVR model (tokens → DHEN → task heads); fields that only one of them reads say
so. Validated at construction with ``ValueError``s that name the field; which spec features exist is
only known with the spec, so unknown names in ``features`` are refused by
:func:`modules.downstream.build_downstream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modules.config import DHENConfig, SequenceConfig

DOWNSTREAM_KINDS = ("ctr", "cvr")


@dataclass(frozen=True)
class DERMFeature:
    """One upstream DERM embedding a downstream model reads (e.g. ``ctr_user``).

    The model reads ``derm[name]`` ([B, dim] float) and ``derm[name + "_missing"]`` ([B, 1], 1 where
    the entity has no embedding and the row holds zeros).
    """

    name: str
    """Key in the ``derm`` dict: ``{source}_{entity}``, e.g. ``ctr_user``, ``cvr_pin``."""
    dim: int
    """E_k: width of the upstream embedding (``DERMConfig.embedding_dim`` of its source)."""
    projection_dim: int = 32
    """Width after the projection layer (Appendix D.1: cheaper DCNv2, small AUC cost); 0 passes the
    embedding and its indicator through unprojected (E_k + 1 wide)."""
    standardize: bool = False
    """Standardize each dimension of the embedding over the batch (``BatchNorm1d``, running
    statistics at evaluation) before the projection. Daily pooled embeddings are L2-normalized and
    share a large common direction: what tells entities apart is small per-dimension spread that a
    freshly initialised projection cannot see until it has grown large weights."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("derm[].name must be a non-empty key such as 'ctr_user'")
        if self.dim < 1:
            raise ValueError(f"derm[{self.name!r}].dim must be >= 1, got {self.dim}")
        if self.projection_dim < 0:
            raise ValueError(f"derm[{self.name!r}].projection_dim must be >= 0 (0: no projection), got {self.projection_dim}")

    @property
    def output_dim(self) -> int:
        """Width of this embedding after :class:`~modules.downstream.DERMProjection`."""
        return self.projection_dim or self.dim + 1


@dataclass(frozen=True)
class DownstreamConfig:
    """A downstream CTR or CVR model (paper §3.2) and the DERM embeddings it reads."""

    features: tuple[str, ...] = ()
    """Spec features (sparse, sequence or dense) the model may use; empty means all of the source's.
    Production models see a restricted set; unknown names are refused at build time."""
    derm: tuple[DERMFeature, ...] = ()
    """Upstream embeddings to read, in order; empty is the no-DERM baseline of the lift tables."""
    derm_similarity: tuple[tuple[str, str], ...] = ()
    """(user, Pin) pairs of ``derm`` names whose cosine the model also reads, one input per pair
    (standardized over the batch); an extension beyond the paper (:class:`~modules.downstream.DERMProjection`)."""
    token_dim: int = 32
    """D: width of each sequence encoder's output; in the CVR model, of every token."""
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    """The transformer encoder over each user sequence (both models)."""
    # ---- CTR: mixture of DCNv2 experts ---------------------------------------------------------
    num_experts: int = 4
    """X: DCNv2 experts of the MMoE (CTR)."""
    cross_layers: int = 2
    """Cross layers per expert (CTR); cost grows with layers x input width (Appendix D.1)."""
    low_rank: int = 16
    """Rank of each cross layer's weight (CTR); 0: full-rank cross layers (TorchRec's ``CrossNet``)."""
    cross_mixture: int = 0
    """0: ``LowRankCrossNet``; k >= 1: ``LowRankMixtureCrossNet`` with k low-rank experts per layer (CTR)."""
    expert_hidden: tuple[int, ...] = (128,)
    """MLP after each expert's cross net; its last width is the expert output H (CTR)."""
    gate_hidden: tuple[int, ...] = ()
    """Hidden widths of each task's gate before its softmax over experts; empty: softmax(W_t x) (CTR)."""
    # ---- CVR: DHEN backbone --------------------------------------------------------------------
    dhen: DHENConfig = field(default_factory=lambda: DHENConfig(out_tokens=4))
    """The DHEN over all feature tokens and DERM tokens (CVR; as the upstream interaction tower)."""
    # ---- both ----------------------------------------------------------------------------------
    tower_hidden: tuple[int, ...] = (64,)
    """Hidden widths of each task's tower (MLP head, one per label)."""
    task_weights: tuple[float, ...] = ()
    """BCE weight per label, in the source's label order (default: 1 each)."""

    def __post_init__(self) -> None:
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features lists a name twice: {list(self.features)}")
        names = [d.name for d in self.derm]
        if len(set(names)) != len(names):
            raise ValueError(f"derm lists an embedding twice: {names}")
        unknown = [n for pair in self.derm_similarity for n in pair if n not in names]
        if unknown or any(len(pair) != 2 for pair in self.derm_similarity):
            raise ValueError(f"derm_similarity: each entry is a (user, Pin) pair of derm names {names}; got {list(self.derm_similarity)}")
        if self.token_dim < 2 or self.token_dim % 2:
            raise ValueError(f"token_dim must be an even number >= 2, got {self.token_dim}")
        if self.token_dim % self.sequence.num_heads:
            raise ValueError(f"sequence.num_heads ({self.sequence.num_heads}) must divide token_dim ({self.token_dim})")
        if self.token_dim % self.dhen.num_heads:
            raise ValueError(f"dhen.num_heads ({self.dhen.num_heads}) must divide token_dim ({self.token_dim})")
        for name in ("num_experts", "cross_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.low_rank < 0 or (self.low_rank == 0 and self.cross_mixture):
            raise ValueError(f"low_rank must be >= 1, or 0 (full rank) without cross_mixture; got {self.low_rank}")
        if self.cross_mixture < 0:
            raise ValueError(f"cross_mixture must be >= 0 (0: LowRankCrossNet), got {self.cross_mixture}")
        if not self.expert_hidden:
            raise ValueError("expert_hidden must give at least one width (the expert output H)")
        for name in ("expert_hidden", "gate_hidden", "tower_hidden"):
            if any(w < 1 for w in getattr(self, name)):
                raise ValueError(f"{name} widths must be >= 1, got {getattr(self, name)}")
        if any(w < 0 for w in self.task_weights):
            raise ValueError(f"task_weights must be >= 0, got {self.task_weights}")


def missing_key(name: str) -> str:
    """The ``derm`` dict key of embedding ``name``'s missing indicator ([B, 1], 1 = missing)."""
    return f"{name}_missing"
