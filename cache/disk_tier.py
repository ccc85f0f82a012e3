"""Disk-tier bookkeeping: the byte budget, queued spills (file writes) and queued unlinks (file deletions).

Part of `Book`: plain Python, the caller holds the cache lock around every method, and nothing here touches
a file. A spill queues a checkpoint's cold copy (its bytes taken later, outside the lock: `cache.spill`)
for `DiskStore.write`; dropping a disk copy queues its path for unlink. The manager takes the queue (`take`) in the same critical section that filled it, so
the queue is empty whenever the lock is free, and hands the I/O to its writer thread (`cache.io_worker`),
which runs it in FIFO order after the lock is released and reports each write back (`Book.spill_done`).

Deleting after the lock is race-free: a queued path is already unreachable. Its copy was removed from its
checkpoint under the lock (and the checkpoint from the index, if it had no other copy), so no `lookup` can
lease it and no `fetch` can start reading it; a `fetch` already reading it holds a lease, and a leased
checkpoint never loses a copy (the one exception, a disk copy `fetch` found corrupt, is unreadable anyway).
File names are unique (uuid4) and never reused, so no capture or spill can write the path being unlinked;
a path is known only once its write has finished, and the writer runs one job at a time in queue order, so
an unlink never races its own write.

Budget: `used` counts disk copies and reserved writes (queued or running: reserved before they are queued,
each reservation an upper bound on its file). A dropped copy gives its bytes back under the lock, before its
file is unlinked, so the files on disk can exceed the budget by the files queued for deletion, until the
writer has deleted them (`StateCache.flush` waits for that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cache.checkpoint import Checkpoint, SessionKey
from cache.disk import DiskRecord, DiskStore
from cache.layout import BlockLayout
from cache.prefix import Node
from cache.spill import SpillCopy

if TYPE_CHECKING:
    from cache.kv_disk import KVFile


@dataclass(frozen=True)
class Spill:
    """A disk write to run outside the lock: the encoded cold fields of checkpoint `cid` (`copy`)."""

    cid: int
    key: SessionKey  # the creating session (recorded in the file)
    tree: str
    tokens: tuple[int, ...]
    copy: SpillCopy
    reason: str
    created: float


@dataclass
class DiskWork:
    """File I/O queued under the lock, to run after releasing it."""

    spills: list[Spill] = field(default_factory=list)
    unlinks: list[Path] = field(default_factory=list)
    kv: list[KVFile] = field(default_factory=list)  # KV block files to write (`cache.kv_disk`)


class DiskTier:
    """`others`: bytes of other files counted in the budget (a hybrid's KV block files, `cache.kv_disk`)."""

    def __init__(
        self,
        store: DiskStore | None,
        budget: int,
        layout: BlockLayout,
        others: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.layout = layout  # the cold layout: a spill writes the cold copy's fields
        self.others = others if others is not None else lambda: 0
        self.used = 0  # checkpoint files and reserved writes
        self.target = budget if store is not None else 0
        self.work = DiskWork()

    def total(self) -> int:
        """Bytes charged to the budget: checkpoint files, reserved writes, other files."""
        return self.used + self.others()

    def capacity(self) -> int:
        return max(self.target, self.total())

    def over(self) -> bool:
        return self.total() > self.target

    def fits(self, nbytes: int) -> bool:
        return self.total() + nbytes <= self.target

    def resize(self, budget: int) -> None:
        if self.store is not None:
            self.target = budget

    def reserve(self, nbytes: int, evict_one: Callable[[], bool], extra: int = 0) -> bool:
        """Charge `nbytes` to the budget, evicting disk copies (`evict_one`) to make room for them and `extra`
        bytes more (charged by their owner). False: no room."""
        if self.store is None or nbytes + extra > self.target:
            return False
        while not self.fits(nbytes + extra):
            if not evict_one():
                return False
        self.used += nbytes
        return True

    def spill(
        self, cp: Checkpoint, block: torch.Tensor, evict_one: Callable[[], bool], extra: int = 0
    ) -> bool:
        """Queue the cold copy of `cp` (`block`: `(block_bytes,)` uint8, host) for writing, with room for
        `extra` bytes of its attachment (`Attachment.reserve`). False if the budget has no room for it.

        Nothing is copied here: the block's bytes are taken later, outside the lock, by whoever needs them
        first (`cache.spill.SpillCopy`: on CUDA that waits for the capture's D2H copy, `cp.ready`, before
        cloning). The caller keeps the block readable until then: the checkpoint's cold copy owns it, and the
        `SpillCopy` is registered as the block's claim (`BlockArena.claim`), which the next capture into the
        block, once released, settles first.
        """
        if self.store is None:
            return False
        tokens = cp.node.tokens()
        nbytes = DiskStore.estimate(self.layout.block_bytes, len(tokens))
        if not self.reserve(nbytes, evict_one, extra):
            return False
        copy = SpillCopy(self.layout, block, cp.ready)
        cp.pending, cp.disk_bytes = copy, nbytes
        self.work.spills.append(Spill(cp.cid, cp.creator, cp.tree, tokens, copy, cp.reason, cp.created))
        return True

    def adopt(self, rec: DiskRecord, cid: int, node: Node) -> Checkpoint:
        """A published checkpoint of `rec.tree`, created by the file's session, whose only copy is the file
        `rec` found at start (`node`: its tokens' node in that tree); charges it to the budget."""
        self.used += rec.nbytes
        key: SessionKey = (rec.namespace, rec.session)
        return Checkpoint(
            cid,
            rec.tree,
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

    def landed(self, cp: Checkpoint, path: Path, nbytes: int) -> None:
        """The spill of `cp` wrote `path` (`nbytes`): the reservation becomes the file's real size."""
        cp.pending, cp.disk = None, path
        self.used += nbytes - cp.disk_bytes
        cp.disk_bytes = nbytes

    def discard(self, path: Path | None) -> None:
        """Queue for unlink a file that nothing refers to any more."""
        if path is not None:
            self.work.unlinks.append(path)

    def drop(self, cp: Checkpoint) -> int:
        """Remove the disk copy of `cp` (file or pending write), queue its file for unlink; return its bytes."""
        freed = cp.disk_bytes if (cp.disk is not None or cp.pending is not None) else 0
        self.discard(cp.disk)
        if cp.pending is not None:
            cp.pending.cancel()
        self.used -= freed
        cp.disk, cp.pending, cp.disk_bytes, cp.spill_failed = None, None, 0, False
        return freed

    def take(self) -> DiskWork:
        """Hand the queued I/O to the caller, who runs it after releasing the lock."""
        work, self.work = self.work, DiskWork()
        return work
