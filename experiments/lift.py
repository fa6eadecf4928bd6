"""The paper's offline experiments on our data (paper §4.1, Appendix D, E.1): how much DERM
embeddings lift the downstream CTR and CVR models, by aggregation heuristic (Table 1), by which of
the four embeddings they read (Tables 2 and 4) and by projection width (Appendix D.1); and, beyond
the paper, with the cosine of each source's user and Pin embedding as an input of its own.

A **protocol** file (``experiments/protocols/<dataset>.toml``, or ``--protocol``) says which days
play which part and what every cell shares, so the same protocol runs on any dataset with ctr and
cvr sources. One process per dataset and seed runs the project's own components in-process (the
daily pipeline, :mod:`pipeline.driver`, runs the same steps as TorchX jobs):

1. **Upstream.** The ctr and cvr DERM models (:class:`trainer.loop.Trainer`) train day by day over
   the upstream days; after each embedding day, that day's users and Pins are embedded with the
   model as it then stands (``embeddings.infer.infer_day``), as the daily job does with that day's
   snapshot (``--embed back``: every day with the last model instead, Appendix B.3).
2. **Pools and stores.** Each embedding's daily outputs are aggregated day by day
   (``embeddings.aggregate.aggregate_day``; MA with α = 0.9 for all four, and for ``cvr_user`` also
   ACC, MA α ∈ {0.5, 0.99} and AP) and every day's pool is published as a version of an embedded
   feature store (``embeddings.publish.publish``).
3. **Downstream cells.** Each cell trains a fresh downstream model (:mod:`trainer.downstream`)
   incrementally, one pass a day, over the downstream training days — a row of day d reads the
   versions of day d − 1 — and is evaluated after each on the validation days (the learning curve)
   and on the next day, before training on it (progressive validation: where the world drifts,
   its gap to the oracle shows convergence), then on the test days. It trains once per pair of
   the protocol's tuning grid (dense and sparse learning rates); the validation days pick one,
   the test days report it. The baseline is the same model without DERM embeddings,
   with the same seed, data, steps and grid.

Results go to ``OUT/results.jsonl`` (one line per cell, every tuning run inside it; a re-run skips
the cells already there, so an interrupted run resumes), TensorBoard runs to ``OUT/seed=S/**/tb``.
``experiments/report.py`` turns them into the markdown report with plots.

Usage::

    python experiments/lift.py --dataset small --seeds 0,1,2 --out runs/experiments/small
    python experiments/lift.py --dataset movielens --seeds 0,1,2 --out runs/experiments/ml-100k
    python experiments/lift.py --dataset mylog --data /data/mylog --protocol mylog.toml --out runs/experiments/mylog
    python experiments/lift.py --dataset tiny --seeds 0 --out /tmp/lift --cells baseline,table2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

log = logging.getLogger("derm.experiments")

ALL4 = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
DEFAULT_POOL = ("ma", 0.9)
TABLE1_POOLS = (("acc", None), ("ma", 0.5), ("ma", 0.9), ("ma", 0.99), ("ap", None))

VARIANTS = {"full_rank": {"model": {"low_rank": 0}}, "raw": {"derm": {"standardize": False}}}
"""Config overrides of the ``reading`` table's cells."""
PROTOCOLS = Path(__file__).resolve().parent / "protocols"
NEXT_DAY_METRICS = ("roc_auc", "oracle_roc_auc", "positives", "count")
"""What the progressive curve keeps of each next day's metrics per label."""
REPO = Path(__file__).resolve().parents[1]

@dataclass(frozen=True)
class Cell:
    """One downstream model of one table."""

    table: str
    """baseline, table1, table2, table4 or appendix_d."""
    kind: str
    """ctr or cvr: which downstream model (and source)."""
    derm: tuple[str, ...]
    pool: tuple[str, float | None] = DEFAULT_POOL
    """Aggregation of ``cvr_user`` (Table 1 varies it; the others always read the default pools)."""
    projection_dim: int = 32
    similarity: bool = False
    """Also read the cosine ⟨user, Pin⟩ of each source's pair (the ``similarity`` table: an
    extension beyond the paper, ``derm.similarity``)."""
    variant: str = ""
    """A way of reading the embeddings (:data:`VARIANTS`; the ``reading`` table's ablation)."""

    @property
    def name(self) -> str:
        pool = "" if self.pool == DEFAULT_POOL else f"-{_pool_name(self.pool)}"
        derm = "+".join(self.derm) or "none"
        return (f"{self.table}-{self.kind}-{derm}{pool}-p{self.projection_dim}{'-sim' if self.similarity else ''}"
                f"{'-' + self.variant if self.variant else ''}")


def cells() -> list[Cell]:
    """Every cell of the four tables, baselines first (each lift divides by its seed's baseline)."""
    out = [Cell("baseline", "ctr", ()), Cell("baseline", "cvr", ())]
    out += [Cell("table1", "cvr", ("cvr_user",), pool) for pool in TABLE1_POOLS]
    for derm in [("ctr_user",), ("cvr_user",), ("ctr_user", "ctr_pin"), ("ctr_user", "cvr_user"), ("cvr_user", "cvr_pin"), ALL4]:
        out.append(Cell("table2", "ctr", derm))
    for derm in [("cvr_user", "cvr_pin"), ("ctr_user", "ctr_pin", "cvr_user"), ALL4]:
        out.append(Cell("table4", "cvr", derm))
    # Appendix D's width 32 is Table 2's last row (the default projection): not trained twice.
    out += [Cell("appendix_d", "ctr", ALL4, projection_dim=p) for p in (0, 8, 16, 64)]
    # What the downstream side needs to read the embeddings (issue 12): full-rank crosses (and the
    # baseline with them, its own reference); the raw embeddings into the projections, without
    # the standardization that derm.standardize (default on) puts before them.
    out += [Cell("reading", "ctr", (), variant="full_rank"), Cell("reading", "ctr", ALL4, variant="full_rank"),
            Cell("reading", "ctr", ALL4, variant="raw"), Cell("reading", "cvr", ALL4, variant="raw")]
    # Beyond the paper: the same embeddings plus the cosine of each source's user and Pin.
    out += [Cell("similarity", "ctr", ("ctr_user", "ctr_pin"), similarity=True), Cell("similarity", "ctr", ALL4, similarity=True),
            Cell("similarity", "cvr", ALL4, similarity=True)]
    return out


@dataclass(frozen=True)
class Protocol:
    """Which days play which part, and the settings every cell shares: a protocol file
    (``experiments/protocols/<dataset>.toml``, or ``--protocol``), so that the same protocol runs
    on any dataset with ctr and cvr sources. Days are Python slices (``"1:-2"``) of the dataset's
    sorted days."""

    name: str
    description: str
    upstream_days: list[str]
    """Trained by the upstream models, day by day, in order."""
    embed_days: list[str]
    """Days whose embeddings are inferred, aggregated and published (version d after day d)."""
    train_days: list[str]
    """Downstream training days: one incremental pass each, a row of day d reading version d − 1."""
    validation_days: list[str]
    """Where the learning curve is drawn and every choice (the tuning grid) is made."""
    test_days: list[str]
    """Reported, never used for a choice."""
    downstream_features: tuple[str, ...]
    upstream_steps_per_day: int
    upstream_batch_size: int
    downstream_batch_size: int
    dense_lr: tuple[float, ...]
    """The dense optimizer's learning rates of the tuning grid (:attr:`grid`)."""
    sparse_lr: tuple[float, ...]
    """The embedding tables' (fused optimizer's) learning rates of the tuning grid."""
    min_positives: int
    """A label with fewer positives on the test days is reported as "too few positives (n)"."""

    @property
    def upstream_overrides(self) -> dict[str, Any]:
        return {"data": {"batch_size": self.upstream_batch_size}, "train": {"max_steps_per_day": self.upstream_steps_per_day}}

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The tuning grid: every ``(dense_lr, sparse_lr)`` pair. Every cell, baseline included,
        trains once per pair; the validation days pick one (same budget for every cell)."""
        return [(d, s) for d in self.dense_lr for s in self.sparse_lr]

    @property
    def next_days(self) -> list[tuple[str, str]]:
        """``(training day, the protocol's next day)`` pairs of the progressive validation: each
        training day is followed by the next training day, the last one by the first validation
        day (the next day in the protocol's lists, which is the next calendar day where the
        slices leave no gap)."""
        return list(zip(self.train_days, self.train_days[1:] + self.validation_days[:1]))

    @property
    def downstream_overrides(self) -> dict[str, Any]:
        return {"data": {"batch_size": self.downstream_batch_size}}

    def check(self) -> None:
        """Refuses a split that would choose or report on a trained day, or read an embedding
        that is never published."""
        parts = {"upstream": self.upstream_days, "embed": self.embed_days, "train": self.train_days,
                 "validation": self.validation_days, "test": self.test_days}
        empty = [k for k, v in parts.items() if not v]
        if empty:
            raise ValueError(f"protocol {self.name}: no days for {empty} (days: {parts})")
        if max(self.train_days) >= min(self.validation_days) or max(self.validation_days) >= min(self.test_days):
            raise ValueError(f"protocol {self.name}: train days must precede validation days, and those the test days "
                             f"(train {self.train_days[0]}..{self.train_days[-1]}, validation {self.validation_days[0]}.."
                             f"{self.validation_days[-1]}, test {self.test_days[0]}..{self.test_days[-1]})")
        if not set(self.embed_days) <= set(self.upstream_days):
            raise ValueError(f"protocol {self.name}: embed days must be upstream days (embedded right after training them)")
        if min(self.embed_days) >= min(self.train_days):
            raise ValueError(f"protocol {self.name}: the first downstream day {self.train_days[0]} reads a version from "
                             f"before it; embedding starts only on {self.embed_days[0]}")


def _slice(days: list[str], text: str, where: str) -> list[str]:
    try:
        bounds = [int(b) if b.strip() else None for b in text.split(":")]
    except ValueError:
        bounds = []
    if len(bounds) != 2:
        raise ValueError(f"{where}: {text!r} is not a slice such as '1:-2'")
    return days[bounds[0]:bounds[1]]


def load_protocol(path: Path, days: list[str], upstream_steps_per_day: int | None = None) -> Protocol:
    """The protocol file ``path`` applied to the dataset's sorted ``days``;
    ``upstream_steps_per_day`` overrides the file's (0: full passes)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"protocol {path}: {e}") from None
    from sharding.config import OptimizerConfig

    where = f"protocol {path}"
    try:
        split = {k: _slice(days, raw["days"][k], f"{where} [days] {k}") for k in ("upstream", "embed", "train", "validation", "test")}
        up, down = raw["upstream"], raw["downstream"]
        features = down["features"]
        if isinstance(features, str):  # a config file whose downstream_features to use
            features = tomllib.loads((REPO / features).read_text())["downstream_features"]
        proto = Protocol(
            name=path.stem, description=raw.get("description", ""), upstream_days=split["upstream"], embed_days=split["embed"],
            train_days=split["train"], validation_days=split["validation"], test_days=split["test"],
            downstream_features=tuple(features),
            upstream_steps_per_day=int(up["steps_per_day"] if upstream_steps_per_day is None else upstream_steps_per_day),
            upstream_batch_size=int(up["batch_size"]), downstream_batch_size=int(down["batch_size"]),
            dense_lr=tuple(float(v) for v in down.get("dense_lr", [OptimizerConfig.dense_lr])),
            sparse_lr=tuple(float(v) for v in down.get("sparse_lr", [OptimizerConfig.sparse_lr])),
            min_positives=int(raw.get("min_positives", 100)),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e}") from None
    proto.check()
    return proto


def protocol(dataset: str, days: list[str], upstream_steps_per_day: int | None = None) -> Protocol:
    """The protocol file of a named dataset (``experiments/protocols/<dataset>.toml``)."""
    path = PROTOCOLS / f"{dataset}.toml"
    if not path.is_file():
        raise ValueError(f"unknown dataset {dataset!r}: no {path}; give --protocol")
    return load_protocol(path, days, upstream_steps_per_day)


EMBED_MODES = ("daily", "back")


def _pool_name(pool: tuple[str, float | None]) -> str:
    method, alpha = pool
    return f"{method}{alpha:g}" if method == "ma" else method


class Experiment:
    """One dataset and seed under one protocol: upstream, pools and stores, then every downstream
    cell."""

    def __init__(self, dataset: str, data: Path, out: Path, seed: int, ctx, upstream_steps_per_day: int | None = None,
                 embed: str = "daily", protocol_file: Path | None = None) -> None:
        from data.loader import day_partitions
        from data.spec import load_spec

        if embed not in EMBED_MODES:
            raise ValueError(f"embed {embed!r}: expected one of {', '.join(EMBED_MODES)}")
        self.dataset, self.data, self.seed, self.ctx, self.embed = dataset, data, seed, ctx, embed
        self.out = out
        self.work = out / f"seed={seed}"
        key = load_spec(data / "spec.toml").keys.day
        days = sorted(set(day_partitions(data / "ctr", key)) & set(day_partitions(data / "cvr", key)))
        self.protocol = (load_protocol(protocol_file, days, upstream_steps_per_day) if protocol_file
                         else protocol(dataset, days, upstream_steps_per_day))
        self.upstream_steps_per_day = self.protocol.upstream_steps_per_day
        self.upstream_steps_per_day_override = upstream_steps_per_day
        self._check_made_with()

    def upstream_settings(self) -> dict[str, Any]:
        """What the published embeddings depend on."""
        p = self.protocol
        return {"upstream_steps_per_day": p.upstream_steps_per_day, "embed": self.embed, "upstream_days": p.upstream_days,
                "embed_days": p.embed_days, "upstream_batch_size": p.upstream_batch_size}

    def _check_made_with(self) -> None:
        """Refuses a seed folder (and so its results) made under another upstream protocol."""
        marker = self.work / "upstream.json"
        if marker.is_file():
            made = json.loads(marker.read_text())
            now = self.upstream_settings()
            differ = sorted(k for k in now if made.get(k) != now[k])
            if differ:
                raise SystemExit(f"{marker}: these embeddings were made with other settings ({', '.join(differ)}: "
                                 f"{[made.get(k) for k in differ]}, not {[now[k] for k in differ]}); give another --out")

    # ---- 1 + 2: upstream models, pools and stores ----------------------------------------------
    def upstream(self) -> None:
        marker = self.work / "upstream.json"
        if marker.is_file():
            log.info("seed %d: upstream embeddings already published (%s)", self.seed, marker)
            return
        shutil.rmtree(self.work / "emb", ignore_errors=True)
        t0, stats = time.perf_counter(), self.upstream_settings()
        for source in ("ctr", "cvr"):
            stats[source] = self._train_and_embed(source)
        for source in ("ctr", "cvr"):
            for entity in ("user", "pin"):
                pools = TABLE1_POOLS if (source, entity) == ("cvr", "user") else (DEFAULT_POOL,)
                for pool in pools:
                    self._aggregate_and_publish(source, entity, pool)
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        marker.write_text(json.dumps(stats, indent=1))

    def _train_and_embed(self, source: str) -> dict:
        from common.config import from_dict
        from embeddings.infer import Embedder, infer_day
        from trainer.config import RunConfig
        from trainer.loop import Trainer

        p = self.protocol
        raw = _merge({"data": {"root": str(self.data), "source": source, "synthetic_preset": ""},
                      "train": {"run_dir": str(self.work / "upstream" / source), "seed": self.seed, "log_every": 50}},
                     p.upstream_overrides)
        config = from_dict(RunConfig, raw, f"upstream {source}")
        trainer = Trainer(config, self.ctx)
        try:
            examples, seconds = 0, 0.0
            embedder = Embedder(Path(), self.data, source, trainer.model, self.ctx.device, config.model.embedding_dim)
            for day in p.upstream_days:
                s = trainer.train_day(day)
                examples, seconds = examples + s["examples"], seconds + s["seconds"]
                if self.embed == "daily" and day in p.embed_days:  # with the model as that day's snapshot has it
                    trainer.model.eval()
                    infer_day(embedder, day, self.work / "emb", overwrite=True)
                    trainer.model.train()
            if self.embed == "back":  # every embedding day with the last snapshot (paper Appendix B.3's back inference)
                trainer.model.eval()
                for day in p.embed_days:
                    infer_day(embedder, day, self.work / "emb", overwrite=True)
            log.info("seed %d: upstream %s trained on %d day(s), %d examples, %.0f examples/s", self.seed, source,
                     len(p.upstream_days), examples, examples / max(seconds, 1e-9))
            return {"examples": examples, "examples_per_s": round(examples / max(seconds, 1e-9), 1)}
        finally:
            trainer.close()

    def _aggregate_and_publish(self, source: str, entity: str, pool: tuple[str, float | None]) -> None:
        from embeddings.aggregate import aggregate_day
        from embeddings.embedded_store import EmbeddedStore
        from embeddings.pool import snapshot_dir
        from embeddings.publish import publish

        root = self.work / "pool" / _pool_name(pool)
        store_path = self.store_root(pool) / f"{source}-{entity}"
        shutil.rmtree(root / source / entity, ignore_errors=True)
        shutil.rmtree(store_path, ignore_errors=True)
        store = EmbeddedStore(store_path)
        for day in self.protocol.embed_days:
            aggregate_day(self.work / "emb", root, source, entity, day, pool[0], pool[1])
            publish(snapshot_dir(root, source, entity, day), store, f"{source}-{entity}-{day}")

    def store_root(self, pool: tuple[str, float | None]) -> Path:
        return self.work / "store" / _pool_name(pool)

    # ---- 3: downstream cells ------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> dict:
        """Trains the cell once per pair of the protocol's tuning grid; the validation days pick
        one, whose test-day metrics are the cell's (``metrics``). Every run is kept in ``tuning``."""
        runs = [self._train_cell(cell, dense_lr, sparse_lr) for dense_lr, sparse_lr in self.protocol.grid]
        label = next(iter(runs[0]["validation"]))
        best = max(runs, key=lambda r: _score(r["validation"][label]["roc_auc"]))
        p = self.protocol
        return {
            "dataset": self.dataset, "protocol": p.name, "upstream_steps_per_day": self.upstream_steps_per_day,
            "upstream_steps_per_day_override": self.upstream_steps_per_day_override, "embed": self.embed,
            "seed": self.seed, "cell": cell.name, "table": cell.table, "kind": cell.kind,
            "derm": list(cell.derm), "pool": _pool_name(cell.pool), "projection_dim": cell.projection_dim,
            "similarity": cell.similarity, "variant": cell.variant, "train_days": p.train_days, "validation_days": p.validation_days,
            "test_days": p.test_days, "min_positives": p.min_positives,
            **{k: best[k] for k in ("dense_lr", "sparse_lr", "train_examples", "train_steps", "train_examples_per_s", "eval_seconds",
                                     "input_width", "derm_width", "curve", "coverage", "validation")},
            "metrics": best["test"],
            "tuning": [{"dense_lr": r["dense_lr"], "sparse_lr": r["sparse_lr"], "validation_roc_auc": r["validation"][label]["roc_auc"]}
                       for r in runs],
        }

    def _train_cell(self, cell: Cell, dense_lr: float, sparse_lr: float) -> dict:
        """One training of a cell: incremental over the train days, evaluated after each on the
        validation days (the learning curve) and on the next day before training on it (the
        progressive curve, :attr:`Protocol.next_days`), then on the test days."""
        from common.config import from_dict
        from trainer.config import DownstreamRunConfig
        from trainer.downstream import DownstreamTrainer

        p = self.protocol
        run_dir = self.work / "downstream" / (cell.name if len(p.grid) == 1 else f"{cell.name}-lr{dense_lr:g}-slr{sparse_lr:g}")
        shutil.rmtree(run_dir, ignore_errors=True)
        # Every cell reads the default pools except Table 1's cvr_user: one store root per cell,
        # mixing in the varied cvr-user store through a per-cell folder of links.
        store_root = self._cell_store_root(cell)
        raw = _merge({"kind": cell.kind,
                      "data": {"root": str(self.data), "source": cell.kind, "synthetic_preset": ""},
                      "train": {"run_dir": str(run_dir), "seed": self.seed, "log_every": 50},
                      "model": {"features": list(p.downstream_features)},
                      "optimizer": {"dense_lr": dense_lr, "sparse_lr": sparse_lr},
                      "derm": {"features": list(cell.derm), "store_root": str(store_root), "projection_dim": cell.projection_dim,
                               "similarity": cell.similarity}},
                     _merge(p.downstream_overrides, VARIANTS.get(cell.variant, {})))
        config = from_dict(DownstreamRunConfig, raw, cell.name)
        trainer = DownstreamTrainer(config, self.ctx)
        try:
            days, curve, examples = [], [], 0
            # The day after each training day, evaluated before it is trained on (progressive
            # validation): on a world that drifts, a fixed validation day favours the training days
            # nearest to it, and this curve's gap to the oracle is what shows convergence.
            for d, ahead in p.next_days:
                days.append(trainer.train_day(d))
                examples += days[-1]["examples"]
                validation = trainer.evaluate(p.validation_days)
                next_day = validation if p.validation_days == [ahead] else trainer.evaluate([ahead], tag="next_day")
                curve.append({"day": d, "examples": examples, "coverage": days[-1].get("coverage"),
                              "validation": {k: m["roc_auc"] for k, m in validation.items()},
                              "next_day": {"day": ahead, **{k: {key: m.get(key) for key in NEXT_DAY_METRICS}
                                                             for k, m in next_day.items()}}})
            t0 = time.perf_counter()
            test = trainer.evaluate(p.test_days, tag="test")
            test_coverage = trainer.eval_extras().get("coverage")
            eval_s = time.perf_counter() - t0
        finally:
            trainer.close()
        seconds = sum(d["seconds"] for d in days)
        return {
            "dense_lr": dense_lr, "sparse_lr": sparse_lr, "train_examples": examples, "train_steps": sum(d["steps"] for d in days),
            "train_examples_per_s": round(examples / max(seconds, 1e-9), 1), "eval_seconds": round(eval_s, 1),
            "input_width": getattr(trainer_model(trainer), "input_dim", None),
            "derm_width": sum(f.output_dim for f in trainer.model_config.derm),
            "curve": curve, "validation": validation, "test": test,
            "coverage": {"train": _mean_coverage(days), "test": test_coverage} if cell.derm else None,
        }

    def _cell_store_root(self, cell: Cell) -> Path:
        if cell.pool == DEFAULT_POOL:
            return self.store_root(DEFAULT_POOL)
        root = self.work / "store" / f"mixed-{_pool_name(cell.pool)}"
        root.mkdir(parents=True, exist_ok=True)
        for name in ("ctr-user", "ctr-pin", "cvr-user", "cvr-pin"):
            target = (self.store_root(cell.pool if name == "cvr-user" else DEFAULT_POOL) / name).resolve()
            link = root / name
            if not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
        return root


def _score(auc: float) -> float:
    """A validation AUC as a choice sees it: NaN (one class only) never wins."""
    return -1.0 if auc != auc else auc


def _mean_coverage(days: list[dict]) -> dict[str, float] | None:
    """Per embedding, the share of all trained rows (over ``days``' stats) that found a version."""
    if not days or days[0].get("coverage") is None:
        return None
    total = sum(d["examples"] for d in days)
    return {k: round(sum(d["coverage"][k] * d["examples"] for d in days) / max(total, 1), 5) for k in days[0]["coverage"]}


def trainer_model(trainer) -> Any:
    """The unsharded-side downstream model under DMP (for its input width)."""
    module = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return getattr(module, "model", None)


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def _done(results: Path) -> set[tuple[int, str]]:
    """The (seed, cell) pairs already in ``results``; an unfinished last line (a run killed while
    appending) is dropped so that the next append starts on a line of its own."""
    if not results.exists():
        return set()
    text = results.read_text()
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        log.warning("%s: dropping an unfinished last line (an interrupted write)", results)
        results.write_text(complete)
    return {(r["seed"], r["cell"]) for r in map(json.loads, complete.splitlines()) if r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/lift.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help="tiny, small or movielens (generated or downloaded when absent), or any name with --data and --protocol")
    p.add_argument("--data", help="dataset root (default: runs/data/<dataset>, generated or downloaded when absent)")
    p.add_argument("--protocol", type=Path, default=None,
                   help="protocol file (default: experiments/protocols/<dataset>.toml): the day split and shared settings")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, seed=S/...)")
    p.add_argument("--cells", default="",
                   help="comma-separated tables (baseline,table1,table2,table4,appendix_d,reading,similarity) or cell names "
                        "(as results.jsonl has them) to run; default all")
    p.add_argument("--upstream-steps-per-day", type=int, default=None, metavar="N",
                   help="cap on upstream steps per day, 0: full passes (default: the protocol's)")
    p.add_argument("--embed", choices=EMBED_MODES, default="daily",
                   help="daily: embed each day with the model as trained up to it (the daily job); back: embed every "
                        "day with the last model (back inference over the batch window, paper Appendix B.3)")
    args = p.parse_args(argv)

    from common.log import setup_logging
    from sharding.distributed import init_distributed, shutdown

    setup_logging()
    data = Path(args.data or f"runs/data/{'ml-100k' if args.dataset == 'movielens' else args.dataset}")
    _ensure_dataset(args.dataset, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    wanted = set(args.cells.split(",")) if args.cells else None
    unknown = sorted(wanted - {c.table for c in cells()} - {c.name for c in cells()}) if wanted else []
    if unknown:
        p.error(f"--cells: {unknown} name no table and no cell")
    todo = [c for c in cells() if wanted is None or c.table in wanted or c.name in wanted]
    ctx = init_distributed("cpu")
    if ctx.world_size != 1:  # every rank would append the same cells and remove the others' folders
        raise SystemExit("experiments/lift.py runs as one process (its models are small); start it with python, not torchrun")
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            try:
                exp = Experiment(args.dataset, data, out, seed, ctx, args.upstream_steps_per_day, args.embed, args.protocol)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            done = _done(results)
            pending = [c for c in todo if (seed, c.name) not in done]
            if any(c.derm for c in pending):  # baselines read no embedding: no upstream run for them alone
                exp.upstream()
            for i, cell in enumerate(todo):
                if cell not in pending:
                    continue
                t0 = time.perf_counter()
                row = exp.run_cell(cell)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                first = next(iter(row["metrics"]))
                log.info("seed %d cell %d/%d %s: %s ROC-AUC %.4f PR-AUC %.4f (%.0f s)", seed, i + 1, len(todo), cell.name,
                         first, row["metrics"][first]["roc_auc"], row["metrics"][first]["pr_auc"], time.perf_counter() - t0)
    finally:
        shutdown()
    print(f"results: {results}; report: python experiments/report.py {results}")
    return 0


def _ensure_dataset(dataset: str, data: Path) -> None:
    if (data / "spec.toml").exists():
        return
    from data.synthetic import PRESETS, generate

    if dataset not in (*PRESETS, "movielens"):
        raise SystemExit(f"error: {data}: no dataset (spec.toml) there, and {dataset!r} is not one to generate")
    if dataset == "movielens":
        from data.movielens.cli import main as movielens_main

        if movielens_main(["--out", str(data)]) != 0:
            raise SystemExit(f"could not build MovieLens-100K into {data}")
        return
    log.info("generating the %s synthetic world into %s", dataset, data)
    generate(data, PRESETS[dataset], seed=0)


if __name__ == "__main__":
    raise SystemExit(main())
