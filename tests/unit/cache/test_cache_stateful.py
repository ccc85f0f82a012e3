"""Random operation sequences (hypothesis stateful): budgets never exceeded, restores always exact, leases
pinned, one checkpoint per prefix of a tree, sessions and checkpoints referencing each other consistently.

Several sessions of two namespaces share trees: each namespace's own, and one tree both name. Every tier uses
the lossless codec, so any state a lookup returns must equal, bit for bit, the state that was captured after
exactly that token prefix in that tree (states are a pure function of tree and prefix here: whichever
session captured it, a lookup from another tree would get a different state).
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cache import CacheConfig, Lease, StateCache

SPEC = {"conv": ((2, 6, 3), torch.float32), "ssm": ((2, 2, 4, 8), torch.float32)}
BLOCK = 512 + 768  # fp32 encoding of SPEC (256-byte aligned fields)
DISK_UNIT = BLOCK + 16384 + 64

callers = st.tuples(st.sampled_from(["k1", "k2"]), st.sampled_from(["a", "b", None]))  # (namespace, session)
trees = st.sampled_from([None, "common"])  # None: the caller's namespace
token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=10)
Caller = tuple[str, str | None]


def _state_for(tree: str, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(repr((tree, tokens)).encode()))
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tssc-cache-"))
        cfg = CacheConfig(
            hot_bytes=2 * BLOCK,
            cold_bytes=2 * BLOCK,
            disk_dir=self.dir,
            disk_bytes=3 * DISK_UNIT,
            hot_window=2,
            hot_dtype="fp32",
            cold_dtype="fp32",
            max_ghosts=4,
        )
        self.cache = StateCache(cfg, SPEC)
        self.held: list[tuple[Lease, str, tuple[int, ...]]] = []

    def _lookup(self, caller: Caller, tree: str | None, tokens: tuple[int, ...]) -> Lease | None:
        lease = self.cache.lookup(*caller, tokens, tree=tree)
        if lease is not None:  # the session now references what it restored from
            info = self.cache.session_info(*caller)
            assert info is not None
            assert any(c["position"] == lease.position for c in info["checkpoints"])
        return lease

    def _check_lease(self, lease: Lease, tree: str, tokens: tuple[int, ...]) -> None:
        assert 1 <= lease.position <= len(tokens)
        got = self.cache.fetch(lease)
        want = _state_for(tree, tokens[: lease.position])
        for k in want:
            assert torch.equal(got[k], want[k]), k

    @rule(caller=callers, tree=trees, tokens=token_lists)
    def capture(self, caller: Caller, tree: str | None, tokens: list[int]) -> None:
        toks, name = tuple(tokens), tree or caller[0]
        if self.cache.capture(*caller, toks, _state_for(name, toks), reason="x", tree=tree):
            lease = self._lookup(caller, tree, toks)
            assert lease is not None and lease.position == len(toks) and lease.scope == "session"
            self._check_lease(lease, name, toks)
            self.cache.release(lease)

    @rule(caller=callers, tree=trees, tokens=token_lists)
    def lookup_fetch(self, caller: Caller, tree: str | None, tokens: list[int]) -> None:
        lease = self._lookup(caller, tree, tuple(tokens))
        if lease is not None:
            self._check_lease(lease, tree or caller[0], tuple(tokens))
            self.cache.release(lease)

    @rule(caller=callers, tree=trees, tokens=token_lists)
    def hold(self, caller: Caller, tree: str | None, tokens: list[int]) -> None:
        lease = self._lookup(caller, tree, tuple(tokens))
        if lease is not None and len(self.held) < 3:
            self.held.append((lease, tree or caller[0], tuple(tokens)))
        elif lease is not None:
            self.cache.release(lease)

    @rule()
    def release_held(self) -> None:
        if self.held:
            lease, tree, toks = self.held.pop(0)
            self._check_lease(lease, tree, toks)  # still intact however much happened meanwhile
            self.cache.release(lease)

    @rule(caller=callers)
    def delete(self, caller: Caller) -> None:
        self.cache.delete_session(*caller)

    @rule(hot=st.integers(0, 4), cold=st.integers(0, 4), disk=st.integers(0, 4))
    def resize(self, hot: int, cold: int, disk: int) -> None:
        self.cache.resize(hot_bytes=hot * BLOCK, cold_bytes=cold * BLOCK, disk_bytes=disk * DISK_UNIT)

    @rule()
    def close(self) -> None:
        self.cache.close()

    @invariant()
    def budgets_hold(self) -> None:
        stats = self.cache.stats()
        for tier, ts in stats.tiers.items():
            assert 0 <= ts.bytes_used <= ts.bytes_capacity, tier
        self.cache.flush()  # files queued for unlink are gone, queued writes exist
        stats = self.cache.stats()
        on_disk = sum(p.stat().st_size for p in self.dir.glob("*/*.safetensors"))
        assert on_disk <= stats.tiers["disk"].bytes_used
        assert stats.leases == len(self.held)

    @invariant()
    def one_checkpoint_per_prefix(self) -> None:
        live = [cp for cp in self.cache._book.ckpts.values() if not cp.dead]
        prefixes = [(cp.tree, cp.node.tokens()) for cp in live]
        assert len(prefixes) == len(set(prefixes))

    @invariant()
    def references_are_mutual(self) -> None:
        index = self.cache._book.index
        for key, session in index.sessions.items():
            assert session.cids and all(key in index.ckpts[cid].owners for cid in session.cids)
        for cp in index.ckpts.values():
            assert cp.dead != bool(cp.owners)
            assert all(cp.cid in index.sessions[key].cids for key in cp.owners)

    def teardown(self) -> None:
        for lease, _, _ in self.held:
            self.cache.release(lease)
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestCacheMachine = CacheMachine.TestCase
