"""Snapshots that are crafted, damaged or written onto a full disk (issue 29 items 5, 7, 8, 9a):
loading one runs no code and refuses it in one line naming the snapshot and the file, on every
rank together; a save that fills the disk is one line naming the snapshot and leaves nothing."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from common.config import dump_config
from common.digest import MANIFEST, digest_files, read_manifest, write_manifest
from sharding.checkpoint import SnapshotError, load_snapshot, load_unsharded, load_weights, save_snapshot
from tests.distributed import run_ranks
from tests.helpers import D1, D2, SMALL_MODEL

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)




def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)  # param_groups: DCP's non-tensor (bytes) entries
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model, optimizer = _model()
    return save_snapshot(tmp_path / "snapshots" / "day=x", model, optimizer, {"day": "x"}), model


def _reseal(snap: Path) -> None:
    """Rewrites the manifest over the snapshot's present files: what someone who crafts a
    snapshot can do too (xxh3 proves bytes against damage, not against an author)."""
    names = [p.name for p in snap.iterdir() if p.name != MANIFEST]
    write_manifest(snap, digest_files(snap, names))


def _load(loader: str, snap: Path) -> None:
    model, optimizer = nn.Linear(4, 3), torch.optim.Adam(nn.Linear(4, 3).parameters())
    if loader == "load_snapshot":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
        load_snapshot(snap, model, optimizer)
    elif loader == "load_weights":
        load_weights(snap, model)
    else:
        load_unsharded(snap, model)


LOADERS = ["load_snapshot", "load_weights", "load_unsharded"]


# ---- item 7: a crafted snapshot runs no code -------------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_a_crafted_metadata_runs_no_code_and_is_refused_naming_the_snapshot(tmp_path, one_rank, loader):
    snap, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    with open(snap / ".metadata", "wb") as f:
        import pickle

        pickle.dump(_Payload(str(marker)), f)
    _reseal(snap)
    with pytest.raises(SnapshotError) as refused:
        _load(loader, snap)
    assert not marker.exists()  # before: the command ran (DCP's reader calls plain pickle.load)
    message = str(refused.value)
    assert message.startswith(f"{snap}: ") and ".metadata" in message and "posix.system" in message
    assert "\n" not in message


def test_a_crafted_non_tensor_entry_runs_no_code(tmp_path, one_rank):
    """DCP saves non-tensor values as pickles inside the shards and its default planner loads
    them with ``weights_only=False``; a snapshot whose metadata marks a weight as such a value
    ran the pickle in place of reading a tensor."""
    snap, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    for p in snap.glob("*.distcp"):
        p.unlink()
    (snap / ".metadata").unlink()
    dcp.save({"model": {"weight": _Payload(str(marker)), "bias": torch.zeros(3)}}, checkpoint_id=snap)
    assert not marker.exists()
    _reseal(snap)
    with pytest.raises(SnapshotError) as refused:
        load_unsharded(snap, nn.Linear(4, 3))
    assert not marker.exists()  # before: the command ran
    assert str(refused.value).startswith(f"{snap}: ") and "model.weight" in str(refused.value)


# ---- item 5: a manifest proves the snapshot's bytes --------------------------------------------------


def test_a_snapshot_lists_every_file_in_its_manifest(tmp_path, one_rank):
    snap, _ = _saved(tmp_path)
    files = {p.name for p in snap.iterdir()} - {MANIFEST}
    assert files >= {".metadata", "meta.json", "rng-rank0.pt"} and any(n.endswith(".distcp") for n in files)
    assert set(read_manifest(snap, "snapshot")) == files  # before: no manifest


@pytest.mark.parametrize("loader", LOADERS)
def test_flipped_weights_are_refused_naming_the_snapshot_and_the_file(tmp_path, one_rank, loader):
    snap, _ = _saved(tmp_path)
    shard = next(snap.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a weight: DCP itself notices nothing
    shard.write_bytes(bytes(data))
    with pytest.raises(SnapshotError) as refused:
        _load(loader, snap)
    message = str(refused.value)  # before: loaded, other weights, no error
    assert message.startswith(f"{snap}: ") and str(shard) in message and "damaged" in message


def test_a_snapshot_saved_before_manifests_still_loads_with_one_warning(tmp_path, one_rank, caplog):
    snap, saved = _saved(tmp_path)
    (snap / MANIFEST).unlink()
    model = nn.Linear(4, 3)
    with caplog.at_level(logging.WARNING, logger="derm"):
        load_unsharded(snap, model)
    assert torch.equal(model.weight, saved.weight)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(snap) in warned[0] and MANIFEST in warned[0], warned


# ---- item 9a: a missing, truncated or absent file is one line naming it ------------------------------


def _damage(snap: Path, how: str) -> str:
    """Damages ``snap``; returns the name of the file a refusal must name."""
    shard = next(snap.glob("*.distcp"))
    if how == "missing shard":
        shard.unlink()
        return shard.name
    if how == "truncated shard":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        return shard.name
    (snap / ".metadata").unlink()
    return ".metadata"


@pytest.mark.parametrize("manifest", [True, False], ids=["with manifest", "saved before manifests"])
@pytest.mark.parametrize("how", ["missing shard", "truncated shard", "no .metadata"])
def test_a_missing_or_truncated_file_is_one_line_naming_the_snapshot_and_the_file(tmp_path, one_rank, how, manifest):
    snap, _ = _saved(tmp_path)
    if not manifest:
        (snap / MANIFEST).unlink(missing_ok=True)
    name = _damage(snap, how)
    for loader in LOADERS:  # before: FileNotFoundError, CheckpointException (a BaseException), AssertionError
        with pytest.raises(SnapshotError) as refused:
            _load(loader, snap)
        message = str(refused.value)
        assert message.startswith(f"{snap}: ") and name in message and "\n" not in message, (loader, message)
        assert ("missing" if how != "truncated shard" else "truncated" if not manifest else "damaged") in message


def _load_damaged_on_two_ranks(rank: int, world_size: int, root: str) -> str:
    model, optimizer = _model()
    snap = save_snapshot(Path(root) / "day=x", model, optimizer, {"day": "x"})
    if rank == 0:  # a file that rank 1 checks (each rank checks every world_size-th name of the manifest)
        victim = snap / sorted(read_manifest(snap, "snapshot"))[1]
        victim.write_bytes(victim.read_bytes() + b"!")
    dist.barrier()
    try:
        load_weights(snap, nn.Linear(4, 3))
    except SnapshotError as e:
        return str(e)
    return "loaded"


@pytest.mark.slow
def test_a_damaged_snapshot_is_refused_on_every_rank_together(tmp_path):
    first, second = run_ranks(_load_damaged_on_two_ranks, 2, str(tmp_path), timeout=300)
    assert first == second and "damaged" in first, (first, second)  # before: "loaded" on both


# ---- the command lines ---------------------------------------------------------------------------


def _copy(tiny_snapshot: Path, tmp_path: Path) -> Path:
    run = tmp_path / "cvr"
    shutil.copytree(tiny_snapshot.parents[1], run)
    return run / "snapshots" / tiny_snapshot.name


@pytest.mark.slow
def test_the_command_lines_refuse_a_damaged_snapshot_in_one_line(tiny_snapshot, tiny_world, tmp_path):
    from trainer.config import DataConfig, RunConfig, TrainConfig

    digests = read_manifest(tiny_snapshot, "snapshot")  # a 2-rank TorchRec snapshot lists all its files
    assert digests is not None and {"plan.json", "meta.json", ".metadata", "rng-rank0.pt", "rng-rank1.pt"} <= set(digests)
    assert set(digests) == {p.name for p in tiny_snapshot.iterdir()} - {MANIFEST}

    snap = _copy(tiny_snapshot, tmp_path)
    shard = max(snap.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 4096, 16):  # flip weights (the 209 of 385 users)
        data[i] ^= 0x40
    shard.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "embeddings/infer.py", "--snapshot", str(snap), "--data", str(tiny_world),
                           "--days", D1, "--out", str(tmp_path / "emb")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]  # before: rc 0
    (line,) = [x for x in done.stderr.splitlines() if "damaged" in x]
    assert f"{snap}: {shard} is damaged" in line
    assert not (tmp_path / "emb").exists()

    snap = _copy(tiny_snapshot, tmp_path / "again")
    missing = sorted(snap.glob("*.distcp"))[-1]
    missing.unlink()
    config = RunConfig(data=DataConfig(root=str(tiny_world), source="cvr", batch_size=200, eval_batch_size=500, synthetic_preset=""),
                       train=TrainConfig(run_dir=str(snap.parents[1]), mode="incremental", day=D2, eval_day="none",
                                         max_steps_per_day=2, threads=1),
                       model=SMALL_MODEL)
    dump_config(config, tmp_path / "run.toml")
    done = subprocess.run([sys.executable, "trainer/main.py", "--config", str(tmp_path / "run.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]  # before: a traceback
    (line,) = [x for x in done.stderr.splitlines() if "missing" in x]
    assert f"{snap}: {missing} is missing" in line
    assert not (snap.parent / f"day={D2}").exists()


# ---- item 8: training onto a full disk -----------------------------------------------------------


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_line_naming_the_snapshot_and_leaves_none(small_disk, tiny_world, tmp_path):
    from trainer.config import DataConfig, RunConfig, TrainConfig

    run = small_disk / "run"  # a snapshot of the small model is ~16 MB: it cannot fit in 5 MiB
    config = RunConfig(data=DataConfig(root=str(tiny_world), source="cvr", batch_size=200, eval_batch_size=500, synthetic_preset=""),
                       train=TrainConfig(run_dir=str(run), days=(D1,), eval_day="none", max_steps_per_day=2, threads=1),
                       model=SMALL_MODEL)
    dump_config(dataclasses.replace(config), tmp_path / "run.toml")
    done = subprocess.run([sys.executable, "trainer/main.py", "--config", str(tmp_path / "run.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]  # before: enforce fail ... unexpected pos
    (line,) = [x for x in done.stderr.splitlines() if "disk full" in x]
    assert line.endswith(f"derm.main: disk full: no space left on the device ({run / 'snapshots' / f'day={D1}'}); "
                         "free space or write elsewhere, then run the same command again"), line
    assert list((run / "snapshots").iterdir()) == []  # no half-written snapshot, staged or not
