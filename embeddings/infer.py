"""Daily inference and back-inference of entity embeddings from an upstream snapshot (paper
Appendix B.3; deduplication, Appendix C.1).

For a day of a source's log, every user and every Pin that appears gets one embedding: the
tower's output for its *last* row of the day. Deduplicating first — choosing those rows before any
tower runs — embeds each entity once instead of once per impression (``dedup_first=False`` embeds
every row and keeps the last output, for comparison; the results are the same). Back-inference is
the same for every day of a window with the latest snapshot.

Multi-rank without gathering: entity ``e`` belongs to rank ``splitmix64(e) mod world_size``; every
rank reads the day's key columns, picks the last row of each of its entities, reads those rows,
and runs the sharded model (loaded straight from the sharded snapshot) on them. Output::

    OUT/<source>/<entity>/day=YYYY-MM-DD/part-r<rank>.parquet   entity_id int64, embedding float32[E],
                                                                event_time int64 (its last event)

Usage (one process, or under torchrun / TorchX with more ranks)::

    python embeddings/infer.py --snapshot runs/demo/ctr/snapshots/day=2026-01-03 \\
        --data runs/demo/data --days 2026-01-03 --out runs/demo/emb
    torchrun --nproc_per_node 2 embeddings/infer.py --snapshot ... --days 2026-01-01,2026-01-02,2026-01-03 --out ...
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import os_error_line, swap_dir  # noqa: E402

if __package__ in (None, ""):  # run as a script (torchrun embeddings/infer.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.config import from_dict  # noqa: E402
from data.columns import DataError, hash_ids  # noqa: E402
from data.loader import EventLog  # noqa: E402
from data.spec import load_spec  # noqa: E402
from modules.config import DERMConfig  # noqa: E402
from modules.derm import build_derm  # noqa: E402
from sharding.checkpoint import SnapshotError, load_weights, read_meta  # noqa: E402
from sharding.dmp import shard_model  # noqa: E402

log = logging.getLogger("derm.embeddings.infer")
ENTITIES = ("user", "pin")


@dataclass
class Embedder:
    """The sharded model of a snapshot, ready to embed rows of its source."""

    snapshot: Path
    data_root: Path
    source: str
    model: torch.nn.Module
    device: torch.device
    dim: int  # E, the embedding width

    @classmethod
    def load(cls, snapshot: str | os.PathLike, data_root: str | os.PathLike, device: torch.device) -> "Embedder":
        """Builds the model the snapshot was trained with and loads its weights, each rank only
        its own shards (collective)."""
        snapshot, data_root = Path(snapshot), Path(data_root)
        meta = read_meta(snapshot)
        source = meta["source"]
        spec = load_spec(data_root / "spec.toml")
        if spec.for_source(source).to_dict() != meta["spec"]:
            raise SnapshotError(f"{snapshot}: its spec differs from {data_root / 'spec.toml'} (source {source})")
        config = from_dict(DERMConfig, meta["model"], f"{snapshot}/meta.json model")
        task = build_derm(spec, source, config, device=device, embedding_device=torch.device("meta"))
        model, _ = shard_model(task, device, spec=spec.for_source(source))
        load_weights(snapshot, model)
        model.eval()
        return cls(snapshot, data_root, source, model, device, config.embedding_dim)


def infer_day(
    embedder: Embedder,
    day: str,
    out: str | os.PathLike,
    batch_size: int = 4096,
    dedup_first: bool = True,
    overwrite: bool = False,
) -> dict[str, int]:
    """Embeds every user and Pin of ``day`` (collective); returns counts per entity type. Refuses
    (a ``ValueError`` on every rank, before any rank writes) if any embedding is NaN or infinite."""
    out = Path(out)
    rank, world = dist.get_rank(), dist.get_world_size()
    events = EventLog(embedder.data_root, embedder.source, days=[day])
    targets = {e: out / embedder.source / e / f"day={day}" for e in ENTITIES}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    keys = _key_columns(events)  # user, pin, time of every row of the day, in file order
    embedded = {}  # both entity types held until both are checked: nothing is written before that
    for entity in ENTITIES:
        ids = keys[entity]
        mine = np.flatnonzero(hash_ids(ids, world) == rank)  # this rank's entities' rows
        rows = mine[_last_per_entity(ids[mine], keys["time"][mine])] if dedup_first else mine
        emb = _embed_rows(embedder, events, rows, entity, batch_size)
        entity_ids, times = ids[rows], keys["time"][rows]
        if not dedup_first:  # keep each entity's output for its last row
            keep = _last_per_entity(entity_ids, times)
            entity_ids, times, emb = entity_ids[keep], times[keep], emb[keep]
        embedded[entity] = (entity_ids, emb.reshape(-1, embedder.dim), times)
    _refuse_non_finite(embedder, day, {entity: emb for entity, (_, emb, _) in embedded.items()})
    return {entity: _write(targets[entity], rank, *embedded[entity]) for entity in ENTITIES}


def _refuse_non_finite(embedder: Embedder, day: str, embedded: dict[str, np.ndarray]) -> None:
    """Raises, on every rank alike, if any of the day's embeddings (``entity -> [N, E]``) is NaN or
    infinite: aggregation would carry them into the pool. Collective: the counts are summed over
    the ranks, so no rank writes its part while another refuses."""
    users_pins = (embedded["user"], embedded["pin"])
    bad = [int((~np.isfinite(emb)).any(axis=1).sum()) for emb in users_pins]
    counts = torch.tensor([*bad, *(len(emb) for emb in users_pins)], dtype=torch.int64, device=embedder.device)
    dist.all_reduce(counts)
    bad_users, bad_pins, users, pins = counts.tolist()
    if bad_users or bad_pins:
        raise ValueError(f"{embedder.source} {day}: {bad_users:,} of {users:,} users and {bad_pins:,} of {pins:,} Pins got "
                         f"non-finite (NaN or infinite) embeddings from snapshot {embedder.snapshot}; nothing written "
                         "(the snapshot's weights are checked finite when loaded: look at the day's input values)")


def _key_columns(events: EventLog) -> dict[str, np.ndarray]:
    k = events.spec.keys
    parts = [pq.read_table(f.path, columns=[k.user, k.pin, k.time]) for f in events.files]
    table = pa.concat_tables(parts)
    return {"user": table[k.user].to_numpy(), "pin": table[k.pin].to_numpy(), "time": table[k.time].to_numpy()}


def _last_per_entity(ids: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Positions of each entity's last row: latest time, and the later row among equal times."""
    order = np.lexsort((np.arange(ids.size), times, ids))
    last = np.r_[ids[order][1:] != ids[order][:-1], True]
    return order[last]


def _embed_rows(embedder: Embedder, events: EventLog, rows: np.ndarray, entity: str, batch_size: int) -> np.ndarray:
    """[len(rows), E] embeddings of the given global rows of the day (collective: every rank runs
    the same number of forwards, repeating its last batch when it has fewer)."""
    n_local = -(-rows.size // batch_size)
    steps = torch.tensor([n_local], device=embedder.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    batches = _read_rows(events, np.sort(rows), batch_size)
    order = np.argsort(np.argsort(rows))  # where each requested row lands in the sorted read
    outputs, batch = [], None
    with torch.no_grad():
        for _ in range(int(steps.item())):
            nxt = next(batches, None)
            batch, keep = (nxt, True) if nxt is not None else (batch, False)
            if batch is None:  # this rank has no rows at all: run the collective on an empty-safe stand-in
                batch = events.reader.to_batch(_first_row(events))
            _, (_, out) = embedder.model(batch.to(embedder.device))
            if keep:
                emb = out.user_embedding if entity == "user" else out.pin_embedding
                outputs.append(emb.float().cpu().numpy())
    stacked = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    return stacked[order] if rows.size else stacked


def _read_rows(events: EventLog, rows: np.ndarray, batch_size: int):
    """Batches of the given (sorted, global) rows of the day, read one file at a time."""
    pending: list[pa.Table] = []
    buffered = 0
    for f in events.files:
        lo, hi = np.searchsorted(rows, [f.first_row, f.first_row + f.num_rows])
        if lo == hi:
            continue
        table = pq.read_table(f.path, columns=events.reader.columns).take(pa.array(rows[lo:hi] - f.first_row))
        events.reader.check_values(table, str(f.path), 0)
        pending.append(table)
        buffered += table.num_rows
        while buffered >= batch_size:
            merged = pa.concat_tables(pending)
            yield events.reader.to_batch(merged.slice(0, batch_size))
            rest = merged.slice(batch_size)
            pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield events.reader.to_batch(pa.concat_tables(pending))


def _first_row(events: EventLog) -> pa.Table:
    return pq.read_table(events.files[0].path, columns=events.reader.columns).slice(0, 1)


def _write(target: Path, rank: int, ids: np.ndarray, emb: np.ndarray, times: np.ndarray) -> int:
    """Writes this rank's part into the day's staging directory; ``_publish_day`` moves it."""
    stage = target.with_name(f".{target.name}.staging")
    if rank == 0:  # parts a crashed earlier run (perhaps with more ranks) left there must not be published
        shutil.rmtree(stage, ignore_errors=True)
    dist.barrier()
    stage.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "entity_id": pa.array(ids.astype(np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).reshape(-1)), emb.shape[1]),
        "event_time": pa.array(times.astype(np.int64)),
    })
    pq.write_table(table, stage / f"part-r{rank:05d}.parquet", compression="zstd")
    dist.barrier()
    if rank == 0:  # every rank has written: replace the day atomically
        swap_dir(stage, target)
    dist.barrier()
    return int(ids.size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embeddings/infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot", required=True, help="snapshot directory (RUN_DIR/snapshots/day=YYYY-MM-DD)")
    p.add_argument("--data", required=True, help="dataset root with spec.toml (the snapshot's source is read from it)")
    p.add_argument("--days", required=True, help="comma-separated days to embed (several: back-inference)")
    p.add_argument("--out", required=True, help="output root: OUT/<source>/<user|pin>/day=.../")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-dedup-first", action="store_true", help="embed every row, then keep each entity's last")
    p.add_argument("--overwrite", action="store_true", help="replace existing output days")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    from common.log import setup_logging
    from sharding.distributed import init_distributed, shutdown

    setup_logging()
    ctx = init_distributed(args.device)
    setup_logging(rank=ctx.rank)
    failed = True
    try:
        embedder = Embedder.load(args.snapshot, args.data, ctx.device)
        for day in args.days.split(","):
            t0 = time.perf_counter()
            counts = infer_day(embedder, day, args.out, args.batch_size, not args.no_dedup_first, args.overwrite)
            log.info("%s %s: %d users, %d Pins embedded on this rank in %.1fs", embedder.source, day,
                     counts["user"], counts["pin"], time.perf_counter() - t0)
        failed = False
        return 0
    except (ValueError, SnapshotError, DataError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        log.error("%s", os_error_line(e))
        return 1
    finally:
        shutdown(failed=failed)


if __name__ == "__main__":
    raise SystemExit(main())
