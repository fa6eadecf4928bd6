"""Serving benchmark: feature-store batch gets (embedded and Redis) and FAISS user -> Pin retrieval.

Store: one version of ``--entities`` random int64 ids x ``--dim`` float32 is written to each
backend (the Redis one on a throwaway local ``redis-server``, or ``--redis URL``); then ``--gets``
batch gets of 1,000 keys (95% present, 5% missing; a fresh random batch each time, after 20 warm-up
gets) from one client thread report p50/p99 latency.

ANN: ``--pins`` clustered unit vectors (``--clusters`` interest clusters, noise of norm ~1 around
each centre: top-1 cosine ~0.7, like trained embeddings) are indexed exactly (IndexFlatIP) and by
each candidate of `ann_candidates` (IVF-Flat; IVF-PQ fast-scan with exact re-ranking at two code
sizes; HNSW with ``--hnsw``), each built by `embeddings.ann.AnnIndex.build` and swept over its
search parameters (nprobe, re-ranked candidates, efSearch). QPS is measured on batches of queries
(the offline/batch-retrieval shape) and one query at a time (online); recall@100 is the share of
the exact top-100 that the approximate top-100 contains, over ``--recall-queries`` queries. The
last line names the fastest setting (batched QPS) with recall@100 >= ``--min-recall``: the
settings that `AnnConfig`'s defaults should be. FAISS uses all cores (OpenMP).

Usage::

    python bench/bench_serving.py                                    # 1M x 64 both parts: ~2-3 min
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

from embeddings.embedded_store import EmbeddedStore  # noqa: E402
from embeddings.store import FeatureStore  # noqa: E402

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


def qps(index, queries: np.ndarray, k: int, batch: int, passes: int = 1) -> float:
    """Queries per second over ``queries`` in batches of ``batch``; the best of ``passes`` passes (the
    machine is shared: the best pass is the one least disturbed)."""
    best = np.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        for start in range(0, len(queries), batch):
            index.search(queries[start : start + batch], k)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def recall_at(approx: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, t)) / len(t) for a, t in zip(approx, truth)]))


def ann_candidates(args) -> list[tuple[str, dict, list[dict]]]:
    """(name, `AnnConfig` fields, search-parameter sweep) for each index built. Every candidate is
    built by `AnnIndex.build`, so the winner is a configuration the project can serve."""
    # 0 = the AnnConfig default of that knob, so the default's row is always measured.
    pq_sweep = [{"nprobe": p, "k_factor": f} for p in (64, 0, 256) for f in (1.5, 0, 4)]
    candidates = [
        ("IVF-Flat", {"kind": "ivf"}, [{"nprobe": p} for p in (16, 64, 0, 256)]),
        ("IVF-PQ fast-scan + refine, pq_m=E", {"kind": "ivfpq"}, pq_sweep),
        (
            "IVF-PQ fast-scan + refine, pq_m=E/2",
            {"kind": "ivfpq", "pq_m": args.dim // 2},
            [{"nprobe": p, "k_factor": f} for p in (0, 256) for f in (4, 8)],
        ),
    ]
    if args.hnsw:
        candidates.append(("HNSW M=32", {"kind": "hnsw"}, [{"ef_search": e} for e in (128, 192, 256)]))
    return candidates


def bench_ann(args, rng) -> tuple[float, list[tuple]]:
    """Exact QPS, and a row (name, params, is default, build s, QPS batched, QPS one query, recall)
    per candidate setting."""
    from embeddings.ann import AnnConfig, AnnIndex

    print(f"ann: generating {args.pins:,} pins ...", file=sys.stderr)
    pins = clustered_pins(args.pins + args.queries, args.dim, args.clusters, rng)
    queries, pins = pins[args.pins :], pins[: args.pins]
    ids = unique_ids(args.pins, rng)
    k = 100
    truth_q = queries[: args.recall_queries]

    print("ann: exact ...", file=sys.stderr)
    t0 = time.perf_counter()
    exact = AnnIndex.build(ids, pins, AnnConfig(exact_max_rows=args.pins))
    build_s = time.perf_counter() - t0
    truth, _ = exact.search(truth_q, k)
    exact_qps = qps(exact, truth_q, k, len(truth_q), passes=args.passes)
    rows = [("exact (IndexFlatIP)", "", False, build_s, exact_qps, qps(exact, queries[:20], k, 1), 1.0)]
    del exact

    cpu_default = AnnConfig(use_gpu=False)
    for name, fields, sweep in ann_candidates(args):
        print(f"ann: {name} ...", file=sys.stderr)
        config = AnnConfig(exact_max_rows=1, use_gpu=False, **fields)  # on CPU, at any size
        t0 = time.perf_counter()
        index = AnnIndex.build(ids, pins, config)
        build_s = time.perf_counter() - t0
        default_params = index.search_params  # as the config sets them
        default_build = config.index_kind() == cpu_default.index_kind() and all(
            getattr(config, f) == getattr(cpu_default, f) for f in fields if f != "kind"
        )
        settings = []  # the sweep with its 0s resolved, without repeats, in order
        for params in sweep:
            setting = {**default_params, **{f: v for f, v in params.items() if v}}
            settings += [setting] if setting not in settings else []
        for setting in sorted(settings, key=lambda p: tuple(p.values())):
            index.set_search_params(**setting)
            approx, _ = index.search(truth_q, k)
            shown = ", ".join(f"{f}={v:g}" for f, v in index.search_params.items())
            row_qps = qps(index, queries, k, 1000, passes=args.passes)
            one_qps = qps(index, queries[:200], k, 1)
            is_default = default_build and index.search_params == default_params
            rows.append((name, shown, is_default, build_s, row_qps, one_qps, recall_at(approx, truth)))
        del index
    return exact_qps, rows
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
    p.add_argument("--min-recall", type=float, default=0.95, help="recall@100 a candidate must reach to win")
    p.add_argument("--passes", type=int, default=3, help="batched QPS is the best of this many passes")
    p.add_argument("--hnsw", action="store_true", help="add HNSW candidates (builds for minutes at 1M on 2 cores)")
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
        exact_qps, rows = bench_ann(args, rng)
        print(
            f"\nANN: {args.pins:,} Pins x {args.dim} dims ({args.clusters:,} clusters), k=100; batched QPS on "
            f"{args.queries:,} queries in batches of 1,000 (exact: {args.recall_queries} in one batch), best of "
            f"{args.passes} passes; single-query QPS on 20-200; recall@100 vs. exact on {args.recall_queries} queries; "
            f"(default) = embeddings.ann.AnnConfig()\n"
        )
        print("| index | search params | build (s) | QPS batched | x exact | QPS 1 query | recall@100 |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, params, is_default, build_s, batch_qps, one_qps, rec in rows:
            shown = f"{params} (default)" if is_default else params
            ratio = batch_qps / exact_qps
            print(f"| {name} | {shown} | {build_s:.1f} | {batch_qps:,.0f} | {ratio:.1f} | {one_qps:,.0f} | {rec:.3f} |")
        good = [r for r in rows[1:] if r[6] >= args.min_recall]
        if good:
            name, params, is_default, _, batch_qps, _, rec = max(good, key=lambda r: r[4])
            print(
                f"\nfastest at recall@100 >= {args.min_recall}: {name}, {params}{' (the default)' if is_default else ''}: "
                f"{batch_qps:,.0f} QPS = {batch_qps / exact_qps:.1f}x exact, recall@100 {rec:.3f}"
            )
        else:
            print(f"\nno candidate reaches recall@100 >= {args.min_recall}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
