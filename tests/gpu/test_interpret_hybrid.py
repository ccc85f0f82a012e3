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
    at its last 3 tokens (a chat message's end), then decoding, gives the torch runner's logits, state and KV."""
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
    got, want = (r.prefill(tokens, 1, capture_at=[PROMPT - 3]) for r in (gpu, ref))
    _close(got.last_logits, want.last_logits)
    for name, value in want.captures[PROMPT - 3].items():
        _close(got.captures[PROMPT - 3][name], value)
    _close(gpu.prefill([5, 6], 1).last_logits, ref.prefill([5, 6], 1).last_logits)  # a whole segment of 2
    assert steps == [1] * 5  # the 3-token tail and the 2-token segment, a step per token; 16 tokens eagerly
    assert gpu.position(1) == ref.position(1) == PROMPT + 2
    _close(gpu.kv_source(1).read(0, PROMPT + 2), ref.kv_source(1).read(0, PROMPT + 2))
    _decode_both((gpu, ref), [7], [1])


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


async def test_the_engine_on_the_gpu_runner_resumes_and_matches_the_torch_engine(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_engine with GpuHybridRunner (CPU, no graphs) in place of the torch runner: a follow-up turn
    resumes from a checkpoint (Mamba states and KV restored through kv_sink) and both turns generate what
    the torch runner's cache-less engine does (greedy)."""
    from server.engine import build_engine
    from server.model import gpu_hybrid_runner
    from tests.tiny_hybrids import make_chat_hybrid_dir
    from tests.unit.engine import test_hybrid_engine as cases

    model_dir = make_chat_hybrid_dir(tmp_path_factory.mktemp("engine"), "nemotron_h", seed=4)
    plain = await asyncio.to_thread(build_engine, cases._settings(model_dir, no_cache=True), None)

    def gpu_runner(model: HybridLM, slots: int, device: object, **kw: object) -> GpuHybridRunner:
        return GpuHybridRunner(model, slots, "cpu", max_model_len=cases.MAX_LEN, use_graphs=False)

    monkeypatch.setattr(gpu_hybrid_runner, "make_hybrid_runner", gpu_runner)
    engine = await asyncio.to_thread(build_engine, cases._settings(model_dir), None)
    assert isinstance(engine.runner, GpuHybridRunner)
    answer, follow, last = await cases._conversation(engine)
    assert last.cached_tokens > 37
    assert (answer, follow) == (await cases._conversation(plain))[:2]
