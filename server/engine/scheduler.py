"""Torch-free request scheduling: waiting and running queues, live-slot accounting, prefill budget.

The engine drives one scheduler from its event loop (a single thread), once per step:

1. `admit()` moves waiting entries, oldest first, into free live slots. The engine then looks each
   one up in the cache and records how many prompt tokens the restored checkpoint already covers
   (`Entry.num_computed`).
2. `plan()` splits the per-step prefill token budget over running entries that still have prompt
   tokens to prefill (oldest first: chunked prefill), and lists the entries that decode one token.
   While any entry decodes, the budget is `decode_prefill_budget`: a step that carries both is as long
   as its prefill, so a smaller chunk then keeps the decoders' inter-token latency steady (their p99
   near their p50), at the cost of more steps for a long prompt that arrives meanwhile.
3. After the step, `advance(entry, n)` records prefilled tokens, and `finish` / `abort` free slots.

Fairness: admission is strictly FCFS (an entry is never overtaken by a younger one), and the oldest
prefilling entry is served first, so nothing starves. A slot is owned by exactly one running entry;
`finish` and `abort` return it to the free pool immediately and idempotently.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int  # live slots (max_num_seqs)
    prefill_budget: int = 2048  # prompt tokens prefilled per step, over all entries
    decode_prefill_budget: int | None = None  # the same while some entry decodes (None: prefill_budget)
    # While some entry decodes, prompts with at most this many tokens left are prefilled whole beyond the
    # decode budget, up to `prefill_budget` in all (0: none). On the GPU such short rows share one eager
    # pass whose launch cost does not grow with them, so splitting a burst of them over several steps
    # multiplies that cost and every one's time to first token.
    short_prompt: int = 0

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.prefill_budget < 1:
            raise ValueError("prefill_budget must be >= 1")
        if self.decode_prefill_budget is not None and self.decode_prefill_budget < 1:
            raise ValueError("decode_prefill_budget must be >= 1")
        if self.short_prompt < 0:
            raise ValueError("short_prompt must be >= 0")

    def budget(self, decoding: bool) -> int:
        """Prompt tokens a step may prefill, with or without entries decoding in it."""
        if decoding and self.decode_prefill_budget is not None:
            return self.decode_prefill_budget
        return self.prefill_budget


@dataclass(eq=False)
class Entry:
    """The scheduler's view of one request."""

    request_id: str
    num_prompt: int  # prompt tokens
    num_computed: int = 0  # prompt tokens whose state is in the slot (restored or prefilled)
    slot: int | None = None
    seq_no: int = field(default=-1, repr=False)  # arrival order, set by `add`

    @property
    def remaining_prefill(self) -> int:
        return self.num_prompt - self.num_computed

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.remaining_prefill <= 0


@dataclass(frozen=True)
class PrefillChunk:
    entry: Entry
    start: int  # prompt position where the chunk starts (== entry.num_computed when planned)
    end: int  # exclusive


@dataclass(frozen=True)
class StepPlan:
    prefills: tuple[PrefillChunk, ...]
    decodes: tuple[Entry, ...]

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Waiting queue (FCFS) + running set, over a fixed pool of live slots."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: OrderedDict[str, Entry] = OrderedDict()
        self._running: dict[str, Entry] = {}  # insertion order = admission order
        self._free: list[int] = list(range(config.max_slots))  # min-heap: lowest slot first
        self._counter = itertools.count()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_tokens(self) -> int:
        """Prompt tokens of the waiting entries (before any cache hit)."""
        return sum(e.num_prompt for e in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def running(self) -> list[Entry]:
        return list(self._running.values())

    def waiting(self) -> list[Entry]:
        return list(self._waiting.values())

    def get(self, request_id: str) -> Entry | None:
        return self._running.get(request_id) or self._waiting.get(request_id)

    # ---- mutations -------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        if entry.num_prompt < 1:
            raise ValueError("a request needs at least one prompt token")
        if self.get(entry.request_id) is not None:
            raise ValueError(f"duplicate request id {entry.request_id!r}")
        entry.seq_no = next(self._counter)
        entry.slot = None
        self._waiting[entry.request_id] = entry

    def admit(self) -> list[Entry]:
        """Move the oldest waiting entries into free slots while the prefill backlog allows.

        The head of the queue is admitted whenever a slot is free and nothing else is waiting to be
        prefilled, however long its prompt: admission never skips the head, so nothing starves.
        """
        admitted: list[Entry] = []
        backlog = self._prefill_backlog()
        while self._waiting and self._free:
            if backlog > 0 and backlog >= self.config.prefill_budget:
                break
            _, entry = self._waiting.popitem(last=False)
            entry.slot = heapq.heappop(self._free)
            self._running[entry.request_id] = entry
            backlog += entry.remaining_prefill
            admitted.append(entry)
        return admitted

    def plan(self) -> StepPlan:
        """Prefill chunks (oldest first, within the step's budget) and the entries that decode. Once the
        budget is spent, a step with decodes still takes whole short prompts (`short_prompt`) while the
        step's prefill stays within `prefill_budget`."""
        cfg = self.config
        decodes = [e for e in self._running.values() if e.decoding]
        budget = cfg.budget(decoding=bool(decodes))
        short = cfg.short_prompt if decodes else 0
        used = 0
        prefills: list[PrefillChunk] = []
        for entry in self._running.values():
            left = entry.remaining_prefill
            if entry.decoding:
                continue
            if used < budget:
                n = min(left, budget - used)
            elif left <= short and used + left <= cfg.prefill_budget:
                n = left
            else:
                continue
            prefills.append(PrefillChunk(entry, entry.num_computed, entry.num_computed + n))
            used += n
        return StepPlan(tuple(prefills), tuple(decodes))

    def advance(self, entry: Entry, num_tokens: int) -> None:
        """Record `num_tokens` more prompt tokens in the entry's slot."""
        if num_tokens < 0 or entry.num_computed + num_tokens > entry.num_prompt:
            raise ValueError("advance beyond the prompt")
        entry.num_computed += num_tokens

    def finish(self, request_id: str) -> Entry | None:
        """Free a running entry's slot (a no-op for an unknown or already-freed id)."""
        entry = self._running.pop(request_id, None)
        if entry is not None:
            self._release(entry)
        return entry

    def abort(self, request_id: str) -> Entry | None:
        """Remove an entry wherever it is; its slot, if any, is free on return."""
        entry = self._waiting.pop(request_id, None)
        if entry is not None:
            return entry
        return self.finish(request_id)

    # ---- internals -------------------------------------------------------------------------

    def _prefill_backlog(self) -> int:
        return sum(max(e.remaining_prefill, 0) for e in self._running.values())

    def _release(self, entry: Entry) -> None:
        assert entry.slot is not None
        heapq.heappush(self._free, entry.slot)
        entry.slot = None
