"""The GPU hybrid runner on CPU tensors under Triton's interpreter (see test_interpret.py for the venv):
the paged decode-attention kernels against SDPA, and `GpuHybridRunner` (built on the CPU, without CUDA
graphs) against the torch `HybridRunner` on tiny seeded hybrids of every architecture: prefill logits,
decode over many steps, split prefill + decode, rows at different positions in one decode, a capture /
restore round trip of the Mamba states and the KV; and the engine on it (a follow-up turn resumed from a
checkpoint generates what the torch engine does). The engine test needs, besides test_interpret.py's venv,
the server's own dependencies there (redis, prometheus_client, pydantic-settings at the project's versions).

    TRITON_INTERPRET=1 /tmp/tvenv/bin/python -m pytest tests/gpu/test_interpret_hybrid.py -q

The interpreter computes in fp32 numpy: tolerance (`_close`) and the CPU device fixture as in
test_interpret.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from server.model.gpu_hybrid_runner import GpuHybridRunner
from server.model.hybrid import HybridLM
from server.model.hybrid_loader import load_hybrid
from server.model.hybrid_runner import HybridRunner
from server.model.runner import ModelRunner, PrefillSeg
from tests.gpu import paged_cases
from tests.gpu.test_interpret import _close, _cpu_device_context  # noqa: F401 (an autouse fixture)
from tests.tiny_hybrids import VOCAB, tiny_hybrid

pytestmark = pytest.mark.triton_interpret
PROMPT, STEPS, SLOTS, MAX_LEN, BLOCK = 19, 10, 3, 48, 8


# ---- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [None, 3, 8])
@pytest.mark.parametrize("shape", [(4, 2, 12, 4), (8, 8, 16, 16), (6, 2, 8, 8)])
def test_decode_attention_equals_sdpa_over_each_rows_prefix(
    shape: tuple[int, int, int, int], splits: int | None
) -> None:
    # rows of one token, 7, several tiles, block-aligned; split along the keys, some splits empty
    paged_cases.check_decode_attention(shape, [1, 7, 40, 16], _close, torch.float32, "cpu", splits)


# ---- the runner --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=("bamba", "granite-moe", "nemotron_h", "falcon_h1", "falcon_h1-norm"))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HybridLM:
    path = tmp_path_factory.mktemp(request.param)
    tiny_hybrid(request.param, seed=3).save_pretrained(path, safe_serialization=True)
    return load_hybrid(path)[1]


def _runners(model: HybridLM) -> tuple[GpuHybridRunner, HybridRunner]:
    gpu = GpuHybridRunner(model, SLOTS, "cpu", max_model_len=MAX_LEN, block_size=BLOCK, use_graphs=False)
    return gpu, HybridRunner(model, SLOTS, "cpu", max_model_len=MAX_LEN, block_size=BLOCK)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode_both(runners: tuple[ModelRunner, ...], tokens: list[int], slots: list[int]) -> None:
    gpu, ref = (r.decode(tokens, slots) for r in runners)
    _close(gpu, ref)


def test_prefill_and_many_decode_steps_equal_the_torch_runner(model: HybridLM) -> None:
    gpu, ref = _runners(model)
    tokens = _tokens(PROMPT + STEPS)
    got, want = (
        gpu.prefill(tokens[:PROMPT], 1, all_logits=True),
        ref.prefill(tokens[:PROMPT], 1, all_logits=True),
    )
    assert got.all_logits is not None and want.all_logits is not None
    _close(got.all_logits, want.all_logits)
    for t in tokens[PROMPT:]:  # crosses block boundaries (8, 16, 24)
        _decode_both((gpu, ref), [t], [1])
    assert gpu.position(1) == ref.position(1) == PROMPT + STEPS
    _close(gpu.kv_source(1).read(0, PROMPT + STEPS), ref.kv_source(1).read(0, PROMPT + STEPS))
    for name, value in ref.capture(1).items():
        _close(gpu.capture(1)[name], value)


@pytest.mark.parametrize("split", [1, 8, 9, PROMPT - 3])
def test_split_prefill_and_decode_equal_one_shot(model: HybridLM, split: int) -> None:
    tokens = _tokens(PROMPT, seed=split)
    one, two = _runners(model)[0], _runners(model)[0]
    whole = one.prefill(tokens, 0).last_logits
    two.prefill(tokens[:split], 0)
    _close(two.prefill(tokens[split:], 0).last_logits, whole)
    for t in (5, 6):
        _close(two.decode([t], [0]), one.decode([t], [0]))


def test_short_segments_prefilled_as_decode_steps_equal_the_torch_runner(model: HybridLM) -> None:
    """A segment of at most `decode_tail` tokens runs as decode steps (graph replays on a GPU): a prompt cut
    at its last 2 tokens (off the chunk grain, so the capture splits it), then decoding, gives the torch
    runner's logits, state and KV."""
    steps: list[int] = []

    class Counted(GpuHybridRunner):
        def decode(
            self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Any = None
        ) -> Tensor:
            steps.append(len(slots))
            return super().decode(tokens, slots, skip)

    gpu = Counted(
        model, SLOTS, "cpu", max_model_len=MAX_LEN, block_size=BLOCK, use_graphs=False, decode_tail=4
    )
    ref = _runners(model)[1]
    tokens = _tokens(PROMPT, seed=11)
    got, want = (r.prefill(tokens, 1, capture_at=[PROMPT - 2]) for r in (gpu, ref))
    _close(got.last_logits, want.last_logits)
    for name, value in want.captures[PROMPT - 2].items():
        _close(got.captures[PROMPT - 2][name], value)
    _close(gpu.prefill([5, 6], 1).last_logits, ref.prefill([5, 6], 1).last_logits)  # a whole segment of 2
    assert steps == [1] * 4  # the 2-token tail and the 2-token segment, a step per token; 17 tokens eagerly
    assert gpu.position(1) == ref.position(1) == PROMPT + 2
    _close(gpu.kv_source(1).read(0, PROMPT + 2), ref.kv_source(1).read(0, PROMPT + 2))
    _decode_both((gpu, ref), [7], [1])


def test_prefill_pieces_equal_the_torch_runner(model: HybridLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments prefilled as pieces (eager on a CPU: the function a GPU captures), here of up to 16 tokens:
    37 tokens cut at a capture (34) run as 16 + 16 + 2 padded to 16 and 3 padded to 16, the slot's position
    carried from piece to piece; then a restore into another slot and a segment from there. Logits, the
    captured state, the KV and the decoding that follows match the torch runner's."""
    from server.model import gpu_hybrid_runner

    monkeypatch.setattr(gpu_hybrid_runner, "PIECE_MAX", 16)
    monkeypatch.setattr(gpu_hybrid_runner, "PIECE_PREFILL_MAX", MAX_LEN)
    segments: list[int] = []

    class Counted(GpuHybridRunner):
        def _prefill_pieces(self, graphs: Any, ids: Tensor, slot: int) -> Tensor:
            segments.append(ids.shape[1])
            return super()._prefill_pieces(graphs, ids, slot)

    gpu = Counted(
        model, SLOTS, "cpu", max_model_len=MAX_LEN, block_size=BLOCK, use_graphs=False, prefill_pieces=True
    )
    ref = _runners(model)[1]
    assert gpu.decode_tail == 0
    tokens = _tokens(40, seed=12)
    got, want = (r.prefill(tokens[:37], 1, capture_at=[34]) for r in (gpu, ref))
    assert segments == [34, 3]
    _close(got.last_logits, want.last_logits)
    for name, value in want.captures[34].items():
        _close(got.captures[34][name], value)
    assert gpu.position(1) == ref.position(1) == 37
    _close(gpu.kv_source(1).read(0, 37), ref.kv_source(1).read(0, 37))
    for runner, result in ((gpu, got), (ref, want)):
        kv = runner.kv_source(1).read(0, 34)
        runner.restore(2, result.captures[34])
        runner.kv_sink(2).append(kv)
    _close(gpu.prefill(tokens[34:40], 2).last_logits, ref.prefill(tokens[34:40], 2).last_logits)
    assert segments[-1] == 6
    for step in range(3):  # both slots, at positions 37 and 40, in one call
        _decode_both((gpu, ref), [7 + step, 8 + step], [1, 2])


def test_captures_at_chunk_multiples_come_out_of_one_eager_pass(model: HybridLM) -> None:
    """An eager segment is not split by captures a multiple of the chunk size (8) into it (a long prompt's
    interval captures): their Mamba states come from its pass. A capture off that grain still splits it. The
    captured states, the logits, the KV and the decoding that follows match the torch runner's, which splits
    at every capture."""
    passes: list[tuple[int, tuple[int, ...]]] = []

    class Counted(GpuHybridRunner):
        def _prefill_eager(
            self, ids: Tensor, slot: int, all_logits: bool, taps: Sequence[int] = ()
        ) -> tuple[Tensor, Any]:
            passes.append((ids.shape[1], tuple(taps)))
            return super()._prefill_eager(ids, slot, all_logits, taps)

    gpu = Counted(model, SLOTS, "cpu", max_model_len=MAX_LEN, block_size=BLOCK, use_graphs=False)
    ref = _runners(model)[1]
    assert gpu._capture_grain() == 8
    tokens = _tokens(41, seed=13)
    at = [8, 24, 37, 40]
    got, want = (r.prefill(tokens[:40], 1, capture_at=at) for r in (gpu, ref))
    assert passes == [(37, (8, 24)), (3, ())]
    _close(got.last_logits, want.last_logits)
    assert sorted(got.captures) == at
    for p in at:
        for name, value in want.captures[p].items():
            _close(got.captures[p][name], value)
    _close(gpu.kv_source(1).read(0, 40), ref.kv_source(1).read(0, 40))
    _decode_both((gpu, ref), tokens[40:], [1])


def test_rows_at_different_positions_decode_in_one_call(model: HybridLM) -> None:
    gpu, ref = _runners(model)
    segs = [PrefillSeg(_tokens(n, seed=n), slot) for slot, n in enumerate((3, 8, 13))]
    for runner in (gpu, ref):
        runner.prefill_batch(segs)
    for step in range(4):
        _decode_both((gpu, ref), [7 + step, 0, 8, 9], [2, -1, 0, 1])


def test_capture_and_restore_round_trip_the_mamba_states_and_the_kv(model: HybridLM) -> None:
    gpu, ref = _runners(model)
    tokens = _tokens(PROMPT, seed=4)
    for runner in (gpu, ref):
        runner.prefill(tokens, 0)
        runner.decode([3], [0])
    state, kv = gpu.capture(0), gpu.kv_source(0).read(0, PROMPT + 1)
    gpu.decode([9], [0])  # slot 0 moves past the checkpoint (its table synced), then is reset
    gpu.reset(0)
    for slot in (0, 2):
        gpu.restore(slot, state)
        gpu.kv_sink(slot).append(kv)
    assert gpu.position(0) == gpu.position(2) == PROMPT + 1
    for t in (4, 5):
        want, got = ref.decode([t], [0])[0], gpu.decode([t, t], [0, 2])
        _close(got[0], want)
        _close(got[1], want)


# ---- through the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [False, True], ids=["eager", "pieces"])
async def test_the_engine_on_the_gpu_runner_resumes_and_matches_the_torch_engine(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, pieces: bool
) -> None:
    """build_engine with GpuHybridRunner (CPU, no graphs; prefill eager or as pieces) in place of the torch
    runner: a follow-up turn resumes from a checkpoint (Mamba states and KV restored through kv_sink) and both
    turns generate what the torch runner's cache-less engine does (greedy)."""
    from server.engine import build_engine
    from server.model import gpu_hybrid_runner
    from tests.tiny_hybrids import make_chat_hybrid_dir
    from tests.unit.engine import test_hybrid_engine as cases

    model_dir = make_chat_hybrid_dir(tmp_path_factory.mktemp("engine"), "nemotron_h", seed=4)
    plain = await asyncio.to_thread(build_engine, cases._settings(model_dir, no_cache=True), None)

    def gpu_runner(model: HybridLM, slots: int, device: object, **kw: object) -> GpuHybridRunner:
        return GpuHybridRunner(
            model, slots, "cpu", max_model_len=cases.MAX_LEN, use_graphs=False, prefill_pieces=pieces
        )

    monkeypatch.setattr(gpu_hybrid_runner, "make_hybrid_runner", gpu_runner)
    engine = await asyncio.to_thread(build_engine, cases._settings(model_dir), None)
    assert isinstance(engine.runner, GpuHybridRunner)
    answer, follow, last = await cases._conversation(engine)
    assert last.cached_tokens > 37
    assert (answer, follow) == (await cases._conversation(plain))[:2]
