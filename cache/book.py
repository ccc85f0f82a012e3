"""The cache's bookkeeping: checkpoint lifecycle, sessions' references, leases, eviction and counters.

Trees, sessions and ghost markers live in `index` (`cache.index`); copies, budgets, eviction policies and
namespace fairness in `tiers` (`cache.tiers`). Plain Python plus block ids; the caller (`StateCache`) holds
its lock around every method. Side effects that must run outside the lock are queued: `events` (observer
callbacks) here, and file I/O (spill writes, unlinks) in `disk` (`cache.disk_tier`, which also says why
deleting after the lock is race-free).

Invariants kept here: every tier's used bytes <= its capacity; a pinned checkpoint loses no copy; a copy
leaves a tier only through `Tiers.drop`; a checkpoint lives while a session references it and a tier holds
a copy (a dead one, referenced by nobody, only until its last unpin).

Sharing: a tree's checkpoints serve every session using the tree. A capture of tokens that already have a
live checkpoint in the tree stores nothing: the capturing session references the existing checkpoint and
it counts a hit (`cache.policy`); a lookup hit adds the checkpoint to the requesting session. The hot window
(`hot_window` W) is per session and counts only the hot copies of checkpoints the session references alone:
before a capture adds a hot copy, the session's least recently used ones beyond W - 1 lose theirs. The hot
copy of a shared checkpoint is left to the eviction policy.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from cache.arena import BlockArena
from cache.base import TIERS, Attachment, HitScope, Lease, LookupResult, LookupScope, MissCause, Tier
from cache.checkpoint import Checkpoint, SessionKey
from cache.config import CacheConfig
from cache.disk import DiskRecord, DiskStore
from cache.disk_tier import DiskTier, Spill
from cache.index import CheckpointIndex
from cache.layout import BlockLayout
from cache.prefix import Node
from cache.stats import empty_lookup_counts
from cache.tiers import Tiers

Event = tuple[str, tuple[object, ...]]  # (observer method, arguments)


class Book:
    def __init__(
        self,
        config: CacheConfig,
        hot: BlockArena | None,
        cold: BlockArena | None,
        cold_layout: BlockLayout,
        store: DiskStore | None,
        extra: Attachment | None = None,
    ) -> None:
        self.config = config
        others = (lambda: extra.used("disk")) if extra is not None else None
        self.tiers = Tiers(hot, cold, DiskTier(store, config.disk_bytes, cold_layout, others), extra)
        self.arenas = self.tiers.arenas
        self.disk = self.tiers.disk
        self.index = CheckpointIndex(config.max_ghosts)
        self.ckpts = self.index.ckpts  # cid -> checkpoint (the index's table, shared)
        self.leases: dict[int, int] = {}
        self._next_id = 0
        self.events: list[Event] = []
        self.lookups = empty_lookup_counts()
        self.tokens_reused = 0
        self.captures = 0
        self.captures_skipped = 0  # nothing new stored (shared ones included)
        self.captures_shared = 0  # deduplicated into a checkpoint another capture made
        self.disk_corrupt = 0

    # ---- capture -------------------------------------------------------------------------------------

    def admit(self, key: SessionKey, tree: str, tokens: tuple[int, ...], reason: str) -> Checkpoint | None:
        """Admission + storage reservation. Returns a pinned, unpublished checkpoint, or None if nothing new
        is stored: the tree has a checkpoint at `tokens` already (then `key` shares it), or one fewer than
        `min_gap` tokens above, or no tier has room."""
        exact, deepest, on_path = self.index.near(tree, tokens)
        cp = None
        if exact is not None:
            self._share(exact, key)
            self.captures_shared += 1
        elif deepest == 0 or len(tokens) - deepest >= self.config.min_gap:
            cp = self._reserve(key, tree, tokens, reason, on_path)
        if cp is None:
            self.captures_skipped += 1
        return cp

    def _reserve(
        self, key: SessionKey, tree: str, tokens: tuple[int, ...], reason: str, on_path: Node | None
    ) -> Checkpoint | None:
        """A new checkpoint with blocks reserved in the hot and cold tiers (evicting as needed), or None.
        `on_path`: a node on the path of `tokens` (`CheckpointIndex.near`'s) to insert from."""
        now = time.time()
        node = self.index.node(tree, tokens, on_path)
        cp = Checkpoint(self._new_id(), tree, key, node, len(tokens), reason, now, now, pins=1)
        self.index.add(cp)  # first: evictions below cannot forget its tree (and its ghosts) or session
        self.tiers.extra.bind(cp, tokens)
        self._cap_sessions(key)
        self._make_window_room(key)
        cp.hot, cp.cold = self._alloc("hot", cp), self._alloc("cold", cp)
        if cp.tiers():
            return cp
        self.index.kill(cp)
        self._forget(cp)
        return None

    def _share(self, cp: Checkpoint, key: SessionKey) -> None:
        """A capture of the tokens `cp` was captured after: `key` references it, and it counts a hit."""
        self.index.join(cp, key)
        self.tiers.hit(cp)
        cp.last_used = time.time()
        self._cap_sessions(key)

    def _cap_sessions(self, current: SessionKey) -> None:
        """Forget the least recently used sessions beyond `max_sessions` as if deleted (never `current`)."""
        sessions = self.index.sessions
        while len(sessions) > self.config.max_sessions:
            oldest = next(iter(sessions))
            if oldest == current:
                sessions.move_to_end(oldest)
                continue
            self.delete_session(oldest)

    def publish(self, cp: Checkpoint) -> bool:
        """The capture's copies are written (or queued, `cp.ready`): visible from now on, unless it died."""
        cp.published = True
        self.tiers.refresh(cp)
        self.captures += 1
        self.unpin(cp)
        return not cp.dead

    def abort(self, cp: Checkpoint) -> None:
        """The capture's copy failed: give its blocks back (sessions that joined it meanwhile lose it)."""
        cp.published = True
        self.index.kill(cp)
        self.unpin(cp)

    # ---- lookup / leases -----------------------------------------------------------------------------

    def lookup(self, key: SessionKey, tree: str, tokens: tuple[int, ...]) -> Lease | None:
        """Lease the deepest visible checkpoint of `tree` covering a prefix of `tokens` to session `key`."""
        cp, cause = self.index.find(tree, tokens)
        if cp is None:
            self.count_lookup("miss", cause, "")
            return None
        scope: HitScope = "session" if key in cp.owners else "shared"
        self._share(cp, key)
        tier = cp.tiers()[0]
        result: LookupResult = "hot_hit" if tier == "hot" else "cold_hit" if tier == "cold" else "disk_hit"
        if cp.from_remote:  # its first hit since `StateCache.prefetch` brought it from the remote tier
            result, cp.from_remote = "remote_hit", False
        self.count_lookup(result, "", scope)
        cp.pins += 1
        lease = Lease(self._new_id(), cp.cid, key[0], key[1], cp.position, tier, scope)
        self.leases[lease.lease_id] = cp.cid
        return lease

    def count_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope) -> None:
        self.lookups[(result, cause, scope)] += 1
        self.events.append(("on_lookup", (result, cause, scope)))

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
        elif cp.published and not cp.tiers():  # its only copy, a disk file, was found corrupt while leased
            self._forget(cp)
        self.enforce_budgets()

    # ---- sessions ------------------------------------------------------------------------------------

    def delete_session(self, key: SessionKey) -> int:
        """Drop the session's references; free what nobody else references (leased: at the last release)."""
        freed = 0
        for cp in self.index.leave(key):
            self.index.kill(cp)
            if cp.pins == 0:
                freed += self._free(cp)
        return freed

    # ---- budgets / eviction --------------------------------------------------------------------------

    def resize(self, hot: int | None, cold: int | None, disk: int | None) -> None:
        self.tiers.resize(hot, cold, disk)
        self.enforce_budgets()

    def enforce_budgets(self) -> None:
        """Evict until every tier is back under its target (pinned copies may keep it above, for now)."""
        for tier in TIERS:
            while self.tiers.over(tier) and self._evict_one(tier):
                pass

    def _alloc(self, tier: Tier, cp: Checkpoint) -> int | None:
        """A state block of `tier` for `cp`, with room for its attachment there (evicting as needed)."""
        arena, namespace = self.arenas[tier], cp.namespace
        if arena is None:
            return None
        extra = self.tiers.extra.reserve(cp, tier)
        if arena.block_bytes + extra > arena.target * arena.block_bytes:  # could never fit: evict nothing
            self.tiers.extra.drop(cp, tier)
            return None
        block = self.tiers.take_block(tier, namespace, extra)
        while block is None and arena.target > 0 and self._evict_one(tier, namespace):
            block = self.tiers.take_block(tier, namespace, extra)
        if block is None:
            self.tiers.extra.drop(cp, tier)
        else:
            self.tiers.extra.commit(cp, tier)
        return block

    def _evict_one(self, tier: Tier, requester: str | None = None) -> bool:
        """Evict one copy from `tier`: the lowest priority one, or, when `requester` (a namespace making room
        for its own capture) holds its fair share or more, the lowest priority one charged to it."""
        evictable = self._evictable
        if requester is not None and self.tiers.at_share(tier, requester):
            evictable = lambda cid: self._evictable(cid) and self.ckpts[cid].namespace == requester
        cid = self.tiers.policy[tier].victim(evictable)
        if cid is None:
            return False
        cp = self.ckpts[cid]
        freq = self.tiers.evicted(cp, tier)
        self._count_eviction(tier)
        if tier == "cold" and cp.disk is None and cp.pending is None:
            self._spill(cp, freq)
        self._lose_copy(cp, tier)
        return True

    def _evictable(self, cid: int) -> bool:
        cp = self.ckpts.get(cid)
        return cp is not None and cp.published and cp.pins == 0

    def _make_window_room(self, key: SessionKey) -> None:
        """Hot window: before a capture adds a hot copy, drop the least recently used hot copies of the
        checkpoints the session references alone, down to W - 1."""
        session = self.index.sessions.get(key)
        if session is None or self.arenas["hot"] is None:
            return
        mine = [self.ckpts[cid] for cid in session.cids]
        alone = [cp for cp in mine if cp.hot is not None and not cp.shared()]
        excess = len(alone) - self.config.hot_window + 1
        oldest = sorted((cp for cp in alone if self._evictable(cp.cid)), key=lambda cp: cp.last_used)
        for cp in oldest[: max(0, excess)]:
            self._count_eviction("hot")
            self._lose_copy(cp, "hot")

    def _count_eviction(self, tier: Tier) -> None:
        self.tiers.evictions[tier] += 1
        self.events.append(("on_evict", (tier,)))

    # ---- disk ----------------------------------------------------------------------------------------

    def _spill(self, cp: Checkpoint, freq: float) -> None:
        """Queue the cold copy of `cp` for the disk tier (see `DiskTier.spill`, and its wait on CUDA); the disk
        copy keeps the cold copy's `freq`."""
        arena = self.arenas["cold"]
        if arena is None or cp.cold is None or self.disk.store is None:
            return
        extra = self.tiers.extra.reserve(cp, "disk")
        if not self.disk.spill(cp, arena.block(cp.cold), lambda: self._evict_one("disk"), extra):
            self.tiers.extra.drop(cp, "disk")
            return
        self.tiers.extra.commit(cp, "disk")
        self.tiers.touch(cp, "disk", freq)
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
            # an earlier spill in this loop may have evicted it
            live = cp.cid in self.ckpts and cp.published and not cp.dead
            if live and cp.cold is not None and "disk" not in cp.tiers():
                self._spill(cp, self.tiers.policy["cold"].freq(cp.cid))

    def adopt_disk(self, rec: DiskRecord) -> bool:
        """Index a file found at start into its tree and creating session. False (the caller removes the file)
        if it does not fit the budget, or if its tree already has these tokens (another copy of a checkpoint
        shared before the restart: its session then references the one adopted)."""
        exact, _, _ = self.index.near(rec.tree, rec.tokens)
        if exact is not None:
            self.index.join(exact, (rec.namespace, rec.session))
            return False
        if not self.disk.fits(rec.nbytes):
            return False
        cp = self.disk.adopt(rec, self._new_id(), self.index.node(rec.tree, rec.tokens))
        self.index.add(cp)
        self.tiers.extra.bind(cp, rec.tokens)
        if self.tiers.extra.adopt(cp, "disk") is None or self.disk.over():  # its KV is missing, or too big
            self.index.kill(cp)
            self._free(cp)
            return False
        self.tiers.touch(cp, "disk")
        return True

    def drop_corrupt_disk(self, cp: Checkpoint) -> None:
        self.disk_corrupt += 1
        self.events.append(("on_corrupt", ()))
        self.tiers.drop(cp, "disk")

    # ---- freeing -------------------------------------------------------------------------------------

    def _lose_copy(self, cp: Checkpoint, tier: Tier) -> None:
        """Drop one copy by eviction or failure; a checkpoint left with none is forgotten (a ghost)."""
        self.tiers.drop(cp, tier)
        if not cp.tiers():
            self._forget(cp)

    def _free(self, cp: Checkpoint) -> int:
        freed = sum(self.tiers.drop(cp, t) for t in TIERS)
        self._forget(cp)
        return freed

    def _forget(self, cp: Checkpoint) -> None:
        self.index.forget(cp)
        self.tiers.extra.unbind(cp)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def tier_counts(self) -> dict[Tier, int]:
        counts: dict[Tier, int] = defaultdict(int)
        for cp in self.ckpts.values():
            for t in cp.tiers():
                counts[t] += 1
        return {t: counts[t] for t in TIERS}
