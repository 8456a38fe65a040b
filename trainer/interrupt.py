"""Ctrl-C during training stops at a step boundary, so the checkpoint it leaves is exact.

A KeyboardInterrupt raised wherever Python happens to be could land between optimizer.step()
and the step counter's increment; a checkpoint saved then holds updated weights with the old
step, and --resume silently diverges from an uninterrupted run. Instead, the first SIGINT only
asks the loop to stop after the current step (it saves a checkpoint there and raises
KeyboardInterrupt); a second SIGINT interrupts at once and saves nothing, so the last
checkpoint written at a step boundary stays the one to resume from.
"""
from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)


class StepBoundaryInterrupt:
    """Context manager: while inside, `requested` turns True on the first SIGINT.

    Signal handlers can only be installed from the main thread; elsewhere Ctrl-C keeps its
    default behaviour (an immediate KeyboardInterrupt, no checkpoint).
    """

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> StepBoundaryInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; Python's own is the default
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: stopping after this step with a checkpoint "
                       "(Ctrl-C again to stop now; --resume then starts from the last checkpoint)")
