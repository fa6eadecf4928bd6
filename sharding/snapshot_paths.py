"""Where a run's snapshots live, torch-free (the pipeline driver asks without loading TorchRec):
``RUN_DIR/snapshots/day=YYYY-MM-DD/`` per trained day, complete once its ``meta.json`` is there
(``sharding.checkpoint`` writes it into the staging folder before the rename)."""

from __future__ import annotations

import os
from pathlib import Path

META = "meta.json"
PLAN = "plan.json"


def snapshot_path(snapshots: str | os.PathLike, day: str) -> Path:
    """The snapshot of a run after training ``day``: ``SNAPSHOTS/day=YYYY-MM-DD``."""
    return Path(snapshots) / f"day={day}"


def is_snapshot(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete snapshot (its meta is written last, by the rename)."""
    return (Path(path) / META).is_file()


def latest_snapshot_before(snapshots: str | os.PathLike, day: str) -> Path | None:
    """The complete snapshot of the latest day before ``day`` in ``snapshots``, or None."""
    done = sorted(p for p in Path(snapshots).glob("day=*") if p.name[4:] < day and is_snapshot(p))
    return done[-1] if done else None
