"""The cache's physical side: block layouts, arenas, streams and the disk store, and the tensor copies and
file operations on them. No bookkeeping and no lock: `StateCache` calls `capture_job` and `source` under its
lock (they only look up block views) and everything else outside it, on storage pinned by a lease or by the
capture that reserved it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from cache import copies
from cache.arena import BlockArena, ChunkSource, Claim
from cache.base import KVSpec, State, Tier
from cache.checkpoint import Checkpoint
from cache.codec import NativeCodec, make_codec
from cache.config import CacheConfig
from cache.copies import TierBlocks
from cache.disk import CorruptFile, DiskStore
from cache.disk_tier import Spill
from cache.kv_blocks import KVBlocks
from cache.kv_disk import KVDisk
from cache.layout import BlockLayout
from cache.spill import SpillCopy
from cache.transfer import Event, Transfers

log = logging.getLogger(__name__)
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
Arenas = Mapping[Tier, BlockArena | None]  # the hot and cold arenas (`Tiers.arenas`)
GROW_BYTES = 64 << 20  # a hybrid's arenas grow by about this much at a time


@dataclass(frozen=True)
class CaptureJob:
    """A batch of captures' blocks per tier, the CUDA events to wait for before writing them, and the claims
    to settle before overwriting cold blocks."""

    tiers: list[TierBlocks]
    fences: list[Event | None]
    claims: list[Claim]


class Storage:
    def __init__(self, config: CacheConfig, spec: Spec, kv: KVSpec | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.spec = spec
        self.kv = kv
        fused = config.fused_codecs and self.device.type == "cuda"
        self.hot_layout = BlockLayout(spec, make_codec(config.hot_dtype, fused))
        self.cold_layout = BlockLayout(spec, make_codec(config.cold_dtype, fused))
        self.kv_layouts = self._kv_layouts(fused)
        self.transfers = Transfers(self.device)
        self.cold_source = self._cold_source()
        self.store = self._make_store()

    # ---- construction --------------------------------------------------------------------------------

    def make_hot(self) -> BlockArena | None:
        size = self.hot_layout.block_bytes
        if self.config.hot_window == 0 or self.config.hot_bytes < size:
            return None
        grow = self._grow_by(size, self.config.hot_bytes)
        return BlockArena(size, self.config.hot_bytes, self.device, pin=False, grow_by=grow)

    def make_cold(self) -> BlockArena | None:
        size = self.cold_layout.block_bytes
        if self.config.cold_bytes < size:
            return None
        cpu, pin = torch.device("cpu"), self.transfers.cuda
        grow = self._grow_by(size, self.config.cold_bytes)
        return BlockArena(size, self.config.cold_bytes, cpu, pin=pin, grow_by=grow, source=self.cold_source)

    def _cold_source(self) -> ChunkSource | None:
        """A hybrid's cold states and KV blocks grow from one host buffer of the cold budget (plus a chunk of
        slack per arena), allocated, and pinned with CUDA, here at start-up, as a pure SSM's cold arena is.
        Past it (states and KV blocks do not trade freed blocks), chunks are allocated as they are needed."""
        if self.kv is None or self.config.cold_bytes <= 0:
            return None
        return ChunkSource(self.config.cold_bytes + 2 * GROW_BYTES, torch.device("cpu"), self.transfers.cuda)

    def _grow_by(self, block_bytes: int, budget: int) -> int:
        """A hybrid's states share each tier's budget with its KV blocks: their arenas take memory as they
        fill, `GROW_BYTES` (or the budget, if less) at a time. A pure SSM's take their budget up front (0)."""
        return max(1, min(GROW_BYTES, budget) // block_bytes) if self.kv is not None else 0

    def _make_store(self) -> DiskStore | None:
        if not self.config.disk_enabled or self.config.disk_dir is None:
            return None
        return DiskStore(self.config.disk_dir, self._fingerprint())

    def _fingerprint(self) -> str:
        """The cold layout's, and a hybrid's cold KV layout: files of another model never mix."""
        if "cold" not in self.kv_layouts:
            return self.cold_layout.fingerprint()
        return f"{self.cold_layout.fingerprint()}|kv:{self.kv_layouts['cold'].fingerprint()}"

    def _kv_layouts(self, fused: bool) -> dict[Tier, BlockLayout]:
        """A hybrid's KV block `(L, 2, s, kv, dh)` per tier: hot in the model dtype (or FP8), cold (and disk)
        with the cold tier's codec."""
        if self.kv is None:
            return {}
        spec = {"kv": (self.kv.block_shape(), self.kv.dtype)}
        hot = NativeCodec(self.kv.dtype) if self.config.hot_kv_dtype == "model" else make_codec("fp8", fused)
        return {"hot": BlockLayout(spec, hot), "cold": BlockLayout(spec, self.cold_layout.codec)}

    def make_kv(self) -> KVBlocks | None:
        """A hybrid model's KV blocks (`cache.kv_blocks`), with block files beside the checkpoint files."""
        if self.kv is None:
            return None
        cold = self.kv_layouts["cold"]
        disk = KVDisk(self.store.dir / "kv", cold, self._fingerprint()) if self.store is not None else None
        budgets = {"hot": self.config.hot_bytes, "cold": self.config.cold_bytes}
        grow = {t: self._grow_by(layout.block_bytes, budgets[t]) for t, layout in self.kv_layouts.items()}
        return KVBlocks(self.kv, self.kv_layouts, self.transfers, grow, disk, {"cold": self.cold_source})

    # ---- captures ------------------------------------------------------------------------------------

    def check_states(self, states: State, n: int) -> dict[str, torch.Tensor]:
        """n stacked states to capture, `states[name]: (n, *spec shape)`, moved to the cache device."""
        self._check_shapes(states, "state", (n,))
        return {name: states[name].to(self.device, non_blocking=True) for name in self.spec}

    def check_state(self, state: State) -> None:
        """Raise ValueError unless `state` is one state of the spec (names and shapes)."""
        self._check_shapes(state, "state")

    def _check_shapes(self, tensors: State, what: str, lead: tuple[int, ...] = ()) -> None:
        """Raise ValueError unless `tensors` has exactly the spec's names, each with its spec shape (after
        the leading dims `lead`)."""
        if set(tensors) != set(self.spec):
            raise ValueError(f"{what} names {sorted(tensors)} != spec {sorted(self.spec)}")
        for name, (shape, _) in self.spec.items():
            if tuple(tensors[name].shape) != (*lead, *shape):
                raise ValueError(f"{what} {name!r}: shape {tuple(tensors[name].shape)} != {(*lead, *shape)}")

    def capture_job(self, arenas: Arenas, cps: list[Checkpoint]) -> CaptureJob:
        """The blocks reserved for `cps` and what to wait for before writing them (under the lock): the CUDA
        events after the blocks' last reads, and host readers (a queued spill's copy) of the cold blocks."""
        tiers: list[TierBlocks] = []
        fences: list[Event | None] = []
        claims: list[Claim] = []
        tier: Tier
        for tier, layout in (("hot", self.hot_layout), ("cold", self.cold_layout)):
            arena = arenas[tier]
            if arena is None:
                continue
            blocks = [(j, cp.hot if tier == "hot" else cp.cold) for j, cp in enumerate(cps)]
            held = [(j, b) for j, b in blocks if b is not None]
            if not held:
                continue
            ids = [b for _, b in held]
            tiers.append(TierBlocks(layout, [j for j, _ in held], arena.runs(ids)))
            fences += [arena.fences.pop(b, None) for b in ids]
            if tier == "cold":
                claims += [c for c in map(arena.take_claim, ids) if c is not None]
        return CaptureJob(tiers, fences, claims)

    def write_capture(
        self, states: dict[str, torch.Tensor], rows: list[int], job: CaptureJob
    ) -> tuple[Event | None, Event | None]:
        """Encode the job's checkpoints, job position j from `states` row rows[j]; (start, ready) events."""
        for claim in job.claims:
            claim.settle()  # a queued spill takes its copy of the block's old bytes first
        tiers = [TierBlocks(t.layout, [rows[j] for j in t.items], t.runs) for t in job.tiers]
        return copies.write_captures(self.transfers, states, tiers, job.fences)

    # ---- fetches -------------------------------------------------------------------------------------

    def check_out(self, out: State) -> dict[str, torch.Tensor]:
        """The tensors a fetch decodes into (any float dtype, any strides, e.g. live-slot views)."""
        self._check_shapes(out, "out")
        return dict(out)

    def source(self, arenas: Arenas, cp: Checkpoint, tier: Tier) -> object:
        """What `read` needs for `tier`, captured under the lock (the lease keeps it valid)."""
        if tier == "disk":
            return cp.pending if cp.pending is not None else (cp.disk, cp.node.tokens())
        arena = arenas[tier]
        block = cp.hot if tier == "hot" else cp.cold
        assert arena is not None and block is not None, "a leased copy vanished"
        return arena.block(block)

    def read(self, tier: Tier, cp: Checkpoint, source: object, out: dict[str, torch.Tensor]) -> object:
        """Decode the copy in `tier` into `out`; return the fence of the read. Raises CorruptFile."""
        tr = self.transfers
        if tier == "hot":
            assert isinstance(source, torch.Tensor)
            return copies.read_hot(tr, self.hot_layout, source, cp.ready, out)
        if tier == "cold":
            assert isinstance(source, torch.Tensor)
            return copies.read_cold(tr, self.cold_layout, source, cp.ready, out)
        if isinstance(source, tuple):
            path, tokens = source
            if path is None or self.store is None:
                raise CorruptFile("disk copy vanished")
            source = self.store.read(path, tokens)
        elif isinstance(source, SpillCopy):
            source = source.fields()
            if source is None:
                raise CorruptFile("queued disk copy vanished")
        assert isinstance(source, dict)
        try:
            copies.read_fields(tr, self.cold_layout, source, out)
        except (KeyError, RuntimeError) as exc:
            raise CorruptFile(f"bad fields: {exc}") from exc
        return None

    # ---- files ---------------------------------------------------------------------------------------

    def write_spill(self, spill: Spill) -> tuple[Path | None, int]:
        """Write a spilled checkpoint; its path and size, or (None, 0) if the write failed or was cancelled
        (its disk copy dropped before its bytes were taken)."""
        fields = spill.copy.fields()
        if fields is None:
            return None, 0
        try:
            assert self.store is not None
            return self.store.write(
                spill.key[0], spill.key[1], spill.tokens, fields, spill.reason, spill.created, spill.tree
            )
        except (OSError, SafetensorError) as exc:  # a full or broken disk: the copy is dropped
            log.warning("disk spill failed: %s", exc)
            return None, 0

    @staticmethod
    def unlink(paths: list[Path]) -> None:
        for path in paths:
            DiskStore.delete(path)
