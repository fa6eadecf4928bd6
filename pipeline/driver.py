"""The daily DERM pipeline (paper Figure 1, Appendix B.2–C): for each day, incremental upstream
training of one model per source of the spec (ctr and cvr in the paper; a click log alone is one
source), inference + aggregation + publishing of their user and Pin embeddings, then training and
evaluation of one downstream model per source on them — every step a TorchX job, submitted
through TorchX's runner (``local_cwd`` by default; a cluster scheduler by ``--scheduler``), every
step skipped when its output for the day already exists.

One day ``d`` (all but the last day of the data, each evaluated on the next)::

    stage 1  upstream ctr, upstream cvr        trainer/main.py (initial on the first day, then incremental),
                                               evaluated on d+1 (contrastive loss, spread, retrieval)
    stage 2  lifecycle ctr, lifecycle cvr      embeddings/daily.py: infer d, aggregate, publish version d,
                                               measure its representation quality (quality/<source>/day=d.json)
    stage 3  downstream ctr + cvr models       trainer/main.py --task downstream: train d reading versions d-1,
             (with DERM, and the no-DERM        evaluate d+1 reading versions d; from the first day
             baseline, unless baseline=false)   that has versions d-1 (so not on the data's first day)

Upstream and downstream models train ``initial`` on their first day and ``incremental`` from the
previous snapshot after it. The settings the outputs depend on are kept in ``work/pipeline.json``;
a re-run with other settings is refused rather than mixing outputs.

Jobs of one stage run concurrently (``max_parallel``). On ``local_cwd`` with one-process jobs the
steps run chained (``chain``, ``pipeline/chain.py``): a source's upstream training and lifecycle
are one job, the day's downstream models ``max_parallel`` jobs, so torch and TorchRec start once
per job. Outputs, under ``work``::

    upstream/<ctr|cvr>/       snapshots, summaries      emb/ pool/ store/ ann/ quality/   the lifecycle
    downstream/<name>/        snapshots, summaries/DAY.json (the evaluation of the run ending on DAY)
    logs/                     every job's stdout and stderr      results.md, results.json

Usage::

    python -m pipeline --synthetic_preset=tiny             # the tiny world (generated), 3 days, local_cwd
    python -m pipeline --config configs/pipeline-demo.toml --max_parallel=1
    python -m pipeline --scheduler=kubernetes --image=REGISTRY/derm:1 --j=1x8 --gpu=8 \\
        --scheduler_args='{namespace = "derm"}' --work=/mnt/derm/pipeline --data=/mnt/derm/data

Scheduler run options come from ``scheduler_args`` and, like the ``torchx`` CLI, from
``.torchxconfig`` in the working directory (the repository's sets the Kubernetes queue).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.files import write_json_atomic  # noqa: E402
from data.synthetic.config import PRESETS  # noqa: E402
from pipeline.worklock import WorkInUse, WorkLock  # noqa: E402
from sharding.snapshot_paths import is_snapshot, latest_snapshot_before, snapshot_path  # noqa: E402

log = logging.getLogger("derm.pipeline")
ENTITIES = ("user", "pin")


@dataclass(frozen=True)
class PipelineConfig:
    """What the daily pipeline runs, on which data, and where its jobs go (flat TOML keys, or
    ``--key=value`` overrides)."""

    data: str = "runs/demo/data"
    """Dataset root: spec.toml and a folder of day partitions per source."""
    sources: tuple[str, ...] = ()
    """The spec's sources to run (each gets an upstream model, its embeddings and a downstream
    model); empty: every source of the spec. A click log alone is one source."""
    downstream_kinds: dict[str, str] = field(default_factory=dict)
    """Downstream model per source, ``ctr`` (MMoE of DCNv2 experts) or ``cvr`` (DHEN); by default
    ``cvr`` for a source named cvr and ``ctr`` for any other."""
    synthetic_preset: str = ""
    """Generate this synthetic world into ``data`` when it has no dataset (the demo config sets
    ``demo``); empty, the default: a missing dataset is an error naming the path, so a mistyped
    ``data`` never becomes a new synthetic world."""
    work: str = "runs/pipeline"
    """Where every step writes (see the module docstring)."""
    days: tuple[str, ...] = ()
    """Days to run, in order; default: every day of the data but the last. Each needs a next day
    to evaluate on."""
    scheduler: str = "local_cwd"
    """TorchX scheduler of the jobs: local_cwd, kubernetes, slurm, ... ."""
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    """The scheduler's run options (``torchx runopts <scheduler>``), e.g. {queue = "default"}."""
    image: str = "derm-trainer:latest"
    """Container image of the jobs (ignored by local_cwd)."""
    j: str = "1x1"
    """nnodes x processes per node of the training and inference jobs."""
    launcher: str = "auto"
    """How the training and inference jobs start: torchrun, python (one process, no torchrun agent;
    ``j = "1x1"`` only), or auto: python for one-process jobs on local_cwd (a few seconds less per
    job: bench/bench_startup.py), torchrun everywhere else."""
    chain: bool = True
    """With one-process jobs (launcher python), run a source's upstream training and lifecycle as
    one job, and the day's downstream models as ``max_parallel`` jobs, each running its steps in
    turn in one interpreter (``pipeline/chain.py``): torch and TorchRec are imported once per job,
    not once per step (bench/bench_startup.py). False: one job per step, as on a cluster."""
    cpu: int = 2
    gpu: int = 0
    memMB: int = 8192
    max_parallel: int = 2
    """Jobs of one stage in flight at once."""
    retries: int = 1
    """Times a failed step is submitted again before the pipeline stops (0: never). A training job
    resubmitted continues from its run's last snapshot. local_cwd itself never retries a job."""
    method: str = "ma"
    """Aggregation heuristic of the pools (paper §4.1.1): acc, ma or ap."""
    alpha: float = 0.9
    ann: bool = True
    """Build a FAISS index of every Pin version."""
    keep_versions: int = 0
    """Retention of the feature stores: after each day's publish, keep this many newest versions
    per store (never the active one or the rollback target) and drop the ANN indexes of the rest;
    0 keeps every version. At least 2: a downstream day reads yesterday's and today's versions."""
    derm: tuple[str, ...] = ()
    """The DERM embeddings the downstream models read, each ``{source}_{user|pin}`` of a source
    that runs; empty: the user and Pin embeddings of every source that runs."""
    baseline: bool = True
    """Also train each downstream model without DERM embeddings, for the lift."""
    similarity: bool = False
    """The DERM downstream models also read the cosine ⟨user, Pin⟩ of each source whose two
    embeddings they read (``derm.similarity`` of trainer.config.DERMJoinConfig; beyond the paper)."""
    min_positives: int = 100
    """A label with fewer positive rows on an eval day is reported as "too few positives (n)"
    rather than with an AUC that noise would dominate."""
    downstream_features: tuple[str, ...] = ()
    """The downstream models' restricted feature set (empty: all of the source's)."""
    seed: int = 0
    """Seed of every training job (``train.seed``): the demo's figures are given for seeds 0, 1 and 2."""
    upstream_overrides: tuple[str, ...] = ()
    """Extra ``--section.field=value`` for trainer/main.py (e.g. ``--data.batch_size=1024``)."""
    downstream_overrides: tuple[str, ...] = ()
    """Extra ``--section.field=value`` for trainer/main.py --task downstream."""

    def __post_init__(self) -> None:
        if self.method not in ("acc", "ma", "ap"):
            raise ValueError(f"method must be acc, ma or ap, got {self.method!r}")
        bad = [f for f in self.derm if f.rpartition("_")[2] not in ENTITIES or not f.rpartition("_")[0]]
        if bad:
            raise ValueError(f"derm: {bad} not of the form {{source}}_{{user|pin}}, e.g. 'ctr_user'")
        kinds = [k for k in self.downstream_kinds.values() if k not in ("ctr", "cvr")]
        if kinds:
            raise ValueError(f"downstream_kinds: {kinds} is not ctr or cvr")
        if self.min_positives < 1:
            raise ValueError(f"min_positives must be >= 1, got {self.min_positives}")
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {self.max_parallel}")
        if self.keep_versions < 0 or self.keep_versions == 1:
            raise ValueError(f"keep_versions must be 0 (keep all) or >= 2 (a downstream day reads two versions), got {self.keep_versions}")
        if self.launcher not in ("auto", "torchrun", "python"):
            raise ValueError(f"launcher must be auto, torchrun or python, got {self.launcher!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.synthetic_preset and self.synthetic_preset not in PRESETS:
            raise ValueError(f"synthetic_preset must be one of {sorted(PRESETS)} or empty, got {self.synthetic_preset!r}")
        from embeddings.heuristics import Heuristic

        try:  # the lifecycle's own check, here before the first job rather than in the lifecycle job
            Heuristic(self.method, self.alpha if self.method == "ma" else None)
        except ValueError as e:
            raise ValueError(f"{e} (pipeline setting method = {self.method!r}, alpha = {self.alpha})") from None
        nodes, _, procs = self.j.partition("x")
        if not (nodes.isdigit() and procs.isdigit() and int(nodes) >= 1 and int(procs) >= 1):
            raise ValueError(f"j must be NODESxPROCS, e.g. '1x2', got {self.j!r}")
        for key in ("cpu", "memMB"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.gpu < 0:
            raise ValueError(f"gpu must be >= 0, got {self.gpu}")


@dataclass
class Step:
    """One job of the pipeline: its name, whether it is done, and the AppDef to run otherwise."""

    name: str
    done: Callable[[], bool]
    app: Callable[[], Any]


class Pipeline:
    """Plans the steps of each day and runs the ones not done yet through TorchX's runner."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.work = Path(config.work)
        self.data = Path(config.data)
        self.submitted: list[str] = []
        self.lock = WorkLock(self.work, config.scheduler)
        self._sources: list[str] | None = None
        self._day_key = "day"  # the spec's day partition key (spec.keys.day), read with the sources

    # ---- the plan ---------------------------------------------------------------------------
    def sources(self) -> list[str]:
        """The sources that run, in the spec's order (refusing any the spec does not have)."""
        if self._sources is None:
            self._sources = self._plan_sources()
        return list(self._sources)

    def _plan_sources(self) -> list[str]:
        from data.spec import load_spec

        spec = load_spec(self.data / "spec.toml")
        self._day_key = spec.keys.day
        wanted = list(self.config.sources) or list(spec.source_names)
        missing = [s for s in wanted if s not in spec.source_names]
        if missing:
            raise ValueError(f"sources {missing}: not sources of {self.data / 'spec.toml'}; it has {list(spec.source_names)}")
        unknown = sorted(set(self.config.downstream_kinds) - set(wanted))
        if unknown:
            raise ValueError(f"downstream_kinds names {unknown}, which do not run; the sources are {wanted}")
        return wanted

    def derm(self) -> list[str]:
        """The embeddings the DERM downstream models read: ``derm``, or every source's user and Pin."""
        sources = self.sources()
        if not self.config.derm:
            return [f"{s}_{e}" for s in sources for e in ENTITIES]
        absent = [f for f in self.config.derm if f.rpartition("_")[0] not in sources]
        if absent:
            raise ValueError(f"derm {absent}: no source of that name runs, so nothing publishes them; the sources are {sources} "
                             f"(embeddings {[f'{s}_{e}' for s in sources for e in ENTITIES]})")
        return list(self.config.derm)

    def kind(self, source: str) -> str:
        return self.config.downstream_kinds.get(source, "cvr" if source == "cvr" else "ctr")

    def days(self) -> tuple[list[str], dict[str, str]]:
        """The days to run and, for each, the day it is evaluated on."""
        self.derm()  # refuses an impossible request before anything runs
        on_disk = self._on_disk()
        if len(on_disk) < 2:
            raise ValueError(f"{self.data}: the pipeline needs at least two days of {' and '.join(self.sources())}; it has {on_disk}")
        days = list(self.config.days) or on_disk[:-1]
        bad = [d for d in days if d not in on_disk[:-1]]
        if bad:
            raise ValueError(f"days {bad}: each day needs data and a later day to evaluate on; {self.data} has {on_disk}")
        return days, {d: on_disk[on_disk.index(d) + 1] for d in days}

    def stages(self, day: str, eval_day: str) -> list[list[Step]]:
        """The day's three stages: upstream, lifecycle, downstream. Chained (``chain``), the
        lifecycle of each source runs in its upstream job, so the second stage is empty, and the
        downstream models are dealt round-robin to ``max_parallel`` jobs."""
        sources = self.sources()
        upstream = [self._upstream(s, day, eval_day) for s in sources]
        lifecycle = [self._lifecycle(s, day) for s in sources]
        downstream = [self._downstream(s, derm, day, eval_day) for s in sources for derm in self._variants()]
        if not self.chained():
            return [upstream, lifecycle, downstream]
        n = min(self.config.max_parallel, len(downstream))
        groups = [downstream[i::n] for i in range(n)]
        return [[self._chain(f"upstream+lifecycle {s}", f"derm/upstream-lifecycle-{s}-{day}", [u, lc])
                 for s, u, lc in zip(sources, upstream, lifecycle)],
                [],
                [self._chain(f"downstream {'+'.join(runs)}", f"derm/downstream-{'-'.join(runs)}-{day}", group)
                 for group in groups for runs in [[t.name.split()[-1] for t in group]]]]

    def chained(self) -> bool:
        """Whether the steps run chained: ``chain`` and one-process jobs."""
        return self.config.chain and self._resources().get("launcher") == "python"

    @staticmethod
    def _chain(name: str, job_name: str, steps: list[Step]) -> Step:
        """One job running ``steps`` in turn: done when all are; submitted with the ones not done."""
        from torchx_components.jobs import chain_job

        if len(steps) == 1:
            return steps[0]
        return Step(name, lambda: all(s.done() for s in steps), lambda: chain_job(job_name, [s.app() for s in steps if not s.done()]))

    def has_yesterday(self, day: str) -> bool:
        """Whether every source published the day before ``day``: the downstream models of a day
        train on its embeddings, so they start on the first day that has them (before it, the DERM
        projection would train on zeros alone and meet real embeddings only at evaluation)."""
        from embeddings.version_quality import quality_path

        on_disk = self._on_disk()
        i = on_disk.index(day)
        # The quality report is the lifecycle's last output: the day was published (its versions
        # may be pruned since, keep_versions).
        return i > 0 and all(quality_path(self.work, s, on_disk[i - 1]).is_file() for s in self.sources())

    def _on_disk(self) -> list[str]:
        from data.loader import day_partitions

        sources = self.sources()
        absent = [s for s in sources if not (self.data / s).is_dir()]
        if absent:
            raise ValueError(f"{self.data}: no day partitions for source(s) {absent} "
                             f"(expected {self.data}/<source>/{self._day_key}=YYYY-MM-DD)")
        return sorted(set.intersection(*(set(day_partitions(self.data / s, self._day_key)) for s in sources)))

    @staticmethod
    def _trained_before(run_dir: Path, day: str) -> bool:
        """A snapshot of an earlier day exists: train ``day`` incrementally from it."""
        return latest_snapshot_before(run_dir / "snapshots", day) is not None

    def _variants(self) -> list[bool]:
        return [True, False] if self.config.baseline else [True]

    def _resources(self) -> dict[str, Any]:
        c = self.config
        out = {"image": c.image, "j": c.j, "cpu": c.cpu, "gpu": c.gpu, "memMB": c.memMB}
        if c.launcher == "python" or (c.launcher == "auto" and c.scheduler == "local_cwd" and c.j == "1x1"):
            out["launcher"] = "python"  # one process here: no torchrun agent to start
        threads = self.threads_per_rank()
        if threads:
            out["env"] = {"DERM_THREADS": str(threads)}
        return out

    def threads_per_rank(self) -> int | None:
        """local_cwd runs a stage's jobs side by side on this host: each rank gets its share of the
        cores (``DERM_THREADS``), since OpenMP threads that lose their core to another job stall
        (5-13x slower steps: ``sharding.distributed.set_threads``). None elsewhere: a cluster job owns its ``cpu``."""
        if self.config.scheduler != "local_cwd":
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks = int(self.config.j.split("x")[-1]) if "x" in self.config.j else 1
        return max(1, cores // (self.config.max_parallel * ranks))

    def _upstream_args(self, source: str, eval_day: str) -> list[str]:
        """trainer/main.py's overrides for the upstream model of ``source``. Evaluated on the next
        day, so that summaries/DAY.json carries the contrastive loss, the temperature and the
        spread of the model whose embeddings the lifecycle publishes."""
        return [f"--data.root={self.data}", f"--data.source={source}", f"--train.run_dir={self.work / 'upstream' / source}",
                "--train.overwrite=true", f'--train.eval_day="{eval_day}"', "--data.synthetic_preset=",
                f"--train.seed={self.config.seed}", *self.config.upstream_overrides]

    def _downstream_args(self, source: str, with_derm: bool) -> list[str]:
        """trainer/main.py --task downstream's overrides for one downstream model."""
        c = self.config
        return [f"--data.root={self.data}", f"--data.source={source}", f"--train.run_dir={self.run_dir(source, with_derm)}",
                "--train.overwrite=true", f"--derm.features={json.dumps(self.derm() if with_derm else [])}",
                f"--derm.store_root={self.work / 'store'}", f"--derm.similarity={'true' if c.similarity and with_derm else 'false'}",
                f"--model.features={json.dumps(list(c.downstream_features))}", "--data.synthetic_preset=",
                f"--train.seed={c.seed}", *c.downstream_overrides]

    def validate(self, day: str, eval_day: str) -> None:
        """Parses every job's trainer arguments as its job would (``trainer.main.parse_args``), so
        a bad override (an unknown key, a wrong type) is refused before the first job, not by the
        first job of its kind after hours of others."""
        from trainer.main import parse_args

        for source in self.sources():
            argv = [*self._upstream_args(source, eval_day), "--mode", "initial", "--days", day]
            self._parse(parse_args, argv, f"upstream_overrides (the upstream {source} model)")
            for with_derm in self._variants():
                argv = ["--task=downstream", f"--kind={self.kind(source)}", *self._downstream_args(source, with_derm),
                        "--mode", "initial", "--days", day, "--eval-day", eval_day]
                self._parse(parse_args, argv, f"downstream_overrides (the downstream {self.run_dir(source, with_derm).name} model)")

    @staticmethod
    def _parse(parse_args: Callable, argv: list[str], what: str) -> None:
        import contextlib
        import io

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(argv)
        except SystemExit:  # argparse's error: its last line says what
            raise ValueError(f"{what}: {err.getvalue().strip().splitlines()[-1]}") from None
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    def _upstream(self, source: str, day: str, eval_day: str) -> Step:
        from torchx_components import train

        run_dir = self.work / "upstream" / source
        args = self._upstream_args(source, eval_day)

        def app():  # decided at submission, once the earlier days are done
            if self._trained_before(run_dir, day):
                return train.incremental(*args, day=day, name=f"derm/upstream-{source}-{day}", **self._resources())
            return train.initial(*args, days=day, name=f"derm/upstream-{source}-{day}", **self._resources())

        return Step(f"upstream {source}", lambda: is_snapshot(snapshot_path(run_dir / "snapshots", day)), app)

    def _lifecycle(self, source: str, day: str) -> Step:
        from embeddings.version_quality import quality_path
        from torchx_components import lifecycle

        snapshot = snapshot_path(self.work / "upstream" / source / "snapshots", day)
        c = self.config

        def app():
            return lifecycle.daily(str(snapshot), str(self.data), day, str(self.work), method=c.method, alpha=c.alpha,
                                   ann=c.ann, keep_versions=c.keep_versions, name=f"derm/lifecycle-{source}-{day}",
                                   **self._resources())

        def done():
            return quality_path(self.work, source, day).is_file()  # written last, after the versions and the index

        return Step(f"lifecycle {source}", done, app)

    def run_dir(self, source: str, with_derm: bool) -> Path:
        return self.work / "downstream" / f"{source}-{'derm' if with_derm else 'baseline'}"

    def _downstream(self, source: str, with_derm: bool, day: str, eval_day: str) -> Step:
        from torchx_components import downstream

        run_dir = self.run_dir(source, with_derm)
        kind = self.kind(source)
        args = self._downstream_args(source, with_derm)

        def app():
            mode = {"mode": "incremental", "day": day} if self._trained_before(run_dir, day) else {"mode": "initial", "days": day}
            return downstream.train(*args, kind=kind, eval_day=eval_day, name=f"derm/downstream-{run_dir.name}-{day}",
                                    **mode, **self._resources())

        return Step(f"downstream {run_dir.name}", lambda: (run_dir / "summaries" / f"{day}.json").is_file(), app)

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from torchx.runner import get_runner

        days, eval_days = self.days()
        self.validate(days[0], eval_days[days[0]])
        downstream_days = []
        # SIGTERM (a scheduler stopping the driver, `kill`) unwinds like Ctrl-C: the jobs in flight
        # are cancelled on the way out (_run_stage), and the runner closes the local ones.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        try:
            with get_runner() as runner, self.lock:
                stopped = self.lock.acquire(runner)
                if stopped:
                    log.warning("stopped %d orphaned job(s) of a dead driver: %s", len(stopped), ", ".join(stopped))
                self._check_settings()
                if self.config.scheduler == "local_cwd":
                    os.environ["PATH"] = local_job_path(os.environ.get("PATH", ""))
                log.info("pipeline over %s (%d day(s)) on %s; work %s", ", ".join(days), len(days), self.config.scheduler, self.work)
                for day in days:
                    upstream, lifecycle, downstream = self.stages(day, eval_days[day])
                    self._run_stage(runner, day, upstream)
                    self._run_stage(runner, day, lifecycle)
                    if not self.has_yesterday(day):
                        log.info("%s downstream models start on the first day with yesterday's embeddings: not this one", day)
                        continue
                    self._run_stage(runner, day, downstream)
                    downstream_days.append(day)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        results = self.results(days, downstream_days, eval_days)
        self._write_results(results)
        return results

    def scheduler_cfg(self) -> dict[str, Any]:
        """The scheduler's run options: ``scheduler_args``, then what ``.torchxconfig`` in the
        working directory sets for the scheduler (as the ``torchx`` CLI reads it, e.g. the
        Kubernetes queue), then job logs under ``work/logs`` for local_cwd."""
        from torchx.runner.config import apply

        cfg = dict(self.config.scheduler_args)
        apply(scheduler=self.config.scheduler, cfg=cfg)
        if self.config.scheduler == "local_cwd":
            cfg.setdefault("log_dir", str(self.work / "logs"))
        return cfg

    SETTINGS = {"upstream": ("data", "sources", "seed", "upstream_overrides"),
                "lifecycle": ("method", "alpha", "ann"),
                "downstream": ("downstream_kinds", "derm", "similarity", "downstream_features", "downstream_overrides")}
    """What the outputs under ``work`` depend on, by the first stage whose outputs they shape (each
    later stage reads the earlier ones' outputs, so it depends on their settings too)."""

    def settings(self) -> dict[str, Any]:
        """What the outputs under ``work`` depend on (not where or how the jobs run)."""
        keys = [k for stage in self.SETTINGS.values() for k in stage]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self.config, k)) for k in keys)}

    def _check_settings(self) -> None:
        """Refuses to continue a work folder whose finished outputs were made with other settings:
        they would be skipped and reported under settings they were not made with. A setting may
        change while no output it shapes exists yet (a first day whose lifecycle failed on a bad
        alpha: the upstream snapshots are kept, alpha may be corrected). A setting newer than the
        folder counts as made with its default."""
        path, now = self.work / "pipeline.json", self.settings()
        if path.is_file():
            saved, defaults = json.loads(path.read_text()), Pipeline(PipelineConfig()).settings()
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))
            if not differ:
                return
            done = self.stages_with_outputs()
            names = list(self.SETTINGS)
            locked = [k for k in differ if any(names.index(stage) >= names.index(self._stage_of(k)) for stage in done)]
            if locked:
                raise ValueError(f"{self.work} was made with other settings ({', '.join(locked)} differ; see {path}) and "
                                 f"has outputs made with them ({', '.join(sorted(done))}); use another work folder, or remove "
                                 "this one to start over")
            # A training job's mid-day checkpoint carries its run's fingerprint and resumes only under it.
            log.info("%s: %s changed; no finished output depends on them, going on with the new values", self.work,
                     ", ".join(differ))
        write_json_atomic(path, now)

    def _stage_of(self, key: str) -> str:
        return next((stage for stage, keys in self.SETTINGS.items() if key in keys), "upstream")

    def stages_with_outputs(self) -> set[str]:
        """The stages (upstream, lifecycle, downstream) with a finished step on any day."""
        days, eval_days = self.days()
        steps = {"upstream": lambda s, d, e: [self._upstream(s, d, e)], "lifecycle": lambda s, d, e: [self._lifecycle(s, d)],
                 "downstream": lambda s, d, e: [self._downstream(s, v, d, e) for v in self._variants()]}
        return {stage for stage, make in steps.items()
                if any(step.done() for d in days for s in self.sources() for step in make(s, d, eval_days[d]))}

    def _run_stage(self, runner, day: str, steps: list[Step]) -> None:
        """Runs the stage's steps not done yet, ``max_parallel`` at a time; a failed step is
        submitted again up to ``retries`` times, then the stage's other jobs are cancelled and the
        pipeline stops. On any exit by an exception (Ctrl-C, SIGTERM included) the jobs in flight
        are cancelled."""
        todo = [(s, 0) for s in steps if not s.done()]
        for s in steps:
            if all(s is not t for t, _ in todo):
                log.info("%s %-26s done already; skipped", day, s.name)
        cfg = self.scheduler_cfg()
        in_flight: list[tuple[Step, int, str, float]] = []
        try:
            while todo or in_flight:
                while todo and len(in_flight) < self.config.max_parallel:
                    s, attempt = todo.pop(0)
                    handle = runner.run(s.app(), scheduler=self.config.scheduler, cfg=cfg)
                    self.lock.submitted(handle, runner)
                    self.submitted.append(f"{day} {s.name}")
                    log.info("%s %-26s submitted: %s%s", day, s.name, handle, f" (retry {attempt})" if attempt else "")
                    in_flight.append((s, attempt, handle, time.perf_counter()))
                s, attempt, handle, t0 = in_flight.pop(0)
                status = runner.wait(handle, wait_interval=1)
                self.lock.finished(handle)
                state = status.state.name if status is not None else "UNKNOWN"
                problem = None
                if state != "SUCCEEDED":
                    problem = f"{day} {s.name}: job {handle} ended {state}\n{_log_tail(runner, handle)}"
                elif not s.done():
                    problem = f"{day} {s.name}: job {handle} succeeded but left no output for {day}"
                if problem and attempt < self.config.retries:
                    log.warning("%s; submitting it again (%d of %d)", problem, attempt + 1, self.config.retries)
                    todo.insert(0, (s, attempt + 1))
                elif problem:
                    raise PipelineError(problem)
                else:
                    log.info("%s %-26s succeeded in %.0f s", day, s.name, time.perf_counter() - t0)
        except BaseException:
            # Stop the stage's other jobs before leaving: a re-run of the pipeline must not find
            # them still writing the outputs it is about to redo.
            for _, _, other, _ in in_flight:
                runner.cancel(other)
                runner.wait(other, wait_interval=1)
                self.lock.finished(other)
            raise

    # ---- results ----------------------------------------------------------------------------
    def results(self, days: list[str], downstream_days: list[str], eval_days: dict[str, str]) -> dict[str, Any]:
        """Per downstream day and model: eval metrics with DERM, without (baseline), and the lift;
        the examples and steps each model has trained on so far, the eval day's positives and the
        DERM embeddings' coverage of its rows. A label with fewer than ``min_positives`` positives
        gets no AUCs (``too_few_positives``)."""
        rows = []
        for day in downstream_days:
            for source in self.sources():
                runs = {v: self._trained_until(source, v, day, downstream_days) for v in self._variants()}
                summary = runs[True]["summary"]
                for label, m in summary["eval"].items():
                    few = m["positives"] < self.config.min_positives
                    row = {"day": day, "eval_day": eval_days[day], "model": source, "kind": self.kind(source), "label": label,
                           "positives": m["positives"], "rows": m["count"], "too_few_positives": few,
                           "roc_auc": None if few else m["roc_auc"], "pr_auc": None if few else m["pr_auc"],
                           "oracle_roc_auc": None if few else m.get("oracle_roc_auc"),
                           "train_examples": runs[True]["examples"], "train_steps": runs[True]["steps"],
                           "coverage": summary.get("coverage", {})}
                    if False in runs:
                        b = runs[False]["summary"]["eval"][label]
                        row.update(baseline_train_examples=runs[False]["examples"], baseline_train_steps=runs[False]["steps"])
                        row.update(baseline_roc_auc=None, baseline_pr_auc=None, roc_auc_lift_pct=None, pr_auc_lift_pct=None)
                        if not few:
                            row.update(baseline_roc_auc=b["roc_auc"], baseline_pr_auc=b["pr_auc"],
                                       roc_auc_lift_pct=100 * (m["roc_auc"] / b["roc_auc"] - 1),
                                       pr_auc_lift_pct=100 * (m["pr_auc"] / b["pr_auc"] - 1))
                    rows.append(row)
        return {"days": days, "downstream_days": downstream_days, "sources": self.sources(), "derm": self.derm(),
                "method": self.config.method,
                "alpha": self.config.alpha, "similarity": self.config.similarity, "min_positives": self.config.min_positives,
                "rows": rows, "upstream": self.upstream_eval(days), "embedding_quality": self.embedding_quality(days),
                "jobs_submitted": self.submitted}

    def _trained_until(self, source: str, with_derm: bool, day: str, downstream_days: list[str]) -> dict[str, Any]:
        """The summary of the run of ``source`` that ended on ``day``, and the examples and steps
        the model has trained on up to it (incremental runs: every downstream day so far)."""
        run_dir = self.run_dir(source, with_derm)
        summaries = [_read_json(run_dir / "summaries" / f"{d}.json") for d in downstream_days if d <= day]
        return {"summary": summaries[-1], "steps": summaries[-1]["global_step"],
                "examples": sum(s["examples"] for summary in summaries for s in summary["days"])}

    def upstream_eval(self, days: list[str]) -> list[dict[str, Any]]:
        """Per day, source and label: the upstream model trained up to the day, evaluated on the
        next day (its ROC-AUC, PR-AUC and positives; None where the run did not evaluate)."""
        out = []
        for day in days:
            for source in self.sources():
                path = self.work / "upstream" / source / "summaries" / f"{day}.json"
                summary = _read_json(path) if path.is_file() else {}
                for label, m in (summary.get("eval") or {}).items():
                    few = m["positives"] < self.config.min_positives
                    out.append({"day": day, "eval_day": summary.get("eval_day"), "model": source, "label": label,
                                "positives": m["positives"], "too_few_positives": few,
                                "roc_auc": None if few else m["roc_auc"], "pr_auc": None if few else m["pr_auc"]})
        return out

    def embedding_quality(self, days: list[str]) -> list[dict[str, Any]]:
        """One entry per day and published embedding (ctr_user, ctr_pin, cvr_user, cvr_pin): spread,
        alignment and next-day retrieval from the lifecycle's report (retrieval belongs to the
        user/Pin pair, so a source's two entries carry the same figures), and the contrastive loss,
        ln B and temperature of the upstream run that ended on the day (None where it did not
        evaluate)."""
        from embeddings.version_quality import RECALL_KS, quality_path

        recall_keys = [f"{kind}recall_at_{k}" for kind in ("", "popularity_") for k in RECALL_KS]
        entries = []
        for day in days:
            for source in self.sources():
                report = _read_json(quality_path(self.work, source, day))
                retrieval = report["retrieval"] or {}
                summary = self.work / "upstream" / source / "summaries" / f"{day}.json"
                trained = _read_json(summary).get("embedding_quality", {}) if summary.is_file() else {}
                for entity in ENTITIES:
                    version = report[entity]
                    entries.append({
                        "day": day, "embedding": f"{source}_{entity}", "dim": version["dim"],
                        **{k: version.get(k) for k in ("mean_pairwise_cosine", "effective_rank", "procrustes_residual",
                                                        "self_cosine")},
                        "eval_day": retrieval.get("eval_day"), **{k: retrieval.get(k) for k in recall_keys},
                        **{k: trained.get(k) for k in ("contrastive_loss", "ln_batch", "temperature")},
                    })
        return entries

    def _write_results(self, results: dict[str, Any]) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "results.json").write_text(json.dumps(results, indent=1))
        (self.work / "results.md").write_text(results_table(results) + "\n\n" + upstream_table(results) + "\n\n"
                                              + quality_table(results) + "\n")


def results_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (what the pipeline prints at the end)."""
    head = ("| trained | eval | model | label | ROC-AUC | baseline | lift % | PR-AUC | baseline | lift % | oracle AUC "
            f"| positives | examples (steps) | coverage: {' '.join(results['derm']) or '–'} |")
    lines = [head, "|" + "---|" * 14]

    def num(v, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in results["rows"]:
        coverage = " ".join(f"{v:.0%}" for v in r.get("coverage", {}).values()) or "–"
        seen = f"{r['train_examples']:,} ({r['train_steps']})"
        if r.get("too_few_positives"):
            metrics = [f"too few positives ({r['positives']})"] + ["–"] * 6
        else:
            metrics = [num(r["roc_auc"], ".4f"), num(r.get("baseline_roc_auc"), ".4f"), num(r.get("roc_auc_lift_pct"), "+.2f"),
                       num(r["pr_auc"], ".4f"), num(r.get("baseline_pr_auc"), ".4f"), num(r.get("pr_auc_lift_pct"), "+.2f"),
                       num(r.get("oracle_roc_auc"), ".4f")]
        lines.append("| " + " | ".join([r["day"], r["eval_day"], r["model"], r["label"], *metrics, str(r["positives"]), seen,
                                         coverage]) + " |")
    return "\n".join(lines)


def upstream_table(results: dict[str, Any]) -> str:
    """The upstream models' own evaluation on the next day, as a markdown table."""
    lines = ["| trained | eval | upstream model | label | ROC-AUC | PR-AUC | positives |", "|" + "---|" * 7]
    for r in results.get("upstream", []):
        auc = (["too few positives", "–"] if r["too_few_positives"] else [format(r["roc_auc"], ".4f"), format(r["pr_auc"], ".4f")])
        lines.append("| " + " | ".join([r["day"], str(r["eval_day"]), r["model"], r["label"], *auc, str(r["positives"])]) + " |")
    return "\n".join(lines)


def quality_table(results: dict[str, Any]) -> str:
    """Representation quality per day and embedding as a markdown table (printed after the lift
    table): spread (cosine of random pairs, lower is better; effective rank of E, higher), the
    Procrustes residual against the day before, next-day recall@100 of the ctr or cvr pair beside
    the popularity ranking's, and the upstream model's contrastive loss against ln B (chance)."""
    def num(v, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    head = ("| day | embedding | mean cos | eff. rank | Procrustes | recall@10 | recall@100 | popularity@100 "
            "| contrastive | ln B | τ |")
    lines = [head, "|" + "---|" * 11]
    for q in results["embedding_quality"]:
        cells = [q["day"], q["embedding"], num(q["mean_pairwise_cosine"], ".3f"),
                 f"{num(q['effective_rank'], '.1f')} / {q['dim']}", num(q["procrustes_residual"], ".3f"),
                 num(q["recall_at_10"], ".3f"), num(q["recall_at_100"], ".3f"), num(q["popularity_recall_at_100"], ".3f"),
                 num(q["contrastive_loss"], ".3f"), num(q["ln_batch"], ".2f"), num(q["temperature"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _raise_interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class PipelineError(RuntimeError):
    """A job of the pipeline failed (the message names the day, the step and the job's log tail)."""


def _log_tail(runner, handle: str, lines: int = 30) -> str:
    try:
        from torchx.specs import parse_app_handle

        app_id = parse_app_handle(handle).app_id
        desc = runner.describe(handle)
        text = []
        for role in desc.roles if desc else []:
            text += [t.rstrip("\n") for t in runner.log_lines(handle, role.name, k=0)]
        # torchrun ends a failed job with its own traceback; the job's error is above it.
        cut = next((i for i, t in enumerate(text) if t.startswith("Traceback")
                    and any("torch/distributed/run.py" in x for x in text[i:i + 40])), len(text))
        return f"last lines of the job's log ({app_id}):\n" + "\n".join(text[:cut][-lines:])
    except Exception as e:  # the scheduler may not keep logs; the failure itself is what matters
        return f"(no log available: {e})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; re-run the pipeline to redo that step") from None


def _ensure_data(config: PipelineConfig) -> None:
    root = Path(config.data)
    if (root / "spec.toml").exists():
        return
    if not config.synthetic_preset:
        raise ValueError(f"{root}: no dataset there (no spec.toml); check the data path, or set synthetic_preset "
                         f"(one of {sorted(PRESETS)}) to generate a synthetic world there")
    from data.synthetic import generate

    log.info("no data in %s: generating the %s synthetic world there", root, config.synthetic_preset)
    generate(root, PRESETS[config.synthetic_preset], seed=0)


def local_job_path(path: str, executable: str = sys.executable) -> str:
    """``PATH`` for jobs run on this host (local_cwd): the driver's interpreter's folder first, so
    that the jobs' ``python`` and ``torchrun`` are the driver's, from its virtual environment, even
    when that environment is not activated (``.venv/bin/python -m pipeline``). The folder, not
    the resolved interpreter: a virtual environment's ``python`` is a link out of it."""
    folder = str(Path(executable).parent)
    parts = path.split(os.pathsep) if path else []
    return path if parts[:1] == [folder] else os.pathsep.join([folder, *parts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="pipeline config TOML (flat keys of PipelineConfig)")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; settings are written --key=value")

    from torchx.schedulers.local_scheduler import SignalException

    from common.config import load_config
    from common.log import setup_logging

    setup_logging()
    try:
        config = load_config(args.config, rest, cls=PipelineConfig)
        _ensure_data(config)
        t0 = time.perf_counter()
        results = Pipeline(config).run()
    except (ValueError, PipelineError, WorkInUse) as e:
        log.error("%s", e)
        return 2
    except (KeyboardInterrupt, SignalException) as e:  # TorchX's local scheduler turns SIGTERM into the latter
        log.error("stopped (%s); the jobs in flight were cancelled, finished steps are kept: run the same command "
                  "to go on", e or "Ctrl-C")
        return 130
    print(f"\nDERM pipeline: {len(results['days'])} day(s), {len(results['jobs_submitted'])} job(s) run in "
          f"{time.perf_counter() - t0:.0f} s; downstream models with DERM embeddings {results['derm']} "
          f"({results['method']} pools) against the same models without:\n")
    print(results_table(results))
    print("\nRepresentation quality of the published embeddings (lifecycle, quality/; contrastive loss: the upstream "
          "model's on the next day, chance = ln B):\n")
    print(quality_table(results))
    print("\nThe upstream models on the next day:\n")
    print(upstream_table(results))
    print(f"\n{config.work}/results.md, results.json; job logs in {config.work}/logs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
