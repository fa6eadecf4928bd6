"""Plain-PyTorch stand-ins for TorchRec's embedding collections, for the training benchmark's baseline.

``bench/bench_train.py`` trains the same ``DERMModel`` twice: once with TorchRec's collections
sharded by ``DistributedModelParallel`` (fused row-wise Adagrad in the backward pass), once with these
modules, whose tables are ``nn.EmbeddingBag(sparse=True)`` / ``nn.Embedding(sparse=True)`` updated by
``torch.optim.Adagrad`` (and all-reduced by ``DistributedDataParallel`` on several ranks). They are
built from the same ``EmbeddingBagConfig`` / ``EmbeddingConfig`` lists, initialised the same way
(each config's ``init_fn``: uniform in ±sqrt(1 / rows)) and return exactly what TorchRec's modules
return, so the model code runs unchanged:

- :class:`PlainEmbeddingBagCollection`: ``KeyedJaggedTensor -> KeyedTensor`` (keys: feature names in
  table order, one ``[B, d_f]`` block per feature), like ``EmbeddingBagCollection``;
- :class:`PlainEmbeddingCollection`: ``KeyedJaggedTensor -> dict[str, JaggedTensor]`` (values
  ``[N_f, d]``, the input's lengths), like ``EmbeddingCollection``.

Glossary: B batch, d_f a feature's table width, N_f the number of ids of feature f in the batch.

Example::

    ebc = PlainEmbeddingBagCollection(task.model.ebc.embedding_bag_configs())
    pooled = ebc(batch.sparse).to_dict()          # feature name -> [B, d_f]
    torch.optim.Adagrad(ebc.parameters(), lr=0.05)  # sparse gradients
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


class PlainEmbeddingBagCollection(nn.Module):
    """Pooled tables as ``nn.EmbeddingBag(sparse=True)``, one per config; same output as TorchRec's
    ``EmbeddingBagCollection``.

    Args:
        tables: the table configs (features naming one table share it).
        device: where to allocate the tables.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.tables = list(tables)
        self.embedding_bags = nn.ModuleDict()
        for t in self.tables:
            if t.pooling not in _MODES:
                raise ValueError(f"table {t.name}: pooling {t.pooling} is not supported (sum or mean)")
            bag = nn.EmbeddingBag(
                t.num_embeddings, t.embedding_dim, mode=_MODES[t.pooling], sparse=True, include_last_offset=True, device=device
            )
            with torch.no_grad():
                t.init_fn(bag.weight)
            self.embedding_bags[t.name] = bag
        self.keys = [f for t in self.tables for f in t.feature_names]
        self.widths = [t.embedding_dim for t in self.tables for _ in t.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """KJT (keys include every table's features) -> KeyedTensor of ``[B, d_f]`` blocks."""
        jagged = features.to_dict()
        pooled = [
            self.embedding_bags[t.name](jagged[f].values(), jagged[f].offsets())  # [B, d_f]
            for t in self.tables
            for f in t.feature_names
        ]
        return KeyedTensor(keys=self.keys, length_per_key=self.widths, values=torch.cat(pooled, dim=1))


class PlainEmbeddingCollection(nn.Module):
    """Unpooled tables as ``nn.Embedding(sparse=True)``, one per config; same output as TorchRec's
    ``EmbeddingCollection``.

    Args:
        tables: the table configs (features naming one table share it).
        device: where to allocate the tables.
    """

    def __init__(self, tables: Sequence[EmbeddingConfig], device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.tables = list(tables)
        self.embeddings = nn.ModuleDict()
        for t in self.tables:
            emb = nn.Embedding(t.num_embeddings, t.embedding_dim, sparse=True, device=device)
            with torch.no_grad():
                t.init_fn(emb.weight)
            self.embeddings[t.name] = emb

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """KJT -> feature name -> JaggedTensor (values ``[N_f, d]``, the input's lengths)."""
        jagged = features.to_dict()
        return {
            f: JaggedTensor(values=self.embeddings[t.name](jagged[f].values()), lengths=jagged[f].lengths())
            for t in self.tables
            for f in t.feature_names
        }
