"""`ChunkSource`: the chunks of growing arenas cut from one buffer allocated up front, page-aligned, then
allocated on their own once it is used up; a `BlockArena` growing from it hands out distinct blocks."""

from __future__ import annotations

import torch

from cache.arena import ALIGN, BlockArena, ChunkSource

CPU = torch.device("cpu")


def test_chunks_are_cut_from_the_buffer_in_order_page_aligned_then_allocated() -> None:
    source = ChunkSource(3 * ALIGN, CPU, pin=False)
    source.buffer.zero_()
    base = source.buffer.data_ptr()
    first = source.take(3, 100)  # 300 bytes
    second = source.take(2, ALIGN)  # starts on the next page, ends the buffer
    assert first.shape == (3, 100) and first.data_ptr() == base
    assert second.data_ptr() == base + ALIGN and source.used == 3 * ALIGN
    third = source.take(1, 8)  # used up: a chunk of its own
    assert not base <= third.data_ptr() < base + 3 * ALIGN and third.shape == (1, 8)
    first.fill_(1)
    second.fill_(2)
    assert int(source.buffer[:300].sum()) == 300 and int(source.buffer[300:ALIGN].sum()) == 0


def test_arenas_growing_from_one_source_hand_out_their_own_blocks() -> None:
    source = ChunkSource(64 * ALIGN, CPU, pin=False)
    states = BlockArena(1000, 1 << 20, CPU, pin=False, grow_by=3, source=source)
    kv = BlockArena(256, 1 << 20, CPU, pin=False, grow_by=5, source=source)
    taken = [(states, states.alloc()) for _ in range(7)] + [(kv, kv.alloc()) for _ in range(11)]
    for arena, block in taken:
        assert block is not None
        arena.block(block).fill_(block + (100 if arena is kv else 0))
    for arena, block in taken:
        assert block is not None
        assert bool((arena.block(block) == block + (100 if arena is kv else 0)).all())  # nothing overlaps
    assert sorted(b for a, b in taken if a is states) == list(range(7))  # type: ignore[type-var]
    chunks = [*states._chunks, *kv._chunks]
    base = source.buffer.data_ptr()
    assert all(base <= c.data_ptr() < base + source.buffer.numel() for c in chunks)
