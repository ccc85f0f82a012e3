"""The checkpoint index: sessions, their prefix trees and ghost markers, and the checkpoint table.

Answers "which checkpoint covers the longest prefix of these tokens" and keeps the trees tidy as checkpoints
come and go. Knows nothing of tiers, budgets or files (that is `Book`). Plain Python; the caller holds the
cache lock around every method.
"""

from __future__ import annotations

from cache.base import MissCause
from cache.checkpoint import Checkpoint, Session, SessionKey


class SessionIndex:
    def __init__(self, max_ghosts: int) -> None:
        self.max_ghosts = max_ghosts
        self.sessions: dict[SessionKey, Session] = {}
        self.ckpts: dict[int, Checkpoint] = {}

    def session(self, key: SessionKey) -> Session:
        """The session `key`, created if new (it is dropped again once it has no checkpoints or ghosts)."""
        return self.sessions.get(key) or self.sessions.setdefault(key, Session(key))

    def add(self, session: Session, cp: Checkpoint) -> None:
        """Enter `cp` at its node (`cp.node`, a node of `session.tree`)."""
        cp.node.value, cp.node.ghost = cp.cid, False
        self.ckpts[cp.cid] = cp
        session.cids.add(cp.cid)

    def find(self, key: SessionKey, tokens: tuple[int, ...]) -> tuple[Checkpoint | None, MissCause]:
        """The deepest visible checkpoint on the path of `tokens`, or None and the miss cause."""
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

    def near_duplicate(self, session: Session, tokens: tuple[int, ...], min_gap: int) -> bool:
        """Is `tokens` already saved, or fewer than `min_gap` tokens past a live ancestor?"""
        deepest = 0
        for node in session.tree.path(tokens):
            cp = self.ckpts.get(node.value) if node.value is not None else None
            if cp is not None and not cp.dead:
                deepest = node.depth
        if deepest == len(tokens):
            return True
        return deepest > 0 and len(tokens) - deepest < min_gap

    def forget(self, cp: Checkpoint, ghost: bool) -> None:
        """Remove a checkpoint with no copies left; leave a ghost marker if it was evicted."""
        self.ckpts.pop(cp.cid, None)
        session = self.sessions.get(cp.key)
        if session is None or cp.cid not in session.cids:
            return  # its session was deleted
        session.cids.discard(cp.cid)
        node = cp.node
        node.value = None
        if ghost and self.max_ghosts > 0:
            node.ghost = True
            session.ghosts.append(node)
            while len(session.ghosts) > self.max_ghosts:
                old = session.ghosts.popleft()
                if old.ghost and old.value is None:
                    old.ghost = False
                    session.tree.prune(old)
        else:
            session.tree.prune(node)
        self.drop_if_empty(session)

    def drop_if_empty(self, session: Session) -> None:
        if session.empty() and self.sessions.get(session.key) is session:
            del self.sessions[session.key]
