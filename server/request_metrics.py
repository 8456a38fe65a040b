"""ASGI middleware recording uda_requests_total and uda_request_duration_seconds per task.

A route marks its request with the task name (`request.state.uda_task`) only after the catalog
confirmed the task is published, so an unknown name never becomes a label value. The recording
happens after the response was sent, off the answer's critical path.
"""
from __future__ import annotations

import time
from collections.abc import Callable


class RequestMetricsMiddleware:
    def __init__(self, app, metrics, is_published: Callable[[str], bool]):
        self.app = app
        self.metrics = metrics
        self.is_published = is_published

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            task = scope.get("state", {}).get("uda_task")
            if task is not None and self.is_published(task):
                self.metrics.observe_request(task, status["code"], time.perf_counter() - t0)
