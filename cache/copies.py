"""The tensor work of captures and fetches (run outside the cache lock, on blocks pinned by the caller)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cache.layout import BlockLayout
from cache.transfer import Event, Transfers

# device memory that stages one encode of captures bound for another device (the host tier) or scattered
STAGING_BYTES = 128 << 20


@dataclass(frozen=True)
class TierBlocks:
    """The blocks one tier reserved for a batch of captures."""

    layout: BlockLayout
    items: list[int]  # the batch rows (stacked states) that have a block in this tier, ascending
    runs: list[tuple[int, torch.Tensor]]  # `BlockArena.runs` over those rows' blocks: (index in items, view)


def write_captures(
    transfers: Transfers,
    states: Mapping[str, torch.Tensor],
    tiers: list[TierBlocks],
    waits: list[Event | None],
) -> tuple[Event | None, Event | None]:
    """Encode n stacked states (`states[name]: (n, *shape)`, on the cache device) into their hot and (host) cold
    blocks; return (start, ready) events.

    On CUDA everything runs on the capture stream after the current stream's queued work: one codec launch
    per state tensor for a whole run of blocks (FP8 into the hot arena; FP16 into a device staging buffer,
    then one non-blocking D2H copy per run of pinned blocks). A batch costs about as many launches as one
    capture did, whatever its size.
    """
    values = dict(states)
    with transfers.on_capture_stream(waits):
        start = transfers.record()
        for tier in tiers:
            _write_tier(values, tier)
        transfers.keep_alive(list(values.values()))
        return start, transfers.record()


def _write_tier(states: dict[str, torch.Tensor], tier: TierBlocks) -> None:
    device = next(iter(states.values())).device
    runs, items = tier.runs, tier.items
    if len(runs) == 1 and runs[0][1].device == device:  # one run of blocks the states' device holds
        tier.layout.encode_rows(_rows(states, items), runs[0][1], arena=True)
        return
    per = max(1, STAGING_BYTES // tier.layout.block_bytes)
    for a in range(0, len(items), per):
        b = min(len(items), a + per)
        staging = torch.empty((b - a, tier.layout.block_bytes), dtype=torch.uint8, device=device)
        tier.layout.encode_rows(_rows(states, items[a:b]), staging)
        for first, view in runs:
            lo, hi = max(first, a), min(first + view.shape[0], b)
            if lo < hi:
                view[lo - first : hi - first].copy_(staging[lo - a : hi - a], non_blocking=True)


def _rows(states: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The stacked states of `rows` (ascending): a slice when they are consecutive, else a gather."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return {name: t[rows[0] : rows[-1] + 1] for name, t in states.items()}
    index = torch.tensor(rows, dtype=torch.long).to(next(iter(states.values())).device, non_blocking=True)
    return {name: t.index_select(0, index) for name, t in states.items()}


def read_hot(
    transfers: Transfers,
    layout: BlockLayout,
    block: torch.Tensor,
    ready: Event | None,
    out: dict[str, torch.Tensor],
) -> Event | None:
    """Decode a hot block into `out` on the current stream; return the fence (end of the read)."""
    transfers.wait(ready)
    layout.decode_into(block, out, arena=True)
    return transfers.record()


def read_cold(
    transfers: Transfers,
    layout: BlockLayout,
    block: torch.Tensor,
    ready: Event | None,
    out: dict[str, torch.Tensor],
) -> Event | None:
    """Copy a host block to the device (copy stream) and decode it into `out` (current stream).

    Returns the fence: the host block may be overwritten once it completed.
    """
    if not transfers.cuda:
        layout.decode_into(block, out, arena=True)
        return None
    with transfers.on_copy_stream([ready]):
        staging = block.to(transfers.device, non_blocking=True)  # (block_bytes,) uint8
        copied = transfers.record()
    transfers.wait(copied)
    transfers.keep_alive([staging])
    layout.decode_into(staging, out)
    return copied


def read_fields(
    transfers: Transfers,
    layout: BlockLayout,
    fields: Mapping[str, torch.Tensor],
    out: dict[str, torch.Tensor],
) -> None:
    """Decode named encoded fields (`"{state}.data"`, `"{state}.scale"`, CPU tensors from disk) into `out`.

    Every field's shape and dtype is checked before anything is written: a bad file never half-writes `out`
    (e.g. a live slot). Raises KeyError or RuntimeError."""
    for f in layout.fields:
        key = f"{f.state}.{f.part}"
        if tuple(fields[key].shape) != f.shape or fields[key].dtype != f.dtype:
            raise RuntimeError(
                f"{key}: {fields[key].dtype} {tuple(fields[key].shape)}, expected {f.dtype} {f.shape}"
            )
    codec = layout.codec
    for name in layout.spec:
        data = fields[f"{name}.data"].to(transfers.device, non_blocking=True)
        scale = fields.get(f"{name}.scale")
        scale = scale.to(transfers.device, non_blocking=True) if scale is not None else None
        codec.decode_into(data, scale, out[name])


def export_fields(
    source: BlockLayout, block: torch.Tensor, ready: Event | None, target: BlockLayout
) -> dict[str, torch.Tensor]:
    """The fields of a stored copy (`block`, hot or cold, encoded with `source`) re-encoded with `target`, as CPU
    tensors of their own (the block may be reused once this returns). Waits for the capture's copies
    (`ready`); the same codec copies the bytes, another one decodes and encodes on the block's device."""
    if ready is not None:
        ready.synchronize()
    if source.codec.name == target.codec.name:
        return {name: t.to("cpu", copy=True) for name, t in source.named(block).items()}
    state = source.empty_state(block.device)
    source.decode_into(block, state)
    out = torch.empty(target.block_bytes, dtype=torch.uint8, device=block.device)  # (block_bytes,)
    target.encode_into(state, out)
    return {name: t.to("cpu", copy=True) for name, t in target.named(out).items()}
