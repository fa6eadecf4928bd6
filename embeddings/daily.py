"""One day of the embedding lifecycle for one upstream model (paper Appendix B.3, C): inference
with the day's snapshot, aggregation of users and Pins into their pools, publishing of both to the
feature store (and the Pins to a FAISS index), then the representation quality of the two new
versions (issue 11; :mod:`embeddings.version_quality`). The daily pipeline (:mod:`pipeline.driver`) runs
this as one job per upstream model and day.

Every part is skipped when its output is already complete, so a re-run after a failure picks up
where it stopped, and a re-run of a finished day does nothing. A day is done when its quality
report is written, last: after both versions are committed *and served*, each either active or
left behind a later day's version that is active (a re-run of an old day never takes serving
back). Both versions are committed (and the Pins' index built) before either is activated, so
serving pairs two days' versions only between the two activations. A version committed by a job
killed before its activation is completed by the re-run (``embeddings.publish``: its rows are
checked against the pool, then it is activated). Inference is skipped when both pools of the day
are complete::

    WORK/emb/<source>/<entity>/day=D/          daily embeddings (embeddings/infer.py)
    WORK/pool/<source>/<entity>/day=D/         pool snapshots (embeddings/aggregate.py)
    WORK/store/<source>-<entity>/              embedded feature store, version <source>-<entity>-D
    WORK/ann/<source>-pin-D/                   FAISS index of the Pin version (with --ann)
    WORK/quality/<source>/day=D.json           representation quality of the day's two versions

Usage::

    python embeddings/daily.py --snapshot runs/pipeline/upstream/ctr/snapshots/day=2026-01-02 \\
        --data runs/demo/data --day 2026-01-02 --work runs/pipeline --method ma --alpha 0.9
    torchrun --nproc_per_node 2 embeddings/daily.py ...       # inference on 2 ranks; rank 0 aggregates, publishes
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script (torchrun embeddings/daily.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

if TYPE_CHECKING:
    from embeddings.store import FeatureStore

log = logging.getLogger("derm.embeddings.daily")
ENTITIES = ("user", "pin")


def version_name(source: str, entity: str, day: str) -> str:
    """The feature-store version of a day (what downstream's ``derm.version_pattern`` expects)."""
    return f"{source}-{entity}-{day}"


def store_dir(work: Path, source: str, entity: str) -> Path:
    return Path(work) / "store" / f"{source}-{entity}"


def ann_dir(work: Path, source: str, day: str) -> Path:
    """The FAISS index of the Pin version of ``day`` (written whole or not at all)."""
    return Path(work) / "ann" / version_name(source, "pin", day)


def serve(store: FeatureStore, source: str, entity: str, day: str) -> bool:
    """Activates the version of ``day`` unless the store serves a later day's version already (the
    re-run of an old day must not take serving back to it) or a rollback moved serving away from it
    (``FeatureStore.rolled_back``); returns whether the day's version is
    active. Days are compared by the version names (:func:`version_name`); an active version the
    lifecycle did not name counts as older."""
    version, prefix = version_name(source, entity, day), version_name(source, entity, "")
    active = store.active_version()
    if active is not None and active.startswith(prefix) and active[len(prefix):] > day:
        log.info("%s stays active (a later day's version); %s is committed, not activated", active, version)
        return False
    if version in store.rolled_back():  # an operator rolled it back: a re-run must not undo that
        log.warning("%s was rolled back; %s stays active (activate it by hand to serve it again)", version, active)
        return False
    store.activate(version)
    return True


def publish_day(work: Path, source: str, day: str, method: str, alpha: float | None, ann: bool) -> dict:
    """Aggregates the day's user and Pin pools (where not complete), commits both versions (the
    Pins' with an index, with ``ann``), then serves both (:func:`serve`). A version committed
    already is completed, not written again (``embeddings.publish.publish``)."""
    from embeddings.aggregate import aggregate_day
    from embeddings.embedded_store import EmbeddedStore
    from embeddings.pool import snapshot_dir
    from embeddings.publish import publish

    report = {}
    stores = {entity: EmbeddedStore(store_dir(work, source, entity)) for entity in ENTITIES}
    for entity in ENTITIES:
        pool_day = snapshot_dir(work / "pool", source, entity, day)
        if not (pool_day / "_SUCCESS").is_file():
            aggregate_day(work / "emb", work / "pool", source, entity, day, method, alpha)
        version = version_name(source, entity, day)
        index_root = work / "ann" if ann and entity == "pin" else None
        published = publish(pool_day, stores[entity], version, activate=False, ann_dir=index_root)
        report[entity] = {"version": version, "rows": published.rows, "committed_now": not published.resumed}
    for entity in ENTITIES:
        report[entity]["active"] = serve(stores[entity], source, entity, day)
    return report


def prune(work: Path, source: str, keep: int) -> list[str]:
    """Prunes the source's user and Pin stores to the ``keep`` newest versions (the retention
    policy of ``FeatureStore.prune``) and removes the ANN indexes of the pruned Pin versions."""
    import shutil

    from embeddings.embedded_store import EmbeddedStore

    pruned = []
    for entity in ENTITIES:
        for version in EmbeddedStore(store_dir(work, source, entity)).prune(keep):
            pruned.append(version)
            shutil.rmtree(Path(work) / "ann" / version, ignore_errors=True)
    if pruned:
        log.info("%s: pruned %s (keeping the %d newest versions)", source, ", ".join(pruned), keep)
    return pruned


def run_day(snapshot: Path, data: Path, day: str, work: Path, method: str, alpha: float | None, ann: bool,
            batch_size: int, device: str, keep_versions: int = 0) -> dict:
    """The lifecycle of ``day`` for the snapshot's source (collective for inference, which runs
    only while a pool of the day is not complete). The day is done once its quality report is
    written (last, after :func:`publish_day`); ``keep_versions`` > 0 then prunes each store to that
    many newest versions (never the active one or the rollback target) and drops the ANN indexes of
    pruned Pin versions. ``skipped`` in the report: nothing was inferred or committed."""
    import torch.distributed as dist

    from embeddings.infer import Embedder, infer_day
    from embeddings.pool import snapshot_dir
    from embeddings.version_quality import quality_path, write_quality
    from sharding.checkpoint import read_meta
    from sharding.distributed import init_distributed, shutdown

    source = read_meta(snapshot)["source"]
    if quality_path(work, source, day).is_file():  # written last: the day is done (its versions may be pruned since)
        log.info("%s %s: already published; nothing to do", source, day)
        return {"source": source, "day": day, "skipped": True}
    pools_done = all((snapshot_dir(work / "pool", source, e, day) / "_SUCCESS").is_file() for e in ENTITIES)
    ctx = None if pools_done else init_distributed(device)
    try:
        report = {"source": source, "day": day, "skipped": pools_done}
        if ctx is not None:
            t0 = time.perf_counter()
            embedder = Embedder.load(snapshot, data, ctx.device)
            # Recomputed even if a part exists: a crash may have left it from fewer ranks.
            counts = infer_day(embedder, day, work / "emb", batch_size, overwrite=True)
            dist.barrier()
            log.info("%s %s: inferred %d users, %d Pins on this rank in %.1f s", source, day, counts["user"],
                     counts["pin"], time.perf_counter() - t0)
            report["embedded"] = counts
        if ctx.is_main if ctx is not None else os.environ.get("RANK", "0") == "0":
            report.update(publish_day(work, source, day, method, alpha, ann))
            report["skipped"] = pools_done and not any(report[e]["committed_now"] for e in ENTITIES)
            write_quality(work, data, source, day)
            if keep_versions:
                report["pruned"] = prune(work, source, keep_versions)
        if ctx is not None:
            dist.barrier()
        return report
    finally:
        if ctx is not None:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embeddings/daily.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot", required=True, help="the upstream snapshot of DAY (RUN_DIR/snapshots/day=DAY)")
    p.add_argument("--data", required=True, help="dataset root with spec.toml")
    p.add_argument("--day", required=True, help="the day to embed, aggregate and publish (YYYY-MM-DD)")
    p.add_argument("--work", required=True, help="pipeline work folder (emb/, pool/, store/, ann/ under it)")
    p.add_argument("--method", default="ma", choices=["acc", "ma", "ap"], help="aggregation heuristic (paper §4.1.1)")
    p.add_argument("--alpha", type=float, default=0.9, help="ma only: weight on the previous pooled embedding")
    p.add_argument("--ann", action="store_true", help="also build a FAISS index of each Pin version")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per inference forward")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--keep-versions", type=int, default=0,
                   help="after publishing, prune each store to this many newest versions (0: keep every version)")
    args = p.parse_args(argv)
    if args.keep_versions < 0:
        p.error("--keep-versions must be >= 0")

    from common.files import os_error_line
    from common.log import setup_logging
    from data.columns import DataError
    from embeddings.aggregate import InputError, PoolError
    from sharding.checkpoint import SnapshotError

    setup_logging()
    try:
        alpha = args.alpha if args.method == "ma" else None
        report = run_day(Path(args.snapshot), Path(args.data), args.day, Path(args.work), args.method, alpha, args.ann,
                         args.batch_size, args.device, args.keep_versions)
        log.info("done: %s", report)
        return 0
    except (ValueError, SnapshotError, DataError, InputError, PoolError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        log.error("%s", os_error_line(e))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
