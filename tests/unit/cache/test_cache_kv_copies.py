"""Batched KV block copies (`cache.kv_copies.write_blocks`, `read_blocks`) store and restore what block-by-block
encoding and decoding do, across arena chunks, scattered slots, pieces and a partial last block."""

from __future__ import annotations

import pytest
import torch

from cache import kv_copies
from cache.arena import BlockArena
from cache.codec import NativeCodec, make_codec
from cache.kv_copies import ArenaBlocks, KVPart, decode, read_blocks, write_blocks
from cache.layout import BlockLayout
from cache.transfer import Transfers

S = 8  # tokens per block
SHAPE = (2, 2, S, 3, 4)  # (L, 2, s, kv, dh)
CPU = torch.device("cpu")
CODECS = {
    "native": lambda: NativeCodec(torch.bfloat16),
    "fp16": lambda: make_codec("fp16"),
    "fp8": lambda: make_codec("fp8"),
}


def _make_layout(codec: str) -> BlockLayout:
    return BlockLayout({"kv": (SHAPE, torch.bfloat16)}, CODECS[codec]())


def _make_arena(layout: BlockLayout, blocks: int = 12) -> BlockArena:
    """Chunks of 3 blocks: ids 0-2, 3-5, ... each in a tensor of its own."""
    arena = BlockArena(layout.block_bytes, 1 << 40, CPU, pin=False, grow_by=3)
    assert [arena.alloc() for _ in range(blocks)] == list(range(blocks))
    return arena


def _make_kv(tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens)
    return (torch.randn((2, 2, tokens, 3, 4), generator=g) * 10).to(torch.bfloat16)  # (L, 2, n, kv, dh)


def _fields(layout: BlockLayout, block: torch.Tensor, n: int) -> KVPart:
    data, scale = layout.views(block)["kv"]
    return KVPart(layout.codec, data, scale).head(n)


def _write_one(layout: BlockLayout, x: torch.Tensor) -> torch.Tensor:
    """x (L, 2, n, kv, dh) encoded block-by-block, into a fresh block."""
    block = torch.zeros(layout.block_bytes, dtype=torch.uint8)
    part = _fields(layout, block, x.shape[2])
    layout.codec.encode_into(x, part.data, part.scale)
    return block


def _assert_same_fields(layout: BlockLayout, got: torch.Tensor, want: torch.Tensor, n: int) -> None:
    a, b = _fields(layout, got, n), _fields(layout, want, n)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert (a.scale is None) == (b.scale is None)
    if a.scale is not None and b.scale is not None:
        assert torch.equal(a.scale, b.scale)


# slots of blocks 1..5 (full) and the partial one: runs split by chunk ends and by gaps, in any order
SLOTS = [4, 5, 6, 0, 9, 2]


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("piece_blocks", [1, 2, 100])
def test_write_blocks_equals_block_by_block(
    codec: str, piece_blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _make_layout(codec)
    monkeypatch.setattr(kv_copies, "HOST_PIECE_BYTES", piece_blocks * layout.block_bytes)
    arena, kv = _make_arena(layout), _make_kv(6 * S + 3)
    first = S  # the source holds [8, 51): block 0 is stored already
    writes = [(slot, S * (i + 1), S if i < 5 else 3) for i, slot in enumerate(SLOTS)]
    write_blocks(layout, arena, kv[:, :, first:], first, writes[::-1])  # any order
    for slot, start, n in writes:
        _assert_same_fields(layout, arena.block(slot), _write_one(layout, kv[:, :, start : start + n]), n)


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("tokens", [S, 4 * S, 4 * S + 5, 3])
def test_read_blocks_equals_block_by_block(codec: str, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _make_layout(codec)
    monkeypatch.setattr(kv_copies, "HOST_PIECE_BYTES", 2 * layout.block_bytes)  # pieces of 2 blocks
    arena, kv = _make_arena(layout), _make_kv(tokens)
    slots = SLOTS[: -(-tokens // S)]
    writes = [(slot, i * S, min(S, tokens - i * S)) for i, slot in enumerate(slots)]
    write_blocks(layout, arena, kv, 0, writes)
    got = read_blocks(ArenaBlocks(layout, arena, slots, tokens), CPU, torch.bfloat16)
    parts = [_fields(layout, arena.block(slot), n) for slot, _, n in writes]
    want = decode(Transfers(CPU), parts, torch.bfloat16)
    assert got.shape == (2, 2, tokens, 3, 4)
    assert torch.equal(got, want)
    if codec == "native":
        assert torch.equal(got, kv)


def test_runs_cut_at_gaps_and_chunk_ends() -> None:
    layout = _make_layout("native")
    arena = _make_arena(layout)
    runs = arena.runs([0, 1, 2, 3, 4, 7, 6])
    assert [(i, view.shape[0]) for i, view in runs] == [(0, 3), (3, 2), (5, 1), (6, 1)]
    firsts = [0, 3, 7, 6]
    for (_, view), block in zip(runs, firsts, strict=True):
        assert view.data_ptr() == arena.block(block).data_ptr()
        assert view.shape[1] == layout.block_bytes
    assert arena.runs([]) == []


def test_rows_views_are_each_blocks_views() -> None:
    layout = _make_layout("fp16")
    arena = _make_arena(layout)
    (_, rows), *_ = arena.runs([3, 4, 5])
    data, scale = layout.rows_views(rows)["kv"]
    for i, block in enumerate([3, 4, 5]):
        one_data, one_scale = layout.views(arena.block(block))["kv"]
        assert data[i].data_ptr() == one_data.data_ptr() and data[i].shape == one_data.shape
        assert scale is not None and one_scale is not None
        assert scale[i].data_ptr() == one_scale.data_ptr() and scale[i].shape == one_scale.shape
