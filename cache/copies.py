"""The tensor work of captures and fetches (run outside the cache lock, on blocks pinned by the caller)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cache.layout import BlockLayout
from cache.transfer import Event, Transfers


def write_capture(
    transfers: Transfers,
    state: Mapping[str, torch.Tensor],
    hot: tuple[BlockLayout, torch.Tensor] | None,
    cold: tuple[BlockLayout, torch.Tensor] | None,
    waits: list[Event | None],
) -> tuple[Event | None, Event | None]:
    """Encode `state` (on the cache device) into the hot and (host) cold blocks; return (start, ready) events.

    On CUDA everything runs on the capture stream after the current stream's queued work: FP8 encode into the
    hot arena, FP16 encode into a device staging block, then one non-blocking D2H copy into pinned memory.
    """
    values = dict(state)
    with transfers.on_capture_stream(waits):
        start = transfers.record()
        if hot is not None:
            hot[0].encode_into(values, hot[1], arena=True)
        if cold is not None:
            layout, block = cold
            if block.device == values[next(iter(values))].device:
                layout.encode_into(values, block, arena=True)
            else:
                staging = torch.empty(layout.block_bytes, dtype=torch.uint8, device=transfers.device)
                layout.encode_into(values, staging)
                block.copy_(staging, non_blocking=True)
        transfers.keep_alive(list(values.values()))
        return start, transfers.record()


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
