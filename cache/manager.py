"""`StateCache`: the facade the engine calls (contract and thread-safety rules in `cache.base`).

One `threading.Lock` guards the bookkeeping (`cache.book.Book`); tensor copies and file I/O (`cache.storage`)
run outside it on storage pinned by the checkpoint's pin count. File I/O that bookkeeping decides under the
lock (spill writes, unlinks of dropped copies) is queued and taken in the same critical section, then handed
after the lock is released (`_run_io`) to one background writer thread (`cache.io_worker`), so no caller
waits for a disk. A queued spill stays readable from memory (`Checkpoint.pending`, `cache.spill`) until the file
exists; the writer records the outcome under the lock (`Book.spill_done`). `flush` waits for the queue.
Observer callbacks are dispatched after the lock is released. A hybrid model's KV blocks (`cache.kv_blocks`,
the book's attachment) follow the same rules: bookkeeping under the lock with the book's, copies and block
files outside it, block files on the same writer thread (before the checkpoint files that need them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from cache import copies
from cache.base import (
    TIERS,
    CacheObserver,
    Capture,
    CheckpointCache,
    CheckpointUnavailable,
    FetchTier,
    KVSink,
    KVSource,
    KVSpec,
    Lease,
    State,
    StateSpec,
    Tier,
)
from cache.book import Book
from cache.checkpoint import Checkpoint, SessionKey
from cache.codec import make_codec
from cache.config import CacheConfig
from cache.disk import CorruptFile, DiskStore
from cache.disk_tier import DiskWork, Spill
from cache.io_worker import IoWorker
from cache.kv_copies import ArenaBlocks
from cache.kv_disk import KVFile
from cache.layout import BlockLayout
from cache.policy import capture_positions
from cache.remote import Found, RemoteStore, encode_blob
from cache.remote_kv import KVReader, KVWriter, RemoteKV, Written
from cache.stats import CacheStats, LatencyRecorder, TierStats, sample_deques
from cache.storage import Storage

log = logging.getLogger(__name__)
# file jobs: a caller queuing a spill behind more waits (bounds the RAM that queued spills' fields hold)
MAX_QUEUED_IO = 8


@dataclass(frozen=True)
class RemoteSource:
    """What a write-through reads, pinned: a copy's block (`(block_bytes,)` uint8) with its layout, and a
    hybrid's KV blocks in the same tier."""

    layout: BlockLayout
    block: torch.Tensor
    kv: ArenaBlocks | None


class StateCache(CheckpointCache):
    """Tiered checkpoint store for one model (one state spec). Thread-safe; see `cache.base`.

    A hybrid model (Mamba2 + attention) passes `kv`, its attention KV's shape: each checkpoint then holds
    its KV prefix too, in shared blocks (`cache.kv_blocks`), captured from a `KVSource` and restored into a
    `KVSink`; the disk tier holds those blocks as files, the remote tier as keys of their own
    (`cache.remote_kv`)."""

    def __init__(
        self,
        config: CacheConfig,
        spec: StateSpec,
        observer: CacheObserver | None = None,
        kv: KVSpec | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.spec = {name: (tuple(shape), dtype) for name, (shape, dtype) in spec.items()}
        self.observer = observer or CacheObserver()
        self._storage = Storage(config, self.spec, kv)
        self.hot_layout = self._storage.hot_layout
        self.cold_layout = self._storage.cold_layout
        self._recorder = LatencyRecorder(self._storage.transfers.cuda)
        self._fetch_samples = sample_deques(config.latency_samples)
        self._capture_samples = sample_deques(config.latency_samples)["hot"]
        self._lock = threading.Lock()
        st = self._storage
        self._kv = st.make_kv()
        self._book = Book(config, st.make_hot(), st.make_cold(), self.cold_layout, st.store, self._kv)
        if self._kv is not None:
            self._kv.use_disk(self._book.disk)
        self._io = IoWorker()  # its thread runs only while file I/O is queued
        self._load_disk()
        self._remote: RemoteStore | None = None
        self._remote_kv: KVReader | None = None  # a hybrid's KV blocks in the remote codec
        self._kv_writer: KVWriter | None = None
        self._remote_io = IoWorker("tssc-cache-remote")  # write-through and deletes, in order
        remote = config.remote
        if remote is not None:
            codec = make_codec(remote.dtype or config.cold_dtype)
            self.remote_layout = BlockLayout(self.spec, codec)
            fingerprint = self.remote_layout.fingerprint()
            if kv is not None:
                self._remote_kv = KVReader(BlockLayout({"kv": (kv.block_shape(), kv.dtype)}, codec))
                fingerprint += f"|kv:{self._remote_kv.layout.fingerprint()}"
            self._remote = RemoteStore(remote, fingerprint, self.observer.on_remote_error)
            if self._remote_kv is not None:
                self._kv_writer = KVWriter(self._remote, self._remote_kv)

    # ---- public API ----------------------------------------------------------------------------------

    def warmup(self, out: State | None = None) -> None:
        """Encode one zero state through each tier's codec (alone and stacked) and decode it into `out` (fresh
        tensors if None), outside the bookkeeping: on CUDA this compiles (or loads) the codec kernels now rather
        than inside the first capture or restore. Pass the views a restore writes into (a free slot's): the
        kernels specialise on strides."""
        state = {
            name: torch.zeros(shape, dtype=dtype, device=self.device)
            for name, (shape, dtype) in self.spec.items()
        }
        target = self._storage.check_out(out) if out is not None else state
        stacked = {name: torch.stack([t, t]) for name, t in state.items()}  # `capture_many`'s layout
        for layout in (self.hot_layout, self.cold_layout):
            block = torch.empty(layout.block_bytes, dtype=torch.uint8, device=self.device)  # (block_bytes,)
            layout.encode_into(state, block)
            layout.decode_into(block, target)
            layout.encode_rows(
                stacked, torch.empty((2, layout.block_bytes), dtype=torch.uint8, device=self.device)
            )
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

    def fetch(
        self, lease: Lease, out: State | None = None, kv: KVSink | None = None
    ) -> dict[str, torch.Tensor]:
        """`CheckpointCache.fetch`; a hybrid's also appends the KV of [0, position) to `kv` (required)."""
        result = self._storage.check_out(out) if out is not None else self.hot_layout.empty_state(self.device)
        if self._kv is not None and not callable(getattr(kv, "append", None)):
            raise ValueError("a hybrid checkpoint restores its attention KV too (kv=, a KVSink)")
        with self._lock:
            cp = self._book.leased(lease)
            source = self._storage.source(self._book.arenas, cp, lease.tier)
            kv_reads = self._kv.reads(cp, lease.tier) if self._kv is not None else []
        token = self._recorder.start()
        try:
            kv_parts = self._kv.load(kv_reads) if self._kv is not None else []  # first: files are verified
            fence = self._storage.read(lease.tier, cp, source, result)
        except CorruptFile as exc:
            log.warning("disk checkpoint unusable: %s", exc)
            with self._booking() as book:
                book.drop_corrupt_disk(cp)
            raise CheckpointUnavailable(str(exc)) from exc
        if self._kv is not None and kv is not None:
            self._kv.append(kv_parts, cp.ready, kv)
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
        with self._booking() as book:
            book.end_lease(lease)

    def capture(
        self,
        namespace: str,
        session: str | None,
        tokens: Sequence[int],
        state: State,
        *,
        reason: str,
        tree: str | None = None,
        kv: KVSource | None = None,
    ) -> bool:
        """`CheckpointCache.capture`; a hybrid's also stores the KV of [0, len(tokens)) read from `kv`
        (required; only the blocks its tiers lack are read)."""
        self._storage.check_state(state)
        stacked = {name: t.unsqueeze(0) for name, t in state.items()}
        return self._store([Capture(namespace, session, tokens, reason, tree, kv)], stacked, False)[0]

    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        return self._store(captures, states, False)

    def _store(self, captures: Sequence[Capture], states: State, remote_copy: bool) -> list[bool]:
        """`capture_many`; `remote_copy`: the states came from the remote tier (a first hit counts as remote,
        and they are not written back)."""
        values = self._storage.check_states(states, len(captures))
        toks = [tuple(c.tokens) for c in captures]
        kv = self._kv
        sources = [
            kv.check_source(c.kv, len(t)) if kv is not None else None
            for c, t in zip(captures, toks, strict=True)
        ]
        out = [False] * len(captures)
        if not any(toks):
            return out
        token = self._recorder.start()
        with self._lock:
            admitted = [
                (i, self._admit(c, t)) for i, (c, t) in enumerate(zip(captures, toks, strict=True)) if t
            ]
            cps = [(i, cp) for i, cp in admitted if cp is not None]
            job = self._storage.capture_job(self._book.arenas, [cp for _, cp in cps]) if cps else None
            kv_jobs = [kv.capture_job(cp) for _, cp in cps] if kv is not None else []
            work = self._book.disk.take()
        if job is None:
            self._run_io(work)
            self._dispatch()
            return out
        kv_ok = [True] * len(cps)
        try:  # the KV first: on CUDA the states' `ready` event then covers both
            self._run_io(work)
            for j, kv_job in enumerate(kv_jobs):  # a hybrid's: one per checkpoint
                kv_source = sources[cps[j][0]]
                if kv is not None and kv_source is not None:
                    kv_ok[j] = kv.write(kv_job, kv_source)
            started, ready = self._storage.write_capture(values, [i for i, _ in cps], job)
        except BaseException:
            for kv_job in kv_jobs:
                kv_job.fail()  # captures waiting for its blocks must not wait forever
            for _, cp in cps:
                self._abort(cp)
            raise
        remote = not remote_copy
        pushes: list[tuple[Checkpoint, int, RemoteSource]] = []
        with self._lock:
            for (i, cp), ok in zip(cps, kv_ok, strict=True):
                if not ok:  # another capture's write of a block this one shares failed
                    self._book.abort(cp)
                    continue
                cp.ready = ready
                cp.from_remote = remote_copy
                out[i] = self._book.publish(cp)
                pushed = self._remote_source(cp) if out[i] and remote and self._pushes(captures[i]) else None
                if pushed is not None:
                    pushes.append((cp, i, pushed))
            work = self._book.disk.take()
        self._run_io(work)
        for cp, i, pushed in pushes:
            key = (captures[i].namespace, captures[i].session)
            self._remote_io.submit(partial(self._remote_write, cp, key, toks[i], pushed))
        for _ in range(sum(out)):  # each checkpoint's latency is its batch's
            if started is not None and ready is not None:
                self._recorder.pair(started, ready, self._on_capture)
            else:
                self._recorder.stop(token, self._on_capture)
        self._dispatch()
        return out

    def _pushes(self, capture: Capture) -> bool:
        """Whether a capture for this reason is written through to the remote tier."""
        return self._remote is not None and capture.reason in self._remote.config.reasons

    def _admit(self, capture: Capture, tokens: tuple[int, ...]) -> Checkpoint | None:
        """`Book.admit` for one capture (under the lock)."""
        tree = capture.tree if capture.tree is not None else capture.namespace
        return self._book.admit((capture.namespace, capture.session), tree, tokens, capture.reason)

    def _abort(self, cp: Checkpoint) -> None:
        with self._booking() as book:
            book.abort(cp)

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
        if self._remote is not None:
            self._remote_io.submit(partial(self._remote_delete, namespace, session))
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
                remote=self._remote_stats(),
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
        """Wait until every queued spill write and unlink has run (written files exist, dropped ones are gone),
        and every queued remote write and delete."""
        self._remote_io.flush()
        self._io.flush()
        self._dispatch()

    @property
    def has_remote(self) -> bool:
        return self._remote is not None

    def prefetch(
        self, namespace: str, session: str | None, tokens: Sequence[int], *, tree: str | None = None
    ) -> int:
        """Bring the deepest remote checkpoint of `tree` on the path of `tokens` that is deeper than every
        local one (by `RemoteConfig.min_tokens` at least) into the local tiers, as a capture would; its first
        `lookup` hit counts `remote_hit`. Blocks on the network: call it off the decode path, before the
        request's `lookup`. Returns its position; 0 if there is none, or the remote tier is off or failing
        (errors are counted; while the tier backs off, nothing is tried)."""
        remote, toks = self._remote, tuple(tokens)
        if remote is None or not toks or not remote.available():
            return 0
        name = tree if tree is not None else namespace
        with self._lock:
            _, local, _ = self._book.index.near(name, toks)
        gap = max(self.config.min_gap if local > 0 else 0, remote.config.min_tokens)
        started = time.perf_counter()
        found = remote.find(name, toks, local + max(gap - 1, 0), self._remote_kv)
        if found is None:
            return 0
        self.observer.on_remote_bytes("read", found.nbytes)
        state = self.hot_layout.empty_state(self.device)
        try:
            copies.read_fields(self._storage.transfers, self.remote_layout, found.fields, state)
        except (KeyError, RuntimeError) as exc:
            log.warning("remote checkpoint does not fit this model: %s", exc)
            self.observer.on_remote_error("corrupt")
            return 0
        position = found.position
        kv = self._remote_kv_source(found)
        stacked = {k: t.unsqueeze(0) for k, t in state.items()}
        if not self._store([Capture(namespace, session, toks[:position], "remote", name, kv)], stacked, True)[
            0
        ]:
            return 0
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._on_fetch("remote", time.perf_counter() - started)
        return position

    def _remote_kv_source(self, found: Found) -> RemoteKV | None:
        """A hybrid's remote checkpoint's KV, as the source its local capture reads (only the blocks its
        local tiers lack are decoded)."""
        if found.kv is None or self._kv is None or self._remote_kv is None:
            return None
        return RemoteKV(found.kv, self._storage.transfers, self._kv.spec.dtype, self._remote_kv.block_size)

    def close(self, flush: bool = True) -> None:
        """Wait for queued file I/O and stop the writer thread. With a disk tier and `flush`, first write every
        checkpoint that has no disk copy yet (budget permitting), so sessions survive a restart. The cache stays
        usable (a later spill starts the writer again)."""
        if flush and self._storage.store is not None:
            with self._lock:
                self._book.flush_spills()
                work = self._book.disk.take()
            self._run_io(work)
        self._remote_io.close()
        self._io.close()
        self._dispatch()

    # ---- construction --------------------------------------------------------------------------------

    def _load_disk(self) -> None:
        store = self._storage.store
        if store is None:
            return
        records, corrupt = store.scan()
        kv_disk = self._kv.disk if self._kv is not None else None
        if kv_disk is not None:
            kv_disk.scan()  # first: a hybrid checkpoint is adopted only with every block file of its KV
        with self._lock:
            self._book.disk_corrupt += corrupt
            # newest first: they keep their place if the budget shrank
            rejected = [rec.path for rec in reversed(records) if not self._book.adopt_disk(rec)]
            rejected += kv_disk.orphans() if kv_disk is not None else []
            work = self._book.disk.take()
        self._storage.unlink(rejected + work.unlinks)
        for _ in range(corrupt):
            self.observer.on_corrupt()
        log.info("disk tier: %d checkpoints indexed, %d corrupt files skipped", len(records), corrupt)

    # ---- helpers -------------------------------------------------------------------------------------

    @contextmanager
    def _booking(self) -> Iterator[Book]:
        """The bookkeeping, under the lock; then, the lock released, the file I/O it queued and the observer
        callbacks."""
        work = None
        try:
            with self._lock:
                yield self._book
                work = self._book.disk.take()
        finally:
            if work is not None:
                self._run_io(work)
            self._dispatch()

    def _run_io(self, work: DiskWork) -> None:
        """Queue file I/O taken from the bookkeeping under the lock, now that it is released, for the writer
        thread (FIFO): unlinks first (they free disk space), then KV block files, then spill writes (a
        checkpoint file after its blocks')."""
        if work.unlinks:
            self._io.submit(partial(self._storage.unlink, work.unlinks))
        for file in work.kv:
            self._io.submit(partial(self._write_kv_file, file))
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

    def _write_kv_file(self, file: KVFile) -> None:
        """On the writer thread: write one KV block file, record the outcome under the lock."""
        assert self._kv is not None and self._kv.disk is not None
        try:
            path, nbytes = self._kv.disk.write(file)
        except Exception:
            log.exception("KV block spill failed")
            path, nbytes = None, 0
        with self._booking():
            self._kv.file_done(file, path, nbytes)

    def _remote_source(self, cp: Checkpoint) -> RemoteSource | None:
        """Under the lock: pin `cp` for its write-through and name the copy to read (the cold one if any,
        with a hybrid's KV blocks in that tier), or None when the writer is backed up (counted `queue_full`)."""
        assert self._remote is not None
        arenas = self._book.arenas
        hot, cold = arenas["hot"], arenas["cold"]
        tier: Tier
        if cold is not None and cp.cold is not None:
            tier, layout, block = "cold", self.cold_layout, cold.block(cp.cold)
        elif hot is not None and cp.hot is not None:
            tier, layout, block = "hot", self.hot_layout, hot.block(cp.hot)
        else:
            return None
        if self._remote_io.backlog() >= self._remote.config.queue:
            self._book.events.append(("on_remote_error", ("queue_full",)))
            return None
        kv = self._kv.reads(cp, tier) if self._kv is not None else None
        assert kv is None or isinstance(kv, ArenaBlocks)
        cp.pins += 1
        return RemoteSource(layout, block, kv)

    def _remote_delete(self, namespace: str, session: str | None) -> None:
        assert self._remote is not None
        self._remote.delete_session(namespace, session)

    def _remote_write(
        self,
        cp: Checkpoint,
        key: SessionKey,
        tokens: tuple[int, ...],
        source: RemoteSource,
    ) -> None:
        """On the remote writer thread: take the copy's bytes (then unpin), send them to Redis. A hybrid's
        full KV blocks Redis lacks go with them, its partial block inside the blob."""
        assert self._remote is not None
        written: Written | None = None
        try:
            fields = copies.export_fields(source.layout, source.block, cp.ready, self.remote_layout)
            if source.kv is not None and self._kv_writer is not None:
                where = (cp.tree, key[0], key[1])
                written = self._kv_writer.write(where, tokens, source.kv, cp.ready, fields)
                if written is None:
                    return  # Redis failed, or too large (counted)
        finally:
            with self._lock:
                self._book.unpin(cp)
                work = self._book.disk.take()
            self._run_io(work)
            self._dispatch()
        blob = written.blob if written is not None else encode_blob(fields, tokens)
        block_keys = written.block_keys if written is not None else []
        if self._remote.put(cp.tree, key[0], key[1], tokens, blob, block_keys):
            self.observer.on_remote_bytes("written", len(blob))
        if written is not None and written.sent:
            self.observer.on_remote_bytes("written", written.sent)

    def _dispatch(self) -> None:
        """Run queued observer callbacks (outside the lock) and resolve finished GPU timings."""
        with self._lock:
            events, self._book.events = self._book.events, []
        for method, args in events:
            getattr(self.observer, method)(*args)
        self._recorder.poll()

    def _on_fetch(self, tier: FetchTier, seconds: float) -> None:
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
            kv = book.tiers.extra.used(tier)
            return TierStats(disk.total(), disk.capacity(), count, book.tiers.evictions["disk"], size, kv)
        arena, tiers = book.arenas[tier], book.tiers
        evictions = tiers.evictions[tier]
        if arena is None:
            return TierStats(0, 0, count, evictions, 0)
        kv = tiers.extra.used(tier)
        return TierStats(tiers.used(tier), tiers.capacity(tier), count, evictions, arena.block_bytes, kv)

    def _remote_stats(self) -> TierStats | None:
        remote = self._remote
        if remote is None:
            return None
        block_bytes = self.remote_layout.block_bytes
        return TierStats(remote.used, remote.config.budget, remote.blobs, 0, block_bytes, remote.kv_bytes)

    def _describe(self, key: SessionKey, cps: list[Checkpoint]) -> dict[str, Any]:
        per_tier: dict[str, int] = dict.fromkeys(TIERS, 0)
        for cp in cps:
            for t in cp.tiers():
                per_tier[t] += self._book.tiers.held_bytes(cp, t)
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
