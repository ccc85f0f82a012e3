"""Values of the remote tier (`cache.remote`, `cache.remote_kv`): safetensors files in memory holding encoded
tensors, the int32 tokens they belong to, metadata and a blake2b checksum over all of it (`cache.disk.checksum`).
A read checks the checksum and the tokens before anything is used: a corrupt value or one of another prefix
(a hash collision of its key) raises `CorruptBlob`, never restores."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load, save

from cache.disk import checksum


class CorruptBlob(ValueError):
    pass


def pack(fields: Mapping[str, torch.Tensor], tokens: Sequence[int], meta: dict[str, str]) -> bytes:
    """`fields`, `tokens` and `meta` as one safetensors file, with a checksum."""
    tensors = {name: t.contiguous() for name, t in fields.items()}
    tensors["tokens"] = torch.tensor(list(tokens), dtype=torch.int32)
    meta = {**meta, "checksum": checksum(tensors, meta)}
    return save(tensors, metadata=meta)


def unpack(blob: bytes, tokens: Sequence[int], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The fields and metadata of a value `pack` made for `tokens`. Raises CorruptBlob (naming `what`)."""
    try:
        size = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(blob)
    except Exception as exc:  # any malformed value, whatever the parser raises
        raise CorruptBlob(f"{what}: unreadable: {exc}") from exc
    if meta.get("checksum") != checksum(tensors, meta):
        raise CorruptBlob(f"{what}: checksum mismatch")
    stored = tensors.pop("tokens", None)
    if stored is None or stored.tolist() != list(tokens):
        raise CorruptBlob(f"{what}: tokens differ")
    return tensors, meta
