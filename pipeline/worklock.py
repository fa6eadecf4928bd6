"""One pipeline driver per work folder, and what a dead one leaves behind.

``WORK/.pipeline.lock`` is held with ``flock`` while a driver runs, so a second driver on the same
folder is refused at once, with the holder's PID. The kernel drops the lock when the holder dies,
however it dies (``kill -9`` included), so a lock is never stale. The file also lists the jobs
the holder has in flight: a driver killed with ``kill -9`` cannot stop them, and on ``local_cwd``
they keep running in their own sessions (TorchX starts each replica with ``start_new_session``),
writing into the folder. The next driver to take the lock stops them first: it signals each
listed process group that still runs a command naming the work folder (a recycled PID is never
signalled), and cancels listed jobs of cluster schedulers through TorchX. Every step's output is
written atomically and checked before a step is skipped, so the steps those jobs were running are
simply run again, each to completion once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("derm.pipeline")
LOCK = ".pipeline.lock"


class WorkInUse(RuntimeError):
    """Another driver holds the work folder."""


class WorkLock:
    """The exclusive lock of a work folder and the record of its holder's jobs in flight."""

    def __init__(self, work: str | os.PathLike, scheduler: str) -> None:
        self.work, self.scheduler = Path(work), scheduler
        self.path = self.work / LOCK
        self.jobs: dict[str, list[int]] = {}
        """In-flight job handle -> its local process groups (empty off local_cwd)."""
        self._fh = None

    def acquire(self, runner: Any = None) -> list[str]:
        """Takes the lock (``WorkInUse`` naming the holder if another driver has it), stops the
        jobs a dead holder left running, and returns their handles."""
        self.work.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _parse(fh.read())
            fh.close()
            raise WorkInUse(f"{self.work} is in use by another pipeline driver (pid {holder.get('pid', '?')}, "
                            f"since {holder.get('since', '?')}); wait for it to finish or stop it") from None
        fh.seek(0)
        previous = _parse(fh.read())
        self._fh = fh
        stopped = self._stop_orphans(previous, runner)
        self.jobs = {}
        self._write()
        return stopped

    def release(self) -> None:
        if self._fh is not None:
            self.jobs = {}
            self._write()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def submitted(self, handle: str, runner: Any) -> None:
        """Records a job in flight (with its process groups, on local_cwd)."""
        self.jobs[handle] = _local_process_groups(runner, self.scheduler, handle)
        self._write()

    def finished(self, handle: str) -> None:
        self.jobs.pop(handle, None)
        self._write()

    def __enter__(self) -> "WorkLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- internals --------------------------------------------------------------------------
    def _write(self) -> None:
        """Rewrites the record in place (the lock belongs to the open file, not to its name)."""
        fh = self._fh
        record = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "scheduler": self.scheduler,
                  "jobs": self.jobs}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(record))
        fh.flush()

    def _stop_orphans(self, previous: dict, runner: Any) -> list[str]:
        jobs = previous.get("jobs") or {}
        if not jobs:
            return []
        log.warning("%s: a pipeline driver (pid %s) died with %d job(s) in flight; stopping them before going on",
                    self.work, previous.get("pid", "?"), len(jobs))
        for handle, groups in jobs.items():
            if groups:
                for pgid in groups:
                    _stop_group(pgid, str(self.work))
            elif runner is not None and previous.get("scheduler", self.scheduler) != "local_cwd":
                try:
                    runner.cancel(handle)
                except Exception as e:  # the job may be long gone; the step's output decides
                    log.warning("could not cancel %s: %s", handle, e)
        return list(jobs)


def _parse(text: str) -> dict:
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}


def _local_process_groups(runner: Any, scheduler: str, handle: str) -> list[int]:
    """The process groups of a local_cwd job's replicas (TorchX 0.7's local scheduler keeps them
    in ``_apps``; another scheduler's jobs are cancelled through the runner instead)."""
    if scheduler != "local_cwd" or runner is None:
        return []
    try:
        from torchx.specs import parse_app_handle

        app = runner._scheduler(scheduler)._apps[parse_app_handle(handle).app_id]
        return [r.proc.pid for replicas in app.role_replicas.values() for r in replicas]
    except (AttributeError, KeyError) as e:
        log.warning("cannot read the processes of %s (%s); a kill -9 of this driver would orphan them", handle, e)
        return []


def _stop_group(pgid: int, work: str, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, to process group ``pgid`` if its leader still runs
    a command that names ``work`` (so a recycled PID is left alone)."""
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return  # gone
    if work not in cmdline:
        return
    log.warning("stopping orphaned job process group %d: %s", pgid, cmdline[:200])
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
