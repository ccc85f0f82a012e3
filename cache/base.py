"""Contracts of the state cache: what the engine may call, what locks, what mutates, when eviction is safe.

Vocabulary (see DESIGN.md): a *checkpoint* is the complete recurrent state of one sequence after its first
`position` tokens, stored as named tensors (`spec`: name -> (shape, dtype) of one slot's state, e.g.
`conv: (n_layer, conv_dim, d_conv - 1)`, `ssm: (n_layer, nheads, headdim, d_state)`). A checkpoint lives in
one or more *tiers*: `hot` (device arena, FP8 by default), `cold` (pinned host arena, FP16 by default),
`disk` (one safetensors file). A *lease* pins one checkpoint between `lookup` and `release`.

Trees and sessions: checkpoints are indexed in *prefix trees*, one per tree name, each spanning every session
(and session-less request) that uses it, so a prefix many conversations share (a system prompt) is stored
once. A call names its tree with `tree=`; the default (`None`) is the caller's namespace (API key): keys
never see each other's checkpoints unless the caller names a common tree. Tree names and namespaces share
one name space: a caller-named tree must not be spelled like a namespace it is not meant to share with.
A *session* `(namespace, session id)` (id None: the namespace's anonymous session) is independent of trees:
it is the set of checkpoints it created or restored from. It sets the hot window, `session_info` and what
`delete_session` lets go; a checkpoint lives while a session references it (and no tier evicted it).

Hybrid models (Mamba2 + attention, `KVSpec`): a checkpoint at p also holds the attention KV of [0, p), in
blocks shared along its prefix tree and stored once per tier beside the states (`cache.kv_blocks`); a tier
copy holds every block it needs, budgets count both, and a restore brings back both.

Thread-safety contract (every implementation of `CheckpointCache`):
- All public methods may be called concurrently from asyncio tasks and from worker threads. None of them
  awaits; none blocks on another caller for longer than a bookkeeping step (one lock guards the index,
  the block free lists and the counters; tensor copies and file I/O run outside it, protected by pins).
- `lookup` mutates bookkeeping only (last-used time, pin count, counters). It never copies tensors.
- `fetch` copies tensors out of the leased checkpoint without holding the lock; the lease guarantees the
  storage it reads is not evicted, freed or overwritten until `release`.
- `capture` reserves storage under the lock (evicting as needed), encodes/copies outside it, then
  publishes the checkpoint under the lock. A checkpoint becomes visible to `lookup` only once published.
  A hybrid's capture that shares a KV block another capture is still writing waits for that copy (never
  for I/O) before publishing.
- Eviction is safe exactly for checkpoints with pin count 0 that are published. A leased checkpoint is
  never evicted from any tier; deleting the last session that references it marks it dead and frees it at
  its last `release`.
- Budgets are hard limits: `bytes_used <= bytes_capacity` in every tier at every instant. When a budget
  cannot be met because everything evictable is pinned, the capture is refused for that tier.
- Observer callbacks run on the caller's thread, never under the lock; they must be fast and must not
  call back into the cache.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from cache.checkpoint import Checkpoint

Tier = Literal["hot", "cold", "disk"]
TIERS: tuple[Tier, ...] = ("hot", "cold", "disk")
LookupResult = Literal["hot_hit", "cold_hit", "disk_hit", "remote_hit", "miss"]
FetchTier = Literal["hot", "cold", "disk", "remote"]  # where a restored state came from
RemoteDirection = Literal["written", "read"]
MissCause = Literal["never_saved", "evicted", ""]
HitScope = Literal["session", "shared"]  # a hit: the session's own checkpoint, or another session's
LookupScope = Literal["session", "shared", ""]  # "" for a miss
StateSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class KVSpec:
    """The attention KV of a hybrid model (Mamba2 + attention): per token, keys and values of `n_layers`
    attention layers, `n_kv_heads` heads of `head_dim`, in `dtype` (the model's). The cache stores it in
    blocks of `block_size` tokens: `(n_layers, 2, block_size, n_kv_heads, head_dim)`, 0 = keys, 1 = values.
    Plain numbers: the cache never sees the model's pool (`cache.kv_blocks`)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_kv_heads, self.head_dim, self.block_size) < 1:
            raise ValueError(f"every KV dimension must be >= 1: {self}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"KV dtype must be a float dtype, not {self.dtype}")

    def block_shape(self) -> tuple[int, int, int, int, int]:
        """(L, 2, s, kv, dh)"""
        return (self.n_layers, 2, self.block_size, self.n_kv_heads, self.head_dim)


class KVSource(Protocol):
    """A live sequence's attention KV, read at capture (e.g. `server.model.paged_kv.PagedKV`)."""

    @property
    def length(self) -> int:
        """Tokens it holds."""
        ...

    def read(self, start: int, end: int) -> torch.Tensor:
        """Keys and values of positions [start, end): (L, 2, end - start, kv, dh), on the cache device."""
        ...


class KVSink(Protocol):
    """A live sequence a restore writes its attention KV into (empty before the restore)."""

    def append(self, kv: torch.Tensor) -> None:
        """Append positions [length, length + n): kv (L, 2, n, kv, dh) in the model dtype."""
        ...


@dataclass(frozen=True)
class Capture:
    """One of the checkpoints a `CheckpointCache.capture_many` call stores (the arguments of `capture` but the
    state)."""

    namespace: str
    session: str | None
    tokens: Sequence[int]
    reason: str
    tree: str | None = None
    kv: KVSource | None = None


class CheckpointUnavailable(RuntimeError):
    """`fetch` could not produce the leased state (a disk file failed its checksum or vanished).

    The checkpoint has been dropped and counted; the lease is still valid and must be released. The
    caller falls back: look up again (a shallower checkpoint may exist) or prefill from scratch.
    """


@dataclass(frozen=True)
class Lease:
    """A pinned checkpoint, returned by `lookup`. Hashable; release exactly once.

    `position` tokens of the request are covered by the checkpoint: resume prefill at `tokens[position:]`.
    `tier` is the tier `fetch` will read (the hottest one holding it at lookup time). `namespace` and
    `session` are the requester's; `scope` is "session" when the checkpoint already belonged to that session
    (it created or restored from it before), "shared" when it came from another session of the tree.
    """

    lease_id: int
    checkpoint_id: int
    namespace: str
    session: str | None
    position: int
    tier: Tier
    scope: HitScope = "session"


class CacheObserver:
    """Hook for the metrics layer (Prometheus lives in `server`, never here). Override what you need.

    `on_lookup(result, cause, scope)`: result "hot_hit" | "cold_hit" | "disk_hit" | "miss"; cause (misses)
    "never_saved" | "evicted", "" for hits; scope (hits) "session" | "shared" (`Lease.scope`), "" for misses.
    `on_fetch(tier, seconds)`: host time of `fetch` on CPU; on CUDA, GPU time between CUDA events, reported
    lazily once the events completed (at a later cache call). `on_capture(seconds)`: same rules for capture.
    `on_evict(tier)`: one checkpoint copy left `tier` by policy (not by `delete_session`).
    `on_reuse(tokens)`: a successful fetch let the caller skip `tokens` tokens of prefill.
    `on_corrupt()`: a disk file was found truncated/corrupt and skipped.
    Remote tier (`cache.remote`): `on_lookup` counts "remote_hit" for the first hit on a checkpoint brought in
    from it, `on_fetch("remote", seconds)` the time to find, read, verify and store one (host time, up to the
    end of its copies), `on_remote_bytes(direction, n)` blob bytes written or read, and `on_remote_error(kind)`
    a failure: timeout, connection, auth, response (an error reply), corrupt (a blob failing verification),
    kv_missing (a hybrid checkpoint whose KV blocks are not all in Redis any more: a miss),
    queue_full (a write dropped: the writer is behind), too_large (a checkpoint larger than the
    whole remote budget), unavailable (skipped while backing off), other.
    """

    def on_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope) -> None:
        return None

    def on_fetch(self, tier: FetchTier, seconds: float) -> None:
        return None

    def on_capture(self, seconds: float) -> None:
        return None

    def on_evict(self, tier: Tier) -> None:
        return None

    def on_reuse(self, tokens: int) -> None:
        return None

    def on_corrupt(self) -> None:
        return None

    def on_remote_bytes(self, direction: RemoteDirection, nbytes: int) -> None:
        return None

    def on_remote_error(self, kind: str) -> None:
        return None


class Codec(abc.ABC):
    """Encodes one named state tensor into storage tensors and back. Vectorized; never loops in Python
    over rows. Encodes along the last axis: a tensor `(..., D)` becomes `data (..., D)` in the storage
    dtype plus, for scaled codecs, `scale (...)` fp32 (one scale per vector). Pure function of its input:
    no state, no lock."""

    name: str
    storage_dtype: torch.dtype
    scaled: bool

    @abc.abstractmethod
    def encode_into(self, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Write the encoding of `x (..., D)` into `data (..., D)` and `scale (...)` (same device as x)."""

    @abc.abstractmethod
    def decode_into(self, data: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write the decoded values into `out (..., D)` (any float dtype, same device as data)."""


class Attachment:
    """The tier contract for data a checkpoint holds beside its state in each tier, shared between
    checkpoints (a hybrid model's attention KV: `cache.kv_blocks`). The default holds nothing (a pure SSM
    model). Bookkeeping only: `Book` and `Tiers` call it under the cache lock.

    Lifecycle of a checkpoint `cp`: `bind` once, before it gets any copy; per tier, `reserve` then either
    `commit` (the tier made room) or `drop`, or, for a disk file found at start, `adopt`; `drop` again
    when its copy leaves the tier (by eviction, demotion out of the hot window, or freeing); `unbind` once
    it is forgotten (no copy left). Budgets: `used(tier)` counts in the tier's byte budget together with
    the state copies. Eviction safety: what a copy holds is released by `drop` alone, so nothing a kept
    copy needs is ever freed.
    """

    def bind(self, cp: Checkpoint, tokens: tuple[int, ...]) -> None:
        """`cp`, after `tokens`, is being captured (or adopted from disk)."""
        return None

    def reserve(self, cp: Checkpoint, tier: Tier) -> int:
        """The bytes `tier` must find for the copy of `cp`, beyond what it stores already; what it stores
        already is held for `cp` from now on (evicting other copies cannot free it)."""
        return 0

    def commit(self, cp: Checkpoint, tier: Tier) -> None:
        """The tier has room for `reserve`'s bytes: take them (written outside the lock)."""
        return None

    def adopt(self, cp: Checkpoint, tier: Tier) -> int | None:
        """The copy of `cp` in `tier` was found at start: hold what it needs there, found as well; return
        the bytes that adds, or None (holding nothing) if something it needs is missing."""
        return 0

    def drop(self, cp: Checkpoint, tier: Tier) -> int:
        """The copy of `cp` left `tier` (or its reservation failed): release what no other copy there
        holds; return the bytes freed. A no-op for a tier where `cp` holds nothing."""
        return 0

    def unbind(self, cp: Checkpoint) -> None:
        """`cp` is forgotten (it holds nothing in any tier)."""
        return None

    def used(self, tier: Tier) -> int:
        """Bytes held in `tier`."""
        return 0

    def held(self, cp: Checkpoint, tier: Tier) -> int:
        """Bytes the copy of `cp` in `tier` references, shared ones included (reports)."""
        return 0


class CheckpointCache(abc.ABC):
    """The facade the engine calls (DESIGN invariant 5: at admission, at capture points and at finish,
    never once per token). Implemented by `cache.manager.StateCache`."""

    @abc.abstractmethod
    def lookup(
        self, namespace: str, session: str | None, tokens: Sequence[int], *, tree: str | None = None
    ) -> Lease | None:
        """Deepest published checkpoint anywhere in `tree` (None: `namespace`'s tree), whichever session
        created it, whose token prefix equals `tokens[:position]` (position <= len(tokens)); token content is
        compared, never a hash. Pins it (no tier may evict it) until `release`, adds it to the session
        `(namespace, session)` and counts a hit for its eviction priority. Counts the lookup result with its
        scope and, for misses, the cause: `evicted` if a matching checkpoint existed in the tree and was
        evicted (as far as the tree's ghost markers remember, `cache.index`), else `never_saved`."""

    @abc.abstractmethod
    def fetch(
        self, lease: Lease, out: State | None = None, kv: KVSink | None = None
    ) -> dict[str, torch.Tensor]:
        """Decode the leased checkpoint into tensors on the cache device with the spec dtypes (into `out`
        when given, e.g. the live slot's views, and return them: spec names and shapes, any float dtype and
        strides; a wrong name or shape raises ValueError before anything is written). A hybrid model's
        cache also appends the attention KV of [0, position) to `kv` (required there, an empty sequence).
        On CUDA the copies are ordered on the current stream (no host sync): work queued after `fetch` on
        that stream sees it. Raises `CheckpointUnavailable` if the stored copy is corrupt (never returns a
        wrong state, and writes no KV)."""

    @property
    def has_remote(self) -> bool:
        """Whether `prefetch` can find anything (a remote tier is configured)."""
        return False

    def prefetch(
        self, namespace: str, session: str | None, tokens: Sequence[int], *, tree: str | None = None
    ) -> int:
        """Bring a deeper checkpoint of `tree` on the path of `tokens` from a remote tier into the local ones,
        before `lookup`; its position, 0 if none. Blocks on the network (never call it on the decode path).
        The default has no remote tier."""
        return 0

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Unpin. After release the checkpoint is evictable again. Releasing twice raises KeyError."""

    @abc.abstractmethod
    def capture(
        self,
        namespace: str,
        session: str | None,
        tokens: Sequence[int],
        state: State,
        *,
        reason: str,
        tree: str | None = None,
        kv: KVSource | None = None,
    ) -> bool:
        """Store `state`, the full-precision state after `tokens` (its whole prefix; position = len), in
        `tree` (None: `namespace`'s tree), as a checkpoint of the session `(namespace, session)`. A hybrid
        model's cache also stores the attention KV of [0, len(tokens)), read from `kv` (required there; only
        the blocks no copy in a tier holds yet are read).
        Write-through: the cold copy is encoded from `state` itself, the hot copy too (FP8). On CPU both are
        written before returning. On CUDA they run on a side stream after the current stream's queued work;
        `state` must be a copy the caller will not modify in place (`ModelRunner.capture` and
        `PrefillResult.captures` are copies); dropping it is safe (the allocator knows the side stream).
        Returns False if nothing new was stored: `tokens` already have a checkpoint in the tree (whichever
        session made it: it is added to this session and counted as a hit, the state is not stored again),
        `tokens` lie within `min_gap` of an ancestor checkpoint in the tree, or no tier could take it."""

    @abc.abstractmethod
    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        """`capture` of n checkpoints at once, their states stacked in order (`states[name]: (n, *shape)`, a
        copy as for `capture`): the results of n `capture` calls in that order (a later one of the same tokens
        shares the earlier one's checkpoint), written together (on CUDA about as many launches as one capture).
        A shape error raises ValueError before anything is stored."""

    @abc.abstractmethod
    def capture_positions(self, start: int, end: int, boundaries: Sequence[int]) -> list[int]:
        """Policy: absolute positions p, start < p <= end, at which a prefill of `tokens[start:end]` should
        capture (message boundaries, every K tokens, and `end`), thinned by `min_gap`. Pure; no lock."""

    @abc.abstractmethod
    def delete_session(self, namespace: str, session: str | None) -> int:
        """Forget the session: drop its references. A checkpoint no other session references is freed in
        every tier (a leased one at its last release); one that another session still references stays.
        Returns the bytes freed now (leased checkpoints are freed at their release and are not counted)."""

    @abc.abstractmethod
    def session_info(self, namespace: str, session: str | None) -> dict[str, Any] | None:
        """Checkpoints the session references (position, tiers, reason, times, `shared`: referenced by other
        sessions too) and their bytes per tier (a shared checkpoint counted in full); None if unknown."""
