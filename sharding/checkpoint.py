"""Sharded snapshots with ``torch.distributed.checkpoint`` (DCP).

A snapshot is a directory::

    SNAP/.metadata, SNAP/*.distcp    model (sharded tables, dense parts, the loss's frequency
                                     estimator buffers) and optimizer state (fused and dense)
    SNAP/meta.json                   trainer state (day, steps, data position), spec and model config
    SNAP/plan.json                   the sharding plan the model was trained under
                                     (``sharding.planner.plan_to_json``; for people and dry-run checks)
    SNAP/rng-rank<r>.pt              each rank's RNG states as tensors (restored when the world size
                                     matches; loaded with ``weights_only=True``: no code runs)

Every rank writes its own shards; nothing is gathered to rank 0. Snapshots are written under a
hidden staging name and renamed into place by rank 0 once every rank has finished, so a crash
never leaves a half-written snapshot where a loader would take it for a complete one. DCP reshards
on load, so a snapshot saved by N ranks loads into M ranks, or into one unsharded process
(:func:`load_unsharded`) for small-scale inference.
"""

from __future__ import annotations

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
from torch.optim import Optimizer
from torchrec.optim.keyed import KeyedOptimizerWrapper

from common.files import swap_dir
from sharding.planner import plan_to_json
from sharding.snapshot_paths import META, PLAN, is_snapshot, latest_snapshot_before, snapshot_path  # noqa: F401 (re-exported: the snapshot API)

log = logging.getLogger("derm.checkpoint")


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete or does not match the model being built."""


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
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=stage)
        torch.save(_rng_state(), stage / f"rng-rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (stage / META).write_text(json.dumps({**meta, "world_size": dist.get_world_size()}, indent=1))
            if getattr(model, "plan", None) is not None:  # DMP's
                (stage / PLAN).write_text(json.dumps(plan_to_json(model.plan), indent=1))
            swap_dir(stage, path)
    except BaseException:
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    dist.barrier()
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a complete snapshot."""
    path = Path(path)
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: not a complete snapshot (no {META})") from None


def load_snapshot(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Loads a snapshot into a DMP-wrapped ``model`` and its ``optimizer`` (any world size);
    returns its meta. Collective."""
    meta = read_meta(path)
    # DCP loads into the tensors it is given: the dense optimizer's state must exist first.
    _init_optimizer_state(optimizer)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
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
    dcp.load(state, checkpoint_id=str(path))
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
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
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
