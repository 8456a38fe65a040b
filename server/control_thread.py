"""One thread that owns some state: every change to it is a message the thread applies, in order.

Other threads never write the owned state; they post a message and, when they need the change
applied before they go on, wait for it. Nothing then needs a lock around the state, and the
order of changes is the order of the mailbox, whatever thread each came from.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Reply:
    """A waiting poster's: set once its message was applied, with what applying it raised."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


class ControlThread:
    """Applies the messages posted to it with `apply` (a bound method of the state's owner), one
    at a time, on its own daemon thread, started with the first message."""

    def __init__(self, name: str, apply: Callable[[Any], None]):
        self.name = name
        # Weak: an owner nobody stops (a test's, a tool's) would otherwise be kept alive, with
        # everything it holds, by its own idle thread. Once the owner is collected, the thread
        # gets the end-of-mailbox mark below and ends.
        self._apply = weakref.WeakMethod(apply)
        self._mailbox: queue.SimpleQueue = queue.SimpleQueue()
        weakref.finalize(apply.__self__, self._mailbox.put, None)
        self._lock = threading.Lock()  # guards starting and closing the thread, not the state
        self._thread: threading.Thread | None = None
        self._closed = False

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, message: Any, wait: bool = False) -> None:
        """Queue `message`; with `wait`, return once it was applied, raising what applying it
        raised. Posted from the control thread itself (a callback of something it started ran
        at once), it is only queued: the thread cannot wait for itself, and applying it in the
        middle of another message would break the one-at-a-time order. Once closed: dropped
        (the owner stopped; nothing changes any more)."""
        reply = _Reply() if wait and not self.on_thread() else None
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=_run, args=(self._mailbox, self._apply),
                                                 name=self.name, daemon=True)
                self._thread.start()
            self._mailbox.put((message, reply))
        if reply is not None:
            reply.done.wait()
            if reply.error is not None:
                raise reply.error

    def close(self, timeout: float) -> None:
        """Apply what was posted before, then end the thread (waiting at most `timeout` s)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # nothing is queued after the end mark
            thread = self._thread
            self._mailbox.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _run(mailbox: queue.SimpleQueue, apply_ref: weakref.WeakMethod) -> None:
    # No reference to the owner while waiting for a message (see ControlThread.__init__).
    while (item := mailbox.get()) is not None:
        message, reply = item
        apply = apply_ref()
        try:
            if apply is not None:
                apply(message)
        except BaseException as e:  # the thread survives anything; a waiter gets the error
            if reply is None:
                logger.exception("applying %s failed", type(message).__name__)
            else:
                reply.error = e
        finally:
            if reply is not None:
                reply.done.set()
        del item, message, reply, apply
