"""What checking a store version's manifest costs: the first open + get of an embedded-store
version with verification (``EmbeddedStore(verify=True)``, the default: every file of the version
hashed once, ``common.digest``) against without, in the same run (docs/lifecycle.md, "Integrity").

One version of ``--rows`` x ``--dim`` float32 (random ids in random order, written in 1M-row
chunks) is committed into a store under ``--dir``; then each measurement runs in a fresh process
(verification is once per version per process) and times ``EmbeddedStore(root).get`` of 1,000
random ids, the first read of the version there. Two cache states:

- warm: the version's files are in the page cache (read once before timing), as on the machine
  that just published the version;
- cold: the files' pages are dropped first (``posix_fadvise(DONTNEED)`` on the version's files
  only; nothing else on the machine is touched), as on a host that opens a version no one read
  lately. On a tmpfs the files never leave memory, so cold reads as warm.

Arms are interleaved over ``--repeats`` rounds; the table gives the median seconds and the ratio
to the same cache state without verification. Disk: the version (~2.9 GB at 10M x 64) plus its
unsorted copy while it commits (2.6 GB more).

Usage::

    python -m bench.bench_verify                      # 10M x 64, the documented figure: a few minutes
    python -m bench.bench_verify --rows 100000       # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tabulate import tabulate

from embeddings.embedded_store import EmbeddedStore

VERSION = "bench"
KEYS_PER_GET = 1000
WRITE_CHUNK = 1 << 20  # rows generated and put at a time (256 MB at dim 64)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_version(root: Path, rows: int, dim: int, seed: int) -> float:
    """Commits version ``VERSION`` of ``rows`` x ``dim`` into the store at ``root``; returns the
    seconds of put + commit (the commit sorts the rows and hashes every file as it writes it)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(rows).astype(np.int64) * 7919  # distinct, in random order
    t0 = time.perf_counter()
    with EmbeddedStore(root).begin_version(VERSION, dim) as writer:
        for start in range(0, rows, WRITE_CHUNK):
            chunk = ids[start : start + WRITE_CHUNK]
            writer.put(chunk, rng.standard_normal((len(chunk), dim), dtype=np.float32))
        writer.commit()
    return time.perf_counter() - t0


def first_get(root: str, verify: bool, cold: bool, seed: int) -> float:
    """In a fresh process: puts the version's files in the cache state asked for, then times the
    first ``get`` of 1,000 ids (opening the version, and with ``verify`` hashing its files)."""
    folder = Path(root) / "versions" / VERSION
    for path in folder.iterdir():
        with open(path, "rb") as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(1 << 24):  # into the page cache
                    pass
    rows = EmbeddedStore(root, verify=False).version_info(VERSION).count
    query = np.random.default_rng(seed).integers(0, rows, KEYS_PER_GET) * 7919
    t0 = time.perf_counter()
    _, found = EmbeddedStore(root, verify=verify).get(query, version=VERSION)
    seconds = time.perf_counter() - t0
    if not found.all():
        raise RuntimeError("the benchmark's ids were not found: the version is not the one built")
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="entities in the version (default: 10M)")
    p.add_argument("--dim", type=int, default=64, help="embedding dim (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four arms, interleaved (default: 3)")
    p.add_argument("--dir", help="where to build the store (default: the system temp folder); removed at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-verify-", dir=args.dir) as tmp:
        root = Path(tmp) / "store"
        write_s = build_version(root, args.rows, args.dim, args.seed)
        folder = root / "versions" / VERSION
        size = sum(f.stat().st_size for f in folder.iterdir())
        arms = [(cold, verify) for cold in (False, True) for verify in (False, True)]
        seconds: dict[tuple[bool, bool], list[float]] = {arm: [] for arm in arms}
        spawn = multiprocessing.get_context("spawn")  # a fresh process per arm: nothing verified yet
        for r in range(args.repeats):
            for cold, verify in arms:
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    seconds[cold, verify].append(pool.submit(first_get, str(root), verify, cold, args.seed + r).result())

    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, numpy {np.__version__}")
    print(f"version: {args.rows:,} x {args.dim} float32, {size / 1e9:.2f} GB of files; put + commit {write_s:.1f} s; "
          f"first open + get of {KEYS_PER_GET:,} ids, median of {args.repeats} fresh processes")
    table = []
    for cold, verify in arms:
        median = statistics.median(seconds[cold, verify])
        base = statistics.median(seconds[cold, False])
        hashed = f"{size / 1e9 / (median - base):.1f}" if verify and median > base else ""
        table.append(["cold" if cold else "warm", "yes" if verify else "no", f"{median:.3f}", f"{median / base:.1f}x", hashed])
    print(tabulate(table, headers=["page cache", "verify", "first open + get (s)", "x no verify", "GB/s hashed"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
