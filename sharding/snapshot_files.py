"""A snapshot's files, checked before any byte of them is used (issue 29 items 5, 7, 9a).

``torch.distributed.checkpoint``'s own reader trusts the folder it is given: it unpickles
``SNAP/.metadata`` with plain ``pickle.load`` and every non-tensor entry of the shards with
``weights_only=False`` (a crafted file runs code), and a missing or short shard ends in a
traceback from deep inside a collective. Here, before DCP reads anything:

- the files the snapshot's manifest (``common.digest``) lists are checked against their digests,
  each rank a share of them, and a refusal on any rank is a refusal on every rank (no rank is
  left waiting in a collective); a snapshot saved before manifests loads with one warning;
- ``.metadata`` is unpickled admitting only the classes a DCP metadata file is made of
  (``_ADMITTED``: what this project's snapshots hold, found by loading them) and checked for the
  shape DCP expects, each shard it names a plain file name in the snapshot;
- every shard the metadata names must exist and be as long as the metadata says.

DCP then reads through :class:`SafeReader` (the metadata already parsed) and
:class:`SafeLoadPlanner` (non-tensor entries with ``weights_only=True``). xxh3 proves bytes
against damage, not against the author of a crafted snapshot, who can rewrite the manifest too:
that is what the restricted unpickling is for.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from common.digest import IntegrityError, MANIFEST, read_manifest, verify_manifest

log = logging.getLogger("derm.checkpoint")

METADATA = ".metadata"
"""DCP's metadata file in a snapshot."""


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete, damaged, crafted or does not match the model being built."""


_ADMITTED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),  # and dtypes, layouts, memory formats: _admitted
    "torch.serialization": frozenset({"_get_layout"}),  # a layout by its name, from torch's own table
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
}
"""The globals a DCP metadata file may name. Each is a data class, an enum, a container or a
lookup by name: none runs anything when called with the file's arguments."""


def _admitted(module: str, name: str) -> bool:
    if name in _ADMITTED.get(module, ()):
        return True
    # torch.__dict__, not getattr: torch's module __getattr__ would import a submodule of that name
    return module == "torch" and isinstance(torch.__dict__.get(name), (torch.dtype, torch.layout, torch.memory_format))


class _Refused(pickle.UnpicklingError):
    """What the metadata names that DCP metadata is not made of."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if not _admitted(module, name):
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def read_metadata(snapshot: Path) -> Metadata:
    """``snapshot/.metadata``, unpickled admitting DCP's metadata classes only and checked for the
    shape DCP reads; a ``SnapshotError`` naming the file otherwise."""
    path = snapshot / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise SnapshotError(f"{snapshot}: {path} is missing; the snapshot is incomplete") from None
    except _Refused as e:
        raise SnapshotError(f"{snapshot}: {path} names {e}, which is not part of DCP metadata: refusing to unpickle it "
                            "(a crafted or foreign file)") from None
    except Exception as e:  # a torn or truncated pickle: EOFError, ValueError, struct errors, ...
        raise SnapshotError(f"{snapshot}: {path} is damaged ({type(e).__name__}: {e})") from None
    problem = _shape_problem(metadata)
    if problem:
        raise SnapshotError(f"{snapshot}: {path} is not DCP metadata ({problem})")
    return metadata


def _shape_problem(metadata: Any) -> str | None:
    """What makes ``metadata`` unlike the metadata DCP writes, or None."""
    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}"
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return "no entry or storage tables"
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        return "a foreign storage_meta"
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return f"a foreign storage entry {type(index).__name__}: {type(info).__name__}"
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            return f"{index.fqn} is stored outside the snapshot ({name!r})"
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0):
            return f"{index.fqn} has a bad offset or length"
    return None


def check_shards(snapshot: Path, metadata: Metadata) -> None:
    """Every shard file the metadata names exists and is as long as its entries need."""
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = snapshot / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotError(f"{snapshot}: {path} is missing (its {METADATA} lists it); the snapshot is incomplete") from None
        if actual < size:
            raise SnapshotError(f"{snapshot}: {path} is truncated ({actual:,} bytes; its {METADATA} needs {size:,})")


def _check(snapshot: Path, share: slice) -> tuple[Metadata, bool]:
    """This rank's part of the checks: the ``share`` of the manifest's files, then the metadata
    and the shards' lengths; -> the metadata and whether the snapshot has a manifest."""
    try:
        digests = read_manifest(snapshot, str(snapshot))
        if digests is not None:
            verify_manifest(snapshot, str(snapshot), names=sorted(digests)[share])
    except IntegrityError as e:
        raise SnapshotError(str(e)) from None
    metadata = read_metadata(snapshot)
    check_shards(snapshot, metadata)
    return metadata, digests is not None


def checked_metadata(snapshot: str | os.PathLike, collective: bool) -> Metadata:
    """The snapshot's DCP metadata once its files are proven (module docstring). ``collective``:
    every rank of the default group calls it, each checks every world-size-th file of the
    manifest, and all raise the same ``SnapshotError`` if any rank found a fault."""
    snapshot = Path(snapshot)
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    metadata, error, manifest = None, None, True
    try:
        metadata, manifest = _check(snapshot, slice(rank, None, world))
    except SnapshotError as e:
        error = str(e)
    if world > 1:
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)  # rank order: the same message on every rank
    if error:
        raise SnapshotError(error)
    if not manifest and rank == 0:
        log.warning("%s: no %s (saved before snapshots had one), so its bytes are not checked; it loads as it is",
                    snapshot, MANIFEST)
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader over metadata already read by :func:`checked_metadata` (its own
    ``read_metadata`` unpickles with plain ``pickle.load``)."""

    def __init__(self, snapshot: str | os.PathLike, metadata: Metadata) -> None:
        super().__init__(snapshot)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP asks for per-rank metadata only when the global one failed
            raise SnapshotError(f"{self.path}: per-rank DCP metadata is not read")
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a non-tensor entry (an optimizer's learning rate, ...) is
    unpickled with ``weights_only=True``: plain values and tensors only, or a ``SnapshotError``."""

    def __init__(self, snapshot: str | os.PathLike) -> None:
        super().__init__()
        self.snapshot = Path(snapshot)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)
        except Exception as e:  # UnpicklingError for a foreign global; anything else for torn bytes
            info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = f" in {self.snapshot / info.relative_path}" if info is not None else ""
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SnapshotError(f"{self.snapshot}: entry {read_item.dest_index.fqn}{where} is not a plain value "
                                f"(refusing to unpickle it: {reason})") from None
        # DCP's own placement of the value; what it unpickles now is our re-pickling of plain data.
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)
