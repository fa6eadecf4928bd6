"""The upstream DERM model of one source (paper §3.1, Figure 1, Appendix A) and its train wrapper.

``DERMModel`` reads a :class:`~data.batch.Batch`: the pooled sparse features go through one
``EmbeddingBagCollection`` (all towers' tables, sharded together), the sequences through one
``EmbeddingCollection``; both are constructor arguments, built on ``meta`` and materialised by
``sharding/`` (as TorchRec's DLRM does). Towers read pooled outputs by feature name, since a
sharded collection's key order depends on the plan.

``DERMTrainTask`` adds the loss (``modules.losses.DERMLoss``: weighted BCE per task + λ · the
logQ-corrected in-batch sampled softmax between user and Pin embeddings) and returns
``(loss, output)`` as TorchRec's train pipelines expect.

Glossary: B batch, T tasks (the source's labels), E embedding width.

Example::

    spec = load_spec("runs/data/tiny/spec.toml")
    task = build_derm(spec, "ctr", DERMConfig(), device=torch.device("cpu"))
    loss, (parts, out) = task(batch)       # out.logits [B, T], out.user_embedding [B, E]
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from data.batch import Batch
from data.spec import FeatureSpec
from modules.config import DERMConfig
from modules.embedding_tables import embedding_bag_configs, embedding_configs
from modules.losses import DERMLoss
from modules.precision import MixedPrecision
from modules.towers import EntityTower, InteractionTower


class DERMOutput(NamedTuple):
    logits: torch.Tensor
    """[B, T] one logit per task."""
    user_embedding: torch.Tensor
    """[B, E] unit-norm user embeddings (what the lifecycle publishes)."""
    pin_embedding: torch.Tensor
    """[B, E] unit-norm Pin embeddings."""


class DERMModel(nn.Module):
    """User tower, Pin tower and interaction tower over shared embedding collections.

    Args:
        spec: the feature spec of one source (``FeatureSpec.for_source``); its labels are the tasks.
        config: sizes and module choices.
        ebc: the ``EmbeddingBagCollection`` of the spec's pooled features.
        ec: the ``EmbeddingCollection`` of its sequences (None when it has none).
        device: where to build the dense parameters (``meta`` works).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        config: DERMConfig,
        ebc: EmbeddingBagCollection,
        ec: Optional[EmbeddingCollection] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if len(spec.sources) != 1:
            raise ValueError(f"DERMModel is built for one source; restrict the spec with spec.for_source(name) (it has {spec.source_names})")
        if bool(spec.sequence) != (ec is not None):
            raise ValueError("pass an EmbeddingCollection exactly when the spec has sequence features")
        self.labels = spec.sources[0].labels
        self.ebc, self.ec = ebc, ec
        self.user_tower = EntityTower(spec, "user", config, config.user_dhen, device)
        self.pin_tower = EntityTower(spec, "pin", config, config.pin_dhen, device)
        self.interaction = InteractionTower(spec, config, len(self.labels), device)
        # config.dot_logit: one learned scale per task on <u, v> (unit vectors: [-1, 1]), 1 to start.
        self.dot_scale = nn.Parameter(torch.ones(len(self.labels), device=device)) if config.dot_logit else None

    def forward(self, batch: Batch) -> DERMOutput:
        pooled = self.ebc(batch.sparse).to_dict()  # feature name -> [B, d_f]
        sequences = self.ec(batch.sequence) if self.ec is not None else {}
        inputs = (pooled, sequences, batch.sequence_side, batch.dense)
        # Index, don't unpack: TorchRec's train pipeline traces this forward with the towers as
        # leaf modules, whose tuple outputs are then single FX proxies.
        user = self.user_tower(*inputs)
        pin = self.pin_tower(*inputs)
        logits = self.interaction(user[0], pin[0], *inputs)
        if self.dot_scale is not None:
            logits = logits + (user[1] * pin[1]).sum(1, keepdim=True) * self.dot_scale
        return DERMOutput(logits, user[1], pin[1])


class DERMTrainTask(MixedPrecision, nn.Module):
    """The model plus its loss; ``forward(batch) -> (loss, (parts, output))`` for train pipelines,
    where ``parts`` holds the detached total (``loss``), its terms and the temperature, for logging
    (``TrainPipelineSparseDist.progress`` returns only the second element)."""

    def __init__(self, model: DERMModel, loss: DERMLoss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], DERMOutput]]:
        with self.autocast():  # train.mixed_precision; the loss runs in float32 outside it
            out = self.model(batch)
        loss = self.loss(out.logits, batch.labels, out.user_embedding, out.pin_embedding, batch.pin_id)
        return loss[0], (loss[1], out)  # indexed, not unpacked: see DERMModel.forward


def build_derm(
    spec: FeatureSpec,
    source: str,
    config: DERMConfig,
    device: Optional[torch.device] = None,
    embedding_device: Optional[torch.device] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> DERMTrainTask:
    """The train task of ``source``: embedding collections from the spec, towers, loss.

    Args:
        spec: the feature spec (all sources); the model is built for ``source``.
        source: which source's labels are the tasks.
        config: sizes, module choices and loss settings.
        device: where the dense parts are built (``meta`` too, for planning without memory).
        embedding_device: where the embedding collections are built (default: ``device``);
            ``meta`` to let ``DistributedModelParallel`` allocate only each rank's shards.
        gather: all-gathers Pin ids across ranks for the frequency estimator (identity by
            default); ``sharding.collectives.all_gather_ids`` provides it.
    """
    spec = spec.for_source(source)
    labels = spec.sources[0].labels
    unknown = [l for l in config.positive_labels if l not in labels]
    if unknown:
        raise ValueError(f"positive_labels {unknown} are not labels of source {source!r} ({list(labels)})")
    if config.task_weights and len(config.task_weights) != len(labels):
        raise ValueError(f"task_weights has {len(config.task_weights)} entries; source {source!r} has {len(labels)} labels {list(labels)}")
    tables_on = embedding_device if embedding_device is not None else device
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec), device=tables_on)
    ec = EmbeddingCollection(tables=embedding_configs(spec), device=tables_on) if spec.sequence else None
    model = DERMModel(spec, config, ebc, ec, device)
    loss = DERMLoss(
        num_tasks=len(labels),
        task_weights=config.task_weights or (1.0,) * len(labels),
        contrastive_weight=config.contrastive_weight,
        positive_tasks=[labels.index(l) for l in (config.positive_labels or labels)],
        init_temperature=config.init_temperature,
        max_inv_temperature=config.max_inv_temperature,
        logq_correction=config.logq_correction,
        num_buckets=config.estimator_buckets,
        alpha=config.estimator_alpha,
        gather=gather,
        device=device,
    )
    return DERMTrainTask(model, loss)
