"""Batched-prefill cases shared by the GPU tests and the Triton-interpreter tests.

Segments of length 1, inside the conv window (k-1 = 3), one chunk, just past it and several chunks, on
permuted slots that start from distinct non-zero states, with captures at chunk-aligned positions (taken
out of the pass), unaligned ones (which split it) and at segment ends. Slots 2 and 4 hold live states
that no segment touches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from server.model.config import ModelConfig
from server.model.lm import MambaLM
from server.model.runner import Captures, ModelRunner, PrefillResult, PrefillSeg

CHUNK = 8  # the tiny models' chunk size
MAX_SLOTS = 8
UNTOUCHED = (2, 4)
CASES: list[tuple[int, int, tuple[int, ...]]] = [  # (length, slot, captures)
    (1, 6, ()),
    (3, 0, (2, 3)),
    (8, 3, (8,)),
    (9, 5, (8, 9)),
    (27, 1, (8, 9, 16, 24, 26)),
    (40, 7, (16, 32)),
]
Close = Callable[[Tensor, Tensor], None]  # asserts two tensors match
R = TypeVar("R", bound=ModelRunner)


def tokens(n: int, seed: int, vocab: int = 320) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def segments(seed: int = 0) -> list[PrefillSeg]:
    return [PrefillSeg(tokens(n, seed + i), slot, caps) for i, (n, slot, caps) in enumerate(CASES)]


def restore_distinct_states(runner: R) -> R:
    """Every slot restored to its own seeded non-zero state (the same in every runner of one model)."""
    gen = torch.Generator().manual_seed(50)
    for slot in range(runner.max_slots):
        state = {
            name: (0.5 * torch.randn(shape, generator=gen)).to(dtype)
            for name, (shape, dtype) in runner.state_spec().items()
        }
        runner.restore(slot, state)
    return runner


def one_at_a_time(runner: ModelRunner, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
    return [runner.prefill(s.tokens, s.slot, s.capture_at) for s in segs]


def assert_states_close(got: dict[str, Tensor], want: dict[str, Tensor], close: Close) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        close(got[name], tensor)


def assert_captures_close(got: Captures, want: Captures, close: Close) -> None:
    assert sorted(got) == sorted(want)
    for pos, state in want.items():
        assert_states_close(got[pos], state, close)


def assert_batch_matches(
    got: Sequence[PrefillResult],
    want: Sequence[PrefillResult],
    runners: tuple[ModelRunner, ModelRunner],
    segs: Sequence[PrefillSeg],
    close: Close,
) -> None:
    """Results and slot states of `runners[0]` (after the batch) match those of `runners[1]`."""
    for g, w, seg in zip(got, want, segs, strict=True):
        close(g.last_logits, w.last_logits)
        assert_captures_close(g.captures, w.captures, close)
        assert_states_close(runners[0].capture(seg.slot), runners[1].capture(seg.slot), close)


def random_model(arch: str, dtype: torch.dtype, device: str = "cuda") -> MambaLM:
    """Realistic head shapes (p=64, n=128, chunk 256) with random weights, two layers."""
    torch.manual_seed(0)
    if arch == "mamba2":
        cfg = ModelConfig(arch="mamba2", d_model=256, n_layer=2, vocab_size=512, d_state=128, headdim=64)
    else:
        cfg = ModelConfig(arch="mamba1", d_model=256, n_layer=2, vocab_size=512, d_state=16)
    model = MambaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D")):
                p.copy_(0.5 * torch.randn_like(p))
    return model.to(device, dtype).eval()


def assert_aligned_captures_take_one_pass(runner: Any, monkeypatch: Any) -> None:
    """Chunk-aligned captures come out of one batched pass (Mamba2); Mamba1, without chunk states, splits."""
    passes: list[int] = []
    inner = runner._prefill_rows

    def counted(ids: Tensor, *rest: Any) -> Any:
        passes.append(ids.shape[0])
        return inner(ids, *rest)

    monkeypatch.setattr(runner, "_prefill_rows", counted)
    caps = (CHUNK, 2 * CHUNK, 3 * CHUNK, 27)
    (result,) = runner.prefill_batch([PrefillSeg(tokens(27, 0), 2, caps)])
    assert sorted(result.captures) == list(caps)
    assert len(passes) == (1 if runner.config.arch == "mamba2" else 4)


def assert_state_pass_is_the_stage(
    ops: Any, parts: Any, device: str, pool_dtype: torch.dtype, round_to_nearest: bool = True
) -> None:
    """`gpu_ops.state_pass` on pool slots equals mamba-ssm's state passing on states gathered from them, bit
    for bit: the states entering each chunk, and the final ones (rounded to the pool's dtype) in the slots.
    Two padding rows (own states 0, decay 0) share a slot, as a graph bucket's do, and leave it as it was;
    the other slots keep their bytes. `round_to_nearest=False`: a bf16 store may truncate instead (Triton's
    interpreter does), within one bf16 step of the nearest."""
    gen = torch.Generator().manual_seed(9)
    b, c, h, d, slots_n = 5, 3, 4, 48, 8
    own = torch.randn(b, c, h, d, generator=gen)
    own[3:] = 0.0
    da = -torch.rand(b, h, c, 2, generator=gen)  # the stage reads a strided view: dA_cumsum[..., -1]
    da[3:] = 0.0
    pool = torch.randn(slots_n, h, d, generator=gen).to(pool_dtype)
    own, da, pool = own.to(device), da.to(device), pool.to(device)
    slots = torch.tensor([6, 0, 3, 5, 5], device=device)
    before = pool.clone()
    want, final = parts.state_passing(
        own[:3], da[:3, ..., -1], initial_states=before[slots[:3]].float(), chunk_size=CHUNK,
        out_dtype=torch.float32,
    )  # fmt: skip
    got = ops.state_pass(own, da[..., -1], pool, slots)
    assert got.dtype == torch.float32 and torch.equal(got[:3], want)
    assert torch.equal(got[3:], before[slots[3:]].float().unsqueeze(1).expand(-1, c, -1, -1))
    if round_to_nearest or pool_dtype == torch.float32:
        assert torch.equal(pool[slots[:3]], final.to(pool_dtype))
    else:
        torch.testing.assert_close(pool[slots[:3]].float(), final, atol=0, rtol=2**-7)
    rest = torch.tensor([s for s in range(slots_n) if s not in (6, 0, 3)], device=device)
    assert torch.equal(pool[rest], before[rest])


# fresh rows for a packed pass (lengths below k-1, across chunk boundaries, several chunks), each captured
# at its end or not, beside a row continuing a live state; slot 4 stays untouched
PACKED_CASES: list[tuple[int, int, bool, tuple[int, ...]]] = [  # (length, slot, fresh, captures)
    (1, 6, True, (1,)),
    (2, 0, True, ()),
    (5, 3, True, (5,)),
    (8, 5, True, (8,)),
    (19, 1, True, (19,)),
    (11, 2, False, (11,)),
    (9, 7, True, ()),
]


def assert_packed_matches(runner: Any, ref: ModelRunner, close: Close, monkeypatch: Any) -> None:
    """`runner` (packed prefill on) against `ref` (the torch runner), both from the same distinct slot states,
    the fresh rows' slots reset: one packed pass takes every fresh row, the continued row runs as before, and
    the logits, captures, slot states and a decode step after match."""
    for r in (runner, ref):
        restore_distinct_states(r)
        for _, slot, fresh, _ in PACKED_CASES:
            if fresh:
                r.reset(slot)
    segs = [
        PrefillSeg(tokens(n, 20 + i), slot, caps, fresh)
        for i, (n, slot, fresh, caps) in enumerate(PACKED_CASES)
    ]
    packed: list[list[int]] = []
    inner = runner._prefill_packed

    def counted(part: Sequence[PrefillSeg]) -> Any:
        packed.append([seg.slot for seg in part])
        return inner(part)

    monkeypatch.setattr(runner, "_prefill_packed", counted)
    got = runner.prefill_batch(segs)
    assert packed == [[slot for _, slot, fresh, _ in PACKED_CASES if fresh]]  # one pass, every fresh row
    assert_batch_matches(got, ref.prefill_batch(segs), (runner, ref), segs, close)
    assert_states_close(runner.capture(4), ref.capture(4), close)
    slots = list(range(MAX_SLOTS))
    nxt = [5 * i % 320 for i in slots]
    close(runner.decode(nxt, slots), ref.decode(nxt, slots))


# (h, p, n, g, chunk, lengths, bucket width) of `assert_packed_scan_is_each_sequence_alone`: the tiny models'
# chunks of 8 (lengths inside one chunk, ending on a boundary, crossing one or two), and mamba2-2.7b's head
# shapes on chunks of 256 (blocks of 64 x 128 state entries)
PACKED_SCANS = {
    "tiny": (4, 16, 16, 2, CHUNK, [1, 7, 8, 9, 17, 3], 48),
    "realistic": (2, 64, 128, 1, 256, [1, 255, 256, 257, 600, 3], 1536),
}


def assert_packed_scan_is_each_sequence_alone(
    ops: Any, parts: Any, device: str, pool_dtype: torch.dtype, close: Close, shapes: str = "tiny"
) -> None:
    """The packed chunked scan (`gpu_layers.chunk_scan_packed`) over fresh sequences back to back
    (`PACKED_SCANS`), in a bucket with a tail and an empty sequence on the spare slot, its dt raw (the scan
    adds the bias, takes the softplus and clamps): each sequence's outputs and final state in its slot are
    the torch scan's over it alone from the zero state; the spare slot and
    the slots no sequence holds keep their bytes (`gpu_ops.final_states` writes nothing for the spare's
    sequences)."""
    from server.model.gpu_layers import chunk_scan_packed
    from server.model.gpu_packed import PackedRows
    from server.model.ssd import ssd_scan_states

    h, p, n, g, chunk, lengths, width = PACKED_SCANS[shapes]
    slots, spare = [6, 0, 3, 5, 1, 7], MAX_SLOTS
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, width, h * p + 5, generator=gen)[..., 2 : 2 + h * p].unflatten(-1, (h, p))  # strided
    raw = torch.randn(1, width, h + 3, generator=gen)[..., 1 : 1 + h] - 2.0  # strided, as in_proj's slice
    bias, limit = torch.randn(h, generator=gen) * 0.5, (1e-3, 0.4)  # a clamp some dt reach
    bc = torch.randn(1, width, 2, g, n, generator=gen)
    A, D = -torch.rand(h, generator=gen) - 0.1, torch.randn(h, generator=gen)
    pool = torch.randn(MAX_SLOTS + 1, h, p, n, generator=gen).to(pool_dtype)
    x, raw, bias, bc, A, D, pool = (t.to(device) for t in (x, raw, bias, bc, A, D, pool))
    dt = torch.nn.functional.softplus(raw + bias).clamp(*limit)  # what the scan applies to the raw dt
    B, C = bc[:, :, 0], bc[:, :, 1]
    longs, ints = PackedRows.host(
        [[0] * k for k in lengths], slots, spare, width, len(lengths) + 2, len(lengths)
    )
    _, rows = PackedRows.views(longs.to(device), ints.to(device), width, len(lengths) + 2, len(lengths))
    before = pool.clone()
    y = chunk_scan_packed(parts, ops, x, raw, A, B, C, chunk, D, rows, pool, spare, bias, limit)
    start = 0
    for length, slot in zip(lengths, slots, strict=True):
        part = slice(start, start + length)
        want_y, states = ssd_scan_states(x[:, part], dt[:, part], A, B[:, part], C[:, part], chunk, None)
        close(y[:, part], want_y + x[:, part] * D[:, None])
        close(pool[slot].float(), states[0, -1].to(pool_dtype).float())
        start += length
    kept = [s for s in range(MAX_SLOTS + 1) if s not in slots]  # 2, 4 and the spare
    assert torch.equal(pool[kept], before[kept])


# (batch, length, heads, head dim, state dim, groups, chunk, sequence starts in a packed row or None, D per
# channel): a short last chunk, several groups, sequences starting inside a chunk and on its boundary
SCAN_STAGES = {
    "tiny": (2, 37, 4, 16, 16, 2, CHUNK, None, True),
    "tiny packed": (1, 37, 4, 16, 16, 2, CHUNK, (0, 3, 8, 9, 30), False),
    "realistic packed": (1, 600, 4, 64, 128, 1, 256, (0, 197, 256, 394, 591), False),
}


def assert_scan_stages_are_mamba_ssm(
    ops: Any, device: str, dtype: torch.dtype, close: Close, shapes: str = "tiny"
) -> None:
    """`gpu_ops.chunk_scan` and `gpu_ops.chunk_state` give what mamba-ssm's `_chunk_scan_fwd` and
    `_chunk_state_fwd` give on the same inputs (`SCAN_STAGES`): the outputs with the D skip, from states
    entering the chunks that the state passing made from a random initial state (or, packed, from each
    sequence's zero state), and each chunk's own state (packed: its last sequence's)."""
    from mamba_ssm.ops.triton.ssd_combined import (
        _bmm_chunk_fwd,
        _chunk_cumsum_fwd,
        _chunk_scan_fwd,
        _chunk_state_fwd,
        _state_passing_fwd,
    )

    b, length, h, p, n, g, chunk, starts, d_per_channel = SCAN_STAGES[shapes]
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(b, length, h, p, generator=gen)
    B, C = (torch.randn(b, length, g, n, generator=gen) * n**-0.5 for _ in "BC")
    raw = torch.randn(b, length, h, generator=gen) - 2.0
    A = -torch.rand(h, generator=gen) - 0.1
    D = torch.randn(h, p, generator=gen) if d_per_channel else torch.randn(h, generator=gen)
    init = torch.randn(b, h, p * n, generator=gen) if starts is None else None
    seq_idx = None
    if starts is not None:
        seq_idx = torch.zeros(b, length, dtype=torch.int32)
        for start in starts[1:]:
            seq_idx[:, start:] += 1
    x, B, C = (t.to(device, dtype) for t in (x, B, C))
    raw, A, D, init, seq_idx = (None if t is None else t.to(device) for t in (raw, A, D, init, seq_idx))
    dA, dt = _chunk_cumsum_fwd(raw, A, chunk, dt_softplus=True)
    own = _chunk_state_fwd(B, x, dt, dA, seq_idx=seq_idx, states_in_fp32=True)
    close(ops.chunk_state(B, x, dt, dA, seq_idx), own)
    entering, _ = _state_passing_fwd(
        own.flatten(-2), dA[..., -1], initial_states=init, seq_idx=seq_idx, chunk_size=chunk,
        out_dtype=torch.float32,
    )  # fmt: skip
    entering = entering.unflatten(-1, (p, n))
    cb = _bmm_chunk_fwd(C, B, chunk, seq_idx=seq_idx, output_dtype=torch.float32)
    want, _ = _chunk_scan_fwd(cb, x, dt, dA, C, entering, D=D, seq_idx=seq_idx)
    got = ops.chunk_scan(cb, x, dt, dA, C, entering, D, seq_idx)
    assert got.dtype == x.dtype and got.shape == want.shape
    close(got, want)
