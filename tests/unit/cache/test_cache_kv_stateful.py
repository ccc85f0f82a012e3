"""Hybrid checkpoints under random operations (hypothesis stateful): capture, lookup and restore, hold and
release leases, delete sessions, demote and evict by shrinking and growing budgets (the cold tier spills to
disk), restart on the same files. After every step:

- budgets hold, KV bytes and state bytes together (`bytes_used <= bytes_capacity`, and the capacity is
  the budget whenever no lease is held);
- every copy of a kept checkpoint has its whole KV chain in its tier (eviction never drops a block a kept
  copy needs), and each block's reference count is exactly the number of copies in the tier holding it;
- each block is stored once per tier (no two slots or files for one token prefix of a tree), nothing else
  is, and the block files on disk are exactly the written ones;
- every restore returns, bit for bit, the state and the KV of [0, position) captured for that prefix.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from cache import KVSpec, Lease, StateCache
from cache.base import TIERS
from cache.kv_blocks import KVBlocks
from cache.kv_index import KVBlock
from tests.unit.cache.kv_helpers import KV, ListSink, TokenKV, make_hybrid_cache, make_kv, make_state

SMALL = KVSpec(KV.n_layers, KV.n_kv_heads, KV.head_dim, KV.dtype, block_size=3)
KV_BLOCK = 512  # (L, 2, s, kv, dh) fp32: 384 bytes, in a 256-byte aligned field
STATE_BLOCK = 768
ARENAS = ("hot", "cold")

sessions = st.sampled_from(["a", "b", None])
callers = st.tuples(st.sampled_from(["k1", "k2"]), sessions)
trees = st.sampled_from([None, "common"])
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # few symbols: prefixes are shared
Caller = tuple[str, str | None]
Conversation = tuple[Caller, str | None, tuple[int, ...]]  # who captured it, its tree (None: namespace's)


class HybridCacheMachine(RuleBasedStateMachine):
    conversations = Bundle("conversations")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tssc-kv-"))
        self.budget = {
            "hot": 2 * STATE_BLOCK + 6 * KV_BLOCK,
            "cold": 3 * STATE_BLOCK + 10 * KV_BLOCK,
            "disk": 300_000,  # ~8 checkpoints and 10 blocks reserved, more once written
        }
        self.cache = self._make()
        self.held: list[tuple[Lease, str, tuple[int, ...]]] = []

    def _make(self) -> StateCache:
        budgets = {f"{tier}_bytes": b for tier, b in self.budget.items()}
        return make_hybrid_cache(kv=SMALL, hot_window=2, disk_dir=self.dir, **budgets)

    @property
    def kv(self) -> KVBlocks:
        return self.cache._book.tiers.extra  # type: ignore[return-value]

    def _check(self, lease: Lease, tree: str, tokens: tuple[int, ...]) -> None:
        sink = ListSink()
        got = self.cache.fetch(lease, kv=sink)
        prefix = tokens[: lease.position]
        want = make_state(tree, prefix)
        assert all((got[k] == want[k]).all() for k in want)
        assert (sink.kv == make_kv(prefix, SMALL)).all()

    def _capture(self, caller: Caller, tree: str | None, toks: tuple[int, ...]) -> Conversation:
        source = TokenKV(toks, SMALL)
        self.cache.capture(
            *caller, toks, make_state(tree or caller[0], toks), reason="x", tree=tree, kv=source
        )
        return caller, tree, toks

    @rule(target=conversations, caller=callers, tree=trees, tokens=token_lists)
    def capture(self, caller: Caller, tree: str | None, tokens: list[int]) -> Conversation:
        return self._capture(caller, tree, tuple(tokens))

    @rule(target=conversations, conv=conversations, more=st.lists(st.integers(0, 2), min_size=1, max_size=7))
    def follow_up(self, conv: Conversation, more: list[int]) -> Conversation:
        """The next turn of a conversation: a deeper checkpoint on the same KV prefix."""
        caller, tree, toks = conv
        return self._capture(caller, tree, toks + tuple(more))

    def _lookup(
        self, session: str | None, conv: Conversation, cut: int, more: list[int]
    ) -> tuple[Lease | None, str, tuple[int, ...]]:
        """A request of a session of the conversation's key along it: cut back `cut` tokens (regenerate,
        edit), then `more`."""
        (namespace, _), tree, toks = conv
        request = toks[: max(1, len(toks) - cut)] + tuple(more)
        return self.cache.lookup(namespace, session, request, tree=tree), tree or namespace, request

    @rule(
        session=sessions,
        conv=conversations,
        cut=st.integers(0, 4),
        more=st.lists(st.integers(0, 2), max_size=3),
    )
    def restore(self, session: str | None, conv: Conversation, cut: int, more: list[int]) -> None:
        lease, tree, request = self._lookup(session, conv, cut, more)
        if lease is not None:
            self._check(lease, tree, request)
            self.cache.release(lease)

    @rule(session=sessions, conv=conversations, cut=st.integers(0, 4))
    def hold(self, session: str | None, conv: Conversation, cut: int) -> None:
        lease, tree, request = self._lookup(session, conv, cut, [])
        if lease is not None and len(self.held) < 3:
            self.held.append((lease, tree, request))
        elif lease is not None:
            self.cache.release(lease)

    @rule()
    def release_held(self) -> None:
        if self.held:
            lease, tree, toks = self.held.pop(0)
            self._check(lease, tree, toks)  # intact, whatever was evicted or demoted meanwhile
            self.cache.release(lease)

    @rule(caller=callers)
    def delete(self, caller: Caller) -> None:
        self.cache.delete_session(*caller)

    @rule(tier=st.sampled_from(ARENAS), states=st.integers(1, 6), blocks=st.integers(0, 20))
    def resize(self, tier: str, states: int, blocks: int) -> None:
        """Shrinking evicts (hot: demotes to cold; cold: spills to disk); growing makes room again."""
        self.budget[tier] = states * STATE_BLOCK + blocks * KV_BLOCK
        self.cache.resize(**{f"{tier}_bytes": self.budget[tier]})

    @rule()
    def restart(self) -> None:
        """Close (every checkpoint goes to disk, budget permitting) and start again on the same files."""
        for lease, _, _ in self.held:
            self.cache.release(lease)
        self.held = []
        self.cache.close()
        self.cache = self._make()

    @invariant()
    def block_files_are_the_written_blocks(self) -> None:
        self.cache.flush()
        assert self.kv.disk is not None
        written = {f.path for f in self.kv.disk.files.values() if f.path is not None}
        assert set(self.dir.glob("*/kv/*.safetensors")) == written

    @invariant()
    def budgets_hold(self) -> None:
        stats = self.cache.stats()
        for tier in TIERS:
            ts = stats.tiers[tier]  # type: ignore[index]
            assert 0 <= ts.kv_bytes <= ts.bytes_used <= ts.bytes_capacity
            if not self.held:
                assert ts.bytes_capacity <= self.budget[tier]
        assert stats.leases == len(self.held)

    @invariant()
    def kept_copies_hold_their_whole_kv_chain(self) -> None:
        book = self.cache._book
        expected: dict[str, Counter[int]] = {t: Counter() for t in TIERS}
        for cp in book.ckpts.values():
            chain = self.kv.index.chains[cp.cid]
            assert sum(b.length for b in chain.blocks) == cp.position
            for tier in cp.tiers():
                assert {id(b) for b in chain.blocks} == {id(b) for b in self.kv.index.held(cp.cid, tier)}
                assert all(tier in b.slots for b in chain.blocks)
                expected[tier].update(id(b) for b in chain.blocks)
        assert set(self.kv.index.chains) == set(book.ckpts)
        for tier in TIERS:
            stored = self._stored(tier)
            assert {id(b): b.refs[tier] for b in stored} == dict(expected[tier])
            disk = self.kv.disk
            count = len(disk.files) if tier == "disk" and disk is not None else self.kv.arenas[tier].used
            assert count == len(stored) == self.kv.index.slots_used.get(tier, 0)
            slots = [b.slots[tier] for b in stored]
            assert len(slots) == len(set(slots))

    @invariant()
    def each_full_block_is_stored_once(self) -> None:
        for tier in TIERS:
            full = [b for b in self._stored(tier) if b.length == SMALL.block_size]
            prefixes = [self._prefix(b) for b in full]
            assert len(prefixes) == len(set(prefixes))

    def _stored(self, tier: str) -> list[KVBlock]:
        blocks = {id(b): b for c in self.kv.index.chains.values() for b in c.blocks}
        return [b for b in blocks.values() if tier in b.slots]

    def _prefix(self, block: KVBlock) -> tuple[object, ...]:
        keys: list[object] = []
        node: KVBlock | None = block
        while node is not None:
            keys.append(node.key if node.parent is not None else id(node))  # the root names the tree
            node = node.parent
        return tuple(reversed(keys))

    def teardown(self) -> None:
        for lease, _, _ in self.held:
            self.cache.release(lease)
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)


HybridCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestHybridCacheMachine = HybridCacheMachine.TestCase
