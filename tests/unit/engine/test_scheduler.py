"""The torch-free scheduler: slot accounting, FCFS admission, prefill budget, abort."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.engine.scheduler import Entry, Scheduler, SchedulerConfig


def _make(
    max_slots: int = 2, budget: int = 16, decode_budget: int | None = None, short: int = 0
) -> Scheduler:
    config = SchedulerConfig(
        max_slots, prefill_budget=budget, decode_prefill_budget=decode_budget, short_prompt=short
    )
    return Scheduler(config)


def _run_step(s: Scheduler) -> None:
    """Admit, then prefill the planned chunks as the engine would."""
    s.admit()
    for chunk in s.plan().prefills:
        s.advance(chunk.entry, chunk.end - chunk.start)


def test_admission_is_fcfs_and_bounded_by_slots() -> None:
    s = _make(max_slots=2, budget=1000)
    for i in range(4):
        s.add(Entry(f"r{i}", num_prompt=5))
    assert [e.request_id for e in s.admit()] == ["r0", "r1"]
    assert s.num_free_slots == 0 and s.num_waiting == 2
    assert s.admit() == []
    s.finish("r1")
    assert [e.request_id for e in s.admit()] == ["r2"]


def test_finish_and_abort_free_the_slot_immediately_and_idempotently() -> None:
    s = _make(max_slots=1)
    s.add(Entry("a", num_prompt=3))
    (a,) = s.admit()
    assert a.slot == 0 and s.num_free_slots == 0
    assert s.abort("a") is a
    assert s.num_free_slots == 1 and a.slot is None
    assert s.abort("a") is None and s.finish("a") is None
    assert s.num_free_slots == 1


def test_abort_of_a_waiting_entry_removes_it() -> None:
    s = _make(max_slots=1)
    s.add(Entry("a", num_prompt=3))
    s.add(Entry("b", num_prompt=3))
    s.admit()
    s.abort("b")
    assert s.num_waiting == 0
    s.finish("a")
    assert s.admit() == []


def test_prefill_budget_is_split_oldest_first_and_chunked() -> None:
    s = _make(max_slots=3, budget=10)
    s.add(Entry("a", num_prompt=7))
    s.add(Entry("b", num_prompt=7))
    s.admit()
    plan = s.plan()
    assert [(c.entry.request_id, c.start, c.end) for c in plan.prefills] == [("a", 0, 7), ("b", 0, 3)]
    for c in plan.prefills:
        s.advance(c.entry, c.end - c.start)
    plan = s.plan()
    assert [(c.entry.request_id, c.start, c.end) for c in plan.prefills] == [("b", 3, 7)]
    assert [e.request_id for e in plan.decodes] == ["a"]


def test_the_decode_budget_caps_prefill_only_while_someone_decodes() -> None:
    s = _make(max_slots=3, budget=10, decode_budget=4)
    s.add(Entry("a", num_prompt=8))
    s.admit()
    (chunk,) = s.plan().prefills
    assert (chunk.start, chunk.end) == (0, 8)  # nobody decodes: the whole budget
    s.advance(chunk.entry, 8)
    s.add(Entry("b", num_prompt=9))
    s.add(Entry("c", num_prompt=9))
    s.admit()
    plan = s.plan()
    assert [e.request_id for e in plan.decodes] == ["a"]
    assert [(c.entry.request_id, c.start, c.end) for c in plan.prefills] == [("b", 0, 4)]
    s.finish("a")
    plan = s.plan()  # the decoder left: back to the full budget
    assert [(c.entry.request_id, c.start, c.end) for c in plan.prefills] == [("b", 0, 9), ("c", 0, 1)]


def test_short_prompts_ride_along_whole_beyond_the_decode_budget() -> None:
    s = _make(max_slots=6, budget=10, decode_budget=4, short=3)
    s.add(Entry("a", num_prompt=2))
    _run_step(s)  # a decodes from now on
    for rid, n in [("long", 5), ("big", 4), ("s1", 3), ("s2", 1)]:
        s.add(Entry(rid, num_prompt=n))
    assert [e.request_id for e in s.admit()] == ["long", "big", "s1"]  # backlog 12 >= 10: s2 waits
    plan = s.plan()
    # the decode budget goes to the oldest (a chunk of the long prompt); beyond it only whole short prompts
    got = [(c.entry.request_id, c.start, c.end) for c in plan.prefills]
    assert got == [("long", 0, 4), ("s1", 0, 3)]
    s.finish("a")
    plan = s.plan()  # nobody decodes: the full budget, chunked oldest first as ever
    assert [(c.entry.request_id, c.end - c.start) for c in plan.prefills] == [
        ("long", 5),
        ("big", 4),
        ("s1", 1),
    ]


def test_a_decode_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_prefill_budget"):
        SchedulerConfig(max_slots=1, prefill_budget=8, decode_prefill_budget=0)


def test_cached_prefix_shortens_the_prefill() -> None:
    s = _make(max_slots=1, budget=100)
    s.add(Entry("a", num_prompt=50))
    (a,) = s.admit()
    a.num_computed = 45  # the engine restored a checkpoint at position 45
    (chunk,) = s.plan().prefills
    assert (chunk.start, chunk.end) == (45, 50)


def test_admission_waits_for_the_prefill_backlog_but_never_skips_the_head() -> None:
    s = _make(max_slots=4, budget=8)
    s.add(Entry("long", num_prompt=100))
    s.add(Entry("short", num_prompt=2))
    assert [e.request_id for e in s.admit()] == ["long"]  # backlog 100 >= budget: stop
    assert s.admit() == []
    for _ in range(20):
        _run_step(s)
    assert s.get("short") is not None and s.get("short").slot is not None  # type: ignore[union-attr]


def test_duplicate_and_empty_requests_are_rejected() -> None:
    s = _make()
    s.add(Entry("a", num_prompt=1))
    with pytest.raises(ValueError):
        s.add(Entry("a", num_prompt=1))
    with pytest.raises(ValueError):
        s.add(Entry("b", num_prompt=0))


def test_no_starvation_under_continuous_arrivals() -> None:
    s = _make(max_slots=2, budget=4)
    s.add(Entry("first", num_prompt=30))
    for step in range(200):
        s.add(Entry(f"x{step}", num_prompt=3))
        _run_step(s)
        for e in s.running():
            if e.decoding and e.request_id != "first":
                s.finish(e.request_id)
        first = s.get("first")
        if first is not None and first.decoding:
            return
    pytest.fail("the first request never finished its prefill")


class SlotMachine(RuleBasedStateMachine):
    """Random add / admit / step / finish / abort sequences never leak or double-book a slot."""

    @initialize(
        max_slots=st.integers(1, 5),
        budget=st.integers(1, 20),
        decode_budget=st.none() | st.integers(1, 20),
        short=st.integers(0, 8),
    )
    def setup(self, max_slots: int, budget: int, decode_budget: int | None, short: int) -> None:
        self.s = _make(max_slots, budget, decode_budget, short)
        self.max_slots = max_slots
        self.next_id = 0
        self.known: list[str] = []
        self.admitted_order: list[int] = []

    @rule(prompt=st.integers(1, 40))
    def add(self, prompt: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.s.add(Entry(rid, num_prompt=prompt))
        self.known.append(rid)

    @rule()
    def admit(self) -> None:
        for e in self.s.admit():
            self.admitted_order.append(e.seq_no)

    @rule(cached=st.integers(0, 40))
    def restore(self, cached: int) -> None:
        for e in self.s.running():
            if e.num_computed == 0:
                e.num_computed = min(cached, e.num_prompt - 1)

    @rule()
    def step(self) -> None:
        for c in self.s.plan().prefills:
            assert c.start == c.entry.num_computed and c.end > c.start
            self.s.advance(c.entry, c.end - c.start)

    @precondition(lambda self: bool(self.known))
    @rule(i=st.integers(0, 1000), use_abort=st.booleans())
    def remove(self, i: int, use_abort: bool) -> None:
        rid = self.known[i % len(self.known)]
        if use_abort:
            self.s.abort(rid)
        else:
            self.s.finish(rid)

    @invariant()
    def slots_are_conserved(self) -> None:
        running = self.s.running()
        slots = [e.slot for e in running]
        assert None not in slots
        assert len(set(slots)) == len(slots)
        assert len(running) + self.s.num_free_slots == self.max_slots
        assert all(0 <= sl < self.max_slots for sl in slots if sl is not None)
        assert all(e.slot is None for e in self.s.waiting())

    @invariant()
    def admission_is_fcfs(self) -> None:
        assert self.admitted_order == sorted(self.admitted_order)

    @invariant()
    def plan_respects_the_budget(self) -> None:
        plan, cfg = self.s.plan(), self.s.config
        budget = cfg.budget(decoding=bool(plan.decodes))
        used = 0
        for (
            c
        ) in plan.prefills:  # chunks within the step's budget, then whole short prompts within the full one
            if used < budget:
                assert used + c.end - c.start <= budget
            else:
                assert plan.decodes and c.end == c.entry.num_prompt and c.end - c.start <= cfg.short_prompt
                assert used + c.end - c.start <= cfg.prefill_budget
            used += c.end - c.start
        assert not {id(c.entry) for c in plan.prefills} & {id(e) for e in plan.decodes}

    def teardown(self) -> None:
        for rid in self.known:
            self.s.abort(rid)
        assert self.s.num_free_slots == self.max_slots
        assert self.s.num_running == 0 and self.s.num_waiting == 0


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
