"""Typed configuration of the upstream DERM model (paper §3.1, Appendix A).

Everything that sizes or chooses a part of the model lives here, validated at construction with
``ValueError``s that name the field, so a bad config fails before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIXED_PRECISION_MODES = ("auto", "none", "bf16")
"""``train.mixed_precision``: auto resolves to bf16 or none (``modules.precision``)."""

INTERACTION_MODULES = ("masknet", "transformer", "mlp", "dcn")
MASKNET_MODES = ("serial", "parallel")
DENSE_NORMS = ("none", "batch")


@dataclass(frozen=True)
class DHENConfig:
    """A DHEN stack (Zhang et al. 2022): layers of two feature-interaction modules each."""

    layers: tuple[tuple[str, str], ...] = (("masknet", "transformer"), ("mlp", "transformer"))
    """Per layer, the two modules it ensembles, from masknet, transformer, mlp, dcn (paper §3.1:
    "each layer consisting of two feature interaction modules chosen from Masknet, Transformer and
    MLP"; DCNv2 is allowed as a fourth)."""
    out_tokens: int = 4
    """Tokens the last layer emits (earlier layers keep their input count). The entity towers
    override it with ``DERMConfig.embedding_tokens``."""
    num_heads: int = 2
    """Attention heads of transformer modules (must divide the token width)."""
    mlp_hidden: int = 256
    """Hidden width of mlp modules."""
    masknet_blocks: int = 2
    masknet_block_dim: int = 128
    masknet_mode: str = "serial"
    """serial: MaskBlocks feed each other; parallel: side by side, then an MLP (Wang et al. 2021a)."""
    masknet_reduction: float = 2.0
    """Width of a MaskBlock's mask-aggregation layer, as a multiple of its input width."""
    dcn_layers: int = 2
    dcn_low_rank: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("dhen.layers must name at least one layer")
        for i, pair in enumerate(self.layers):
            if len(pair) != 2 or any(m not in INTERACTION_MODULES for m in pair):
                raise ValueError(f"dhen.layers[{i}] must be two of {INTERACTION_MODULES}, got {pair!r}")
        for name in ("out_tokens", "num_heads", "mlp_hidden", "masknet_blocks", "masknet_block_dim", "dcn_layers", "dcn_low_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"dhen.{name} must be >= 1, got {getattr(self, name)}")
        if self.masknet_mode not in MASKNET_MODES:
            raise ValueError(f"dhen.masknet_mode must be one of {MASKNET_MODES}, got {self.masknet_mode!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dhen.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class SequenceConfig:
    """The transformer encoder over each user sequence (Appendix A.1; PinnerFormer-style)."""

    num_layers: int = 1
    num_heads: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_heads < 1:
            raise ValueError(f"sequence.num_layers and sequence.num_heads must be >= 1, got {self.num_layers}, {self.num_heads}")


@dataclass(frozen=True)
class DERMConfig:
    """The upstream model of one source: towers, heads and the loss."""

    token_dim: int = 32
    """D: width of every token inside the towers."""
    embedding_tokens: int = 2
    """Tokens an entity tower emits; the entity embedding is their flattening, E = tokens x D."""
    user_dhen: DHENConfig = field(default_factory=DHENConfig)
    pin_dhen: DHENConfig = field(default_factory=DHENConfig)
    interaction_dhen: DHENConfig = field(default_factory=lambda: DHENConfig(out_tokens=4))
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    head_hidden: tuple[int, ...] = (64,)
    """Hidden widths of each task head's MLP (one head per label, paper §3.2)."""
    task_weights: tuple[float, ...] = ()
    """BCE weight per label, in the source's label order (default: 1 each)."""
    positive_labels: tuple[str, ...] = ()
    """Labels that make a (user, Pin) pair positive for the contrastive task (default: all)."""
    contrastive_weight: float = 1.0
    """lambda in L = sum_t w_t BCE_t + lambda L_contrastive. 1.0, not 0.1: the BCE heads read the
    same tokens, and at 0.1 they shaped the published embedding alone (docs/model.md,
    "Representation quality")."""
    init_temperature: float = 0.2
    """tau at the start (learned after). 0.2, not CLIP's 0.07 or our earlier 0.1: a low tau lets
    unit embeddings reach large logits while packed in a narrow cone (docs/model.md,
    "Representation quality")."""
    max_inv_temperature: float = 100.0
    """Upper bound of the learned 1/tau (CLIP's 100)."""
    center: tuple[str, ...] = ("pin",)
    """Entity towers (``user``, ``pin``) whose flattened output tokens pass a BatchNorm without
    affine before the unit norm: every dimension centred and scaled over the batch, so that no
    direction common to all entities survives. The Pin tower by default: the sampled softmax cannot
    see a direction shared by every Pin (it adds the same amount to a user's every logit). The
    user tower not: a direction shared by every user is how ``<user, Pin>`` ranks popular Pins
    first (docs/model.md, "Representation quality")."""
    dense_norm: str = "batch"
    """Scalar dense features of each tower before their token map: ``batch`` (a BatchNorm over
    them, so raw counts enter centred and at unit scale) or ``none``."""
    dot_logit: bool = False
    """Add ``a_t <u, v>`` (a learned scale per task times the dot product of the published
    embeddings) to every task's logit, so that the BCE heads train the dot product on the
    impressions themselves, not only through the interaction tower. The in-batch softmax alone
    teaches ``<u, v>`` which Pins a user engages with among all (targeting included); a BCE term
    teaches engagement given the impression, where a log's user x Pin preference is. Measured
    (docs/model.md, "What the towers take up"): beside the softmax it changes little; in place of
    it (``contrastive_weight = 0``) the planted intent and the AUC rise but ``<u, v>`` no longer
    retrieves. A departure from the paper, whose heads read the interaction tower only."""
    logq_correction: bool = True
    """Subtract log of each Pin's estimated in-batch frequency from its logits (Yi et al. 2019)."""
    estimator_buckets: int = 1 << 20
    estimator_alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.token_dim < 4 or self.token_dim % 2:
            raise ValueError(f"token_dim must be an even number >= 4, got {self.token_dim}")
        if self.embedding_tokens < 1:
            raise ValueError(f"embedding_tokens must be >= 1, got {self.embedding_tokens}")
        for name in ("user_dhen", "pin_dhen", "interaction_dhen"):
            heads = getattr(self, name).num_heads
            if self.token_dim % heads:
                raise ValueError(f"{name}.num_heads ({heads}) must divide token_dim ({self.token_dim})")
        if self.token_dim % self.sequence.num_heads:
            raise ValueError(f"sequence.num_heads ({self.sequence.num_heads}) must divide token_dim ({self.token_dim})")
        if any(h < 1 for h in self.head_hidden):
            raise ValueError(f"head_hidden widths must be >= 1, got {self.head_hidden}")
        if any(w < 0 for w in self.task_weights):
            raise ValueError(f"task_weights must be >= 0, got {self.task_weights}")
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")
        if 1.0 / self.init_temperature > self.max_inv_temperature:
            raise ValueError(f"1 / init_temperature ({1.0 / self.init_temperature:g}) exceeds max_inv_temperature ({self.max_inv_temperature:g})")
        if any(e not in ("user", "pin") for e in self.center):
            raise ValueError(f"center names entity towers, user and/or pin; got {list(self.center)}")
        if self.dense_norm not in DENSE_NORMS:
            raise ValueError(f"dense_norm must be one of {DENSE_NORMS}, got {self.dense_norm!r}")

    @property
    def embedding_dim(self) -> int:
        """E: width of the user and Pin embeddings."""
        return self.embedding_tokens * self.token_dim
