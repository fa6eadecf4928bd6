"""Aggregation benchmark: daily embeddings into the pool (embeddings/aggregate.py), with peak memory.

Generates two days of synthetic daily embeddings (day 2: 80 % of day 1's entities and 20 % new
ones, in shuffled order, like the inference step writes them), applies day 1 to an empty pool,
then times day 2 with MA(0.9): read the day once and split it by bucket, then per bucket read the
previous pool, deduplicate, merge, write the new pool and its quality stats. Next to it, in the
same run, the floor: pyarrow reading the embedding columns of the same Parquet files (the day-2
daily files and the day-1 pool) to numpy and computing α·a + (1 − α)·b over arrays of the day's
size, and nothing else; both on two threads. Every step runs in its own process, so its peak RSS (and CPU time: user +
system, all threads, including start-up and imports) is its own. On a shared machine, read the
CPU seconds beside the wall-clock rates.

Usage::

    python bench/bench_aggregate.py                      # 10M entities x 64 dims: ~5 min, ~20 GB of temp disk
    python bench/bench_aggregate.py --entities 200000    # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAY1, DAY2 = "2026-01-01", "2026-01-02"
ALPHA = 0.9
WORKERS = 2  # threads, for the aggregation (its default) and the floor alike
FILE_ROWS = 1 << 20  # rows per generated part file (row groups of 256k rows)


def _child(args: list[str]) -> dict:
    """Runs this script as ``--child ...`` in a fresh process; returns its JSON and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"bench step {args} failed with status {status}")
    return {**json.loads(out), "peak_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def _generate(emb_root: Path, entities: int, dim: int) -> dict:
    """Two days in bounded memory: one part file (FILE_ROWS x dim float32) at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for day, first in ((DAY1, 0), (DAY2, entities // 5)):
        out = emb_root / "ctr" / "user" / f"day={day}"
        out.mkdir(parents=True)
        ids = rng.permutation(np.arange(first, first + entities, dtype=np.int64))  # (N,) 80 MB at 10M
        for part, start in enumerate(range(0, entities, FILE_ROWS)):
            chunk = ids[start:start + FILE_ROWS]
            emb = rng.standard_normal((len(chunk), dim), dtype=np.float32)
            table = pa.table({"entity_id": chunk, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
                              "event_time": np.full(len(chunk), 1_700_000_000, np.int64)})
            pq.write_table(table, out / f"part-{part:05d}.parquet", row_group_size=1 << 18,
                           compression="none", use_dictionary=False)
    return {"rows": 2 * entities, "seconds": time.perf_counter() - t0}


def _aggregate(emb_root: Path, pool_root: Path, day: str) -> dict:
    from common.log import setup_logging
    from embeddings.aggregate import aggregate_day

    setup_logging()
    t0 = time.perf_counter()
    report = aggregate_day(emb_root, pool_root, "ctr", "user", day, "ma", ALPHA, workers=WORKERS)
    return {"rows": report["daily_rows"], "pool": report["pool_size"], "seconds": time.perf_counter() - t0,
            "cos_mean": report["cos_mean"]}


def _floor(emb_root: Path, pool_root: Path) -> dict:
    """Reads the day-2 daily embeddings and the day-1 pool embeddings (the bytes the aggregation
    must read) and blends equal-sized chunks of them; writes nothing. On WORKERS threads, like
    the aggregation, each taking every WORKERS-th file of both."""
    import numpy as np
    import pyarrow.parquet as pq

    def chunks(files):
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=1 << 16, columns=["embedding"], use_threads=False):
                col = rb.column(0)
                yield col.flatten().to_numpy().reshape(len(col), -1)

    def blend(daily: list[Path], pool: list[Path]) -> tuple[int, float]:
        rows, checksum, prev, buf = 0, 0.0, chunks(pool), None
        for x in chunks(daily):  # pair each daily chunk with as many pool rows (cycling the pool)
            need, parts = len(x), []
            while need:
                if buf is None or not len(buf):
                    buf = next(prev, None)
                    if buf is None:
                        prev = chunks(pool)
                        continue
                parts.append(buf[:need])
                need -= len(parts[-1])
                buf = buf[len(parts[-1]):]
            y = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out = y * a
            out += x * b
            checksum += float(out[0, 0])
            rows += len(x)
        return rows, checksum

    daily = sorted((emb_root / "ctr" / "user" / f"day={DAY2}").glob("part-*.parquet"))
    pool = sorted((pool_root / "ctr" / "user" / f"day={DAY1}").glob("bucket=*.parquet"))
    a, b = np.float32(ALPHA), np.float32(1 - ALPHA)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:
        done = list(ex.map(blend, [daily[k::WORKERS] for k in range(WORKERS)], [pool[k::WORKERS] for k in range(WORKERS)]))
    return {"rows": sum(r for r, _ in done), "seconds": time.perf_counter() - t0, "checksum": sum(c for _, c in done)}


def _run_child(kind: str, emb_root: str, pool_root: str, arg: str) -> None:
    if kind == "generate":
        entities, dim = map(int, arg.split("x"))
        out = _generate(Path(emb_root), entities, dim)
    elif kind == "aggregate":
        out = _aggregate(Path(emb_root), Path(pool_root), arg)
    else:
        out = _floor(Path(emb_root), Path(pool_root))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=10_000_000, help="entities per day (default: 10M)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default: 64)")
    p.add_argument("--tmp", help="where to write the data (default: the system temp dir)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _run_child(*args.child)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"MA(alpha={ALPHA}), 64 buckets, {WORKERS} threads")
    header = (f"{'entities':>11}{'dim':>5}{'gen s':>7}{'day-1 s':>8}{'day-2 s':>8}{'cpu s':>7}{'pool':>12}"
              f"{'agg ent/s':>11}{'floor s':>8}{'cpu s':>7}{'floor ent/s':>12}{'agg/floor':>10}"
              f"{'agg peak MB':>12}{'floor peak MB':>14}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="derm-bench-agg-", dir=args.tmp) as tmp:
        emb, pool = str(Path(tmp) / "emb"), str(Path(tmp) / "pool")
        gen = _child(["generate", emb, pool, f"{args.entities}x{args.dim}"])
        day1 = _child(["aggregate", emb, pool, DAY1])
        day2 = _child(["aggregate", emb, pool, DAY2])
        floor = _child(["floor", emb, pool, "-"])
        agg_rate, floor_rate = day2["rows"] / day2["seconds"], floor["rows"] / floor["seconds"]
        print(f"{args.entities:>11,}{args.dim:>5}{gen['seconds']:>7.1f}{day1['seconds']:>8.1f}{day2['seconds']:>8.1f}"
              f"{day2['cpu_s']:>7.1f}{day2['pool']:>12,}{agg_rate:>11,.0f}{floor['seconds']:>8.1f}{floor['cpu_s']:>7.1f}"
              f"{floor_rate:>12,.0f}{agg_rate / floor_rate:>10.2f}{day2['peak_mb']:>12,.0f}{floor['peak_mb']:>14,.0f}",
              flush=True)


if __name__ == "__main__":
    main()
