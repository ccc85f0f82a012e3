"""A hybrid cache without a model: attention KV as a pure function of the token prefix, a source that
records what a capture reads, and a sink a restore appends to."""

from __future__ import annotations

import threading
import zlib
from typing import Any

import torch

from cache import CacheConfig, KVSpec, StateCache

KV = KVSpec(n_layers=2, n_kv_heads=2, head_dim=4, dtype=torch.float32, block_size=8)
KV_BLOCK = 2 * 2 * 8 * 2 * 4 * 4  # (L, 2, s, kv, dh) fp32 bytes
SPEC = {"conv": ((2, 6, 3), torch.float32), "ssm": ((2, 2, 4, 8), torch.float32)}
STATE_BLOCK = 256 + 512  # fp32 encoding of SPEC (256-byte aligned fields, no scales)


def make_kv(tokens: tuple[int, ...], spec: KVSpec = KV) -> torch.Tensor:
    """(L, 2, n, kv, dh): position t's keys and values depend on tokens[:t + 1] alone (as a model's do)."""
    out, h = [], 17
    for tok in tokens:
        h = (h * 1_000_003 + tok + 1) % (1 << 61)
        g = torch.Generator().manual_seed(h)
        out.append(torch.randn(spec.n_layers, 2, spec.n_kv_heads, spec.head_dim, generator=g))
    if not out:
        return torch.zeros(spec.n_layers, 2, 0, spec.n_kv_heads, spec.head_dim)
    return torch.stack(out, dim=2).to(spec.dtype)


def make_state(tree: str, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(repr((tree, tokens)).encode()))
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


class TokenKV:
    """A live sequence's KV (`KVSource`); `reads` records every range a capture read."""

    def __init__(self, tokens: tuple[int, ...], spec: KVSpec = KV) -> None:
        self.kv = make_kv(tokens, spec)
        self.reads: list[tuple[int, int]] = []
        self.gate: threading.Event | None = None  # set: read waits for it
        self.entered = threading.Event()
        self.fail = False

    @property
    def length(self) -> int:
        return self.kv.shape[2]

    def read(self, start: int, end: int) -> torch.Tensor:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("KV read failed")
        self.reads.append((start, end))
        return self.kv[:, :, start:end].clone()


class ListSink:
    """A restore's target (`KVSink`)."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def append(self, kv: torch.Tensor) -> None:
        self.parts.append(kv.clone())

    @property
    def kv(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=2)


def make_hybrid_cache(**overrides: Any) -> StateCache:
    """Lossless codecs (restores compare bit for bit); room for 8 checkpoints and 24 KV blocks per tier."""
    fields: dict[str, Any] = {
        "hot_bytes": 8 * STATE_BLOCK + 24 * KV_BLOCK,
        "cold_bytes": 8 * STATE_BLOCK + 24 * KV_BLOCK,
        "hot_window": 8,
        "hot_dtype": "fp32",
        "cold_dtype": "fp32",
    }
    fields.update(overrides)
    kv = fields.pop("kv", KV)
    observer = fields.pop("observer", None)
    return StateCache(CacheConfig(**fields), SPEC, observer, kv=kv)


def capture(cache: StateCache, tokens: tuple[int, ...], session: str = "s", tree: str | None = None) -> bool:
    return cache.capture(
        "ns", session, tokens, make_state(tree or "ns", tokens), reason="x", tree=tree, kv=TokenKV(tokens)
    )


def assert_restores(cache: StateCache, tokens: tuple[int, ...], tree: str | None = None) -> str:
    """Look up `tokens` exactly, restore; state and KV equal what was captured. Returns the tier read."""
    lease = cache.lookup("ns", "reader", tokens, tree=tree)
    assert lease is not None and lease.position == len(tokens)
    try:
        sink = ListSink()
        got = cache.fetch(lease, kv=sink)
        want = make_state(tree or "ns", tokens)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(sink.kv, make_kv(tokens))
    finally:
        cache.release(lease)
    return lease.tier
