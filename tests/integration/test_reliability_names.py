"""Issue 6, point 8: hostile task names.

`../`, `%2e%2e`, NUL, 10 kB, Unicode, a symlink planted in the directory store pointing at a task
outside it: every route answers 404 or 422 (never 2xx or 5xx); nothing is opened outside the
store (a Python audit hook in this process, which hosts the server, sees every open); no Redis
command touches a key outside the prefix (MONITOR on a private redis-server); no metric series
is created for any of these names.
"""
from __future__ import annotations

import os
import sys
import threading
from urllib.parse import quote

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

HOSTILE = ["../Good", "..%2fGood", "%2e%2e", "%2e%2e%2fGood", "..", ".", "Good\x00", "Good%00",
           "A" * 10240, "Ärger", "Good\u202e", "\u0130stanbul", "/etc/passwd", "Good/../Good",
           "Good/", " Good", "Good\r\nX-Evil: 1", "Evil", "tasks", "-Good", "*", "Good?x=1"]
KINDS = ["predict", "v2_model", "v2_ready", "v2_infer", "admin_load", "admin_unload"]


def _call(http: httpx.Client, kind: str, name: str) -> httpx.Response:
    path = quote(name, safe="").replace(".", "%2E")  # or the client would resolve "." itself
    png = {"content": rs.IMAGES[0], "headers": {"content-type": "image/png"}}
    if kind == "predict":
        return http.post("/predict", params={"task": name}, **png)
    if kind == "v2_model":
        return http.get(f"/v2/models/{path}")
    if kind == "v2_ready":
        return http.get(f"/v2/models/{path}/ready")
    if kind == "v2_infer":
        return http.post(f"/v2/models/{path}/infer", json={"inputs": []})
    return http.post(f"/admin/tasks/{path}/{kind.split('_')[1]}", headers=rs.admin())


class OpenAudit:
    """Records the paths this process opens or lists while `active` (sys.addaudithook cannot
    be removed, so the hook stays installed and idle afterwards)."""

    _installed: OpenAudit | None = None

    def __init__(self):
        self.paths: list[str] = []
        self.active = False
        self._lock = threading.Lock()

    @classmethod
    def get(cls) -> OpenAudit:
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event in ("open", "os.listdir", "os.scandir") and args and \
                isinstance(args[0], (str, bytes, os.PathLike)):
            with self._lock:
                self.paths.append(os.fsdecode(args[0]))


@pytest.fixture(scope="module")
def directory_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    root, outside = tmp / "store", tmp / "outside"
    open_store(str(root)).publish("Good", rs.make_version("Good", 1).blob)
    open_store(str(outside)).publish("Evil", rs.make_version("Evil", 2).blob)
    os.symlink(outside / "tasks" / "Evil", root / "tasks" / "Evil")  # planted by someone
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0, admin_token=rs.ADMIN_TOKEN,
                      reconcile_interval=0.2)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "Good").status_code == 200
        yield srv, http, outside


def test_hostile_names_on_the_directory_store(directory_server):
    srv, http, outside = directory_server
    audit = OpenAudit.get()
    audit.paths.clear()
    audit.active = True
    try:
        answers = {(kind, name): _call(http, kind, name) for kind in KINDS for name in HOSTILE}
        rs.wait_for("two reconcile rounds", lambda: len(audit.paths) > 4)  # the store was read
    finally:
        audit.active = False
    bad = {k: r.status_code for k, r in answers.items() if r.status_code not in (404, 422)}
    assert not bad, bad
    assert all(set(r.json()) == {"error", "detail"} for r in answers.values())
    outside_real = os.path.realpath(outside)
    opened_outside = [p for p in audit.paths if os.path.realpath(p).startswith(outside_real)]
    assert not opened_outside, opened_outside
    assert rs.task_label_values(http.get("/metrics").text) <= {"Good"}
    assert [t["task"] for t in http.get("/tasks").json()["tasks"]] == ["Good"]
    assert rs.predict(http, "Good").status_code == 200


def _monitor(r, prefix: str, commands: list[str], stop: threading.Event) -> None:
    with r.monitor() as m:
        for item in m.listen():
            commands.append(item["command"])
            if stop.is_set():
                return


KEYED = {"GET", "SET", "HGETALL", "HGET", "SMEMBERS", "EXISTS", "INCR", "DEL", "HSET", "SADD",
         "SUBSCRIBE", "PUBLISH", "TYPE", "STRLEN", "GETRANGE", "SCAN", "KEYS"}


def test_hostile_names_on_redis_touch_no_key_outside_the_prefix(tmp_path):
    redis_srv = rs.PrivateRedis(tmp_path).start()
    prefix = "uda-names:"
    url = f"{redis_srv.url}?prefix={prefix}"
    try:
        open_store(url).publish("Good", rs.make_version("Good", 1).blob)
        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0, admin_token=rs.ADMIN_TOKEN,
                          reconcile_interval=0.2)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert rs.predict(http, "Good").status_code == 200
            commands: list[str] = []
            stop = threading.Event()
            watcher = threading.Thread(target=_monitor, args=(redis_srv.client(), prefix, commands, stop),
                                       daemon=True)
            watcher.start()
            rs.wait_for("MONITOR to start", lambda: commands or rs.predict(http, "Good") and commands)
            answers = {(kind, name): _call(http, kind, name).status_code for kind in KINDS for name in HOSTILE}
            n = len(commands)
            rs.wait_for("a reconcile round after the hostile requests",
                        lambda: any("SMEMBERS" in c.upper() for c in commands[n:]))
            stop.set()
            redis_srv.client().ping()  # one more command so the monitor loop sees `stop`
            watcher.join(timeout=30)
            bad = {k: v for k, v in answers.items() if v not in (404, 422)}
            assert not bad, bad
            assert rs.task_label_values(http.get("/metrics").text) <= {"Good"}
        assert commands
        for command in commands:
            words = command.split(" ")
            if words[0].upper() in KEYED and len(words) > 1:
                assert words[1].startswith(prefix), command
            for name in HOSTILE:
                if name not in ("Good", "Evil", "tasks") and len(name) > 2:
                    assert name not in command, command
    finally:
        redis_srv.stop()
