"""The paper's offline experiments on our data (paper §4.1, Appendix D, E.1): how much DERM
embeddings lift the downstream CTR and CVR models, by aggregation heuristic (Table 1), by which of
the four embeddings they read (Tables 2 and 4) and by projection width (Appendix D.1).

One process per dataset and seed, running the project's own components in-process (the daily
pipeline, :mod:`trainer.pipeline`, runs the same steps as TorchX jobs; here 20 downstream models per
seed would otherwise each pay a job's start-up):

1. **Upstream.** The ctr and cvr DERM models (:class:`trainer.loop.Trainer`) train day by day over
   every day but the last; after each day of the embedding window, that day's users and Pins are
   embedded with the model as it stands (``embeddings.infer.infer_day``), as the daily job would
   with that day's snapshot.
2. **Pools and stores.** Each embedding's daily outputs are aggregated day by day
   (``embeddings.aggregate.aggregate_day``; MA with α = 0.9 for all four, and for ``cvr_user`` also
   ACC, MA α ∈ {0.5, 0.99} and AP) and every day's pool is published as a version of an embedded
   feature store (``embeddings.publish.publish``).
3. **Downstream cells.** Each cell trains a fresh downstream model (:mod:`trainer.downstream`) on
   the training days — a row of day d reads the versions of day d − 1 — and evaluates it on the
   held-out days, where a row of day d also reads the version of day d − 1. The baseline is the same
   model without DERM embeddings, same seed, same data.

Results go to ``OUT/results.jsonl`` (one line per cell; a re-run skips the cells already there, so
an interrupted run resumes), TensorBoard runs to ``OUT/seed=S/**/tb``. ``experiments/report.py``
turns them into the markdown report with plots.

Usage::

    python experiments/lift.py --dataset small --seeds 0,1,2 --out runs/experiments/small
    python experiments/lift.py --dataset movielens --seeds 0,1,2 --out runs/experiments/ml-100k
    python experiments/lift.py --dataset small --seeds 0,1,2 --upstream-steps-per-day 0 --embed back \\
        --out runs/experiments/small-full-back
    python experiments/lift.py --dataset tiny --seeds 0 --out /tmp/lift --cells baseline,table2   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
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

# The synthetic world's downstream models see the production-like restricted feature set of the
# demo pipeline (configs/pipeline-demo.toml, which says why), read from there so the two agree.
SYNTHETIC_DOWNSTREAM_FEATURES = tuple(
    tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "pipeline-demo.toml").read_text())["downstream_features"]
)
# MovieLens: ids, the movie's metadata, context and the rating sequence; not the demographics or counts.
MOVIELENS_DOWNSTREAM_FEATURES = (
    "user_id", "pin_id", "pin_release_year", "pin_genres", "hour_of_day", "day_of_week", "user_seq",
)


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

    @property
    def name(self) -> str:
        pool = "" if self.pool == DEFAULT_POOL else f"-{_pool_name(self.pool)}"
        derm = "+".join(self.derm) or "none"
        return f"{self.table}-{self.kind}-{derm}{pool}-p{self.projection_dim}"


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
    return out


@dataclass(frozen=True)
class Protocol:
    """Which days play which part (all days of the dataset, in order)."""

    upstream_days: list[str]
    """Trained by the upstream models, in order: every day but the last."""
    embed_days: list[str]
    """Days whose embeddings are inferred, aggregated and published (version d after day d)."""
    train_days: list[str]
    """Downstream training days."""
    eval_days: list[str]
    """Held-out downstream evaluation days."""
    downstream_features: tuple[str, ...]
    upstream_overrides: dict[str, Any]
    downstream_overrides: dict[str, Any]


UPSTREAM_STEPS_PER_DAY = {"tiny": 8, "small": 40, "movielens": 0}
"""The default cap on upstream steps per day (0: full passes). ``small``: 40 x 2048 of the 200k ctr
rows a day (its cvr days hold 30 batches), so that three seeds fit an afternoon; ``--upstream-steps-per-day``
changes it."""


EMBED_MODES = ("daily", "back")


def protocol(dataset: str, days: list[str], upstream_steps_per_day: int | None = None) -> Protocol:
    """The day split of a dataset (see docs/experiments.md for why); ``upstream_steps_per_day``
    overrides :data:`UPSTREAM_STEPS_PER_DAY` (0: full passes over the days)."""
    cap = UPSTREAM_STEPS_PER_DAY[dataset] if upstream_steps_per_day is None else upstream_steps_per_day
    if dataset in ("tiny", "small"):
        # 1 held-out day, 1 downstream training day; upstream and embeddings over all the others.
        return Protocol(days[:-1], days[:-1], days[-2:-1], days[-1:], SYNTHETIC_DOWNSTREAM_FEATURES,
                        {"data": {"batch_size": 512 if dataset == "tiny" else 2048}, "train": {"max_steps_per_day": cap}},
                        {"data": {"batch_size": 512 if dataset == "tiny" else 2048}})
    if dataset == "movielens":
        # Sparse days: evaluate on the last 14 days together, train downstream on the 14 before,
        # and publish embeddings from a week before those on (MA needs a history). The upstream
        # models train on the 16 weeks before the evaluation window (about half the ratings; the
        # downstream models see the last two of those weeks).
        eval_days, train_days = days[-14:], days[-28:-14]
        start = (dt.date.fromisoformat(eval_days[0]) - dt.timedelta(weeks=16)).isoformat()
        first = (dt.date.fromisoformat(train_days[0]) - dt.timedelta(days=8)).isoformat()
        embed = [d for d in days[:-1] if d >= first]
        return Protocol([d for d in days[:-1] if d >= start], embed, train_days, eval_days, MOVIELENS_DOWNSTREAM_FEATURES,
                        {"data": {"batch_size": 2048}, "train": {"max_steps_per_day": cap}}, {"data": {"batch_size": 1024}})
    raise ValueError(f"unknown dataset {dataset!r}: tiny, small or movielens")


def _pool_name(pool: tuple[str, float | None]) -> str:
    method, alpha = pool
    return f"{method}{alpha:g}" if method == "ma" else method


class Experiment:
    """One dataset and seed: upstream, pools and stores, then every downstream cell."""

    def __init__(self, dataset: str, data: Path, out: Path, seed: int, ctx, upstream_steps_per_day: int | None = None,
                 embed: str = "daily") -> None:
        from trainer.data.spec import load_spec

        if embed not in EMBED_MODES:
            raise ValueError(f"embed {embed!r}: expected one of {', '.join(EMBED_MODES)}")
        self.dataset, self.data, self.seed, self.ctx, self.embed = dataset, data, seed, ctx, embed
        self.upstream_steps_per_day = (UPSTREAM_STEPS_PER_DAY[dataset] if upstream_steps_per_day is None
                                       else upstream_steps_per_day)
        self.out = out
        self.work = out / f"seed={seed}"
        spec = load_spec(data / "spec.toml")
        days = sorted(p.name[4:] for p in (data / "ctr").glob("day=*"))
        self.protocol = protocol(dataset, days, self.upstream_steps_per_day)
        self._check_made_with()
        self.spec_name = spec.name

    def _check_made_with(self) -> None:
        """Refuses a seed folder (and so its results) made under another upstream protocol."""
        marker = self.work / "upstream.json"
        if marker.is_file():
            made = json.loads(marker.read_text())
            made_with = (made.get("upstream_steps_per_day", UPSTREAM_STEPS_PER_DAY[self.dataset]), made.get("embed", "daily"))
            if made_with != (self.upstream_steps_per_day, self.embed):
                raise SystemExit(f"{marker}: these embeddings were made with --upstream-steps-per-day {made_with[0]} "
                                 f"--embed {made_with[1]}, not {self.upstream_steps_per_day} and {self.embed}; give another --out")

    # ---- 1 + 2: upstream models, pools and stores ----------------------------------------------
    def upstream(self) -> None:
        marker = self.work / "upstream.json"
        if marker.is_file():
            log.info("seed %d: upstream embeddings already published (%s)", self.seed, marker)
            return
        shutil.rmtree(self.work / "emb", ignore_errors=True)
        t0, stats = time.perf_counter(), {"upstream_steps_per_day": self.upstream_steps_per_day, "embed": self.embed}
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
        from embeddings.infer import Embedder, infer_day
        from trainer.config import RunConfig, from_dict
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
        from embeddings.pool import snapshot_dir
        from embeddings.publish import publish
        from embeddings.store import EmbeddedStore

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
        from trainer.config import from_dict
        from trainer.downstream import DownstreamRunConfig, _trainer_cls

        p = self.protocol
        run_dir = self.work / "downstream" / cell.name
        shutil.rmtree(run_dir, ignore_errors=True)
        # Every cell reads the default pools except Table 1's cvr_user: one store root per cell,
        # mixing in the varied cvr-user store through a per-cell folder of links.
        store_root = self._cell_store_root(cell)
        raw = _merge({"kind": cell.kind,
                      "data": {"root": str(self.data), "source": cell.kind, "synthetic_preset": ""},
                      "train": {"run_dir": str(run_dir), "seed": self.seed, "log_every": 50},
                      "model": {"features": list(p.downstream_features)},
                      "derm": {"features": list(cell.derm), "store_root": str(store_root), "projection_dim": cell.projection_dim}},
                     p.downstream_overrides)
        config = from_dict(DownstreamRunConfig, raw, cell.name)
        trainer = _trainer_cls()(config, self.ctx)
        try:
            days = [trainer.train_day(d) for d in p.train_days]
            t0 = time.perf_counter()
            metrics = trainer.evaluate(p.eval_days)
            eval_s = time.perf_counter() - t0
        finally:
            trainer.close()
        examples, seconds = sum(d["examples"] for d in days), sum(d["seconds"] for d in days)
        return {
            "dataset": self.dataset, "upstream_steps_per_day": self.upstream_steps_per_day, "embed": self.embed,
            "seed": self.seed, "cell": cell.name, "table": cell.table, "kind": cell.kind,
            "derm": list(cell.derm), "pool": _pool_name(cell.pool), "projection_dim": cell.projection_dim,
            "train_days": p.train_days, "eval_days": p.eval_days, "train_examples": examples,
            "train_examples_per_s": round(examples / max(seconds, 1e-9), 1), "eval_seconds": round(eval_s, 1),
            "input_width": getattr(trainer_model(trainer), "input_dim", None),
            "derm_width": sum(f.output_dim for f in trainer.model_config.derm), "metrics": metrics,
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
    p.add_argument("--dataset", required=True, choices=["tiny", "small", "movielens"])
    p.add_argument("--data", help="dataset root (default: runs/data/<dataset>, generated or downloaded when absent)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, seed=S/...)")
    p.add_argument("--cells", default="", help="comma-separated tables to run (baseline,table1,table2,table4,appendix_d); default all")
    p.add_argument("--upstream-steps-per-day", type=int, default=None, metavar="N",
                   help="cap on upstream steps per day, 0: full passes (default: tiny 8, small 40, movielens 0)")
    p.add_argument("--embed", choices=EMBED_MODES, default="daily",
                   help="daily: embed each day with the model as trained up to it (the daily job); back: embed every "
                        "day with the last model (back inference over the batch window, paper Appendix B.3)")
    args = p.parse_args(argv)

    from trainer.distributed import init_distributed, shutdown
    from trainer.log import setup_logging

    setup_logging()
    data = Path(args.data or f"runs/data/{'ml-100k' if args.dataset == 'movielens' else args.dataset}")
    _ensure_dataset(args.dataset, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    tables = set(args.cells.split(",")) if args.cells else None
    todo = [c for c in cells() if tables is None or c.table in tables]
    ctx = init_distributed("cpu")
    if ctx.world_size != 1:  # every rank would append the same cells and remove the others' folders
        raise SystemExit("experiments/lift.py runs as one process (its models are small); start it with python, not torchrun")
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            exp = Experiment(args.dataset, data, out, seed, ctx, args.upstream_steps_per_day, args.embed)
            done = _done(results)
            if all((seed, c.name) in done for c in todo):
                continue
            exp.upstream()
            for i, cell in enumerate(todo):
                if (seed, cell.name) in done:
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
    if dataset == "movielens":
        from trainer.data.movielens import main as movielens_main

        if movielens_main(["--out", str(data)]) != 0:
            raise SystemExit(f"could not build MovieLens-100K into {data}")
        return
    from trainer.data.synthetic import PRESETS, generate

    log.info("generating the %s synthetic world into %s", dataset, data)
    generate(data, PRESETS[dataset], seed=0)


if __name__ == "__main__":
    raise SystemExit(main())
