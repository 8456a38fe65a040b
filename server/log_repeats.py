"""Repeated warnings once per interval: a store follower polls several times a second, and one
damaged index.json (or a store that stays away) logged the same warning six times a second,
forever. The first one is logged; the same message (same logger, same text) again within
REPEAT_INTERVAL_S is dropped and counted, and the next one logged says how many were.
"""
from __future__ import annotations

import logging
import threading
import time

REPEAT_INTERVAL_S = 60.0
# The loggers of the stores, whose listings the followers repeat several times a second.
FOLLOWER_LOGGERS = ("residual_store.stores.directory", "residual_store.stores.redis_store")


class RepeatFilter(logging.Filter):
    """Lets a WARNING through once per `interval` seconds per text (other levels pass)."""

    def __init__(self, interval: float = REPEAT_INTERVAL_S):
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        now = time.monotonic()
        with self._lock:
            last, dropped = self._seen.get(key, (-self.interval, 0))
            if now - last < self.interval:
                self._seen[key] = (last, dropped + 1)
                return False
            if len(self._seen) > 10_000:  # bounded: old texts are forgotten
                self._seen.clear()
            self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.getMessage()} (and {dropped} times more in the last {self.interval:g} s)"
            record.args = None
        return True


_filter = RepeatFilter()


def quiet_repeats() -> None:
    """Install the filter on the followers' loggers (once per process)."""
    for name in FOLLOWER_LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
