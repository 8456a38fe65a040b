"""uda_client (sync and asyncio) and `uda-predict` against a live uda-serve (uvicorn on
loopback, directory store): answers equal the offline reference for paths, bytes and PIL images,
batches keep their order, the server's errors come back typed, and 429/503 are retried after
the Retry-After of a real HTTP hop in front of the server."""
from __future__ import annotations

import asyncio
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from residual_store import BaseSpec, to_bytes
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer, free_port
from server.synthetic import image_bytes, random_residual, reference_scores
from uda_client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    InvalidParameters,
    Overloaded,
    Timeout,
    Unavailable,
    UnknownTask,
    UnsupportedImage,
)
from uda_client import cli

pytestmark = pytest.mark.integration

CLASSES = ["circle", "square", "triangle", "star"]
IMAGES = [image_bytes(s, fmt=f) for s, f in ((1, "PNG"), (2, "JPEG"), (3, "WEBP"), (4, "PNG"), (5, "JPEG"))]


@pytest.fixture(scope="module")
def base():
    return BaseSpec("uda-tiny-vit").build()


@pytest.fixture(scope="module")
def residual(base):
    return random_residual(base, "shapes", CLASSES, base_model="uda-tiny-vit", seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, residual):
    root = tmp_path_factory.mktemp("store")
    open_store(str(root)).publish("shapes", to_bytes(residual))
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(root), port=0, max_batch=4)
    with EmbeddedServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, blob in enumerate(IMAGES):
        path = folder / f"img{i}.{Image.open(io.BytesIO(blob)).format.lower()}"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def expected(base, residual, blobs) -> torch.Tensor:
    t = eval_transform(32)
    return reference_scores(base, residual, torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]))


def assert_result_matches(predictions, scores, k):
    assert len(predictions) == scores.shape[0]
    values, indices = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    for prediction, row_v, row_i in zip(predictions, values.tolist(), indices.tolist()):
        assert [c.index for c in prediction.top_k] == row_i
        assert [c.label for c in prediction.top_k] == [CLASSES[i] for i in row_i]
        assert all(abs(c.score - v) <= 1e-5 for c, v in zip(prediction.top_k, row_v))
        assert prediction.label == CLASSES[row_i[0]]


def test_predict_by_path_bytes_and_pil_image(server, base, residual, image_files):
    pil = Image.open(io.BytesIO(IMAGES[0])).convert("RGB")
    with Client(server.url) as uda:
        by_path = uda.predict(image_files[1], task="shapes", top_k=2)
        by_bytes = uda.predict(IMAGES[1], task="shapes", top_k=2)
        by_pil = uda.predict(pil, task="shapes", top_k=3)
        assert [t.name for t in uda.tasks()] == ["shapes"] and uda.ready()
    assert by_path.task == "shapes" and by_path.version == 1 and by_path.latency_ms > 0
    assert set(by_path.timing) == {"queue_ms", "swap_ms", "model_ms"}
    assert by_path.predictions[0].image == "img1.jpeg" and by_bytes.predictions[0].image == "image[0]"
    assert_result_matches(by_path.predictions, expected(base, residual, IMAGES[1:2]), 2)
    assert_result_matches(by_bytes.predictions, expected(base, residual, IMAGES[1:2]), 2)
    assert_result_matches(by_pil.predictions, expected(base, residual, IMAGES[:1]), 3)  # PNG: lossless


def test_batches_keep_the_images_order(server, base, residual, image_files):
    with Client(server.url) as uda:
        results = uda.predict_batches(image_files, task="shapes", top_k=4, batch_size=2)
    assert [len(r.predictions) for r in results] == [2, 2, 1]
    predictions = [p for r in results for p in r.predictions]
    assert [p.image for p in predictions] == [p.name for p in image_files]
    assert_result_matches(predictions, expected(base, residual, IMAGES), 4)


def test_async_client_predicts_concurrently_in_order(server, base, residual):
    async def run():
        async with AsyncClient(server.url) as uda:
            one = await uda.predict(IMAGES[2], task="shapes")
            many = await uda.predict_batches(IMAGES, task="shapes", top_k=2, batch_size=1, concurrency=3)
            with pytest.raises(UnknownTask):
                await uda.predict(IMAGES[0], task="nope")
            return one, many

    one, many = asyncio.run(run())
    assert_result_matches(one.predictions, expected(base, residual, IMAGES[2:3]), 5)
    assert_result_matches([r.predictions[0] for r in many], expected(base, residual, IMAGES), 2)


def test_server_errors_are_typed_and_carry_error_and_detail(server):
    with Client(server.url, retries=0) as uda:
        with pytest.raises(UnknownTask) as e:
            uda.predict(IMAGES[0], task="ghost")
        assert e.value.status == 404 and e.value.error == "unknown task" and "GET /tasks" in e.value.detail
        with pytest.raises(BadRequest) as e:
            uda.predict(IMAGES[0][:60], task="shapes")  # a PNG cut short
        assert e.value.error == "corrupt image"
        with pytest.raises(UnsupportedImage):
            uda.predict(b"GIF89a" + bytes(64), task="shapes")
        with pytest.raises(InvalidParameters) as e:
            uda.predict(IMAGES[0], task="shapes", top_k=5000)
        assert "top_k" in e.value.detail
        with pytest.raises(ValueError):
            uda.predict(IMAGES[0], task="shapes", top_k=0)
        with pytest.raises(TypeError):
            uda.predict(3.5, task="shapes")


class _Throttle(http.server.ThreadingHTTPServer):
    """An HTTP hop in front of uda-serve (as a proxy that sheds load would be): answers the
    first `refusals` requests itself with `status` and Retry-After, forwards the rest."""

    daemon_threads = True

    def __init__(self, upstream: str, status: int, refusals: int, retry_after: str):
        self.upstream, self.status, self.refusals, self.retry_after = upstream, status, refusals, retry_after
        self.seen: list[float] = []
        super().__init__(("127.0.0.1", 0), _ThrottleHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ThrottleHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        hop: _Throttle = self.server
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        hop.seen.append(time.monotonic())
        if len(hop.seen) <= hop.refusals:
            payload = json.dumps({"error": "overloaded", "detail": "shedding load, retry later"}).encode()
            self.send_response(hop.status)
            self.send_header("Retry-After", hop.retry_after)
        else:
            resp = httpx.post(hop.upstream + self.path, content=body,
                              headers={"content-type": self.headers["content-type"]}, timeout=60)
            payload = resp.content
            self.send_response(resp.status_code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def throttle(server, request):
    status, refusals, retry_after = request.param
    hop = _Throttle(server.url, status, refusals, retry_after)
    thread = threading.Thread(target=hop.serve_forever, daemon=True)
    thread.start()
    yield hop
    hop.shutdown()
    hop.server_close()


@pytest.mark.parametrize("throttle", [(429, 2, "1"), (503, 1, "1")], indirect=True, ids=["429", "503"])
def test_429_and_503_are_retried_after_retry_after(throttle, base, residual):
    with Client(throttle.url, retries=3, backoff=0.01) as uda:
        result = uda.predict(IMAGES[0], task="shapes", top_k=1)
    assert_result_matches(result.predictions, expected(base, residual, IMAGES[:1]), 1)
    assert len(throttle.seen) == throttle.refusals + 1
    gaps = [b - a for a, b in zip(throttle.seen, throttle.seen[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps  # Retry-After: 1, not the 0.01 s backoff


@pytest.mark.parametrize("throttle", [(429, 1, "1")], indirect=True)
def test_the_async_client_retries_after_retry_after_too(throttle, base, residual):
    async def run():
        async with AsyncClient(throttle.url, retries=2, backoff=0.01) as uda:
            return await uda.predict(IMAGES[1], task="shapes", top_k=2)

    result = asyncio.run(run())
    assert_result_matches(result.predictions, expected(base, residual, IMAGES[1:2]), 2)
    assert len(throttle.seen) == 2 and throttle.seen[1] - throttle.seen[0] >= 0.95


@pytest.mark.parametrize("throttle", [(429, 10, "7"), (503, 10, "0")], indirect=True, ids=["429", "503"])
def test_retries_spent_raise_the_servers_error(throttle):
    with Client(throttle.url, retries=1, backoff=0.01, max_wait=0.2) as uda:
        with pytest.raises((Overloaded, Unavailable)) as e:
            uda.predict(IMAGES[0], task="shapes")
    assert e.value.status == throttle.status and e.value.detail == "shedding load, retry later"
    assert e.value.retry_after == float(throttle.retry_after)
    assert len(throttle.seen) == 2  # max_wait capped the 7 s Retry-After


def test_timeouts_and_refused_connections_are_typed():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5, retries=2) as uda:
            with pytest.raises(Timeout):
                uda.predict(IMAGES[0], task="shapes")
        assert time.monotonic() - started < 1.5  # timeouts are not retried by default
    with Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as uda:
        with pytest.raises(ConnectionFailed):
            uda.tasks()


def test_uda_predict_prints_top_k_per_image(server, base, residual, image_files, capsys):
    paths = [str(p) for p in image_files[:3]]
    code = cli.main([*paths, "--task", "shapes", "--url", server.url, "--top-k", "2", "--batch-size", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 3
    scores = expected(base, residual, IMAGES[:3])
    for line, path, row in zip(out, paths, scores):
        assert line.startswith(f"{path}: {CLASSES[int(row.argmax())]} {float(row.max()):.3f}, ")
    assert cli.main([paths[0], "--task", "shapes", "--url", server.url, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == paths[0] and len(record["top_k"]) == 4


def test_uda_predict_errors_are_one_readable_line(server, image_files, tmp_path):
    exe = Path(sys.executable).with_name("uda-predict")
    run = subprocess.run([str(exe), str(image_files[0]), "--task", "ghost", "--url", server.url],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("uda-predict: error: HTTP 404 unknown task: unknown task 'ghost'")
    assert len(run.stderr.strip().splitlines()) == 1
    run = subprocess.run([str(exe), str(tmp_path / "missing.jpg"), "--task", "shapes", "--top-k", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"uda-predict: error: --top-k 0 must be >= 1; "
                                  f"{tmp_path / 'missing.jpg'}: no such file")
