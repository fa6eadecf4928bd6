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

from data.spec import FeatureSpec, SequenceFeature, SparseFeature

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _tables(features: Iterable[SparseFeature | SequenceFeature], towers: Iterable[str] | None) -> dict[str, dict]:
    """Table name -> the config fields its features share (features of the chosen towers only)."""
    keep = set(towers) if towers is not None else None
    grouped: dict[str, list] = {}
    for f in features:
        if keep is None or f.tower in keep:
            grouped.setdefault(f.table, []).append(f)
    return {
        table: dict(name=f"t_{table}", num_embeddings=fs[0].num_embeddings, embedding_dim=fs[0].embedding_dim,
                    feature_names=[f.name for f in fs])
        for table, fs in grouped.items()
    }


def embedding_bag_configs(spec: FeatureSpec, towers: Iterable[str] | None = None) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per pooled table of the given towers (default: all)."""
    pooling = {f.table: _POOLING[f.pooling] for f in spec.sparse}
    return [EmbeddingBagConfig(**fields, pooling=pooling[table]) for table, fields in _tables(spec.sparse, towers).items()]


def embedding_configs(spec: FeatureSpec, towers: Iterable[str] | None = None) -> list[EmbeddingConfig]:
    """One ``EmbeddingConfig`` per sequence table of the given towers (default: all)."""
    return [EmbeddingConfig(**fields) for fields in _tables(spec.sequence, towers).values()]
