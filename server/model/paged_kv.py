"""A paged KV pool for the attention layers: fixed-size blocks shared by reference count, one block table
per sequence.

Shapes: L attention layers, N blocks, s tokens per block (`block_size`), kv key/value heads, dh head
dim, b rows, l new tokens, p tokens already held, q query heads.

    pool.kv: (L, N, 2, s, kv, dh) model dtype   # [layer, block, 0 = key / 1 = value, offset in block]

A block id names the same token range in every layer, so one block table serves all attention layers of
a sequence. Token t of a sequence sits in block `table[t // s]` at offset `t % s`.

Ownership and copy-on-write. `BlockAllocator` (plain Python) holds a free list and a reference count
per block. A `PagedKV` holds one reference to each block of its table. `fork(p)` shares the full blocks
of [0, p) (one more reference each) and copies the partial block that holds p (if p is not
block-aligned), so a checkpoint at any position costs at most one block copy. A sequence only writes at
positions >= its length, which lie past every block it shares, so a shared block is never written (and
`attend` checks it). `release()` drops the sequence's references; a block whose count reaches 0 returns
to the free list.

`PagedKV.views()` gives the per-layer `PagedLayerKV`s that `HybridState.kv` holds (the `KVCache`
contract). Unlike `ContiguousKV`, a view is not a value: attending appends in place to the sequence's
blocks, so resuming an older view of the same sequence would overwrite what a later one holds. That is
refused (`StaleKVView`); to continue one prefix two ways, fork it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.attention import causal_mask
from server.model.hybrid_config import HybridConfig


class OutOfKVBlocks(RuntimeError):
    """Every block of the pool is in use."""


class StaleKVView(RuntimeError):
    """A view was resumed after its sequence moved past it, or after the sequence was released."""


class BlockAllocator:
    """A free list and a reference count per block id in [0, num_blocks). No tensors: unit-testable alone.

    A block is free iff its count is 0. `allocate` hands out a free block with count 1; `incref` adds a
    holder; `decref` drops one and frees the block at 0. Dropping a free block raises (a double free)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, not {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise OutOfKVBlocks(
                f"KV pool out of blocks: all {self.num_blocks} are in use (admit fewer tokens or grow the pool)"
            )
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def allocate_many(self, n: int) -> list[int]:
        """n blocks, or none (and OutOfKVBlocks) if fewer than n are free."""
        if n > len(self._free):
            raise OutOfKVBlocks(
                f"KV pool out of blocks: {n} needed, {len(self._free)} of {self.num_blocks} free "
                "(admit fewer tokens or grow the pool)"
            )
        return [self.allocate() for _ in range(n)]

    def incref(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self._refs[block] == 0:
                raise ValueError(f"KV block {block} is free; allocate it before sharing it")
            self._refs[block] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self._refs[block] == 0:
                raise ValueError(f"KV block {block} is already free (double free)")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)


class KVBlockPool:
    """The keys and values of every attention layer, in `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1 or n_layers < 1:
            raise ValueError(f"block_size ({block_size}) and n_layers ({n_layers}) must be >= 1")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (n_layers, num_blocks, 2, block_size, n_kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)  # (L, N, 2, s, kv, dh)

    @classmethod
    def for_model(
        cls,
        cfg: HybridConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVBlockPool:
        """A pool for every attention layer of a hybrid model (which must have one)."""
        if cfg.attention is None or cfg.n_attention == 0:
            raise ValueError(f"a {cfg.arch} model without attention layers has no KV to page")
        attn = cfg.attention
        return cls(cfg.n_attention, num_blocks, block_size, attn.n_kv_heads, attn.head_dim, dtype, device)

    @property
    def n_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def block_bytes(self) -> int:
        """The bytes of one block across all layers, keys and values."""
        return self.kv[:, 0].numel() * self.kv.element_size()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def sequence(self) -> PagedKV:
        """A new, empty sequence."""
        return PagedKV(self, [], [0] * self.n_layers)


class PagedKV:
    """One sequence's KV in a pool: its block table and, per attention layer, how many tokens that layer
    has written (all equal between model calls; they differ only while a call runs through the layers)."""

    def __init__(self, pool: KVBlockPool, blocks: list[int], lengths: list[int]) -> None:
        self.pool = pool
        self.blocks = blocks  # block ids, in token order; this sequence holds one reference to each
        self.lengths = lengths  # (L,)
        self.released = False

    @property
    def length(self) -> int:
        """The tokens every layer holds."""
        return min(self.lengths)

    def views(self) -> tuple[PagedLayerKV, ...]:
        """The per-layer caches for `HybridState.kv`, at the sequence's current length."""
        return tuple(PagedLayerKV((self,), layer, self.length) for layer in range(self.pool.n_layers))

    def fork(self, length: int) -> PagedKV:
        """A new sequence holding this one's [0, length): the full blocks shared, the partial one copied."""
        self._check_live()
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot fork at {length}: the sequence holds {self.length} tokens")
        full, partial = divmod(length, self.pool.block_size)
        copies = self.pool.allocator.allocate_many(1 if partial else 0)  # first: raising leaks nothing
        shared = self.blocks[:full]
        self.pool.allocator.incref(shared)
        for copy in copies:
            self.pool.kv[:, copy] = self.pool.kv[:, self.blocks[full]]  # (L, 2, s, kv, dh), every layer
        return PagedKV(self.pool, shared + copies, [length] * self.pool.n_layers)

    def release(self) -> None:
        """Drop this sequence's reference to each of its blocks; its views can no longer attend."""
        self._check_live()
        self.pool.allocator.decref(self.blocks)
        self.blocks, self.released = [], True

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Append k and v (l, kv, dh) to `layer` at positions [p, p+l), p = what the layer holds, growing
        the table as needed; never into a shared block."""
        p = self.lengths[layer]
        block, offset = self._claim(p, k.shape[0], k.device)
        pages = self.pool.kv[layer]  # (N, 2, s, kv, dh)
        pages[block, 0, offset] = k.to(pages.dtype)
        pages[block, 1, offset] = v.to(pages.dtype)
        self.lengths[layer] = p + k.shape[0]

    def read(self, start: int, end: int) -> Tensor:
        """Keys and values of positions [start, end) in every layer: (L, 2, end - start, kv, dh) (what the
        state cache's `KVSource` reads at a capture)."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot read [{start}, {end}): the sequence holds {self.length} tokens")
        size = self.pool.block_size
        positions = torch.arange(start, end, device=self.pool.kv.device)
        table = torch.tensor(self.blocks, dtype=torch.long, device=self.pool.kv.device)
        picked = self.pool.kv[:, table[positions // size], :, positions % size]  # (n, L, 2, kv, dh)
        return picked.permute(1, 2, 0, 3, 4)

    def append(self, kv: Tensor) -> None:
        """Append kv (L, 2, n, kv, dh) to every layer (what a restore from the state cache writes, `KVSink`):
        one table update and one indexed write for all layers."""
        self._check_live()
        p, n = self.length, kv.shape[2]
        if any(length != p for length in self.lengths):
            raise ValueError(f"cannot append to every layer: the layers hold {self.lengths} tokens")
        block, offset = self._claim(p, n, kv.device)
        rows = kv.permute(2, 0, 1, 3, 4)  # (n, L, 2, kv, dh): the indexed positions' layout in the pool
        self.pool.kv[:, block, :, offset] = rows.to(self.pool.kv.dtype)
        self.lengths = [p + n] * self.pool.n_layers

    def _claim(self, p: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Grow the table to hold positions [p, p + n), checked unshared; their blocks and offsets (n,), (n,)."""
        size = self.pool.block_size
        self.blocks += self.pool.allocator.allocate_many(self.pool.blocks_for(p + n) - len(self.blocks))
        first, last = p // size, (p + n - 1) // size
        if any(self.pool.allocator.refcount(b) != 1 for b in self.blocks[first : last + 1]):
            raise AssertionError("copy-on-write broken: a write reached a shared KV block")
        positions = torch.arange(p, p + n, device=device)
        table = torch.tensor(self.blocks, device=device)
        return table[positions // size], positions % size

    def gather(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """`layer`'s keys and values of [0, length): ((kv, length, dh), (kv, length, dh))."""
        pages = self.pool.kv[layer, self.blocks[: self.pool.blocks_for(length)]]  # (n, 2, s, kv, dh)
        flat = pages.transpose(0, 1).flatten(1, 2)[:, :length]  # (2, length, kv, dh)
        return flat[0].transpose(0, 1), flat[1].transpose(0, 1)

    def _check_live(self) -> None:
        if self.released:
            raise StaleKVView("the KV sequence was released")


@dataclass(frozen=True)
class PagedLayerKV:
    """One attention layer's `KVCache` over b sequences (one per row) that all hold `length` tokens."""

    rows: tuple[PagedKV, ...]
    layer: int
    length: int

    @classmethod
    def batch(cls, rows: Sequence[PagedKV]) -> tuple[PagedLayerKV, ...]:
        """Per-layer caches over several sequences at one length, for a batched `HybridState`."""
        lengths = {row.length for row in rows}
        if len(lengths) != 1 or len({id(row.pool) for row in rows}) != 1:
            raise ValueError(f"batched rows must share a pool and a length, not lengths {sorted(lengths)}")
        n_layers, length = rows[0].pool.n_layers, lengths.pop()
        return tuple(cls(tuple(rows), layer, length) for layer in range(n_layers))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, PagedLayerKV]:
        """q (b, l, q, dh), k and v (b, l, kv, dh) at [length, length+l) -> (out (b, l, q, dh), the view of
        [0, length+l)). Writes k and v into the rows' blocks, then attends over the gathered prefix."""
        if len(self.rows) != q.shape[0]:
            raise ValueError(f"{q.shape[0]} rows of queries for {len(self.rows)} KV sequences")
        new = self.length + q.shape[1]
        for row, row_k, row_v in zip(self.rows, k, v, strict=True):
            self._check_current(row)
            row.write(self.layer, row_k, row_v)
        keys, values = zip(*(row.gather(self.layer, new) for row in self.rows), strict=True)
        mask = causal_mask(q.shape[1], self.length, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (b, q, l, dh)
            torch.stack(keys).to(q.dtype),  # (b, kv, p+l, dh)
            torch.stack(values).to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # (b, q, l, dh)
        return out.transpose(1, 2), PagedLayerKV(self.rows, self.layer, new)

    def _check_current(self, row: PagedKV) -> None:
        row._check_live()
        if row.lengths[self.layer] != self.length:
            raise StaleKVView(
                f"layer {self.layer} of this sequence holds {row.lengths[self.layer]} tokens, the view "
                f"{self.length}: resume the latest state, or fork to continue a prefix two ways"
            )
