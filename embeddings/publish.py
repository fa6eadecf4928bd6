"""Publishes one day of an aggregated embedding pool as a new immutable feature-store version
(paper Appendix C.2-C.3), optionally with a FAISS index for Pin pools, then activates it.

A pool day is ``POOL/<source>/<entity>/day=D/bucket=NNNN.parquet`` with columns ``entity_id``
(int64) and ``embedding`` (fixed_size_list<float32>[E]). One store holds one kind of entity of one
source (its active version is what serving reads): a directory per store, or a Redis namespace.

Usage::

    # user embeddings -> the embedded store (a directory), activated at the end
    python -m embeddings.publish --pool runs/pool/ctr/user/day=2026-01-03 \\
        --store runs/store/ctr-user --version ctr-user-2026-01-03
    # pin embeddings -> Redis, plus an ANN index in runs/ann/ctr-pin-2026-01-03/
    python -m embeddings.publish --pool runs/pool/ctr/pin/day=2026-01-03 \\
        --redis redis://127.0.0.1:6379/0 --namespace derm:ctr:pin \\
        --version ctr-pin-2026-01-03 --ann-dir runs/ann [--no-activate]
    # inspect and switch
    python -m embeddings.publish --store runs/store/ctr-user --list
    python -m embeddings.publish --store runs/store/ctr-user --activate ctr-user-2026-01-02
    python -m embeddings.publish --store runs/store/ctr-user --rollback

A failure anywhere (bad file, store error, index build) leaves the active version as it was and
removes what this publish wrote, so it can be re-run under the same version name. Bad input exits
with status 2 and a one-line error; a full disk (or any OS error) exits with status 1 and one line
naming the store or index folder.

A publish *killed* between its commit and its activation (``kill -9``, a lost node: nothing can
clean up) leaves the version committed and not active. Its re-run, under the same name and pool,
completes it: the committed rows are checked against the pool (nothing is written again), a
missing ANN index is built, and the version is activated, unless a version committed after it is
active by then (a re-run must not take serving back to an older version: it says so, and how to
activate it by hand). A committed version with other rows than the pool's is refused: versions are
immutable. Caveat: the store keeps no record of rollbacks, so the re-run of a finished publish
whose version was rolled back since (and nothing newer activated) activates it again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import naming, os_error_line
from embeddings.embedded_store import EmbeddedStore
from embeddings.store import FeatureStore, check_version_name

if TYPE_CHECKING:  # faiss is imported only when an index is built
    from embeddings.ann import AnnConfig

log = logging.getLogger("derm.embeddings.publish")

BATCH_ROWS = 65_536  # rows read and written per step: ~16 MB of embeddings at E=64


@dataclasses.dataclass(frozen=True)
class PublishReport:
    """What one publish did."""

    version: str
    rows: int
    dim: int
    seconds: float
    active: bool
    """Whether the version was activated."""
    ann_path: Path | None
    """The ANN index directory, when one was built (or found)."""
    resumed: bool = False
    """The version was committed already (a publish killed after its commit, or a re-run of a
    finished one): its rows were checked against the pool, and only what was missing was done."""
    served_instead: str | None = None
    """When activation was asked for but a version committed after this one is active, or a rollback
    moved serving away from this one: the active version, left active."""
    rolled_back: frozenset[str] = frozenset()
    """The store's rolled-back versions when a committed version was completed (why it stayed inactive)."""


def on_commit(version: str) -> None:
    """Runs between a version's commit and the rest of its publish (index, activation) and does
    nothing: the seam at which tests kill a publish (``os._exit``), as ``kill -9`` would."""


def _location(store: FeatureStore) -> str:
    return str(store.root) if isinstance(store, EmbeddedStore) else repr(store)


def bucket_files(pool_day_dir: str | Path) -> list[Path]:
    """The bucket files of one pool day, in bucket order."""
    day = Path(pool_day_dir)
    if not day.is_dir():
        raise ValueError(f"pool day {day} is not a directory (expected POOL/<source>/<entity>/day=D)")
    files = sorted(day.glob("bucket=*.parquet"))
    if not files:
        raise ValueError(f"pool day {day} has no bucket=*.parquet files")
    if not (day / "_SUCCESS").exists():  # embeddings/pool.py writes it last in every snapshot
        log.warning("pool day %s has no _SUCCESS manifest; publishing its %d bucket files as they are", day, len(files))
    return files


def inspect_pool(files: Sequence[Path]) -> tuple[int, int]:
    """(E, rows) from the files' footers, every schema checked before anything is written."""
    dims, rows = {}, 0
    for path in files:
        meta = pq.read_metadata(path)
        rows += meta.num_rows
        schema = meta.schema.to_arrow_schema()
        for name in ("entity_id", "embedding"):
            if name not in schema.names:
                raise ValueError(f"{path}: missing column {name!r} (has {schema.names})")
        id_type, emb_type = schema.field("entity_id").type, schema.field("embedding").type
        if not pa.types.is_integer(id_type):
            raise ValueError(f"{path}: column 'entity_id' must be an integer, is {id_type}")
        if not (pa.types.is_fixed_size_list(emb_type) and pa.types.is_floating(emb_type.value_type)):
            raise ValueError(f"{path}: column 'embedding' must be fixed_size_list<float32>[E], is {emb_type}")
        dims[path] = emb_type.list_size
    if len(set(dims.values())) != 1:
        raise ValueError(f"pool buckets disagree on the embedding dim: {dict((p.name, d) for p, d in dims.items())}")
    return next(iter(dims.values())), rows


def read_pool(files: Sequence[Path], dim: int, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Streams (ids [B] int64, embeddings [B, E] float32) over all buckets, B <= batch_rows."""
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["entity_id", "embedding"]):
            id_col, emb_col = batch.column("entity_id"), batch.column("embedding")
            if id_col.null_count or emb_col.null_count or emb_col.flatten().null_count:
                raise ValueError(f"{path}: null entity_id or embedding values")
            ids = id_col.to_numpy().astype(np.int64, copy=False)
            emb = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
            if not np.isfinite(emb).all():
                raise ValueError(f"{path}: non-finite (NaN or inf) embedding values")
            yield ids, emb


def publish(
    pool_day_dir: str | Path,
    store: FeatureStore,
    version: str,
    activate: bool = True,
    ann_dir: str | Path | None = None,
    *,
    ann_config: AnnConfig | None = None,
    batch_rows: int = BATCH_ROWS,
) -> PublishReport:
    """Publishes a pool day as ``version`` of ``store``.

    Order: read + write in batches -> commit -> ANN index (if ``ann_dir``) -> activate. Until the
    last step serving is untouched; if any step fails, the committed version and the index are
    removed again and the active version stays as it was. A ``version`` committed already (its
    publish was killed after the commit) is completed instead: see the module docstring.

    Args:
        pool_day_dir: ``POOL/<source>/<entity>/day=D`` (all its ``bucket=*.parquet`` files).
        store: the feature store of this source and entity.
        version: the new version's name (e.g. ``ctr-pin-2026-01-03``); committed already only by a
            killed publish of this pool.
        activate: make it the active version at the end.
        ann_dir: build a FAISS index into ``ann_dir/version`` (Pin pools only).
        ann_config: index settings (`embeddings.ann.AnnConfig`).
        batch_rows: rows per read/write step (bounds memory, except the ANN build, which holds the
            Pin pool in memory as the FAISS index itself does).
    """
    t0 = time.perf_counter()
    check_version_name(version)
    files = bucket_files(pool_day_dir)
    dim, rows = inspect_pool(files)
    if rows == 0:
        raise ValueError(f"pool day {pool_day_dir} has no rows; refusing to publish an empty version")
    ann_path = None
    if ann_dir is not None:
        if Path(pool_day_dir).parent.name == "user":
            raise ValueError(f"{pool_day_dir} is a user pool; ANN indexes are built for Pin pools (drop --ann-dir)")
        ann_path = Path(ann_dir) / version
    if version in store.versions():
        return _complete(pool_day_dir, files, dim, rows, store, version, activate, ann_path, ann_config, batch_rows, t0)
    if ann_path is not None and ann_path.exists():
        raise ValueError(f"ANN index {ann_path} already exists")
    ann_ids: list[np.ndarray] = []
    ann_emb: list[np.ndarray] = []
    with naming(_location(store)), store.begin_version(version, dim) as writer:
        for ids, emb in read_pool(files, dim, batch_rows):
            writer.put(ids, emb)
            if ann_path is not None:
                ann_ids.append(ids)
                ann_emb.append(emb)
        info = writer.commit()
    on_commit(version)
    try:
        if ann_path is not None:
            _build_index(ann_path, ann_ids, ann_emb, ann_config)
            del ann_ids, ann_emb
        if activate:
            with naming(_location(store)):
                store.activate(version)
    except BaseException:
        # A retry must find neither the version nor its index (names are never reused otherwise).
        if ann_path is not None:
            shutil.rmtree(ann_path, ignore_errors=True)
        with contextlib.suppress(Exception):
            store.delete_version(version)
        raise
    seconds = time.perf_counter() - t0
    active = " (active)" if activate else ""
    log.info("published %s: %d rows x %d dims in %.1f s%s", version, info.count, dim, seconds, active)
    return PublishReport(version, info.count, dim, seconds, activate, ann_path)


def _build_index(ann_path: Path, ids: list[np.ndarray], emb: list[np.ndarray], config: AnnConfig | None) -> None:
    from embeddings.ann import AnnIndex

    index = AnnIndex.build(np.concatenate(ids), np.concatenate(emb), config)
    with naming(ann_path):
        index.save(ann_path)


def _complete(pool_day_dir: str | Path, files: Sequence[Path], dim: int, rows: int, store: FeatureStore, version: str,
              activate: bool, ann_path: Path | None, ann_config: AnnConfig | None, batch_rows: int,
              t0: float) -> PublishReport:
    """The publish of a ``version`` that is committed already (module docstring): its rows must
    be the pool's; a missing index is built; it is activated unless a version committed after it is
    active. Nothing is removed on failure: this publish committed nothing."""
    info = store.version_info(version)
    other = (f"duplicate version {version!r}: it is committed with other rows than {pool_day_dir}; "
             "versions are immutable: publish under a new name")
    if (info.count, info.dim) != (rows, dim):
        raise ValueError(f"{other} ({info.count:,} x {info.dim} committed, {rows:,} x {dim} in the pool)")
    build = ann_path is not None and not ann_path.exists()
    ann_ids: list[np.ndarray] = []
    ann_emb: list[np.ndarray] = []
    for ids, emb in read_pool(files, dim, batch_rows):
        got, found = store.get(ids, version=version)
        differs = ~found | (got != emb).any(axis=1)
        if differs.any():
            raise ValueError(f"{other} (e.g. entity {int(ids[differs][0])})")
        if build:
            ann_ids.append(ids)
            ann_emb.append(emb)
    if build:
        _build_index(ann_path, ann_ids, ann_emb, ann_config)
    versions, active = store.versions(), store.active_version()
    later = active if active in versions[versions.index(version) + 1:] else None
    if activate and later is None and version in store.rolled_back():  # a rollback chose to stop serving it
        later = active
    if activate and later is None:
        with naming(_location(store)):
            store.activate(version)
    seconds = time.perf_counter() - t0
    state = "active" if activate and later is None else f"not activated over {later}" if activate else "not active"
    log.info("%s was committed already with the pool's %d rows (%s); completed in %.1f s", version, rows, state, seconds)
    return PublishReport(version, info.count, dim, seconds, activate and later is None, ann_path, resumed=True,
                         served_instead=later if activate else None, rolled_back=frozenset(store.rolled_back()))


def open_store(store_dir: str | None, redis_url: str | None, namespace: str) -> FeatureStore:
    """The embedded store in ``store_dir``, or the Redis store at ``redis_url``/``namespace``."""
    if redis_url is not None:
        from embeddings.redis_store import RedisStore

        return RedisStore(redis_url, namespace=namespace)
    return EmbeddedStore(store_dir)


def _format_versions(store: FeatureStore) -> str:
    active = store.active_version()
    lines = []
    for name in store.versions():
        info = store.version_info(name)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
        lines.append(f"{'*' if name == active else ' '} {name}  dim {info.dim}  {info.count:,} entities  committed {when}")
    return "\n".join(lines) if lines else "(no versions)"


def _pruned(deleted: list[str]) -> str:
    return f"pruned {len(deleted)} version(s): {', '.join(deleted)}" if deleted else "pruned nothing"


def _published(report: PublishReport, args: argparse.Namespace) -> str:
    """The CLI's line for a publish (or the completion of a killed one)."""
    state = "active" if report.active else "committed, not active"
    ann = f"; ANN index {report.ann_path}" if report.ann_path else ""
    size = f"{report.rows:,} rows x {report.dim} dims"
    if not report.resumed:
        return f"published {report.version}: {size} in {report.seconds:.1f} s ({state}){ann}"
    line = f"{report.version} was committed already with the pool's {size}: completed in {report.seconds:.1f} s ({state}){ann}"
    if report.served_instead is not None:
        where = f"--store {args.store}" if args.store else f"--redis {args.redis} --namespace {args.namespace}"
        why = "a rollback moved serving away from it" if report.version in report.rolled_back else "committed after it"
        line += (f"; not activated over {report.served_instead}, {why} (to serve it: "
                 f"python -m embeddings.publish {where} --activate {report.version})")
    return line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m embeddings.publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", metavar="DIR", help="embedded feature store directory")
    where.add_argument("--redis", metavar="URL", help="Redis feature store, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--namespace", default="derm", help="Redis key prefix: one per source and entity (default: derm)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pool", metavar="DAY_DIR", help="publish POOL/<source>/<entity>/day=D as --version")
    what.add_argument("--list", action="store_true", help="list the committed versions (* = active)")
    what.add_argument("--activate", metavar="VERSION", help="make a committed version the active one")
    what.add_argument("--rollback", action="store_true", help="re-activate the previously active version")
    what.add_argument("--prune", metavar="KEEP", type=int,
                      help="retention: delete all but the KEEP newest versions (never the active one or the rollback target)")
    p.add_argument("--version", help="name of the new version (with --pool), e.g. ctr-user-2026-01-03")
    p.add_argument("--ann-dir", metavar="DIR", help="also build a FAISS index into DIR/VERSION (Pin pools)")
    p.add_argument("--no-activate", action="store_true", help="commit the new version without activating it")
    p.add_argument("--keep", type=int, metavar="KEEP", help="with --pool: then prune to the KEEP newest versions (as --prune)")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help=f"rows per read/write step (default {BATCH_ROWS})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.pool is not None and not args.version:
        parser.error("--pool needs --version")
    if args.pool is None and (args.version or args.ann_dir or args.no_activate or args.keep is not None):
        parser.error("--version, --ann-dir, --no-activate and --keep go with --pool")
    if args.batch_rows < 1:
        parser.error("--batch-rows must be positive")
    from common.log import setup_logging

    setup_logging()
    try:
        store = open_store(args.store, args.redis, args.namespace)
        if args.list:
            print(_format_versions(store))
        elif args.activate:
            store.activate(args.activate)
            print(f"active: {args.activate}")
        elif args.rollback:
            print(f"active: {store.rollback()} (rolled back)")
        elif args.prune is not None:
            print(_pruned(store.prune(args.prune)))
        else:
            report = publish(
                args.pool, store, args.version, not args.no_activate, args.ann_dir, batch_rows=args.batch_rows
            )
            print(_published(report, args))
            if args.keep is not None:
                print(_pruned(store.prune(args.keep)))
    except (ValueError, FileNotFoundError, pa.ArrowInvalid) as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        print(f"publish: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a store or disk failure: still one line, with its kind
        print(f"publish: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
