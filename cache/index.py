"""The checkpoint index: prefix trees (one per tree name), sessions, ghost markers and the checkpoint table.

Answers "which checkpoint of this tree covers the longest prefix of these tokens", whichever session made it,
records which sessions reference which checkpoints, and keeps the trees tidy as checkpoints come and go.
Knows nothing of tiers, budgets or files (that is `Book`). Plain Python; the caller holds the cache lock
around every method.

Lifetimes: a tree lives while it holds a checkpoint, a session while it references one, a checkpoint while
a session references it and a tier holds a copy of it (or a lease pins it). Forgetting a tree drops its
nodes and ghost markers; if it had ghosts, its name enters a bounded LRU (`MAX_GONE_TREES`), so a later
lookup in it still counts an `evicted` miss.

Ghost markers (miss causes): a checkpoint evicted from its last tier leaves a ghost on its node, so a
lookup that finds no visible checkpoint but passes a ghost deeper than any visible one counts `evicted`
rather than `never_saved`. A tree keeps at most `max(max_ghosts, checkpoints it holds now)` ghosts, the
most recent ones: a constant per tree for small trees (a per-salt tree, a quiet key), and about one
generation of evictions for a big shared one (a key with thousands of conversations), never more than what
the tiers hold. An older eviction beyond the bound reads as `never_saved`.

Host memory (DESIGN invariant 10), bounded by what the tiers hold, since every tree and session holds at
least one checkpoint:
- per tree: one `PrefixTree` whose edges store each distinct token of its checkpoints' and ghosts' prefixes
  once, however many sessions share them (8 bytes a token, plus 32 for a token id above 256 that nothing
  else references), and up to `max(max_ghosts, checkpoints)` ghost nodes;
- per session: a `Session` and a set of checkpoint ids (~60 bytes an id), at most `max_sessions` sessions
  (`Book` forgets the least recently used beyond);
- per checkpoint: one `Checkpoint` record (~1 KB), its tree node, and its owner set (one `SessionKey` per
  referencing session, ~60 bytes each; a system prompt restored by n sessions costs O(n));
- `MAX_GONE_TREES` names of forgotten trees (~200 bytes each).
"""

from __future__ import annotations

from collections import OrderedDict

from cache.base import MissCause
from cache.checkpoint import Checkpoint, Session, SessionKey, Tree
from cache.prefix import Node

MAX_GONE_TREES = 4096


class CheckpointIndex:
    def __init__(self, max_ghosts: int) -> None:
        self.max_ghosts = max_ghosts
        self.trees: dict[str, Tree] = {}
        self.sessions: OrderedDict[SessionKey, Session] = OrderedDict()  # least recently used first
        self.ckpts: dict[int, Checkpoint] = {}
        self.gone: OrderedDict[str, None] = OrderedDict()  # trees whose checkpoints were all evicted

    # ---- queries -------------------------------------------------------------------------------------

    def find(self, name: str, tokens: tuple[int, ...]) -> tuple[Checkpoint | None, MissCause]:
        """The deepest visible checkpoint of tree `name` on the path of `tokens`, or None and the miss cause."""
        tree = self.trees.get(name)
        if tree is None:
            return None, "evicted" if name in self.gone else "never_saved"
        nodes = list(tree.prefix.path(tokens))
        for node in reversed(nodes):  # the deepest first: the nodes above it are not looked at
            cp = self._occupant(node)
            if cp is not None and cp.visible():
                return cp, ""
        return None, "evicted" if any(node.ghost for node in nodes) else "never_saved"

    def near(self, name: str, tokens: tuple[int, ...]) -> tuple[Checkpoint | None, int, Node | None]:
        """The live checkpoint (published or being captured) of tree `name` at exactly `tokens`, if any, the
        depth of the deepest live one on their path (0: none), and the deepest node on it (None: no such tree),
        where `node` can walk on from."""
        tree = self.trees.get(name)
        exact, deepest, last = None, 0, None
        for node in tree.prefix.path(tokens) if tree is not None else ():
            last = node
            cp = self._occupant(node)
            if cp is not None:
                deepest = node.depth
                exact = cp if node.depth == len(tokens) else None
        return exact, deepest, last

    def _occupant(self, node: Node) -> Checkpoint | None:
        """The live checkpoint at `node`: being captured, or published with a copy left."""
        cp = self.ckpts.get(node.value) if node.value is not None else None
        if cp is None or cp.dead or (cp.published and not cp.tiers()):
            return None
        return cp

    # ---- trees, sessions, references ---------------------------------------------------------------

    def node(self, name: str, tokens: tuple[int, ...], start: Node | None = None) -> Node:
        """The node of `tokens` in tree `name`, both created if new (the tree is dropped again once it holds
        no checkpoint: enter one at the node with `add` before anything can evict). `start`: the deepest node
        `near` found on their path, with nothing changed since: the walk goes on from it (a capture walks a
        long prompt's path once, not twice)."""
        tree = self.trees.get(name)
        if tree is None:
            tree = self.trees[name] = Tree(name)
            self.gone.pop(name, None)
        return tree.prefix.insert(tokens, start)

    def add(self, cp: Checkpoint) -> None:
        """Enter `cp` at its node (`cp.node`, from `node`), referenced by its creator."""
        cp.node.value, cp.node.ghost = cp.cid, False
        self.ckpts[cp.cid] = cp
        self.trees[cp.tree].cids.add(cp.cid)
        self.join(cp, cp.creator)

    def join(self, cp: Checkpoint, key: SessionKey) -> bool:
        """Session `key` (created if new) references `cp`. True if it did not already."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(key)
        self.sessions.move_to_end(key)
        new = cp.cid not in session.cids
        session.cids.add(cp.cid)
        cp.owners.add(key)
        return new

    def leave(self, key: SessionKey) -> list[Checkpoint]:
        """Forget session `key` and its references; return the checkpoints nobody references any more."""
        session = self.sessions.pop(key, None)
        orphans: list[Checkpoint] = []
        for cid in session.cids if session is not None else ():
            cp = self.ckpts[cid]
            cp.owners.discard(key)
            if not cp.owners:
                orphans.append(cp)
        return orphans

    # ---- removal -------------------------------------------------------------------------------------

    def kill(self, cp: Checkpoint) -> None:
        """`cp` is dead (nobody references it, or its capture failed): out of its tree and every session it
        was in, without a ghost; it stays in the table until `forget` (a lease may still read it)."""
        cp.dead = True
        self._unlink(cp, ghost=False)

    def forget(self, cp: Checkpoint) -> None:
        """Remove `cp` from the table: freed (dead), or its last copy was evicted or lost (leaves a ghost)."""
        self.ckpts.pop(cp.cid, None)
        if not cp.dead:
            self._unlink(cp, ghost=True)

    def _unlink(self, cp: Checkpoint, ghost: bool) -> None:
        for key in cp.owners:
            session = self.sessions.get(key)
            if session is not None:
                session.cids.discard(cp.cid)
                if session.empty():
                    del self.sessions[key]
        cp.owners.clear()
        tree = self.trees.get(cp.tree)
        if tree is None or cp.cid not in tree.cids:
            return
        tree.cids.discard(cp.cid)
        if cp.node.value == cp.cid:
            cp.node.value = None
            self._leave_node(tree, cp.node, ghost)
        self._drop_if_empty(tree)

    def _leave_node(self, tree: Tree, node: Node, ghost: bool) -> None:
        """A checkpoint left `node`: mark it as a ghost (trimming the oldest beyond the bound), or prune it."""
        if not (ghost and self.max_ghosts > 0):
            tree.prefix.prune(node)
            return
        node.ghost = True
        tree.ghosts.append(node)
        bound = max(self.max_ghosts, len(tree.cids))
        while len(tree.ghosts) > bound:
            old = tree.ghosts.popleft()
            if old.ghost and old.value is None:
                old.ghost = False
                tree.prefix.prune(old)

    def _drop_if_empty(self, tree: Tree) -> None:
        if not tree.empty() or self.trees.get(tree.name) is not tree:
            return
        del self.trees[tree.name]
        if any(node.ghost for node in tree.ghosts):
            self.gone[tree.name] = None
            self.gone.move_to_end(tree.name)
            while len(self.gone) > MAX_GONE_TREES:
                self.gone.popitem(last=False)
