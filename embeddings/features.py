"""DERM embeddings as downstream features: the join of published versions into batches (paper
§3.2: "DERM embeddings are combined with existing embeddings"; Appendix C.3).

A row of day d gets each configured embedding from the version published for day d − ``lag_days``
(default 1: yesterday's pool, the freshest a production model could have served at the time of the
impression, so a row never sees an embedding computed from its own day). Entities absent from that
version, or days whose version does not exist, get zeros and a missing indicator of 1, as the
downstream models expect (``modules.downstream_config.missing_key``)::

    join = DERMFeatureJoin([DERMSource("ctr_user", user_store, "user", "ctr-user-{day}"),
                            DERMSource("ctr_pin", pin_store, "pin", "ctr-pin-{day}")])
    derm = join(batch)     # {"ctr_user": [B, E], "ctr_user_missing": [B, 1], "ctr_pin": ..., ...}
    loss, out = downstream_task(batch, derm)

Only what the store serves is joined, so a rollback reaches the downstream models. A store
serves its active version; a version of a *later day* than the active one is one that a rollback
moved serving away from, or one never activated (a publish killed before its activation, a
canary committed with ``--no-activate``). Rows that would read such a version read the active
version instead, as serving did while it was active (its day is earlier: no leakage), with one
warning naming both. Versions of the active one's day or earlier are read by name: those it
superseded. A store with no active version (versions written for an experiment) serves every
version. Days are compared by the names (``version_pattern``); an active version the pattern does
not name is refused, since it tells nothing of the others. Versions are resolved once per
training day or evaluation (:meth:`DERMFeatureJoin.reset_counts`), so a rollback reaches the next
one, and never in the middle of a day.

A version a rollback moved serving away from (``FeatureStore.rolled_back``, recorded with the
rollback) is never joined either, even once a later day's version is active: its rows read the
active version if that is of an earlier day, else they get the embedding as missing.

Back-inferred versions (Appendix B.3) are a configuration of the same join: their own naming
pattern, and ``lag_days=0`` if that is what an experiment asks for.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import numpy as np
import torch

from data.batch import Batch
from embeddings.store import FeatureStore
from modules.downstream_config import missing_key

log = logging.getLogger("derm.embeddings.features")
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class DERMSource:
    """One DERM embedding feature and where it is served from."""

    name: str
    """Feature name the downstream model reads, e.g. ``ctr_user``."""
    store: FeatureStore
    entity: str
    """``user`` or ``pin``: which key of the row looks it up."""
    version_pattern: str
    """Version name for a day, ``{day}`` replaced by YYYY-MM-DD, e.g. ``ctr-user-{day}``."""

    def __post_init__(self) -> None:
        if self.entity not in ("user", "pin"):
            raise ValueError(f"DERM source {self.name!r}: entity must be user or pin, got {self.entity!r}")
        if "{day}" not in self.version_pattern:
            raise ValueError(f"DERM source {self.name!r}: version_pattern needs a {{day}} placeholder, got {self.version_pattern!r}")


class DERMFeatureJoin:
    """Looks up every configured DERM embedding for the rows of a batch (see module docstring).

    Args:
        sources: the embeddings to join, one per downstream feature.
        lag_days: a row of day d reads the version of day d − lag_days (1: no leakage).
    """

    def __init__(self, sources: list[DERMSource], lag_days: int = 1) -> None:
        if lag_days < 0:
            raise ValueError(f"lag_days must be >= 0, got {lag_days}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"DERM source names must be unique, got {names}")
        self.sources, self.lag_days = sources, lag_days
        self._warned: set[str] = set()
        self._read: dict[tuple[str, str], str] = {}  # (source, wanted version) -> the version read, until reset_counts
        self.rows = 0
        """Rows joined since the last :meth:`reset_counts`."""
        self.found = {s.name: 0 for s in sources}
        """Of those, per embedding, the rows whose entity had a version to read."""

    def reset_counts(self) -> None:
        """Starts counting coverage afresh, and resolves the versions to read afresh (e.g. at the
        start of a training day or an evaluation: a rollback since then reaches the rows from here)."""
        self._read.clear()
        self.rows = 0
        self.found = dict.fromkeys(self.found, 0)

    def coverage(self) -> dict[str, float]:
        """Per embedding, the share of the rows joined since :meth:`reset_counts` that found one
        (NaN before any row)."""
        return {name: n / self.rows if self.rows else float("nan") for name, n in self.found.items()}

    def version(self, source: DERMSource, day: dt.date) -> str | None:
        """The version a row of ``day`` reads: the one published for day − ``lag_days`` if the store
        serves it, else the active one (module docstring); None if none was published for that day."""
        wanted_day = day - dt.timedelta(days=self.lag_days)
        name = source.version_pattern.format(day=wanted_day.isoformat())
        if (source.name, name) in self._read:
            return self._read[(source.name, name)]
        if name not in source.store.versions():
            if name not in self._warned:  # e.g. the first day of a window: nothing published before it
                log.warning("DERM feature %s: no version %s; rows of %s get it as missing", source.name, name, day)
                self._warned.add(name)
            return None
        read = self._served(source, name, wanted_day, day)
        self._read[(source.name, name)] = read
        return read

    def _served(self, source: DERMSource, name: str, wanted_day: dt.date, day: dt.date) -> str | None:
        """``name`` if the store serves it (not rolled back from, and active, of the active version's
        day or earlier, or nothing is active), else what :meth:`_instead` reads."""
        active = source.store.active_version()
        if name in source.store.rolled_back():
            return self._instead(source, name, active, wanted_day, day, "rolled back from it")
        if active is None or active == name:
            return name
        active_day = _day_in(source.version_pattern, active)
        if active_day is None:
            raise ValueError(f"DERM feature {source.name}: the active version {active!r} of {source.store!r} is not "
                             f"named by derm.version_pattern {source.version_pattern!r}, so which of its versions "
                             "serving read cannot be told; activate one the pattern names")
        if wanted_day <= active_day:
            return name
        return self._instead(source, name, active, wanted_day, day, "rolled back from it, or it was never activated")

    def _instead(self, source: DERMSource, name: str, active: str | None, wanted_day: dt.date, day: dt.date,
                 why: str) -> str | None:
        """What rows that want ``name``, which the store does not serve, read: the active version
        if it is of ``wanted_day`` or earlier (no leakage), else nothing (missing)."""
        active_day = None if active is None else _day_in(source.version_pattern, active)
        read = active if active_day is not None and active_day <= wanted_day else None
        if f"{name}>{read}" not in self._warned:
            log.warning("DERM feature %s: %r does not serve %s (%s): rows of %s read %s", source.name, source.store, name,
                        why, day, read or "nothing (missing)")
            self._warned.add(f"{name}>{read}")
        return read

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        days = (batch.event_time // SECONDS_PER_DAY).numpy()  # epoch days, per row
        out: dict[str, torch.Tensor] = {}
        for source in self.sources:
            ids = (batch.user_id if source.entity == "user" else batch.pin_id).numpy()
            emb, found = None, np.zeros(ids.size, bool)
            for epoch_day in np.unique(days):  # a batch spans one day, or a few at day boundaries
                rows = np.flatnonzero(days == epoch_day)
                version = self.version(source, dt.date(1970, 1, 1) + dt.timedelta(days=int(epoch_day)))
                if version is None:
                    continue
                values, hit = source.store.get(ids[rows], version=version)
                if emb is None:
                    emb = np.zeros((ids.size, values.shape[1]), np.float32)
                emb[rows], found[rows] = values * hit[:, None], hit
            if emb is None:  # nothing published for any row: width from the newest version
                emb = np.zeros((ids.size, self.width(source)), np.float32)
            out[source.name] = torch.from_numpy(emb)
            out[missing_key(source.name)] = torch.from_numpy((~found).astype(np.float32)[:, None])
            self.found[source.name] += int(found.sum())
        self.rows += int(days.size)
        return out

    @staticmethod
    def width(source: DERMSource) -> int:
        """The embedding width of ``source``: its newest version's."""
        versions = source.store.versions()
        if not versions:
            raise ValueError(f"DERM feature {source.name}: its store {source.store!r} has no versions at all; publish one first")
        return int(source.store.version_info(versions[-1]).dim)


def _day_in(pattern: str, version: str) -> dt.date | None:
    """The day that ``pattern`` (``...{day}...``) puts into ``version``, or None if it names no day."""
    prefix, _, suffix = pattern.partition("{day}")
    if not (version.startswith(prefix) and version.endswith(suffix) and len(version) > len(prefix) + len(suffix)):
        return None
    try:
        return dt.date.fromisoformat(version[len(prefix):len(version) - len(suffix)])
    except ValueError:
        return None
