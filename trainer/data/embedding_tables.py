"""Turns a feature spec into TorchRec table configs.

Pooled sparse features become ``EmbeddingBagConfig``s (for an ``EmbeddingBagCollection``) and
sequence features ``EmbeddingConfig``s (for an unpooled ``EmbeddingCollection``). Features that
name the same ``table`` share one config with several ``feature_names``. Table order follows the
spec, so every rank builds the same modules; readers still look pooled outputs up by feature name,
since a sharded collection's key order depends on the plan (TORCHREC-NOTES.md).
"""

from __future__ import annotations

from typing import Iterable

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from trainer.data.spec import FeatureSpec, SequenceFeature, SparseFeature

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _grouped(features: Iterable[SparseFeature | SequenceFeature]) -> dict[str, list]:
    tables: dict[str, list] = {}
    for f in features:
        tables.setdefault(f.table, []).append(f)
    return tables


def embedding_bag_configs(spec: FeatureSpec, towers: Iterable[str] | None = None) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per pooled table of the given towers (default: all)."""
    keep = set(towers) if towers is not None else None
    chosen = [f for f in spec.sparse if keep is None or f.tower in keep]
    return [
        EmbeddingBagConfig(
            name=f"t_{table}",
            num_embeddings=fs[0].num_embeddings,
            embedding_dim=fs[0].embedding_dim,
            feature_names=[f.name for f in fs],
            pooling=_POOLING[fs[0].pooling],
        )
        for table, fs in _grouped(chosen).items()
    ]


def embedding_configs(spec: FeatureSpec, towers: Iterable[str] | None = None) -> list[EmbeddingConfig]:
    """One ``EmbeddingConfig`` per sequence table of the given towers (default: all)."""
    keep = set(towers) if towers is not None else None
    chosen = [f for f in spec.sequence if keep is None or f.tower in keep]
    return [
        EmbeddingConfig(
            name=f"t_{table}",
            num_embeddings=fs[0].num_embeddings,
            embedding_dim=fs[0].embedding_dim,
            feature_names=[f.name for f in fs],
        )
        for table, fs in _grouped(chosen).items()
    ]

