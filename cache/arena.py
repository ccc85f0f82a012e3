"""A pool of fixed-size byte blocks, preallocated on one device (hot: VRAM; cold: pinned host RAM).

No allocator call per checkpoint and no fragmentation: a checkpoint occupies exactly one block. The memory is
allocated up front, or, with `grow_by`, that many blocks at a time as blocks are taken (a hybrid model's
tiers, whose budget the states and the KV blocks share, `cache.kv_blocks`). Growing arenas may take their
chunks from a `ChunkSource`: one buffer allocated up front that a tier's arenas share. For pinned host
memory that matters: `cudaHostAlloc` of 64 MiB took ~35 ms on an H200 host and holds the driver's lock, so
a growth on any thread stalls the engine's launches (a hybrid follow-up's TTFT carried two such stalls).

Not thread-safe: `StateCache` calls it under its lock. Reading or writing a block's bytes happens outside the
lock, protected by the owner's pins. `fences` hold the CUDA event after the last reader of a freed block,
`claims` a host-side reader that may still be copying it (weakly); a writer reusing the block waits on both.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from typing import Protocol

import torch


class Claim(Protocol):
    """Someone may still read a released block's bytes (a spill's copy, `cache.spill`); `settle` waits until
    nobody does. Held weakly: a claim nobody references any more has no reader left."""

    def settle(self) -> None: ...


ALIGN = 4096  # a chunk cut from a `ChunkSource` starts on a page


class ChunkSource:
    """`nbytes` allocated once (pinned when `pin`, on the CPU), cut into the chunks that growing arenas ask
    for, in order; once it is used up, a chunk is allocated on its own as an arena without a source does.
    Thread-safe (the arenas of a tier may sit behind different locks)."""

    def __init__(self, nbytes: int, device: torch.device, pin: bool) -> None:
        self.device = device
        self.pin = pin and device.type == "cpu"
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=self.pin)
        self._offset = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Bytes handed out from the buffer (alignment included)."""
        return self._offset

    def take(self, blocks: int, block_bytes: int) -> torch.Tensor:
        """A `(blocks, block_bytes)` uint8 chunk: from the buffer while it lasts, else allocated."""
        size = blocks * block_bytes
        with self._lock:
            start = -(-self._offset // ALIGN) * ALIGN
            if start + size <= self.buffer.numel():
                self._offset = start + size
                return self.buffer[start : start + size].view(blocks, block_bytes)
        return alloc_chunk(blocks, block_bytes, self.device, self.pin)


def alloc_chunk(blocks: int, block_bytes: int, device: torch.device, pin: bool) -> torch.Tensor:
    """(blocks, block_bytes) uint8; pinned host memory is allocated pinned (no pageable copy first)."""
    return torch.empty((blocks, block_bytes), dtype=torch.uint8, device=device, pin_memory=pin)


class BlockArena:
    """`n` blocks of `block_bytes` each, in chunks of `(blocks, block_bytes)` uint8 tensors (from `source`
    when one is given)."""

    def __init__(
        self,
        block_bytes: int,
        budget_bytes: int,
        device: torch.device,
        pin: bool,
        grow_by: int = 0,
        source: ChunkSource | None = None,
    ) -> None:
        self.block_bytes = block_bytes
        self.device = device
        self._pin = pin and device.type == "cpu"
        self._source = source
        self._chunks: list[torch.Tensor] = []
        self._bases: list[int] = []
        self._allocated = 0
        self._free: list[int] = []
        self.fences: dict[int, torch.cuda.Event] = {}
        self.claims: dict[int, weakref.ref[Claim]] = {}
        self.used = 0
        self.target = budget_bytes // block_bytes
        self._grow_by = grow_by
        self._grow(0 if grow_by else self.target)

    @property
    def capacity(self) -> int:
        """Blocks usable now: the target, or more while pinned blocks keep occupancy above a shrunk target."""
        return max(self.target, self.used)

    @property
    def bytes_used(self) -> int:
        return self.used * self.block_bytes

    @property
    def bytes_capacity(self) -> int:
        return self.capacity * self.block_bytes

    def alloc(self) -> int | None:
        """A free block id, or None when the tier is at capacity (the caller evicts and retries)."""
        if self.used >= self.target:
            return None
        if not self._free and self._grow_by:
            self._grow(min(self.target, self._allocated + self._grow_by))
        if not self._free:
            return None
        self.used += 1
        return self._free.pop()

    def release(self, block: int, fence: torch.cuda.Event | None = None) -> None:
        self.used -= 1
        self._free.append(block)
        if fence is not None:
            self.fences[block] = fence

    def claim(self, block: int, claim: Claim) -> None:
        """A host-side reader of `block`'s current bytes (held weakly); the next writer settles it first."""
        self.claims[block] = weakref.ref(claim)

    def take_claim(self, block: int) -> Claim | None:
        """The live claim on `block`, if any (removed): settle it before overwriting the block."""
        ref = self.claims.pop(block, None)
        return ref() if ref is not None else None

    def block(self, block: int) -> torch.Tensor:
        """`(block_bytes,)` uint8 view of one block."""
        i = bisect.bisect_right(self._bases, block) - 1
        return self._chunks[i][block - self._bases[i]]

    def runs(self, blocks: list[int]) -> list[tuple[int, torch.Tensor]]:
        """`blocks` cut into runs of consecutive ids within one chunk: per run, its index in `blocks` and its
        `(n, block_bytes)` uint8 view (contiguous), so that many blocks move in one copy per run. Safe outside
        the cache lock for blocks the caller holds, as `block` is: chunks are only ever appended, each before
        its base, so a lookup racing a growth still finds its own blocks' chunks."""
        out: list[tuple[int, torch.Tensor]] = []
        start = 0
        while start < len(blocks):
            i = bisect.bisect_right(self._bases, blocks[start]) - 1
            base, chunk = self._bases[i], self._chunks[i]
            stop, end = base + chunk.shape[0], start + 1  # stop: the first id past the chunk
            while end < len(blocks) and blocks[end] == blocks[end - 1] + 1 and blocks[end] < stop:
                end += 1
            first = blocks[start] - base
            out.append((start, chunk[first : first + end - start]))
            start = end
        return out

    def set_budget(self, budget_bytes: int) -> None:
        """New target; grows the physical pool if needed (shrinking keeps memory, lowers the limit; with
        `grow_by`, memory grows as blocks are taken)."""
        self.target = budget_bytes // self.block_bytes
        if not self._grow_by:
            self._grow(self.target)

    def over(self) -> int:
        """Blocks to evict to get back under the target."""
        return max(0, self.used - self.target)

    def _grow(self, blocks: int) -> None:
        extra = blocks - self._allocated
        if extra <= 0:
            return
        if self._source is not None:
            chunk = self._source.take(extra, self.block_bytes)
        else:
            chunk = alloc_chunk(extra, self.block_bytes, self.device, self._pin)
        self._chunks.append(chunk)
        self._bases.append(self._allocated)
        self._free = list(range(self._allocated + extra - 1, self._allocated - 1, -1)) + self._free
        self._allocated += extra
