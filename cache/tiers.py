"""Where checkpoint copies live, as bookkeeping: the hot and cold arenas' block ids, the disk tier's budget,
one eviction policy per tier (`cache.policy`), the copies each namespace holds, and eviction counters.

Part of `Book`: plain Python apart from the arenas it hands out block ids from, and the caller holds the
cache lock around every method. It decides nothing about when to evict (that is `Book`); it keeps the
per-copy records consistent: a copy leaves a tier only through `drop`.

Fairness between namespaces (API keys) in the hot and cold arenas: a copy is charged to the namespace that
created its checkpoint (`Checkpoint.namespace`), however many sessions of other keys share it through a
common tree. A namespace's fair share of a tier is its capacity divided by the number of namespaces holding
copies there (the one capturing included). A capture that needs room evicts over every namespace while its
namespace holds less than its fair share, and only its own copies once it holds that much (`at_share`): a
namespace can take free space and space beyond others' shares, but never push another namespace below its
share. The disk tier, the overflow of the cold one, is shared by the policy alone.

Attachments (`cache.base.Attachment`: a hybrid model's KV blocks, `cache.kv_blocks`): a copy in any tier
holds its checkpoint's attachment in that tier, and the tier's byte budget counts both (`used`; on disk
`DiskTier.total`). A copy is taken only when its state and the attachment bytes it adds fit together, and
dropping a copy drops its hold on the attachment. Eviction priorities and namespace shares count the state
copies alone: attachment bytes are shared between copies, so none of them owns them.
"""

from __future__ import annotations

from collections import Counter

from cache.arena import BlockArena
from cache.base import TIERS, Attachment, Tier
from cache.checkpoint import Checkpoint
from cache.disk_tier import DiskTier
from cache.policy import GreedyDualSizeFrequency


class Tiers:
    def __init__(
        self, hot: BlockArena | None, cold: BlockArena | None, disk: DiskTier, extra: Attachment | None = None
    ) -> None:
        self.arenas: dict[Tier, BlockArena | None] = {"hot": hot, "cold": cold}
        self.extra = extra if extra is not None else Attachment()
        self.disk = disk
        self.policy = {t: GreedyDualSizeFrequency() for t in TIERS}
        self.held: dict[Tier, Counter[str]] = {"hot": Counter(), "cold": Counter()}  # copies per namespace
        self.evictions: dict[Tier, int] = dict.fromkeys(TIERS, 0)

    def copy_bytes(self, cp: Checkpoint, tier: Tier) -> int:
        if tier == "disk":
            return cp.disk_bytes
        arena = self.arenas[tier]
        return arena.block_bytes if arena is not None else 0

    def held_bytes(self, cp: Checkpoint, tier: Tier) -> int:
        """The copy's state bytes plus the attachment it references (shared bytes included)."""
        return self.copy_bytes(cp, tier) + self.extra.held(cp, tier)

    def used(self, tier: Tier) -> int:
        """Bytes held in an arena tier: state blocks and attachments."""
        arena = self.arenas[tier]
        return arena.bytes_used + self.extra.used(tier) if arena is not None else 0

    def capacity(self, tier: Tier) -> int:
        """An arena tier's byte capacity: its budget, or its occupancy while pinned copies keep it above."""
        arena = self.arenas[tier]
        return max(arena.target * arena.block_bytes, self.used(tier)) if arena is not None else 0

    # ---- priorities ----------------------------------------------------------------------------------

    def touch(self, cp: Checkpoint, tier: Tier, freq: float | None = None) -> None:
        """(Re)rank the copy of `cp` in `tier`: captured, or entering the tier (with the `freq` it brings)."""
        self.policy[tier].touch(cp.cid, cp.cost, self.copy_bytes(cp, tier), freq)

    def refresh(self, cp: Checkpoint) -> None:
        for tier in cp.tiers():
            self.touch(cp, tier)

    def hit(self, cp: Checkpoint) -> None:
        """`cp` was used (leased or captured again): one more hit for every copy."""
        for tier in cp.tiers():
            self.policy[tier].hit(cp.cid, cp.cost, self.copy_bytes(cp, tier))

    # ---- arena blocks --------------------------------------------------------------------------------

    def take_block(self, tier: Tier, namespace: str, extra: int = 0) -> int | None:
        """A free block of `tier` charged to `namespace`, or None if the arena is full (or disabled) or the
        block and `extra` attachment bytes do not fit the budget together."""
        arena = self.arenas[tier]
        if arena is None or self.used(tier) + arena.block_bytes + extra > arena.target * arena.block_bytes:
            return None
        block = arena.alloc()
        if block is not None:
            self.held[tier][namespace] += 1
        return block

    def at_share(self, tier: Tier, namespace: str) -> bool:
        """Does `namespace` hold its fair share of the arena `tier` (or more)?"""
        arena, holders = self.arenas.get(tier), self.held.get(tier)
        if arena is None or holders is None:
            return False
        count = sum(1 for n in holders.values() if n > 0) + (0 if holders[namespace] > 0 else 1)
        return holders[namespace] >= max(1, arena.target // count)

    def over(self, tier: Tier) -> bool:
        if tier == "disk":
            return self.disk.over()
        arena = self.arenas[tier]
        return arena is not None and self.used(tier) > arena.target * arena.block_bytes

    def resize(self, hot: int | None, cold: int | None, disk: int | None) -> None:
        pairs: tuple[tuple[Tier, int | None], ...] = (("hot", hot), ("cold", cold))
        for tier, budget in pairs:
            arena = self.arenas[tier]
            if budget is not None and arena is not None:
                arena.set_budget(budget)
        if disk is not None:
            self.disk.resize(disk)

    # ---- dropping copies -----------------------------------------------------------------------------

    def evicted(self, cp: Checkpoint, tier: Tier) -> float:
        """The policy gave up the copy of `cp` in `tier` (the caller counts and drops it): advance the tier's
        clock; return the copy's `freq` (a spill to disk keeps it)."""
        freq = self.policy[tier].freq(cp.cid)
        self.policy[tier].evicted(cp.cid)
        return freq

    def drop(self, cp: Checkpoint, tier: Tier) -> int:
        """Remove one copy of `cp`; return the bytes it occupied."""
        self.policy[tier].remove(cp.cid)
        if tier == "disk":
            return self.disk.drop(cp) + self.extra.drop(cp, tier)
        block = cp.hot if tier == "hot" else cp.cold
        arena = self.arenas[tier]
        if block is None or arena is None:
            return self.extra.drop(cp, tier)
        arena.release(block, cp.fences.pop(tier, None))
        held = self.held[tier]
        held[cp.namespace] -= 1
        if held[cp.namespace] <= 0:
            del held[cp.namespace]
        if tier == "hot":
            cp.hot = None
        else:
            cp.cold = None
        return arena.block_bytes + self.extra.drop(cp, tier)
