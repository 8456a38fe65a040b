"""Issue 6, point 6: publisher atomicity seen from a running server, and the Redis ACL split.

Racing publishers: the index never names a missing blob, versions never decrease for a reader
or for the server, and the server ends on the store's last version with the right answers. A
publisher SIGKILLed between writing the blob and moving the index leaves the old version
current and served; the next publish numbers past the orphan. The server runs under the
documented read-only Redis user (deploy/kubernetes/base/redis.yaml) and follows a trainer's
publishes, while the same user's writes are refused.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
import reliability_support as rs

from residual_store.errors import IntegrityError, ResidualStoreError, UnknownTask
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

PUBLISHERS, EACH = 3, 4


def test_racing_publishers_never_show_a_missing_blob_or_a_lower_version(store_url):
    pool = [rs.make_version("A", 200 + i) for i in range(PUBLISHERS * EACH)]
    published: dict[int, rs.Version] = {}
    store = open_store(store_url)
    info = store.publish("A", pool[0].blob)
    published[info.version] = pool[0]
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_url, port=0, reconcile_interval=0.2)
    problems, seen_store, seen_server = [], [], []
    stop = threading.Event()

    def reader():
        r = open_store(store_url)
        while not stop.is_set():
            try:
                got, _ = r.get("A")
                seen_store.append(got.version)
            except IntegrityError as e:  # "missing but indexed" or a torn blob
                problems.append(str(e))
            except UnknownTask as e:
                problems.append(f"task vanished: {e}")

    def publisher(k):
        s = open_store(store_url)
        for v in pool[k * EACH + 1:(k + 1) * EACH + 1] if k < PUBLISHERS - 1 else pool[k * EACH + 1:]:
            published[s.publish("A", v.blob).version] = v

    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        threads = [threading.Thread(target=reader)] + [threading.Thread(target=publisher, args=(k,))
                                                      for k in range(PUBLISHERS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads[1:]):
            seen_server.append(rs.predict(http, "A"))
        stop.set()
        threads[0].join()
        final = store.info("A").version
        assert final == max(published)
        last = rs.wait_for("the server on the last version",
                           lambda: (r := rs.predict(http, "A")).json()["version"] == final and r)
        seen_server.append(last)
    store.close()
    assert not problems, problems[:3]
    assert seen_store == sorted(seen_store)
    versions = [r.json()["version"] for r in seen_server]
    assert versions == sorted(versions)
    for r in seen_server:
        assert r.status_code == 200 and rs.matches(r, published[r.json()["version"]])


KILLED_PUBLISHER = r"""
import os, signal, sys
from residual_store.stores import open_store
import residual_store.stores.directory as directory
url, path = sys.argv[1], sys.argv[2]
blob = open(path, "rb").read()
store = open_store(url)
if url.startswith("redis"):
    # INCR and the blob SET have run; the index script never will.
    store._publish_script = lambda **kw: os.kill(os.getpid(), signal.SIGKILL)
else:
    write = directory.atomic_write
    def blob_then_die(p, data):
        write(p, data)
        if p.name.endswith(".safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
    directory.atomic_write = blob_then_die
store.publish("A", blob)
"""


def test_a_publisher_killed_between_blob_and_index(store_url, tmp_path):
    v1, orphan, v3 = rs.make_version("A", 1), rs.make_version("A", 2), rs.make_version("A", 3)
    store = open_store(store_url)
    store.publish("A", v1.blob)
    (tmp_path / "orphan.safetensors").write_bytes(orphan.blob)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_url, port=0, reconcile_interval=0.2)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").json()["version"] == 1
        done = subprocess.run([sys.executable, "-c", KILLED_PUBLISHER, store_url,
                               str(tmp_path / "orphan.safetensors")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == -9, done.stderr  # it really died mid publish
        assert store.info("A").version == 1 and store.get("A")[1] == v1.blob
        time.sleep(1.0)  # several reconcile rounds: nothing may change (not a duration check)
        resp = rs.predict(http, "A")
        assert resp.json()["version"] == 1 and rs.matches(resp, v1)
        info = store.publish("A", v3.blob)
        assert info.version == 3  # numbered past the orphan's 2, never reusing it
        resp = rs.wait_for("v3 served", lambda: (r := rs.predict(http, "A")).json()["version"] == 3 and r)
        assert rs.matches(resp, v3)
        assert [v.version for v in store.versions("A")] == [1, 3]
    store.close()


ACL = ("user uda-serve on >serve-pw-2 resetkeys ~uda:* resetchannels &uda:* -@all +@read "
       "+@connection +select +subscribe +unsubscribe -@dangerous",
       "user uda-train on >train-pw-3 resetkeys ~uda:* resetchannels &uda:* -@all +@read +@write "
       "+@connection +@transaction +select +subscribe +unsubscribe +publish +eval +evalsha "
       "+script|load +script|exists -@dangerous")


def test_the_server_runs_as_the_read_only_redis_user(tmp_path):
    acl = tmp_path / "users.acl"
    acl.write_text("user default on nopass ~* &* +@all\n" + "\n".join(ACL) + "\n")
    redis_srv = rs.PrivateRedis(tmp_path, extra=["--aclfile", str(acl)]).start()
    serve_url = f"redis://uda-serve:serve-pw-2@127.0.0.1:{redis_srv.port}/0?prefix=uda:"
    train = open_store(f"redis://uda-train:train-pw-3@127.0.0.1:{redis_srv.port}/0?prefix=uda:")
    v1, v2 = rs.make_version("A", 1), rs.make_version("A", 2)
    try:
        train.publish("A", v1.blob)
        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=serve_url, port=0, reconcile_interval=0.3)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/readyz").status_code == 200
            assert rs.matches(rs.predict(http, "A"), v1)
            info = train.publish("A", v2.blob)  # the trainer's user may write
            resp = rs.wait_for("v2 served", lambda: (r := rs.predict(http, "A")).json()["version"] == info.version and r)
            assert rs.matches(resp, v2)
            serve = open_store(serve_url)
            for write in (lambda: serve.publish("A", v1.blob), lambda: serve.rollback("A", 1),
                          lambda: serve.delete("A")):
                with pytest.raises(ResidualStoreError, match="(?i)denied|permission"):
                    write()
            serve.close()
            assert train.info("A").version == info.version
            assert rs.matches(rs.predict(http, "A"), v2)
    finally:
        train.close()
        redis_srv.stop()
