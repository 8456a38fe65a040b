"""What reaches the log and the clients: escaped, unrepeated, without paths.

- Repeated warnings once per interval: a store follower polls several times a second, and one
  damaged index.json (or a store that stays away) logged the same warning six times a second,
  forever. The first one is logged; the same message (same logger, same text) again within
  REPEAT_INTERVAL_S is dropped and counted, and the next one logged says how many were.
- Control characters escaped: metadata of a residual (a `base_model` with newlines and ANSI
  escapes) and parts of requests reach log lines; unescaped they could forge a line ("admin
  token is ...") or repaint a terminal. `escape` writes them as \\n, \\x1b...
- `public_detail`: an error detail for a client, escaped and with absolute paths cut to their
  last two parts (a refusal named the store's directory).
"""
from __future__ import annotations

import logging
import re
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


# Loggers whose messages carry residual metadata, store contents or request parts.
ESCAPED_LOGGERS = ("server.catalog", "server.cache", "server.loader", "server.runtime",
                   "server.worker", "server.http_errors", "server.app", *FOLLOWER_LOGGERS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FILE_URL = re.compile(r"file://(/[^\s'\"]*)")
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(/[^\s'\"/:]+)+")


def escape(text: str) -> str:
    """`text` with control characters written as escapes (\\n, \\x1b): one line, no ANSI."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _last_parts(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    return ".../" + "/".join(parts[-2:]) if len(parts) > 2 else path


def public_detail(text: str) -> str:
    """An error detail fit for an unauthenticated client: escaped, no absolute paths."""
    text = _FILE_URL.sub(lambda m: "file://" + _last_parts(m.group(1)), escape(text))
    return _ABS_PATH.sub(lambda m: _last_parts(m.group()), text)


class EscapeFilter(logging.Filter):
    """Escapes control characters in the final text of every record of its loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


_filter = RepeatFilter()
_escape = EscapeFilter()


def install_log_filters() -> None:
    """Install both filters on their loggers (once per process)."""
    for names, flt in ((FOLLOWER_LOGGERS, _filter), (ESCAPED_LOGGERS, _escape)):
        for name in names:
            logger = logging.getLogger(name)
            if flt not in logger.filters:
                logger.addFilter(flt)
