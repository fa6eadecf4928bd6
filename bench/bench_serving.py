"""Serving benchmark: feature-store batch gets (embedded and Redis) and FAISS user -> Pin retrieval.

Store: one version of ``--entities`` random int64 ids x ``--dim`` float32 is written to each
backend (the Redis one on a throwaway local ``redis-server``, or ``--redis URL``); then ``--gets``
batch gets of 1,000 keys (95% present, 5% missing; a fresh random batch each time, after 20 warm-up
gets) from one client thread report p50/p99 latency.

ANN: ``--pins`` clustered unit vectors (``--clusters`` interest clusters, noise of norm ~1 around
each centre: top-1 cosine ~0.7, like trained embeddings) are indexed exactly (IndexFlatIP) and with
IVF (`embeddings.ann.AnnConfig` defaults, plus an nprobe sweep). QPS is measured on batches of
queries (the offline/batch-retrieval shape) and one query at a time (online); recall@100 is the
share of the exact top-100 that the approximate top-100 contains, over ``--recall-queries`` queries.
FAISS uses all cores (OpenMP).

Usage::

    python bench/bench_serving.py                                    # 1M x 64 both parts: ~3-5 min
    python bench/bench_serving.py --entities 100000 --pins 100000   # a smoke run, seconds
    python bench/bench_serving.py --skip-ann --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.redis_server, the one place that starts a redis-server

from embeddings.store import EmbeddedStore, FeatureStore  # noqa: E402

KEYS_PER_GET = 1000
WRITE_CHUNK = 65_536


def unique_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct random int64 ids in random order (as hashed production ids look)."""
    ids = np.unique(rng.integers(0, 2**62, int(n * 1.01) + 100))
    return rng.permutation(ids)[:n]


def write_version(store: FeatureStore, ids: np.ndarray, emb: np.ndarray) -> float:
    t0 = time.perf_counter()
    with store.begin_version("bench", emb.shape[1]) as writer:
        for start in range(0, len(ids), WRITE_CHUNK):
            writer.put(ids[start : start + WRITE_CHUNK], emb[start : start + WRITE_CHUNK])
        writer.commit()
    store.activate("bench")
    return time.perf_counter() - t0


def get_latencies(store: FeatureStore, ids: np.ndarray, emb: np.ndarray, gets: int, rng) -> np.ndarray:
    """Seconds per batch get of KEYS_PER_GET keys (95% present); checks a sample of the answers."""
    present = int(KEYS_PER_GET * 0.95)
    times = []
    for i in range(gets + 20):
        rows = rng.integers(0, len(ids), present)
        query = np.concatenate([ids[rows], -1 - rng.integers(0, 2**62, KEYS_PER_GET - present)])
        t0 = time.perf_counter()
        got, found = store.get(query)
        if i >= 20:
            times.append(time.perf_counter() - t0)
        right = found[:present].all() and not found[present:].any() and np.array_equal(got[:present], emb[rows])
        if not right:
            raise SystemExit(f"{store!r} returned wrong rows")
    return np.array(times)


def bench_stores(args, rng) -> list[tuple]:
    print(f"store: generating {args.entities:,} x {args.dim} ...", file=sys.stderr)
    ids = unique_ids(args.entities, rng)
    emb = rng.standard_normal((args.entities, args.dim), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="derm-bench-") as tmp:
        embedded = EmbeddedStore(Path(tmp) / "store")
        write_s = write_version(embedded, ids, emb)
        lat = get_latencies(embedded, ids, emb, args.gets, rng)
        rows.append(("embedded (mmap + hash)", write_s, lat, ""))
        del embedded
        if not args.skip_redis:
            rows.append(bench_redis(args, ids, emb, rng, tmp))
    return rows


def bench_redis(args, ids, emb, rng, tmp) -> tuple:
    import redis.utils

    from embeddings.redis_store import RedisStore
    from tests.redis_server import RedisServer

    server = None
    url = args.redis
    if url is None:
        server = RedisServer(tmp)
        url = server.url
    try:
        store = RedisStore(url, namespace=f"bench-{os.getpid()}")
        before = store.client.info("memory")["used_memory"]
        print(f"store: writing {len(ids):,} entities to Redis ...", file=sys.stderr)
        write_s = write_version(store, ids, emb)
        per_entity = (store.client.info("memory")["used_memory"] - before) / len(ids)
        lat = get_latencies(store, ids, emb, args.gets, rng)
        note = f"{per_entity:.0f} B/entity in Redis; hiredis {'yes' if redis.utils.HIREDIS_AVAILABLE else 'no'}"
        if args.redis is not None:  # leave a shared server as we found it
            store.client.delete(*[f"{store.namespace}:{k}" for k in ("active", "history", "versions", "data:bench")])
        return ("redis (hash per version)", write_s, lat, note)
    finally:
        if server is not None:
            server.stop()


def clustered_pins(n: int, dim: int, clusters: int, rng) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)]
    x += rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def qps(index, queries: np.ndarray, k: int, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start : start + batch], k)
    return len(queries) / (time.perf_counter() - t0)


def recall_at(approx: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, t)) / len(t) for a, t in zip(approx, truth)]))


def bench_ann(args, rng) -> list[tuple]:
    import faiss

    from embeddings.ann import AnnConfig, AnnIndex

    print(f"ann: generating {args.pins:,} pins ...", file=sys.stderr)
    pins = clustered_pins(args.pins + args.queries, args.dim, args.clusters, rng)
    queries, pins = pins[args.pins :], pins[: args.pins]
    ids = unique_ids(args.pins, rng)
    k = 100
    rows = []

    print("ann: exact ...", file=sys.stderr)
    t0 = time.perf_counter()
    exact = AnnIndex.build(ids, pins, AnnConfig(exact_max_rows=args.pins))
    build_s = time.perf_counter() - t0
    truth_q = queries[: args.recall_queries]
    t0 = time.perf_counter()
    truth, _ = exact.search(truth_q, k)
    exact_qps = len(truth_q) / (time.perf_counter() - t0)
    exact_qps1 = qps(exact, queries[:20], k, 1)
    rows.append(("exact (IndexFlatIP)", build_s, exact_qps, exact_qps1, 1.0, "-"))
    del exact

    print("ann: IVF ...", file=sys.stderr)
    t0 = time.perf_counter()
    ivf = AnnIndex.build(ids, pins, AnnConfig(exact_max_rows=1))  # the defaults, IVF at any size
    build_s = time.perf_counter() - t0
    inner = faiss.extract_index_ivf(ivf.index)
    default_nprobe = inner.nprobe
    for nprobe in sorted({16, 64, default_nprobe, 4 * default_nprobe} - {0}):
        ivf.set_search_params(nprobe=min(nprobe, inner.nlist))
        approx, _ = ivf.search(truth_q, k)
        name = f"IVF nlist={inner.nlist} nprobe={inner.nprobe}{' (default)' if nprobe == default_nprobe else ''}"
        rows.append((name, build_s, qps(ivf, queries, k, 1000), qps(ivf, queries[:200], k, 1), recall_at(approx, truth), ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=1_000_000, help="entities in the store version")
    p.add_argument("--dim", type=int, default=64, help="embedding dim (store and pins)")
    p.add_argument("--gets", type=int, default=300, help="timed batch gets of 1,000 keys per backend")
    p.add_argument("--redis", help="an existing Redis (default: start a throwaway redis-server)")
    p.add_argument("--skip-redis", action="store_true")
    p.add_argument("--pins", type=int, default=1_000_000, help="Pins in the ANN index")
    p.add_argument("--clusters", type=int, default=5_000, help="interest clusters of the synthetic Pins")
    p.add_argument("--queries", type=int, default=2_000, help="queries for batched IVF QPS")
    p.add_argument("--recall-queries", type=int, default=500, help="queries for recall (and exact QPS)")
    p.add_argument("--skip-ann", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, Python {platform.python_version()}")
    size = f"{args.entities:,} entities x {args.dim} dims"
    print(f"\nFeature store: batch get of {KEYS_PER_GET:,} keys (95% present), {size}, {args.gets} gets\n")
    print("| backend | write + commit (s) | get p50 (ms) | get p99 (ms) | keys/s at p50 | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for name, write_s, lat, note in bench_stores(args, rng):
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        print(f"| {name} | {write_s:.1f} | {p50:.3f} | {p99:.3f} | {KEYS_PER_GET / p50 * 1e3:,.0f} | {note} |")

    if not args.skip_ann:
        rows = bench_ann(args, rng)
        print(
            f"\nANN: {args.pins:,} Pins x {args.dim} dims ({args.clusters:,} clusters), k=100; batched QPS on "
            f"{args.queries:,} queries in batches of 1,000 (exact: {args.recall_queries}), single-query QPS on 20-200; "
            f"recall@100 vs. exact on {args.recall_queries} queries\n"
        )
        print("| index | build (s) | QPS batched | QPS 1 query | recall@100 |")
        print("|---|---:|---:|---:|---:|")
        for name, build_s, batch_qps, one_qps, rec, _ in rows:
            print(f"| {name} | {build_s:.1f} | {batch_qps:,.0f} | {one_qps:,.0f} | {rec:.3f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
