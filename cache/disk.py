"""Disk tier storage: one safetensors file per checkpoint, written atomically, verified on read.

A file holds the encoded fields (`"{state}.data"`, `"{state}.scale"`), the token prefix (`"tokens"`, int32)
and metadata (prefix tree, namespace and session that created it, position, reason, created, layout
fingerprint, blake2b checksum of every tensor's bytes and the identity fields). Files written before trees
existed have no `tree` field: they belong to their namespace's tree (the default one), and their checksum
does not cover the field (so they still verify). Files live under `disk_dir/<fingerprint hash>/`, so models never mix.
`scan` rebuilds the index at start: truncated or unreadable files are skipped and counted (and removed);
`read` verifies the checksum and the tokens, so a corrupt file is never decoded into a live state.
Stateless apart from the directory; no lock (writes go to unique names, reads of a file being deleted fail
cleanly).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)
HEADER_SLACK = 16384  # bytes reserved per file for the safetensors header + metadata
CHUNK = 8 << 20  # bytes hashed per task of the checksum


class CorruptFile(RuntimeError):
    pass


@dataclass(frozen=True)
class DiskRecord:
    """One valid file found by `scan`."""

    path: Path
    nbytes: int
    namespace: str  # the creating session's
    session: str | None
    tree: str
    tokens: tuple[int, ...]
    reason: str
    created: float
    last_used: float


class DiskStore:
    def __init__(self, root: Path, fingerprint: str) -> None:
        digest = hashlib.blake2b(fingerprint.encode(), digest_size=8).hexdigest()
        self.dir = root / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    @staticmethod
    def estimate(block_bytes: int, position: int) -> int:
        """An upper bound on a file's size, reserved against the budget before it is written."""
        return block_bytes + 4 * position + HEADER_SLACK

    def write(
        self,
        namespace: str,
        session: str | None,
        tokens: tuple[int, ...],
        fields: Mapping[str, torch.Tensor],
        reason: str,
        created: float,
        tree: str | None = None,
    ) -> tuple[Path, int]:
        """Write one checkpoint (CPU tensors) of `tree` (None: the namespace's), created by the session
        `(namespace, session)`; return its path and size. Atomic: tmp file + rename."""
        tensors = {name: t.contiguous() for name, t in fields.items()}
        tensors["tokens"] = torch.tensor(tokens, dtype=torch.int32)
        meta = {
            "tree": tree if tree is not None else namespace,
            "namespace": namespace,
            "session": session or "",
            "has_session": "1" if session is not None else "0",
            "position": str(len(tokens)),
            "reason": reason,
            "created": repr(created),
            "fingerprint": self.fingerprint,
        }
        meta["checksum"] = checksum(tensors, meta)
        path = self.dir / f"{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path, path.stat().st_size

    def read(self, path: Path, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The encoded fields of a file, after checking checksum and tokens. Raises CorruptFile."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (OSError, SafetensorError) as exc:
            raise CorruptFile(f"{path.name}: {exc}") from exc
        if meta.get("checksum") != checksum(tensors, meta):
            raise CorruptFile(f"{path.name}: checksum mismatch")
        if tuple(tensors.pop("tokens").tolist()) != tokens:
            raise CorruptFile(f"{path.name}: token prefix differs from the index")
        return tensors

    def scan(self) -> tuple[list[DiskRecord], int]:
        """Valid files (oldest first) and the number of corrupt ones skipped (and removed)."""
        records: list[DiskRecord] = []
        corrupt = 0
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.safetensors")):
            try:
                records.append(self._record(path))
            except (OSError, SafetensorError, CorruptFile, KeyError, ValueError) as exc:
                log.warning("skipping unreadable checkpoint file %s: %s", path, exc)
                corrupt += 1
                path.unlink(missing_ok=True)
        records.sort(key=lambda r: r.last_used)
        return records, corrupt

    @staticmethod
    def delete(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _record(self, path: Path) -> DiskRecord:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tokens = tuple(f.get_tensor("tokens").tolist())
        if meta.get("fingerprint") != self.fingerprint or int(meta["position"]) != len(tokens) or not tokens:
            raise CorruptFile("metadata does not match")
        st = path.stat()
        session = meta["session"] if meta.get("has_session") == "1" else None
        created = float(meta.get("created", st.st_mtime))
        return DiskRecord(
            path,
            st.st_size,
            meta["namespace"],
            session,
            meta.get("tree", meta["namespace"]),
            tokens,
            meta.get("reason", ""),
            created,
            max(st.st_mtime, created),
        )


def checksum(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """A blake2b tree hash: the identity fields, then each tensor's name and the digests of its 8 MiB chunks.

    The chunks are hashed on threads (hashlib releases the GIL), so verifying an 85 MB mamba2-2.7b checkpoint
    takes a few ms on a many-core host instead of ~100 ms on one core. The prefix names the scheme: a file
    written with another one fails verification and is treated as corrupt."""
    h = hashlib.blake2b(digest_size=16)
    for key in ("namespace", "session", "has_session", "position", "fingerprint"):
        h.update(f"{key}={meta.get(key, '')};".encode())
    if "tree" in meta:  # absent from files written before trees: their checksums still hold
        h.update(f"tree={meta['tree']};".encode())
    named: list[tuple[str, list[memoryview]]] = []
    for name in sorted(tensors):
        flat = tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy().data
        named.append((name, [flat[i : i + CHUNK] for i in range(0, len(flat), CHUNK)]))
    chunks = [c for _, cs in named for c in cs]
    workers = min(len(chunks), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = iter(list(pool.map(_digest, chunks)))
    else:
        digests = iter([_digest(c) for c in chunks])
    for name, cs in named:
        h.update(name.encode())
        for _ in cs:
            h.update(next(digests))
    return "b2tree:" + h.hexdigest()


def _digest(chunk: memoryview) -> bytes:
    return hashlib.blake2b(chunk, digest_size=16).digest()
