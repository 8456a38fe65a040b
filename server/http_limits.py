"""Connection limits uvicorn's h11 protocol lacks: a header timeout, a connection cap, a floor
on body chunk sizes, and accept errors logged once per interval.

- Header timeout: a connection must send a whole request head within --header-timeout seconds
  of opening (or of its previous answer), else it is closed. uvicorn's keep-alive timer is
  cancelled by any byte, so a slowloris client sending one header byte at a time held its
  connection (and a descriptor) forever.
- Connection cap (--limit-concurrency): a connection beyond it is closed as soon as it is
  accepted, before a byte is read, so descriptors stay for the store, the model and /readyz;
  uvicorn itself answers 503 to requests beyond it.
- Body chunk floor: a request body that arrives in more than MIN_BODY_EVENTS pieces averaging
  under MIN_BODY_CHUNK bytes (1-byte chunked encoding: 9 MB cost 15 s of CPU in h11) is answered
  400 and its connection closed.
- Accept errors (EMFILE and the like) are logged once per ACCEPT_LOG_INTERVAL_S with a count,
  not once per accept attempt with a traceback.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

MIN_BODY_EVENTS = 1024  # body pieces of one request before their average size is checked
MIN_BODY_CHUNK = 256  # bytes: the floor on that average
ACCEPT_LOG_INTERVAL_S = 10.0
_FD_RESERVE = 128  # descriptors kept for the store, the model's files and threads, logging
_MAX_AUTO_CONNECTIONS = 4096


def auto_connection_cap() -> int:
    """--limit-concurrency 0: the soft descriptor limit less a reserve, within 16..4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_AUTO_CONNECTIONS
    return max(16, min(_MAX_AUTO_CONNECTIONS, soft - _FD_RESERVE))


class _FlooredConnection(h11.Connection):
    """h11's connection, refusing a body sent in too many tiny pieces."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._pieces = 0
        self._bytes = 0

    def next_event(self):  # noqa: ANN201 - h11's own signature
        event = super().next_event()
        if isinstance(event, h11.Request):
            self._pieces = self._bytes = 0
        elif isinstance(event, h11.Data):
            self._pieces += 1
            self._bytes += len(event.data)
            if self._pieces > MIN_BODY_EVENTS and self._bytes < MIN_BODY_CHUNK * self._pieces:
                raise h11.RemoteProtocolError(
                    f"request body sent in {self._pieces} pieces of {self._bytes // self._pieces} "
                    f"bytes on average: send chunks of at least {MIN_BODY_CHUNK} bytes")
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with this module's limits (set by `limited_h11`)."""

    header_timeout: float = 10.0
    connection_cap: int = 1024

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.conn = _FlooredConnection(h11.SERVER, self.conn._max_incomplete_event_size)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.connection_cap:
            _rate_limited_warning("connection cap", "connections beyond --limit-concurrency %d "
                                  "closed at once", self.connection_cap)
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # IDLE: h11 has not seen a whole request head since the timer was armed.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


def limited_h11(header_timeout: float, connection_cap: int) -> type[LimitedH11Protocol]:
    """The protocol class uvicorn.Config(http=...) instantiates, with these limits."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"header_timeout": header_timeout, "connection_cap": connection_cap})


_last_logged: dict[str, tuple[float, int]] = {}


def _rate_limited_warning(key: str, msg: str, *args: Any) -> None:
    """`msg` at most once per ACCEPT_LOG_INTERVAL_S for `key`, with how often it happened."""
    now = time.monotonic()
    last, count = _last_logged.get(key, (0.0, 0))
    if now - last < ACCEPT_LOG_INTERVAL_S:
        _last_logged[key] = (last, count + 1)
        return
    _last_logged[key] = (now, 0)
    suffix = f" ({count} more since the last report)" if count else ""
    logger.warning(msg + suffix, *args)


def install_accept_error_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Accept failures (out of descriptors or memory) once per interval; asyncio logs each
    attempt with a traceback, and a server out of descriptors retries every second for good."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" in str(context.get("message", "")):
            _rate_limited_warning("accept", "cannot accept connections: %s", context.get("exception"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
