"""uvicorn's server wired to the runtime's shutdown, for `uda-serve` and EmbeddedServer alike.

The first SIGTERM or Ctrl-C drains: new work is refused at once (uvicorn closes its listening
socket only on its next tick) and what is queued is answered within --grace-period. A second
Ctrl-C is uvicorn's force quit: it stops waiting for connections, and the queue is dropped too,
instead of being computed for clients that are about to lose their connections anyway.
"""
from __future__ import annotations

import asyncio

import uvicorn

from server.config import ServeConfig
from server.http_limits import auto_connection_cap, install_accept_error_handler, limited_h11
from server.runtime import ServeRuntime


class DrainingServer(uvicorn.Server):
    def __init__(self, app, config: ServeConfig, runtime: ServeRuntime, log_level: str):
        # h11: uvicorn's httptools protocol tells only the newest of pipelined requests that
        # their connection closed, so the ones before it would be computed for nobody
        # (server/disconnects.py); h11 tells every one.
        # The limits uvicorn lacks (header timeout, connection cap, chunk floor) are in
        # server/http_limits.py, on top of its h11 protocol.
        cap = config.limit_concurrency or auto_connection_cap()
        super().__init__(_LimitedConfig(
            limited_h11(config.header_timeout, cap),
            app, host=config.host, port=config.port, http="h11", log_level=log_level,
            limit_concurrency=cap, timeout_keep_alive=config.keep_alive_timeout,
            timeout_graceful_shutdown=config.grace_period, lifespan="on"))
        self.runtime = runtime
        self.on_bound = None  # called with the port once listening (uda-serve prints the URL)

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        install_accept_error_handler(self._loop)
        await super().startup(sockets=sockets)
        listening = [sock for server in getattr(self, "servers", []) for sock in server.sockets]
        if listening and self.on_bound is not None:
            self.on_bound(listening[0].getsockname()[1])  # the real port, also for --port 0

    def handle_exit(self, sig, frame) -> None:
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)
        if self.force_exit:
            self.runtime.begin_stop(grace=0.0)
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stop_taking_connections)

    def _stop_taking_connections(self) -> None:
        """The first steps of uvicorn's shutdown, now instead of on its next tick (up to 0.1 s
        later): stop listening, close idle keep-alive connections, and let busy ones close
        after their answer. In between, a proxy's new or reused connection would reach a
        server that answers every request 503, and HAProxy 2.6 retries a 503 on the same
        replica; a refused or closed connection it retries on another (deploy/haproxy)."""
        for server in getattr(self, "servers", []):
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()

    def serve_then_stop(self) -> None:
        """Serve until told to exit, then release the runtime (the lifespan shutdown already
        did unless the exit was forced)."""
        self.run()
        self.runtime.stop(grace=0.0 if self.force_exit else None)


class _LimitedConfig(uvicorn.Config):
    """uvicorn's h11 (`http="h11"`), as its subclass with server/http_limits.py's limits."""

    def __init__(self, protocol: type, *args, **kw):
        super().__init__(*args, **kw)
        self._limited_protocol = protocol

    def load(self) -> None:
        super().load()
        self.http_protocol_class = self._limited_protocol
