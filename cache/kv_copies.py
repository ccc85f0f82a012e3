"""The tensor work on hybrid checkpoints' KV blocks (run outside the cache lock, on blocks held by the caller).

A block `(L, 2, s, kv, dh)` is stored through its tier's codec (`cache.codec`: the model dtype as it is, FP8 or
FP16 with a scale per token and head, fp32), as the fields of a `BlockLayout`: `data (L, 2, s, kv, dh)` and,
for a scaled codec, `scale (L, 2, s, kv)` fp32. A block holding n < s tokens (a checkpoint's partial block)
uses the first n of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.base import Codec
from cache.transfer import Transfers


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


def encode_into(kv: torch.Tensor, target: KVPart) -> None:
    """Encode `kv (L, 2, n, kv, dh)` (on the cache device) into the first n tokens of `target`, a block's
    fields (on the device, or in host memory: then through a device staging copy, `non_blocking`). On CUDA,
    call it on the capture stream."""
    dest = target.head(kv.shape[2])
    if dest.data.device == kv.device:
        dest.codec.encode_into(kv, dest.data, dest.scale)
        return
    data = torch.empty(dest.data.shape, dtype=dest.data.dtype, device=kv.device)
    scale = (
        torch.empty(dest.scale.shape, dtype=torch.float32, device=kv.device)
        if dest.scale is not None
        else None
    )
    dest.codec.encode_into(kv, data, scale)
    dest.data.copy_(data, non_blocking=True)
    if dest.scale is not None and scale is not None:
        dest.scale.copy_(scale, non_blocking=True)


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
