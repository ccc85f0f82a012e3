"""The checkpoint index: sessions, their prefix trees and ghost markers, and the checkpoint table.

Answers "which checkpoint covers the longest prefix of these tokens" and keeps the trees tidy as checkpoints
come and go. Knows nothing of tiers, budgets or files (that is `Book`). Plain Python; the caller holds the
cache lock around every method.
"""

from __future__ import annotations

from collections import OrderedDict

from cache.base import MissCause
from cache.checkpoint import Checkpoint, Session, SessionKey

# Keys of sessions forgotten after their last checkpoint was evicted, so that a later lookup still counts an
# `evicted` miss; an LRU of keys only (no tokens, no tree): about 200 bytes each.
MAX_GONE_SESSIONS = 4096


class SessionIndex:
    """Sessions live exactly as long as they hold a checkpoint (`Session.empty`): the last checkpoint leaving
    every tier forgets the session, its prefix tree and ghost markers. Host memory for bookkeeping is thus
    bounded by what the tiers hold: per checkpoint one `Checkpoint` record and one tree node (~1 KB), per
    session one tree whose edges store each distinct token of its checkpoints' and ghosts' prefixes once
    (8 bytes a token, plus 32 for a token id above 256 that nothing else references), at most `max_ghosts`
    ghosts per session; plus `MAX_GONE_SESSIONS` keys of forgotten sessions."""

    def __init__(self, max_ghosts: int) -> None:
        self.max_ghosts = max_ghosts
        self.sessions: dict[SessionKey, Session] = {}
        self.ckpts: dict[int, Checkpoint] = {}
        self.gone: OrderedDict[SessionKey, None] = OrderedDict()  # sessions whose checkpoints were evicted

    def session(self, key: SessionKey) -> Session:
        """The session `key`, created if new (it is dropped again once it has no checkpoints)."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(key)
            self.gone.pop(key, None)
        return session

    def add(self, session: Session, cp: Checkpoint) -> None:
        """Enter `cp` at its node (`cp.node`, a node of `session.tree`)."""
        cp.node.value, cp.node.ghost = cp.cid, False
        self.ckpts[cp.cid] = cp
        session.cids.add(cp.cid)

    def find(self, key: SessionKey, tokens: tuple[int, ...]) -> tuple[Checkpoint | None, MissCause]:
        """The deepest visible checkpoint on the path of `tokens`, or None and the miss cause."""
        session = self.sessions.get(key)
        if session is None:
            return None, "evicted" if key in self.gone else "never_saved"
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
        if not session.empty() or self.sessions.get(session.key) is not session:
            return
        del self.sessions[session.key]
        if session.ghosts:  # its checkpoints were evicted (a deleted session is popped, never dropped here)
            self.gone[session.key] = None
            self.gone.move_to_end(session.key)
            while len(self.gone) > MAX_GONE_SESSIONS:
                self.gone.popitem(last=False)
