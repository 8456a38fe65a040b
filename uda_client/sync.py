"""The synchronous client."""
from __future__ import annotations

import time
from typing import Any

import httpx

from uda_client import _protocol as p
from uda_client.images import ImageInput
from uda_client.results import PredictResult, TaskInfo


class Client:
    """uda-serve at `url`. `timeout` (seconds) bounds each attempt; see RetryPolicy for retries.

        with Client("http://127.0.0.1:8000", timeout=10, retries=5) as uda:
            uda.predict(["a.jpg", "b.png"], task="Ar2Cl", top_k=3)
    """

    def __init__(self, url: str = p.DEFAULT_URL, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_wait: float = 30.0, retry_timeouts: bool = False,
                 headers: dict[str, str] | None = None):
        self.url = url.rstrip("/")
        self.policy = p.RetryPolicy(retries, backoff, max_wait, retry_timeouts)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def predict(self, images: ImageInput | list | tuple, task: str, top_k: int = 5) -> PredictResult:
        """The top-k classes of each image (one path, bytes or PIL image, or a list) in one request."""
        call, names = p.predict_call(images, task, top_k)
        started = time.perf_counter()
        return p.predict_result(self._send(call), names, started)

    def predict_batches(self, images: list, task: str, top_k: int = 5,
                        batch_size: int = 16) -> list[PredictResult]:
        """Many images, `batch_size` per request (at most the server's --max-batch), in order."""
        return [self.predict(batch, task, top_k) for batch in p.chunks(list(images), batch_size)]

    def tasks(self) -> list[TaskInfo]:
        return p.task_list(self._send(p.Call("GET", "/tasks")))

    def ready(self) -> bool:
        """Whether /readyz answers 200 (no retries: a probe)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _send(self, call: p.Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return p.check(self._http.request(call.method, call.path, **call.kwargs()))
            except Exception as error:  # noqa: BLE001: sorted by p.retryable, re-raised typed
                if attempt >= self.policy.retries or not p.retryable(error, self.policy):
                    raise p.final_error(error, self.url) from error
                time.sleep(self.policy.delay(attempt, getattr(error, "retry_after", None)))
                attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
