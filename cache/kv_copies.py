"""The tensor work on hybrid checkpoints' KV blocks (run outside the cache lock, on blocks held by the caller).

A block `(L, 2, s, kv, dh)` is stored through its tier's codec (`cache.codec`: the model dtype as it is, FP8 or
FP16 with a scale per token and head, fp32), as the fields of a `BlockLayout`: `data (L, 2, s, kv, dh)` and,
for a scaled codec, `scale (L, 2, s, kv)` fp32. A block holding n < s tokens (a checkpoint's partial block)
uses the first n of each.

Captures and restores from the hot and cold arenas move many blocks at once (`write_blocks`, `read_blocks`):
per piece of up to `PIECE_BYTES` (`HOST_PIECE_BYTES` on a CPU), one encode (or decode) over all its blocks,
through the layout's strided views of a `(k, block_bytes)` buffer (`BlockLayout.rows_views`), and one copy
per run of consecutive arena slots (`BlockArena.runs`); a fresh arena hands out consecutive slots, so a
32k-token prefix (2,048 blocks of 16 tokens) takes a few launches and copies, not thousands. Encoding is per
token and head, so a batch stores the bytes that block-by-block encoding stores. Disk blocks are files,
decoded one by one (`decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.arena import BlockArena
from cache.base import Codec
from cache.layout import BlockLayout
from cache.transfer import Transfers

# a batched copy moves its blocks a piece of about this many bytes at a time: on a GPU a few launches for a
# long prefix and bounded buffers; on a CPU, pieces that stay in its caches through the codec's passes
PIECE_BYTES = 64 << 20
HOST_PIECE_BYTES = 1 << 20
Write = tuple[int, int, int]  # a block a capture writes: (arena slot, position of its first token, tokens)


@dataclass(frozen=True)
class KVPart:
    """The encoded KV of n tokens: `data (L, 2, n, kv, dh)`, `scale (L, 2, n, kv)` or None, and their codec."""

    codec: Codec
    data: torch.Tensor
    scale: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return self.data.shape[2]

    def head(self, n: int) -> KVPart:
        """Its first n tokens."""
        scale = self.scale[:, :, :n] if self.scale is not None else None
        return KVPart(self.codec, self.data[:, :, :n], scale)


def decode(transfers: Transfers, parts: list[KVPart], dtype: torch.dtype) -> torch.Tensor:
    """The parts decoded in order: `(L, 2, p, kv, dh)` in `dtype` on the cache device (host parts are copied
    over first, on the current stream)."""
    first = parts[0].data
    shape = (*first.shape[:2], sum(p.tokens for p in parts), *first.shape[3:])
    out = torch.empty(shape, dtype=dtype, device=transfers.device)  # (L, 2, p, kv, dh)
    start = 0
    for part in parts:
        data, scale = part.data, part.scale
        if data.device != out.device:
            data = data.to(out.device, non_blocking=True)
            scale = scale.to(out.device, non_blocking=True) if scale is not None else None
        part.codec.decode_into(data, scale, out[:, :, start : start + part.tokens])
        start += part.tokens
    return out


@dataclass(frozen=True)
class ArenaBlocks:
    """What a restore reads from a hot or cold KV arena: the slots of its blocks in token order, each
    holding s tokens but the last, which holds the rest of `tokens`."""

    layout: BlockLayout
    arena: BlockArena
    slots: list[int]
    tokens: int


def write_blocks(
    layout: BlockLayout, arena: BlockArena, kv: torch.Tensor, first: int, writes: list[Write]
) -> None:
    """Encode blocks of `kv (L, 2, n, kv, dh)`, positions [first, first + n) on the cache device, into their
    arena slots: full blocks of consecutive positions a piece at a time, a partial one alone. On CUDA, call
    it on the capture stream (host arenas are written `non_blocking` from device buffers)."""
    s = layout.spec["kv"][0][2]
    for piece in _pieces(sorted(writes, key=lambda w: w[1]), s, _per_piece(layout, kv.device)):
        offset, length = piece[0][1] - first, piece[0][2]
        x = kv[:, :, offset : offset + len(piece) * length]  # (L, 2, k * n, kv, dh)
        x = x.unflatten(2, (len(piece), length)).permute(2, 0, 1, 3, 4, 5)  # (k, L, 2, n, kv, dh)
        _encode_rows(layout, arena, x, [w[0] for w in piece])


def read_blocks(blocks: ArenaBlocks, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The blocks decoded in order: `(L, 2, p, kv, dh)` in `dtype` on `device` (host blocks are copied over
    first, `non_blocking`, on the current stream)."""
    shape = blocks.layout.spec["kv"][0]  # (L, 2, s, kv, dh)
    s, full = shape[2], blocks.tokens // shape[2]
    out = torch.empty((*shape[:2], blocks.tokens, *shape[3:]), dtype=dtype, device=device)
    per = _per_piece(blocks.layout, out.device)
    for i in range(0, full, per):
        j = min(full, i + per)
        view = out[:, :, i * s : j * s].unflatten(2, (j - i, s)).permute(2, 0, 1, 3, 4, 5)
        _decode_rows(blocks, blocks.slots[i:j], view)  # (k, L, 2, s, kv, dh)
    if full < len(blocks.slots):
        _decode_rows(blocks, blocks.slots[full:], out[:, :, full * s :].unsqueeze(0))
    return out


def _per_piece(layout: BlockLayout, device: torch.device) -> int:
    """Blocks per piece of a batched copy computed on `device`."""
    budget = PIECE_BYTES if device.type == "cuda" else HOST_PIECE_BYTES
    return max(1, budget // layout.block_bytes)


def _pieces(writes: list[Write], s: int, per: int) -> list[list[Write]]:
    """Writes sorted by position, cut into pieces of at most `per` full blocks of consecutive positions; a
    partial block is a piece of its own."""
    pieces: list[list[Write]] = []
    for w in writes:
        last = pieces[-1] if pieces else None
        if last is not None and w[2] == s == last[-1][2] and w[1] == last[-1][1] + s and len(last) < per:
            last.append(w)
        else:
            pieces.append([w])
    return pieces


def _encode_rows(layout: BlockLayout, arena: BlockArena, x: torch.Tensor, slots: list[int]) -> None:
    """Encode `x (k, L, 2, n, kv, dh)` into the first n tokens of k arena slots: straight into the arena
    when the slots are one run on x's device, else into a device buffer copied over run by run."""
    runs = arena.runs(slots)
    direct = len(runs) == 1 and runs[0][1].device == x.device
    rows = (
        runs[0][1]
        if direct
        else torch.empty((len(slots), layout.block_bytes), dtype=torch.uint8, device=x.device)
    )
    data, scale = layout.rows_views(rows)["kv"]  # (k, L, 2, s, kv, dh), (k, L, 2, s, kv) or None
    n = x.shape[3]
    layout.codec.encode_into(x, data[:, :, :, :n], scale[:, :, :, :n] if scale is not None else None)
    if not direct:
        for i, dest in runs:
            dest.copy_(rows[i : i + dest.shape[0]], non_blocking=True)


def _decode_rows(blocks: ArenaBlocks, slots: list[int], out: torch.Tensor) -> None:
    """Decode the first n tokens of k arena slots into `out (k, L, 2, n, kv, dh)`."""
    rows = gather_rows(blocks.arena, slots, out.device)
    data, scale = blocks.layout.rows_views(rows)["kv"]
    n = out.shape[3]
    blocks.layout.codec.decode_into(data[:, :, :, :n], scale[:, :, :, :n] if scale is not None else None, out)


def gather_rows(arena: BlockArena, slots: list[int], device: torch.device) -> torch.Tensor:
    """The slots' bytes `(k, block_bytes)` on `device`: the arena's own view when they are one run there,
    else a buffer filled with one copy per run."""
    runs = arena.runs(slots)
    if len(runs) == 1 and runs[0][1].device == device:
        return runs[0][1]
    rows = torch.empty((len(slots), arena.block_bytes), dtype=torch.uint8, device=device)
    for i, src in runs:
        rows[i : i + src.shape[0]].copy_(src, non_blocking=True)
    return rows
