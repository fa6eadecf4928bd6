"""Redis backend of the feature store (paper Appendix C.3: user embeddings are served from an
online key-value store). Same API, errors and guarantees as `embeddings.store.FeatureStore`.

Keys, for a namespace NS (version names cannot contain ':', so no two kinds of key collide)::

    NS:active                   string   the active version
    NS:history                  list     previously active versions, oldest first (rollback pops)
    NS:rolled_back              set      versions a rollback moved serving away from (activate clears one)
    NS:versions                 hash     committed version -> {"dim", "count", "created"} (JSON)
    NS:data:VERSION             hash     8-byte little-endian id -> E little-endian float32
    NS:staging:VERSION:TOKEN    hash     a version being written (expires 24 h after its last put)
    NS:pending:VERSION          set      tokens of writers of VERSION (expires likewise)
    NS:owner:VERSION:TOKEN      string   a live writer's claim: refreshed while it writes, short TTL
    NS:writers                  set      VERSION:TOKEN of every writer started and not finished

One hash per version rather than one key per entity: less memory per entity, and deleting a
version is one UNLINK (freed in the background) instead of a scan over millions of keys. (On Redis
Cluster a version would be split over several hashes; this backend targets one standalone server,
or one primary with replicas.)

Atomicity. Every change of state is one Lua script, which Redis runs with nothing interleaved: a
commit RENAMEs the finished staging hash to ``NS:data:VERSION`` and registers the version in the
same script, so a version appears whole or not at all; `activate` swaps ``NS:active`` and pushes
the old value on ``NS:history`` in one script. A `get` is one MULTI/EXEC transaction of
``GET NS:active``, ``HGET NS:versions V`` and ``HMGET NS:data:V ids...`` for the version V that the
store last saw active; the three run at one instant, so if the reply says V is still active the
batch is exactly V's (committed hashes are never written again), and if not, the get is retried
once for the new V (then, should activations outpace round trips, a script reads pointer and rows
in one step). A batch can never mix versions. Readers thus pay one round trip.

Killed writers. A writer's thread refreshes its owner key every third of ``writer_ttl_s`` (60 s);
a killed writer's key expires, and the next `begin_version` removes its staging hash (a script
that deletes it only while the owner key is absent), as the embedded store removes dead writers'
staging folders. A claim that lapsed is never renewed (``SET ... XX``) and the commit script
refuses a writer without one, so a writer stopped for longer than the TTL, whose staging another
publisher may have removed, can never commit partial rows.

Integrity. The rows live in the server; Redis checksums its snapshots (RDB CRC64; a truncated
AOF is found at load) and TCP the transfer. What the client can check for free it does: a commit
needs exactly as many rows as were put, and a get refuses rows that are not 4E bytes each
(written by something else; their total length is checked). No digest of a version's rows is
kept: checking one would read the whole version back from the serving server (docs/lifecycle.md,
"Integrity").

Serving cost. The read path is plain HMGET, not a Lua script: a script that unpacks and repacks
1,000 values costs the single-threaded server ~10x the HMGET. Writes are pipelined HSETs of
``put_rows`` fields, so a publish running next to serving traffic stalls the server for well under
a millisecond at a time. On the client a get does no Python work per id: the MULTI/EXEC request is
packed by numpy (`_pack_get`) and sent on a connection of the client's pool, the reply is parsed in
C by ``hiredis`` (pinned; without it redis-py's pure-Python parser is the fallback) and decoded
from one joined buffer. On the 2-core VM, at 1M entities and under load, a 1,000-key get took ~2 ms
(p99 ~3.3 ms), about half of it the server's HMGET (``INFO commandstats``); docs/lifecycle.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import weakref

import numpy as np
import redis

from common.digest import IntegrityError
from embeddings.store import HISTORY_LIMIT, FeatureStore, VersionInfo, VersionWriter, as_ids, check_version_name

log = logging.getLogger("derm.embeddings.store")

# KEYS: staging, data, versions, pending, owner, writers. ARGV: version, meta JSON, expected count,
# token, VERSION:TOKEN.
_COMMIT = """
local function finish() redis.call('SREM', KEYS[4], ARGV[4]); redis.call('DEL', KEYS[5]); redis.call('SREM', KEYS[6], ARGV[5]) end
local function drop() redis.call('UNLINK', KEYS[1]); finish() end
if redis.call('EXISTS', KEYS[5]) == 0 then drop(); return {'lost', 0} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then drop(); return {'duplicate', 0} end
local n = tonumber(ARGV[3])
local have = redis.call('HLEN', KEYS[1])
if have ~= n then drop(); return {'count', have} end
redis.call('UNLINK', KEYS[2])
if n > 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
finish()
return {'ok', n}
"""

# KEYS: owner, staging, pending, writers. ARGV: token, VERSION:TOKEN. Removes a writer's staging
# only while its owner key is absent (expired: the writer died), in one step with the check.
_REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('UNLINK', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[2])
return 1
"""

# KEYS: active, history, versions, pending, rolled_back. ARGV: version, history limit.
_ACTIVATE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  if redis.call('EXISTS', KEYS[4]) == 1 then return 'pending' end
  return 'unknown'
end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return 'ok' end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
if cur then
  redis.call('RPUSH', KEYS[2], cur)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
end
return 'ok'
"""

# KEYS: active, versions. ARGV: data-key prefix, ids (8-byte strings). The fallback of get().
_GET_ACTIVE = """
local v = redis.call('GET', KEYS[1])
if not v then return {false, false, {}} end
local key, values = ARGV[1] .. v, {}
for s = 2, #ARGV, 4000 do
  local part = redis.call('HMGET', key, unpack(ARGV, s, math.min(s + 3999, #ARGV)))
  for i = 1, #part do values[#values + 1] = part[i] end
end
return {v, redis.call('HGET', KEYS[2], v), values}
"""

# KEYS: active, history, rolled_back.
_ROLLBACK = """
local prev = redis.call('RPOP', KEYS[2])
if not prev then return {'empty', redis.call('GET', KEYS[1]) or ''} end
local cur = redis.call('GET', KEYS[1])
if cur then redis.call('SADD', KEYS[3], cur) end
redis.call('SREM', KEYS[3], prev)
redis.call('SET', KEYS[1], prev)
return {'ok', prev}
"""

# KEYS: active, history, versions, data, pending, rolled_back. ARGV: version.
_DELETE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  if redis.call('EXISTS', KEYS[5]) == 1 then return 'pending' end
  return 'unknown'
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 'active' end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
redis.call('UNLINK', KEYS[4])
return 'ok'
"""

PASSWORD_ENV, PASSWORD_FILE_ENV = "DERM_REDIS_PASSWORD", "DERM_REDIS_PASSWORD_FILE"


def check_redis_url(url: str) -> None:
    """Refuses a Redis URL that carries a password: configs, logs and command lines would show it."""
    from urllib.parse import urlsplit

    if urlsplit(url).password:
        raise ValueError(f"the Redis URL carries a password ({redact(url)}): configs, logs and argv would show it; give "
                         f"the URL without it and the password in ${PASSWORD_ENV}, or a file named by ${PASSWORD_FILE_ENV}")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username or ''}:***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


def redis_client(url: str) -> redis.Redis:
    """A client for ``url`` (no password in it, :func:`check_redis_url`), authenticating with the
    password from ``$DERM_REDIS_PASSWORD`` or the file named by ``$DERM_REDIS_PASSWORD_FILE``."""
    check_redis_url(url)
    password = os.environ.get(PASSWORD_ENV) or None
    if password is None and os.environ.get(PASSWORD_FILE_ENV):
        path = os.environ[PASSWORD_FILE_ENV]
        try:
            password = open(path).read().strip() or None
        except OSError as e:
            raise ValueError(f"${PASSWORD_FILE_ENV}: cannot read {path} ({e.strerror})") from None
    return redis.Redis.from_url(url, password=password)


class RedisStore(FeatureStore):
    """Feature store in one Redis database (see the module docstring for keys and atomicity).

    Args:
        client: a ``redis.Redis`` (binary responses, i.e. ``decode_responses=False``) or a URL
            such as ``redis://127.0.0.1:6379/0``.
        namespace: prefix of every key, so several stores (ctr-user, cvr-pin, ...) share a server.
        put_rows: fields per HSET (~0.25 MB at E=64; the server is busy ~0.5 ms per HSET).
        pipeline_depth: HSETs sent per round trip.
        staging_ttl_s: a version being written expires this long after its last `put` (the
            backstop; a killed writer's staging normally goes at the next `begin_version`).
        writer_ttl_s: a writer refreshes its owner key every third of this; once it has not for
            this long, the next `begin_version` treats the writer as dead and removes its staging.
    """

    def __init__(
        self,
        client: redis.Redis | str,
        namespace: str = "derm",
        put_rows: int = 1000,
        pipeline_depth: int = 16,
        staging_ttl_s: int = 86_400,
        writer_ttl_s: float = 60.0,
    ) -> None:
        self.client = redis_client(client) if isinstance(client, str) else client
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False (embeddings are raw bytes)")
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"bad namespace {namespace!r}: use a non-empty string without spaces")
        self.namespace = namespace
        if writer_ttl_s <= 0:
            raise ValueError(f"writer_ttl_s must be positive, got {writer_ttl_s!r}")
        self.put_rows, self.pipeline_depth, self.staging_ttl_s = put_rows, pipeline_depth, staging_ttl_s
        self.writer_ttl_s = writer_ttl_s
        self._k_active, self._k_history, self._k_versions, self._k_writers, self._k_rolled_back = (
            f"{namespace}:{k}" for k in ("active", "history", "versions", "writers", "rolled_back"))
        self._k_data_prefix = f"{namespace}:data:".encode()
        self._commit = self.client.register_script(_COMMIT)
        self._activate = self.client.register_script(_ACTIVATE)
        self._rollback = self.client.register_script(_ROLLBACK)
        self._delete = self.client.register_script(_DELETE)
        self._get_active = self.client.register_script(_GET_ACTIVE)
        self._reap = self.client.register_script(_REAP)
        self._last_active: bytes | None = None  # a hint for get(); any value is safe

    def __repr__(self) -> str:
        return f"RedisStore({self.client!r}, namespace={self.namespace!r})"

    def _data_key(self, version: str) -> str:
        return f"{self.namespace}:data:{version}"

    def _pending_key(self, version: str) -> str:
        return f"{self.namespace}:pending:{version}"

    def _writer_keys(self, version: str, token: str) -> tuple[str, str]:
        """The staging hash and the owner key of one writer of ``version``."""
        return f"{self.namespace}:staging:{version}:{token}", f"{self.namespace}:owner:{version}:{token}"

    def _refuse(self, status: str, version: str) -> None:
        if status == "pending":
            raise ValueError(f"version {version!r} is not committed (a write of it was started and never committed)")
        if status == "unknown":
            raise ValueError(f"unknown version {version!r} (committed versions: {self.versions()})")
        if status == "active":
            raise ValueError(f"refusing to delete the active version {version!r}: activate another one first")
        if status != "ok":
            raise RuntimeError(f"unexpected reply {status!r} from the store script")

    def begin_version(self, version: str, dim: int) -> VersionWriter:
        check_version_name(version)
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if self.client.hexists(self._k_versions, version):
            raise ValueError(f"duplicate version {version!r}: versions are immutable; publish under a new name")
        self.remove_dead_staging()
        return _RedisWriter(self, version, int(dim))

    def remove_dead_staging(self) -> list[str]:
        """Removes the staging hashes of writers whose owner key expired (killed before they
        committed or aborted); a live writer's, in this process or another, is left alone. Called
        by every ``begin_version``; returns the staging keys removed. (Staging of writers from
        before owner keys existed still expires after ``staging_ttl_s``.)"""
        removed = []
        for member in sorted(m.decode() for m in self.client.smembers(self._k_writers)):
            version, _, token = member.partition(":")
            staging, owner = self._writer_keys(version, token)
            keys = [owner, staging, self._pending_key(version), self._k_writers]
            if self._reap(keys=keys, args=[token, member]):
                removed.append(staging)
        if removed:
            log.warning("%r: removed the staging of dead writers: %s", self, ", ".join(removed))
        return removed

    def _all_info(self) -> list[VersionInfo]:
        infos = []
        for name, meta in self.client.hgetall(self._k_versions).items():
            m = json.loads(meta)
            infos.append(VersionInfo(name.decode(), m["dim"], m["count"], m["created"]))
        return sorted(infos, key=lambda i: (i.created, i.name))

    def versions(self) -> list[str]:
        return [i.name for i in self._all_info()]

    def version_info(self, version: str) -> VersionInfo:
        check_version_name(version)
        meta = self.client.hget(self._k_versions, version)
        if meta is None:
            self._refuse("pending" if self.client.exists(self._pending_key(version)) else "unknown", version)
        m = json.loads(meta)
        return VersionInfo(version, m["dim"], m["count"], m["created"])

    def active_version(self) -> str | None:
        value = self.client.get(self._k_active)
        return None if value is None else value.decode()

    def activate(self, version: str) -> None:
        check_version_name(version)
        keys = [self._k_active, self._k_history, self._k_versions, self._pending_key(version), self._k_rolled_back]
        self._refuse(self._activate(keys=keys, args=[version, HISTORY_LIMIT]).decode(), version)

    def rollback(self) -> str:
        status, name = self._rollback(keys=[self._k_active, self._k_history, self._k_rolled_back])
        if status == b"empty":
            raise ValueError(f"nothing to roll back to: no version was active before {name.decode() or None!r}")
        return name.decode()

    def rollback_target(self) -> str | None:
        value = self.client.lindex(self._k_history, -1)
        return None if value is None else value.decode()

    def rolled_back(self) -> set[str]:
        return {v.decode() for v in self.client.smembers(self._k_rolled_back)}

    def delete_version(self, version: str) -> None:
        check_version_name(version)
        keys = [self._k_active, self._k_history, self._k_versions, self._data_key(version), self._pending_key(version),
                self._k_rolled_back]
        self._refuse(self._delete(keys=keys, args=[version]).decode(), version)

    def get(self, ids: np.ndarray, version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = as_ids(ids)
        if version is not None:
            name = check_version_name(version).encode()
        for _ in range(2):
            if version is None:
                name = self._last_active or self.client.get(self._k_active)
                if name is None:
                    raise ValueError("no active version: publish and activate one first (or pass version=)")
            active, meta, *values = self._transaction(name, query)  # all three at one instant
            if version is None and active != name:  # the hint was stale: read the new active version
                self._last_active = active
                continue
            if version is None:
                self._last_active = name
            if meta is None:
                pending = self.client.exists(self._pending_key(name.decode()))
                self._refuse("pending" if pending else "unknown", name.decode())
            return _decode(values[0] if values else [], len(query), json.loads(meta)["dim"], name.decode())
        # Activations faster than our round trips (never in daily serving; a stress test does it):
        # read the pointer and the rows inside one script, which always succeeds.
        fields = query.astype("<i8", copy=False).view("V8").tolist()
        name, meta, values = self._get_active(keys=[self._k_active, self._k_versions], args=[self._k_data_prefix, *fields])
        if name is None:
            raise ValueError("no active version: publish and activate one first (or pass version=)")
        self._last_active = name
        return _decode(values, len(query), json.loads(meta)["dim"], name.decode())

    def _transaction(self, name: bytes, query: np.ndarray) -> list:
        """``[GET active, HGET versions name, HMGET data:name ids]`` (no HMGET for no ids) in one
        MULTI/EXEC, packed by `_pack_get` and sent on a connection of the client's pool, with the
        client's retry policy on connection errors (as redis-py's own pipelines do)."""
        heads = [(b"GET", self._k_active.encode()), (b"HGET", self._k_versions.encode(), name)]
        request = _pack_get(heads, (b"HMGET", self._k_data_prefix + name), query)
        replies = 2 + len(heads) + (len(query) > 0)  # OK for MULTI, a QUEUED per command, EXEC's
        pool = self.client.connection_pool
        conn = pool.get_connection()

        def round_trip() -> list:
            conn.send_packed_command([request])
            return [conn.read_response() for _ in range(replies)][-1]

        try:
            result = conn.retry.call_with_retry(round_trip, lambda _error: conn.disconnect())
        except BaseException:
            conn.disconnect()  # replies may still be in flight: never reuse this socket
            raise
        finally:
            pool.release(conn)
        for item in result:
            if isinstance(item, Exception):
                raise item
        return result


def _pack_get(heads: list[tuple[bytes, ...]], tail: tuple[bytes, ...], ids: np.ndarray) -> bytes:
    """MULTI, the ``heads`` commands, ``tail`` followed by one 8-byte little-endian argument per id
    [N] (left out for N = 0), EXEC, in the Redis protocol (RESP). The id arguments are built as one
    [N, 14] byte array of ``$8 CR LF <id> CR LF`` records: packing costs no Python per id."""

    def command(args: tuple[bytes, ...], extra: int = 0) -> bytes:
        return b"*%d\r\n" % (len(args) + extra) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    out = [command((b"MULTI",)), *(command(h) for h in heads)]
    if len(ids):
        records = np.empty((len(ids), 14), np.uint8)  # [N, 14]
        records[:, :4] = np.frombuffer(b"$8\r\n", np.uint8)
        records[:, 4:12] = ids.astype("<i8", copy=False).view(np.uint8).reshape(-1, 8)
        records[:, 12:] = np.frombuffer(b"\r\n", np.uint8)
        out += [command(tail, extra=len(ids)), records.tobytes()]
    out.append(command((b"EXEC",)))
    return b"".join(out)


def _decode(values: list[bytes | None], n: int, dim: int, version: str) -> tuple[np.ndarray, np.ndarray]:
    """HMGET's reply (raw rows or None) as embeddings [N, E] float32 and found [N] bool; rows that
    are not 4E bytes each (not written by this store) are an :class:`IntegrityError`."""
    found = np.fromiter(map(bool, values), bool, n) if n else np.zeros(0, bool)
    joined = b"".join(filter(None, values))
    rows = int(found.sum())
    # The total length, free to check, catches any row of another length but a set of them that
    # adds up exactly; checking each row's costs ~50 us a 1,000-key get (2-3 % of it) here.
    if len(joined) != rows * 4 * dim:
        raise IntegrityError(f"Redis version {version!r}: the {rows} rows read hold {len(joined)} bytes, not {rows} x "
                             f"{4 * dim} ({dim} float32): its hash was written by something else; publish the version again")
    out = np.zeros((n, dim), np.float32)
    out[found] = np.frombuffer(joined, "<f4").reshape(-1, dim)
    return out, found


class _RedisWriter(VersionWriter):
    """Pipelines packed batches into a staging hash; `commit` renames it into place. A thread
    refreshes the writer's owner key until it commits, aborts or is garbage-collected."""

    def __init__(self, store: RedisStore, version: str, dim: int) -> None:
        self.store, self.version, self.dim = store, version, dim
        token = uuid.uuid4().hex
        self._token, self._member = token, f"{version}:{token}"
        self._staging, self._owner = store._writer_keys(version, token)
        self._pending = store._pending_key(version)
        ttl_ms = max(1, int(store.writer_ttl_s * 1000))
        (store.client.pipeline().set(self._owner, 1, px=ttl_ms).sadd(store._k_writers, self._member)
         .sadd(self._pending, token).expire(self._pending, store.staging_ttl_s).execute())
        self._rows = 0
        self._done = False
        self._stop, self._lost = threading.Event(), threading.Event()
        weakref.finalize(self, self._stop.set)  # an abandoned writer stops proving it is alive
        threading.Thread(target=_keep_alive, args=(store.client, self._owner, ttl_ms, self._stop, self._lost),
                         name=f"redis-writer-{version}", daemon=True).start()

    def put(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        ids, emb = self._rows_of(ids, embeddings)
        if self._lost.is_set():
            raise ValueError(self._lapsed())
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"version {self.version!r} has duplicate ids within one put; ids must be unique")
        store = self.store
        # [2B] alternating field, value: 8-byte ids and 4E-byte rows, built at C speed.
        items = np.empty(2 * len(ids), object)
        items[0::2] = ids.astype("<i8", copy=False).view("V8").tolist()
        items[1::2] = emb.astype("<f4", copy=False).view(np.dtype((np.void, 4 * self.dim))).ravel().tolist()
        pipe = store.client.pipeline(transaction=False)
        for i, start in enumerate(range(0, 2 * len(ids), 2 * store.put_rows)):
            pipe.hset(self._staging, items=items[start : start + 2 * store.put_rows].tolist())
            if (i + 1) % store.pipeline_depth == 0:
                pipe.execute()
        # Refreshed on every put: a writer that dies leaves nothing behind after the TTL.
        pipe.expire(self._staging, store.staging_ttl_s).sadd(self._pending, self._token)
        pipe.expire(self._pending, store.staging_ttl_s).execute()
        self._rows += len(ids)

    def commit(self) -> VersionInfo:
        if self._done:
            raise ValueError(f"version {self.version!r} writer is closed (committed or aborted)")
        store = self.store
        created = time.time()
        meta = json.dumps({"dim": self.dim, "count": self._rows, "created": created})
        keys = [self._staging, store._data_key(self.version), store._k_versions, self._pending, self._owner, store._k_writers]
        status, have = store._commit(keys=keys, args=[self.version, meta, self._rows, self._token, self._member])
        self._done = True  # the script dropped the staging hash on every refusal
        self._stop.set()
        if status == b"lost":
            raise ValueError(self._lapsed())
        if status == b"duplicate":
            raise ValueError(f"duplicate version {self.version!r}: it was committed meanwhile by another writer")
        if status == b"count":
            why = (
                "its staging data expired or was deleted"
                if have == 0
                else f"it has duplicate ids ({self._rows} rows put, {have} distinct)"
            )
            raise ValueError(f"cannot commit version {self.version!r}: {why}")
        return VersionInfo(self.version, self.dim, self._rows, created)

    def _lapsed(self) -> str:
        return (f"cannot commit version {self.version!r}: this writer's claim lapsed (its owner key {self._owner} was "
                f"not refreshed for {self.store.writer_ttl_s:g} s: the process was stopped or cut off from Redis), so "
                "another publisher may have removed its rows; publish the version again")

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._stop.set()
        store = self.store
        try:
            (store.client.pipeline().unlink(self._staging).srem(self._pending, self._token)
             .delete(self._owner).srem(store._k_writers, self._member).execute())
        except redis.RedisError:
            pass  # best effort (e.g. the connection is gone): the owner key expires, the next writer cleans up


def _keep_alive(client: redis.Redis, owner: str, ttl_ms: int, stop: threading.Event, lost: threading.Event) -> None:
    """Refreshes a writer's owner key every third of its TTL until ``stop``; sets ``lost`` and ends
    if the key expired meanwhile (``XX``: a lapsed claim is never renewed, since another publisher
    may have removed the writer's staging once it saw the key gone)."""
    while not stop.wait(ttl_ms / 3000):
        try:
            if not client.set(owner, 1, px=ttl_ms, xx=True):
                lost.set()
                return
        except redis.RedisError:
            pass  # the server is unreachable for now: the next round tries again, the TTL decides
