"""Writes event logs in the layout every reader of the project expects::

    ROOT/spec.toml                                   the feature spec (data.spec)
    ROOT/<source>/day=YYYY-MM-DD/part-00000.parquet  one or more parts per day, rows in time order
    ROOT/<extra>/...                                 anything else a producer adds (e.g. truth/)

The day is a hive partition key only; it is not repeated inside the files. A dataset is built in
a hidden staging directory beside ROOT and moved into place when complete, so a failed or
interrupted run never leaves a half-written dataset where a trainer would read it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common.files import staged_dir

ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group: the loader's unit of reading, so it bounds its memory."""


def day_dir(root: str | os.PathLike, source: str, day: dt.date | str) -> Path:
    return Path(root) / source / f"day={day if isinstance(day, str) else day.isoformat()}"


def write_part(table: pa.Table, root: str | os.PathLike, source: str, day: dt.date | str, part: int) -> Path:
    """Writes one part file of a day (zstd, row groups of ``ROW_GROUP_ROWS``)."""
    d = day_dir(root, source, day)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"part-{part:05d}.parquet"
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return path


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a staging directory that replaces ``out`` only if the block finishes.

    Refuses an existing, non-empty ``out`` unless ``overwrite``; on any error the staging
    directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with staged_dir(out) as stage:
        yield stage
