"""ControlThread (server/control_thread.py): one thread applies every message, in order; posters
that wait see their message applied, or its error; nothing deadlocks on the thread itself."""
from __future__ import annotations

import gc
import threading

import pytest

from server.control_thread import ControlThread


class Owner:
    """State owned by a ControlThread: a list of what was applied, and on which thread."""

    def __init__(self):
        self.applied: list[tuple[object, str]] = []
        self.control = ControlThread("test-control", self.apply)

    def apply(self, message) -> None:
        if isinstance(message, Exception):
            raise message
        if callable(message):
            message = message(self)
        self.applied.append((message, threading.current_thread().name))


def test_messages_from_many_threads_are_applied_in_order_on_the_one_thread():
    owner = Owner()
    posters = [threading.Thread(target=lambda i=i: [owner.control.post((i, n), wait=n % 2 == 0)
                                                    for n in range(50)]) for i in range(4)]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join(30)
    owner.control.close(30)
    assert {name for _, name in owner.applied} == {"test-control"}
    for i in range(4):
        assert [n for (p, n), _ in owner.applied if p == i] == list(range(50))


def test_a_waiting_poster_sees_its_message_applied_or_its_error():
    owner = Owner()
    owner.control.post("first", wait=True)
    assert owner.applied == [("first", "test-control")]
    with pytest.raises(ValueError, match="bad message"):
        owner.control.post(ValueError("bad message"), wait=True)
    owner.control.post(ValueError("not waited for"))  # logged; the thread goes on
    owner.control.post("after", wait=True)
    assert [m for m, _ in owner.applied] == ["first", "after"]
    owner.control.close(30)


def test_a_post_from_the_control_thread_itself_is_queued_not_waited_for():
    owner = Owner()

    def post_again(o):  # what a callback of something the thread started does
        o.control.post("posted from the thread", wait=True)
        return "posting"

    owner.control.post(post_again, wait=True)  # would never return if the thread waited on itself
    owner.control.close(30)
    assert [m for m, _ in owner.applied] == ["posting", "posted from the thread"]


def test_close_applies_what_came_before_and_drops_what_comes_after():
    owner = Owner()
    release = threading.Event()
    owner.control.post(lambda o: release.wait(30) and "held")
    owner.control.post("queued")
    closing = threading.Thread(target=owner.control.close, args=(30,))
    closing.start()
    release.set()
    closing.join(30)
    owner.control.post("after close", wait=True)  # returns at once: nobody applies it
    assert [m for m, _ in owner.applied] == ["held", "queued"]


def test_the_thread_of_an_owner_nobody_closes_ends_with_the_owner():
    owner = Owner()
    owner.control.post("something", wait=True)
    thread = owner.control._thread
    del owner
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()
