"""Random operation sequences (hypothesis stateful): budgets never exceeded, restores always exact.

Every tier uses the lossless codec, so any state a lookup returns must equal, bit for bit, the state that
was captured after exactly that token prefix (states are a pure function of session and prefix here).
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

sessions = st.sampled_from(["a", "b", "c"])
token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=10)


def _state_for(session: str, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(repr((session, tokens)).encode()))
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
        self.held: list[tuple[Lease, tuple[int, ...]]] = []

    def _check_lease(self, lease: Lease, tokens: tuple[int, ...]) -> None:
        assert 1 <= lease.position <= len(tokens)
        got = self.cache.fetch(lease)
        want = _state_for(lease.session or "", tokens[: lease.position])
        for k in want:
            assert torch.equal(got[k], want[k]), k

    @rule(session=sessions, tokens=token_lists)
    def capture(self, session: str, tokens: list[int]) -> None:
        toks = tuple(tokens)
        if self.cache.capture("ns", session, toks, _state_for(session, toks), reason="x"):
            lease = self.cache.lookup("ns", session, toks)
            assert lease is not None and lease.position == len(toks)
            self._check_lease(lease, toks)
            self.cache.release(lease)

    @rule(session=sessions, tokens=token_lists)
    def lookup_fetch(self, session: str, tokens: list[int]) -> None:
        lease = self.cache.lookup("ns", session, tokens)
        if lease is not None:
            self._check_lease(lease, tuple(tokens))
            self.cache.release(lease)

    @rule(session=sessions, tokens=token_lists)
    def hold(self, session: str, tokens: list[int]) -> None:
        lease = self.cache.lookup("ns", session, tokens)
        if lease is not None and len(self.held) < 3:
            self.held.append((lease, tuple(tokens)))
        elif lease is not None:
            self.cache.release(lease)

    @rule()
    def release_held(self) -> None:
        if self.held:
            lease, toks = self.held.pop(0)
            self._check_lease(lease, toks)  # still intact however much happened meanwhile
            self.cache.release(lease)

    @rule(session=sessions)
    def delete(self, session: str) -> None:
        self.cache.delete_session("ns", session)

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

    def teardown(self) -> None:
        for lease, _ in self.held:
            self.cache.release(lease)
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestCacheMachine = CacheMachine.TestCase
