"""/metrics of a live server counts inference only: metadata and readiness calls that name a
task stay out of uda_requests_total and the latency histogram; the served version of each task
and the process' own metrics are there (issue 19, item 6)."""
from __future__ import annotations

import base64

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from residual_store import BaseSpec, to_bytes
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import image_bytes, random_residual

pytestmark = pytest.mark.integration

TASK = "Meta"
IMAGE = image_bytes(5)


def samples(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def requests_of(values: dict, task: str) -> tuple[float, float]:
    """(uda_requests_total over all codes, latency histogram count) of `task`."""
    total = sum(v for (name, labels), v in values.items()
                if name == "uda_requests_total" and ("task", task) in labels)
    count = values.get(("uda_request_duration_seconds_count", frozenset({("task", task)})), 0.0)
    return total, count


def test_only_inference_is_counted_and_versions_are_exported(tmp_path):
    base = BaseSpec("uda-tiny-vit").build()
    store = open_store(str(tmp_path / "store"))
    store.publish(TASK, to_bytes(random_residual(base, TASK, ["a", "b"], base_model="uda-tiny-vit", seed=1)))
    store.publish(TASK, to_bytes(random_residual(base, TASK, ["a", "b"], base_model="uda-tiny-vit", seed=2)))
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(tmp_path / "store"), port=0)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        assert client.post(f"/predict?task={TASK}", content=IMAGE,
                           headers={"content-type": "image/png"}).status_code == 200
        before = samples(client)
        assert requests_of(before, TASK) == (1.0, 1.0)
        for path in (f"/v2/models/{TASK}", f"/v2/models/{TASK}/ready", f"/v2/models/{TASK}/versions/2",
                     f"/v2/models/{TASK}/versions/2/ready"):
            for _ in range(3):
                assert client.get(path).status_code == 200, path
        after = samples(client)
        assert requests_of(after, TASK) == (1.0, 1.0)
        assert after[("uda_task_version", frozenset({("task", TASK)}))] == 2.0
        # prometheus_client's process and platform collectors (process_* on Linux).
        assert after[("process_resident_memory_bytes", frozenset())] > 0
        assert after[("process_start_time_seconds", frozenset())] > 0
        assert any(name == "python_info" for name, _ in after)
        # One more inference is one more count: the check above is not blind.
        assert client.post(f"/v2/models/{TASK}/infer", json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "data": [base64.b64encode(IMAGE).decode()]}]}).status_code == 200
        assert requests_of(samples(client), TASK) == (2.0, 2.0)
