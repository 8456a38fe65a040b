"""Only model threads run torch on several cores (server/torch_threads.py): a thread keeps the
count it asked for whatever other threads set afterwards, pools that touch torch run it on one
core, and threads starting torch later take the last value set."""
from __future__ import annotations

import threading

import torch

from server.daemon_pool import DaemonPool
from server.torch_threads import cores, one_core, use_cores


def on_new_thread(fn):
    seen: list = []
    thread = threading.Thread(target=lambda: seen.append(fn()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_keeps_its_cores_when_another_sets_a_different_count():
    before = cores()
    asked, changed, seen = threading.Event(), threading.Event(), []

    def model_thread():
        use_cores(2)  # before its first torch op: torch's per-thread setup must not undo it
        asked.set()
        changed.wait(10)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=model_thread)
    thread.start()
    try:
        asked.wait(10)
        one_core()  # the thread that built the base, after the model thread started
        changed.set()
        thread.join(10)
        assert seen == [2]
        assert on_new_thread(cores) == 1  # later threads take the last value set
    finally:
        use_cores(before)


def test_a_pool_with_the_one_core_initializer_runs_torch_on_one_core():
    before = cores()
    use_cores(2)
    pool = DaemonPool(2, "test-pool", initializer=one_core)
    try:
        assert [pool.submit(cores).result(10) for _ in range(4)] == [1] * 4
        assert cores() == 2  # the pool's threads set their own count, not this thread's
    finally:
        pool.close(10)
        use_cores(before)
