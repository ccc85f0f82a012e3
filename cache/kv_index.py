"""Which KV blocks each hybrid checkpoint references, and which tier slots hold them (plain Python, no torch).

A checkpoint of a hybrid model at position p references the attention KV of positions [0, p), cut into
blocks of s tokens: p // s full blocks, then, unless p is a multiple of s, one partial block of p % s
tokens. The KV of a block depends on the tokens before its end and on nothing else, so a full block is
named by its predecessor and its own s tokens: full blocks form a trie per prefix tree (`KVBlock.children`,
keyed by the block's token tuple, compared by content, never a hash). Every checkpoint of one conversation
walks the same trie path, so k checkpoints hold each full block of their common prefix once. A partial
block belongs to its checkpoint alone (two checkpoints at one position of a tree are one checkpoint): at
most one block per checkpoint is not shared.

Reference counts, per block: `users` counts the checkpoints whose chain contains it (it stays in the trie
while > 0); `refs[tier]` counts the copies in `tier` that hold it, and the block has a slot in `tier`
(`slots[tier]`, a block id of that tier's KV arena) exactly while `refs[tier] > 0`. A checkpoint's copy in a
tier holds every block of its chain there, so a block a kept copy needs is never freed. Leases pin
checkpoints (`cache.book`), which keeps their copies, so a block a restore reads stays too.

Names: a block's `name` is a digest of its tree and every token up to its end, chained block by block
(`block_name`); it names the block's disk file (`cache.kv_disk`) and is computed when first needed. The
index itself never compares names: lookups and sharing compare tokens.

Host memory: per full block one `KVBlock` (~300 bytes plus its s token ids, 8 bytes each), per partial
block the same, per checkpoint one `KVChain` (a list of its blocks, 8 bytes a block). The caller holds the
cache lock around every method.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from dataclasses import dataclass, field

from cache.base import Tier


class Fill:
    """A slot being written by the capture that took it (outside the lock). A capture that shares the block
    meanwhile waits for it before publishing; `ok` False: the write failed, the slot holds no valid KV."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False

    def finish(self, ok: bool) -> None:
        """The first call decides (a capture failing after its write leaves the block written)."""
        if not self.done.is_set():
            self.ok = ok
            self.done.set()


class KVBlock:
    __slots__ = ("children", "fills", "key", "length", "name", "parent", "refs", "slots", "start", "users")

    def __init__(
        self, parent: KVBlock | None, key: tuple[int, ...], start: int, name: str | None = None
    ) -> None:
        self.parent = (
            parent  # the full block before it (the root before the first); a partial one has one too
        )
        self.key = key  # its tokens (full blocks: the trie key under `parent`)
        self.name = name
        self.start = start  # position of its first token
        self.length = len(key)  # tokens it holds (< s only for a partial block)
        self.children: dict[tuple[int, ...], KVBlock] = {}
        self.users = 0
        self.refs: dict[Tier, int] = {}
        self.slots: dict[Tier, int] = {}
        self.fills: dict[Tier, Fill] = {}  # the write of a slot, while the capture that took it runs


@dataclass(eq=False)
class KVChain:
    """One checkpoint's blocks, in token order (the partial one last), and the blocks each of its copies
    holds (`holding[tier]`: the stored ones once reserved, every one once committed)."""

    tree: str
    blocks: list[KVBlock]
    holding: dict[Tier, list[KVBlock]] = field(default_factory=dict)


class KVIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.roots: dict[str, KVBlock] = {}  # tree name -> the trie's root (no tokens, never stored)
        self.chains: dict[int, KVChain] = {}  # checkpoint id -> its chain
        self.slots_used: dict[Tier, int] = {}

    def bind(self, cid: int, tree: str, tokens: tuple[int, ...]) -> None:
        """The chain of checkpoint `cid` after `tokens`: the trie's full blocks (created if new) and its own
        partial block."""
        s = self.block_size
        node = self.roots.get(tree)
        if node is None:
            node = self.roots[tree] = KVBlock(None, (), 0, block_name("", tree.encode()))
        blocks: list[KVBlock] = []
        for start in range(0, len(tokens) - s + 1, s):
            key = tokens[start : start + s]
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = KVBlock(node, key, start)
            blocks.append(child)
            node = child
        full = len(blocks) * s
        if full < len(tokens):
            blocks.append(KVBlock(node, tokens[full:], full))  # not in the trie: its checkpoint's own
        for block in blocks:
            block.users += 1
        self.chains[cid] = KVChain(tree, blocks)

    def unbind(self, cid: int) -> None:
        """Drop the chain of `cid` (it holds no tier); prune trie blocks no chain uses any more."""
        chain = self.chains.pop(cid, None)
        if chain is None:
            return
        assert not chain.holding, f"checkpoint {cid} is forgotten while holding KV in {sorted(chain.holding)}"
        for block in reversed(chain.blocks):
            block.users -= 1
            parent = block.parent
            if block.users == 0 and parent is not None and parent.children.get(block.key) is block:
                del parent.children[block.key]
        root = self.roots.get(chain.tree)
        if root is not None and not root.children:
            del self.roots[chain.tree]

    def hold_stored(self, cid: int, tier: Tier) -> list[KVBlock]:
        """Hold, for the copy of `cid` in `tier`, the blocks the tier stores already; return the others."""
        chain = self.chains[cid]
        held = chain.holding.setdefault(tier, [])
        assert not held, f"checkpoint {cid} reserved twice in {tier}"
        missing = []
        for block in chain.blocks:
            if tier in block.slots:
                block.refs[tier] += 1
                held.append(block)
            else:
                missing.append(block)
        return missing

    def store(self, cid: int, tier: Tier, block: KVBlock, slot: int) -> None:
        """`block` (missing from `tier`) is stored in `slot`, held for `cid`."""
        block.slots[tier], block.refs[tier] = slot, 1
        self.chains[cid].holding[tier].append(block)
        self.slots_used[tier] = self.slots_used.get(tier, 0) + 1

    def release(self, cid: int, tier: Tier) -> list[int]:
        """The copy of `cid` left `tier`: drop its holds; return the slots no copy holds any more."""
        chain = self.chains.get(cid)
        held = chain.holding.pop(tier, []) if chain is not None else []
        freed = []
        for block in held:
            block.refs[tier] -= 1
            if block.refs[tier] == 0:
                del block.refs[tier]
                block.fills.pop(tier, None)
                freed.append(block.slots.pop(tier))
        self.slots_used[tier] = self.slots_used.get(tier, 0) - len(freed)
        return freed

    def held(self, cid: int, tier: Tier) -> list[KVBlock]:
        chain = self.chains.get(cid)
        return chain.holding.get(tier, []) if chain is not None else []


def name_of(block: KVBlock) -> str:
    """`block`'s name, computing it (and its unnamed ancestors') from the nearest named one."""
    unnamed: list[KVBlock] = []
    node: KVBlock | None = block
    while node is not None and node.name is None:
        unnamed.append(node)
        node = node.parent
    assert node is not None and node.name is not None, "a trie's root is named"
    name = node.name
    for b in reversed(unnamed):
        name = b.name = block_name(name, array("q", b.key).tobytes())
    return name


def block_name(parent: str, content: bytes) -> str:
    return hashlib.blake2b(parent.encode() + b"|" + content, digest_size=16).hexdigest()
