"""Downstream CTR and CVR models that consume DERM embeddings (paper §3.2, Appendix D), and their
train wrapper.

Both read the usual :class:`~data.batch.Batch` (pooled features through an
``EmbeddingBagCollection``, sequences through an ``EmbeddingCollection``, both constructor
arguments as in :mod:`modules.derm`) plus ``derm``, a dict of upstream embeddings published by the
lifecycle: for every :class:`~modules.downstream_config.DERMFeature` ``k`` of the config,
``derm[k]`` [B, E_k] and ``derm[k + "_missing"]`` [B, 1] (1 = the entity has no embedding and the
row is zeros). With no DERM features configured, ``derm`` is never read: the lift tables' baseline.

- :class:`DERMProjection` (Appendix D.1): each embedding, concatenated with its indicator, through
  its own linear map to ``projection_dim`` (or passed through when it is 0); optionally (beyond the
  paper) the cosine of each configured (user, Pin) pair, standardized over the batch.
- :class:`DownstreamCTR` (§3.2): concatenation layer [pooled sparse by name, dense, one sequence
  encoder output per sequence, projected DERM] → :class:`~modules.moe.MixtureOfDCNExperts`
  (per-task softmax gates) → one tower per task.
- :class:`DownstreamCVR` (§3.2: "a similar architecture as the upstream model based on DHEN"):
  :class:`~modules.towers.FeatureTokens` of every tower's features plus one token per DERM
  embedding → :class:`~modules.dhen.DHEN` → one head per task.

Glossary: B batch, T tasks (the source's labels), E_k width of DERM embedding k, P total projected
DERM width, F concatenated width (CTR), D token width, X experts.

Example::

    config = DownstreamConfig(derm=(DERMFeature("ctr_user", 64), DERMFeature("ctr_pin", 64)))
    task = build_downstream(spec, "ctr", config, kind="ctr", device=torch.device("cpu"))
    loss, (parts, out) = task(batch, derm)     # out.logits [B, T], out.gates [B, T, X]
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mlp import MLP

from data.batch import Batch
from data.spec import FeatureSpec
from modules.config import DERMConfig
from modules.dhen import DHEN
from modules.downstream_config import DOWNSTREAM_KINDS, DERMFeature, DownstreamConfig, missing_key
from modules.embedding_tables import embedding_bag_configs, embedding_configs
from modules.losses import MultiTaskBCE
from modules.moe import MixtureOfDCNExperts
from modules.precision import MixedPrecision
from modules.sequence import SequenceEncoder
from modules.towers import FeatureTokens


class DownstreamOutput(NamedTuple):
    logits: torch.Tensor
    """[B, T] one logit per task."""
    gates: Optional[torch.Tensor]
    """[B, T, X] each task's softmax over the experts (CTR); None for the CVR model."""


class DERMProjection(nn.Module):
    """Appendix D.1's projection layer: ``[derm[k], missing_k]`` [B, E_k + 1] → [B, P_k] per embedding.

    The indicator goes into the projection so the model can tell "no embedding" from an embedding
    that happens to be near zero. ``projection_dim = 0`` passes ``[derm[k], missing_k]`` through.

    Args:
        features: the DERM embeddings to read, in order.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, features: tuple[DERMFeature, ...], device=None, similarity: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.norm = nn.ModuleDict({f.name: nn.BatchNorm1d(f.dim, device=device) for f in features if f.standardize})
        self.proj = nn.ModuleDict(
            {f.name: nn.Linear(f.dim + 1, f.projection_dim, device=device) if f.projection_dim else nn.Identity() for f in features}
        )
        self.dims = [f.output_dim for f in features]
        self.similarity = list(similarity)
        self.similarity_norm = nn.BatchNorm1d(len(similarity), device=device) if similarity else None
        if similarity:
            self.dims.append(len(similarity))

    def output_dim(self) -> int:
        """P = Σ_k P_k (+ one per similarity pair)."""
        return sum(self.dims)

    def parts(self, derm: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """``derm`` (see the module docstring) → one [B, P_k] tensor per embedding, in config order,
        then [B, S] of the similarity pairs' cosines when there are any."""
        out = [self.proj[k](torch.cat([self._standardize(k, derm[k]), derm[missing_key(k)]], dim=1)) for k in self.names]
        if self.similarity_norm is not None:
            out.append(self.similarity_norm(self.cosines(derm)))
        return out

    def cosines(self, derm: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S]: cos(derm[user], derm[Pin]) per similarity pair; 0 where either is missing (its
        row is zeros)."""
        return torch.stack([F.cosine_similarity(derm[u], derm[p], dim=1, eps=1e-6) for u, p in self.similarity], dim=1)

    def _standardize(self, name: str, emb: torch.Tensor) -> torch.Tensor:
        return self.norm[name](emb) if name in self.norm else emb

    def forward(self, derm: dict[str, torch.Tensor]) -> torch.Tensor:
        """``derm`` → [B, P], the parts concatenated in config order."""
        return torch.cat(self.parts(derm), dim=1)


class DERMTokens(nn.Module):
    """Projected DERM embeddings as tokens for the CVR model: [B, K, D], one per embedding (a
    linear map P_k → D, the identity when P_k already equals D), plus one token of the similarity
    pairs' cosines when there are any."""

    def __init__(self, features: tuple[DERMFeature, ...], token_dim: int, device=None,
                 similarity: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__()
        self.projection = DERMProjection(features, device, similarity)
        self.tokens = nn.ModuleList(
            nn.Identity() if p == token_dim else nn.Linear(p, token_dim, device=device) for p in self.projection.dims
        )

    def forward(self, derm: dict[str, torch.Tensor]) -> torch.Tensor:
        """``derm`` → [B, K, D]."""
        parts = self.projection.parts(derm)
        return torch.stack([tok(p) for tok, p in zip(self.tokens, parts)], dim=1)


def _task_heads(width: int, hidden: tuple[int, ...], num_tasks: int, device=None) -> nn.ModuleList:
    """One MLP tower per task, each ending in a single logit."""
    return nn.ModuleList(
        nn.Sequential(MLP(width, list(hidden), device=device), nn.Linear(hidden[-1], 1, device=device))
        if hidden
        else nn.Linear(width, 1, device=device)
        for _ in range(num_tasks)
    )


class _Downstream(nn.Module):
    """What both models share: the embedding collections, the DERM features and the labels."""

    def __init__(self, spec: FeatureSpec, config: DownstreamConfig, ebc: Optional[EmbeddingBagCollection], ec: Optional[EmbeddingCollection]) -> None:
        super().__init__()
        if len(spec.sources) != 1:
            raise ValueError(f"downstream models are built for one source; restrict the spec with spec.for_source(name) (it has {spec.source_names})")
        if bool(spec.sparse) != (ebc is not None):
            raise ValueError("pass an EmbeddingBagCollection exactly when the spec has pooled sparse features")
        if bool(spec.sequence) != (ec is not None):
            raise ValueError("pass an EmbeddingCollection exactly when the spec has sequence features")
        self.labels = spec.sources[0].labels
        self.derm_names = [f.name for f in config.derm]
        self.ebc, self.ec = ebc, ec

    def _lookup(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict]:
        pooled = self.ebc(batch.sparse).to_dict() if self.ebc is not None else {}  # name -> [B, d_f]
        sequences = self.ec(batch.sequence) if self.ec is not None else {}
        return pooled, sequences

    def _derm(self, batch: Batch, derm: Optional[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
        """The DERM embeddings to read: ``derm`` when given, else ``batch.derm`` (how TorchRec's
        pipelines, which call ``model(batch)``, deliver them)."""
        # `is None` is an identity test, so it also holds (False) for an FX proxy while tracing.
        if derm is None:
            derm = batch.derm
        if self.derm_names and isinstance(derm, dict):
            missing = [k for k in self.derm_names if k not in derm]
            if missing:
                raise ValueError(f"this model reads DERM embeddings {self.derm_names}; the batch has none of {missing} "
                                 "(join them with embeddings.features.DERMFeatureJoin, or pass derm=)")
        return derm


class DownstreamCTR(_Downstream):
    """The downstream CTR model (§3.2): concatenation layer → MMoE of DCNv2 experts → task towers.

    Args:
        spec: the (restricted) spec of one source; its labels are the tasks.
        config: sizes and the DERM embeddings to read.
        ebc: ``EmbeddingBagCollection`` of the spec's pooled features (None when it has none).
        ec: ``EmbeddingCollection`` of its sequences (None when it has none).
        device: where to build the dense parameters (``meta`` works).
    """

    def __init__(self, spec: FeatureSpec, config: DownstreamConfig, ebc=None, ec=None, device=None) -> None:
        super().__init__(spec, config, ebc, ec)
        self.sparse_names = [f.name for f in spec.sparse]
        self.dense_names = [f.name for f in spec.dense]
        self.sequences = nn.ModuleDict({f.name: SequenceEncoder(f, config.token_dim, config.sequence, device) for f in spec.sequence})
        self.derm = DERMProjection(config.derm, device, config.derm_similarity) if config.derm else None
        width = (
            sum(f.embedding_dim for f in spec.sparse)
            + sum(f.width for f in spec.dense)
            + config.token_dim * len(spec.sequence)
            + (self.derm.output_dim() if self.derm is not None else 0)
        )
        if width == 0:
            raise ValueError("the CTR model has no inputs: give it spec features or DERM embeddings")
        self.input_dim = width  # F
        self.moe = MixtureOfDCNExperts(
            width, len(self.labels), config.num_experts, config.cross_layers, config.low_rank,
            config.expert_hidden, config.cross_mixture, config.gate_hidden, device,
        )
        self.towers = _task_heads(self.moe.output_dim(), config.tower_hidden, len(self.labels), device)

    def forward(self, batch: Batch, derm: Optional[dict[str, torch.Tensor]] = None) -> DownstreamOutput:
        """``batch`` and ``derm`` (see the module docstring) → logits [B, T] and gates [B, T, X]."""
        derm = self._derm(batch, derm)
        pooled, sequences = self._lookup(batch)
        parts = [pooled[name] for name in self.sparse_names]
        parts += [batch.dense[name] for name in self.dense_names]
        parts += [enc(sequences[name], batch.sequence_side[name]) for name, enc in self.sequences.items()]
        if self.derm is not None:
            parts.append(self.derm(derm))
        x = torch.cat(parts, dim=1)  # [B, F]
        # Index, don't unpack: TorchRec's pipeline tracer keeps self.moe a leaf, whose tuple output
        # is then a single FX proxy (see modules/derm.py).
        moe = self.moe(x)
        mixed = moe[0]  # [B, T, H]
        logits = torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)
        return DownstreamOutput(logits, moe[1])


class DownstreamCVR(_Downstream):
    """The downstream CVR model (§3.2): every tower's feature tokens plus one token per DERM
    embedding → DHEN → one head per task. Arguments as :class:`DownstreamCTR`."""

    def __init__(self, spec: FeatureSpec, config: DownstreamConfig, ebc=None, ec=None, device=None) -> None:
        super().__init__(spec, config, ebc, ec)
        # FeatureTokens reads only token_dim and sequence from an upstream config.
        token_config = DERMConfig(token_dim=config.token_dim, sequence=config.sequence)
        towers = {t: FeatureTokens(spec, t, token_config, device) for t in ("user", "pin", "interaction")}
        self.inputs = nn.ModuleDict({t: ft for t, ft in towers.items() if ft.num_tokens > 0})
        self.derm = DERMTokens(config.derm, config.token_dim, device, config.derm_similarity) if config.derm else None
        num_tokens = sum(ft.num_tokens for ft in self.inputs.values()) + (len(self.derm.tokens) if self.derm is not None else 0)
        if num_tokens == 0:
            raise ValueError("the CVR model has no inputs: give it spec features or DERM embeddings")
        self.dhen = DHEN(num_tokens, config.token_dim, config.dhen, device=device)
        self.heads = _task_heads(self.dhen.output_dim(), config.tower_hidden, len(self.labels), device)

    def forward(self, batch: Batch, derm: Optional[dict[str, torch.Tensor]] = None) -> DownstreamOutput:
        """``batch`` and ``derm`` (see the module docstring) → logits [B, T] (gates None)."""
        derm = self._derm(batch, derm)
        pooled, sequences = self._lookup(batch)
        tokens = [ft(pooled, sequences, batch.sequence_side, batch.dense) for ft in self.inputs.values()]
        if self.derm is not None:
            tokens.append(self.derm(derm))
        h = self.dhen(torch.cat(tokens, dim=1)).flatten(1)  # [B, out_tokens * D]
        return DownstreamOutput(torch.cat([head(h) for head in self.heads], dim=1), None)


class DownstreamTrainTask(MixedPrecision, nn.Module):
    """The model plus ``MultiTaskBCE``; ``forward(batch, derm=None) -> (loss, (parts, output))`` like
    :class:`~modules.derm.DERMTrainTask`, with ``parts`` = detached ``loss`` and ``bce/<t>``.
    Without ``derm`` the model reads ``batch.derm``."""

    def __init__(self, model: _Downstream, loss: MultiTaskBCE) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Batch, derm: Optional[dict[str, torch.Tensor]] = None):
        with self.autocast():  # train.mixed_precision; the loss runs in float32 outside it
            out = self.model(batch, derm)
        loss = self.loss(out.logits, batch.labels)
        parts = {"loss": loss[0].detach()}
        parts.update({f"bce/{t}": loss[1][t].detach() for t in range(self.loss.num_tasks)})
        return loss[0], (parts, out)


def restrict_features(spec: FeatureSpec, names: tuple[str, ...]) -> FeatureSpec:
    """``spec`` with only the named sparse, sequence and dense features (all when ``names`` is empty)."""
    if not names:
        return spec
    known = [f.name for f in spec.features()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"features {unknown} are not features of spec {spec.name!r} for this source; it has {known}")
    keep = set(names)
    return dataclasses.replace(
        spec,
        sparse=tuple(f for f in spec.sparse if f.name in keep),
        sequence=tuple(f for f in spec.sequence if f.name in keep),
        dense=tuple(f for f in spec.dense if f.name in keep),
    )


def build_downstream(
    spec: FeatureSpec,
    source: str,
    config: DownstreamConfig,
    kind: str = "ctr",
    device: Optional[torch.device] = None,
    embedding_device: Optional[torch.device] = None,
) -> DownstreamTrainTask:
    """The train task of a downstream model of ``source`` (its ``.model`` is the model).

    Args:
        spec: the feature spec (all sources); restricted to ``source`` and ``config.features``.
        source: whose labels are the tasks and whose batches the model reads.
        config: sizes, feature subset and DERM embeddings.
        kind: ``"ctr"`` (MMoE of DCNv2 experts) or ``"cvr"`` (DHEN); independent of ``source``.
        device: where the dense parts are built (``meta`` too).
        embedding_device: where the embedding collections are built (default: ``device``).
    """
    if kind not in DOWNSTREAM_KINDS:
        raise ValueError(f"kind must be one of {DOWNSTREAM_KINDS}, got {kind!r}")
    spec = restrict_features(spec.for_source(source), config.features)
    labels = spec.sources[0].labels
    if config.task_weights and len(config.task_weights) != len(labels):
        raise ValueError(f"task_weights has {len(config.task_weights)} entries; source {source!r} has {len(labels)} labels {list(labels)}")
    tables_on = embedding_device if embedding_device is not None else device
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec), device=tables_on) if spec.sparse else None
    ec = EmbeddingCollection(tables=embedding_configs(spec), device=tables_on) if spec.sequence else None
    model_cls = DownstreamCTR if kind == "ctr" else DownstreamCVR
    model = model_cls(spec, config, ebc, ec, device)
    return DownstreamTrainTask(model, MultiTaskBCE(config.task_weights or (1.0,) * len(labels)))
