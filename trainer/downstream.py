"""The downstream task of the training job: a CTR or CVR model on DERM embeddings (paper §3.2, §4.1).

The downstream model (``modules.downstream``: an MMoE of DCNv2 experts for ``kind = "ctr"``, a DHEN
for ``kind = "cvr"``) trains on one source's days exactly as an upstream model does (same loop,
sharding, snapshots, evaluation: :mod:`trainer.loop`), with one addition: every batch gets the
configured DERM embeddings joined on before the model sees it. A row of day d reads the versions
published for day d − ``derm.lag_days`` (default 1, no leakage; :mod:`embeddings.features`), from
one feature store per embedding: ``{derm.store_root}/{source}-{entity}`` (embedded) or the Redis
namespace ``{source}-{entity}`` at ``derm.redis_url``. With ``derm.features`` empty the model reads
no DERM embedding at all: the baseline of the paper's lift tables.

Usage (``trainer/main.py --task downstream``; docs/pipeline.md)::

    python trainer/main.py --task downstream --kind=ctr --data.root=runs/demo/data --data.source=ctr \
        --derm.features='["ctr_user", "ctr_pin"]' --derm.store_root=runs/demo/store \
        --train.run_dir=runs/demo/downstream/ctr --days 2026-01-02,2026-01-03 --eval-day 2026-01-04
    python trainer/main.py --task downstream --config downstream.toml --mode incremental --day 2026-01-04
    torchx run -s local_cwd dist.ddp -j 1x2 trainer/main.py -- --task downstream --kind=cvr ...

Outputs in RUN_DIR as for trainer/main.py: snapshots/, tb/, config.toml, summary.json.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data.batch import Batch
from embeddings.features import DERMFeatureJoin, DERMSource
from embeddings.publish import open_store
from modules.downstream import build_downstream
from modules.downstream_config import DERMFeature, DownstreamConfig
from sharding.distributed import DistContext
from trainer.config import DERMJoinConfig, DownstreamRunConfig
from trainer.loop import Trainer, run

log = logging.getLogger("derm.downstream")


class DownstreamTrainer(Trainer):
    """:class:`trainer.loop.Trainer` for a downstream model: builds it, and joins the DERM
    embeddings onto every batch it trains or evaluates on."""

    config: DownstreamRunConfig
    join: DERMFeatureJoin | None
    """Joins the configured embeddings onto each batch; None for the no-DERM baseline."""
    eval_coverage: dict[str, float]
    """Share of the last evaluation's rows that found each embedding."""

    def __init__(self, config: DownstreamRunConfig, ctx: DistContext) -> None:
        self.join = _open_join(config.derm)  # a missing store fails before any model is built
        self.eval_coverage = {}
        super().__init__(config, ctx)

    def _build_task(self) -> tuple[torch.nn.Module, DownstreamConfig]:
        cfg, d = self.config, self.config.derm
        sources = self.join.sources if self.join is not None else []
        features = tuple(DERMFeature(s.name, DERMFeatureJoin.width(s), d.projection_dim, d.standardize) for s in sources)
        model_config = dataclasses.replace(cfg.model, derm=features, derm_similarity=d.similarity_pairs())
        if features:
            log.info("DERM features: %s", ", ".join(f"{f.name} ({f.dim} -> {f.output_dim})" for f in features))
        task = build_downstream(self.spec, self.source, model_config, kind=cfg.kind, device=self.ctx.device,
                                embedding_device=torch.device("meta"))
        return task, model_config

    def describe(self) -> dict:

        return {"model": f"downstream {self.config.kind}", "derm": list(self.config.derm.features)}

    def train_day(self, day: str, start_step: int = 0, max_steps: int = 0) -> dict:
        """:meth:`Trainer.train_day`, plus ``coverage``: per DERM embedding, the share of the
        day's trained rows (all ranks) that found a version."""
        if self.join is not None:
            self.join.reset_counts()
        stats = super().train_day(day, start_step, max_steps)
        if self.join is not None:
            stats["coverage"] = self._coverage()
            log.info("day %s DERM coverage of trained rows: %s", day, _format_coverage(stats["coverage"]))
        return stats

    def evaluate(self, day, tag: str = "eval"):
        """:meth:`Trainer.evaluate`; the share of evaluated rows that found each embedding is
        kept for :meth:`eval_extras`."""
        if self.join is not None:
            self.join.reset_counts()
        metrics = super().evaluate(day, tag)
        if self.join is not None:
            self.eval_coverage = self._coverage()
            log.info("eval %s DERM coverage of evaluated rows: %s", day, _format_coverage(self.eval_coverage))
        return metrics

    def eval_extras(self) -> dict:
        return {"coverage": self.eval_coverage} if self.join is not None else {}

    def _coverage(self) -> dict[str, float]:
        """The join's counts since its last reset, summed over ranks, as shares of the rows."""
        names = list(self.join.found)
        counts = torch.tensor([self.join.rows, *(self.join.found[n] for n in names)], dtype=torch.int64, device=self.ctx.device)
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(counts)
        rows, found = int(counts[0]), counts[1:].tolist()
        return {n: round(f / rows, 5) if rows else float("nan") for n, f in zip(names, found)}

    def _prepare(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if self.join is not None:
                batch.derm = self.join(batch)
            yield batch


def _open_join(d: DERMJoinConfig) -> DERMFeatureJoin | None:
    """The join of ``d``'s embeddings, one feature store each (None when it names none)."""
    sources = []
    for name in d.features:
        store_name = d.store_name(name)
        path = Path(d.store_root) / store_name
        if not d.redis_url and not path.is_dir():  # opening would create it, empty
            raise ValueError(f"derm.features {name}: no feature store at {path} (derm.store_root = {d.store_root!r}); "
                             "publish its embeddings there first (embeddings/daily.py)")
        store = open_store(str(path), d.redis_url or None, store_name)
        source, entity = store_name.split("-")
        pattern = d.version_pattern.replace("{source}", source).replace("{entity}", entity)
        sources.append(DERMSource(name, store, entity, pattern))
    return DERMFeatureJoin(sources, lag_days=d.lag_days) if sources else None


def _format_coverage(coverage: dict[str, float]) -> str:
    return "  ".join(f"{name} {share:.1%}" for name, share in coverage.items())


def run_downstream(config: DownstreamRunConfig, ctx) -> dict:
    """Trains, snapshots and evaluates the downstream model of ``config`` (see :func:`trainer.loop.run`)."""
    return run(config, ctx, DownstreamTrainer)
