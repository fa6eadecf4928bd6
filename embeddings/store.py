"""Versioned key-value feature store for entity embeddings (paper Appendix C.2-C.3): the interface
every backend implements, and the checks they share. The backends: ``embeddings.embedded_store``
(the default: a local directory, no server) and ``embeddings.redis_store`` (serving).

Each daily pool is published as a new **immutable version**; serving reads the **active** one.
Publishing never changes what readers see until one atomic `activate`, and `rollback` undoes it:

    store = EmbeddedStore("runs/store")    # embeddings.embedded_store
    with store.begin_version("ctr-user-2026-01-03", dim=64) as writer:
        for ids, emb in chunks:            # ids [B] int64, emb [B, E] float32
            writer.put(ids, emb)
        writer.commit()                    # the version exists only from here on
    store.activate("ctr-user-2026-01-03")  # readers switch from the old version to the new one
    emb, found = store.get(query_ids)      # emb [N, E] float32 (zeros where missing), found [N] bool
    store.rollback()                       # back to the version active before

Glossary: N ids in a call, E embedding dim, V committed versions.

Rules shared by every backend (`tests/test_store.py` runs one suite over all of them):
- A version is visible (listed, readable, activatable) only once committed; a writer that raises,
  is aborted or is never committed leaves nothing visible.
- Every refused call raises `ValueError` naming the version and the problem, and changes nothing:
  unknown version, uncommitted version, duplicate version name, dimension mismatch, duplicate ids,
  deleting the active version, rollback with no previous version.
- `rolled_back()` names the versions a rollback moved away from until they are activated again.
- `get` resolves the active version once per call and reads only that immutable version, so a
  batch never mixes two versions, whatever `activate` runs concurrently.

"""

from __future__ import annotations

import abc
import dataclasses
import re

import numpy as np

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,199}")
HISTORY_LIMIT = 100  # previous active versions remembered for rollback


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """What the store knows of one committed version."""

    name: str
    dim: int
    """E, the embedding dim of every row."""
    count: int
    """Number of entities."""
    created: float
    """Commit time (Unix seconds); `versions()` lists oldest first."""


def check_version_name(version: str) -> str:
    """A version name is a file name and a Redis key part: letters, digits, ``. _ = -``."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"bad version name {version!r}: use 1-200 letters, digits, '.', '_', '=' or '-', "
            "starting with a letter or digit (e.g. 'ctr-user-2026-01-03')"
        )
    return version


def as_ids(ids: np.ndarray) -> np.ndarray:
    """ids as a 1-D int64 array; refuses non-integer dtypes instead of truncating floats."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_embeddings(embeddings: np.ndarray, n: int, dim: int, version: str) -> np.ndarray:
    """embeddings as a C-contiguous [n, dim] float32 array, or a `ValueError` naming the mismatch."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"embeddings must have shape [{n}, {dim}] (one row per id), got {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"dimension mismatch: version {version!r} has dim {dim}, embeddings have dim {arr.shape[1]}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


class VersionWriter(abc.ABC):
    """Writes one new version in chunks. Nothing is visible before `commit`; use it as a context
    manager so that an exception (or leaving the block without committing) aborts the version."""

    version: str
    dim: int
    _done: bool
    """Committed or aborted: no more rows."""

    def _rows_of(self, ids: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``put``'s arguments checked and converted (every backend's first step)."""
        if self._done:
            raise ValueError(f"version {self.version!r} writer is closed (committed or aborted)")
        ids = as_ids(ids)
        return ids, as_embeddings(embeddings, len(ids), self.dim, self.version)

    @abc.abstractmethod
    def put(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Adds rows: ids [B] int64 (unique across the whole version), embeddings [B, E] float32."""

    @abc.abstractmethod
    def commit(self) -> VersionInfo:
        """Makes the version visible (not active) in one atomic step; refuses duplicate ids and a
        version name committed meanwhile."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discards what was written; a no-op after `commit` or a previous `abort`."""

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()  # after commit() this does nothing; otherwise nothing half-written remains


class FeatureStore(abc.ABC):
    """A store of immutable embedding versions with one atomically switched active version."""

    @abc.abstractmethod
    def begin_version(self, version: str, dim: int) -> VersionWriter:
        """Starts writing a new version; refuses a name that is already committed."""

    @abc.abstractmethod
    def versions(self) -> list[str]:
        """Committed versions, oldest commit first."""

    @abc.abstractmethod
    def version_info(self, version: str) -> VersionInfo:
        """Dim, count and commit time of a committed version."""

    @abc.abstractmethod
    def active_version(self) -> str | None:
        """The version `get` reads by default; None before the first `activate`."""

    @abc.abstractmethod
    def activate(self, version: str) -> None:
        """Atomically makes a committed version the active one (remembering the old one for
        `rollback`); activating the already active version changes nothing."""

    @abc.abstractmethod
    def rollback(self) -> str:
        """Re-activates the version that was active before the current one; returns its name."""

    @abc.abstractmethod
    def get(self, ids: np.ndarray, version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch lookup in one version (the active one unless given).

        Args:
            ids: [N] integer entity ids (repeats allowed).
            version: a committed version; None reads the active one.

        Returns:
            embeddings [N, E] float32 (zeros for missing ids), found [N] bool.
        """

    @abc.abstractmethod
    def delete_version(self, version: str) -> None:
        """Removes a committed, non-active version (and forgets it in the rollback history)."""

    @abc.abstractmethod
    def rollback_target(self) -> str | None:
        """The version `rollback` would re-activate (None when there is none)."""

    @abc.abstractmethod
    def rolled_back(self) -> set[str]:
        """The versions a `rollback` moved serving away from and that were not activated again
        since: what readers that pick a version by name (the downstream join) must not read.
        Recorded in the same atomic write as the rollback; `activate` and `delete_version` clear
        a version from it."""

    def prune(self, keep: int) -> list[str]:
        """The retention policy: deletes all but the ``keep`` newest committed versions, never the
        active one nor the rollback target (which are kept on top of ``keep`` when older). Returns
        the deleted names, oldest first. Safe beside readers: a reader resolves its version once
        per ``get``, and only versions no default read can reach are deleted."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest version is never pruned), got {keep}")
        versions = self.versions()
        protected = {self.active_version(), self.rollback_target()} - {None}
        doomed = [v for v in versions[:-keep] if v not in protected]
        for version in doomed:
            self.delete_version(version)
        return doomed

    def write_version(self, version: str, ids: np.ndarray, embeddings: np.ndarray) -> VersionInfo:
        """Writes and commits a whole version in one call (not activated)."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D [N, E] array, got shape {emb.shape}")
        with self.begin_version(version, dim=emb.shape[1]) as writer:
            writer.put(ids, emb)
            return writer.commit()
