"""The paged KV pool against `ContiguousKV`: a tiny hybrid gives the same logits with either (prefill,
split prefill, decode, for several block sizes); forks at any position share full blocks and never
cross-talk; reference counts return every block; a stateful test of allocate/fork/append/release."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.model.hybrid import HybridLM, HybridState
from server.model.hybrid_loader import load_hybrid
from server.model.paged_kv import (
    BlockAllocator,
    KVBlockPool,
    OutOfKVBlocks,
    PagedKV,
    PagedLayerKV,
    StaleKVView,
)
from tests.tiny_hybrids import VOCAB, tiny_hybrid

TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-4}
BLOCK_SIZES = (1, 3, 8, 16)
LENGTH = 27


@pytest.fixture(scope="module", params=("bamba", "falcon_h1"))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HybridLM:
    path = tmp_path_factory.mktemp(request.param)
    tiny_hybrid(request.param, seed=1).save_pretrained(path, safe_serialization=True)
    return load_hybrid(path)[1]


def _ids(batch: int = 1, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _make_pool(model: HybridLM, block_size: int, num_blocks: int = 128) -> KVBlockPool:
    return KVBlockPool.for_model(model.cfg, num_blocks, block_size, model.dtype)


def _paged_state(model: HybridLM, rows: list[PagedKV]) -> HybridState:
    """The zero state with its KV replaced by views of `rows` (which must be empty)."""
    return dataclasses.replace(model.zero_state(len(rows)), kv=PagedLayerKV.batch(rows))


def _continue(model: HybridLM, ids: torch.Tensor, state: HybridState) -> tuple[torch.Tensor, HybridState]:
    """Prefill ids[:, :-2] in two pieces split at 11, then decode the last two: logits (b, l, v)."""
    head, state = model.run(ids[:, :11], state)
    tail, state = model.run(ids[:, 11:-2], state)
    steps = []
    for t in range(ids.shape[1] - 2, ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits.unsqueeze(1))
    return torch.cat([head, tail, *steps], dim=1), state


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@torch.no_grad()
def test_paged_logits_equal_contiguous(model: HybridLM, block_size: int) -> None:
    ids = _ids(batch=2)
    expected, _ = _continue(model, ids, model.zero_state(2))
    pool = _make_pool(model, block_size)
    rows = [pool.sequence(), pool.sequence()]
    got, state = _continue(model, ids, _paged_state(model, rows))
    torch.testing.assert_close(got, expected, **TOL)
    assert state.position == LENGTH and all(row.length == LENGTH for row in rows)
    for row in rows:
        row.release()
    one_shot, _ = model.run(ids, _paged_state(model, [pool.sequence(), pool.sequence()]))
    torch.testing.assert_close(one_shot, model(ids), **TOL)


@pytest.mark.parametrize("block_size", (3, 8))
@pytest.mark.parametrize("at", (0, 5, 8, 9, 16, 20))
@torch.no_grad()
def test_forks_continue_without_cross_talk(model: HybridLM, block_size: int, at: int) -> None:
    """Fork a 20-token sequence at `at`, then feed the parent and the fork different tokens: each matches
    an unshared contiguous run of its own tokens."""
    prompt, parent_more, fork_more = _ids(length=20), _ids(length=7, seed=1), _ids(length=7, seed=2)
    pool = _make_pool(model, block_size)
    parent = pool.sequence()
    _, parent_state = model.run(prompt, _paged_state(model, [parent]))
    child = parent.fork(at)
    _, child_state = model.run(prompt[:, :at], model.zero_state(1))  # the Mamba states at `at`
    child_state = dataclasses.replace(child_state, kv=child.views())
    parent_logits, _ = model.run(parent_more, parent_state)
    child_logits, _ = model.run(fork_more, child_state)
    torch.testing.assert_close(parent_logits, model(torch.cat([prompt, parent_more], 1))[:, 20:], **TOL)
    torch.testing.assert_close(child_logits, model(torch.cat([prompt[:, :at], fork_more], 1))[:, at:], **TOL)


@torch.no_grad()
def test_eight_forks_hold_the_prefix_once_and_release_returns_every_block(model: HybridLM) -> None:
    pool = _make_pool(model, block_size=8)
    parent = pool.sequence()
    model.run(_ids(length=LENGTH), _paged_state(model, [parent]))  # 27 tokens: 3 full blocks, 1 partial
    assert pool.allocator.used == 4
    forks = [parent.fork(LENGTH - i) for i in range(8)]  # positions 20..27, off and on block boundaries
    partial = sum((LENGTH - i) % 8 != 0 for i in range(8))
    assert pool.allocator.used == 4 + partial  # only the partial blocks were copied
    assert [pool.allocator.refcount(b) for b in parent.blocks[:2]] == [9, 9]
    for seq in [parent, *forks]:
        seq.release()
    assert pool.allocator.free == pool.allocator.num_blocks
    assert all(pool.allocator.refcount(b) == 0 for b in range(pool.allocator.num_blocks))


@torch.no_grad()
def test_an_older_view_of_a_moved_sequence_is_refused(model: HybridLM) -> None:
    pool = _make_pool(model, block_size=4)
    seq = pool.sequence()
    start = _paged_state(model, [seq])
    model.run(_ids(length=5), start)
    with pytest.raises(StaleKVView, match="fork"):
        model.run(_ids(length=5), start)
    seq.release()
    with pytest.raises(StaleKVView, match="released"):
        seq.fork(0)


def test_out_of_blocks_and_double_free_raise() -> None:
    allocator = BlockAllocator(2)
    a, b = allocator.allocate(), allocator.allocate()
    with pytest.raises(OutOfKVBlocks, match="all 2 are in use"):
        allocator.allocate()
    allocator.decref([a, b])
    with pytest.raises(ValueError, match="double free"):
        allocator.decref([a])


def test_a_pool_has_the_documented_shape() -> None:
    pool = KVBlockPool(3, 10, 4, 2, 8, torch.bfloat16)
    assert pool.kv.shape == (3, 10, 2, 4, 2, 8) and pool.kv.dtype == torch.bfloat16
    assert pool.block_bytes == 3 * 2 * 4 * 2 * 8 * 2 and pool.blocks_for(9) == 3


def test_append_writes_every_layer_as_per_layer_writes_do() -> None:
    """`append` (a restore's sink: one indexed write for all layers) fills the blocks as `write` per layer
    does, across block boundaries and onto a partial block, and `read` gives it back."""
    pool = KVBlockPool(3, 12, 4, 2, 5, torch.float32)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((3, 2, 11, 2, 5), generator=g)  # (L, 2, n, kv, dh)
    got, want = pool.sequence(), pool.sequence()
    got.append(kv[:, :, :6])  # ends inside a block: the next append continues it
    got.append(kv[:, :, 6:])
    for layer in range(3):
        want.write(layer, kv[layer, 0], kv[layer, 1])
    assert got.length == 11 and got.lengths == [11, 11, 11]
    assert torch.equal(got.read(0, 11), kv) and torch.equal(got.read(3, 9), want.read(3, 9))
    for layer in range(3):
        assert all(
            torch.equal(a, b) for a, b in zip(got.gather(layer, 11), want.gather(layer, 11), strict=True)
        )


class PoolMachine(RuleBasedStateMachine):
    """Sequences are appended to, forked and released at random on a one-layer pool. Each block's count
    equals the tables that name it, free blocks are exactly those with no holder, and every live
    sequence reads back exactly the values appended to it (its fork-time prefix included)."""

    @initialize(block_size=st.integers(1, 5))
    def make_pool(self, block_size: int) -> None:
        self.pool = KVBlockPool(1, 40, block_size, 1, 1, torch.float32)
        self.live: list[tuple[PagedKV, list[float]]] = []
        self.counter = 0.0

    @rule()
    def new_sequence(self) -> None:
        self.live.append((self.pool.sequence(), []))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 7))
    def append(self, data: st.DataObject, n: int) -> None:
        seq, values = data.draw(st.sampled_from(self.live))
        new = [self.counter + i for i in range(n)]
        kv = torch.tensor(new).view(n, 1, 1)  # (l, kv, dh)
        try:
            seq.write(0, kv, -kv)
        except OutOfKVBlocks:
            return  # nothing was taken or written
        self.counter += n
        values.extend(new)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq, values = data.draw(st.sampled_from(self.live))
        at = data.draw(st.integers(0, len(values)))
        with contextlib.suppress(OutOfKVBlocks):  # nothing was taken
            self.live.append((seq.fork(at), values[:at]))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.live) - 1))
        self.live.pop(index)[0].release()

    @invariant()
    def counts_match_tables(self) -> None:
        allocator = self.pool.allocator
        holders = [0] * allocator.num_blocks
        for seq, _ in self.live:
            for block in seq.blocks:
                holders[block] += 1
        assert [allocator.refcount(b) for b in range(allocator.num_blocks)] == holders
        assert allocator.free == holders.count(0)

    @invariant()
    def sequences_read_back_their_values(self) -> None:
        for seq, values in self.live:
            assert seq.length == len(values)
            if values:
                k, v = seq.gather(0, len(values))
                assert k.flatten().tolist() == values and v.flatten().tolist() == [-x for x in values]

    def teardown(self) -> None:
        for seq, _ in self.live:
            seq.release()
        assert self.pool.allocator.free == self.pool.allocator.num_blocks


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_pool_never_leaks_or_double_frees = PoolMachine.TestCase
