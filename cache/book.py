"""The cache's bookkeeping: sessions, checkpoints, block ownership, budgets, eviction and counters.

Plain Python plus block ids; the caller (`StateCache`) holds its lock around every method. Side effects
that must run outside the lock are queued: `events` (observer callbacks) and `spills` (disk writes).
Invariants kept here: every tier's used bytes <= its capacity; a pinned checkpoint loses no copy; a copy
leaves a tier only through `_drop_copy`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.arena import BlockArena
from cache.base import TIERS, Lease, LookupResult, MissCause, Tier
from cache.checkpoint import Checkpoint, Session, SessionKey
from cache.config import CacheConfig
from cache.disk import DiskRecord, DiskStore
from cache.layout import BlockLayout
from cache.policy import GreedyDual
from cache.stats import empty_lookup_counts

Event = tuple[str, object, object]  # (observer method, arg, arg)


@dataclass(frozen=True)
class Spill:
    """A disk write to run outside the lock: the encoded cold fields of checkpoint `cid` (CPU tensors)."""

    cid: int
    key: SessionKey
    tokens: tuple[int, ...]
    fields: dict[str, torch.Tensor]
    reason: str
    created: float


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
        self.cold_layout = cold_layout
        self.store = store
        self.policy = {t: GreedyDual() for t in TIERS}
        self.disk_used = 0
        self.disk_target = config.disk_bytes if store is not None else 0
        self.sessions: dict[SessionKey, Session] = {}
        self.ckpts: dict[int, Checkpoint] = {}
        self.leases: dict[int, int] = {}
        self._next_id = 0
        self.events: list[Event] = []
        self.spills: list[Spill] = []
        self.lookups = empty_lookup_counts()
        self.evictions: dict[Tier, int] = dict.fromkeys(TIERS, 0)
        self.tokens_reused = 0
        self.captures = 0
        self.captures_skipped = 0
        self.disk_corrupt = 0

    # ---- capture -------------------------------------------------------------------------------------

    def admit(self, key: SessionKey, tokens: tuple[int, ...], reason: str) -> Checkpoint | None:
        """Admission + storage reservation. Returns a pinned, unpublished checkpoint, or None if skipped."""
        session = self.sessions.get(key) or self.sessions.setdefault(key, Session(key))
        if self._near_duplicate(session, tokens):
            self.captures_skipped += 1
            return None
        self._make_window_room(session)
        hot = self._alloc("hot")
        cold = self._alloc("cold")
        session = self.sessions.setdefault(key, session)  # evictions above may have dropped it as empty
        if hot is None and cold is None:
            self.captures_skipped += 1
            self._drop_session_if_empty(session)
            return None
        node = session.tree.insert(tokens)
        now = time.time()
        cp = Checkpoint(self._new_id(), key, node, len(tokens), reason, now, now, hot=hot, cold=cold, pins=1)
        node.value, node.ghost = cp.cid, False
        self.ckpts[cp.cid] = cp
        session.cids.add(cp.cid)
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
        session = self.sessions.get(key)
        if session is None:
            return None, "never_saved"
        best: Checkpoint | None = None
        ghost = False
        for node in session.tree.path(tokens):
            cp = self.ckpts.get(node.value) if node.value is not None else None
            if cp is not None and cp.visible():
                best, ghost = cp, False
            elif node.ghost:
                ghost = True
        if best is None:
            return None, "evicted" if ghost else "never_saved"
        return best, ""

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
        if cp.pins == 0 and cp.dead:
            self._free(cp)
        if cp.pins == 0:
            self.enforce_budgets()

    # ---- sessions ------------------------------------------------------------------------------------

    def delete_session(self, key: SessionKey) -> int:
        session = self.sessions.pop(key, None)
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
        if disk is not None and self.store is not None:
            self.disk_target = disk
        self.enforce_budgets()

    def enforce_budgets(self) -> None:
        """Evict until every tier is back under its target (pinned copies may keep it above, for now)."""
        for tier in ("hot", "cold"):
            arena = self.arenas[tier]
            while arena is not None and arena.over() and self._evict_one(tier):
                pass
        while self.disk_used > self.disk_target and self._evict_one("disk"):
            pass

    def disk_capacity(self) -> int:
        return max(self.disk_target, self.disk_used)

    def _alloc(self, tier: Tier) -> int | None:
        arena = self.arenas[tier]
        if arena is None:
            return None
        block = arena.alloc()
        while block is None and arena.target > 0 and self._evict_one(tier):
            block = arena.alloc()
        return block

    def _reserve_disk(self, nbytes: int) -> bool:
        if self.store is None or nbytes > self.disk_target:
            return False
        while self.disk_used + nbytes > self.disk_target:
            if not self._evict_one("disk"):
                return False
        self.disk_used += nbytes
        return True

    def _evict_one(self, tier: Tier) -> bool:
        cid = self.policy[tier].victim(self._evictable)
        if cid is None:
            return False
        self.policy[tier].evicted(cid)
        self.evictions[tier] += 1
        self.events.append(("on_evict", tier, None))
        cp = self.ckpts[cid]
        if tier == "cold" and cp.disk is None and cp.pending is None:
            self._spill(cp)
        self._drop_copy(cp, tier)
        if not cp.tiers():
            self._forget(cp, ghost=True)
        return True

    def _evictable(self, cid: int) -> bool:
        cp = self.ckpts.get(cid)
        return cp is not None and cp.published and cp.pins == 0

    def _make_window_room(self, session: Session) -> None:
        """Hot window: before a capture adds a hot copy, drop the session's least recently used ones."""
        if self.arenas["hot"] is None:
            return
        hot = [self.ckpts[c] for c in session.cids if self.ckpts[c].hot is not None]
        hot = sorted((cp for cp in hot if self._evictable(cp.cid)), key=lambda cp: cp.last_used)
        excess = len([c for c in session.cids if self.ckpts[c].hot is not None]) - self.config.hot_window + 1
        for cp in hot[: max(0, excess)]:
            self.policy["hot"].remove(cp.cid)
            self.evictions["hot"] += 1
            self.events.append(("on_evict", "hot", None))
            self._drop_copy(cp, "hot")
            if not cp.tiers():
                self._forget(cp, ghost=True)

    def _spill(self, cp: Checkpoint) -> None:
        """Queue the cold copy of `cp` for the disk tier (its bytes are cloned now: the block is freed next)."""
        arena = self.arenas["cold"]
        if self.store is None or arena is None or cp.cold is None:
            return
        tokens = cp.node.tokens()
        if not self._reserve_disk(DiskStore.estimate(arena.block_bytes, len(tokens))):
            return
        if cp.ready is not None:
            cp.ready.synchronize()  # the capture's D2H copy must have landed before the host reads it
        fields = {k: v.clone() for k, v in self.cold_layout.named(arena.block(cp.cold)).items()}
        cp.pending = fields
        cp.disk_bytes = DiskStore.estimate(arena.block_bytes, len(tokens))
        self.policy["disk"].touch(cp.cid, cp.cost, cp.disk_bytes)
        self.spills.append(Spill(cp.cid, cp.key, tokens, fields, cp.reason, cp.created))

    def spill_done(self, spill: Spill, path: Path | None, nbytes: int) -> None:
        """A queued disk write finished (`path` None: it failed). Drop the file if the checkpoint is gone."""
        cp = self.ckpts.get(spill.cid)
        if cp is None or cp.pending is not spill.fields:
            if path is not None and self.store is not None:
                self.store.delete(path)
            return
        cp.pending = None
        if path is None:
            self._drop_copy(cp, "disk")
            if not cp.tiers():
                self._forget(cp, ghost=True)
            return
        cp.disk = path
        self.disk_used += nbytes - cp.disk_bytes
        cp.disk_bytes = nbytes

    def flush_spills(self) -> None:
        """Queue every published checkpoint that has no disk copy yet (used at close)."""
        for cp in list(self.ckpts.values()):
            if (
                cp.cid in self.ckpts
                and cp.published
                and not cp.dead
                and cp.disk is None
                and cp.pending is None
                and cp.cold is not None
            ):
                self._spill(cp)

    def adopt_disk(self, rec: DiskRecord) -> bool:
        """Index a file found at start. False if it does not fit the budget or duplicates another."""
        if rec.nbytes + self.disk_used > self.disk_target:
            return False
        key: SessionKey = (rec.namespace, rec.session)
        session = self.sessions.get(key) or self.sessions.setdefault(key, Session(key))
        node = session.tree.insert(rec.tokens)
        if node.value is not None:
            return False
        cp = Checkpoint(
            self._new_id(),
            key,
            node,
            len(rec.tokens),
            rec.reason,
            rec.created,
            rec.last_used,
            disk=rec.path,
            disk_bytes=rec.nbytes,
            published=True,
        )
        node.value = cp.cid
        self.ckpts[cp.cid] = cp
        session.cids.add(cp.cid)
        self.disk_used += rec.nbytes
        self.policy["disk"].touch(cp.cid, cp.cost, rec.nbytes)
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
            freed = cp.disk_bytes if (cp.disk is not None or cp.pending is not None) else 0
            if cp.disk is not None and self.store is not None:
                self.store.delete(cp.disk)
            self.disk_used -= freed
            cp.disk, cp.pending, cp.disk_bytes = None, None, 0
            return freed
        block = cp.hot if tier == "hot" else cp.cold
        arena = self.arenas[tier]
        if block is None or arena is None:
            return 0
        arena.release(block, cp.fences.pop(tier, None))
        if tier == "hot":
            cp.hot = None
        else:
            cp.cold = None
        return arena.block_bytes

    def _free(self, cp: Checkpoint) -> int:
        freed = sum(self._drop_copy(cp, t) for t in TIERS)
        self._forget(cp, ghost=False)
        return freed

    def _forget(self, cp: Checkpoint, ghost: bool) -> None:
        """Remove a checkpoint with no copies left; leave a ghost marker if it was evicted."""
        self.ckpts.pop(cp.cid, None)
        session = self.sessions.get(cp.key)
        if session is None or cp.cid not in session.cids:
            return  # its session was deleted
        session.cids.discard(cp.cid)
        node = cp.node
        node.value = None
        if ghost and self.config.max_ghosts > 0:
            node.ghost = True
            session.ghosts.append(node)
            while len(session.ghosts) > self.config.max_ghosts:
                old = session.ghosts.popleft()
                if old.ghost and old.value is None:
                    old.ghost = False
                    session.tree.prune(old)
        else:
            session.tree.prune(node)
        self._drop_session_if_empty(session)

    def _drop_session_if_empty(self, session: Session) -> None:
        if session.empty() and self.sessions.get(session.key) is session:
            del self.sessions[session.key]

    def _near_duplicate(self, session: Session, tokens: tuple[int, ...]) -> bool:
        deepest = 0
        for node in session.tree.path(tokens):
            cp = self.ckpts.get(node.value) if node.value is not None else None
            if cp is not None and not cp.dead:
                deepest = node.depth
        if deepest == len(tokens):
            return True
        return deepest > 0 and len(tokens) - deepest < self.config.min_gap

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
