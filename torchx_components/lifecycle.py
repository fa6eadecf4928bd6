"""Embedding-lifecycle jobs: daily inference and back-inference of ``embeddings/infer.py``,
aggregation, publishing, and ``daily`` (all three for one upstream model and day).

Built on ``torchx.components.dist.ddp`` (torchrun), like the training components, so the sharded
snapshot is read by as many ranks as the job has, each loading only its shards::

    # back-inference of three days with the day-3 snapshot, 2 local processes
    torchx run -s local_cwd torchx_components/lifecycle.py:infer \\
        --snapshot runs/demo/ctr/snapshots/day=2026-01-03 --data runs/demo/data \\
        --days 2026-01-01,2026-01-02,2026-01-03 --out runs/demo/emb
    # the same on Kubernetes, 2 nodes x 8 GPUs (print the job instead of submitting it)
    torchx run --dryrun -s kubernetes torchx_components/lifecycle.py:infer -j 2x8 --gpu 8 ...
"""
from typing import Dict, List, Optional

import torchx.specs as specs

from torchx_components.jobs import documented_job_args, python_module_job, split_days, torchrun_job
from torchx_components.train import DERM_IMAGE

INFER_SCRIPT = "embeddings/infer.py"
DAILY_SCRIPT = "embeddings/daily.py"


@documented_job_args
def infer(
    snapshot: str,
    data: str,
    days: str,
    out: str,
    batch_size: int = 4096,
    overwrite: bool = False,
    image: str = DERM_IMAGE,
    name: str = "derm/derm-infer",
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    launcher: str = "torchrun",
) -> specs.AppDef:
    """
    Daily inference (one day) or back-inference (several) of user and Pin embeddings from a snapshot.

    Each entity is embedded once per day, from its last row of the day (dedup first), by the rank
    its id hashes to; output goes to OUT/<source>/<user|pin>/day=YYYY-MM-DD/.

    Args:
        snapshot: snapshot directory, RUN_DIR/snapshots/day=YYYY-MM-DD
        data: dataset root (spec.toml and the source's day partitions)
        days: comma-separated days to embed; several days are back-inference with the one snapshot
        out: output root of the daily embeddings
        batch_size: rows per forward per rank
        overwrite: replace days that already have output
    """
    args = ["--snapshot", snapshot, "--data", data, "--days", ",".join(split_days(days)), "--out", out,
            "--batch-size", str(batch_size), *(["--overwrite"] if overwrite else [])]
    return torchrun_job(INFER_SCRIPT, args, j, env, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                        max_retries=max_retries, mounts=mounts, launcher=launcher)


@documented_job_args
def aggregate(
    emb: str,
    pool: str,
    source: str,
    entity: str,
    day: str,
    method: str = "ma",
    alpha: float = 0.9,
    ttl_days: int = 90,
    num_buckets: int = 0,
    workers: int = 2,
    image: str = DERM_IMAGE,
    name: str = "derm/derm-aggregate",
    h: Optional[str] = None,
    cpu: int = 4,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Aggregates one day's embeddings of one (source, entity) into its pool: ``python -m embeddings.aggregate``.

    Re-running a day replaces that day's pool snapshot (never applies it twice).

    Args:
        emb: daily embeddings root (the infer job's --out)
        pool: pool root
        source: source model, ctr or cvr
        entity: user or pin
        day: the day to apply, YYYY-MM-DD
        method: acc, ma or ap (paper §4.1.1)
        alpha: ma only: weight on the previous pooled embedding, in [0, 1)
        ttl_days: drop entities unseen for longer than this
        num_buckets: hash buckets (0: the previous snapshot's, else 64)
        workers: buckets merged at once (one bucket of memory each)
        h: a registered named resource; takes precedence over cpu, memMB
    """
    args = ["--emb", emb, "--pool", pool, "--source", source, "--entity", entity, "--day", day,
            "--method", method, "--ttl-days", str(ttl_days), "--workers", str(workers)]
    args += ["--alpha", str(alpha)] if method == "ma" else []
    args += ["--num-buckets", str(num_buckets)] if num_buckets else []
    return python_module_job(name, image, "embeddings.aggregate", args, cpu, memMB, h, env, max_retries, mounts)


@documented_job_args
def publish(
    pool_day: str,
    version: str,
    store: str = "",
    redis: str = "",
    namespace: str = "derm",
    ann_dir: str = "",
    activate: bool = True,
    image: str = DERM_IMAGE,
    name: str = "derm/derm-publish",
    h: Optional[str] = None,
    cpu: int = 4,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Publishes a pool day as an immutable feature-store version (and a FAISS index for Pins): ``python -m embeddings.publish``.

    The new version becomes active only once it is complete; a failure leaves the active one as it was.

    Args:
        pool_day: the pool snapshot to publish, POOL/<source>/<entity>/day=YYYY-MM-DD
        version: name of the new version, e.g. ctr-user-2026-01-03
        store: embedded feature store directory (give this or redis)
        redis: Redis URL of the serving store, e.g. redis://redis:6379/0 (give this or store)
        namespace: Redis key prefix, one per source and entity
        ann_dir: also build a FAISS index into ANN_DIR/VERSION (Pin pools)
        activate: activate the version once written (false: commit only)
        h: a registered named resource; takes precedence over cpu, memMB
    """
    if bool(store) == bool(redis):
        raise ValueError("give exactly one of --store DIR and --redis URL")
    args = ["--pool", pool_day, "--version", version]
    args += ["--store", store] if store else ["--redis", redis, "--namespace", namespace]
    args += ["--ann-dir", ann_dir] if ann_dir else []
    args += [] if activate else ["--no-activate"]
    return python_module_job(name, image, "embeddings.publish", args, cpu, memMB, h, env, max_retries, mounts)


@documented_job_args
def daily(
    snapshot: str,
    data: str,
    day: str,
    work: str,
    method: str = "ma",
    alpha: float = 0.9,
    ann: bool = True,
    batch_size: int = 4096,
    keep_versions: int = 0,
    image: str = DERM_IMAGE,
    name: str = "derm/derm-lifecycle",
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    launcher: str = "torchrun",
) -> specs.AppDef:
    """
    One day of the lifecycle for one upstream model: inference, aggregation and publishing of its
    users and Pins, then their representation quality (``embeddings/daily.py``); parts already
    done are skipped.

    Args:
        snapshot: the upstream snapshot of the day, RUN_DIR/snapshots/day=YYYY-MM-DD
        data: dataset root (spec.toml and the source's day partitions)
        day: the day, YYYY-MM-DD
        work: pipeline work folder: emb/, pool/, store/, ann/ and quality/ under it
        method: aggregation heuristic, acc, ma or ap (paper §4.1.1)
        alpha: ma only: weight on the previous pooled embedding, in [0, 1)
        ann: also build a FAISS index of the Pin version
        batch_size: rows per inference forward per rank
        keep_versions: after publishing, prune each store to this many newest versions (0: keep all)
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}: inference ranks; rank 0 aggregates, publishes and measures
    """
    if method not in ("acc", "ma", "ap"):
        raise ValueError(f"--method {method!r}: expected acc, ma or ap")
    args = ["--snapshot", snapshot, "--data", data, "--day", day, "--work", work, "--method", method,
            "--alpha", str(alpha), "--batch-size", str(batch_size), *(["--ann"] if ann else []),
            *(["--keep-versions", str(keep_versions)] if keep_versions else [])]
    return torchrun_job(DAILY_SCRIPT, args, j, env, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                        max_retries=max_retries, mounts=mounts, launcher=launcher)
