"""`--streams 2`: two model threads, each over its own replica of the base, share one queue.

Both streams serve at once (one stream held mid-batch does not stop the other), answers under
many interleaved clients equal each task's offline reference, both replicas' weights come back
bit-identical, and torch's thread setting is split while serving and put back at stop.
"""
from __future__ import annotations

import concurrent.futures
import threading

import httpx
import pytest
import reliability_support as rs
import torch

from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.runtime import ServeRuntime

pytestmark = pytest.mark.integration

TASKS = ("A", "B", "C")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    return str(root), rs.publish_versions(str(root), TASKS, first_seed=40)


def threads_of_a_new_thread() -> int:
    """torch's intra-op threads as a thread started now sees them (the setting is per thread,
    and new threads take the last value set)."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def config(root: str, **kw) -> ServeConfig:
    return ServeConfig(model=rs.MODEL, pretrained="random", store=root, port=0, streams=2, max_batch=4,
                       admin_token=rs.ADMIN_TOKEN, **kw)


def test_two_streams_serve_at_once_and_answer_exactly(published):
    root, versions = published
    threads_before = threads_of_a_new_thread()
    with EmbeddedServer(config(root)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        runtime = srv.runtime
        assert len(runtime.engines) == len(runtime.workers) == 2
        assert runtime.threads_per_stream == max(1, threads_before // 2)
        # Each model thread holds its share; any other thread starting torch now runs it on one
        # core, so no OpenMP team but the model threads' exists (server/torch_threads.py).
        assert [w.cores_in_use for w in runtime.workers] == [runtime.threads_per_stream] * 2
        assert threads_of_a_new_thread() == 1
        first, second = runtime.engines
        assert first.flat.buffer.data_ptr() != second.flat.buffer.data_ptr()
        assert first.fingerprint == second.fingerprint

        # Stream 0 held inside a batch: requests of other tasks still get answers from stream 1.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            with first._lock:
                futures = [pool.submit(rs.predict, http, task) for task in ("A", "B", "C", "B")]
                done, _ = concurrent.futures.wait(futures, timeout=30,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                assert done, "no answer while one stream was held: the other stream did not serve"
            for task, future in zip(("A", "B", "C", "B"), futures):
                resp = future.result(timeout=60)
                assert resp.status_code == 200, resp.text
                assert rs.matches(resp, versions[task])

        jobs = [(task, i % len(rs.IMAGES)) for i, task in enumerate(TASKS * 20)]

        def call(job):
            task, image = job
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return task, image, rs.predict(c, task, image)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            for task, image, resp in pool.map(call, jobs):
                assert resp.status_code == 200, resp.text
                assert rs.matches(resp, versions[task], image)
        assert all(worker.batches > 0 for worker in runtime.workers)
        fp = http.get("/admin/fingerprint", headers=rs.admin()).json()
        assert fp["unchanged"] and fp["streams"] == [fp["expected"]] * 2
        assert fp["batches"] == sum(w.batches for w in runtime.workers)
        threads = {t.name for t in threading.enumerate()}
        assert {"uda-model-0", "uda-model-1"} <= threads
    assert threads_of_a_new_thread() == threads_before


def test_streams_are_refused_on_an_accelerator(published, monkeypatch):
    root, _ = published
    monkeypatch.setattr("server.runtime.resolve_device", lambda device: torch.device("cuda:0"))
    runtime = ServeRuntime(config(root, device="cuda"))
    with pytest.raises(ValueError, match="--streams 2 is for CPUs"):
        runtime.start()
    assert not runtime.engine.ready  # refused before building anything
