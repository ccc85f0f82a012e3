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

Lookup (`find`): the tree's positions in (after, len(tokens)], deepest first; the blob keys of those prefixes
are checked in one pipelined round trip, and the deepest existing one is read and verified: checksum, then
its token prefix compared with the request's, so a hash collision never restores a wrong state.

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
from dataclasses import dataclass
from typing import Any

import redis
import torch
from safetensors.torch import load, save

from cache.config import RemoteConfig
from cache.disk import checksum

log = logging.getLogger(__name__)
ENTRY_OVERHEAD = 2048  # bytes accounted per blob beyond its value: its key, index entries and Redis headers
MAX_CANDIDATES = 256  # deepest positions a lookup considers
BACKOFF = (0.5, 30.0)  # seconds: first and longest pause after a failure

# Shared by the scripts: `purge(k)` forgets blob `k` and everything that refers to it. `own` holds, per blob,
# "session set\npositions key\ncounts key\nposition", so the index keeps only live blobs' positions and a
# session set only its live blobs (Redis deletes a set or hash left empty).
_PURGE = r"""
local function purge(lru, sz, used, own, k)
  local n = redis.call('HGET', sz, k)
  if n then
    redis.call('HDEL', sz, k)
    if redis.call('DECRBY', used, n) < 0 then redis.call('SET', used, 0) end
  end
  local o = redis.call('HGET', own, k)
  if o then
    redis.call('HDEL', own, k)
    local s, p, c, pos = string.match(o, '^(.-)\n(.-)\n(.-)\n(.*)$')
    redis.call('SREM', s, k)
    if redis.call('HINCRBY', c, pos, -1) <= 0 then
      redis.call('HDEL', c, pos)
      redis.call('ZREM', p, pos)
    end
  end
  redis.call('ZREM', lru, k)
  redis.call('DEL', k)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: blob, lru, sz, used, own, positions, counts, session; ARGV: accounted bytes, budget, ttl ms,
# position. Reserves the budget for a blob the same transaction then SETs (the payload never passes through
# Lua, which would copy it twice). Returns {status, used, blobs}: status 1 reserved, 0 existed (its TTL and
# LRU place refreshed; the SET rewrites the same bytes), -1 over the budget (the caller never gets here).
_RESERVE = (
    _PURGE
    + r"""
local blob, lru, sz, used, own = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, ttl = now_ms(), tonumber(ARGV[3])
for _, k in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now, 'LIMIT', 0, 64)) do
  purge(lru, sz, used, own, k)
end
if redis.call('HEXISTS', sz, blob) == 1 then
  redis.call('ZADD', lru, now + ttl, blob)
  return {0, tonumber(redis.call('GET', used) or '0'), redis.call('ZCARD', lru)}
end
local nbytes, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local total = tonumber(redis.call('GET', used) or '0')
if nbytes > budget then return {-1, total, redis.call('ZCARD', lru)} end
while total + nbytes > budget do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 then
    redis.call('SET', used, 0)
    total = 0
    break
  end
  purge(lru, sz, used, own, oldest[1])
  total = tonumber(redis.call('GET', used) or '0')
end
redis.call('HSET', sz, blob, nbytes)
redis.call('INCRBY', used, nbytes)
redis.call('ZADD', lru, now + ttl, blob)
redis.call('HSET', own, blob, KEYS[8] .. '\n' .. KEYS[6] .. '\n' .. KEYS[7] .. '\n' .. ARGV[4])
redis.call('SADD', KEYS[8], blob)
redis.call('ZADD', KEYS[6], tonumber(ARGV[4]), ARGV[4])
redis.call('HINCRBY', KEYS[7], ARGV[4], 1)
return {1, total + nbytes, redis.call('ZCARD', lru)}
"""
)

# KEYS: blob, lru; ARGV: ttl ms. A hit: the blob lives another TTL.
_TOUCH = (
    _PURGE
    + r"""
if redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) == 0 then return 0 end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[1]), KEYS[1])
return 1
"""
)

# KEYS: session, lru, sz, used, own. Drops every blob the session wrote; returns how many.
_DELETE = (
    _PURGE
    + r"""
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('EXISTS', k)
  purge(KEYS[2], KEYS[3], KEYS[4], KEYS[5], k)
end
redis.call('DEL', KEYS[1])
return n
"""
)


class CorruptBlob(ValueError):
    pass


@dataclass(frozen=True)
class Found:
    """A verified remote checkpoint: the encoded fields of `tokens[:position]` (CPU tensors)."""

    position: int
    fields: dict[str, torch.Tensor]
    nbytes: int


def encode_blob(fields: Mapping[str, torch.Tensor], tokens: Sequence[int]) -> bytes:
    """A checkpoint as one safetensors file in memory: the fields, the int32 token prefix, a checksum."""
    tensors = {name: t.contiguous() for name, t in fields.items()}
    tensors["tokens"] = torch.tensor(list(tokens), dtype=torch.int32)
    meta = {"position": str(len(tokens))}
    meta["checksum"] = checksum(tensors, meta)
    return save(tensors, metadata=meta)


def decode_blob(blob: bytes, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
    """The fields of a blob, after checking its checksum and that its prefix is `tokens`. Raises CorruptBlob."""
    try:
        size = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(blob)
    except Exception as exc:  # any malformed blob, whatever the parser raises
        raise CorruptBlob(f"unreadable blob: {exc}") from exc
    if meta.get("checksum") != checksum(tensors, meta):
        raise CorruptBlob("checksum mismatch")
    stored = tensors.pop("tokens", None)
    if stored is None or stored.tolist() != list(tokens):
        raise CorruptBlob("token prefix differs")
    return tensors


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
        self._reserve = self.client.register_script(_RESERVE)
        self._touch = self.client.register_script(_TOUCH)
        self._delete = self.client.register_script(_DELETE)
        self._on_error = on_error
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = BACKOFF[0]
        self.used = 0  # accounted bytes and blobs held, as of the last write
        self.blobs = 0

    # ---- keys ------------------------------------------------------------------------------------------

    def blob_key(self, tree: str, position: int, digest: str) -> str:
        """The key of the blob of a prefix of `tree` (`digest`: its `prefix_hashes` entry)."""
        return f"{self.prefix}c:{_hash(tree)}:{position}:{digest}"

    def _session_key(self, namespace: str, session: str | None) -> str:
        return f"{self.prefix}s:{_hash(json.dumps([namespace, session]))}"

    # ---- operations ------------------------------------------------------------------------------------

    def available(self) -> bool:
        """False while the gate is closed after a failure."""
        with self._lock:
            return time.monotonic() >= self._down_until

    def put(
        self, tree: str, namespace: str, session: str | None, tokens: Sequence[int], blob: bytes
    ) -> int | None:
        """Store a blob for `tokens` of `tree`, referenced by the session; the accounted bytes written
        (0: it existed already, or does not fit the budget), None on failure."""
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
        if cost > self.config.budget:
            self._on_error("too_large")
            return 0
        ttl = int(self.config.ttl * 1000)

        def write() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)  # MULTI ... EXEC: both or neither
            self._reserve(keys=keys, args=[cost, self.config.budget, ttl, len(tokens)], client=pipe)
            pipe.set(key, blob, px=ttl)
            return pipe.execute()

        replies = self._call(write)
        if replies is None:
            return None
        status, self.used, self.blobs = (int(x) for x in replies[0])
        return cost if status == 1 else 0

    def find(self, tree: str, tokens: Sequence[int], after: int) -> Found | None:
        """The deepest verified blob of `tree` at a position in (after, len(tokens)] whose token prefix is
        `tokens[:position]`; None if there is none or Redis failed. A blob failing verification is counted
        as `corrupt` and the next shallower one is tried."""
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

        def exists() -> list[int]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        flags = self._call(exists)
        if flags is None:
            return None
        for pos, key, flag in zip(wanted, keys, flags, strict=True):
            if not flag:
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
            self._refer(key)
            return Found(pos, fields, len(blob))
        return None

    def _get(self, key: str) -> bytes | None:
        return self._call(lambda: self.client.get(key))

    def _refer(self, key: str) -> None:
        """A hit on blob `key`: it lives another TTL."""
        keys = [key, self.prefix + "lru"]
        self._call(lambda: self._touch(keys=keys, args=[int(self.config.ttl * 1000)]))

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
