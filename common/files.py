"""Writes that a reader never sees half of: a file written beside its target and renamed over it,
a folder staged beside its target and swapped into place; and scratch folders claimed by a live
process (``claim``), so that the next run removes those of a killed one (``remove_dead_folders``). Every output of the project that another
process may read while it is written goes through here (configs, specs, summaries, pools, snapshots,
datasets, ANN indexes, the feature store's pointer)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; when the block ends without an error it
    is renamed onto ``path`` (one ``os.replace``: readers open the old file or the new one),
    otherwise removed. ``fsync`` flushes it to disk before the rename (pointers that must survive
    a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Writes ``text`` to ``path`` whole or not at all."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` as indented JSON to ``path`` whole or not at all."""
    write_text_atomic(path, json.dumps(value, indent=1))


def swap_dir(stage: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves the finished folder ``stage`` onto ``target``: an existing ``target`` is renamed
    aside first and removed after, so ``target`` is at every moment either the old folder or the
    new one (two renames; never a mix of both)."""
    stage, target = Path(stage), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty folder beside ``out`` to fill; when the block ends without an error it
    becomes ``out`` (:func:`swap_dir`), otherwise it is removed and ``out`` is as it was. The
    staging folder is claimed (:func:`claim`) while it is filled, so the next ``staged_dir`` of
    ``out`` removes the staging of a killed writer; its ``.owner`` is gone before the swap."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_folders(out.parent, f".{out.name}.staging-*")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    owner = claim(stage)
    try:
        yield stage
        (stage / OWNER).unlink()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        owner.close()
    swap_dir(stage, out)


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Names ``path`` in an ``OSError`` raised inside the block that names no file: pyarrow's
    writers and Python's buffered writes raise a full disk's ENOSPC without one, and the one line a
    command prints (:func:`os_error_line`) must say where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation, naming the path: what the command-line tools print
    instead of a traceback (disk full above all, where the write that failed is the whole story)."""
    import errno

    path = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full: no space left on the device{path}; free space or write elsewhere, then run the same command again"
    return f"{e.strerror or e}{path}"


OWNER = ".owner"
"""The lock file a live process holds (``flock``) in a scratch folder it owns."""


def claim(folder: str | os.PathLike) -> IO:
    """Marks ``folder`` as owned by this process while the returned file stays open: an exclusive
    ``flock`` on ``folder/.owner``, which the kernel drops when the process dies, however it dies.
    Close the file once the folder is gone or handed on."""
    fh = open(Path(folder) / OWNER, "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def owner_alive(folder: str | os.PathLike) -> bool:
    """Whether the process that claimed ``folder`` still runs. A folder never claimed (its owner
    between ``mkdir`` and ``claim``) counts as alive."""
    try:
        fh = open(Path(folder) / OWNER, "r")
    except FileNotFoundError:
        return True
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def remove_dead_folders(parent: str | os.PathLike, pattern: str) -> list[Path]:
    """Removes the folders of ``parent`` matching ``pattern`` whose owner died (killed scratch and
    staging areas); returns them."""
    parent = Path(parent)
    dead = [d for d in sorted(parent.glob(pattern)) if d.is_dir() and not owner_alive(d)] if parent.is_dir() else []
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)
    return dead
