"""The cache's bookkeeping: checkpoint lifecycle, block ownership, leases, budgets, eviction and counters.

Sessions and prefix trees live in `index` (`cache.index`). Plain Python plus block ids; the caller (`StateCache`) holds its lock around every method. Side effects
that must run outside the lock are queued: `events` (observer callbacks) here, and file I/O (spill writes,
unlinks) in `disk` (`cache.disk_tier`, which also says why deleting after the lock is race-free).
Invariants kept here: every tier's used bytes <= its capacity; a pinned checkpoint loses no copy; a copy
leaves a tier only through `_drop_copy`.

Fairness between namespaces (API keys) in the hot and cold arenas: a namespace's fair share of a tier is its
capacity divided by the number of namespaces holding copies there (the one capturing included). A capture
that needs room evicts by Greedy-Dual-Size over every namespace while its namespace holds less than its fair
share, and only its own copies once it holds that much: a namespace can take free space and space beyond
others' shares, but never push another namespace below its share. The disk tier, the overflow of the cold
one, is shared by Greedy-Dual-Size alone.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from cache.arena import BlockArena, Claim
from cache.base import TIERS, Lease, LookupResult, MissCause, Tier
from cache.checkpoint import Checkpoint, Session, SessionKey
from cache.config import CacheConfig
from cache.disk import DiskRecord, DiskStore
from cache.disk_tier import DiskTier, Spill
from cache.index import SessionIndex
from cache.layout import BlockLayout
from cache.policy import GreedyDual
from cache.stats import empty_lookup_counts

Event = tuple[str, object, object]  # (observer method, arg, arg)


class Book:
    def __init__(
        self,
        config: CacheConfig,
        hot: BlockArena | None,
        cold: BlockArena | None,
        cold_layout: BlockLayout,
        store: DiskStore | None,
    ) -> None:
        self.config = config
        self.arenas: dict[Tier, BlockArena | None] = {"hot": hot, "cold": cold}
        self.disk = DiskTier(store, config.disk_bytes, cold_layout)
        self.policy = {t: GreedyDual() for t in TIERS}
        self.index = SessionIndex(config.max_ghosts)
        self.ckpts = self.index.ckpts  # cid -> checkpoint (the index's table, shared)
        self.leases: dict[int, int] = {}
        self.held: dict[Tier, Counter[str]] = {"hot": Counter(), "cold": Counter()}  # copies per namespace
        self._next_id = 0
        self.events: list[Event] = []
        self.lookups = empty_lookup_counts()
        self.evictions: dict[Tier, int] = dict.fromkeys(TIERS, 0)
        self.tokens_reused = 0
        self.captures = 0
        self.captures_skipped = 0
        self.disk_corrupt = 0

    # ---- capture -------------------------------------------------------------------------------------

    def admit(self, key: SessionKey, tokens: tuple[int, ...], reason: str) -> Checkpoint | None:
        """Admission + storage reservation. Returns a pinned, unpublished checkpoint, or None if skipped."""
        session = self.index.session(key)
        if self.index.near_duplicate(session, tokens, self.config.min_gap):
            self.captures_skipped += 1
            return None
        self._make_window_room(session)
        hot = self._alloc("hot", key[0])
        cold = self._alloc("cold", key[0])
        session = self.index.sessions.setdefault(key, session)  # evictions above may have dropped it as empty
        if hot is None and cold is None:
            self.captures_skipped += 1
            self.index.drop_if_empty(session)
            return None
        node = session.tree.insert(tokens)
        now = time.time()
        cp = Checkpoint(self._new_id(), key, node, len(tokens), reason, now, now, hot=hot, cold=cold, pins=1)
        self.index.add(session, cp)
        if hot is not None:
            self.held["hot"][key[0]] += 1
        if cold is not None:
            self.held["cold"][key[0]] += 1
        return cp

    def write_fences(self, cp: Checkpoint) -> list[torch.cuda.Event | None]:
        """Events the capture writer must wait for before overwriting the reserved blocks."""
        out: list[torch.cuda.Event | None] = []
        pairs: tuple[tuple[Tier, int | None], ...] = (("hot", cp.hot), ("cold", cp.cold))
        for tier, block in pairs:
            arena = self.arenas[tier]
            if arena is not None and block is not None:
                out.append(arena.fences.pop(block, None))
        return out

    def write_claims(self, cp: Checkpoint) -> list[Claim]:
        """Host readers the capture writer must settle before overwriting the reserved cold block."""
        arena = self.arenas["cold"]
        claim = arena.take_claim(cp.cold) if arena is not None and cp.cold is not None else None
        return [claim] if claim is not None else []

    def publish(self, cp: Checkpoint, ready: torch.cuda.Event | None) -> bool:
        cp.ready, cp.published = ready, True
        for tier in cp.tiers():
            self.policy[tier].touch(cp.cid, cp.cost, self._copy_bytes(cp, tier))
        self.captures += 1
        self.unpin(cp)
        return not cp.dead

    def abort(self, cp: Checkpoint) -> None:
        """The capture's copy failed: give its blocks back."""
        cp.published = True
        cp.dead = True
        self.unpin(cp)

    # ---- lookup / leases -----------------------------------------------------------------------------

    def find(self, key: SessionKey, tokens: tuple[int, ...]) -> tuple[Checkpoint | None, MissCause]:
        return self.index.find(key, tokens)

    def lease(self, cp: Checkpoint) -> Lease:
        tier = cp.tiers()[0]
        result: LookupResult = "hot_hit" if tier == "hot" else "cold_hit" if tier == "cold" else "disk_hit"
        self.count_lookup(result, "")
        cp.pins += 1
        cp.last_used = time.time()
        for t in cp.tiers():
            self.policy[t].touch(cp.cid, cp.cost, self._copy_bytes(cp, t))
        lease = Lease(self._new_id(), cp.cid, cp.key[0], cp.key[1], cp.position, tier)
        self.leases[lease.lease_id] = cp.cid
        return lease

    def count_lookup(self, result: LookupResult, cause: MissCause) -> None:
        self.lookups[(result, cause)] += 1
        self.events.append(("on_lookup", result, cause))

    def leased(self, lease: Lease) -> Checkpoint:
        cid = self.leases.get(lease.lease_id)
        if cid is None:
            raise KeyError(f"lease {lease.lease_id} is not held")
        return self.ckpts[cid]

    def end_lease(self, lease: Lease) -> None:
        cp = self.leased(lease)
        del self.leases[lease.lease_id]
        self.unpin(cp)

    def unpin(self, cp: Checkpoint) -> None:
        cp.pins -= 1
        if cp.pins > 0:
            return
        if cp.dead:
            self._free(cp)
        elif cp.spill_failed:
            self._lose_copy(cp, "disk")
        self.enforce_budgets()

    # ---- sessions ------------------------------------------------------------------------------------

    def delete_session(self, key: SessionKey) -> int:
        self.index.gone.pop(key, None)
        session = self.index.sessions.pop(key, None)
        if session is None:
            return 0
        freed = 0
        for cid in list(session.cids):
            cp = self.ckpts[cid]
            cp.dead = True
            if cp.pins == 0:
                freed += self._free(cp)
        return freed

    # ---- budgets / eviction --------------------------------------------------------------------------

    def resize(self, hot: int | None, cold: int | None, disk: int | None) -> None:
        pairs: tuple[tuple[Tier, int | None], ...] = (("hot", hot), ("cold", cold))
        for tier, budget in pairs:
            arena = self.arenas[tier]
            if budget is not None and arena is not None:
                arena.set_budget(budget)
        if disk is not None:
            self.disk.resize(disk)
        self.enforce_budgets()

    def enforce_budgets(self) -> None:
        """Evict until every tier is back under its target (pinned copies may keep it above, for now)."""
        for tier in ("hot", "cold"):
            arena = self.arenas[tier]
            while arena is not None and arena.over() and self._evict_one(tier):
                pass
        while self.disk.over() and self._evict_one("disk"):
            pass

    def _alloc(self, tier: Tier, namespace: str) -> int | None:
        arena = self.arenas[tier]
        if arena is None:
            return None
        block = arena.alloc()
        while block is None and arena.target > 0 and self._evict_one(tier, namespace):
            block = arena.alloc()
        return block

    def _fair_share(self, tier: Tier, namespace: str) -> int:
        arena = self.arenas[tier]
        holders = self.held[tier]
        count = sum(1 for ns, n in holders.items() if n > 0) + (0 if holders[namespace] > 0 else 1)
        return max(1, (arena.target if arena is not None else 0) // count)

    def _evict_one(self, tier: Tier, requester: str | None = None) -> bool:
        """Evict one copy from `tier`: the lowest priority one, or, when `requester` (a namespace making room
        for its own capture) holds its fair share or more, the lowest priority one of its own."""
        evictable = self._evictable
        if (
            requester is not None
            and tier in self.held
            and self.held[tier][requester] >= self._fair_share(tier, requester)
        ):
            evictable = lambda cid: self._evictable(cid) and self.ckpts[cid].key[0] == requester
        cid = self.policy[tier].victim(evictable)
        if cid is None:
            return False
        self.policy[tier].evicted(cid)
        self._count_eviction(tier)
        cp = self.ckpts[cid]
        if tier == "cold" and cp.disk is None and cp.pending is None:
            self._spill(cp)
        self._lose_copy(cp, tier)
        return True

    def _evictable(self, cid: int) -> bool:
        cp = self.ckpts.get(cid)
        return cp is not None and cp.published and cp.pins == 0

    def _make_window_room(self, session: Session) -> None:
        """Hot window: before a capture adds a hot copy, drop the session's least recently used ones."""
        if self.arenas["hot"] is None:
            return
        hot = [self.ckpts[c] for c in session.cids if self.ckpts[c].hot is not None]
        excess = len(hot) - self.config.hot_window + 1
        oldest = sorted((cp for cp in hot if self._evictable(cp.cid)), key=lambda cp: cp.last_used)
        for cp in oldest[: max(0, excess)]:
            self._count_eviction("hot")
            self._lose_copy(cp, "hot")

    def _count_eviction(self, tier: Tier) -> None:
        self.evictions[tier] += 1
        self.events.append(("on_evict", tier, None))

    def _spill(self, cp: Checkpoint) -> None:
        """Queue the cold copy of `cp` for the disk tier (see `DiskTier.spill`, and its wait on CUDA)."""
        arena = self.arenas["cold"]
        if arena is None or cp.cold is None:
            return
        if self.disk.spill(cp, arena.block(cp.cold), lambda: self._evict_one("disk")):
            self.policy["disk"].touch(cp.cid, cp.cost, cp.disk_bytes)
            if cp.pending is not None:
                arena.claim(cp.cold, cp.pending)  # whoever next writes the block lets the spill copy it first

    def spill_done(self, spill: Spill, path: Path | None, nbytes: int) -> None:
        """A queued disk write finished (`path` None: it failed). Drop the file if the checkpoint is gone.
        A failed write drops the disk copy (its budget comes back), at the last unpin if it is leased: a
        lease may be about to read `pending`, and a pinned checkpoint loses no copy."""
        cp = self.ckpts.get(spill.cid)
        if cp is None or cp.pending is not spill.copy:
            self.disk.discard(path)
            return
        if path is not None:
            self.disk.landed(cp, path, nbytes)
        elif cp.pins > 0:
            cp.spill_failed = True
        else:
            self._lose_copy(cp, "disk")

    def flush_spills(self) -> None:
        """Queue every published checkpoint that has no disk copy yet (used at close)."""
        for cp in list(self.ckpts.values()):
            live = (
                cp.cid in self.ckpts and cp.published and not cp.dead
            )  # an earlier spill may have evicted it
            if live and cp.cold is not None and "disk" not in cp.tiers():
                self._spill(cp)

    def adopt_disk(self, rec: DiskRecord) -> bool:
        """Index a file found at start. False if it does not fit the budget or duplicates another."""
        if not self.disk.fits(rec.nbytes):
            return False
        session = self.index.session((rec.namespace, rec.session))
        node = session.tree.insert(rec.tokens)
        if node.value is not None:
            return False
        cp = self.disk.adopt(rec, self._new_id(), node)
        self.index.add(session, cp)
        self.policy["disk"].touch(cp.cid, cp.cost, cp.disk_bytes)
        return True

    def drop_corrupt_disk(self, cp: Checkpoint) -> None:
        self.disk_corrupt += 1
        self.events.append(("on_corrupt", None, None))
        self._drop_copy(cp, "disk")

    # ---- freeing -------------------------------------------------------------------------------------

    def _drop_copy(self, cp: Checkpoint, tier: Tier) -> int:
        """Remove one copy; return the bytes it occupied."""
        self.policy[tier].remove(cp.cid)
        if tier == "disk":
            return self.disk.drop(cp)
        block = cp.hot if tier == "hot" else cp.cold
        arena = self.arenas[tier]
        if block is None or arena is None:
            return 0
        arena.release(block, cp.fences.pop(tier, None))
        held = self.held[tier]
        held[cp.key[0]] -= 1
        if held[cp.key[0]] <= 0:
            del held[cp.key[0]]
        if tier == "hot":
            cp.hot = None
        else:
            cp.cold = None
        return arena.block_bytes

    def _lose_copy(self, cp: Checkpoint, tier: Tier) -> None:
        """Drop one copy by eviction or failure; a checkpoint left with none becomes a ghost."""
        self._drop_copy(cp, tier)
        if not cp.tiers():
            self.index.forget(cp, ghost=True)

    def _free(self, cp: Checkpoint) -> int:
        freed = sum(self._drop_copy(cp, t) for t in TIERS)
        self.index.forget(cp, ghost=False)
        return freed

    def _copy_bytes(self, cp: Checkpoint, tier: Tier) -> int:
        if tier == "disk":
            return cp.disk_bytes
        arena = self.arenas[tier]
        return arena.block_bytes if arena is not None else 0

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def tier_counts(self) -> dict[Tier, int]:
        counts: dict[Tier, int] = defaultdict(int)
        for cp in self.ckpts.values():
            for t in cp.tiers():
                counts[t] += 1
        return {t: counts[t] for t in TIERS}
