"""The trainer of one upstream DERM model: built sharded, trained day by day, evaluated on a
held-out day, snapshotted after every trained day (paper Appendix B.2: "initially trained from
scratch using data from an extended time window. Subsequently, on a daily basis, the model is
incrementally trained with newly arrived data by loading the weights from the last model
snapshot").

Order of construction (each step needs the one before):
1. the spec and the days on disk — fail fast on bad input, before any model is built;
2. the model: tables on ``meta``, dense parts on the device (``modules.derm.build_derm``);
3. sharding: fused table optimizer, planner, DMP, dense optimizer (``sharding.dmp.shard_model``);
4. outputs: TensorBoard on rank 0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer

from common.config import to_dict
from common.files import write_json_atomic
from data.batch import Batch
from data.loader import day_partitions, make_loader
from data.spec import FeatureSpec, load_spec
from embeddings.representation import engagement_counts
from modules.derm import build_derm
from sharding.checkpoint import SnapshotError, is_snapshot, latest_snapshot_before, load_snapshot, read_meta, save_snapshot, snapshot_path
from sharding.collectives import all_gather_ids
from sharding.distributed import DistContext
from sharding.dmp import shard_model
from sharding.planner import describe_plan
from trainer.config import RunConfig
from trainer.metrics import binary_metrics, embedding_quality

log = logging.getLogger("derm.train")


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite: the run stops before any snapshot holds it."""


class Trainer:
    """Trains ``config.data.source``'s upstream model on this rank's share of each day.

    Its own progress (steps, days trained) is a ``Stateful`` (:meth:`state_dict`), saved in every
    snapshot's meta beside the model and optimizer state that DCP writes."""

    config: RunConfig
    ctx: DistContext
    root: Path
    """The dataset root (spec.toml and one folder per source)."""
    source: str
    spec: FeatureSpec
    days_on_disk: list[str]
    run_dir: Path
    snapshots: Path
    model_config: Any
    """The model config as built (the downstream trainer adds its DERM features' widths): what
    snapshots record and are checked against."""
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    """The fused table optimizer and the dense one, as one."""
    norm_stats: list[torch.Tensor]
    """BatchNorm running statistics, averaged over ranks after every step."""
    labels: tuple[str, ...]
    global_step: int
    days_trained: list[str]
    embedding_quality: dict[str, float] | None
    """Representation quality of the last evaluation (upstream models; None before one)."""
    writer: SummaryWriter | None
    """TensorBoard, on rank 0 only."""

    def __init__(self, config: RunConfig, ctx: DistContext) -> None:
        self.config, self.ctx = config, ctx
        self.root = Path(config.data.root)
        self.source = config.data.source
        self.spec = load_spec(self.root / "spec.toml")
        self.spec.source(self.source)  # raises, naming the spec's sources, if unknown
        self.days_on_disk = _days(self.root, self.source, self.spec.keys.day)
        self.run_dir = Path(config.train.run_dir)
        self.snapshots = self.run_dir / "snapshots"

        torch.manual_seed(config.train.seed)  # dense init; DDP also broadcasts rank 0's weights
        task, self.model_config = self._build_task()
        task.set_mixed_precision(config.train.mixed_precision, ctx.device.type)
        log.info("mixed precision: %s (train.mixed_precision = %s)", task.autocast_dtype or "float32", config.train.mixed_precision)
        self.model, self.optimizer = shard_model(task, ctx.device, config.optimizer, spec=self.spec.for_source(self.source),
                                                 batch_size=config.data.batch_size)
        if ctx.is_main:  # saved beside every snapshot too (plan.json)
            log.info("sharding plan (%d rank(s), batch %d per rank):\n%s", ctx.world_size, config.data.batch_size,
                     describe_plan(self.model.plan))
        # BatchNorm running statistics: each rank updates them from its own rows (DMP's DDP does not
        # broadcast buffers), so they are averaged over ranks after every step (_sync_norm_stats):
        # every rank then evaluates, and every snapshot holds, the same statistics.
        self.norm_stats = [t for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                           and m.track_running_stats for t in (m.running_mean, m.running_var)]
        self.labels = task.model.labels
        self.global_step = 0
        self.days_trained = []
        self.embedding_quality = None
        self.writer = SummaryWriter(str(self.run_dir / "tb")) if ctx.is_main else None

    def _build_task(self) -> tuple[torch.nn.Module, Any]:
        """The unsharded train task (tables on ``meta``, dense parts on the device) and the model
        config it was built from."""
        task = build_derm(self.spec, self.source, self.config.model, device=self.ctx.device,
                          embedding_device=torch.device("meta"), gather=all_gather_ids())
        return task, self.config.model

    # ---- Stateful ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own progress (``torch.distributed.checkpoint.stateful.Stateful``)."""
        return {"global_step": self.global_step, "days_trained": list(self.days_trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.days_trained = int(state["global_step"]), list(state["days_trained"])

    def describe(self) -> dict[str, Any]:
        """What the run summary says of the model."""
        return {"model": f"upstream {self.source}"}

    def eval_extras(self) -> dict[str, Any]:
        """What the last evaluation adds to the run summary besides the metrics per label (the
        downstream trainer: the DERM embeddings' coverage of the evaluated rows)."""
        return {}

    def _prepare(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Batches as the model reads them (the downstream trainer joins DERM embeddings here)."""
        return batches

    # ---- training ---------------------------------------------------------------------------
    def train_day(self, day: str, start_step: int = 0, max_steps: int = 0) -> dict[str, Any]:
        """One pass over ``day`` (from batch ``start_step``; at most ``max_steps`` steps), the same
        number of steps on every rank."""
        cfg = self.config
        loader = make_loader(self.root, self.source, cfg.data.batch_size, days=[day], rank=self.ctx.rank,
                             world_size=self.ctx.world_size, num_workers=cfg.data.num_workers, spec=self.spec)
        steps = _all_reduce_int(len(loader), dist.ReduceOp.MIN, self.ctx.device)  # ranks may differ by one batch
        cap = max_steps or cfg.train.max_steps_per_day
        steps = min(steps, start_step + cap) if cap else steps
        loader.position = start_step  # resumes after the batches already trained on
        batches = self._prepare(itertools.islice(iter(loader), max(steps - start_step, 0)))

        self.model.train()
        # Sums stay tensors until a progress line: reading them every step would make the host
        # wait for the device each step and undo the pipeline's overlap on GPUs.
        sums: dict[str, Any] = defaultdict(float)
        n_window, t_window, t0 = 0, time.perf_counter(), time.perf_counter()
        done, loss_sum = start_step, 0.0
        for parts in self._steps(batches):
            done += 1
            self.global_step += 1
            n_window += 1
            loss_sum = loss_sum + parts["loss"]
            for k, v in parts.items():
                sums[k] = sums[k] + v
            every = cfg.train.checkpoint_every
            if every and done % every == 0 and done < steps:  # a mid-day checkpoint, never of a NaN
                if not math.isfinite(float(loss_sum)):
                    raise NonFiniteLoss(f"day {day}: the training loss became non-finite by step {done}; stopping before "
                                        "any checkpoint of it")
                self.save(self.partial_path, day, done, overwrite=True)
            if done % cfg.train.log_every == 0 or done == steps:
                secs = time.perf_counter() - t_window
                rate = n_window * cfg.data.batch_size * self.ctx.world_size / max(secs, 1e-9)
                means = {k: float(v) / n_window for k, v in sums.items()}
                if not math.isfinite(means["loss"]):  # checked where the host reads the loss anyway
                    raise NonFiniteLoss(f"day {day}: the training loss became {means['loss']} by step {done} (of the "
                                        f"last {n_window}); stopping before any snapshot of it. Look for extreme "
                                        "feature values (a log1p feature of 1e30) or lower the learning rates")
                self._progress(day, done, steps, rate, means)
                sums.clear()
                n_window, t_window = 0, time.perf_counter()
        seconds = time.perf_counter() - t0
        examples = (done - start_step) * cfg.data.batch_size * self.ctx.world_size
        self.days_trained.append(day)
        return {"day": day, "steps": done - start_step, "examples": examples, "seconds": round(seconds, 2),
                "examples_per_s": round(examples / max(seconds, 1e-9), 1),
                "mean_loss": float(loss_sum) / max(done - start_step, 1)}

    def _steps(self, batches: Iterator[Batch]) -> Iterator[dict[str, torch.Tensor]]:
        """Runs one optimizer step per batch; yields the step's loss parts."""
        device = self.ctx.device
        if self.config.train.pipeline:
            pipeline = TrainPipelineSparseDist(self.model, self.optimizer, device)
            try:
                while True:
                    try:
                        parts, _ = pipeline.progress(batches)
                    except StopIteration:
                        break
                    self._sync_norm_stats()
                    yield parts
            finally:
                pipeline.detach()  # restores the model's own forward for evaluation and saving
            return
        for batch in batches:
            loss, (parts, _) = self.model(batch.to(device))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self._sync_norm_stats()
            yield parts

    def _sync_norm_stats(self) -> None:
        """Averages the BatchNorms' running statistics over ranks (one small all-reduce)."""
        if self.ctx.world_size == 1 or not self.norm_stats:
            return
        flat = torch._utils._flatten_dense_tensors(self.norm_stats)
        dist.all_reduce(flat)
        flat /= self.ctx.world_size
        for t, synced in zip(self.norm_stats, torch._utils._unflatten_dense_tensors(flat, self.norm_stats)):
            t.copy_(synced)

    def _progress(self, day: str, step: int, steps: int, rate: float, means: dict[str, float]) -> None:
        tasks = "  ".join(f"{label} {means.get(f'bce/{i}', float('nan')):.4f}" for i, label in enumerate(self.labels))
        extra = "".join(f" | {k} {means[k]:.3f}" for k in ("contrastive", "temperature") if k in means)
        log.info("day %s step %d/%d | %.0f ex/s | loss %.4f | bce %s%s", day, step, steps, rate, means["loss"], tasks, extra)
        if self.writer is not None:
            for k, v in means.items():
                name = f"train/bce_{self.labels[int(k[4:])]}" if k.startswith("bce/") else f"train/{k}"
                self.writer.add_scalar(name, v, self.global_step)
            self.writer.add_scalar("train/examples_per_s", rate, self.global_step)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, day: str | list[str], tag: str = "eval") -> dict[str, dict[str, float]]:
        """Metrics per task on ``day`` (or on several days together), over every rank's rows (same
        on every rank); TensorBoard gets them under ``tag/`` (an experiment that evaluates other
        days at the same step keeps them apart)."""
        days = [day] if isinstance(day, str) else list(day)
        loader = make_loader(self.root, self.source, self.config.data.eval_batch_size, days=days,
                             rank=self.ctx.rank, world_size=self.ctx.world_size, spec=self.spec)
        # Sharded lookups are collective: every rank runs the same number of forwards, repeating
        # its last batch (predictions dropped) when it has fewer.
        steps = _all_reduce_int(len(loader), dist.ReduceOp.MAX, self.ctx.device)
        self.model.eval()
        preds, labels, oracle = [], [], []
        entities: dict[str, list[torch.Tensor]] = defaultdict(list)  # upstream models: embeddings and ids
        it, batch = self._prepare(iter(loader)), None
        for _ in range(steps):
            nxt = next(it, None)
            batch, keep = (nxt, True) if nxt is not None else (batch, False)
            _, (parts, out) = self.model(batch.to(self.ctx.device))
            if keep:
                preds.append(torch.sigmoid(out.logits.float()).cpu())
                labels.append(batch.labels)
                if batch.oracle is not None:
                    oracle.append(batch.oracle)
                if hasattr(out, "user_embedding"):  # an upstream model
                    entities["user"].append(out.user_embedding.float().cpu())
                    entities["pin"].append(out.pin_embedding.float().cpu())
                    entities["user_id"].append(batch.user_id)
                    entities["pin_id"].append(batch.pin_id)
                    entities["contrastive"].append(parts["contrastive"].reshape(1).cpu())
                    entities["temperature"].append(parts["temperature"].reshape(1).cpu())
                    entities["ln_rows"].append(torch.tensor([math.log(len(batch.pin_id))]))
        T, dev = len(self.labels), self.ctx.device
        gather = lambda rows, width=T: all_gather_ids()(torch.cat(rows).to(dev).flatten()).cpu().view(-1, width)  # noqa: E731
        p, y = gather(preds), gather(labels)  # every rank's rows, in rank order
        o = gather(oracle) if oracle else None
        metrics = {}
        for i, label in enumerate(self.labels):
            m = binary_metrics(p[:, i], y[:, i])
            if o is not None and not torch.isnan(o[:, i]).any():
                m["oracle_roc_auc"] = binary_metrics(o[:, i], y[:, i])["roc_auc"]
            metrics[label] = m
            if self.writer is not None:
                for k in ("roc_auc", "pr_auc", "ne", "calibration"):
                    self.writer.add_scalar(f"{tag}/{label}_{k}", m[k], self.global_step)
        if entities:
            emb = {k: gather(entities[k], entities[k][0].shape[1]) for k in ("user", "pin")}
            ids = {k: gather(entities[k], 1).flatten() for k in ("user_id", "pin_id", "contrastive", "temperature", "ln_rows")}
            quality = embedding_quality(emb["user"], emb["pin"], ids["user_id"], ids["pin_id"], y.amax(dim=1) > 0.5,
                                        self._popularity(torch.unique(ids["pin_id"]), min(days)))
            quality.update(contrastive_loss=round(float(ids["contrastive"].mean()), 4),
                           ln_batch=round(float(ids["ln_rows"].mean()), 4),  # chance: ln of the rows a batch scores
                           temperature=round(float(ids["temperature"].mean()), 5))
            self.embedding_quality = quality
            if self.writer is not None:
                for k, v in quality.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{tag}/embedding_{k}", v, self.global_step)
        self.model.train()
        return metrics

    def _popularity(self, pins: torch.Tensor, before: str, window: int = 7) -> torch.Tensor | None:
        """Positive rows per Pin of ``pins`` [P] over the trained days of the ``window`` days
        before ``before`` (what a popularity ranking knows before the eval day; a week, so that
        sparse days still rank); None when no day in it was trained."""
        start = (dt.date.fromisoformat(before) - dt.timedelta(days=window)).isoformat()
        days = sorted({d for d in self.days_trained if start <= d < before})
        if not days:
            return None
        loader = make_loader(self.root, self.source, self.config.data.eval_batch_size, days=days,
                             rank=self.ctx.rank, world_size=self.ctx.world_size, spec=self.spec)
        engaged = [b.pin_id[b.labels.amax(dim=1) > 0.5] for b in loader]
        engaged = all_gather_ids()(torch.cat(engaged).to(self.ctx.device) if engaged else torch.zeros(0, dtype=torch.int64)).cpu()
        return torch.from_numpy(engagement_counts(pins.numpy(), engaged.numpy())).float()  # eval-day Pins only

    # ---- snapshots --------------------------------------------------------------------------
    def snapshot_path(self, day: str) -> Path:
        return snapshot_path(self.snapshots, day)

    @property
    def partial_path(self) -> Path:
        """The mid-day checkpoint (``train.checkpoint_every``): one per run directory, replaced
        as the day goes on, removed when the day's snapshot is written."""
        return self.snapshots / "partial"

    def save(self, path: Path, day: str, day_step: int, overwrite: bool | None = None, stats: dict | None = None) -> Path:
        meta = {
            "day": day, "source": self.source, **self.state_dict(), "day_step": day_step,
            "spec": self.spec.for_source(self.source).to_dict(), "model": to_dict(self.model_config),
            "run": run_fingerprint(self.config), "stats": stats,
        }
        overwrite = self.config.train.overwrite if overwrite is None else overwrite
        saved = save_snapshot(path, self.model, self.optimizer, meta, overwrite=overwrite)
        log.info("saved snapshot %s", saved)
        return saved

    def load(self, path: Path) -> dict[str, Any]:
        """Loads a snapshot after checking it was made for this spec and model config."""
        meta = read_meta(path)
        _same(path, "spec", meta["spec"], self.spec.for_source(self.source).to_dict(), f"{self.root / 'spec.toml'} (source {self.source})")
        _same(path, "model", meta["model"], to_dict(self.model_config), "the model config")
        load_snapshot(path, self.model, self.optimizer)
        self.load_state_dict(meta)
        log.info("loaded snapshot %s (trained on %s)", path, ", ".join(self.days_trained) or "nothing")
        return meta

    def latest_snapshot_before(self, day: str) -> Path | None:
        return latest_snapshot_before(self.snapshots, day)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the whole run ------------------------------------------------------------------------------


def run(config: RunConfig, ctx: DistContext, trainer_cls: type[Trainer] = Trainer) -> dict[str, Any]:
    """Trains (initial or incremental), snapshots each day, evaluates; returns the run summary
    (also written to RUN_DIR/summary.json). ``trainer_cls`` builds the model: :class:`Trainer` for
    an upstream model, :class:`trainer.downstream.DownstreamTrainer` for a downstream one."""
    t = config.train
    trainer = trainer_cls(config, ctx)
    try:
        days = _plan_days(trainer, config)
        eval_day = _eval_day(trainer, days[-1], t.eval_day)
        fingerprint = run_fingerprint(config)
        # A re-run of the same command after a failure: the days it completed are kept (not
        # with overwrite, which asks for them again), the rest trained from there.
        done: list[tuple[str, dict]] = []
        for i, day in enumerate(days):
            path = trainer.snapshot_path(day)
            meta = read_meta(path) if is_snapshot(path) else None
            if meta is not None and not t.overwrite and meta.get("run") == fingerprint and len(done) == i:  # a prefix only
                done.append((day, meta))
            elif path.exists() and not t.overwrite:  # refuse before training anything: nothing half-replaced
                raise SnapshotError(f"{path} exists (made by another run); set train.overwrite = true to retrain {day}")
        todo = days[len(done):]
        summary: dict[str, Any] = {**trainer.describe(), "mode": t.mode, "source": config.data.source,
                                   "world_size": ctx.world_size,
                                   "days": [{**(m.get("stats") or {"day": d}), "resumed": True} for d, m in done]}
        partial = _partial_of(trainer, fingerprint, todo[0]) if todo else None
        if partial is not None:
            trainer.load(trainer.partial_path)
            log.info("resuming %s at step %d from the run's mid-day checkpoint", todo[0], partial["day_step"])
        elif done:
            trainer.load(trainer.snapshot_path(done[-1][0]))
            log.info("the same run completed %s before: going on from its snapshot", ", ".join(d for d, _ in done))
        elif t.mode == "incremental":
            previous = trainer.latest_snapshot_before(days[0])
            if previous is None:
                raise SnapshotError(
                    f"no snapshot before {days[0]} under {trainer.snapshots}; train the window first with --mode initial"
                )
            trainer.load(previous)
        for i, day in enumerate(todo):
            start = partial["day_step"] if partial is not None and i == 0 else 0
            stats = trainer.train_day(day, start_step=start)
            if start:
                stats["resumed_at_step"] = start
            trainer.save(trainer.snapshot_path(day), day, start + stats["steps"], stats=stats)
            if ctx.is_main and trainer.partial_path.exists():
                shutil.rmtree(trainer.partial_path, ignore_errors=True)
            summary["days"].append(stats)
        if eval_day:
            summary["eval_day"] = eval_day
            summary["eval"] = trainer.evaluate(eval_day.split(","))
            _log_eval(eval_day, summary["eval"])
            summary.update(trainer.eval_extras())
            if trainer.embedding_quality is not None:
                summary["embedding_quality"] = trainer.embedding_quality
                log.info("eval %s embeddings: %s", eval_day, "  ".join(f"{k} {v}" for k, v in trainer.embedding_quality.items()))
        summary["global_step"] = trainer.global_step
        summary["snapshot"] = str(trainer.snapshot_path(days[-1]))
        if ctx.is_main:  # summary.json: the latest run; summaries/DAY.json: the run that ended on DAY
            write_json_atomic(trainer.run_dir / "summary.json", summary)
            write_json_atomic(trainer.run_dir / "summaries" / f"{days[-1]}.json", summary)
        return summary
    finally:
        trainer.close()


def run_fingerprint(config: Any) -> str:
    """What makes two runs the same run (a re-run continues, a different one is refused): the
    resolved config without the settings that only say how to run it."""
    d = to_dict(config)
    for key in ("overwrite", "eval_day", "log_every", "threads", "pipeline", "checkpoint_every", "device"):
        d["train"].pop(key, None)
    for key in ("num_workers", "eval_batch_size"):
        d["data"].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _partial_of(trainer: Trainer, fingerprint: str, day: str) -> dict | None:
    """The meta of the run's mid-day checkpoint of ``day``, when this same run wrote it."""
    if not is_snapshot(trainer.partial_path):
        return None
    meta = read_meta(trainer.partial_path)
    return meta if meta.get("run") == fingerprint and meta.get("day") == day else None


def _plan_days(trainer: Trainer, config: RunConfig) -> list[str]:
    t, on_disk = config.train, trainer.days_on_disk
    if t.mode == "incremental":
        days = [t.day]
    else:
        days = list(t.days) or (on_disk[:-1] if len(on_disk) > 1 else on_disk)
    missing = [d for d in days if d not in on_disk]
    if missing:
        raise ValueError(f"{trainer.root / trainer.source}: no data for day(s) {missing}; it has {on_disk[0]} .. {on_disk[-1]}")
    return days


def _eval_day(trainer: Trainer, last: str, wanted: str) -> str | None:
    """The held-out day(s) to evaluate, comma-separated: ``wanted``, or the day after ``last``."""
    if wanted == "none":
        return None
    if wanted:
        missing = [d for d in wanted.split(",") if d not in trainer.days_on_disk]
        if missing:
            raise ValueError(f"train.eval_day {', '.join(missing)}: no data under {trainer.root / trainer.source}")
        return wanted
    later = [d for d in trainer.days_on_disk if d > last]
    return later[0] if later else None


def _log_eval(day: str, metrics: dict[str, dict[str, float]]) -> None:
    for label, m in metrics.items():
        oracle = f" (oracle {m['oracle_roc_auc']:.4f})" if "oracle_roc_auc" in m else ""
        log.info("eval %s %-16s ROC-AUC %.4f%s  PR-AUC %.4f  NE %.4f  calibration %.3f  (%d rows, %d positive)",
                 day, label, m["roc_auc"], oracle, m["pr_auc"], m["ne"], m["calibration"], m["count"], m["positives"])


def _days(root: Path, source: str, key: str) -> list[str]:
    src = root / source
    if not src.is_dir():
        raise ValueError(f"{src}: no such source directory")
    return day_partitions(src, key)


def _all_reduce_int(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def _same(path: Path, what: str, saved: dict, now: dict, now_name: str) -> None:
    if saved != now:
        raise SnapshotError(f"{path}: its {what} differs from {now_name} ({'; '.join(_differences(saved, now)[:5])}); "
                            "refusing to load it")


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """Where two configs or specs differ, down to the field: ``sparse user_id.num_embeddings:
    100 in the snapshot, 108 now``. Lists of named entries (features) are matched by name."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            key = f"{where}.{k}" if where else str(k)
            if k not in now:
                out.append(f"{key}: only in the snapshot")
            elif k not in saved:
                out.append(f"{key}: not in the snapshot")
            else:
                out += _differences(saved[k], now[k], key)
        return out
    named = (isinstance(saved, list) and isinstance(now, list) and all(isinstance(x, dict) and "name" in x for x in saved + now))
    if named:
        return _differences({x["name"]: x for x in saved}, {x["name"]: x for x in now}, where)
    return [] if saved == now else [f"{where}: {saved!r} in the snapshot, {now!r} now"]

