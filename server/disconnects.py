"""Dropping the work of a request whose client has hung up.

A client that times out and closes its connection (or is killed) leaves its request queued;
computing it would spend a batch on an answer nobody reads, and under overload that is what
keeps the queue full. Once a request's body is read, ASGI `receive()` blocks until the client
disconnects (uvicorn answers `http.disconnect` then, or once the response is complete), so a
watcher awaiting it tells when to give up: the work is cancelled, which takes the request out of
the queue (runtime.infer) before the model thread gets to it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.errors import ClientGone

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # a body already read: nothing more arrives but the disconnect


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientGone as soon as the client closed its connection (with
    `work` cancelled). Call it only after the request body has been read."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    for task in (job, watcher):  # one that fails as the other wins must not log "never retrieved"
        task.add_done_callback(_retrieve)
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # uvicorn answers 500 as soon as this task ends; ending before `work` has run its own
        # cancellation (which takes the request out of the queue) let a model thread freed in
        # between compute the queue nobody reads any more, as the drain test caught under load.
        job.cancel()
        await asyncio.wait({job})
        raise
    finally:
        watcher.cancel()
    if job.done():
        return job.result()
    if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
        return await job  # the connection cannot be watched: just wait for the answer
    job.cancel()
    await asyncio.wait({job})
    if not job.cancelled() and job.exception() is None:
        return job.result()  # it finished while it was being cancelled: nothing was wasted
    raise ClientGone("the client closed its connection before the answer was ready")
