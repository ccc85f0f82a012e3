"""Bookkeeping records: a checkpoint (metadata, owners, where its copies live), a session (the checkpoints it
references) and a prefix tree (the checkpoints of every session that uses it, and ghost markers)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.base import Tier
from cache.prefix import Node, PrefixTree
from cache.spill import SpillCopy

SessionKey = tuple[str, str | None]  # (namespace, session id or None for the namespace's anonymous session)


@dataclass(eq=False)
class Checkpoint:
    """One stored state after `position` tokens, at `node` of the prefix tree `tree`. Mutated only under the
    cache lock.

    `creator`: the session that captured it (its namespace is charged for the copies, `cache.tiers`; the disk
    file records it). `owners`: the sessions referencing it (its creator, unless deleted, and every session
    that restored from it or captured the same tokens); empty only once it is `dead` or forgotten.
    Copies: `hot`/`cold` are block ids in the arenas, `disk` a file path; `pending` holds the encoded fields
    (`cache.spill`) while the disk file is queued or being written (`cache.io_worker`). `cost` is the recompute
    it saves (tokens). `pins` counts leases (and the capture writing it); a pinned checkpoint keeps every copy.
    `from_remote`: brought in from the remote tier (`StateCache.prefetch`), not looked up since.
    `dead`: no session references it any more (deleted, or its capture failed); it has left the tree and is
    freed at the last unpin.
    """

    cid: int
    tree: str
    creator: SessionKey
    node: Node
    position: int
    reason: str
    created: float
    last_used: float
    owners: set[SessionKey] = field(default_factory=set)
    hot: int | None = None
    cold: int | None = None
    disk: Path | None = None
    disk_bytes: int = 0  # bytes reserved against the disk budget (file or pending write)
    pending: SpillCopy | None = None
    spill_failed: bool = False  # the write of `pending` failed while leased: dropped at the last unpin
    ready: torch.cuda.Event | None = None  # capture copies done (CUDA)
    fences: dict[Tier, torch.cuda.Event] = field(default_factory=dict)  # last read of each copy (CUDA)
    pins: int = 0
    published: bool = False
    dead: bool = False
    from_remote: bool = False  # restored from the remote tier and not hit since

    @property
    def cost(self) -> float:
        return float(self.position)

    @property
    def namespace(self) -> str:
        """The namespace charged for its copies (its creator's)."""
        return self.creator[0]

    def tiers(self) -> list[Tier]:
        out: list[Tier] = []
        if self.hot is not None:
            out.append("hot")
        if self.cold is not None:
            out.append("cold")
        if self.disk is not None or self.pending is not None:
            out.append("disk")
        return out

    def visible(self) -> bool:
        """Can a lookup return it?"""
        return self.published and not self.dead and bool(self.tiers())

    def shared(self) -> bool:
        return len(self.owners) > 1


@dataclass(eq=False)
class Session:
    """The checkpoints a session references, in any tree."""

    key: SessionKey
    cids: set[int] = field(default_factory=set)

    def empty(self) -> bool:
        return not self.cids


@dataclass(eq=False)
class Tree:
    """One prefix tree: the checkpoints (`cids`) of every session using it and the ghost markers of evicted
    ones, oldest first."""

    name: str
    prefix: PrefixTree = field(default_factory=PrefixTree)
    cids: set[int] = field(default_factory=set)
    ghosts: deque[Node] = field(default_factory=deque)

    def empty(self) -> bool:
        """No checkpoint left (ghost markers alone do not keep a tree: `CheckpointIndex`)."""
        return not self.cids
