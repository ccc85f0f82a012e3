"""`StateCache`: the facade the engine calls (contract and thread-safety rules in `cache.base`).

One `threading.Lock` guards the bookkeeping (`cache.book.Book`); tensor copies (`cache.copies`) and disk I/O
(`cache.disk`) run outside it on storage pinned by the checkpoint's pin count. Observer callbacks are
dispatched after the lock is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cache import copies
from cache.arena import BlockArena
from cache.base import (
    TIERS,
    CacheObserver,
    CheckpointCache,
    CheckpointUnavailable,
    Lease,
    State,
    StateSpec,
    Tier,
)
from cache.book import Book, Spill
from cache.checkpoint import Checkpoint, SessionKey
from cache.codec import make_codec
from cache.config import CacheConfig
from cache.disk import CorruptFile, DiskStore
from cache.layout import BlockLayout
from cache.policy import capture_positions
from cache.stats import CacheStats, LatencyRecorder, TierStats, sample_deques
from cache.transfer import Transfers

log = logging.getLogger(__name__)


class StateCache(CheckpointCache):
    """Tiered checkpoint store for one model (one state spec). Thread-safe; see `cache.base`."""

    def __init__(self, config: CacheConfig, spec: StateSpec, observer: CacheObserver | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.spec = {name: (tuple(shape), dtype) for name, (shape, dtype) in spec.items()}
        self.observer = observer or CacheObserver()
        fused = config.fused_codecs and self.device.type == "cuda"
        self.hot_layout = BlockLayout(self.spec, make_codec(config.hot_dtype, fused))
        self.cold_layout = BlockLayout(self.spec, make_codec(config.cold_dtype, fused))
        self._transfers = Transfers(self.device)
        self._recorder = LatencyRecorder(self._transfers.cuda)
        self._fetch_samples = sample_deques(config.latency_samples)
        self._capture_samples = sample_deques(config.latency_samples)["hot"]
        self._lock = threading.Lock()
        self._book = Book(config, self._make_hot(), self._make_cold(), self.cold_layout, self._make_store())
        self._load_disk()

    # ---- public API ----------------------------------------------------------------------------------

    def lookup(self, namespace: str, session: str | None, tokens: Sequence[int]) -> Lease | None:
        key, toks = (namespace, session), tuple(tokens)
        with self._lock:
            cp, cause = self._book.find(key, toks)
            if cp is None:
                self._book.count_lookup("miss", cause)
                lease = None
            else:
                lease = self._book.lease(cp)
        self._dispatch()
        return lease

    def fetch(self, lease: Lease, out: State | None = None) -> dict[str, torch.Tensor]:
        result = dict(out) if out is not None else self.hot_layout.empty_state(self.device)
        with self._lock:
            cp = self._book.leased(lease)
            source = self._source(cp, lease.tier)
        token = self._recorder.start()
        try:
            fence = self._read(lease.tier, cp, source, result)
        except CorruptFile as exc:
            log.warning("disk checkpoint unusable: %s", exc)
            with self._lock:
                self._book.drop_corrupt_disk(cp)
            self._dispatch()
            raise CheckpointUnavailable(str(exc)) from exc
        with self._lock:
            if isinstance(fence, torch.cuda.Event):
                cp.fences[lease.tier] = fence
            self._book.tokens_reused += lease.position
        self.observer.on_reuse(lease.position)
        tier = lease.tier
        self._recorder.stop(token, lambda seconds: self._on_fetch(tier, seconds))
        self._dispatch()
        return result

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._book.end_lease(lease)
            spills = self._take_spills()
        self._write_spills(spills)
        self._dispatch()

    def capture(
        self, namespace: str, session: str | None, tokens: Sequence[int], state: State, *, reason: str
    ) -> bool:
        toks = tuple(tokens)
        values = self._check_state(state)
        if not toks:
            return False
        token = self._recorder.start()
        with self._lock:
            cp = self._book.admit((namespace, session), toks, reason)
            job = self._capture_job(cp) if cp is not None else None
            spills = self._take_spills()
        self._write_spills(spills)
        if cp is None or job is None:
            self._dispatch()
            return False
        try:
            started, ready = copies.write_capture(self._transfers, values, job[0], job[1], job[2])
        except BaseException:
            with self._lock:
                self._book.abort(cp)
            raise
        with self._lock:
            ok = self._book.publish(cp, ready)
            spills = self._take_spills()
        self._write_spills(spills)
        if started is not None and ready is not None:
            self._recorder.pair(started, ready, self._on_capture)
        else:
            self._recorder.stop(token, self._on_capture)
        self._dispatch()
        return ok

    def capture_positions(self, start: int, end: int, boundaries: Sequence[int]) -> list[int]:
        cfg = self.config
        return capture_positions(start, end, boundaries, cfg.checkpoint_interval, cfg.min_gap)

    def delete_session(self, namespace: str, session: str | None) -> int:
        with self._lock:
            freed = self._book.delete_session((namespace, session))
        self._dispatch()
        return freed

    def session_info(self, namespace: str, session: str | None) -> dict[str, Any] | None:
        key: SessionKey = (namespace, session)
        with self._lock:
            sess = self._book.sessions.get(key)
            if sess is None or not sess.cids:
                return None
            cps = sorted((self._book.ckpts[c] for c in sess.cids), key=lambda cp: cp.position)
            return self._describe(key, [cp for cp in cps if cp.published])

    def stats(self) -> CacheStats:
        self._recorder.poll()
        with self._lock:
            book = self._book
            counts = book.tier_counts()
            tiers = {t: self._tier_stats(t, counts[t]) for t in TIERS}
            return CacheStats(
                tiers=tiers,
                lookups=dict(book.lookups),
                tokens_reused=book.tokens_reused,
                captures=book.captures,
                captures_skipped=book.captures_skipped,
                disk_corrupt=book.disk_corrupt,
                sessions=len(book.sessions),
                leases=len(book.leases),
                fetch_seconds={t: tuple(d) for t, d in self._fetch_samples.items()},
                capture_seconds=tuple(self._capture_samples),
            )

    def resize(
        self, *, hot_bytes: int | None = None, cold_bytes: int | None = None, disk_bytes: int | None = None
    ) -> None:
        """Change budgets at run time. Shrinking evicts unpinned checkpoints; while pinned ones keep a tier
        above the new budget, its capacity stays at its occupancy and drops as they are released. A tier that
        was disabled at construction (budget below one checkpoint) stays disabled."""
        for value in (hot_bytes, cold_bytes, disk_bytes):
            if value is not None and value < 0:
                raise ValueError("budgets must be >= 0")
        with self._lock:
            self._book.resize(hot_bytes, cold_bytes, disk_bytes)
            spills = self._take_spills()
        self._write_spills(spills)
        self._dispatch()

    def close(self, flush: bool = True) -> None:
        """With a disk tier and `flush`, write every checkpoint that has no disk copy yet (budget permitting),
        so sessions survive a restart. The cache stays usable."""
        if not flush or self._book.store is None:
            return
        with self._lock:
            self._book.flush_spills()
            spills = self._take_spills()
        self._write_spills(spills)
        self._dispatch()

    # ---- construction --------------------------------------------------------------------------------

    def _make_hot(self) -> BlockArena | None:
        size = self.hot_layout.block_bytes
        if self.config.hot_window == 0 or self.config.hot_bytes < size:
            return None
        return BlockArena(size, self.config.hot_bytes, self.device, pin=False)

    def _make_cold(self) -> BlockArena | None:
        size = self.cold_layout.block_bytes
        if self.config.cold_bytes < size:
            return None
        return BlockArena(size, self.config.cold_bytes, torch.device("cpu"), pin=self._transfers.cuda)

    def _make_store(self) -> DiskStore | None:
        if not self.config.disk_enabled or self.config.disk_dir is None:
            return None
        return DiskStore(self.config.disk_dir, self.cold_layout.fingerprint())

    def _load_disk(self) -> None:
        store = self._book.store
        if store is None:
            return
        records, corrupt = store.scan()
        with self._lock:
            self._book.disk_corrupt += corrupt
            for rec in reversed(records):  # newest first: they keep their place if the budget shrank
                if not self._book.adopt_disk(rec):
                    store.delete(rec.path)
        for _ in range(corrupt):
            self.observer.on_corrupt()
        log.info("disk tier: %d checkpoints indexed, %d corrupt files skipped", len(records), corrupt)

    # ---- helpers -------------------------------------------------------------------------------------

    def _check_state(self, state: State) -> dict[str, torch.Tensor]:
        if set(state) != set(self.spec):
            raise ValueError(f"state names {sorted(state)} != spec {sorted(self.spec)}")
        out: dict[str, torch.Tensor] = {}
        for name, (shape, _) in self.spec.items():
            t = state[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"state {name!r}: shape {tuple(t.shape)} != spec {shape}")
            out[name] = t.to(self.device, non_blocking=True)
        return out

    def _capture_job(
        self, cp: Checkpoint
    ) -> tuple[
        tuple[BlockLayout, torch.Tensor] | None,
        tuple[BlockLayout, torch.Tensor] | None,
        list[torch.cuda.Event | None],
    ]:
        hot, cold = self._book.arenas["hot"], self._book.arenas["cold"]
        hot_job = (self.hot_layout, hot.block(cp.hot)) if hot is not None and cp.hot is not None else None
        cold_job = (
            (self.cold_layout, cold.block(cp.cold)) if cold is not None and cp.cold is not None else None
        )
        return hot_job, cold_job, self._book.write_fences(cp)

    def _source(self, cp: Checkpoint, tier: Tier) -> object:
        """What `_read` needs for `tier`, captured under the lock (the lease keeps it valid)."""
        if tier == "disk":
            return cp.pending if cp.pending is not None else (cp.disk, cp.node.tokens())
        arena = self._book.arenas[tier]
        block = cp.hot if tier == "hot" else cp.cold
        assert arena is not None and block is not None, "a leased copy vanished"
        return arena.block(block)

    def _read(self, tier: Tier, cp: Checkpoint, source: object, out: dict[str, torch.Tensor]) -> object:
        tr = self._transfers
        if tier == "hot":
            assert isinstance(source, torch.Tensor)
            return copies.read_hot(tr, self.hot_layout, source, cp.ready, out)
        if tier == "cold":
            assert isinstance(source, torch.Tensor)
            return copies.read_cold(tr, self.cold_layout, source, cp.ready, out)
        if isinstance(source, tuple):
            path, tokens = source
            if path is None or self._book.store is None:
                raise CorruptFile("disk copy vanished")
            source = self._book.store.read(path, tokens)
        assert isinstance(source, dict)
        try:
            copies.read_fields(tr, self.cold_layout, source, out)
        except (KeyError, RuntimeError) as exc:
            raise CorruptFile(f"bad fields: {exc}") from exc
        return None

    def _take_spills(self) -> list[Spill]:
        spills, self._book.spills = self._book.spills, []
        return spills

    def _write_spills(self, spills: list[Spill]) -> None:
        store = self._book.store
        for spill in spills:
            path, nbytes = None, 0
            try:
                assert store is not None
                path, nbytes = store.write(
                    spill.key[0], spill.key[1], spill.tokens, spill.fields, spill.reason, spill.created
                )
            except OSError as exc:
                log.warning("disk spill failed: %s", exc)
            with self._lock:
                self._book.spill_done(spill, path, nbytes)

    def _dispatch(self) -> None:
        """Run queued observer callbacks (outside the lock) and resolve finished GPU timings."""
        with self._lock:
            events, self._book.events = self._book.events, []
        for method, a, b in events:
            if method == "on_lookup":
                self.observer.on_lookup(a, b)  # type: ignore[arg-type]
            elif method == "on_evict":
                self.observer.on_evict(a)  # type: ignore[arg-type]
            elif method == "on_corrupt":
                self.observer.on_corrupt()
        self._recorder.poll()

    def _on_fetch(self, tier: Tier, seconds: float) -> None:
        self._fetch_samples[tier].append(seconds)
        self.observer.on_fetch(tier, seconds)

    def _on_capture(self, seconds: float) -> None:
        self._capture_samples.append(seconds)
        self.observer.on_capture(seconds)

    def _tier_stats(self, tier: Tier, count: int) -> TierStats:
        book = self._book
        if tier == "disk":
            size = DiskStore.estimate(self.cold_layout.block_bytes, 0) if book.store is not None else 0
            return TierStats(book.disk_used, book.disk_capacity(), count, book.evictions["disk"], size)
        arena = book.arenas[tier]
        if arena is None:
            return TierStats(0, 0, count, book.evictions[tier], 0)
        return TierStats(
            arena.bytes_used, arena.bytes_capacity, count, book.evictions[tier], arena.block_bytes
        )

    def _describe(self, key: SessionKey, cps: list[Checkpoint]) -> dict[str, Any]:
        per_tier: dict[str, int] = dict.fromkeys(TIERS, 0)
        for cp in cps:
            for t in cp.tiers():
                per_tier[t] += self._book._copy_bytes(cp, t)
        items = [
            {
                "position": cp.position,
                "tiers": cp.tiers(),
                "reason": cp.reason,
                "created": cp.created,
                "last_used": cp.last_used,
                "pinned": cp.pins > 0,
            }
            for cp in cps
        ]
        return {"namespace": key[0], "session": key[1], "checkpoints": items, "bytes": per_tier}


def state_bytes(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of one live state (full precision), e.g. to size budgets in checkpoints."""
    total = 0
    for shape, dtype in spec.values():
        n = 1
        for s in shape:
            n *= s
        total += n * dtype.itemsize
    return total
