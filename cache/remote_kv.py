"""A hybrid model's attention KV in the remote tier: full KV blocks as Redis keys of their own, shared by
every checkpoint of a prefix tree that covers them; a checkpoint's blob holds its partial last block.

A full block (s tokens) is named as on disk (`cache.kv_index.block_name`: a digest of its tree and every token
up to its end), so its key `P k:{name}` (`RemoteStore.block_key`) is the same for every checkpoint of the tree
whose prefix covers it: the 8 checkpoints of one conversation, or two conversations sharing a system prompt
within one tree, store each of their common blocks once. Its value is a safetensors file:

    kv.data: (L, 2, s, kv, dh)   # the remote KV codec's storage dtype
    kv.scale: (L, 2, s, kv)      # fp32, scaled codecs only
    tokens: (s,) int32           # the block's own tokens

with metadata {name, checksum}. A checkpoint at p names no keys: its blob holds `tokens[:p]`, from which a
reader derives the names of its p // s blocks; the blob adds `kvtail.data` / `kvtail.scale`, the KV of its last
p % s tokens (empty when p is a multiple of s). A read verifies every block (checksum, name, tokens, shapes)
before anything is restored: a missing or unreadable block makes the checkpoint a miss, never a wrong KV.

Writes (`KVWriter`, on `StateCache`'s remote writer thread, the checkpoint pinned): one pipelined `EXISTS`
says which blocks Redis lacks; only those are taken from the local copy and sent, `PUT_BYTES` at a time
(`RemoteStore.put_blocks`, which also refreshes the stored ones first), so host memory stays bounded
whatever the prefix; then the blob goes with a refresh of every block it names (`RemoteStore.put`). A
checkpoint whose blob and new blocks exceed the whole budget is not written (`too_large`). Reads: `KVReader`
verifies what `RemoteStore.find` fetched; `RemoteKV` is the source the local capture of a prefetched
checkpoint reads. No lock is taken here.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.blob import CorruptBlob, pack, unpack
from cache.kv_copies import ArenaBlocks, KVPart, decode, gather_rows
from cache.kv_index import block_name
from cache.layout import BlockLayout
from cache.remote import RemoteStore, accounted, encode_blob
from cache.transfer import Event, Transfers

TAIL = "kvtail"  # field prefix of a checkpoint's partial block in its blob
PUT_BYTES = 64 << 20  # a write-through sends its new KV blocks in transactions of about this many bytes


def block_names(tree: str, tokens: Sequence[int], s: int) -> list[str]:
    """The names of the full blocks of `tokens` in `tree`, in order (`kv_index.name_of`'s, computed afresh)."""
    name = block_name("", tree.encode())
    names = []
    for start in range(0, len(tokens) - s + 1, s):
        name = block_name(name, array("q", tokens[start : start + s]).tobytes())
        names.append(name)
    return names


def export(
    blocks: ArenaBlocks, which: Sequence[int], ready: Event | None, target: BlockLayout
) -> list[dict[str, torch.Tensor]]:
    """The fields (`kv.data`, `kv.scale`) of the blocks at indices `which` of a stored chain, encoded with
    `target`, as CPU tensors of their own, each cut to its tokens (the last block of the chain may be
    partial). Waits for the capture's copies (`ready`); the same codec copies bytes, another one decodes
    (fp32) and encodes on the arena's device."""
    if ready is not None:
        ready.synchronize()
    if not which:
        return []
    s = blocks.layout.spec["kv"][0][2]
    device = blocks.arena.block(blocks.slots[which[0]]).device
    rows = gather_rows(blocks.arena, [blocks.slots[i] for i in which], device)  # (k, block_bytes)
    data, scale = blocks.layout.rows_views(rows)["kv"]  # (k, L, 2, s, kv, dh), (k, L, 2, s, kv) or None
    if blocks.layout.codec.name != target.codec.name:
        x = torch.empty(data.shape, dtype=torch.float32, device=device)
        blocks.layout.codec.decode_into(data, scale, x)
        rows = torch.empty((len(which), target.block_bytes), dtype=torch.uint8, device=device)
        data, scale = target.rows_views(rows)["kv"]
        target.codec.encode_into(x, data, scale)
    out = []
    for j, i in enumerate(which):
        n = min(s, blocks.tokens - i * s)
        fields = {"kv.data": data[j, :, :, :n].to("cpu", copy=True)}
        if scale is not None:
            fields["kv.scale"] = scale[j, :, :, :n].to("cpu", copy=True)
        out.append(fields)
    return out


def encode_block(fields: dict[str, torch.Tensor], name: str, tokens: Sequence[int]) -> bytes:
    """One full block's value: its fields, its tokens, its name and a checksum."""
    return pack(fields, tokens, {"name": name})


def tail_fields(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A partial block's fields, renamed for the checkpoint's blob."""
    return {f"{TAIL}.{k.removeprefix('kv.')}": t for k, t in fields.items()}


@dataclass(frozen=True)
class Written:
    """What `KVWriter.write` sent ahead of a checkpoint: its blob (state and partial block), the keys of its
    full blocks, and the bytes of the blocks it wrote."""

    blob: bytes
    block_keys: list[str]
    sent: int


class KVWriter:
    """Sends a hybrid checkpoint's KV blocks that Redis lacks ahead of its blob."""

    def __init__(self, store: RemoteStore, reader: KVReader) -> None:
        self.store = store
        self.layout = reader.layout
        self.block_size = reader.block_size

    def write(
        self,
        where: tuple[str, str, str | None],
        tokens: Sequence[int],
        kv: ArenaBlocks,
        ready: Event | None,
        fields: dict[str, torch.Tensor],
    ) -> Written | None:
        """Write the missing full blocks of the checkpoint of `tokens` (`where`: tree, namespace, session)
        from its stored copy `kv`, and make its blob from its state `fields` and its partial block. None if
        Redis failed or it does not fit the budget (counted)."""
        tree, namespace, session = where
        s = self.block_size
        names = block_names(tree, tokens, s)
        keys = [self.store.block_key(name) for name in names]
        lacking = self.store.missing(keys)
        if lacking is None:
            return None
        if len(tokens) % s:
            fields.update(tail_fields(export(kv, [len(names)], ready, self.layout)[0]))
        blob = encode_blob(fields, tokens)
        new = [i for i, miss in enumerate(lacking) if miss]
        stored = [key for key, miss in zip(keys, lacking, strict=True) if not miss]
        per, sent = max(1, PUT_BYTES // self.layout.block_bytes), 0
        for c in range(0, len(new), per):
            chunk = new[c : c + per]
            values = export(kv, chunk, ready, self.layout)
            pairs = [
                (keys[i], encode_block(v, names[i], tokens[i * s : (i + 1) * s]))
                for i, v in zip(chunk, values, strict=True)
            ]
            if c == 0 and not self.store.fits(accounted(len(blob)) + len(new) * accounted(len(pairs[0][1]))):
                return None  # full blocks' values all have one size
            if not self.store.put_blocks(namespace, session, stored if c == 0 else [], pairs):
                return None
            sent += sum(len(value) for _, value in pairs)
        return Written(blob, keys, sent)


class RemoteKV:
    """A checkpoint's KV as read from the remote tier, verified: its full blocks and its partial one, in the
    remote codec on the host. A `KVSource` of [0, position) for the capture that stores it locally."""

    def __init__(self, parts: list[KVPart], transfers: Transfers, dtype: torch.dtype, s: int) -> None:
        self.parts = parts
        self.transfers = transfers
        self.dtype = dtype
        self.s = s

    @property
    def length(self) -> int:
        return sum(p.tokens for p in self.parts)

    def read(self, start: int, end: int) -> torch.Tensor:
        """KV of [start, end) in the model dtype on the cache device: `(L, 2, end - start, kv, dh)`."""
        first = start // self.s
        kv = decode(self.transfers, self.parts[first:], self.dtype)  # from the block holding `start`
        return kv[:, :, start - first * self.s : end - first * self.s]


class KVReader:
    """Verifies and decodes a remote checkpoint's KV against the model's remote KV layout."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.block_size = layout.spec["kv"][0][2]

    def keys_for(self, tree: str, tokens: Sequence[int]) -> list[str]:
        return block_names(tree, tokens, self.block_size)

    def parts(
        self, names: list[str], blobs: list[bytes], tokens: Sequence[int], fields: dict[str, torch.Tensor]
    ) -> list[KVPart]:
        """The KV of `tokens` (a checkpoint's prefix): its blocks' values (`blobs`, named `names`) and the
        tail in the checkpoint's `fields` (removed from them). Raises CorruptBlob."""
        s = self.block_size
        parts = [
            self._block(name, blob, tokens[i * s : (i + 1) * s])
            for i, (name, blob) in enumerate(zip(names, blobs, strict=True))
        ]
        tail = {
            f"kv.{k.removeprefix(TAIL + '.')}": fields.pop(k)
            for k in list(fields)
            if k.startswith(TAIL + ".")
        }
        n = len(tokens) - len(names) * s
        if n > 0 or tail:
            parts.append(self._part(tail, n, "the partial block"))
        return parts

    def _block(self, name: str, blob: bytes, tokens: Sequence[int]) -> KVPart:
        tensors, meta = unpack(blob, tokens, f"KV block {name}")
        if meta.get("name") != name:
            raise CorruptBlob(f"KV block {name}: holds {meta.get('name')}")
        return self._part(tensors, len(tokens), f"KV block {name}")

    def _part(self, fields: dict[str, torch.Tensor], n: int, what: str) -> KVPart:
        """The fields as a part of n tokens, after checking names, shapes and dtypes."""
        codec, shape = self.layout.codec, self.layout.spec["kv"][0]
        expected = (*shape[:2], n, *shape[3:])
        data, scale = fields.get("kv.data"), fields.get("kv.scale")
        ok = data is not None and tuple(data.shape) == expected and data.dtype == codec.storage_dtype
        if codec.scaled:
            ok = ok and scale is not None and tuple(scale.shape) == expected[:-1]
        else:
            ok = ok and scale is None
        if not ok or data is None:
            raise CorruptBlob(f"{what}: fields {sorted(fields)} do not fit {expected}")
        return KVPart(codec, data, scale)
