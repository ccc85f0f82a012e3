"""Batched prefill: `prefill_batch` of right-padded rows equals one `prefill` per row (logits, states,
the decode that follows, captures), and takes chunk-aligned captures without splitting the segment.

Tolerance: batched and one-at-a-time passes give the same math but not always the same bits. MKL
picks other sgemm kernels for small row counts (a segment of 1..11 tokens is an M < 12 matmul alone,
part of an M = b*l one in a batch), the SSD scan's carry across chunks is one matmul whose size
follows the padded chunk count, and a batch shorter than a chunk is scanned in a smaller chunk.
Measured differences are below 1e-6; the tests use the handoff tolerance of test_handoff.py. What
must be bit-exact is: rows do not see one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from server.model.layers import PaddedRows
from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import Captures, ModelRunner, PrefillResult, PrefillSeg
from tests.tiny_models import hf_model

CHUNK, K = 8, 4  # chunk boundaries at 8, 16, 24; the conv window is K-1 = 3 tokens
LENGTHS = (1, 3, 8, 9, 27)
SLOTS = (6, 0, 3, 5, 1)  # permuted and not contiguous; slots 2, 4 and 7 hold other live states
MAX_SLOTS = 8
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _load(tmp: Path, arch: str, groups: int = 1, chunk: int = CHUNK) -> MambaLM:
    hf_model(arch, ngroups=groups, chunk_size=chunk, seed=7).save_pretrained(tmp)
    return load_model(tmp)[1]


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups", "mamba1"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    arch = "mamba1" if request.param == "mamba1" else "mamba2"
    return _load(tmp_path_factory.mktemp(request.param), arch, 2 if "groups" in request.param else 1)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _make_runner(model: MambaLM) -> ModelRunner:
    """Every slot restored to a distinct non-zero state (the state after a seeded prompt)."""
    scratch, runner = ModelRunner(model, max_slots=1), ModelRunner(model, max_slots=MAX_SLOTS)
    for slot in range(MAX_SLOTS):
        scratch.reset(0)
        scratch.prefill(_tokens(5 + slot, seed=50 + slot), 0)
        runner.restore(slot, scratch.capture(0))
    return runner


def _segs(lengths: Sequence[int] = LENGTHS, seed: int = 0) -> list[PrefillSeg]:
    return [PrefillSeg(_tokens(n, seed + i), s) for i, (n, s) in enumerate(zip(lengths, SLOTS, strict=True))]


def _one_at_a_time(runner: ModelRunner, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
    return [runner.prefill(s.tokens, s.slot, s.capture_at) for s in segs]


def _assert_states_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        torch.testing.assert_close(got[name], tensor, **TOL)


def _assert_captures_close(got: Captures, want: Captures) -> None:
    assert sorted(got) == sorted(want)
    for pos, state in want.items():
        _assert_states_close(got[pos], state)


def _count_passes(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Record (rows, padded length, real tokens) of every batched pass the runner makes."""
    passes: list[tuple[int, int, int]] = []
    inner = runner._prefill_rows

    def counted(
        ids: Tensor, lengths: Sequence[int], slots: Sequence[int], taps: Sequence[Sequence[int]]
    ) -> tuple[Tensor, list[Captures]]:
        passes.append((ids.shape[0], ids.shape[1], sum(lengths)))
        return inner(ids, lengths, slots, taps)

    monkeypatch.setattr(runner, "_prefill_rows", counted)
    return passes


# ---- batched == one at a time ------------------------------------------------------------------


def test_batch_equals_one_at_a_time(model: MambaLM) -> None:
    solo, batched = _make_runner(model), _make_runner(model)
    segs = _segs()
    want = _one_at_a_time(solo, segs)
    got = batched.prefill_batch(segs)
    for g, w, seg in zip(got, want, segs, strict=True):
        assert g.last_logits.shape == w.last_logits.shape == (model.cfg.unpadded_vocab_size,)
        torch.testing.assert_close(g.last_logits, w.last_logits, **TOL)
        _assert_states_close(batched.capture(seg.slot), solo.capture(seg.slot))


def test_decode_after_batch_equals_decode_after_one_at_a_time(model: MambaLM) -> None:
    solo, batched = _make_runner(model), _make_runner(model)
    segs = _segs()
    _one_at_a_time(solo, segs)
    batched.prefill_batch(segs)
    for step in range(3):
        nxt = [(7 * step + 13 * i) % 320 for i in range(len(SLOTS))]
        torch.testing.assert_close(batched.decode(nxt, SLOTS), solo.decode(nxt, SLOTS), **TOL)


def test_batch_leaves_other_slots_untouched(model: MambaLM) -> None:
    runner = _make_runner(model)
    before = {"conv": runner.pool.conv.clone(), "ssm": runner.pool.ssm.clone()}
    runner.prefill_batch(_segs())
    for slot in sorted(set(range(MAX_SLOTS)) - set(SLOTS)):
        assert torch.equal(runner.pool.conv[:, slot], before["conv"][:, slot])
        assert torch.equal(runner.pool.ssm[:, slot], before["ssm"][:, slot])


def test_rows_do_not_see_one_another(model: MambaLM) -> None:
    """Same lengths, other rows' tokens changed: row 3's logits and state are bit-identical."""
    first, second = _make_runner(model), _make_runner(model)
    segs, other = _segs(seed=0), _segs(seed=100)
    mixed = [*other[:3], segs[3], other[4]]
    a, b = first.prefill_batch(segs)[3], second.prefill_batch(mixed)[3]
    assert torch.equal(a.last_logits, b.last_logits)
    for name, tensor in first.capture(SLOTS[3]).items():
        assert torch.equal(second.capture(SLOTS[3])[name], tensor)


def test_passes_bound_padding(model: MambaLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _make_runner(model)
    passes = _count_passes(runner, monkeypatch)
    runner.prefill_batch(_segs((27, 1, 1, 1, 2)))
    assert sum(rows for rows, _, _ in passes) == 5 and len(passes) < 5
    assert all(rows * width <= runner.pad_waste * real for rows, width, real in passes)


# ---- captures ----------------------------------------------------------------------------------

# on the 27-token row: inside the conv window; chunk-aligned only; aligned, unaligned, aligned after a
# split, and a last piece without captures
CAPTURE_SETS = [(1, 2, 3, 27), (CHUNK, 2 * CHUNK, 3 * CHUNK, 27), (8, 9, 16, 24, 26)]


@pytest.mark.parametrize("captures", CAPTURE_SETS)
def test_captures_equal_the_split_path(model: MambaLM, captures: tuple[int, ...]) -> None:
    solo, batched = _make_runner(model), _make_runner(model)
    segs = _segs()
    segs[4] = PrefillSeg(segs[4].tokens, segs[4].slot, captures)
    segs[3] = PrefillSeg(segs[3].tokens, segs[3].slot, (CHUNK, 9))
    segs[1] = PrefillSeg(segs[1].tokens, segs[1].slot, (2, 3))
    want = _one_at_a_time(solo, segs)
    got = batched.prefill_batch(segs)
    for g, w, seg in zip(got, want, segs, strict=True):
        _assert_captures_close(g.captures, w.captures)
        torch.testing.assert_close(g.last_logits, w.last_logits, **TOL)
        _assert_states_close(batched.capture(seg.slot), solo.capture(seg.slot))


def test_chunk_aligned_captures_take_no_split(model: MambaLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _make_runner(model)
    passes = _count_passes(runner, monkeypatch)
    (result,) = runner.prefill_batch([PrefillSeg(_tokens(27, 0), 2, (CHUNK, 2 * CHUNK, 3 * CHUNK, 27))])
    assert sorted(result.captures) == [CHUNK, 2 * CHUNK, 3 * CHUNK, 27]
    assert len(passes) == (1 if model.cfg.arch == "mamba2" else 4)  # Mamba1 has no chunk states


def test_unaligned_capture_splits_once(model: MambaLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """9 splits; 16 is 7 tokens into its piece, so it splits too; 24 is 8 tokens after 16, so it comes
    out of the pass; 27 ends the segment."""
    runner = _make_runner(model)
    passes = _count_passes(runner, monkeypatch)
    runner.prefill_batch([PrefillSeg(_tokens(27, 0), 2, (9, 16, 24, 27))])
    assert len(passes) == (3 if model.cfg.arch == "mamba2" else 4)


def test_captures_are_new_tensors(model: MambaLM) -> None:
    runner = _make_runner(model)
    (result,) = runner.prefill_batch([PrefillSeg(_tokens(27, 0), 2, (CHUNK, 27))])
    kept = {p: {n: t.clone() for n, t in s.items()} for p, s in result.captures.items()}
    runner.prefill_batch([PrefillSeg(_tokens(5, 1), 2)])
    pool = {runner.pool.conv.untyped_storage().data_ptr(), runner.pool.ssm.untyped_storage().data_ptr()}
    for pos, state in result.captures.items():
        for name, tensor in state.items():
            assert tensor.untyped_storage().data_ptr() not in pool
            assert torch.equal(tensor, kept[pos][name])


def test_aligned_capture_inside_the_conv_window(tmp_path: Path) -> None:
    """With chunk 2 < K-1, a capture at 2 comes out of the pass with a conv state that still holds
    one input from before the segment."""
    model = _load(tmp_path, "mamba2", chunk=2)
    solo, batched = _make_runner(model), _make_runner(model)
    segs = [PrefillSeg(_tokens(9, 0), 6, (2, 4, 9)), PrefillSeg(_tokens(3, 1), 0, (2,))]
    want = _one_at_a_time(solo, segs)
    for g, w in zip(batched.prefill_batch(segs), want, strict=True):
        _assert_captures_close(g.captures, w.captures)


# ---- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (PrefillSeg([], 2), ValueError),
        (PrefillSeg([1, 2], 6), ValueError),  # slot 6 is taken by the first row
        (PrefillSeg([1, 2], 2, (3,)), ValueError),
        (PrefillSeg([1, 2], 2, (0,)), ValueError),
        (PrefillSeg([1, 2], MAX_SLOTS), IndexError),
    ],
)
def test_bad_input_raises_before_any_write(model: MambaLM, bad: PrefillSeg, error: type[Exception]) -> None:
    runner = _make_runner(model)
    before = {"conv": runner.pool.conv.clone(), "ssm": runner.pool.ssm.clone()}
    with pytest.raises(error):
        runner.prefill_batch([PrefillSeg([5, 6, 7], 6), bad])
    assert torch.equal(runner.pool.conv, before["conv"]) and torch.equal(runner.pool.ssm, before["ssm"])


def test_empty_batch_is_a_no_op(model: MambaLM) -> None:
    assert _make_runner(model).prefill_batch([]) == []


# ---- subclasses --------------------------------------------------------------------------------


class _OwnSegment(ModelRunner):
    """Replaces `_prefill_segment` (as the GPU runner does) without a batched hook."""

    segments = 0

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        self.segments += 1
        return super()._prefill_segment(ids, slot, all_logits)


def test_subclass_without_the_hook_prefills_row_by_row(model: MambaLM) -> None:
    runner = _OwnSegment(model, max_slots=MAX_SLOTS)
    results = runner.prefill_batch(_segs())
    assert runner.segments == len(LENGTHS) and len(results) == len(LENGTHS)


def test_rows_tapped_at_their_ends_and_a_row_of_length_0(model: MambaLM) -> None:
    """`PaddedRows.at_ends` (device tensors only: what a CUDA graph of a batched pass captures) gives what
    `build` gives for rows tapped at their ends, and a row of length 0, a graph bucket's padding, leaves the
    state it was given bit for bit."""
    runner = _make_runner(model)
    width = 16
    ids = torch.tensor([[*_tokens(n, n), *[0] * (width - n)] for n in (5, 16)])  # (2, 16)
    padded = torch.cat([ids[:1], torch.tensor([_tokens(width, 99)]), ids[1:]])  # a row of length 0 between
    slots = torch.tensor([6, 2, 3])
    states = runner._slot_states(slots)
    built = PaddedRows.build([5, 16], width, [(0, 5), (1, 16)], runner.device)
    want_logits, want = model.run_rows(ids, runner._slot_states(slots[[0, 2]]), built)
    got_logits, got = model.run_rows(padded, states, PaddedRows.at_ends(torch.tensor([5, 0, 16]), width))
    torch.testing.assert_close(got_logits[[0, 2]], want_logits, **TOL)
    for (conv, ssm), (conv_w, ssm_w), (conv_in, ssm_in) in zip(got, want, states, strict=True):
        torch.testing.assert_close(conv[[0, 2]], conv_w, **TOL)
        torch.testing.assert_close(ssm[[0, 2]], ssm_w, **TOL)
        assert torch.equal(conv[1], conv_in[1].to(conv.dtype)) and torch.equal(
            ssm[1], ssm_in[1].to(ssm.dtype)
        )
