"""Sharded snapshots with ``torch.distributed.checkpoint`` (DCP).

A snapshot is a directory::

    SNAP/.metadata, SNAP/*.distcp    model (sharded tables, dense parts, the loss's frequency
                                     estimator buffers) and optimizer state (fused and dense)
    SNAP/meta.json                   trainer state (day, steps, data position), spec and model config
    SNAP/plan.json                   the sharding plan the model was trained under
                                     (``sharding.planner.plan_to_json``; for people and dry-run checks)
    SNAP/rng-rank<r>.pt              each rank's RNG states as tensors (restored when the world size
                                     matches; loaded with ``weights_only=True``: no code runs)
    SNAP/MANIFEST.json               the xxh3 digest of every file above (``common.digest``)

Every rank writes its own shards and digests them; nothing but the digests is gathered to rank 0.
Snapshots are written under a hidden staging name and renamed into place by rank 0 once every rank
has finished and the manifest is written, so a crash never leaves a half-written snapshot where a
loader would take it for a complete one; a full disk is the ``OSError`` it is, naming the snapshot
(torch's zip writer reports it as ``unexpected pos``), and leaves no staging behind. Every load
goes through ``sharding.snapshot_files``: the manifest's digests checked, the DCP metadata read
without running code, refused in one line on every rank together. DCP reshards on load, so a
snapshot saved by N ranks loads into M ranks, or into one unsharded process
(:func:`load_unsharded`) for small-scale inference.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.optim import Optimizer
from torchrec.optim.keyed import KeyedOptimizerWrapper

from common.digest import digest_files, hashing_writer, write_manifest
from common.files import swap_dir
from sharding.planner import plan_to_json
from sharding.snapshot_files import SafeLoadPlanner, SafeReader, SnapshotError, checked_metadata
from sharding.snapshot_paths import META, PLAN, is_snapshot, latest_snapshot_before, snapshot_path  # noqa: F401 (re-exported: the snapshot API)

log = logging.getLogger("derm.checkpoint")


def save_snapshot(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer, meta: dict[str, Any], overwrite: bool = False) -> Path:
    """Writes a snapshot of ``model`` (DMP-wrapped) and ``optimizer`` with ``meta`` to ``path``.
    Collective: every rank of the default group calls it."""
    path = Path(path)
    rank = dist.get_rank()
    if path.exists() and not overwrite:
        raise SnapshotError(f"{path} exists; refusing to overwrite it (set train.overwrite = true to replace it)")
    if rank == 0:  # what an earlier save of this snapshot left when it was killed
        for stale in [*path.parent.glob(f".{path.name}.staging-*"), *path.parent.glob(f".{path.name}.old-*")]:
            log.warning("removing %s, left by a save of %s that did not finish", stale, path.name)
            shutil.rmtree(stale, ignore_errors=True)
    name = [f".{path.name}.staging-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    stage = path.parent / name[0]
    try:
        writer = _DigestingWriter(stage)
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, storage_writer=writer)
        rng = f"rng-rank{rank}.pt"
        with hashing_writer(stage / rng) as f:  # a file object: a full disk surfaces as OSError, not "unexpected pos"
            torch.save(_rng_state(), f)
        digests: list[dict[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, {**writer.digests, rng: f.digest})  # also: every rank has written
        if rank == 0:
            (stage / META).write_text(json.dumps({**meta, "world_size": dist.get_world_size()}, indent=1))
            if getattr(model, "plan", None) is not None:  # DMP's
                (stage / PLAN).write_text(json.dumps(plan_to_json(model.plan), indent=1))
            listed = {k: v for d in digests for k, v in d.items()}
            rest = sorted(p.name for p in stage.iterdir() if p.name not in listed)  # .metadata, meta.json, plan.json
            write_manifest(stage, {**listed, **digest_files(stage, rest)})
            swap_dir(stage, path)
    except BaseException as e:
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        full = _disk_full(e)
        if full:  # one line naming the snapshot (trainer/main.py prints common.files.os_error_line)
            raise OSError(full, os.strerror(full), str(path)) from e
        raise
    dist.barrier()
    return path


class _DigestingWriter(FileSystemWriter):
    """DCP's file writer that digests the shards this rank wrote (``digests``, for the manifest)
    and reports a full disk as an ``OSError`` with its errno: torch's zip writer raises
    ``RuntimeError: ... unexpected pos`` with the ``OSError`` only as its context, which DCP drops
    when it gathers the ranks' failures."""

    digests: dict[str, str]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            written = super().write_data(plan, planner)
            results = written.wait()
        except Exception as e:
            full = _disk_full(e)
            if full:
                raise OSError(full, os.strerror(full), str(self.path)) from e
            raise
        self.digests = digest_files(self.path, sorted({r.storage_data.relative_path for r in results}))
        return written


def _disk_full(e: BaseException) -> int:
    """The errno (ENOSPC, EDQUOT) if ``e`` or anything behind it (its causes, the ranks' failures of
    a ``CheckpointException``) is a full disk; else 0."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x.errno
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [failure for failure, _ in x.failures.values()]
    return 0


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a complete snapshot."""
    path = Path(path)
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: not a complete snapshot (no {META})") from None
    except ValueError as e:  # JSON or UTF-8
        raise SnapshotError(f"{path}: {path / META} is damaged ({e})") from None


def _load(state: dict[str, Any], path: str | os.PathLike, collective: bool = True) -> None:
    """``dcp.load`` of ``state`` from the snapshot at ``path`` once its files are proven
    (``sharding.snapshot_files``); any failure is a one-line ``SnapshotError`` on every rank."""
    metadata = checked_metadata(path, collective)
    try:
        dcp.load(state, storage_reader=SafeReader(path, metadata), planner=SafeLoadPlanner(path), no_dist=not collective)
    except SnapshotError:
        raise
    except CheckpointException as e:  # a BaseException: DCP gathers every rank's failure into it
        failures = [failure for failure, _ in e.failures.values()]
        ours = next((f for f in failures if isinstance(f, SnapshotError)), None)
        raise SnapshotError(str(ours) if ours else f"{path}: cannot be loaded ({_one_line(failures[0])})") from None
    except Exception as e:  # DCP's own errors, should one come unwrapped
        raise SnapshotError(f"{path}: cannot be loaded ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def load_snapshot(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Loads a snapshot into a DMP-wrapped ``model`` and its ``optimizer`` (any world size);
    returns its meta. Collective."""
    meta = read_meta(path)
    # DCP loads into the tensors it is given: the dense optimizer's state must exist first.
    _init_optimizer_state(optimizer)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    _load(state, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    rng = Path(path) / f"rng-rank{dist.get_rank()}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng.exists():
        _set_rng_state(load_rng_state(rng))
    return meta


def load_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Loads only a snapshot's model state into a DMP-wrapped ``model`` (inference: no optimizer),
    each rank its own shards; returns its meta. Weights with a NaN or an infinity on any rank are
    refused on every rank together (``SnapshotError``), before the model holds them. Collective."""
    meta = read_meta(path)
    state = {"model": model.state_dict()}
    _load(state, path)
    bad = nonfinite_tensors(state["model"])
    count = torch.tensor([len(bad)], device=next(iter(model.parameters())).device)
    dist.all_reduce(count)  # every rank refuses together, not only the one holding the shard
    if int(count):
        raise SnapshotError(f"{path}: weights with NaN or infinite values ({', '.join(bad[:3]) or 'on another rank'}"
                            f"{', ...' if len(bad) > 3 else ''}); refusing to use them")
    model.load_state_dict(state["model"])
    return meta


def load_unsharded(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Loads a snapshot's model state into a plain, unsharded module in one process (no process
    group): the basis of small-scale inference. Returns the snapshot's meta."""
    meta = read_meta(path)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": exactly our intent
        warnings.simplefilter("ignore", UserWarning)
        _load(state, path, collective=False)
    model.load_state_dict(state["model"])
    return meta


def _init_optimizer_state(optimizer: Optimizer) -> None:
    """Creates the dense optimizer's state if it has not stepped yet (TorchRec's zero-gradient
    ``init_state`` step). The fused in-backward optimizers own their state from the start."""
    for _, opt in getattr(optimizer, "optimizers", []):
        if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
            opt.init_state()


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a (sharded) state dict with a NaN or an infinity in
    this rank's part (local shards of ShardedTensors and DTensors)."""
    bad = []
    for name, value in state.items():
        if hasattr(value, "local_shards"):  # ShardedTensor
            parts = [shard.tensor for shard in value.local_shards()]
        elif hasattr(value, "to_local"):  # DTensor
            parts = [value.to_local()]
        elif isinstance(value, torch.Tensor):
            parts = [value]
        else:
            continue
        if any(p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()) for p in parts):
            bad.append(name)
    return bad


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers only, so that it loads with
    ``weights_only=True`` (numpy's state holds an ndarray, which would need full unpickling)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def load_rng_state(path: str | os.PathLike) -> dict[str, Any]:
    """A rank's RNG states, unpickled with ``weights_only=True``: tensors and plain containers only,
    so a crafted file in a snapshot directory cannot run code (it is refused instead)."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SnapshotError(f"{path}: not a plain RNG state (refusing to unpickle anything else: "
                            f"{str(e).splitlines()[0]}). A snapshot saved before 2026-12-01 holds numpy's state as an "
                            "array: delete its rng-rank*.pt files to load it without restoring the RNGs") from None


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
