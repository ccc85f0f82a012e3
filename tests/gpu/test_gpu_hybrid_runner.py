"""GpuHybridRunner on a GPU: CUDA-graph decode equals eager decode, and both equal the torch HybridRunner
(on the CPU, fp32) to TF32 / bf16 tolerance on tiny seeded hybrids (dense with partial RoPE, MoE without
RoPE, parallel Mamba + attention); rows at different positions share one graph; a capture / restore round
trip of Mamba states + KV; the factory's choice. Skipped without CUDA (conftest).

    python -m pytest tests/gpu/test_gpu_hybrid_runner.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from server.model.gpu_hybrid_runner import DECODE_TAIL, GpuHybridRunner, make_hybrid_runner
from server.model.hybrid import HybridLM
from server.model.hybrid_loader import load_hybrid
from server.model.hybrid_runner import HybridRunner
from server.model.runner import PrefillSeg
from tests.gpu import paged_cases
from tests.tiny_hybrids import VOCAB, tiny_hybrid

pytestmark = pytest.mark.gpu
PROMPT, STEPS, SLOTS, MAX_LEN, BLOCK = 21, 12, 4, 64, 8
# relative norm against the CPU's fp32: TF32 in mamba-ssm's prefill kernels; bf16 weights, states and KV
# (the torch path in bf16 drifts up to 0.036 from fp32 over these 12 steps on nemotron_h)
TOL = {"fp32": 5e-3, "bf16": 1e-1}


@pytest.fixture(scope="module", params=("bamba", "nemotron_h", "falcon_h1"))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    tiny_hybrid(request.param, seed=5).save_pretrained(path, safe_serialization=True)
    return path


def _ref(model_dir: Path) -> HybridRunner:
    return HybridRunner(load_hybrid(model_dir)[1], SLOTS, max_model_len=MAX_LEN, block_size=BLOCK)


def _gpu(
    model: HybridLM,
    graphs: bool = True,
    decode_tail: int | None = None,
    pieces: bool | None = None,
    max_len: int = MAX_LEN,
) -> GpuHybridRunner:
    return GpuHybridRunner(
        model,
        SLOTS,
        "cuda",
        max_model_len=max_len,
        block_size=BLOCK,
        use_graphs=graphs,
        decode_tail=decode_tail,
        prefill_pieces=pieces,
    )


def _cuda_model(model_dir: Path, dtype: str = "fp32") -> HybridLM:
    return load_hybrid(model_dir, device="cuda", dtype=dtype)[1]


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("splits", [None, 1, 7, 64])
@pytest.mark.parametrize("shape", [(32, 8, 128, 16), (64, 8, 128, 16), (24, 8, 64, 32)])
def test_decode_attention_kernels_equal_sdpa_in_bf16(
    shape: tuple[int, int, int, int], splits: int | None
) -> None:
    """Published shapes (GQA groups of 4 and 8, head dim 128), contexts past a thousand tokens, the keys
    split as the kernel picks, unsplit, and in more splits than a short row fills."""

    def close(a: Tensor, b: Tensor) -> None:
        assert _rel(a, b) < 2e-2

    paged_cases.check_decode_attention(shape, [1, 17, 1200, 512], close, torch.bfloat16, "cuda", splits)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_and_graph_decode_match_the_torch_runner(model_dir: Path, dtype: str) -> None:
    ref, gpu = _ref(model_dir), _gpu(_cuda_model(model_dir, dtype))
    gpu.warmup()
    tokens = _tokens(PROMPT + STEPS)
    want, got = (
        ref.prefill(tokens[:PROMPT], 2, all_logits=True),
        gpu.prefill(tokens[:PROMPT], 2, all_logits=True),
    )
    assert got.all_logits is not None and want.all_logits is not None
    assert _rel(got.all_logits, want.all_logits) < TOL[dtype]
    for t in tokens[PROMPT:]:  # across KV blocks (24, 32)
        assert _rel(gpu.decode([t], [2]), ref.decode([t], [2])) < TOL[dtype]
    assert gpu.position(2) == PROMPT + STEPS
    assert (
        _rel(gpu.kv_source(2).read(0, PROMPT + STEPS), ref.kv_source(2).read(0, PROMPT + STEPS)) < TOL[dtype]
    )


def test_a_bf16_live_state_matches_the_torch_runners(model_dir: Path) -> None:
    """--state-dtype bf16: the ssm state rounded to bf16 after every step on both paths."""
    bf16 = torch.bfloat16
    ref = HybridRunner(
        load_hybrid(model_dir)[1], SLOTS, max_model_len=MAX_LEN, block_size=BLOCK, state_dtype=bf16
    )
    gpu = GpuHybridRunner(
        _cuda_model(model_dir), SLOTS, "cuda", max_model_len=MAX_LEN, block_size=BLOCK, state_dtype=bf16
    )
    tokens = _tokens(PROMPT + 4, seed=6)
    assert (
        _rel(gpu.prefill(tokens[:PROMPT], 1).last_logits, ref.prefill(tokens[:PROMPT], 1).last_logits) < 2e-2
    )
    for t in tokens[PROMPT:]:
        assert _rel(gpu.decode([t], [1]), ref.decode([t], [1])) < 2e-2
    assert gpu.capture(1)["ssm"].dtype == bf16


def test_graph_decode_equals_eager_decode(model_dir: Path) -> None:
    model = _cuda_model(model_dir)
    graphed, eager = _gpu(model), _gpu(model, graphs=False, decode_tail=DECODE_TAIL)  # one prefill path
    graphed.warmup()
    assert graphed.graphs is not None and all(g is not None for g in graphed.graphs._graphs.values())
    segs = [PrefillSeg(_tokens(n, seed=n), slot) for slot, n in enumerate((3, 8, 17))]
    for runner in (graphed, eager):
        runner.prefill_batch(segs)
    for step in range(STEPS):  # rows at three positions (and a padding row) in one bucket-4 graph
        tokens, slots = [5 + step, 0, 7, 9], [1, -1, 2, 0]
        got, want = graphed.decode(tokens, slots), eager.decode(tokens, slots)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not got[1].any()


def test_rows_at_different_positions_equal_each_row_alone(model_dir: Path) -> None:
    model = _cuda_model(model_dir)
    batched, alone = _gpu(model), _gpu(model)
    prompts = [_tokens(n, seed=n) for n in (4, 9, 16)]
    for runner in (batched, alone):
        runner.prefill_batch([PrefillSeg(p, slot) for slot, p in enumerate(prompts)])
    for step in range(4):
        got = batched.decode([1 + step, 2 + step, 3 + step], [2, 0, 1])
        for row, slot in enumerate((2, 0, 1)):
            assert _rel(got[row], alone.decode([row + 1 + step], [slot])[0]) < 1e-4


def test_a_prompts_short_tail_runs_as_graph_decode_steps_and_matches_the_torch_runner(
    model_dir: Path,
) -> None:
    """The last 3 tokens after a capture (a chat message's end) replay the decode graph instead of an eager
    pass; logits, the captured state and the KV match the torch runner's, and decoding goes on from there."""
    ref, gpu = _ref(model_dir), _gpu(_cuda_model(model_dir), pieces=False)
    gpu.warmup()
    assert gpu.decode_tail == DECODE_TAIL >= 3
    tokens = _tokens(PROMPT + 1, seed=8)
    want, got = (r.prefill(tokens[:PROMPT], 1, capture_at=[PROMPT - 3]) for r in (ref, gpu))
    assert _rel(got.last_logits, want.last_logits) < TOL["fp32"]
    for name, value in want.captures[PROMPT - 3].items():
        assert _rel(got.captures[PROMPT - 3][name], value) < TOL["fp32"]
    assert _rel(gpu.kv_source(1).read(0, PROMPT), ref.kv_source(1).read(0, PROMPT)) < TOL["fp32"]
    assert _rel(gpu.decode(tokens[PROMPT:], [1]), ref.decode(tokens[PROMPT:], [1])) < TOL["fp32"]


def test_prefill_pieces_replay_graphs_that_match_eager_prefill_and_the_torch_runner(model_dir: Path) -> None:
    """By default a segment of up to PIECE_PREFILL_MAX tokens replays captured prefill pieces: 37 tokens cut at
    a capture (34 in a 64-token piece, 3 in a 16-token one), then 300 more (256 + 44 padded to 64). Logits,
    the captured state and the KV match the eager GPU runner's and the torch runner's; decoding goes on."""
    long = 400
    ref = HybridRunner(load_hybrid(model_dir)[1], SLOTS, max_model_len=long, block_size=BLOCK)
    model = _cuda_model(model_dir)
    graphed, eager = _gpu(model, max_len=long), _gpu(model, graphs=False, pieces=False, max_len=long)
    graphed.warmup()
    pieces = graphed.prefill_graphs
    assert pieces is not None and graphed.decode_tail == 0 and eager.prefill_graphs is None
    assert sorted(pieces._graphs) == [16, 32, 64, 128, 256] and all(pieces._graphs.values())
    tokens = _tokens(337 + STEPS, seed=9)
    first = {r: r.prefill(tokens[:37], 1, capture_at=[34]) for r in (ref, graphed, eager)}
    rest = {r: r.prefill(tokens[37:337], 1) for r in (ref, graphed, eager)}
    for runner in (graphed, eager):
        assert _rel(first[runner].last_logits, first[ref].last_logits) < TOL["fp32"]
        assert _rel(rest[runner].last_logits, rest[ref].last_logits) < TOL["fp32"]
        for name, value in first[ref].captures[34].items():
            assert _rel(first[runner].captures[34][name], value) < TOL["fp32"]
        assert _rel(runner.kv_source(1).read(0, 337), ref.kv_source(1).read(0, 337)) < TOL["fp32"]
    for t in tokens[337:]:
        want = ref.decode([t], [1])
        assert _rel(graphed.decode([t], [1]), want) < TOL["fp32"]
        assert _rel(eager.decode([t], [1]), want) < TOL["fp32"]


def test_a_long_segments_chunk_aligned_captures_come_out_of_one_eager_pass(model_dir: Path) -> None:
    """600 tokens captured at 256 and 512 (multiples of the chunk size, 8), 597 and the end: one eager pass of
    597 tokens tapped at 256 and 512, then a 3-token piece. The captures, logits and KV match the torch
    runner's, which splits at every capture."""
    long = 640
    ref = HybridRunner(load_hybrid(model_dir)[1], SLOTS, max_model_len=long, block_size=BLOCK)
    gpu = _gpu(_cuda_model(model_dir), max_len=long)
    assert gpu._capture_grain() == 8
    tokens, at = _tokens(601, seed=10), [256, 512, 597, 600]
    got, want = (r.prefill(tokens[:600], 2, capture_at=at) for r in (gpu, ref))
    assert _rel(got.last_logits, want.last_logits) < TOL["fp32"]
    assert sorted(got.captures) == at
    for p in at:
        for name, value in want.captures[p].items():
            assert _rel(got.captures[p][name], value) < TOL["fp32"]
    assert _rel(gpu.kv_source(2).read(0, 600), ref.kv_source(2).read(0, 600)) < TOL["fp32"]
    assert _rel(gpu.decode(tokens[600:], [2]), ref.decode(tokens[600:], [2])) < TOL["fp32"]


def test_capture_and_restore_round_trip(model_dir: Path) -> None:
    gpu = _gpu(_cuda_model(model_dir))
    gpu.prefill(_tokens(PROMPT, seed=3), 0)
    gpu.decode([4], [0])
    state, kv = gpu.capture(0), gpu.kv_source(0).read(0, PROMPT + 1)
    gpu.restore(3, state)
    gpu.kv_sink(3).append(kv)
    for t in (6, 7, 8):
        logits = gpu.decode([t, t], [0, 3])
        assert _rel(logits[1], logits[0]) < 1e-5


def test_the_factory_picks_the_gpu_runner_on_cuda(model_dir: Path) -> None:
    runner = make_hybrid_runner(_cuda_model(model_dir), 2, "cuda", max_model_len=32)
    assert isinstance(runner, GpuHybridRunner) and runner.max_model_len == 32
