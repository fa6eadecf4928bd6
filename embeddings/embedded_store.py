"""The embedded feature-store backend: one local directory of immutable, memory-mapped numpy
files per version, no server (paper Appendix C.2-C.3). Implements ``embeddings.store.FeatureStore``
with the rules listed there; lookups go through ``embeddings.hash_index``; each version's files are
proved by a manifest (``common.digest``) when a process first opens the version."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from common.digest import MANIFEST, IntegrityError, digest_bytes, hashing_writer, verify_manifest, write_manifest
from common.files import OWNER, claim, remove_dead_folders, write_text_atomic
from embeddings.hash_index import build_slots, lookup_rows
from embeddings.store import HISTORY_LIMIT, FeatureStore, VersionInfo, VersionWriter, as_ids, check_version_name

log = logging.getLogger("derm.embeddings.store")
OPEN_VERSIONS = 4  # memory-mapped versions an EmbeddedStore keeps open (the active one, rollbacks)

# ---------------------------------------------------------------------------------------------
# Embedded backend: a directory of immutable numpy files, no server.
#
#   ROOT/ACTIVE                       {"active": name, "history": [older, ..., previous],
#                                      "rolled_back": [names a rollback left]} (os.replace)
#   ROOT/versions/NAME/ids.npy        [V_n] int64, sorted ascending
#   ROOT/versions/NAME/slots.npy      [2^b] int64, hash table: id -> row (b: 2 * V_n <= 2^b)
#   ROOT/versions/NAME/emb.npy        [V_n, E] float32, rows in the order of ids.npy
#   ROOT/versions/NAME/meta.json      {"dim", "count", "created"}
#   ROOT/versions/NAME/MANIFEST.json  xxh3-128 digests of the four files above (common.digest);
#                                     versions committed before 2026-12-08 have none
#   ROOT/staging/NAME@TOKEN/          a version being written; renamed into versions/ on commit
#                                     (a killed writer leaves it behind: the next begin_version removes it)
#   ROOT/.lock                        flock held by writers of ACTIVE and versions/ (never by get)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _OpenVersion:
    ids: np.ndarray  # [V_n] int64, sorted, memory-mapped
    slots: np.ndarray  # [2^b] int64, hash table of row numbers (see lookup_rows)
    emb: np.ndarray  # [V_n, E] float32, memory-mapped
    stamp: tuple[int, int]  # meta.json's (inode, mtime): a version deleted and written again differs


# Versions whose files this process has proved against their manifest (or warned about, when they
# have none), by (version folder, meta.json stamp): each is hashed once per process, however many
# EmbeddedStore handles open it and however often the LRU below drops and reopens it.
_CHECKED: set[tuple[str, tuple[int, int]]] = set()
_CHECKED_LOCK = threading.Lock()


class EmbeddedStore(FeatureStore):
    """The default backend: one local directory, no server (see the layout above).

    Atomicity: a version is built in ``staging/`` and appears in ``versions/`` by one directory
    rename; the active pointer is one small file swapped by ``os.replace``. A reader opens the
    pointer file once per `get`, sees either the old or the new one, and reads only that version,
    whose files never change: no mix is possible. Mutations of the pointer take an ``flock`` so
    that two concurrent `activate`/`rollback` calls cannot lose each other's history.

    Versions are memory-mapped (``np.load(mmap_mode="r")``) and cached per process; a lookup of N
    ids is a few vectorised hash-probe rounds plus one gather (~0.1 ms for 1,000 ids at 1M
    entities once the pages are cached).

    Integrity: a commit hashes each file while writing it and lists the digests in the version's
    ``MANIFEST.json``; the first read of a version in a process hashes its files again (reading
    all of ``emb.npy`` once: docs/lifecycle.md, "Integrity", has the cost) and refuses a damaged
    one with an :class:`~common.digest.IntegrityError` naming the file. A version without a
    manifest (committed before manifests existed) is read after one warning.

    Args:
        root: the store directory (created if missing).
        sort_block_rows: rows per block when a commit sorts the version into place (bounds memory).
        verify: check a version's files against its manifest when this process first reads it.
    """

    def __init__(self, root: str | os.PathLike, sort_block_rows: int = 262_144, verify: bool = True) -> None:
        self.root = Path(root)
        self.sort_block_rows = sort_block_rows
        self.verify = verify
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        (self.root / "staging").mkdir(exist_ok=True)
        # Open versions, most recently used last. Bounded: a serving process that lives for months
        # must let go of the mappings of versions deleted by the publisher, or their disk space
        # stays in use.
        self._open: collections.OrderedDict[str, _OpenVersion] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.root)!r})"

    # -- pointer file ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_pointer(self) -> dict:
        try:
            with open(self.root / "ACTIVE", "rb") as fh:
                return {"rolled_back": [], **json.loads(fh.read())}  # a pointer from before rolled_back
        except FileNotFoundError:
            return {"active": None, "history": [], "rolled_back": []}

    def _write_pointer(self, state: dict) -> None:
        # atomic: readers open the old pointer or the new one; on disk before the rename
        write_text_atomic(self.root / "ACTIVE", json.dumps(state), fsync=True)

    # -- versions ----------------------------------------------------------------------------

    def _version_dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def _is_pending(self, version: str) -> bool:
        return any((self.root / "staging").glob(f"{version}@*"))

    def _require_committed(self, version: str) -> Path:
        check_version_name(version)
        path = self._version_dir(version)
        if (path / "meta.json").exists():
            return path
        if self._is_pending(version):
            raise ValueError(f"version {version!r} is not committed (a write of it was started and never committed)")
        raise ValueError(f"unknown version {version!r} (committed versions: {self.versions()})")

    def begin_version(self, version: str, dim: int) -> VersionWriter:
        check_version_name(version)
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if self._version_dir(version).exists():
            raise ValueError(f"duplicate version {version!r}: versions are immutable; publish under a new name")
        self.remove_dead_staging()
        return _EmbeddedWriter(self, version, int(dim))

    def remove_dead_staging(self) -> list[str]:
        """Removes what dead writers left in ``staging/``: versions whose writer died before
        committing (a killed publish: its claim, ``common.files.claim``, is no longer held) and
        half-removed deleted versions. A live writer's staging, in this process or another, is
        left alone. Called by every ``begin_version``; returns the names removed."""
        staging = self.root / "staging"
        with self._locked():
            removed = remove_dead_folders(staging, "*@*") + sorted(staging.glob(".deleted-*"))
            for d in removed:
                shutil.rmtree(d, ignore_errors=True)
        if removed:
            log.warning("%s: removed the staging of dead writers: %s", self.root, ", ".join(d.name for d in removed))
        return [d.name for d in removed]

    def versions(self) -> list[str]:
        infos = []
        for path in (self.root / "versions").iterdir():
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                infos.append(self._info(path.name))
        return [i.name for i in sorted(infos, key=lambda i: (i.created, i.name))]

    def _info(self, version: str) -> VersionInfo:
        meta = json.loads((self._version_dir(version) / "meta.json").read_text())
        return VersionInfo(version, meta["dim"], meta["count"], meta["created"])

    def version_info(self, version: str) -> VersionInfo:
        self._require_committed(version)
        return self._info(version)

    def active_version(self) -> str | None:
        return self._read_pointer()["active"]

    def activate(self, version: str) -> None:
        with self._locked():
            self._require_committed(version)
            state = self._read_pointer()
            if state["active"] == version:
                return
            history = state["history"] + ([state["active"]] if state["active"] else [])
            self._write_pointer({"active": version, "history": history[-HISTORY_LIMIT:],
                                 "rolled_back": [v for v in state["rolled_back"] if v != version]})

    def rollback(self) -> str:
        with self._locked():
            state = self._read_pointer()
            if not state["history"]:
                raise ValueError(f"nothing to roll back to: no version was active before {state['active']!r}")
            previous = state["history"][-1]
            left = [v for v in state["rolled_back"] if v not in (previous, state["active"])] + [state["active"]]
            self._write_pointer({"active": previous, "history": state["history"][:-1], "rolled_back": left})
            return previous

    def rollback_target(self) -> str | None:
        history = self._read_pointer()["history"]
        return history[-1] if history else None

    def rolled_back(self) -> set[str]:
        return set(self._read_pointer()["rolled_back"])

    def delete_version(self, version: str) -> None:
        with self._locked():
            path = self._require_committed(version)
            state = self._read_pointer()
            if state["active"] == version:
                raise ValueError(f"refusing to delete the active version {version!r}: activate another one first")
            if version in state["history"] or version in state["rolled_back"]:
                self._write_pointer({"active": state["active"], "history": [v for v in state["history"] if v != version],
                                     "rolled_back": [v for v in state["rolled_back"] if v != version]})
            # Rename first, so the name disappears atomically; then remove the files.
            trash = self.root / "staging" / f".deleted-{version}.{uuid.uuid4().hex}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(KeyError):
            del self._open[version]

    # -- reads -------------------------------------------------------------------------------

    def _open_version(self, version: str) -> _OpenVersion:
        path = self._version_dir(version)
        st = os.stat(path / "meta.json")  # FileNotFoundError if deleted
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._open.get(version)
        if cached is not None and cached.stamp == stamp:
            with contextlib.suppress(KeyError):  # evicted meanwhile by another thread: still valid
                self._open.move_to_end(version)
            return cached
        what = f"feature-store version {version!r} of {self.root}"
        try:
            if self.verify:
                _check_once(path, stamp, what)
            opened = _load_version(path, stamp, what)
        except (IntegrityError, FileNotFoundError):
            if not (path / "meta.json").exists():  # deleted while we opened it: get resolves again
                raise FileNotFoundError(path / "meta.json") from None
            raise
        self._open[version] = opened
        while len(self._open) > OPEN_VERSIONS:
            self._open.popitem(last=False)
        return opened

    def get(self, ids: np.ndarray, version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = as_ids(ids)
        for attempt in range(3):
            name = version if version is not None else self.active_version()
            if name is None:
                raise ValueError("no active version: publish and activate one first (or pass version=)")
            try:
                opened = self._open_version(check_version_name(name))
                break
            except FileNotFoundError:
                # Only possible when the version we resolved was deactivated and deleted in between;
                # resolve the pointer again. An explicit version gets the usual error.
                if version is not None or attempt == 2:
                    self._require_committed(name)
                    raise
        return lookup_rows(opened.ids, opened.slots, opened.emb, query)


class _EmbeddedWriter(VersionWriter):
    """Appends chunks to staging files; `commit` sorts them by id into the final, memory-mapped
    layout block by block (memory: 8 bytes per id plus one block of rows) and renames the staging
    directory into ``versions/``."""

    def __init__(self, store: EmbeddedStore, version: str, dim: int) -> None:
        self.store, self.version, self.dim = store, version, dim
        self.staging = store.root / "staging" / f"{version}@{uuid.uuid4().hex}"  # '@': never in a name
        self.staging.mkdir()
        self._alive = claim(self.staging)  # the next begin_version removes it if this process dies
        self._ids: list[np.ndarray] = []
        self._rows = 0
        self._raw = open(self.staging / "emb.unsorted.f32", "wb")
        self._done = False

    def put(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        ids, emb = self._rows_of(ids, embeddings)
        self._raw.write(emb.tobytes())
        self._ids.append(ids.copy())
        self._rows += len(ids)

    def commit(self) -> VersionInfo:
        if self._done:
            raise ValueError(f"version {self.version!r} writer is closed (committed or aborted)")
        self._raw.close()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            self.abort()
            example = int(sorted_ids[dup[0]])
            raise ValueError(f"version {self.version!r} has duplicate ids (e.g. {example}); ids must be unique")
        digests = {}
        for name, array in (("ids.npy", sorted_ids), ("slots.npy", build_slots(sorted_ids))):
            with hashing_writer(self.staging / name) as f:  # hashed as written: nothing is read back
                np.save(f, array)
            digests[name] = f.digest
        digests["emb.npy"] = self._write_sorted_rows(order)
        created = time.time()
        meta = json.dumps({"dim": self.dim, "count": int(len(ids)), "created": created}).encode()
        (self.staging / "meta.json").write_bytes(meta)
        write_manifest(self.staging, {**digests, "meta.json": digest_bytes(meta)})
        _fsync_dir_files(self.staging)
        target = self.store._version_dir(self.version)
        with self.store._locked():
            if target.exists():
                self.abort()
                raise ValueError(f"duplicate version {self.version!r}: it was committed meanwhile by another writer")
            (self.staging / OWNER).unlink()
            os.rename(self.staging, target)  # atomic: the version appears whole or not at all
        self._alive.close()
        self._done = True
        return VersionInfo(self.version, self.dim, int(len(ids)), created)

    def _write_sorted_rows(self, order: np.ndarray) -> str:
        """Writes ``emb.npy`` [V_n, E] in id order, block by block and in sequence, so that it is
        hashed as it is written; returns its digest."""
        n = len(order)
        raw_path = self.staging / "emb.unsorted.f32"
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, self.dim)}
        with hashing_writer(self.staging / "emb.npy") as out:
            np.lib.format.write_array_header_1_0(out, header)  # the header np.save writes
            if n:
                src = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(n, self.dim))
                for start in range(0, n, self.store.sort_block_rows):
                    out.write(src[order[start : start + self.store.sort_block_rows]])  # a gathered copy, contiguous
                del src
        raw_path.unlink()
        return out.digest

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._raw.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._alive.close()


def _check_once(path: Path, stamp: tuple[int, int], what: str) -> None:
    """Proves the version folder ``path`` against its manifest, or warns that it has none, unless
    this process did so already for the same commit (``stamp``)."""
    key = (str(path.resolve()), stamp)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return
    if not verify_manifest(path, what):
        if not (path / "meta.json").exists():
            raise FileNotFoundError(path / "meta.json")  # deleted meanwhile, not written without a manifest
        log.warning("%s: no %s (committed before versions had one): its files are read unchecked", what, MANIFEST)
    with _CHECKED_LOCK:
        _CHECKED.add(key)


def _load_version(path: Path, stamp: tuple[int, int], what: str) -> _OpenVersion:
    """Memory-maps a version's arrays; a file numpy cannot map (truncated, not a numpy file) or of
    another shape than ``meta.json`` says is an :class:`IntegrityError` naming it, for versions
    with or without a manifest."""
    meta = json.loads((path / "meta.json").read_text())
    count, dim = meta["count"], meta["dim"]
    arrays = {}
    for name in ("ids.npy", "slots.npy", "emb.npy"):
        try:
            arrays[name] = np.load(path / name, mmap_mode="r")
        except FileNotFoundError:
            raise IntegrityError(f"{what}: {path / name} is missing") from None
        except (ValueError, OSError, EOFError) as e:  # numpy: "mmap length is greater than file size"
            raise IntegrityError(f"{what}: {path / name} is {_unreadable(path / name, e)}; "
                                 "restore it or publish the version again") from None
    expected = {"ids.npy": ((count,), np.int64), "emb.npy": ((count, dim), np.float32)}
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            raise IntegrityError(f"{what}: {path / name} holds {arrays[name].dtype} {arrays[name].shape}, not the "
                                 f"{np.dtype(dtype)} {shape} of its meta.json; restore it or publish the version again")
    if arrays["slots.npy"].ndim != 1 or arrays["slots.npy"].dtype != np.int64:
        raise IntegrityError(f"{what}: {path / 'slots.npy'} is not a 1-D int64 hash table")
    return _OpenVersion(ids=arrays["ids.npy"], slots=arrays["slots.npy"], emb=arrays["emb.npy"], stamp=stamp)


def _unreadable(path: Path, error: Exception) -> str:
    """Why numpy could not map ``path``: "truncated (N bytes, its header needs M)" when the header
    is readable and promises more bytes than the file has, else numpy's own reason."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            need = f.tell() + int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
    except (ValueError, OSError, EOFError):
        return f"not a numpy array ({error})"
    return f"truncated ({size:,} bytes, its header needs {need:,})" if size < need else f"not a numpy array ({error})"


def _fsync_dir_files(path: Path) -> None:
    """Flushes a version's files to disk before it is renamed into place (a crash right after
    the rename must not leave a visible version with missing data)."""
    for child in path.iterdir():
        fd = os.open(child, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
