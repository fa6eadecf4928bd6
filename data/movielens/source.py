"""Where the atomic files come from: a folder of ``*.inter``, ``*.user`` and ``*.item`` files, or
the RecBole 1.2.1 wheel on PyPI (MovieLens-100K), downloaded once with pip into ``.cache/recbole``
and checked against its pinned sha256."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from data.movielens.atomic import MovieLens, MovieLensError, parse_movielens

log = logging.getLogger("derm.data.movielens")

RECBOLE = "recbole==1.2.1"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
"""sha256 of recbole-1.2.1-py3-none-any.whl on PyPI: the converted data is pinned, not just the name."""
WHEEL_DIR = "recbole/dataset_example/ml-100k"
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "recbole"  # git-ignored


def fetch_recbole_wheel(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Returns the RecBole 1.2.1 wheel in ``cache_dir``, downloading it with pip if it is not there."""
    cache_dir = Path(cache_dir)
    found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if not found:
        log.info("downloading %s into %s", RECBOLE, cache_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", RECBOLE, "-d", str(cache_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MovieLensError(f"could not download {RECBOLE} with pip ({last[0]}); "
                                 "download the wheel by hand and pass --wheel, or pass --source-dir")
    wheel = found[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise MovieLensError(f"{wheel}: sha256 {digest} is not that of {RECBOLE} on PyPI; delete it and rerun")
    return wheel


def read_movielens(source_dir: str | Path | None = None, wheel: str | Path | None = None) -> MovieLens:
    """Reads ``*.inter``, ``*.user`` and ``*.item`` from a folder, or ML-100K from the RecBole wheel."""
    if source_dir is not None and wheel is not None:
        raise MovieLensError("give a source folder or a wheel, not both")
    if source_dir is not None:
        files = {kind: _find_atomic(Path(source_dir), kind) for kind in ("inter", "user", "item")}
        raw = {kind: (str(p), p.read_bytes()) for kind, p in files.items()}
        log.info("reading %s", ", ".join(str(p) for p in files.values()))
    else:
        wheel = Path(wheel) if wheel is not None else fetch_recbole_wheel()
        try:
            with zipfile.ZipFile(wheel) as z:
                raw = {k: (f"{wheel}!{WHEEL_DIR}/ml-100k.{k}", z.read(f"{WHEEL_DIR}/ml-100k.{k}"))
                       for k in ("inter", "user", "item")}
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise MovieLensError(f"{wheel}: not a RecBole wheel holding {WHEEL_DIR}: {e}") from None
        log.info("reading %s from %s", WHEEL_DIR, wheel)

    return parse_movielens(raw)


def _find_atomic(folder: Path, kind: str) -> Path:
    if not folder.is_dir():
        raise MovieLensError(f"{folder}: not a folder (--source-dir wants the folder of the atomic files)")
    hits = sorted(folder.glob(f"*.{kind}"))
    if len(hits) != 1:
        what = "none" if not hits else f"{len(hits)} ({', '.join(p.name for p in hits)})"
        raise MovieLensError(f"{folder}: expected one *.{kind} atomic file, found {what}")
    return hits[0]
