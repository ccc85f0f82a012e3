"""Byte layout of one encoded checkpoint: every field of every state tensor at a fixed offset in a flat block.

All checkpoints of a model encode to the same number of bytes per codec, so a tier is a pool of fixed-size
blocks (`cache.arena`). A block `(block_bytes,)` uint8 is viewed, field by field, as typed tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cache.base import Codec, StateSpec

ALIGN = 256  # bytes; keeps every typed view aligned (and GPU accesses coalesced)
CPU_ENCODE_BYTES = 1 << 20  # states per codec call on the CPU: its temporaries stay in the caches


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class Field:
    """One stored tensor: `name.data` or `name.scale`."""

    state: str
    part: str  # "data" | "scale"
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int

    def view(self, block: torch.Tensor) -> torch.Tensor:
        """This field inside `block: (block_bytes,)` uint8, as a typed `shape` tensor."""
        return block[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


class BlockLayout:
    """Where each encoded field of a state spec sits inside a block, for one codec."""

    def __init__(self, spec: StateSpec, codec: Codec) -> None:
        if not spec:
            raise ValueError("empty state spec")
        self.spec = {name: (tuple(shape), dtype) for name, (shape, dtype) in sorted(spec.items())}
        self.codec = codec
        fields: list[Field] = []
        offset = 0
        for name, (shape, _) in self.spec.items():
            if len(shape) < 1 or min(shape) < 1:
                raise ValueError(f"state {name!r} needs a non-empty shape, got {shape}")
            parts = [("data", shape, codec.storage_dtype)]
            if codec.scaled:
                parts.append(("scale", shape[:-1], torch.float32))
            for part, pshape, dtype in parts:
                nbytes = math.prod(pshape) * dtype.itemsize
                fields.append(Field(name, part, pshape, dtype, offset, nbytes))
                offset = _round_up(offset + nbytes, ALIGN)
        self.fields = tuple(fields)
        self.block_bytes = max(offset, ALIGN)
        # views of arena blocks by address: arena memory lives as long as the cache, so they stay valid
        self._arena_views: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def views(
        self, block: torch.Tensor, arena: bool = False
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """`block: (block_bytes,)` uint8 -> {state name: (data view, scale view or None)}.

        `arena=True` (a block of a tier's arena, never freed while the cache lives) reuses the views made at
        the block's first use: slicing and viewing every field again is a fair share of a hot restore's host
        time. Never pass it for a temporary block (a staging copy), whose memory the views would keep alive."""
        if arena:
            cached = self._arena_views.get(block.data_ptr())
            if cached is None:
                cached = self._arena_views[block.data_ptr()] = self.views(block)
            return cached
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for f in self.fields:
            view = f.view(block)
            data, scale = out.get(f.state, (view, None))
            out[f.state] = (data, view) if f.part == "scale" else (view, scale)
        return out

    def rows_views(self, rows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """`rows: (n, block_bytes)` uint8, n blocks each contiguous (an arena's run, a staging buffer) -> {state
        name: (data (n, *shape), scale (n, *shape[:-1]) or None)}, strided views over all n blocks at once."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for f in self.fields:
            view = rows[:, f.offset : f.offset + f.nbytes].view(f.dtype).view(rows.shape[0], *f.shape)
            data, scale = out.get(f.state, (view, None))
            out[f.state] = (data, view) if f.part == "scale" else (view, scale)
        return out

    def named(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views keyed `"{state}.{part}"` (the names used in disk files)."""
        return {f"{f.state}.{f.part}": f.view(block) for f in self.fields}

    def fingerprint(self) -> str:
        """Identifies spec + codec: files written under another fingerprint are not this model's."""
        parts = [
            f"{n}:{'x'.join(map(str, s))}:{str(d).removeprefix('torch.')}" for n, (s, d) in self.spec.items()
        ]
        return f"{self.codec.name}|" + ",".join(parts)

    def encode_into(self, state: dict[str, torch.Tensor], block: torch.Tensor, arena: bool = False) -> None:
        """Encode every state tensor into `block` (same device as the state); `arena` as in `views`."""
        for name, (data, scale) in self.views(block, arena).items():
            self.codec.encode_into(state[name], data, scale)

    def encode_rows(
        self, states: Mapping[str, torch.Tensor], rows: torch.Tensor, arena: bool = False
    ) -> None:
        """Encode n stacked states, `states[name]: (n, *shape)`, into `rows: (n, block_bytes)` (n contiguous
        blocks: an arena's run, a staging buffer): on CUDA one codec call per state tensor for all n. On the
        CPU about `CPU_ENCODE_BYTES` of states per call: the torch ops' temporaries are as large as their input,
        and a whole batch's spill out of the caches (a batch of 64 demo-model states in one call took twice as
        long per state). `arena`: the rows are an arena's (a lone block then reuses its views, as `views`
        does)."""
        if rows.shape[0] == 1 and arena:
            self.encode_into({name: t[0] for name, t in states.items()}, rows[0], arena=True)
            return
        views, n = self.rows_views(rows), rows.shape[0]
        state_bytes = sum(t[0].numel() * t.element_size() for t in states.values()) if n else 1
        per = n if rows.is_cuda else max(1, CPU_ENCODE_BYTES // max(1, state_bytes))
        for a in range(0, n, per):
            for name, (data, scale) in views.items():
                part = None if scale is None else scale[a : a + per]
                self.codec.encode_into(states[name][a : a + per], data[a : a + per], part)

    def decode_into(self, block: torch.Tensor, out: dict[str, torch.Tensor], arena: bool = False) -> None:
        for name, (data, scale) in self.views(block, arena).items():
            self.codec.decode_into(data, scale, out[name])

    def empty_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in self.spec.items()
        }
