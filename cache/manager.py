"""`StateCache`: the facade the engine calls (contract and thread-safety rules in `cache.base`).

One `threading.Lock` guards the bookkeeping (`cache.book.Book`); tensor copies and file I/O (`cache.storage`)
run outside it on storage pinned by the checkpoint's pin count. File I/O that bookkeeping decides under the
lock (spill writes, unlinks of dropped copies) is queued and taken in the same critical section, then handed
after the lock is released (`_run_io`) to one background writer thread (`cache.io_worker`), so no caller
waits for a disk. A queued spill stays readable from memory (`Checkpoint.pending`, `cache.spill`) until the file
exists; the writer records the outcome under the lock (`Book.spill_done`). `flush` waits for the queue.
Observer callbacks are dispatched after the lock is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

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
from cache.book import Book
from cache.checkpoint import Checkpoint, SessionKey
from cache.config import CacheConfig
from cache.disk import CorruptFile, DiskStore
from cache.disk_tier import DiskWork, Spill
from cache.io_worker import IoWorker
from cache.policy import capture_positions
from cache.stats import CacheStats, LatencyRecorder, TierStats, sample_deques
from cache.storage import Storage

log = logging.getLogger(__name__)
# file jobs: a caller queuing a spill behind more waits (bounds the RAM that queued spills' fields hold)
MAX_QUEUED_IO = 8


class StateCache(CheckpointCache):
    """Tiered checkpoint store for one model (one state spec). Thread-safe; see `cache.base`."""

    def __init__(self, config: CacheConfig, spec: StateSpec, observer: CacheObserver | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.spec = {name: (tuple(shape), dtype) for name, (shape, dtype) in spec.items()}
        self.observer = observer or CacheObserver()
        self._storage = Storage(config, self.spec)
        self.hot_layout = self._storage.hot_layout
        self.cold_layout = self._storage.cold_layout
        self._recorder = LatencyRecorder(self._storage.transfers.cuda)
        self._fetch_samples = sample_deques(config.latency_samples)
        self._capture_samples = sample_deques(config.latency_samples)["hot"]
        self._lock = threading.Lock()
        st = self._storage
        self._book = Book(config, st.make_hot(), st.make_cold(), self.cold_layout, st.store)
        self._io = IoWorker()  # its thread runs only while file I/O is queued
        self._load_disk()

    # ---- public API ----------------------------------------------------------------------------------

    def warmup(self, out: State | None = None) -> None:
        """Encode one zero state through each tier's codec and decode it into `out` (fresh tensors if None),
        outside the bookkeeping: on CUDA this compiles (or loads) the codec kernels now rather than inside the
        first capture or restore. Pass the views a restore writes into (a free slot's): the kernels
        specialise on strides."""
        state = {
            name: torch.zeros(shape, dtype=dtype, device=self.device)
            for name, (shape, dtype) in self.spec.items()
        }
        target = self._storage.check_out(out) if out is not None else state
        for layout in (self.hot_layout, self.cold_layout):
            block = torch.empty(layout.block_bytes, dtype=torch.uint8, device=self.device)  # (block_bytes,)
            layout.encode_into(state, block)
            layout.decode_into(block, target)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lookup(
        self, namespace: str, session: str | None, tokens: Sequence[int], *, tree: str | None = None
    ) -> Lease | None:
        key, toks = (namespace, session), tuple(tokens)
        with self._lock:
            lease = self._book.lookup(key, tree if tree is not None else namespace, toks)
        self._dispatch()
        return lease

    def fetch(self, lease: Lease, out: State | None = None) -> dict[str, torch.Tensor]:
        result = self._storage.check_out(out) if out is not None else self.hot_layout.empty_state(self.device)
        with self._lock:
            cp = self._book.leased(lease)
            source = self._storage.source(self._book.arenas, cp, lease.tier)
        token = self._recorder.start()
        try:
            fence = self._storage.read(lease.tier, cp, source, result)
        except CorruptFile as exc:
            log.warning("disk checkpoint unusable: %s", exc)
            with self._lock:
                self._book.drop_corrupt_disk(cp)
                work = self._book.disk.take()
            self._run_io(work)
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
            work = self._book.disk.take()
        self._run_io(work)
        self._dispatch()

    def capture(
        self,
        namespace: str,
        session: str | None,
        tokens: Sequence[int],
        state: State,
        *,
        reason: str,
        tree: str | None = None,
    ) -> bool:
        toks = tuple(tokens)
        values = self._storage.check_state(state)
        if not toks:
            return False
        token = self._recorder.start()
        name = tree if tree is not None else namespace
        with self._lock:
            cp = self._book.admit((namespace, session), name, toks, reason)
            job = self._storage.capture_job(self._book.arenas, cp) if cp is not None else None
            work = self._book.disk.take()
        self._run_io(work)
        if cp is None or job is None:
            self._dispatch()
            return False
        try:
            started, ready = self._storage.write_capture(values, job)
        except BaseException:
            with self._lock:
                self._book.abort(cp)
                work = self._book.disk.take()
            self._run_io(work)
            raise
        with self._lock:
            cp.ready = ready
            ok = self._book.publish(cp)
            work = self._book.disk.take()
        self._run_io(work)
        if started is not None and ready is not None:
            self._recorder.pair(started, ready, self._on_capture)
        else:
            self._recorder.stop(token, self._on_capture)
        self._dispatch()
        return ok

    def capture_positions(self, start: int, end: int, boundaries: Sequence[int]) -> list[int]:
        cfg = self.config
        return capture_positions(
            start, end, boundaries, cfg.checkpoint_interval, cfg.min_gap, cfg.max_captures
        )

    def delete_session(self, namespace: str, session: str | None) -> int:
        with self._lock:
            freed = self._book.delete_session((namespace, session))
            work = self._book.disk.take()
        self._run_io(work)  # the session's files, unreachable since the index dropped them above
        self._dispatch()
        return freed

    def session_info(self, namespace: str, session: str | None) -> dict[str, Any] | None:
        key: SessionKey = (namespace, session)
        with self._lock:
            sess = self._book.index.sessions.get(key)
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
                sessions=len(book.index.sessions),
                trees=len(book.index.trees),
                captures_shared=book.captures_shared,
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
            work = self._book.disk.take()
        self._run_io(work)
        self._io.flush()  # a shrunk disk budget has freed its files when this returns
        self._dispatch()

    def flush(self) -> None:
        """Wait until every queued spill write and unlink has run (written files exist, dropped ones are gone)."""
        self._io.flush()
        self._dispatch()

    def close(self, flush: bool = True) -> None:
        """Wait for queued file I/O and stop the writer thread. With a disk tier and `flush`, first write every
        checkpoint that has no disk copy yet (budget permitting), so sessions survive a restart. The cache stays
        usable (a later spill starts the writer again)."""
        if flush and self._storage.store is not None:
            with self._lock:
                self._book.flush_spills()
                work = self._book.disk.take()
            self._run_io(work)
        self._io.close()
        self._dispatch()

    # ---- construction --------------------------------------------------------------------------------

    def _load_disk(self) -> None:
        store = self._storage.store
        if store is None:
            return
        records, corrupt = store.scan()
        with self._lock:
            self._book.disk_corrupt += corrupt
            # newest first: they keep their place if the budget shrank
            rejected = [rec.path for rec in reversed(records) if not self._book.adopt_disk(rec)]
        self._storage.unlink(rejected)
        for _ in range(corrupt):
            self.observer.on_corrupt()
        log.info("disk tier: %d checkpoints indexed, %d corrupt files skipped", len(records), corrupt)

    # ---- helpers -------------------------------------------------------------------------------------

    def _run_io(self, work: DiskWork) -> None:
        """Queue file I/O taken from the bookkeeping under the lock, now that it is released, for the writer
        thread (FIFO): unlinks first (they free disk space), then spill writes."""
        if work.unlinks:
            self._io.submit(partial(self._storage.unlink, work.unlinks))
        for spill in work.spills:
            self._io.submit(partial(self._write_spill, spill))
        if work.spills:
            self._io.throttle(MAX_QUEUED_IO)  # only when the disk falls behind

    def _write_spill(self, spill: Spill) -> None:
        """On the writer thread: write one spill, record the outcome under the lock. Any failure counts as a
        failed write (the disk copy is dropped, its budget given back). A write whose checkpoint went meanwhile
        queues its file for unlink, behind everything already queued."""
        try:
            path, nbytes = self._storage.write_spill(spill)
        except Exception:
            log.exception("disk spill failed")
            path, nbytes = None, 0
        with self._lock:
            self._book.spill_done(spill, path, nbytes)
            late = self._book.disk.take()
        self._run_io(late)

    def _dispatch(self) -> None:
        """Run queued observer callbacks (outside the lock) and resolve finished GPU timings."""
        with self._lock:
            events, self._book.events = self._book.events, []
        for method, args in events:
            getattr(self.observer, method)(*args)
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
            disk = book.disk
            size = DiskStore.estimate(self.cold_layout.block_bytes, 0) if disk.store is not None else 0
            return TierStats(disk.used, disk.capacity(), count, book.tiers.evictions["disk"], size)
        arena = book.arenas[tier]
        evictions = book.tiers.evictions[tier]
        if arena is None:
            return TierStats(0, 0, count, evictions, 0)
        return TierStats(arena.bytes_used, arena.bytes_capacity, count, evictions, arena.block_bytes)

    def _describe(self, key: SessionKey, cps: list[Checkpoint]) -> dict[str, Any]:
        per_tier: dict[str, int] = dict.fromkeys(TIERS, 0)
        for cp in cps:
            for t in cp.tiers():
                per_tier[t] += self._book.tiers.copy_bytes(cp, t)
        items = [
            {
                "position": cp.position,
                "tiers": cp.tiers(),
                "reason": cp.reason,
                "created": cp.created,
                "last_used": cp.last_used,
                "pinned": cp.pins > 0,
                "shared": cp.shared(),
            }
            for cp in cps
        ]
        return {"namespace": key[0], "session": key[1], "checkpoints": items, "bytes": per_tier}
