"""The asyncio client: the same calls as Client, awaited."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from uda_client import _protocol as p
from uda_client.images import ImageInput
from uda_client.results import PredictResult, TaskInfo


class AsyncClient:
    """uda-serve at `url`, from asyncio code.

        async with AsyncClient("http://127.0.0.1:8000") as uda:
            result = await uda.predict(image_bytes, task="Ar2Cl")
    """

    def __init__(self, url: str = p.DEFAULT_URL, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_wait: float = 30.0, retry_timeouts: bool = False,
                 headers: dict[str, str] | None = None):
        self.url = url.rstrip("/")
        self.policy = p.RetryPolicy(retries, backoff, max_wait, retry_timeouts)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)

    async def predict(self, images: ImageInput | list | tuple, task: str, top_k: int = 5) -> PredictResult:
        call, names = p.predict_call(images, task, top_k)
        started = time.perf_counter()
        return p.predict_result(await self._send(call), names, started)

    async def predict_batches(self, images: list, task: str, top_k: int = 5, batch_size: int = 16,
                              concurrency: int = 4) -> list[PredictResult]:
        """Many images, `batch_size` per request and at most `concurrency` requests in flight;
        the results in the images' order."""
        if concurrency < 1:
            raise ValueError(f"concurrency {concurrency} must be >= 1")
        gate = asyncio.Semaphore(concurrency)

        async def one(batch: list) -> PredictResult:
            async with gate:
                return await self.predict(batch, task, top_k)

        return list(await asyncio.gather(*(one(b) for b in p.chunks(list(images), batch_size))))

    async def tasks(self) -> list[TaskInfo]:
        return p.task_list(await self._send(p.Call("GET", "/tasks")))

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def _send(self, call: p.Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return p.check(await self._http.request(call.method, call.path, **call.kwargs()))
            except Exception as error:  # noqa: BLE001: sorted by p.retryable, re-raised typed
                if attempt >= self.policy.retries or not p.retryable(error, self.policy):
                    raise p.final_error(error, self.url) from error
                await asyncio.sleep(self.policy.delay(attempt, getattr(error, "retry_after", None)))
                attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
