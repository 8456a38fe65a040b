"""The task record's transitions (server/task_state.py) without threads: explicit cases, then
hypothesis' stateful testing over sequences of publishes, store resets, offers, loads and checks
that end (in any order), deletes and refused loads."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server.task_state import (
    Refusal,
    Refused,
    Removed,
    Stage,
    StageFailed,
    Superseded,
    Switched,
    TaskRecord,
    TaskVersion,
    deleted,
    load_refused,
    offered,
    seen,
    staged,
)


def tv(version: int, sha: str) -> TaskVersion:
    return TaskVersion("T", version, sha, {})


def offer(rec, candidate, *, reset=False, mismatch=None, warm=False, pinned=False, can_check=True):
    return offered(rec, candidate, reset=reset, mismatch=mismatch, warm=warm, pinned=pinned,
                   can_check=can_check)


def test_a_new_cold_task_is_served_at_once_and_a_pinned_one_is_loaded_first():
    rec, actions = offer(TaskRecord(), tv(1, "a"))
    assert rec.served == tv(1, "a") and actions == [Switched(None, tv(1, "a"))]
    rec, actions = offer(TaskRecord(), tv(1, "a"), pinned=True)
    assert rec.served is None and rec.staging == (1, "a")
    assert actions == [Stage(tv(1, "a"), check=False)]


def test_a_new_version_is_loaded_when_warm_and_checked_when_cold():
    served = TaskRecord(served=tv(1, "a"))
    assert offer(served, tv(2, "b"), warm=True)[1] == [Stage(tv(2, "b"), check=False)]
    assert offer(served, tv(2, "b"))[1] == [Stage(tv(2, "b"), check=True)]
    rec, actions = offer(served, tv(2, "b"), can_check=False)  # no checker: switched unchecked
    assert rec.served == tv(2, "b") and actions == [Switched(tv(1, "a"), tv(2, "b"))]


def test_old_news_renumbering_and_a_newer_version_staging():
    rec = TaskRecord(served=tv(3, "a"))
    assert seen(rec, 2, "x") == (rec, False)
    assert seen(rec, 3, "x") == (rec, False)
    renumbered, news = seen(rec, 4, "a")  # a rollback to the served bytes
    assert not news and renumbered.served == tv(4, "a")
    loading = TaskRecord(served=tv(3, "a"), staging=(5, "c"))
    assert seen(loading, 4, "b") == (loading, False)
    assert seen(loading, 5, "c") == (loading, False)
    assert seen(loading, 6, "d") == (loading, True)
    assert seen(rec, 1, "z", reset=True) == (rec, True)  # the store was reset: v1 is news


def test_a_base_mismatch_is_refused_once_and_counted_here():
    rec, actions = offer(TaskRecord(served=tv(1, "a")), tv(2, "b"), mismatch="other base")
    refusal = Refusal(2, "b", "base_mismatch", "other base")
    assert rec.served == tv(1, "a") and rec.refusal == refusal
    assert actions == [Refused(tv(2, "b"), refusal, counted=False)]
    assert offer(rec, tv(2, "b"))[1] == []  # the same (version, sha) again: nothing
    after_reset = offer(rec, tv(2, "c"), reset=True, warm=True)[1]
    assert after_reset == [Stage(tv(2, "c"), check=False)]  # same number, other bytes: news


def test_staging_ends():
    rec, _ = offer(TaskRecord(served=tv(1, "a")), tv(2, "b"), warm=True)
    ok, actions = staged(rec, tv(2, "b"), 0)
    assert ok == TaskRecord(served=tv(2, "b")) and actions == [Switched(tv(1, "a"), tv(2, "b"))]
    bad = Refusal(2, "b", "integrity", "sha differs")
    refused, actions = staged(rec, tv(2, "b"), 0, refusal=bad)
    assert refused == TaskRecord(served=tv(1, "a"), refusal=bad)
    assert actions == [Refused(tv(2, "b"), bad, counted=True)]
    blip, actions = staged(rec, tv(2, "b"), 0, error="store down")
    assert blip == TaskRecord(served=tv(1, "a")) and actions == [StageFailed(tv(2, "b"), "store down")]
    assert staged(rec, tv(2, "b"), 0, cancelled=True) == (TaskRecord(served=tv(1, "a")), [])
    newer = TaskRecord(served=tv(3, "c"))
    assert staged(newer, tv(2, "b"), 0) == (newer, [Superseded(tv(2, "b"))])


def test_a_delete_beats_a_load_begun_before_it():
    rec, _ = offer(TaskRecord(served=tv(1, "a")), tv(2, "b"), warm=True)
    gone, actions = deleted(rec)
    assert gone == TaskRecord(generation=1) and actions == [Removed(tv(1, "a"))]
    assert staged(gone, tv(2, "b"), 0) == (gone, [])


def test_a_refused_load_of_the_served_version_takes_the_task_out_of_service():
    rec = TaskRecord(served=tv(1, "a"))
    bad = Refusal(1, "a", "invalid_format", "not a residual")
    out, actions = load_refused(rec, tv(1, "a"), bad)
    assert out == TaskRecord(refusal=bad)
    assert actions == [Refused(tv(1, "a"), bad, counted=True, unpublished=True)]
    assert load_refused(rec, tv(0, "z"), bad) == (rec, [])  # moved on meanwhile
    assert offer(out, tv(1, "a")) == (out, [])  # never loaded again


SHAS = ("a", "b", "c", "d")
OUTCOMES = ("ok", "refused", "error", "cancelled")


class TaskRecordMachine(RuleBasedStateMachine):
    """One task, a store that publishes and resets, and the catalog's events in any order."""

    def __init__(self):
        super().__init__()
        self.rec = TaskRecord()
        self.store: list[tuple[int, str]] = []  # (version, sha) the store holds, oldest first
        self.next_version = 1
        self.in_flight: list[tuple[TaskVersion, int, bool]] = []  # (candidate, generation, reset)

    def _served_moves(self, before: TaskRecord, after: TaskRecord, reset: bool, actions) -> None:
        """The served version changes only by a Switched action, never backwards outside a
        store reset, and is never the recorded refusal."""
        if before.served != after.served and after.served is not None and before.served is not None:
            renumbered = before.served.sha256 == after.served.sha256
            assert renumbered or any(isinstance(a, Switched) for a in actions)
            assert after.served.version >= before.served.version or reset

    @rule(sha=st.sampled_from(SHAS))
    def publish(self, sha):
        self.store.append((self.next_version, sha))
        self.next_version += 1

    @rule()
    def store_reset(self):
        self.store, self.next_version = [], 1

    @precondition(lambda self: self.store)
    @rule(warm=st.booleans(), pinned=st.booleans(), can_check=st.booleans(), mismatch=st.booleans())
    def offer_current(self, warm, pinned, can_check, mismatch):
        version, sha = self.store[-1]
        served = self.rec.served
        reset = served is not None and version < served.version
        before = self.rec
        refused_before = before.refusal is not None and (before.refusal.version, before.refusal.sha256) == (version, sha)
        self.rec, actions = offered(before, tv(version, sha), reset=reset,
                                    mismatch="other base" if mismatch else None,
                                    warm=warm and served is not None, pinned=pinned,
                                    can_check=can_check)
        if refused_before:  # a refused (version, sha256) is never loaded again
            assert actions == [] and self.rec == before
        if served is not None:  # nothing a store says (reset or not) unpublishes a served task
            assert self.rec.served is not None
        self._served_moves(before, self.rec, reset, actions)
        for action in actions:
            if isinstance(action, Stage):
                self.in_flight.append((action.candidate, before.generation, reset))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES))
    def stage_ends(self, data, outcome):
        i = data.draw(st.integers(0, len(self.in_flight) - 1))
        candidate, generation, reset = self.in_flight.pop(i)
        before = self.rec
        refusal = (Refusal(candidate.version, candidate.sha256, "integrity", "bad")
                   if outcome == "refused" else None)
        self.rec, actions = staged(before, candidate, generation, cancelled=outcome == "cancelled",
                                   refusal=refusal, error="blip" if outcome == "error" else None,
                                   reset=reset)
        if generation != before.generation:  # a delete beats anything begun before it
            assert actions == [] and self.rec.served == before.served
            assert self.rec.refusal == before.refusal
        if outcome != "ok":
            assert self.rec.served == before.served
        self._served_moves(before, self.rec, reset, actions)

    @rule()
    def delete(self):
        before = self.rec
        self.rec, actions = deleted(before)
        assert self.rec == TaskRecord(generation=before.generation + 1)
        assert actions == [Removed(before.served)]

    @precondition(lambda self: self.rec.served is not None)
    @rule()
    def served_load_refused(self):
        served = self.rec.served
        self.rec, actions = load_refused(self.rec, served, Refusal(served.version, served.sha256,
                                                                    "invalid_format", "bad"))
        assert self.rec.served is None and self.rec.refusal.sha256 == served.sha256
        assert actions == [Refused(served, self.rec.refusal, counted=True, unpublished=True)]

    @invariant()
    def served_is_never_the_refused_version(self):
        served, refusal = self.rec.served, self.rec.refusal
        if served is not None and refusal is not None:
            assert (served.version, served.sha256) != (refusal.version, refusal.sha256)

    @invariant()
    def staging_is_a_load_in_flight(self):
        if self.rec.staging is not None:
            assert any((c.version, c.sha256) == self.rec.staging and g == self.rec.generation
                       for c, g, _ in self.in_flight)


TaskRecordMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30,
                                               deadline=None)
TestTaskRecord = TaskRecordMachine.TestCase
