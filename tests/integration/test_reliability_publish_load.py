"""Issue 6, point 1: publish under load.

Clients loop on task A while v2 is published (and then rolled back to v1's bytes as v3): zero
5xx; every answer's version is one that was published and equals that version's reference
output; versions never go back, neither per client nor after any client saw the newer one.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

CLIENTS = 4


def test_publish_and_rollback_under_load(store_url):
    v1, v2 = rs.make_version("A", 1), rs.make_version("A", 2)
    store = open_store(store_url)
    store.publish("A", v1.blob)
    by_version = {1: v1}
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_url, port=0, reconcile_interval=0.3, max_batch=4)
    with EmbeddedServer(cfg) as srv:
        stop = threading.Event()
        answers: list[list[tuple[float, float, int, httpx.Response]]] = [[] for _ in range(CLIENTS)]

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                while not stop.is_set():
                    image = i % len(rs.IMAGES)
                    sent = time.monotonic()
                    resp = rs.predict(http, "A", image)
                    answers[i].append((sent, time.monotonic(), image, resp))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            rs.wait_for("traffic", lambda: all(len(a) >= 3 for a in answers))
            for version, blob in ((2, v2.blob), (3, None)):
                info = store.publish("A", blob) if blob else store.rollback("A", 1)
                assert info.version == version
                by_version[version] = v2 if blob else v1
                seen = lambda: all(a and a[-1][3].json().get("version") == version for a in answers)  # noqa: E731
                rs.wait_for(f"every client served v{version}", seen)
                counts = [len(a) for a in answers]
                rs.wait_for("more traffic", lambda: all(len(a) >= c + 2 for a, c in zip(answers, counts)))
        finally:
            stop.set()
            for t in threads:
                t.join()
        fp = srv.runtime.engine.fingerprint_now()
        assert fp == srv.runtime.engine.fingerprint
    store.close()

    flat = sorted((x for a in answers for x in a), key=lambda x: x[0])
    assert len(flat) >= CLIENTS * 12
    assert [r.status_code for *_, r in flat if r.status_code >= 500] == []
    assert {r.status_code for *_, r in flat} == {200}
    for a in answers:  # per client: versions only move forward
        versions = [r.json()["version"] for *_, r in a]
        assert versions == sorted(versions), versions
    for sent, _, image, resp in flat:  # each answer equals its version's reference
        version = resp.json()["version"]
        assert version in by_version
        assert rs.matches(resp, by_version[version], image), (version, resp.json())
    # once any answer of version v was received, no request sent afterwards got an older one
    for _, received, _, resp in flat:
        v = resp.json()["version"]
        later = [r.json()["version"] for s, _, _, r in flat if s > received]
        assert all(x >= v for x in later)
