"""KV blocks: the attention KV of hybrid checkpoints, stored once per block and shared along the prefix tree.

`KVBlocks` is the `Attachment` (`cache.base`) of a hybrid model's cache: a checkpoint at position p holds
its Mamba layers' state like any checkpoint (hot FP8, cold FP16) and, in each tier holding that state, the
KV blocks of positions [0, p) (`cache.kv_index` says which blocks, and how they are shared). The tier's
byte budget counts both (`cache.tiers`), eviction drops a copy with its holds, and the hot window's
demotion (dropping the hot copy, the cold one stays: write-through) releases the hot KV holds alone, so
state and KV always move together. A restore reads both from the tier the lease names.

Per tier, the blocks live in a KV arena of their own (`BlockArena`, taking memory as it fills, like the
states' arenas of a hybrid: the tier's budget bounds what both hold, not what each could) in their own precision (`cache.kv_copies`): hot in the model dtype (or FP8,
`CacheConfig.hot_kv_dtype`) on the cache device, cold with the cold tier's codec (FP16 with a scale per
token and head, so nothing overflows) in host memory, pinned on CUDA. On disk each block is one file
(`cache.kv_disk`), written when the first checkpoint copy holding it spills from the cold tier, shared by
every disk copy holding it, and found again at start.

    block: (L, 2, s, kv, dh)   # attention layers, 0 = keys / 1 = values, offset in block, kv heads, head dim

Copies run outside the lock, like the state's (`cache.copies`): a capture writes the blocks it took (only
those the tier did not hold: a follow-up checkpoint writes its new full blocks and its partial one), on
the capture stream on CUDA, reading [first new block, p) from its `KVSource` once and moving the blocks
per tier in a few batched encodes and copies (`cache.kv_copies.write_blocks`, never one per block). A capture that holds a
block another capture is still writing waits for that write before it is published (`Fill`), so a
published checkpoint's blocks are all written. A restore decodes the leased tier's blocks, batched the
same way (`read_blocks`), and appends them to the `KVSink` on the current stream; a capture reusing a freed slot runs on the capture stream, which follows
the current stream's work, so it never overwrites a block a queued restore still reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.arena import BlockArena, ChunkSource, Claim
from cache.base import Attachment, KVSink, KVSource, KVSpec, Tier
from cache.checkpoint import Checkpoint
from cache.disk_tier import DiskTier
from cache.kv_copies import ArenaBlocks, KVPart, decode, read_blocks, write_blocks
from cache.kv_disk import KVDisk, KVFile, KVFileRead
from cache.kv_index import Fill, KVBlock, KVIndex, name_of
from cache.layout import BlockLayout
from cache.transfer import Event, Transfers

ARENA_TIERS: tuple[Tier, ...] = ("hot", "cold")
KVReads = ArenaBlocks | list[KVFileRead]  # what a restore reads: blocks in an arena, or their files
KVLoaded = ArenaBlocks | list[KVPart]  # the same, files read


@dataclass(frozen=True)
class KVWrite:
    """One block a capture writes: a slot of the tier's KV arena, positions [start, start + length), after
    settling `claim` (a spill still to copy the slot's old bytes)."""

    tier: Tier
    slot: int
    start: int
    length: int
    fill: Fill
    claim: Claim | None


@dataclass(frozen=True)
class KVJob:
    """A capture's KV work, taken under the lock: the blocks it writes, the writes of others it waits for."""

    writes: list[KVWrite]
    waits: list[Fill]
    end: int  # the checkpoint's position

    def fail(self) -> None:
        """The capture failed: its blocks not written yet never will be (waiters give up on them)."""
        for w in self.writes:
            w.fill.finish(False)


class KVBlocks(Attachment):
    def __init__(
        self,
        spec: KVSpec,
        layouts: dict[Tier, BlockLayout],
        transfers: Transfers,
        grow_by: dict[Tier, int],
        disk: KVDisk | None = None,
        sources: Mapping[Tier, ChunkSource | None] | None = None,
    ) -> None:
        self.spec = spec
        self.index = KVIndex(spec.block_size)
        self.transfers = transfers
        self.layouts = layouts  # hot and cold: the block's fields, through the tier's codec
        devices = {"hot": transfers.device, "cold": torch.device("cpu")}
        self.block_bytes = {t: layouts[t].block_bytes for t in ARENA_TIERS}
        self.arenas = {  # unbounded: the tier's budget (`Tiers.take_block`) bounds them
            t: BlockArena(
                self.block_bytes[t], 1 << 62, devices[t], transfers.cuda, grow_by[t], (sources or {}).get(t)
            )
            for t in ARENA_TIERS
        }
        self.disk = disk
        self._disk_tier: DiskTier | None = None
        self._missing: dict[tuple[int, Tier], list[KVBlock]] = {}  # reserved, not stored yet
        self._writes: dict[int, list[KVWrite]] = {}  # cid -> blocks it took, until its capture job

    def use_disk(self, tier: DiskTier) -> None:
        """Queue block file writes and unlinks with the disk tier's file I/O."""
        self._disk_tier = tier

    # ---- the Attachment contract (under the cache lock) --------------------------------------------

    def bind(self, cp: Checkpoint, tokens: tuple[int, ...]) -> None:
        self.index.bind(cp.cid, cp.tree, tokens)

    def reserve(self, cp: Checkpoint, tier: Tier) -> int:
        missing = self.index.hold_stored(cp.cid, tier)
        self._missing[(cp.cid, tier)] = missing
        return len(missing) * self._unit(tier)

    def commit(self, cp: Checkpoint, tier: Tier) -> None:
        missing = self._missing.pop((cp.cid, tier))
        if tier == "disk":
            self._commit_disk(cp, missing)
            return
        writes = self._writes.setdefault(cp.cid, [])
        arena = self.arenas[tier]
        for block in missing:
            slot = self._take_slot(tier)
            self.index.store(cp.cid, tier, block, slot)
            fill = block.fills[tier] = Fill()
            writes.append(KVWrite(tier, slot, block.start, block.length, fill, arena.take_claim(slot)))

    def adopt(self, cp: Checkpoint, tier: Tier) -> int | None:
        assert tier == "disk" and self.disk is not None
        missing = self.index.hold_stored(cp.cid, tier)
        if not all(name_of(block) in self.disk.found for block in missing):
            self.drop(cp, tier)
            return None
        for block in missing:
            file = self.disk.adopt(name_of(block), block.key)
            assert file is not None
            self.index.store(cp.cid, tier, block, file.fid)
        return sum(self.disk.files[b.slots[tier]].nbytes for b in missing)

    def drop(self, cp: Checkpoint, tier: Tier) -> int:
        self._missing.pop((cp.cid, tier), None)
        freed = self.index.release(cp.cid, tier)
        if not freed:
            return 0
        if tier != "disk":
            for slot in freed:
                self.arenas[tier].release(slot)
            return len(freed) * self.block_bytes[tier]
        assert self.disk is not None and self._disk_tier is not None
        total = 0
        for fid in freed:
            nbytes, path = self.disk.drop(fid)
            self._disk_tier.discard(path)
            total += nbytes
        return total

    def unbind(self, cp: Checkpoint) -> None:
        self._writes.pop(cp.cid, None)
        self.index.unbind(cp.cid)

    def used(self, tier: Tier) -> int:
        if tier == "disk":
            return self.disk.used if self.disk is not None else 0
        return self.index.slots_used.get(tier, 0) * self.block_bytes[tier]

    def held(self, cp: Checkpoint, tier: Tier) -> int:
        blocks = self.index.held(cp.cid, tier)
        if tier == "disk":
            return sum(self.disk.files[b.slots[tier]].nbytes for b in blocks) if self.disk is not None else 0
        return len(blocks) * self.block_bytes[tier]

    # ---- jobs (under the cache lock) -----------------------------------------------------------------

    def capture_job(self, cp: Checkpoint) -> KVJob:
        """What the capture of `cp` writes, and the writes by other captures it must wait for."""
        writes = self._writes.pop(cp.cid, [])
        own = {id(w.fill) for w in writes}
        waits = []
        for tier in ARENA_TIERS:
            for block in self.index.held(cp.cid, tier):
                fill = block.fills.get(tier)
                if fill is not None and id(fill) not in own and not fill.done.is_set():
                    waits.append(fill)
        return KVJob(writes, waits, cp.position)

    def reads(self, cp: Checkpoint, tier: Tier) -> KVReads:
        """What a restore of `cp` from `tier` reads, in token order: its blocks' arena slots, or their disk
        files."""
        chain = self.index.chains[cp.cid]
        assert len(self.index.held(cp.cid, tier)) == len(chain.blocks), "a leased copy lost a KV block"
        if tier == "disk":
            assert self.disk is not None
            return [self.disk.reading(b.slots[tier]) for b in chain.blocks]
        slots = [b.slots[tier] for b in chain.blocks]
        return ArenaBlocks(self.layouts[tier], self.arenas[tier], slots, cp.position)

    def file_done(self, file: KVFile, path: Path | None, nbytes: int) -> None:
        """A block file's write finished (`path` None: it failed)."""
        assert self.disk is not None and self._disk_tier is not None
        self._disk_tier.discard(self.disk.landed(file, path, nbytes))

    # ---- copies (outside the lock) -------------------------------------------------------------------

    def write(self, job: KVJob, source: KVSource) -> bool:
        """Write the job's blocks from `source`, then wait for the blocks others write. False: one of those
        failed (the checkpoint must not be published)."""
        ok = False
        try:
            self._copy_in(job, source)
            ok = True
        finally:
            for w in job.writes:
                w.fill.finish(ok)
        for fill in job.waits:
            fill.done.wait()
        return all(fill.ok for fill in job.waits)

    def load(self, reads: KVReads) -> KVLoaded:
        """The blocks' encoded KV, in order: arena blocks as they are, files read and verified. Raises
        CorruptFile."""
        if isinstance(reads, ArenaBlocks):
            return reads
        disk = self.disk
        assert disk is not None or not reads
        return [disk.read(item) for item in reads] if disk is not None else []

    def append(self, loaded: KVLoaded, ready: Event | None, sink: KVSink) -> None:
        """Decode the loaded blocks, positions [0, p), and append them to `sink` (model dtype, cache device)."""
        self.transfers.wait(ready)
        if isinstance(loaded, ArenaBlocks):
            kv = read_blocks(loaded, self.transfers.device, self.spec.dtype)
        else:
            kv = decode(self.transfers, loaded, self.spec.dtype)
        sink.append(kv)  # (L, 2, p, kv, dh)

    def check_source(self, source: KVSource | None, position: int) -> KVSource:
        if source is None or not callable(getattr(source, "read", None)):
            raise ValueError("a hybrid checkpoint needs its attention KV (kv=, a KVSource)")
        if source.length < position:
            raise ValueError(f"the KV source holds {source.length} tokens, the checkpoint needs {position}")
        return source

    # ---- helpers -------------------------------------------------------------------------------------

    def _commit_disk(self, cp: Checkpoint, missing: list[KVBlock]) -> None:
        """Queue the blocks missing from disk for writing, from the cold slots of `cp`'s cold copy (which
        holds every block of its chain): each copy is the slot's claim until taken."""
        assert self.disk is not None and self._disk_tier is not None
        cold = self.arenas["cold"]
        for block in missing:
            slot = block.slots["cold"]
            file = self.disk.spill(name_of(block), block.key, cold.block(slot), cp.ready)
            self.index.store(cp.cid, "disk", block, file.fid)
            assert file.pending is not None
            cold.claim(slot, file.pending)
            self._disk_tier.work.kv.append(file)

    def _copy_in(self, job: KVJob, source: KVSource) -> None:
        if not job.writes:
            return
        first = min(w.start for w in job.writes)
        kv = source.read(first, job.end)  # (L, 2, p - first, kv, dh), on the current stream
        shape = (*self.spec.block_shape()[:2], job.end - first, *self.spec.block_shape()[3:])
        if tuple(kv.shape) != shape:
            raise ValueError(
                f"KV source gave {tuple(kv.shape)} for positions [{first}, {job.end}), not {shape}"
            )
        for w in job.writes:
            if w.claim is not None:
                w.claim.settle()  # a queued block spill takes its copy of the slot's old bytes first
        with self.transfers.on_capture_stream([]):
            for tier in ARENA_TIERS:
                mine = [(w.slot, w.start, w.length) for w in job.writes if w.tier == tier]
                if mine:
                    write_blocks(self.layouts[tier], self.arenas[tier], kv, first, mine)
            self.transfers.keep_alive([kv])

    def _unit(self, tier: Tier) -> int:
        """Bytes one more block takes in `tier` (on disk: the estimate reserved before the file exists)."""
        if tier == "disk":
            return self.disk.estimate if self.disk is not None else 0
        return self.block_bytes[tier]

    def _take_slot(self, tier: Tier) -> int:
        """A free slot of the tier's KV arena (the caller checked the budget)."""
        slot = self.arenas[tier].alloc()
        assert slot is not None, "an unbounded arena always has a slot"
        return slot
