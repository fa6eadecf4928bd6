"""One day of the embedding lifecycle for one upstream model (paper Appendix B.3, C): inference
with the day's snapshot, aggregation of users and Pins into their pools, publishing of both to the
feature store (and the Pins to a FAISS index), then the representation quality of the two new
versions (issue 11; :mod:`embeddings.version_quality`). The daily pipeline (:mod:`pipeline.driver`) runs
this as one job per upstream model and day.

Every part is skipped when its output is already complete, so a re-run after a failure picks up
where it stopped, and a re-run of a finished day does nothing::

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

if __package__ in (None, ""):  # run as a script (torchrun embeddings/daily.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

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


def is_published(work: Path, source: str, day: str, ann: bool = False) -> bool:
    """True when both the user and the Pin versions of ``day`` are in the store and, with ``ann``,
    the Pin version's index is built (the day is done)."""
    from embeddings.embedded_store import EmbeddedStore

    for entity in ENTITIES:
        path = store_dir(work, source, entity)
        if not path.exists() or version_name(source, entity, day) not in EmbeddedStore(path).versions():
            return False
    return not ann or ann_dir(work, source, day).is_dir()


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
    """The lifecycle of ``day`` for the snapshot's source (collective for inference). The day is
    done once its quality report is written (last); ``keep_versions`` > 0 then prunes each store to
    that many newest versions (never the active one or the rollback target) and drops the ANN
    indexes of pruned Pin versions."""
    import torch.distributed as dist

    from embeddings.aggregate import aggregate_day
    from embeddings.embedded_store import EmbeddedStore
    from embeddings.infer import Embedder, infer_day
    from embeddings.pool import snapshot_dir
    from embeddings.publish import publish
    from embeddings.version_quality import quality_path, write_quality
    from sharding.checkpoint import read_meta
    from sharding.distributed import init_distributed, shutdown

    source = read_meta(snapshot)["source"]
    if quality_path(work, source, day).is_file():  # written last: the day is done (its versions may be pruned since)
        log.info("%s %s: already published; nothing to do", source, day)
        return {"source": source, "day": day, "skipped": True}
    if is_published(work, source, day, ann):
        if quality_path(work, source, day).is_file():
            log.info("%s %s: already published; nothing to do", source, day)
        elif os.environ.get("RANK", "0") == "0":  # killed between the publish and its report: only the report is left
            write_quality(work, data, source, day)
        return {"source": source, "day": day, "skipped": True}
    ctx = init_distributed(device)
    try:
        t0 = time.perf_counter()
        embedder = Embedder.load(snapshot, data, ctx.device)
        # Recomputed even if a part exists: a crash may have left it from fewer ranks.
        counts = infer_day(embedder, day, work / "emb", batch_size, overwrite=True)
        dist.barrier()
        log.info("%s %s: inferred %d users, %d Pins on this rank in %.1f s", source, day, counts["user"], counts["pin"],
                 time.perf_counter() - t0)
        report = {"source": source, "day": day, "skipped": False, "embedded": counts}
        if ctx.is_main:
            for entity in ENTITIES:
                pool_day = snapshot_dir(work / "pool", source, entity, day)
                if not (pool_day / "_SUCCESS").is_file():
                    aggregate_day(work / "emb", work / "pool", source, entity, day, method, alpha)
                store = EmbeddedStore(store_dir(work, source, entity))
                version = version_name(source, entity, day)
                build_ann = ann and entity == "pin"
                if version in store.versions() and build_ann and not ann_dir(work, source, day).is_dir():
                    # Killed between the version's commit and its index: publish both again.
                    store.delete_version(version)
                if version not in store.versions():
                    published = publish(pool_day, store, version, activate=True, ann_dir=work / "ann" if build_ann else None)
                    report[entity] = {"version": version, "rows": published.rows}
            write_quality(work, data, source, day)
            if keep_versions:
                report["pruned"] = prune(work, source, keep_versions)
        dist.barrier()
        return report
    finally:
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
