"""What only the Redis store has: URLs, prefixes, outages, ACLs, key hygiene."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

import pytest
import redis

from residual_store.errors import StoreUnavailable
from residual_store.stores.redis_store import RedisStore

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_unreachable_redis_is_store_unavailable_fast(blob_factory):
    store = RedisStore(DOWN, socket_timeout=1.0)
    for call in (store.ping, store.list_tasks, store.current_versions,
                 lambda: store.get("Ar2Cl"), lambda: store.publish("Ar2Cl", blob_factory())):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1 is unreachable.*check"):
            call()
        assert time.monotonic() - t0 < 5


def test_events_survive_an_unreachable_redis(caplog):
    store = RedisStore(DOWN, socket_timeout=0.5)
    stop = threading.Event()
    got = []
    with caplog.at_level(logging.WARNING, logger="residual_store.stores.redis_store"):
        it = store.events(stop)  # must not raise
        thread = threading.Thread(target=lambda: got.extend(it), daemon=True)
        thread.start()
        time.sleep(1.5)  # several reconnect attempts
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and got == []
    assert len([r for r in caplog.records if "paused" in r.getMessage()]) == 1  # warned once


def test_prefix_from_url_and_conflicts():
    assert RedisStore("redis://h:6379/0?prefix=team-a:").prefix == "team-a:"
    assert RedisStore("redis://h:6379/0").prefix == "uda:"
    assert RedisStore("redis://h:6379/0", prefix="x:").prefix == "x:"
    with pytest.raises(ValueError, match="two prefixes"):
        RedisStore("redis://h:6379/0?prefix=a:", prefix="b:")
    for bad in ("", "a*", "a b"):
        with pytest.raises(ValueError, match="prefix"):
            RedisStore("redis://h:6379/0", prefix=bad)
    with pytest.raises(ValueError, match="redis://"):
        RedisStore("http://h:6379")


def test_password_from_url_or_env_and_never_shown(monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    store = RedisStore("redis://h:6379/0")
    assert store._r.connection_pool.connection_kwargs["password"] == "from-env"
    store = RedisStore("redis://user:s3cret@h:6379/0")
    assert store._r.connection_pool.connection_kwargs["password"] == "s3cret"
    assert "s3cret" not in store.url and "s3cret" not in repr(store)


def test_keys_only_under_prefix(redis_client, redis_store, blob_factory):
    before = set(redis_client.scan_iter(match="*"))
    redis_store.publish("Ar2Cl", blob_factory())
    redis_store.publish("Ar2Cl", blob_factory(seed=1))
    redis_store.rollback("Ar2Cl", 1)
    redis_store.publish("Pr2Rw", blob_factory("Pr2Rw"))
    redis_store.delete("Pr2Rw")
    new = {k.decode() for k in set(redis_client.scan_iter(match="*")) - before}
    assert new and all(k.startswith(redis_store.prefix) for k in new)
    p = redis_store.prefix
    assert {f"{p}tasks", f"{p}seq:Ar2Cl", f"{p}index:Ar2Cl", f"{p}blob:Ar2Cl:3"} <= new
    assert redis_client.ttl(f"{p}blob:Ar2Cl:3") == -1  # indexed blobs never expire


@pytest.fixture
def readonly_url(redis_url, redis_client, redis_prefix):
    """A URL for a throw-away Redis user that may only read the prefix and subscribe."""
    user, password = f"uda-test-ro-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    try:
        redis_client.acl_setuser(user, enabled=True, passwords=[f"+{password}"],
                                 keys=[f"{redis_prefix}*"], channels=[f"{redis_prefix}events"],
                                 commands=["-@all", "+@read", "+@connection", "+subscribe",
                                           "+unsubscribe"])
    except redis.ResponseError as e:
        pytest.skip(f"cannot create an ACL user on {redis_url}: {e}")
    host = redis_url.split("://", 1)[1]
    yield f"redis://{user}:{password}@{host}"
    redis_client.acl_deluser(user)


def test_readers_need_no_write_permission(readonly_url, redis_store, redis_prefix, blob_factory):
    redis_store.publish("Ar2Cl", blob_factory())
    reader = RedisStore(readonly_url, prefix=redis_prefix)
    try:
        assert [t.task for t in reader.list_tasks()] == ["Ar2Cl"]
        assert reader.get("Ar2Cl")[1] == blob_factory()
        assert reader.current_versions()["Ar2Cl"][0] == 1
        assert [v.version for v in reader.versions("Ar2Cl")] == [1]
        reader.ping()
        stop = threading.Event()
        got = []
        it = reader.events(stop)
        thread = threading.Thread(target=lambda: got.extend(it), daemon=True)
        thread.start()
        redis_store.publish("Ar2Cl", blob_factory(seed=1))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        thread.join(timeout=10)
        assert [(e.kind, e.version) for e in got] == [("publish", 2)]
        with pytest.raises(StoreUnavailable, match="ACL"):
            reader.publish("Ar2Cl", blob_factory(seed=2))
    finally:
        reader.close()


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server on a free port, restartable, so a test may take it down."""
    import shutil
    import socket
    import subprocess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {port}")

    def stop() -> None:
        procs[-1].kill()  # only the server this fixture started
        procs[-1].wait()

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_events_reconnect_after_a_redis_restart(own_redis, blob_factory, caplog):
    url, start, stop_server = own_redis
    store = RedisStore(url, socket_timeout=1.0)
    stop = threading.Event()
    got = []
    it = store.events(stop)
    thread = threading.Thread(target=lambda: got.extend(it), daemon=True)
    thread.start()
    try:
        store.publish("Ar2Cl", blob_factory())
        _wait(lambda: len(got) == 1)
        with caplog.at_level(logging.WARNING, logger="residual_store.stores.redis_store"):
            stop_server()
            time.sleep(1.0)
            start()
            # the follower resubscribes in the background; publish until it hears one
            deadline = time.monotonic() + 20
            while len(got) < 2 and time.monotonic() < deadline:
                store.publish("Ar2Cl", blob_factory(seed=len(got)))
                time.sleep(0.3)
        assert len(got) >= 2 and thread.is_alive()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "reconnecting" in warnings[0].getMessage()
    finally:
        stop.set()
        thread.join(timeout=10)
        store.close()
    assert not thread.is_alive()


def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pred()
