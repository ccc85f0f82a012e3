"""Policy: where to capture, and which checkpoint copy a full tier gives up (plain Python, no torch).

Eviction is Greedy-Dual-Size-Frequency (GDSF): a copy in a tier has priority `H = L + freq * cost / size`,
where `cost` is the recompute it saves (its position, in tokens: restoring it skips that much prefill),
`size` its encoded bytes in that tier, `freq` how often it was used, and `L` the tier's clock, raised to the
`H` of each evicted copy. The lowest `H` that is not pinned goes first. `H` is recomputed (with the clock
of the moment) whenever the copy is captured, used or enters the tier, so the order is recency weighted
by recompute saved per byte and by use: a deep, recently used checkpoint outlives a shallow, stale one, and
a prefix many sessions and requests restore (a popular system prompt) outlives one-offs.

`freq` starts at 1 and counts hits: every lookup that leases the checkpoint and every capture deduplicated
into it (another session reaching the same tokens) adds 1, in every tier holding a copy. A copy entering a
tier (a spill to disk) keeps the `freq` it had in the tier it left.

Decay: each tier halves every `freq` it holds once it has evicted as many copies as it holds (one turnover
of the tier; at least one eviction), and re-ranks its copies with the halved `freq` (their `L` unchanged).
So `freq` is about the number of hits in the last turnover or two: a checkpoint that stays popular keeps a
high `freq`, and an old popular one that nobody uses any more halves towards 1 while the clock passes it,
then leaves like any other. Without a decay a checkpoint hit a million times would stay for about a million
evictions. Re-ranking costs O(n) per n evictions, amortized O(1) per eviction.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence


class GreedyDualSizeFrequency:
    """Priorities of the copies held in one tier; a heap with lazy invalidation.

    A heap entry `(h, seq, cid)` is live only while `seq` is the id's latest touch: refreshing an id with an
    unchanged priority (a hot checkpoint hit again and again with no eviction in between) leaves stale
    entries that compaction drops, so the heap stays within a constant factor of the ids held."""

    def __init__(self) -> None:
        self.clock = 0.0
        self._prio: dict[int, float] = {}
        self._base: dict[int, float] = {}  # cid -> the clock at its last touch
        self._unit: dict[int, float] = {}  # cid -> cost / size
        self._freq: dict[int, float] = {}
        self._latest: dict[int, int] = {}  # cid -> seq of its live heap entry
        self._heap: list[tuple[float, int, int]] = []
        self._seq = itertools.count()
        self._evictions = 0  # since the last decay

    def __contains__(self, cid: int) -> bool:
        return cid in self._prio

    def __len__(self) -> int:
        return len(self._prio)

    def touch(self, cid: int, cost: float, size: int, freq: float | None = None) -> None:
        """Insert or refresh `cid` (after a capture, or as it enters the tier); its `freq` stays (1 if new)
        unless given (a copy entering from another tier brings its own)."""
        self._freq[cid] = freq if freq is not None else self._freq.get(cid, 1.0)
        self._base[cid], self._unit[cid] = self.clock, cost / max(size, 1)
        self._push(cid)

    def hit(self, cid: int, cost: float, size: int) -> None:
        """`cid` was used (leased, or captured again): one more hit, and refreshed."""
        self._freq[cid] = self._freq.get(cid, 1.0) + 1.0
        self.touch(cid, cost, size)

    def remove(self, cid: int) -> None:
        for table in (self._prio, self._base, self._unit, self._freq, self._latest):
            table.pop(cid, None)

    def priority(self, cid: int) -> float:
        return self._prio[cid]

    def freq(self, cid: int) -> float:
        return self._freq.get(cid, 1.0)

    def victim(self, evictable: Callable[[int], bool]) -> int | None:
        """The lowest-priority evictable id (not removed: call `evicted` once it is gone)."""
        skipped: list[tuple[float, int, int]] = []
        found: int | None = None
        while self._heap:
            _h, seq, cid = self._heap[0]
            if self._latest.get(cid) != seq:
                heapq.heappop(self._heap)
                continue
            if evictable(cid):
                found = cid
                break
            skipped.append(heapq.heappop(self._heap))
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found

    def evicted(self, cid: int) -> None:
        """`cid` left the tier by eviction: advance the clock to its priority; decay after a turnover."""
        self.clock = max(self.clock, self._prio[cid])
        held = len(self._prio)  # this one included
        self.remove(cid)
        self._evictions += 1
        if self._evictions >= held:
            self._decay()

    def _push(self, cid: int) -> None:
        h, seq = self._base[cid] + self._freq[cid] * self._unit[cid], next(self._seq)
        self._prio[cid], self._latest[cid] = h, seq
        heapq.heappush(self._heap, (h, seq, cid))
        if len(self._heap) > 4 * len(self._prio) + 64:
            self._compact()

    def _decay(self) -> None:
        """Halve every `freq` (never below 1) and re-rank: `H = base + freq * cost / size`."""
        self._evictions = 0
        self._heap, self._latest = [], {}
        for cid in self._prio:
            self._freq[cid] = max(1.0, self._freq[cid] / 2)
            h, seq = self._base[cid] + self._freq[cid] * self._unit[cid], next(self._seq)
            self._prio[cid], self._latest[cid] = h, seq
            self._heap.append((h, seq, cid))
        heapq.heapify(self._heap)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._latest.get(e[2]) == e[1]]
        heapq.heapify(self._heap)


END_SLACK = 8  # tokens: a chat template's generation prompt ("<|assistant|>\n") is shorter


def capture_positions(
    start: int, end: int, boundaries: Sequence[int], interval: int, min_gap: int, limit: int = 0
) -> list[int]:
    """Absolute positions p in (start, end] to capture at during a prefill of tokens[start:end].

    Candidates: the message `boundaries` inside the range, every `interval` tokens past `start` (0 = none;
    counted from the resumed position, so that with an interval and a prefill chunk that are multiples of
    the scan's chunk size, these positions fall on the scan's chunk boundaries) and `end`.
    Thinned from the end backwards: a candidate closer than `min_gap` to the next kept one, or to `start`
    (the checkpoint being resumed, when start > 0), is dropped; `end` is kept, unless a message boundary lies
    fewer than `END_SLACK` tokens before it: then that boundary serves every later request the end would
    (a regenerate looks up the prompt minus its last token, and a follow-up resumes from the finished
    request's own capture), and one capture per chat request is saved. Likewise a position fewer than
    `END_SLACK` tokens past a resumed `start` (the end-of-turn tokens of the answer a follow-up resumes
    after) is dropped: the resumed checkpoint serves what it would, at most `END_SLACK` tokens earlier, and
    a follow-up's prefill is one piece (and one capture) shorter.
    Then, with `limit` > 0, at most `limit` positions are kept (`thin`).
    """
    if end <= start:
        return []
    cands = {b for b in boundaries if start < b <= end}
    if interval > 0:
        cands.update(range(start + interval, end + 1, interval))
    kept = [end]
    for p in sorted(cands - {end}, reverse=True):
        if kept[-1] - p >= min_gap and (start == 0 or p - start >= min_gap):
            kept.append(p)
    kept.sort()
    bounds = set(boundaries)
    if end not in bounds and any(end - END_SLACK <= p < end for p in kept if p in bounds):
        kept.remove(end)  # a chat prompt's end is its last message's end plus the generation prompt
    if start > 0:
        kept = [p for p in kept if p - start >= END_SLACK or p == kept[-1]]
    return thin(kept, start, bounds, limit) if limit > 0 else kept


def thin(positions: list[int], start: int, boundaries: set[int], limit: int) -> list[int]:
    """At most `limit` of the ascending `positions` (the last one is the prefill's end). The end is kept, then
    message boundaries before interval positions (edits and regenerates resume at boundaries), each kind
    thinned by `_spread`: its last and first, then one at or below each geometric target
    start + span * (1 - 2**-i), i = 1, 2, ...: dense near the end, where follow-ups, regenerates and edits of
    recent messages resume, sparse over the older part of a long prompt (in the spirit of Marconi)."""
    if len(positions) <= limit:
        return positions
    end = positions[-1]
    bounds = [p for p in positions[:-1] if p in boundaries]
    kept = {end, *_spread(bounds, start, end, limit - 1)}
    others = [p for p in positions[:-1] if p not in kept]
    kept.update(_spread(others, start, end, limit - len(kept)))
    return sorted(kept)


def _spread(cands: list[int], start: int, end: int, k: int) -> list[int]:
    """At most k of the ascending `cands`: all if they fit, else the last, the first, then geometric picks."""
    if len(cands) <= k:
        return cands
    if k <= 0:
        return []
    chosen = {cands[-1]}
    if k > 1:
        chosen.add(cands[0])
    span, i = end - start, 1
    while len(chosen) < k and span >> i > 0:
        below = [p for p in cands if p <= end - (span >> i) and p not in chosen]
        if below:
            chosen.add(below[-1])
        i += 1
    return sorted(chosen)
