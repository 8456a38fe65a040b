"""The batcher's scheduling policy with a fake clock: oldest first, batch bound, preference for
the applied task, the starvation bound, the queue bound and expiry."""
from __future__ import annotations

import threading

import pytest
import torch

from server.batcher import Batcher, PendingRequest
from server.errors import QueueFull, ShuttingDown


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, max_batch=4, max_wait_ms=50.0, max_queue=100, streams=1) -> Batcher:
    return Batcher(max_batch, max_wait_ms / 1000, max_queue, clock=clock, streams=streams)


def submit(b: Batcher, clock: Clock, task: str, n: int = 1, timeout: float = 30.0) -> PendingRequest:
    r = PendingRequest(task, torch.zeros(n, 3, 2, 2), clock(), clock() + timeout, resolve=lambda v: None)
    b.submit(r)
    return r


def everyone(task: str) -> bool:
    return True


def test_oldest_first_and_max_batch():
    clock = Clock()
    b = make(clock, max_batch=4)
    for t in ("A", "B", "A", "A", "B"):
        submit(b, clock, t, n=2)
        clock.t += 0.001
    task, batch = b.pick(None, everyone)
    assert task == "A" and [r.n for r in batch] == [2, 2]  # 4 images: the bound
    assert b.depth == 3
    task, batch = b.pick(None, everyone)
    assert task == "B" and len(batch) == 2  # B's head is now the oldest
    task, batch = b.pick(None, everyone)
    assert task == "A" and len(batch) == 1
    assert b.pick(None, everyone) is None and b.depth == 0


def test_with_two_streams_a_batch_takes_half_of_what_is_queued():
    clock = Clock()
    b = make(clock, max_batch=32, streams=2)
    for n in (1,) * 14 + (3,):
        submit(b, clock, "A", n=n)
        clock.t += 0.001
    submit(b, clock, "B")
    _, batch = b.pick(None, everyone)
    assert sum(r.n for r in batch) == 9  # ceil(18 / 2): the other stream gets the rest
    _, batch = b.pick(None, everyone)
    assert sum(r.n for r in batch) == 5  # ceil(9 / 2), whole requests in arrival order: the 3 waits
    _, batch = b.pick("A", lambda t: t == "B")
    assert len(batch) == 1
    for _ in range(3):
        submit(b, clock, "C", n=2)
    _, batch = b.pick(None, lambda t: t == "C")
    assert [r.n for r in batch] == [2, 2]  # ceil(9 / 2) = 4 of C's 6 images, never over


def test_with_two_streams_a_tasks_few_requests_stay_in_one_batch():
    clock = Clock()
    b = make(clock, max_batch=32, streams=2)
    for task in ("A", "A", "B", "C", "D", "E"):
        submit(b, clock, task)
        clock.t += 0.001
    task, batch = b.pick(None, everyone)
    assert task == "A" and len(batch) == 2  # share ceil(6 / 2) = 3: no second swap to A


def test_not_ready_tasks_are_skipped():
    clock = Clock()
    b = make(clock)
    submit(b, clock, "cold")
    clock.t += 0.01
    submit(b, clock, "hot")
    task, _ = b.pick(None, lambda t: t != "cold")
    assert task == "hot"
    assert b.pending_tasks() == ["cold"]


def test_applied_task_is_preferred_only_within_max_wait():
    clock = Clock()
    b = make(clock, max_batch=1, max_wait_ms=50)
    submit(b, clock, "B")  # t=0
    clock.t = 0.030
    submit(b, clock, "A")  # A waited 30 ms less than B: within 50 ms, stay on A
    task, _ = b.pick("A", everyone)
    assert task == "A"
    clock.t = 0.040
    submit(b, clock, "A")  # B has now waited 40 ms longer than this A: still within
    task, _ = b.pick("A", everyone)
    assert task == "A"
    clock.t = 0.060
    submit(b, clock, "A")  # 60 ms beyond: B preempts
    task, _ = b.pick("A", everyone)
    assert task == "B"


def test_starvation_bound_under_a_flood():
    """A hot task flooding faster than it is served: at every decision where the cold request
    has waited more than max_wait beyond the hot task's oldest request, the cold one is served."""
    clock = Clock()
    b = make(clock, max_batch=2, max_wait_ms=20, max_queue=1000)
    cold, current, served = None, None, False
    for step in range(400):
        clock.t = step * 0.001
        submit(b, clock, "hot")
        if step == 100:
            cold = submit(b, clock, "cold")
        if step % 5:  # the model finishes a batch every 5 ms
            continue
        must_switch = cold is not None and not served and \
            cold.enqueued < b.oldest("hot") - 0.020
        task, batch = b.pick(current, everyone)
        current = task
        if cold in batch:
            served = True
        elif must_switch:
            pytest.fail(f"cold request passed over at t={clock.t:.3f} beyond the bound")
    assert served


def test_starvation_bound_with_a_shallow_hot_queue():
    clock = Clock()
    b = make(clock, max_batch=8, max_wait_ms=20)
    current = "hot"
    cold = None
    for step in range(200):
        clock.t = step * 0.001
        submit(b, clock, "hot")  # one hot request per ms, served every ms: the head is fresh
        if step == 50:
            cold = submit(b, clock, "cold")
        task, batch = b.pick(current, everyone)
        current = task
        if cold is not None and cold in batch:
            waited = clock.t - cold.enqueued
            assert waited <= 0.020 + 0.001 + 1e-9
            return
    pytest.fail("the cold request was never served")


def test_queue_bound_and_close():
    clock = Clock()
    b = make(clock, max_queue=2)
    submit(b, clock, "A")
    submit(b, clock, "B")
    with pytest.raises(QueueFull, match="--max-queue 2"):
        submit(b, clock, "A")
    b.pick(None, everyone)
    submit(b, clock, "A")  # room again
    b.close()
    with pytest.raises(ShuttingDown):
        submit(b, clock, "A")
    assert b.depth == 2  # queued work stays for the drain


def test_expired_requests_are_removed():
    clock = Clock()
    b = make(clock)
    short = submit(b, clock, "A", timeout=1.0)
    keep = submit(b, clock, "A", timeout=10.0)
    clock.t = 2.0
    assert b.take_expired() == [short]
    assert b.depth == 1
    task, batch = b.pick(None, everyone)
    assert batch == [keep]


def test_a_cancelled_request_leaves_the_queue_and_its_slot_at_once():
    clock = Clock()
    b = make(clock, max_queue=2)
    gone = submit(b, clock, "A")
    other = submit(b, clock, "B")
    b.cancel(gone)
    assert b.depth == 1 and b.pending_tasks() == ["B"]
    submit(b, clock, "B")  # the slot is free again: no QueueFull
    b.cancel(gone)  # twice, or after it was taken: nothing more happens
    task, batch = b.pick(None, everyone)
    assert (task, batch[0]) == ("B", other)
    b.cancel(other)  # taken into a batch already: it runs, the depth stays right
    assert b.depth == 0


def test_a_notification_between_the_look_and_the_wait_is_not_lost():
    """The model thread reads `changes`, finds nothing to run, then waits: a submit landing in
    between must end the wait at once, not after the full timeout."""
    clock = Clock()
    b = make(clock)
    woke = threading.Event()

    def model_thread(seen):
        b.wait(60.0, seen)
        woke.set()

    seen = b.changes
    assert b.pick(None, everyone) is None  # nothing queued yet
    submit(b, clock, "A")  # before the thread got to wait
    thread = threading.Thread(target=model_thread, args=(seen,), daemon=True)
    thread.start()
    assert woke.wait(10), "the submit before the wait was lost: the thread sleeps its full timeout"

    woke.clear()  # nothing new since `changes` was read: it sleeps until the next notification
    thread = threading.Thread(target=model_thread, args=(b.changes,), daemon=True)
    thread.start()
    assert not woke.wait(0.2)
    b.notify()
    assert woke.wait(10)


def test_a_pinned_version_waits_in_its_own_queue_and_never_shares_a_batch():
    clock = Clock()
    b = make(clock, max_batch=8)

    class Version:  # what the batcher reads of a pinned TaskVersion
        version = 1

    served = submit(b, clock, "A")
    clock.t += 0.001
    pinned = PendingRequest("A", torch.zeros(1, 3, 2, 2), clock(), clock() + 30, lambda v: None, Version())
    b.submit(pinned)
    assert sorted(b.pending_tasks()) == ["A", "A@1"] and b.head("A@1") is pinned
    assert b.pick(None, everyone) == ("A", [served])
    b.cancel(pinned)  # its client left: the queue goes with it
    assert b.pending_tasks() == [] and b.depth == 0 and b.head("A@1") is None
