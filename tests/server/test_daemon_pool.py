"""The background pool of store reads: results and errors reach their futures, and closing it
waits a bounded time for a call that hangs (a store read that never returns)."""
from __future__ import annotations

import threading

import pytest

from server.daemon_pool import DaemonPool


def test_results_and_errors_reach_the_futures():
    pool = DaemonPool(2, "test-pool")
    ok = pool.submit(lambda a, b: a + b, 2, 3)

    def boom():
        raise ValueError("bad file")

    failed = pool.submit(boom)
    assert ok.result(10) == 5
    with pytest.raises(ValueError, match="bad file"):
        failed.result(10)
    pool.close(10)
    assert pool.submit(lambda: None).cancelled()  # closed: refused, the way queued calls are


def test_close_gives_up_on_a_hung_call_and_cancels_the_queued_ones():
    pool = DaemonPool(1, "test-pool")
    hang, started = threading.Event(), threading.Event()

    def hung():
        started.set()
        hang.wait(60)

    running = pool.submit(hung)
    assert started.wait(10)
    queued = pool.submit(lambda: "never")
    pool.close(0.2)  # returns although the call still runs
    assert not running.done() and queued.cancelled()
    assert all(t.daemon for t in pool._threads)  # nor does it hold the process's exit
    hang.set()
    assert running.result(10) is None
