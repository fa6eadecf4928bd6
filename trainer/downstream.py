"""Train a downstream CTR or CVR model on DERM embeddings (paper §3.2, §4.1): the TorchX / torchrun
script, and the trainer it runs.

The downstream model (``modules.downstream``: an MMoE of DCNv2 experts for ``kind = "ctr"``, a DHEN
for ``kind = "cvr"``) trains on one source's days exactly as an upstream model does (same loop,
sharding, snapshots, evaluation: :mod:`trainer.loop`), with one addition: every batch gets the
configured DERM embeddings joined on before the model sees it. A row of day d reads the versions
published for day d − ``derm.lag_days`` (default 1, no leakage; :mod:`embeddings.features`), from
one feature store per embedding: ``{derm.store_root}/{source}-{entity}`` (embedded) or the Redis
namespace ``{source}-{entity}`` at ``derm.redis_url``. With ``derm.features`` empty the model reads
no DERM embedding at all: the baseline of the paper's lift tables.

Usage::

    python trainer/downstream.py --kind=ctr --data.root=runs/demo/data --data.source=ctr \\
        --derm.features='["ctr_user", "ctr_pin"]' --derm.store_root=runs/demo/store \\
        --train.run_dir=runs/demo/downstream/ctr --days 2026-01-02,2026-01-03 --eval-day 2026-01-04
    python trainer/downstream.py --config downstream.toml --mode incremental --day 2026-01-04
    torchx run -s local_cwd dist.ddp -j 1x2 trainer/downstream.py -- --kind=cvr ...

Outputs in RUN_DIR as for trainer/main.py: snapshots/, tb/, config.toml, summary.json.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script (torchrun trainer/downstream.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from modules.downstream_config import DOWNSTREAM_KINDS, DERMFeature, DownstreamConfig  # noqa: E402
from sharding.dmp import OptimizerConfig  # noqa: E402
from trainer.config import DataConfig, TrainConfig, check_data_train  # noqa: E402

log = logging.getLogger("derm.downstream")
DERM_NAME = re.compile(r"^(?P<source>[a-z0-9]+)_(?P<entity>user|pin)$")


@dataclass(frozen=True)
class DERMJoinConfig:
    """Which DERM embeddings a downstream model reads, and where they are served from."""

    features: tuple[str, ...] = ()
    """Embeddings to read, each ``{upstream source}_{user|pin}``: any subset of ``ctr_user``,
    ``ctr_pin``, ``cvr_user``, ``cvr_pin`` (Tables 2 and 4). Empty: the no-DERM baseline."""
    store_root: str = ""
    """Folder of embedded feature stores, one per embedding: ``{store_root}/{source}-{entity}``."""
    redis_url: str = ""
    """Read from Redis instead (namespace ``{source}-{entity}``); overrides ``store_root``. No password
    in it: the password comes from ``$DERM_REDIS_PASSWORD`` or the file named by
    ``$DERM_REDIS_PASSWORD_FILE`` (embeddings.redis_store.redis_client)."""
    version_pattern: str = "{source}-{entity}-{day}"
    """Version published for a day (as ``embeddings.publish --version`` was given it)."""
    lag_days: int = 1
    """A row of day d reads the version of day d − lag_days (1: yesterday's, no leakage)."""
    projection_dim: int = 32
    """Width of each embedding after the projection layer (Appendix D.1); 0: no projection."""
    standardize: bool = True
    """Standardize each embedding dimension over the batch before the projection (BatchNorm1d;
    see ``modules.downstream_config.DERMFeature.standardize``). Daily pools share a large common
    direction, and a fresh projection barely sees the small per-dimension spread that tells
    entities apart: without it, the `small` world's CTR model gains nothing from the four
    embeddings (+0.08 ± 0.20 % ROC-AUC over 3 seeds); with it, +7.93 ± 0.67 % (docs/experiments.md,
    "Reading the embeddings")."""
    similarity: bool = False
    """Also give the model the cosine ⟨user, Pin⟩ of each source whose user and Pin embeddings it
    reads (``ctr_user`` with ``ctr_pin``, ``cvr_user`` with ``cvr_pin``): the score the upstream
    model's contrastive task trains. An extension beyond the paper, reported as a row of its own."""

    def __post_init__(self) -> None:
        for name in self.features:
            if not DERM_NAME.match(name):
                raise ValueError(f"derm.features: {name!r} is not {{source}}_{{user|pin}}, e.g. 'ctr_user'")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"derm.features lists a name twice: {list(self.features)}")
        if self.features and not (self.store_root or self.redis_url):
            raise ValueError("derm.features needs derm.store_root (embedded stores) or derm.redis_url")
        if self.redis_url:  # before the config is written to RUN_DIR/config.toml
            from embeddings.redis_store import check_redis_url

            check_redis_url(self.redis_url)
        for key in ("{source}", "{entity}", "{day}"):
            if key not in self.version_pattern:
                raise ValueError(f"derm.version_pattern needs {key}, got {self.version_pattern!r}")
        if self.similarity and not self.similarity_pairs():
            raise ValueError(f"derm.similarity needs a source's user and Pin embeddings both in derm.features, got {list(self.features)}")
        if self.lag_days < 0 or self.projection_dim < 0:
            raise ValueError("derm.lag_days and derm.projection_dim must be >= 0")

    def similarity_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (user, Pin) embedding pairs whose cosine the model reads (empty unless ``similarity``)."""
        if not self.similarity:
            return ()
        sources = dict.fromkeys(DERM_NAME.match(f)["source"] for f in self.features)
        return tuple((f"{s}_user", f"{s}_pin") for s in sources if {f"{s}_user", f"{s}_pin"} <= set(self.features))

    def store_name(self, feature: str) -> str:
        """``ctr_user`` → ``ctr-user``: the store folder or Redis namespace of an embedding."""
        m = DERM_NAME.match(feature)
        return f"{m['source']}-{m['entity']}"


@dataclass(frozen=True)
class DownstreamRunConfig:
    """The run config of a downstream model (TOML sections as :class:`trainer.config.RunConfig`,
    plus ``kind`` and ``[derm]``)."""

    kind: str = "ctr"
    """ctr: the MMoE of DCNv2 experts; cvr: the DHEN model (independent of ``data.source``)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/demo/downstream/ctr"))
    model: DownstreamConfig = field(default_factory=DownstreamConfig)
    derm: DERMJoinConfig = field(default_factory=DERMJoinConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        check_data_train(self.data, self.train)
        if self.kind not in DOWNSTREAM_KINDS:
            raise ValueError(f"kind must be one of {DOWNSTREAM_KINDS}, got {self.kind!r}")
        if self.model.derm or self.model.derm_similarity:
            raise ValueError("set the DERM embeddings with [derm] features and similarity (their widths come from the stores), "
                             "not model.derm or model.derm_similarity")


def _trainer_cls():
    """:class:`DownstreamTrainer`, defined on first use so that ``--help`` and config errors answer
    without importing TorchRec."""
    import torch

    from embeddings.features import DERMFeatureJoin, DERMSource
    from embeddings.publish import open_store
    from modules.downstream import build_downstream
    from trainer.data.batch import Batch
    from trainer.loop import Trainer

    class DownstreamTrainer(Trainer):
        """:class:`trainer.loop.Trainer` for a downstream model: builds it, and joins the DERM
        embeddings onto every batch it trains or evaluates on."""

        def _build_task(self) -> torch.nn.Module:
            cfg: DownstreamRunConfig = self.config
            d = cfg.derm
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
            self.join = DERMFeatureJoin(sources, lag_days=d.lag_days) if sources else None
            self.eval_coverage: dict[str, float] = {}
            features = tuple(DERMFeature(s.name, DERMFeatureJoin.width(s), d.projection_dim, d.standardize) for s in sources)
            self.model_config = dataclasses.replace(cfg.model, derm=features, derm_similarity=d.similarity_pairs())
            if features:
                log.info("DERM features: %s", ", ".join(f"{f.name} ({f.dim} -> {f.output_dim})" for f in features))
            return build_downstream(self.spec, self.source, self.model_config, kind=cfg.kind, device=self.ctx.device,
                                    embedding_device=torch.device("meta"))

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

        def evaluate(self, day):
            """:meth:`Trainer.evaluate`; the share of evaluated rows that found each embedding is
            kept for :meth:`eval_extras`."""
            if self.join is not None:
                self.join.reset_counts()
            metrics = super().evaluate(day)
            if self.join is not None:
                self.eval_coverage = self._coverage()
                log.info("eval %s DERM coverage of evaluated rows: %s", day, _format_coverage(self.eval_coverage))
            return metrics

        def eval_extras(self) -> dict:
            return {"coverage": self.eval_coverage} if self.join is not None else {}

        def _coverage(self) -> dict[str, float]:
            """The join's counts since its last reset, summed over ranks, as shares of the rows."""
            import torch.distributed as dist

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

    return DownstreamTrainer


def _format_coverage(coverage: dict[str, float]) -> str:
    return "  ".join(f"{name} {share:.1%}" for name, share in coverage.items())


def run_downstream(config: DownstreamRunConfig, ctx) -> dict:
    """Trains, snapshots and evaluates the downstream model of ``config`` (see :func:`trainer.loop.run`)."""
    from trainer.loop import run

    return run(config, ctx, _trainer_cls())


def main(argv: list[str] | None = None) -> int:
    from trainer.main import main as train_main

    return train_main(argv, config_cls=DownstreamRunConfig, prog="trainer/downstream.py", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
