"""The fleet store: residuals in Redis, change events on Redis pub/sub.

Keys, all under the prefix `p` (default "uda:"; several deployments can share one Redis):

    {p}seq:{task}          INCR counter: version numbers, never reused (kept across delete)
    {p}blob:{task}:{n}     the blob bytes of version n
    {p}index:{task}        hash: "current" -> n, "v:{n}" -> JSON {sha256, size, created, metadata}
    {p}tasks               set of task names that have a current version
    channel {p}events      JSON {"kind", "task", "version", "sha256"} per change

A publish takes a number with INCR, SETs the blob with a TTL (so a publisher killed right here
leaves nothing behind for long), then runs one Lua script that persists the blob and moves the
index. The script moves "current" only forward, so concurrent publishers never move it back
and the index never names a missing blob. A version's record is written once and never
changed (its number is never reused), so `list_tasks`, which servers call every second,
reads each task's "current" and field names (HGET, HKEYS) and parses a record only for a
task whose pair changed since its last call: 15 MB of metadata is read once per publish,
not once a second. Reads use only read commands (GET, HGET, HGETALL, HKEYS, SMEMBERS) and
SUBSCRIBE, so servers can run under a read-only ACL user (+@read +ping
+subscribe on ~{p}* and &{p}events); publishers also need INCR, SET, EVALSHA/EVAL.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from residual_store.errors import IntegrityError, ResidualStoreError, StoreUnavailable, UnknownTask
from residual_store.stores import redact_url
from residual_store.stores.base import (
    DEFAULT_KEEP,
    TASK_NAME_RE,
    ResidualStore,
    StoreEvent,
    TaskInfo,
    VersionInfo,
    pick_version,
    validate_task_name,
    version_record,
)

logger = logging.getLogger(__name__)

PENDING_BLOB_TTL_MS = 3_600_000  # a blob not yet indexed expires unless the index script runs
_EVENT_POLL_S = 0.5  # how often events() looks at its stop Event
_BACKOFF_MAX_S = 5.0

# KEYS: index, new blob, tasks set. ARGV: version, record JSON, keep, blob key prefix, task,
# channel, event JSON, "1" for a rollback (refused once the task is deleted). Trimmed blob keys
# are built from ARGV[4] (fine on a single Redis).
_PUBLISH_LUA = """
if ARGV[8] == '1' and redis.call('HEXISTS', KEYS[1], 'current') == 0 then
  redis.call('DEL', KEYS[2])
  return redis.error_reply('UNKNOWN_TASK deleted during the rollback')
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('blob of version ' .. ARGV[1] .. ' expired before it was indexed')
end
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], ARGV[2])
local moved = 0
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'current') or '0') then
  redis.call('HSET', KEYS[1], 'current', ARGV[1])
  moved = 1
end
local vs = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 2) == 'v:' then table.insert(vs, tonumber(string.sub(f, 3))) end
end
table.sort(vs)
for i = 1, #vs - tonumber(ARGV[3]) do
  redis.call('HDEL', KEYS[1], 'v:' .. string.format('%d', vs[i]))
  redis.call('DEL', ARGV[4] .. string.format('%d', vs[i]))
end
redis.call('SADD', KEYS[3], ARGV[5])
if moved == 1 then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return moved
"""

# KEYS: index, tasks set. ARGV: blob key prefix, task, channel, event JSON.
_DELETE_LUA = """
local fields = redis.call('HKEYS', KEYS[1])
if #fields == 0 then return 0 end
for _, f in ipairs(fields) do
  if string.sub(f, 1, 2) == 'v:' then redis.call('DEL', ARGV[1] .. string.sub(f, 3)) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


# Query parameters a store URL may carry: ours (prefix) and those redis-py's from_url turns into
# connection settings. redis-py passes any other one on as a keyword argument, which fails as a
# TypeError at the first command: a typo like `?prefx=` must be an error here instead.
_QUERY_KEYS = frozenset({"prefix", "client_name", *redis.connection.URL_QUERY_ARGUMENT_PARSERS})
_TLS_QUERY_KEYS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data",
                             "ssl_certfile", "ssl_keyfile", "ssl_password"})


def _check_query(scheme: str, keys: list[str], shown: str) -> None:
    """ValueError naming each query parameter of the URL that is not a known one."""
    known = _QUERY_KEYS | (_TLS_QUERY_KEYS if scheme == "rediss" else frozenset())
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known | _TLS_QUERY_KEYS), n=1)
        tls_only = key in _TLS_QUERY_KEYS
        hints.append(f"{key!r}" + (" (TLS settings need rediss://)" if tls_only else
                                   f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown query parameter {', '.join(hints)} in store URL {shown}: "
                     f"use e.g. redis://redis:6379/0?prefix=uda: (known: prefix, db, "
                     "socket_timeout, client_name, ...)")


def _split_url(url: str, prefix: str | None) -> tuple[str, str, str, str]:
    """(URL for redis-py without our `prefix` query, prefix, host:port, URL safe to print)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {url!r}; use e.g. redis://redis:6379/0?prefix=uda:")
    query = parse_qsl(parts.query, keep_blank_values=True)
    _check_query(parts.scheme, [k for k, _ in query], redact_url(url))
    url_prefix = next((v for k, v in query if k == "prefix"), None)
    if prefix is not None and url_prefix is not None and prefix != url_prefix:
        raise ValueError(f"two prefixes given: {prefix!r} (argument) and {url_prefix!r} (URL)")
    prefix = prefix if prefix is not None else url_prefix if url_prefix is not None else "uda:"
    if not prefix or any(c in prefix for c in "*?[] \t\n"):
        raise ValueError(f"invalid key prefix {prefix!r}: use e.g. 'uda:' (no spaces or *?[])")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    clean = urlunsplit(parts._replace(query=rest))
    where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    return clean, prefix, where, redact_url(url)  # never print a password


class RedisStore(ResidualStore):
    """Versioned residuals in one Redis; see the module docstring for the key layout."""

    def __init__(self, url: str, prefix: str | None = None, keep: int = DEFAULT_KEEP,
                 socket_timeout: float = 5.0):
        self._set_keep(keep)
        clean, self.prefix, self._where, self.url = _split_url(url, prefix)
        kwargs: dict[str, Any] = {}
        if not urlsplit(url).password and os.environ.get("REDIS_PASSWORD"):
            kwargs["password"] = os.environ["REDIS_PASSWORD"]
        # No connection is made here: redis-py connects on the first command.
        self._r = redis.Redis.from_url(
            clean, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            # two quick retries for a blip; an outage must surface fast as StoreUnavailable
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            health_check_interval=30, **kwargs)
        self._socket_timeout = socket_timeout
        self._publish_script = self._r.register_script(_PUBLISH_LUA)
        self._delete_script = self._r.register_script(_DELETE_LUA)
        # task -> ((current, field names), TaskInfo) of the last list_tasks: unchanged tasks
        # are not read again
        self._listed: dict[str, tuple[tuple, TaskInfo]] = {}
        self._listed_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, keep={self.keep})"

    # -- keys and errors ---------------------------------------------------------------------

    def _key(self, kind: str, task: str = "", version: int | None = None) -> str:
        key = f"{self.prefix}{kind}"
        if task:
            key += f":{task}"
        if version is not None:
            key += f":{version}"
        return key

    @property
    def _channel(self) -> str:
        return f"{self.prefix}events"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate redis-py errors into the store's domain errors, naming what to check."""
        try:
            yield
        except redis.AuthenticationError as e:
            raise StoreUnavailable(f"Redis at {self._where} refused the credentials ({e}): "
                                   "check the user/password in the URL or REDIS_PASSWORD") from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(
                f"Redis at {self._where} is unreachable ({e}): check that redis-server runs "
                f"there and the host/port of {self.url}") from e
        except redis.exceptions.NoPermissionError as e:
            raise StoreUnavailable(f"Redis at {self._where} denied a command ({e}): check the "
                                   f"ACL of this user (writes need the keys {self.prefix}*)") from e
        except redis.RedisError as e:
            if isinstance(e, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(e):
                raise ResidualStoreError(
                    f"Redis at {self._where} is full: it refused the write (maxmemory reached, "
                    "policy noeviction) and keeps every stored version. Free memory with "
                    "`uda-store rm TASK` for tasks no longer served, or raise Redis's maxmemory "
                    "(REDIS_MAXMEMORY in deploy/) with its memory limit") from e
            raise ResidualStoreError(f"Redis at {self._where}: {e}") from e

    @contextlib.contextmanager
    def _unknown_if_deleted(self, task: str) -> Iterator[None]:
        """The publish script's refusal to roll back a task deleted meanwhile, as UnknownTask."""
        try:
            yield
        except redis.ResponseError as e:
            if "UNKNOWN_TASK" in str(e):
                raise UnknownTask(f"task {task!r} was deleted from {self.url} during the rollback") from e
            raise

    # -- reads -------------------------------------------------------------------------------

    def _parse_index(self, task: str,
                     raw: dict[bytes, bytes]) -> tuple[int, dict[int, VersionInfo]]:
        """(current, version -> info) from an index hash; UnknownTask when it is empty."""
        if not raw or b"current" not in raw:
            raise UnknownTask(f"unknown task {task!r} in {self.url}")
        try:
            versions = {}
            for field, value in raw.items():
                if field.startswith(b"v:"):
                    n = int(field[2:])
                    versions[n] = version_record(task, n, json.loads(value))
            current = int(raw[b"current"])
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"corrupt index {self._key('index', task)}: {e}") from e
        if current not in versions:
            raise IntegrityError(f"index {self._key('index', task)} names a missing version")
        return current, versions

    def _index(self, task: str) -> tuple[int, dict[int, VersionInfo]]:
        validate_task_name(task)
        with self._errors():
            raw = self._r.hgetall(self._key("index", task))
        return self._parse_index(task, raw)

    def _pick(self, task: str, version: int | None) -> VersionInfo:
        current, versions = self._index(task)
        return versions[pick_version(task, current, versions, version)]

    def info(self, task: str, version: int | None = None) -> VersionInfo:
        return self._pick(task, version)

    def _blob_where(self, task: str, version: int) -> str:
        return self._key("blob", task, version)

    def _read_blob(self, task: str, info: VersionInfo) -> bytes | None:
        with self._errors():
            return self._r.get(self._key("blob", task, info.version))

    def versions(self, task: str) -> list[VersionInfo]:
        _, versions = self._index(task)
        return [versions[v] for v in sorted(versions)]

    def list_tasks(self) -> list[TaskInfo]:
        with self._errors():
            members = self._r.smembers(self._key("tasks"))
            names = sorted(n.decode("utf-8", "replace") for n in members)
            names = [n for n in names if TASK_NAME_RE.fullmatch(n)]  # ignore foreign junk
            # transaction=False: no MULTI, which a read-only ACL user may not run
            pipe = self._r.pipeline(transaction=False)
            for task in names:
                pipe.hget(self._key("index", task), "current")
                pipe.hkeys(self._key("index", task))
            heads = pipe.execute()
        with self._listed_lock:
            listed = dict(self._listed)
        stamps, changed = {}, []
        for task, current, fields in zip(names, heads[::2], heads[1::2]):
            if current is None or not fields:
                continue  # deleted between SMEMBERS and this read
            stamps[task] = (current, tuple(sorted(fields)))
            if task not in listed or listed[task][0] != stamps[task]:
                changed.append(task)
        fresh = self._read_current(changed, stamps)
        with self._listed_lock:
            self._listed = {t: fresh[t] if t in fresh else listed[t]
                            for t in stamps if t in fresh or t not in changed}
            return [self._listed[t][1] for t in names if t in self._listed]

    def _read_current(self, tasks: list[str], stamps: dict[str, tuple]) -> dict[str, tuple]:
        """task -> (stamp, TaskInfo) from the current version's record of each of `tasks`."""
        if not tasks:
            return {}
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            for task in tasks:
                pipe.hget(self._key("index", task), b"v:" + stamps[task][0])
            records = pipe.execute()
        out = {}
        for task, record in zip(tasks, records):
            if record is None:
                continue  # deleted since its field names were read
            current, fields = stamps[task]
            raw = {b"current": current, b"v:" + current: record}
            try:
                _, versions = self._parse_index(task, raw)
                kept = tuple(sorted(int(f[2:]) for f in fields if f.startswith(b"v:")))
            except (IntegrityError, ValueError) as e:
                # One damaged task must not hide the others from servers; `verify` reports it.
                logger.warning("skipping task %r in %s: %s", task, self.url, e)
                continue
            out[task] = (stamps[task], TaskInfo(task=task, current=versions[int(current)],
                                                versions=kept))
        return out

    # -- writes ------------------------------------------------------------------------------

    def _publish(self, task: str, blob: bytes, metadata: dict[str, str]) -> VersionInfo:
        sha = hashlib.sha256(blob).hexdigest()
        kind = "rollback" if "rolled_back_from" in metadata else "publish"
        with self._errors(), self._unknown_if_deleted(task):
            version = int(self._r.incr(self._key("seq", task)))
            info = VersionInfo(task=task, version=version, sha256=sha, size=len(blob),
                               created=time.time(), metadata=metadata)
            blob_key = self._key("blob", task, version)
            self._r.set(blob_key, blob, px=PENDING_BLOB_TTL_MS)
            record = {"sha256": sha, "size": len(blob), "created": info.created,
                      "metadata": metadata}
            event = {"kind": kind, "task": task, "version": version, "sha256": sha}
            moved = self._publish_script(
                keys=[self._key("index", task), blob_key, self._key("tasks")],
                args=[version, json.dumps(record), self.keep, self._key("blob", task) + ":",
                      task, self._channel, json.dumps(event), "1" if kind == "rollback" else "0"])
        if not moved:  # a concurrent publisher took a higher number first and stays current
            logger.warning("%s v%d was stored, but a higher version is current already",
                           task, version)
        logger.info("published %s v%d (%d bytes) to %s", task, version, len(blob), self.url)
        return info

    def delete(self, task: str) -> None:
        validate_task_name(task)
        event = {"kind": "delete", "task": task, "version": None, "sha256": None}
        with self._errors():
            found = self._delete_script(
                keys=[self._key("index", task), self._key("tasks")],
                args=[self._key("blob", task) + ":", task, self._channel, json.dumps(event)])
        if not found:
            raise UnknownTask(f"unknown task {task!r} in {self.url}")
        logger.info("deleted %s from %s", task, self.url)

    # -- events, health ----------------------------------------------------------------------

    def events(self, stop: Any = None) -> Iterator[StoreEvent]:
        """Yield events from {prefix}events until `stop` is set, reconnecting after outages.

        Subscribes now, at the call (when Redis answers), so a publish made after events()
        returns is delivered. Events sent while disconnected are lost: followers also
        reconcile with current_versions().
        """
        state = {"warned": False}
        return self._listen(self._subscribe(state), stop, state)

    def _subscribe(self, state: dict[str, bool]) -> Any:
        """A subscribed PubSub, or None (after one warning per outage) when Redis is down."""
        pubsub = self._r.pubsub()
        try:
            pubsub.subscribe(self._channel)
            deadline = time.monotonic() + self._socket_timeout
            while time.monotonic() < deadline:  # wait for the server to confirm
                msg = pubsub.get_message(timeout=0.1)
                if msg and msg["type"] == "subscribe":
                    break
        except redis.RedisError as e:
            pubsub.close()
            if not state["warned"]:
                logger.warning("events from Redis at %s paused (%s); reconnecting", self._where, e)
                state["warned"] = True
            return None
        if state["warned"]:
            logger.info("events from Redis at %s resumed", self._where)
            state["warned"] = False
        return pubsub

    def _listen(self, pubsub: Any, stop: Any, state: dict[str, bool]) -> Iterator[StoreEvent]:
        backoff = 0.1
        try:
            while not (stop is not None and stop.is_set()):
                if pubsub is None:
                    if stop is not None and stop.wait(backoff):
                        return
                    if stop is None:
                        time.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    pubsub = self._subscribe(state)
                    continue
                try:
                    msg = pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=_EVENT_POLL_S)
                except redis.RedisError as e:
                    if not state["warned"]:
                        logger.warning("lost Redis events at %s (%s); reconnecting",
                                       self._where, e)
                        state["warned"] = True
                    pubsub.close()
                    pubsub = None
                    continue
                backoff = 0.1
                event = self._parse_event(msg) if msg else None
                if event is not None:
                    yield event
        finally:
            if pubsub is not None:
                pubsub.close()

    def _parse_event(self, msg: dict[str, Any]) -> StoreEvent | None:
        try:
            d = json.loads(msg["data"])
            event = StoreEvent(kind=d["kind"], task=validate_task_name(d["task"]),
                               version=d["version"], sha256=d["sha256"])
            if event.kind not in ("publish", "rollback", "delete"):
                raise ValueError(f"unknown kind {event.kind!r}")
            return event
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring malformed event on %s: %s", self._channel, e)
            return None

    def ping(self) -> None:
        with self._errors():
            self._r.ping()

    def check_writable(self) -> None:
        """A probe key under the prefix, set with a 10 s expiry and deleted: the user may write
        (Redis offers no cheaper check that works without the right to run ACL)."""
        key = self._key("writecheck", os.urandom(8).hex())
        with self._errors():
            self._r.set(key, b"1", px=10_000)
            self._r.delete(key)

    def close(self) -> None:
        self._r.close()
