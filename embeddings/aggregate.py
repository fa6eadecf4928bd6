"""Aggregate one day of daily entity embeddings into the pool (paper §3.1, §4.1.1, Appendix C.2).

The pool of (source, entity) on day D is computed from the pool of the latest earlier day and the
daily embeddings of D, with one heuristic (embeddings/heuristics.py):

    ACC    pool_D = daily_D
    MA(α)  pool_D = α · pool_prev + (1 − α) · daily_D     α: weight on the past, in [0, 1)
    AP     pool_D = (daily_D + the entity's previous daily embedding) / 2

New entities enter with their daily embedding; entities without one keep their pooled embedding
(carry-over) until their last daily embedding is more than ``ttl_days`` days old (TTL).

Usage::

    # one process, all buckets (the CPU-sized default: 64 buckets)
    python -m embeddings.aggregate --emb runs/emb --pool runs/pool --source ctr --entity user \\
        --day 2026-01-03 --method ma --alpha 0.9
    # several processes take disjoint buckets, then one finalises the day
    python -m embeddings.aggregate ... --num-buckets 64 --buckets 0-31
    python -m embeddings.aggregate ... --num-buckets 64 --buckets 32-63
    python -m embeddings.aggregate --pool runs/pool --source ctr --entity user --day 2026-01-03 --finalize

Each snapshot is immutable (embeddings/pool.py has the layout): applying D again recomputes it
from the same inputs and replaces it atomically, so a day can never be applied twice. Days are
applied in order, the first from an empty pool; a day whose previous pool is missing while
earlier daily embeddings exist is refused (the error names the first missing day; apply the
missing days in order — we do not apply them implicitly, since which heuristic and TTL they need
is the caller's decision). Re-applying a day that later snapshots were built on logs a warning
if its inputs changed: re-apply the later days too. Bad input (embeddings/daily_input.py) is an
error naming the file and problem; the existing snapshots are never touched. The CLI prints the
day's report (embeddings/quality.py) as JSON and exits 2 with a one-line error on bad input.

Memory is bounded by one bucket (plus one ~64 MB chunk while the day is split into buckets,
embeddings/buckets.py); disk needs the kept daily rows once more, temporarily.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common.files import naming
from embeddings.buckets import BucketedDay
from embeddings.daily_input import DailyPartition, InputError, day_partition, dedup_latest, emb_days
from embeddings.heuristics import Heuristic, PoolColumns, merge_bucket
from embeddings.pool import (
    FORMAT,
    PoolError,
    bucket_file,
    bucket_meta,
    commit,
    manifest_digest,
    pool_days,
    pool_dir,
    read_bucket,
    read_manifest,
    read_pool,
    snapshot_dir,
    staging_dir,
    write_bucket,
)
from embeddings.quality import BucketStats, cosine_rows, day_report

__all__ = ["aggregate_day", "finalize_day", "read_pool", "pool_days", "InputError", "PoolError"]

logger = logging.getLogger("derm.embeddings.aggregate")

DEFAULT_NUM_BUCKETS = 64  # ~150k entities (~80 MB) per bucket at 10M entities x 64 dims
MAX_NUM_BUCKETS = 1 << 16
_READ_ROWS = 1 << 16  # daily rows decoded at a time
_PROGRESS_S = 10.0  # seconds between progress lines


def aggregate_day(emb_root: str | Path, pool_root: str | Path, source: str, entity: str, day: str, method: str,
                  alpha: float | None = None, *, ttl_days: int = 90, num_buckets: int | None = None,
                  buckets: list[int] | None = None, workers: int = 2, tmp_dir: str | Path | None = None) -> dict | None:
    """Computes the pool snapshot of ``day`` (all buckets, or ``buckets`` only).

    Args:
        emb_root: EMB, holding ``<source>/<entity>/day=YYYY-MM-DD/part-*.parquet``.
        pool_root: POOL, holding ``<source>/<entity>/day=YYYY-MM-DD/`` snapshots.
        source, entity: e.g. ``ctr``, ``user``.
        day: YYYY-MM-DD.
        method, alpha: ``acc``, ``ma`` with ``alpha`` in [0, 1) (weight on the past), or ``ap``.
        ttl_days: entities whose last daily embedding is more than this many days old are dropped.
        num_buckets: B; default the previous snapshot's, else 64. Must equal the previous one's.
        buckets: compute only these buckets into the staging area and return None; once every
            bucket is staged (by any processes), call ``finalize_day``. Default: all, and finalise.
        workers: buckets merged at once (threads); memory grows by one bucket per worker.
        tmp_dir: where the day is split by bucket (default: inside POOL's staging area).

    Returns:
        The day's quality report (also written as ``report.json``), or None with ``buckets``.

    Raises:
        ValueError: a bad argument; ``InputError`` (bad daily input) and ``PoolError`` (gap, or
            settings that differ from the previous snapshot's) are ValueErrors too.
    """
    if alpha is not None and not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
    alpha = None if alpha is None else float(alpha)  # 0 and 0.0 are the same pool
    heuristic = Heuristic(method, alpha)
    day = _check_day(day)
    if isinstance(ttl_days, bool) or not isinstance(ttl_days, int) or ttl_days < 0:
        raise ValueError(f"ttl_days must be an integer >= 0, got {ttl_days!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    prev = _previous_snapshot(emb_root, pool_root, source, entity, day)
    prev_manifest = read_manifest(prev) if prev else None
    num_buckets = _resolve_num_buckets(num_buckets, prev_manifest, prev)
    _check_same_heuristic(heuristic, prev_manifest, prev)
    part = day_partition(emb_root, source, entity, day)
    dim = _resolve_dim(part, prev_manifest, prev)
    part = dataclasses.replace(part, dim=dim)
    chosen = _check_buckets(buckets, num_buckets)
    run = {"format": FORMAT, "source": source, "entity": entity, "day": day, "method": method, "alpha": alpha,
           "ttl_days": ttl_days, "num_buckets": num_buckets, "dim": dim, "prev_day": prev_manifest["day"] if prev else None,
           "prev_manifest_sha256": manifest_digest(prev) if prev else None, "inputs": part.fingerprint()}
    run["run_key"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
    logger.info("%s/%s %s: %s, ttl %d d, %d of %d buckets, dim %d, previous snapshot %s, %d daily files",
                source, entity, day, _describe(heuristic), ttl_days, len(chosen), num_buckets, dim,
                run["prev_day"] or "none (empty pool)", len(part.files))

    staging = staging_dir(pool_root, source, entity, day)
    owns_day = buckets is None  # one process computes every bucket: stale staged files are its to clear
    if owns_day:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _stage_buckets(part, prev, run, heuristic, chosen, staging, Path(tmp_dir) if tmp_dir else staging.parent, workers)
    except BaseException:
        if owns_day:
            _remove_staging(staging)
        raise
    return finalize_day(pool_root, source, entity, day) if owns_day else None


def finalize_day(pool_root: str | Path, source: str, entity: str, day: str) -> dict:
    """Checks that every bucket of ``day`` is staged from the same run, writes ``report.json`` and
    the ``_SUCCESS`` manifest, and publishes the snapshot atomically. Returns the report.

    Raises:
        PoolError: nothing staged, a bucket missing, buckets staged from different inputs or
            settings, or the previous snapshot replaced since the buckets were computed.
    """
    day = _check_day(day)
    staging = staging_dir(pool_root, source, entity, day)
    files = sorted(staging.glob("bucket=*.parquet")) if staging.is_dir() else []
    if not files:
        raise PoolError(f"{staging}: no staged buckets to finalise for {day}")
    metas = {f.name: bucket_meta(f) for f in files}
    run = metas[files[0].name]["run"]
    expected = [bucket_file(run["num_buckets"], b) for b in range(run["num_buckets"])]
    missing, extra = sorted(set(expected) - set(metas)), sorted(set(metas) - set(expected))
    if extra:
        raise PoolError(f"{staging / extra[0]}: not a bucket of a {run['num_buckets']}-bucket pool; "
                        f"remove the staged day and recompute")
    if missing:
        raise PoolError(f"{staging}: {len(missing)} of {len(expected)} buckets not staged yet (first: {missing[0]})")
    for name in expected:
        if metas[name]["run"]["run_key"] != run["run_key"]:
            raise PoolError(f"{staging / name}: staged from other inputs or settings than {files[0].name}; recompute it")
    if run["prev_day"] is not None:
        prev = snapshot_dir(pool_root, source, entity, run["prev_day"])
        if not (prev / "_SUCCESS").is_file() or manifest_digest(prev) != run["prev_manifest_sha256"]:
            raise PoolError(f"{prev}: replaced since the buckets of {day} were computed from it; recompute them")

    header = {k: run[k] for k in ("source", "entity", "day", "method", "alpha", "ttl_days", "num_buckets", "dim", "prev_day")}
    report = day_report([BucketStats(**metas[name]["stats"]) for name in expected], header)
    rows = {name: metas[name]["stats"]["pool_size"] for name in expected}
    manifest = {**run, "pool_size": report["pool_size"], "buckets": rows}
    final = snapshot_dir(pool_root, source, entity, day)
    _warn_if_later_days_stale(pool_root, source, entity, day, final, run["run_key"])
    commit(staging, final, manifest, report)
    _remove_staging(staging)
    logger.info("%s/%s %s: committed %s: pool %s (+%s new, -%s expired, %s carried over), coverage %s, cos mean %s p10 %s",
                source, entity, day, final, f"{report['pool_size']:,}", f"{report['new_entities']:,}", f"{report['expired']:,}",
                f"{report['carried_over']:,}", report["coverage"], report["cos_mean"], report["cos_p10"])
    if report["duplicates_dropped"]:
        logger.warning("%s/%s %s: %d duplicate daily rows dropped (kept the latest event_time per entity)",
                       source, entity, day, report["duplicates_dropped"])
    return report


def _stage_buckets(part: DailyPartition, prev: Path | None, run: dict, heuristic: Heuristic, chosen: list[int],
                   staging: Path, tmp_dir: Path, workers: int) -> None:
    """The day's work: one pass to split the input by bucket, then each bucket on its own.

    Both run on ``workers`` threads: Parquet decoding and encoding and most numpy kernels release
    the GIL, so two threads keep two cores busy, at one chunk's or one bucket's memory each.
    """
    num_buckets, dim = run["num_buckets"], run["dim"]
    with BucketedDay(tmp_dir, num_buckets, chosen, dim) as bday:
        t0 = time.perf_counter()
        with naming(bday.dir):  # its run files' pyarrow writers name no file on ENOSPC
            bday.write([part.batches(_READ_ROWS, share) for share in part.shares(workers)])
        logger.info("split %s daily rows by bucket in %.1f s", f"{bday.rows_read:,}", time.perf_counter() - t0)

        def one(b: int) -> int:
            return _stage_bucket(bday, b, prev, run, heuristic, staging)

        t0 = last = time.perf_counter()
        daily_rows = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregate") as pool:
            done = pool.map(one, chosen) if workers > 1 else map(one, chosen)  # inline: plain tracebacks, profiles
            for i, rows in enumerate(done, 1):
                daily_rows += rows
                if time.perf_counter() - last > _PROGRESS_S or i == len(chosen):
                    last = time.perf_counter()
                    logger.info("bucket %d/%d: %s daily rows merged, %s rows/s", i, len(chosen), f"{daily_rows:,}",
                                f"{daily_rows / max(last - t0, 1e-9):,.0f}")


def _stage_bucket(bday: BucketedDay, b: int, prev: Path | None, run: dict, heuristic: Heuristic, staging: Path) -> int:
    """Merges one bucket and writes it, with its stats, into the staging area; returns its daily rows."""
    name, dim = bucket_file(run["num_buckets"], b), run["dim"]
    prev_cols = read_bucket(prev / name, dim) if prev else PoolColumns.empty(0, dim)
    todays = bday.read(b)
    ids, emb, _ = dedup_latest(todays.ids, todays.event_time, todays.emb)
    merge = merge_bucket(prev_cols, ids, emb, _day_number(run["day"]), heuristic, run["ttl_days"])
    stats = BucketStats(daily_rows=len(todays.ids), daily_entities=len(ids), prev_pool_size=len(prev_cols),
                        pool_size=len(merge.pool), new_entities=merge.new, updated_entities=len(merge.updated_prev),
                        carried_over=merge.carried, expired=merge.expired)
    stats.add_cosines(cosine_rows(prev_cols.embedding[merge.updated_prev], merge.pool.embedding[merge.updated_out]))
    write_bucket(staging / name, merge.pool, {"bucket": b, "run": run, "stats": dataclasses.asdict(stats)})
    return len(todays.ids)


def _previous_snapshot(emb_root, pool_root, source: str, entity: str, day: str) -> Path | None:
    """The latest complete snapshot before ``day``; PoolError if daily embeddings exist for a day
    after it (or, with no snapshot, for any day) before ``day``: days are applied in order."""
    earlier = [d for d in pool_days(pool_root, source, entity) if d < day]
    prev = earlier[-1] if earlier else None
    missing = [d for d in emb_days(emb_root, source, entity) if d < day and (prev is None or d > prev)]
    if missing:
        more = f" (and {len(missing) - 1} later days)" if len(missing) > 1 else ""
        raise PoolError(f"{pool_dir(pool_root, source, entity)}: no pool snapshot for {missing[0]}{more}, which has daily "
                        f"embeddings, before {day}; apply the days in order, starting with {missing[0]}")
    return snapshot_dir(pool_root, source, entity, prev) if prev else None


def _resolve_num_buckets(num_buckets: int | None, prev_manifest: dict | None, prev: Path | None) -> int:
    if num_buckets is None:
        return prev_manifest["num_buckets"] if prev_manifest else DEFAULT_NUM_BUCKETS
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets <= MAX_NUM_BUCKETS:
        raise ValueError(f"num_buckets must be an integer in [1, {MAX_NUM_BUCKETS}], got {num_buckets!r}")
    if prev_manifest and prev_manifest["num_buckets"] != num_buckets:
        raise PoolError(f"{prev}: has {prev_manifest['num_buckets']} buckets, not {num_buckets}; "
                        f"keep the pool's bucket count (omit --num-buckets) or start a new pool directory")
    return num_buckets


def _check_same_heuristic(heuristic: Heuristic, prev_manifest: dict | None, prev: Path | None) -> None:
    if prev_manifest and (prev_manifest["method"], prev_manifest["alpha"]) != (heuristic.method, heuristic.alpha):
        was = _describe(Heuristic(prev_manifest["method"], prev_manifest["alpha"]))
        raise PoolError(f"{prev}: the pool was built with {was}, not {_describe(heuristic)}; "
                        f"use the same heuristic or start a new pool directory")


def _resolve_dim(part: DailyPartition, prev_manifest: dict | None, prev: Path | None) -> int:
    if prev_manifest and part.dim is not None and part.dim != prev_manifest["dim"]:
        raise InputError(f"{part.path}: embedding dimension {part.dim} differs from the pool's {prev_manifest['dim']} ({prev})")
    dim = part.dim if part.dim is not None else (prev_manifest["dim"] if prev_manifest else None)
    if dim is None:
        raise InputError(f"{part.path}: no rows and variable-length embedding lists: cannot tell the dimension of a new pool")
    return dim


def _check_buckets(buckets: list[int] | None, num_buckets: int) -> list[int]:
    if buckets is None:
        return list(range(num_buckets))
    chosen = sorted(set(buckets))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_buckets:
        raise ValueError(f"buckets must be a non-empty subset of [0, {num_buckets}), got {buckets!r}")
    return chosen


def _warn_if_later_days_stale(pool_root, source: str, entity: str, day: str, final: Path, run_key: str) -> None:
    later = [d for d in pool_days(pool_root, source, entity) if d > day]
    same_run = (final / "_SUCCESS").is_file() and read_manifest(final).get("run_key") == run_key
    if later and not same_run:
        logger.warning("%s/%s %s: re-applied with other inputs; the later snapshots %s were built on the old one: "
                       "re-apply them in order", source, entity, day, ", ".join(later))


def _remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()  # the _staging folder, if no other day is being staged
    except OSError:
        pass


def _check_day(day: str) -> str:
    try:
        if datetime.date.fromisoformat(day).isoformat() == day:
            return day
    except (TypeError, ValueError):
        pass
    raise ValueError(f"day must be YYYY-MM-DD, got {day!r}")


def _day_number(day: str) -> int:
    return int(np.datetime64(day, "D").astype(np.int64))


def _describe(h: Heuristic) -> str:
    return f"ma(alpha={h.alpha})" if h.method == "ma" else h.method


def _parse_buckets(text: str) -> list[int]:
    """``"0-31,40,50-52"`` -> [0, ..., 31, 40, 50, 51, 52]."""
    out: list[int] = []
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"--buckets {text!r}: expected ranges like 0-31,40") from None
    return out


def main(argv: list[str] | None = None) -> int:
    from common.files import os_error_line
    from common.log import setup_logging

    p = argparse.ArgumentParser(prog="python -m embeddings.aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb", help="daily embeddings root: EMB/<source>/<entity>/day=D/part-*.parquet")
    p.add_argument("--pool", required=True, help="pool root: POOL/<source>/<entity>/day=D/ snapshots")
    p.add_argument("--source", required=True, help="source model, e.g. ctr or cvr")
    p.add_argument("--entity", required=True, help="entity type, e.g. user or pin")
    p.add_argument("--day", required=True, help="the day to apply, YYYY-MM-DD")
    p.add_argument("--method", help="acc | ma | ap")
    p.add_argument("--alpha", type=float,
                   help="ma only: weight on the previous pooled embedding, in [0, 1) (paper: larger is better, e.g. 0.9)")
    p.add_argument("--ttl-days", type=int, default=90,
                   help="drop entities whose last daily embedding is older (default: 90, the paper's three months)")
    p.add_argument("--num-buckets", type=int,
                   help=f"hash buckets (default: the previous snapshot's, else {DEFAULT_NUM_BUCKETS})")
    p.add_argument("--workers", type=int, default=2, help="buckets merged at once, one bucket of memory each (default: 2)")
    p.add_argument("--tmp-dir", help="where to split the day by bucket (default: inside POOL)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--buckets", help="compute only these buckets, e.g. 0-31 (then run --finalize once all are staged)")
    which.add_argument("--finalize", action="store_true", help="publish the day once every bucket is staged")
    args = p.parse_args(argv)
    if not args.finalize and (args.emb is None or args.method is None):
        p.error("--emb and --method are required (unless --finalize)")
    setup_logging()
    try:
        if args.finalize:
            out = finalize_day(args.pool, args.source, args.entity, args.day)
        else:
            buckets = _parse_buckets(args.buckets) if args.buckets else None
            out = aggregate_day(args.emb, args.pool, args.source, args.entity, args.day, args.method, args.alpha,
                                ttl_days=args.ttl_days, num_buckets=args.num_buckets, buckets=buckets,
                                workers=args.workers, tmp_dir=args.tmp_dir)
            out = out if out is not None else {"staged_buckets": buckets}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
