"""`SpillCopy`: the encoded cold fields of a checkpoint queued for the disk tier, copied out of its cold block
on first use, outside the cache lock.

A spill is decided under the lock, but the wait for the capture's copy into the cold block (`ready`, CUDA)
and the host clone of its bytes (tens of MB for a large model) are not: they run in `fields()`, called by
whoever needs the bytes first: the writer thread before writing the file, a `fetch` reading the pending
copy, or the capture that next writes the block (`settle`). Until then the block must keep its bytes. While
the checkpoint keeps its cold copy, it owns the block; this object is also the block's *claim*
(`BlockArena.claim`, registered when the spill is queued), so once the cold copy is dropped, the next capture
into the block settles it before writing. Dropping the disk copy `cancel`s it: a copy never taken is never taken later (the block may hold
another checkpoint by then), and `fields()` returns None. Thread-safe (own lock); the cache lock is never
held while it runs.
"""

from __future__ import annotations

import threading

import torch

from cache.layout import BlockLayout


class SpillCopy:
    def __init__(self, layout: BlockLayout, block: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        self._layout = layout
        self._block: torch.Tensor | None = block  # (block_bytes,) uint8, host: the cold block
        self._ready = ready
        self._fields: dict[str, torch.Tensor] | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    def fields(self) -> dict[str, torch.Tensor] | None:
        """The encoded fields (CPU clones), taken from the block now if not yet; None if cancelled first."""
        with self._lock:
            if self._fields is None and self._block is not None and not self._cancelled:
                if self._ready is not None:
                    self._ready.synchronize()
                self._fields = {k: v.clone() for k, v in self._layout.named(self._block).items()}
            self._block = None
            return self._fields

    def settle(self) -> None:
        """A claim's contract: once this returns, nothing reads the block any more (waits for a copy being
        taken; takes it now unless cancelled)."""
        self.fields()

    def cancel(self) -> None:
        """The disk copy was dropped: take no copy from now on. Lock-free (called under the cache lock): a copy
        already being taken finishes, and `settle` waits for it."""
        self._cancelled = True
