"""KV blocks on disk: one safetensors file per block, shared by the disk copies of every checkpoint whose
chain holds the block (`cache.kv_index`), like the blocks in memory.

A file holds the block's keys and values as the cold tier encodes them (`kv.data: (L, 2, n, kv, dh)` and,
for a scaled codec, `kv.scale: (L, 2, n, kv)`; n <= s tokens), its tokens (int32) and metadata: the block's name (a digest of its tree and every token up to its end,
`kv_index.block_name`), the KV layout's fingerprint and a blake2b checksum (`cache.disk.checksum`). Files are
named by a uuid4 and never reused, as checkpoint files are (`cache.disk_tier` says why that makes unlinking
after the lock safe); at start, `scan` maps names to files, and a checkpoint file found there is adopted
only if every block of its chain has a file. A read checks the checksum and the block's tokens: a corrupt
or missing file fails the restore cleanly (`CorruptFile`), never a wrong KV.

A block is spilled with the checkpoint copy that first needs it on disk: its bytes are taken from its cold
slot later, outside the lock (`cache.spill.SpillCopy`, registered as the slot's claim), and the writer
thread writes the file. Until the file exists a restore reads those bytes. A failed write leaves the block
`failed`: every restore of a disk copy holding it fails (and drops that copy), as for a corrupt file.

Bookkeeping methods are called under the cache lock; `write`, `read` and `scan` outside it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cache.disk import HEADER_SLACK, CorruptFile, checksum
from cache.kv_copies import KVPart
from cache.layout import BlockLayout
from cache.spill import SpillCopy
from cache.transfer import Event

log = logging.getLogger(__name__)


@dataclass(eq=False)
class KVFile:
    """One block's disk copy: written (`path`), queued or being written (`pending`), or `failed`."""

    fid: int
    name: str
    tokens: tuple[int, ...]
    nbytes: int  # charged to the disk budget: the estimate until written, then the file's size
    path: Path | None = None
    pending: SpillCopy | None = None
    failed: bool = False


@dataclass(frozen=True)
class KVFileRead:
    """What a restore reads of one block, taken under the lock."""

    path: Path | None
    pending: SpillCopy | None
    name: str
    tokens: tuple[int, ...]


class KVDisk:
    def __init__(self, root: Path, layout: BlockLayout, fingerprint: str) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layout = layout  # the cold tier's KV block layout
        self.fingerprint = fingerprint
        block_size = layout.spec["kv"][0][2]
        self.estimate = layout.block_bytes + 4 * block_size + HEADER_SLACK  # reserved until a file exists
        self.files: dict[int, KVFile] = {}
        self.used = 0
        self.found: dict[
            str, tuple[Path, int]
        ] = {}  # name -> (path, size) of files `scan` found, not adopted
        self._next = 0

    # ---- bookkeeping (under the lock) ----------------------------------------------------------------

    def spill(self, name: str, tokens: tuple[int, ...], slot: torch.Tensor, ready: Event | None) -> KVFile:
        """A disk copy of the block `name` whose bytes are in the cold `slot` (`(block_bytes,)` uint8, host),
        queued for writing."""
        copy = SpillCopy(self.layout, slot, ready)
        return self._add(KVFile(self._new_id(), name, tokens, self.estimate, pending=copy))

    def adopt(self, name: str, tokens: tuple[int, ...]) -> KVFile | None:
        """The file `scan` found for the block `name`, or None."""
        found = self.found.pop(name, None)
        if found is None:
            return None
        return self._add(KVFile(self._new_id(), name, tokens, found[1], path=found[0]))

    def drop(self, fid: int) -> tuple[int, Path | None]:
        """Forget a disk copy; its bytes, and its file to unlink (if written). A queued write is cancelled."""
        file = self.files.pop(fid)
        if file.pending is not None:
            file.pending.cancel()
        self.used -= file.nbytes
        return file.nbytes, file.path

    def landed(self, file: KVFile, path: Path | None, nbytes: int) -> Path | None:
        """The write of `file` finished (`path` None: it failed). Returns a path to unlink: the file of a copy
        dropped meanwhile."""
        if self.files.get(file.fid) is not file:
            return path
        if path is None:
            file.failed = True
            return None
        self.used += nbytes - file.nbytes
        file.path, file.pending, file.nbytes = path, None, nbytes
        return None

    def reading(self, fid: int) -> KVFileRead:
        file = self.files[fid]
        if file.failed:
            return KVFileRead(None, None, file.name, file.tokens)
        return KVFileRead(file.path, file.pending, file.name, file.tokens)

    def orphans(self) -> list[Path]:
        """Files `scan` found that no adopted checkpoint holds (the caller unlinks them)."""
        paths = [path for path, _ in self.found.values()]
        self.found.clear()
        return paths

    # ---- files (outside the lock) --------------------------------------------------------------------

    def write(self, file: KVFile) -> tuple[Path | None, int]:
        """Write `file`'s block; its path and size, or (None, 0) if cancelled first or the write failed."""
        fields = file.pending.fields() if file.pending is not None else None
        if fields is None:
            return None, 0
        n = len(file.tokens)
        tensors = {name: t[:, :, :n].contiguous() for name, t in fields.items()}  # (L, 2, n, ...)
        tensors["tokens"] = torch.tensor(file.tokens, dtype=torch.int32)
        meta = {"name": file.name, "fingerprint": self.fingerprint}
        meta["checksum"] = checksum(tensors, meta)
        path = self.dir / f"{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
            return path, path.stat().st_size
        except (OSError, SafetensorError) as exc:
            log.warning("KV block spill failed: %s", exc)
            tmp.unlink(missing_ok=True)
            return None, 0

    def read(self, block: KVFileRead) -> KVPart:
        """The block's encoded KV, from its pending bytes or its file. Raises CorruptFile."""
        if block.pending is not None:
            fields = block.pending.fields()
            if fields is not None:
                return self._part(fields).head(len(block.tokens))
        if block.path is None:
            raise CorruptFile(f"KV block {block.name}: no copy (its write failed or was dropped)")
        try:
            with safe_open(str(block.path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError) as exc:
            raise CorruptFile(f"KV block {block.path.name}: {exc}") from exc
        if meta.get("checksum") != checksum(tensors, meta) or meta.get("name") != block.name:
            raise CorruptFile(f"KV block {block.path.name}: checksum or name mismatch")
        if tuple(tensors.pop("tokens").tolist()) != block.tokens:
            raise CorruptFile(f"KV block {block.path.name}: tokens differ from the index")
        part = self._part(tensors)
        expected = (*self.layout.spec["kv"][0][:2], len(block.tokens), *self.layout.spec["kv"][0][3:])
        scale_ok = part.scale is None if not self.layout.codec.scaled else part.scale is not None
        scale_ok = scale_ok and (part.scale is None or tuple(part.scale.shape) == expected[:-1])
        if (
            tuple(part.data.shape) != expected
            or part.data.dtype != self.layout.codec.storage_dtype
            or not scale_ok
        ):
            raise CorruptFile(f"KV block {block.path.name}: {tuple(part.data.shape)}, expected {expected}")
        return part

    def scan(self) -> int:
        """Map the names of the files present to their paths (`found`); remove leftovers of unfinished
        writes, unreadable files and duplicates of a name. Returns the files removed."""
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        removed = 0
        for path in sorted(self.dir.glob("*.safetensors")):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                name = meta["name"] if meta.get("fingerprint") == self.fingerprint else ""
            except (OSError, SafetensorError, KeyError) as exc:
                log.warning("skipping unreadable KV block file %s: %s", path, exc)
                name = ""
            if not name or name in self.found:
                path.unlink(missing_ok=True)
                removed += 1
                continue
            self.found[name] = (path, path.stat().st_size)
        return removed

    def _part(self, fields: dict[str, torch.Tensor]) -> KVPart:
        try:
            return KVPart(self.layout.codec, fields["kv.data"], fields.get("kv.scale"))
        except KeyError as exc:
            raise CorruptFile(f"KV block fields {sorted(fields)}") from exc

    def _add(self, file: KVFile) -> KVFile:
        self.files[file.fid] = file
        self.used += file.nbytes
        return file

    def _new_id(self) -> int:
        self._next += 1
        return self._next
