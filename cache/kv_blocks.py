"""KV blocks: the attention KV of hybrid checkpoints, stored once per block and shared along the prefix tree.

`KVBlocks` is the `Attachment` (`cache.base`) of a hybrid model's cache: a checkpoint at position p holds
its Mamba layers' state like any checkpoint (hot FP8, cold FP16) and, in each tier holding that state, the
KV blocks of positions [0, p) (`cache.kv_index` says which blocks, and how they are shared). The tier's
byte budget counts both (`cache.tiers`), eviction drops a copy with its holds, and the hot window's
demotion (dropping the hot copy, the cold one stays: write-through) releases the hot KV holds alone, so
state and KV always move together. A restore reads both from the tier the lease names.

Per tier, the blocks live in a KV arena of their own (`BlockArena`, grown on demand in chunks, never above
the tier's budget) in their own precision: hot in the model dtype on the cache device, cold in the cold
tier's dtype (FP16 by default, saturated to its range) in host memory, pinned on CUDA.

    block: (L, 2, s, kv, dh)   # attention layers, 0 = keys / 1 = values, offset in block, kv heads, head dim

Copies run outside the lock, like the state's (`cache.copies`): a capture writes the blocks it took (only
those the tier did not hold: a follow-up checkpoint writes its new full blocks and its partial one), on
the capture stream on CUDA, reading [first new block, p) from its `KVSource` once. A capture that holds a
block another capture is still writing waits for that write before it is published (`Fill`), so a
published checkpoint's blocks are all written. A restore copies the leased tier's blocks into the
`KVSink` on the current stream; a capture reusing a freed slot runs on the capture stream, which follows
the current stream's work, so it never overwrites a block a queued restore still reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.arena import BlockArena
from cache.base import Attachment, KVSink, KVSource, KVSpec, Tier
from cache.kv_index import Fill, KVBlock, KVIndex
from cache.transfer import Event, Transfers

ARENA_TIERS: tuple[Tier, ...] = ("hot", "cold")
GROWTH = 256  # KV arena blocks added at most per growth
FP16_MAX = 65504.0


@dataclass(frozen=True)
class KVWrite:
    """One block a capture writes: `view` (L, 2, s, kv, dh) of its slot, positions [start, start + length)."""

    view: torch.Tensor
    start: int
    length: int
    fill: Fill


@dataclass(frozen=True)
class KVJob:
    """A capture's KV work, taken under the lock: the blocks it writes, the writes of others it waits for."""

    writes: list[KVWrite]
    waits: list[Fill]
    end: int  # the checkpoint's position


class KVBlocks(Attachment):
    def __init__(self, spec: KVSpec, cold_dtype: torch.dtype, transfers: Transfers) -> None:
        self.spec = spec
        self.index = KVIndex(spec.block_size)
        self.transfers = transfers
        self.dtypes: dict[Tier, torch.dtype] = {"hot": spec.dtype, "cold": cold_dtype}
        devices = {"hot": transfers.device, "cold": torch.device("cpu")}
        self.block_bytes = {t: _numel(spec) * self.dtypes[t].itemsize for t in ARENA_TIERS}
        self.arenas = {
            t: BlockArena(self.block_bytes[t], 0, devices[t], pin=transfers.cuda) for t in ARENA_TIERS
        }
        self._missing: dict[tuple[int, Tier], list[KVBlock]] = {}  # reserved, not stored yet
        self._writes: dict[int, list[KVWrite]] = {}  # cid -> blocks it took, until its capture job

    # ---- the Attachment contract (under the cache lock) --------------------------------------------

    def bind(self, cid: int, tree: str, tokens: tuple[int, ...]) -> None:
        self.index.bind(cid, tree, tokens)

    def reserve(self, cid: int, tier: Tier) -> int:
        missing = self.index.hold_stored(cid, tier)
        self._missing[(cid, tier)] = missing
        return len(missing) * self.block_bytes[tier]

    def commit(self, cid: int, tier: Tier) -> None:
        writes = self._writes.setdefault(cid, [])
        for block in self._missing.pop((cid, tier)):
            slot = self._take_slot(tier)
            fill = self.index.store(cid, tier, block, slot)
            writes.append(KVWrite(self._view(tier, slot), block.start, block.length, fill))

    def drop(self, cid: int, tier: Tier) -> int:
        self._missing.pop((cid, tier), None)
        freed = self.index.release(cid, tier)
        for slot in freed:
            self.arenas[tier].release(slot)
        return len(freed) * self.block_bytes[tier]

    def unbind(self, cid: int) -> None:
        self._writes.pop(cid, None)
        self.index.unbind(cid)

    def used(self, tier: Tier) -> int:
        return self.index.slots_used.get(tier, 0) * self.block_bytes.get(tier, 0)

    def held(self, cid: int, tier: Tier) -> int:
        return len(self.index.held(cid, tier)) * self.block_bytes.get(tier, 0)

    # ---- jobs (under the cache lock) -----------------------------------------------------------------

    def capture_job(self, cid: int, position: int) -> KVJob:
        """What the capture of `cid` writes, and the writes by other captures it must wait for."""
        writes = self._writes.pop(cid, [])
        own = {id(w.fill) for w in writes}
        waits = []
        for tier in ARENA_TIERS:
            for block in self.index.held(cid, tier):
                fill = block.fills.get(tier)
                if fill is not None and id(fill) not in own and not fill.done.is_set():
                    waits.append(fill)
        return KVJob(writes, waits, position)

    def reads(self, cid: int, tier: Tier) -> list[tuple[torch.Tensor, int]]:
        """The blocks a restore of `cid` from `tier` reads, in token order: (view (L, 2, s, kv, dh), length)."""
        held = {id(b) for b in self.index.held(cid, tier)}
        chain = self.index.chains[cid]
        assert all(id(b) in held for b in chain.blocks), "a leased copy lost a KV block"
        return [(self._view(tier, b.slots[tier]), b.length) for b in chain.blocks]

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

    def read(self, blocks: list[tuple[torch.Tensor, int]], ready: Event | None, sink: KVSink) -> None:
        """Append the blocks' KV, positions [0, p), to `sink` in the model dtype, on the cache device."""
        tr = self.transfers
        tr.wait(ready)
        parts = [view[:, :, :length] for view, length in blocks]  # (L, 2, n, kv, dh) each
        if tr.cuda:
            parts = [p.to(tr.device, non_blocking=True) for p in parts]
        sink.append(torch.cat(parts, dim=2).to(self.spec.dtype))  # (L, 2, p, kv, dh)

    def check_source(self, source: KVSource | None, position: int) -> KVSource:
        if source is None or not callable(getattr(source, "read", None)):
            raise ValueError("a hybrid checkpoint needs its attention KV (kv=, a KVSource)")
        if source.length < position:
            raise ValueError(f"the KV source holds {source.length} tokens, the checkpoint needs {position}")
        return source

    # ---- helpers -------------------------------------------------------------------------------------

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
        with self.transfers.on_capture_stream([]):
            for w in job.writes:
                part = kv[:, :, w.start - first : w.start - first + w.length]
                w.view[:, :, : w.length].copy_(_cast(part, w.view.dtype), non_blocking=True)
            self.transfers.keep_alive([kv])

    def _take_slot(self, tier: Tier) -> int:
        """A free slot of the tier's KV arena (the caller checked the budget), growing the arena if needed."""
        arena = self.arenas[tier]
        slot = arena.alloc()
        if slot is None:
            arena.set_budget((arena.target + min(GROWTH, max(8, arena.target))) * arena.block_bytes)
            slot = arena.alloc()
        assert slot is not None
        return slot

    def _view(self, tier: Tier, slot: int) -> torch.Tensor:
        return self.arenas[tier].block(slot).view(self.dtypes[tier]).view(self.spec.block_shape())


def _numel(spec: KVSpec) -> int:
    n = 1
    for d in spec.block_shape():
        n *= d
    return n


def _cast(kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`kv` in `dtype`; into FP16 saturated to its range (a bf16 or fp32 key beyond 65504 stays finite)."""
    if dtype == torch.float16 and kv.dtype != torch.float16:
        kv = kv.clamp(-FP16_MAX, FP16_MAX)
    return kv.to(dtype)
