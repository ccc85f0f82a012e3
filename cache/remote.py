"""The remote tier's store: checkpoints in Redis (or Valkey), shared by every replica of one model.

Network only: no cache lock, no bookkeeping of the local tiers. `StateCache` calls `put` and `delete_session`
on its remote writer thread and `find` from `prefetch` (a request's thread, before admission), never on the
decode path.

Keys, under `P = "{prefix}:{model}:"` (`model`: a hash of the state spec and the blob codec, so replicas of
another model or storing another precision never read these blobs):
- `P c:{tree}:{position}:{tokens}`: one checkpoint blob (a safetensors file: the encoded fields, the token
  prefix and a checksum), with a TTL; `tree` and `tokens` are hashes (of the prefix tree's name, and of the
  token prefix as int32);
- `P p:{tree}` (sorted set) and `P pc:{tree}` (hash: blobs per position): the positions the tree holds
  blobs at;
- `P s:{session}`: set of the blob keys a session wrote (`delete_session` drops them);
- `P lru` (sorted set: blob key -> expiry, ms), `P sz` (hash: blob key -> accounted bytes) and `P used` (the
  accounted total): the byte budget, shared by every replica; `P own` (hash: blob key -> the index entries
  that name it), so that dropping a blob drops them too and no index grows beyond the live blobs.
- a hybrid model's (`cache.remote_kv`): `P k:{block}`, one full KV block of a tree, named by a digest of the
  tree and every token up to its end, so that every checkpoint covering it shares it (stored once);
  a checkpoint's blob holds its partial last block and names its full blocks implicitly (by its tokens).
  Blocks are accounted like blobs in `lru` / `sz` / `used`, and also in `P used:kv` (their bytes) and
  `P used:kvn` (their number); `own` maps a block to the session set of its first writer.
The scripts touch keys they read from `own`, so the tier needs one Redis server (or a primary with
replicas), not Redis Cluster.

Budget: every write is one MULTI/EXEC transaction, atomic in Redis: a Lua script that purges expired blobs,
finds a blob that exists already (never counted twice: its TTL is refreshed), or evicts the oldest-expiring
blobs until the new one fits and adds its bytes; then a plain SET of the blob (the payload never passes
through Lua). A purge subtracts exactly what its write added, so `used` never goes
negative and never counts one blob twice, whatever the number of replicas. A blob is accounted as its
allocator size class plus `ENTRY_OVERHEAD` for its keys and index entries, so the memory Redis reports for
the tier (`MEMORY USAGE` of its keys) stays within the budget. Redis's own `maxmemory` with
`volatile-lru` is a safe backstop: it only evicts blobs (they have TTLs), never the accounting keys, and an
evicted blob's bytes are given back when the script purges its entry.

KV blocks (hybrids): a checkpoint's write first asks which of its blocks Redis lacks (`missing`), then sends
the new ones a few MiB per MULTI/EXEC (`put_blocks`: the first also refreshes the stored ones, before
reserving), then one MULTI/EXEC refreshes every block the blob names and reserves and SETs the blob. A block
lives `BLOCK_GRACE_MS` longer than the checkpoints' TTL, and every write or hit of a checkpoint refreshes
all its blocks in the same call that refreshes it, so a block expires after every checkpoint naming it, and
(its LRU score being its expiry) the budget evicts it after them too. A block no checkpoint names any more
(its checkpoints evicted, expired or deleted) stays accounted until its own expiry or the budget's eviction,
which takes it right after its last checkpoint. Its bytes are accounted once, whatever the number of
checkpoints naming it. `delete_session` drops the blocks the session wrote first, as it drops its blobs: a
checkpoint of another session naming one becomes a miss until that session's next write stores it again.

Lookup (`find`): the tree's positions in (after, len(tokens)], deepest first; the blob keys of those prefixes
are checked in one pipelined round trip, and the deepest existing one is read and verified: checksum, then
its token prefix compared with the request's, so a hash collision never restores a wrong state. A hybrid's
blocks are then read (one pipelined round trip) and verified likewise; a missing one makes that checkpoint a
miss (`kv_missing`), never a partial restore, and the next shallower one is tried (blocks are checked with
one pipelined `EXISTS` first, so such a miss moves no KV).

Failures: every Redis error is counted by kind (`on_error`) and closes the gate for a backoff (0.5 s doubling
to 30 s); while it is closed, calls return at once without touching the network. redis-py reconnects by
itself on the next call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import torch

from cache.blob import CorruptBlob, pack, unpack
from cache.config import RemoteConfig
from cache.kv_copies import KVPart
from cache.remote_scripts import BLOCKS, DELETE, RESERVE, TOUCH

if TYPE_CHECKING:
    from cache.remote_kv import KVReader

log = logging.getLogger(__name__)
ENTRY_OVERHEAD = 2048  # bytes accounted per blob beyond its value: its key, index entries and Redis headers
MAX_CANDIDATES = 256  # deepest positions a lookup considers
BACKOFF = (0.5, 30.0)  # seconds: first and longest pause after a failure
BLOCK_GRACE_MS = 5000  # a KV block outlives the checkpoints naming it by this much (a reader's GETs)
MGET_KEYS = 256  # KV blocks per MGET reply of a lookup


@dataclass(frozen=True)
class Found:
    """A verified remote checkpoint: the encoded fields of `tokens[:position]` (CPU tensors); a hybrid's also
    its KV of [0, position), verified (`kv`: its blocks and partial block, `block_keys`: the blocks' keys)."""

    position: int
    fields: dict[str, torch.Tensor]
    nbytes: int
    kv: list[KVPart] | None = None
    block_keys: list[str] = field(default_factory=list)


def encode_blob(fields: Mapping[str, torch.Tensor], tokens: Sequence[int]) -> bytes:
    """A checkpoint as one safetensors file in memory: the fields, the int32 token prefix, a checksum."""
    return pack(fields, tokens, {"position": str(len(tokens))})


def decode_blob(blob: bytes, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
    """The fields of a blob, after checking its checksum and that its prefix is `tokens`. Raises CorruptBlob."""
    return unpack(blob, tokens, "checkpoint blob")[0]


def accounted(nbytes: int) -> int:
    """What a blob of `nbytes` costs the budget: its allocation rounded up to jemalloc's size class (four
    classes per power of two) plus `ENTRY_OVERHEAD` for its key and index entries (measured: ~1.3 KiB)."""
    n = nbytes + 64  # the string's header and allocator slack
    step = 1 << max(n.bit_length() - 3, 4)
    return (n + step - 1) // step * step + ENTRY_OVERHEAD


def _hash(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def prefix_hashes(tokens: Sequence[int], positions: Sequence[int]) -> dict[int, str]:
    """The hash of `tokens[:p]` for each p in `positions` (ascending or not), in one pass over the tokens."""
    data = memoryview(array("i", tokens)).cast("B")
    h = hashlib.blake2b(digest_size=16)
    out: dict[int, str] = {}
    done = 0
    for p in sorted(set(positions)):
        h.update(data[4 * done : 4 * p])
        done = p
        out[p] = h.copy().hexdigest()
    return out


class RemoteStore:
    """One model's checkpoints in Redis. Thread-safe (redis-py's pool; the gate has its own lock)."""

    def __init__(
        self,
        config: RemoteConfig,
        fingerprint: str,
        on_error: Callable[[str], None] = lambda kind: None,
        client: redis.Redis | None = None,
    ) -> None:
        self.config = config
        self.prefix = f"{config.prefix}:{_hash(fingerprint)}:"
        self.client = client or _connect(config)
        self._reserve = self.client.register_script(RESERVE)
        self._touch = self.client.register_script(TOUCH)
        self._blocks = self.client.register_script(BLOCKS)
        self._delete = self.client.register_script(DELETE)
        self._on_error = on_error
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = BACKOFF[0]
        self.used = 0  # accounted bytes, checkpoint blobs and accounted KV block bytes, as of the last write
        self.blobs = 0
        self.kv_bytes = 0

    # ---- keys ------------------------------------------------------------------------------------------

    def blob_key(self, tree: str, position: int, digest: str) -> str:
        """The key of the blob of a prefix of `tree` (`digest`: its `prefix_hashes` entry)."""
        return f"{self.prefix}c:{_hash(tree)}:{position}:{digest}"

    def block_key(self, name: str) -> str:
        """The key of a hybrid's full KV block (`name`: `cache.remote_kv.block_names`, tree included)."""
        return f"{self.prefix}k:{name}"

    def _session_key(self, namespace: str, session: str | None) -> str:
        return f"{self.prefix}s:{_hash(json.dumps([namespace, session]))}"

    # ---- operations ------------------------------------------------------------------------------------

    def available(self) -> bool:
        """False while the gate is closed after a failure."""
        with self._lock:
            return time.monotonic() >= self._down_until

    def missing(self, keys: Sequence[str]) -> list[bool] | None:
        """Which of `keys` Redis lacks (one pipelined round trip); None on failure."""

        def exists() -> list[int]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        flags = self._call(exists) if keys else []
        return None if flags is None else [not flag for flag in flags]

    def put(
        self,
        tree: str,
        namespace: str,
        session: str | None,
        tokens: Sequence[int],
        blob: bytes,
        block_keys: Sequence[str] = (),
    ) -> int | None:
        """Store a blob for `tokens` of `tree`, referenced by the session; the accounted bytes written
        (0: it existed already, or does not fit the budget), None on failure. A hybrid's checkpoint names its
        full KV blocks (`put_blocks` wrote the missing ones first): in the same transaction, before the blob,
        they live another block TTL, so a block outlives, and is evicted after, every checkpoint naming it."""
        p = self.prefix
        key = self.blob_key(tree, len(tokens), prefix_hashes(tokens, [len(tokens)])[len(tokens)])
        keys = [
            key,
            p + "lru",
            p + "sz",
            p + "used",
            p + "own",
            f"{p}p:{_hash(tree)}",
            f"{p}pc:{_hash(tree)}",
            self._session_key(namespace, session),
        ]
        cost = accounted(len(blob))
        if not self.fits(cost):
            return 0
        ttl = int(self.config.ttl * 1000)

        def write() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)  # MULTI ... EXEC: all or nothing
            if block_keys:
                self._refresh_blocks(pipe, namespace, session, block_keys, [])
            self._reserve(keys=keys, args=[cost, self.config.budget, ttl, len(tokens)], client=pipe)
            pipe.set(key, blob, px=ttl)
            return pipe.execute()

        replies = self._call(write)
        if replies is None:
            return None
        status, self.used, self.blobs, self.kv_bytes = (int(x) for x in replies[-2])
        return cost if status == 1 else 0

    def put_blocks(
        self,
        namespace: str,
        session: str | None,
        stored: Sequence[str],
        new: Sequence[tuple[str, bytes]],
    ) -> bool:
        """Write KV blocks ahead of the checkpoint that names them, in one MULTI/EXEC: the `stored` ones (found
        by `missing`) live another block TTL first, so that reserving the `new` (key, value) ones never evicts
        them; the new ones are owned by the session. False on failure."""

        def write() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            self._refresh_blocks(pipe, namespace, session, stored, new)
            return pipe.execute()

        return self._call(write) is not None

    def _refresh_blocks(
        self,
        pipe: redis.client.Pipeline,
        namespace: str,
        session: str | None,
        stored: Sequence[str],
        new: Sequence[tuple[str, bytes]],
    ) -> None:
        """Queue on `pipe` the block script refreshing `stored`, then per new block the script reserving it
        and its SET: each SET follows its own reservation, so a block that a later reservation of the same
        transaction evicts is deleted with its accounting, never left stored and unaccounted."""
        p, ttl, budget = self.prefix, self._block_ttl(), self.config.budget
        head = [p + "lru", p + "sz", p + "used", p + "own", self._session_key(namespace, session)]
        if stored:
            self._blocks(keys=[*head, *stored], args=[budget, ttl, *[0] * len(stored)], client=pipe)
        for k, value in new:
            self._blocks(keys=[*head, k], args=[budget, ttl, accounted(len(value))], client=pipe)
            pipe.set(k, value, px=ttl)

    def fits(self, cost: int) -> bool:
        """Whether `cost` accounted bytes fit the whole budget (if not, counted `too_large`)."""
        if cost > self.config.budget:
            self._on_error("too_large")
            return False
        return True

    def _block_ttl(self) -> int:
        """Milliseconds a KV block lives after a write or hit of a checkpoint naming it: the checkpoints' TTL
        plus `BLOCK_GRACE`, so that it expires (and is evicted) after every one of them."""
        return int(self.config.ttl * 1000) + BLOCK_GRACE_MS

    def find(self, tree: str, tokens: Sequence[int], after: int, kv: KVReader | None = None) -> Found | None:
        """The deepest verified blob of `tree` at a position in (after, len(tokens)] whose token prefix is
        `tokens[:position]`; None if there is none or Redis failed. A blob failing verification is counted
        as `corrupt` and the next shallower one is tried. With `kv` (a hybrid's), the blob's KV blocks are
        read and verified too: one missing (expired, evicted, deleted with the session that wrote it) is
        counted `kv_missing`, one failing verification `corrupt`, and the next shallower blob is tried."""
        p = self.prefix
        positions = self._call(
            lambda: self.client.zrevrangebyscore(
                f"{p}p:{_hash(tree)}", len(tokens), f"({after}", start=0, num=MAX_CANDIDATES
            )
        )
        if not positions:
            return None
        wanted = [int(x) for x in positions]
        digests = prefix_hashes(tokens, wanted)
        keys = [self.blob_key(tree, pos, digests[pos]) for pos in wanted]
        lacking = self.missing(keys)
        if lacking is None:
            return None
        for pos, key, gone in zip(wanted, keys, lacking, strict=True):
            if gone:
                continue
            blob = self._get(key)
            if blob is None:
                continue  # expired since, or failed (counted)
            try:
                fields = decode_blob(blob, tokens[:pos])
            except CorruptBlob as exc:
                log.warning("remote checkpoint %s unusable: %s", key, exc)
                self._on_error("corrupt")
                continue
            hit: Found | None = Found(pos, fields, len(blob))
            if kv is not None:
                hit = self._with_kv(Found(pos, fields, len(blob)), tree, tokens, kv)
            if hit is None:
                continue
            self._refer(key, hit.block_keys)
            return hit
        return None

    def _with_kv(self, found: Found, tree: str, tokens: Sequence[int], kv: KVReader) -> Found | None:
        """`found` with its KV read from its blocks and its blob's tail; None if a block is missing or
        unusable (counted), or Redis failed."""
        names = kv.keys_for(tree, tokens[: found.position])
        keys = [self.block_key(name) for name in names]
        lacking = self.missing(keys)  # first: a checkpoint missing a block costs no transfer of the others
        if lacking is None:
            return None
        got = [] if any(lacking) else self._mget(keys)
        if got is None:
            return None
        values = [value for value in got if value is not None]
        if len(values) < len(keys):  # gone before the check, or since
            log.info("remote checkpoint at %d: a KV block is gone", found.position)
            self._on_error("kv_missing")
            return None
        try:
            parts = kv.parts(names, values, tokens[: found.position], found.fields)
        except CorruptBlob as exc:
            log.warning("remote checkpoint at %d unusable: %s", found.position, exc)
            self._on_error("corrupt")
            return None
        nbytes = found.nbytes + sum(len(v) for v in values)
        return Found(found.position, found.fields, nbytes, parts, keys)

    def _mget(self, keys: list[str]) -> list[bytes | None] | None:
        """The values of `keys` (None where missing): one round trip, `MGET_KEYS` keys per reply."""

        def read() -> list[bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(keys), MGET_KEYS):
                pipe.mget(keys[i : i + MGET_KEYS])
            return [value for chunk in pipe.execute() for value in chunk]

        return self._call(read) if keys else []

    def _get(self, key: str) -> bytes | None:
        return self._call(lambda: self.client.get(key))

    def _refer(self, key: str, blocks: list[str]) -> None:
        """A hit on blob `key`: it lives another TTL, its KV `blocks` another block TTL."""
        keys = [self.prefix + "lru", key, *blocks]
        args = [int(self.config.ttl * 1000), self._block_ttl()]
        self._call(lambda: self._touch(keys=keys, args=args))

    def delete_session(self, namespace: str, session: str | None) -> int | None:
        """Drop every blob the session wrote (one that other sessions restored from too: a shared prefix is
        written again by the next request that captures it). Returns how many, None on failure."""
        p = self.prefix
        keys = [self._session_key(namespace, session), p + "lru", p + "sz", p + "used", p + "own"]
        reply = self._call(lambda: self._delete(keys=keys, args=[]))
        return None if reply is None else int(reply)

    def read_used(self) -> int | None:
        """The accounted bytes, read from Redis now."""
        value = self._call(lambda: self.client.get(self.prefix + "used"))
        return None if value is None else int(value)

    # ---- failures --------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one Redis call through the gate: None (and the error counted) if the gate is closed or the
        call fails."""
        if not self.available():
            self._on_error("unavailable")
            return None
        try:
            result = fn()
        except redis.RedisError as exc:
            self._fail(exc)
            return None
        with self._lock:
            self._backoff = BACKOFF[0]
        return result

    def _fail(self, exc: redis.RedisError) -> None:
        kind = error_kind(exc)
        log.warning("remote tier: %s error: %s", kind, exc)
        self._on_error(kind)
        if kind in ("timeout", "connection", "auth"):
            with self._lock:
                self._down_until = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF[1])


def error_kind(exc: BaseException) -> str:
    """The `kind` label of a Redis failure."""
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return "auth"
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError):
        return "connection"
    if isinstance(exc, redis.ResponseError):
        return "response"
    return "other"


def _connect(config: RemoteConfig) -> redis.Redis:
    """A client for `config.url` (no retries of its own: the store's gate backs off)."""
    kwargs: dict[str, object] = {
        "socket_timeout": config.timeout,
        "socket_read_size": 1 << 20,  # checkpoints are tens of MB: fewer, larger reads
        "socket_connect_timeout": config.timeout,
        "retry": None,
        "retry_on_timeout": False,
    }
    if config.password is not None:
        kwargs["password"] = config.password
    if config.url.startswith("rediss://"):
        kwargs.update(
            ssl_ca_certs=_opt(config.tls_ca_file),
            ssl_certfile=_opt(config.tls_cert_file),
            ssl_keyfile=_opt(config.tls_key_file),
        )
    return redis.Redis.from_url(config.url, **kwargs)


def _opt(path: object) -> str | None:
    return None if path is None else str(path)
