"""The GPU runner's kernels on CPU tensors, under Triton's interpreter: our Triton kernels (conv_prefill,
conv_window, selective_scan) and mamba-ssm's (the chunked scan's stages, the fused norms) run as numpy, so
that `GpuModelRunner` (built on the CPU, without CUDA graphs) can be checked against the torch runner on
the tiny seeded models without a GPU: batched prefill, captures included, equals the torch path.

Skipped unless TRITON_INTERPRET=1 (conftest). A venv for it, outside the repo:

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.13.0 triton==3.6.0 einops "numpy<2.4" safetensors \\
        transformers==5.17.0 tokenizers huggingface_hub jinja2 pytest pytest-asyncio hypothesis
    /tmp/tvenv/bin/pip download --no-binary :all: --no-deps mamba-ssm==2.3.2.post1 -d /tmp/mssm
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE /tmp/tvenv/bin/pip wheel --no-deps \\
        --no-build-isolation /tmp/mssm/mamba_ssm-2.3.2.post1.tar.gz -w /tmp/mssm
    /tmp/tvenv/bin/pip install --no-deps /tmp/mssm/mamba_ssm-2.3.2.post1-py3-none-any.whl

(the `pip download` needs the same two MAMBA_* variables set), then run this file alone:

    TRITON_INTERPRET=1 /tmp/tvenv/bin/python -m pytest tests/gpu/test_interpret.py -q

The conftest sets MAMBA_DETERMINISTIC=1 (one config per autotuned kernel: the interpreter has no
benchmarker); a fixture here lets mamba-ssm's `torch.cuda.device(None)` pass on a CPU-only torch.
Tolerance: the interpreter computes in fp32 numpy, so the GPU runner matches the torch runner to the
handoff tolerance of the CPU tests (atol 1e-5, rtol 1e-4); measured differences are about 1e-6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.gpu_runner import GpuModelRunner
from server.model.layers import PaddedRows, causal_conv, causal_conv_window
from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.mamba1 import selective_scan as torch_selective_scan
from server.model.runner import ModelRunner
from server.model.ssd import ssd_scan_states
from tests.gpu import prefill_cases as cases
from tests.tiny_models import hf_model

pytestmark = pytest.mark.triton_interpret
ATOL, RTOL = 1e-5, 1e-4


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module", autouse=True)
def _cpu_device_context() -> Iterator[None]:
    """mamba-ssm enters `torch.cuda.device(x.device.index)`, which a CPU-only torch refuses for None."""
    real = torch.cuda.device

    def device(index: Any) -> Any:
        return contextlib.nullcontext() if index is None else real(index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device", device)
        yield


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    from server.model import gpu_ops

    return gpu_ops


def _load(tmp: Path, arch: str, groups: int = 1) -> MambaLM:
    hf_model(arch, ngroups=groups, chunk_size=cases.CHUNK, seed=7).save_pretrained(tmp)
    return load_model(tmp)[1]


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups", "mamba1"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    arch = "mamba1" if request.param == "mamba1" else "mamba2"
    return _load(tmp_path_factory.mktemp(request.param), arch, 2 if "groups" in request.param else 1)


def _gpu(model: MambaLM) -> GpuModelRunner:
    return GpuModelRunner(model, cases.MAX_SLOTS, "cpu", use_graphs=False)


# ---- kernels -----------------------------------------------------------------------------------


def _conv_inputs(lengths: list[int], c: int = 24, k: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (b, l, c) as a strided view (rows of a wider projection), state (b, c, k-1), weight, bias."""
    torch.manual_seed(0)
    b, width = len(lengths), max(lengths)
    x = torch.randn(b, width, c + 10)[:, :, 3 : 3 + c]  # (b, l, c): channels contiguous, rows strided
    return x, torch.randn(b, c, k - 1), torch.randn(c, 1, k), torch.randn(c)


@pytest.mark.parametrize(
    "block_l", [2, 4, 32]
)  # the state read by the first block's rows only, or two blocks'
def test_conv_prefill_rows_equal_each_row_alone(ops: ModuleType, block_l: int) -> None:
    lengths = [1, 2, 3, 9]  # shorter than k-1 = 3: the new state reaches back into the old one
    x, state, weight, bias = _conv_inputs(lengths)
    out, new = ops.conv_prefill(x, state, weight, bias, block_l=block_l, pos=torch.tensor(lengths))
    for r, n in enumerate(lengths):
        want_out, want_state = causal_conv(x[r : r + 1, :n], state[r : r + 1], weight, bias)
        _close(out[r, :n], want_out[0])
        _close(new[r], want_state[0])


def test_conv_window_at_points(ops: ModuleType) -> None:
    lengths = [5, 9, 2]
    x, state, weight, bias = _conv_inputs(lengths)
    points = [(0, 0), (0, 5), (1, 1), (1, 4), (1, 8), (2, 2), (2, 1)]
    rows = PaddedRows.build(lengths, x.shape[1], points, x.device)
    _, window = causal_conv_window(x, state, weight, bias)
    _, got = ops.conv_prefill(x, state, weight, bias, rows=rows.tap_row, pos=rows.tap_pos)
    torch.testing.assert_close(got, rows.conv_at(window), atol=0, rtol=0)


def test_a_packed_row_convolves_each_fresh_sequence_alone(ops: ModuleType) -> None:
    """Fresh sequences back to back in one row (`start`: each position's sequence start): each one's outputs
    and final conv state are its own from the zero state, also for sequences shorter than k-1."""
    lengths = [1, 2, 5, 3, 9]
    x, _, weight, bias = _conv_inputs([sum(lengths)])
    zero = torch.zeros(1, x.shape[-1], weight.shape[-1] - 1)
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
    start = torch.repeat_interleave(starts, torch.tensor(lengths))
    ends = starts + torch.tensor(lengths)
    rows = torch.zeros(len(lengths), dtype=torch.long)
    out, states = ops.conv_prefill(
        x, zero, weight, bias, rows=rows, pos=ends, start=start, point_start=starts
    )
    for r, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        want_out, want_state = causal_conv(x[:, a:b], zero, weight, bias)
        _close(out[0, a:b], want_out[0])
        _close(states[r], want_state[0])


def _ssd_inputs(b: int, length: int, h: int = 4, p: int = 16, n: int = 16, g: int = 2) -> dict[str, Tensor]:
    torch.manual_seed(1)
    return {
        "x": torch.randn(b, length, h, p),
        "dt": F.softplus(torch.randn(b, length, h)),
        "A": -torch.rand(h) - 0.1,
        "B": torch.randn(b, length, g, n),
        "C": torch.randn(b, length, g, n),
        "init": torch.randn(b, h, p, n),
    }


def test_chunk_scan_states_are_the_torch_scan_states(ops: ModuleType) -> None:
    from server.model.gpu_layers import chunk_scan_states
    from server.model.kernels import load_kernels

    parts = load_kernels().ssd_parts
    assert parts is not None
    t = _ssd_inputs(2, 20)
    D = torch.randn(4)
    y, entering, final = chunk_scan_states(
        parts, ops, t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D, t["init"]
    )
    y_ref, states_ref = ssd_scan_states(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, t["init"])
    assert entering.dtype == final.dtype == torch.float32
    _close(y, y_ref + t["x"] * D[:, None])
    _close(entering, states_ref[:, :-1])
    _close(final, states_ref[:, -1])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_state_pass_on_the_pool_is_the_stage(ops: ModuleType, pool_dtype: torch.dtype) -> None:
    from server.model.kernels import load_kernels

    # the interpreter's fp32 -> bf16 cast truncates; a GPU's rounds to nearest (the GPU test checks it)
    cases.assert_state_pass_is_the_stage(
        ops, load_kernels().ssd_parts, "cpu", pool_dtype, round_to_nearest=False
    )


@pytest.mark.parametrize("shapes", list(cases.PACKED_SCANS))
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_the_packed_scan_leaves_each_sequence_alone_in_its_slot(
    ops: ModuleType, pool_dtype: torch.dtype, shapes: str
) -> None:
    from server.model.kernels import load_kernels

    # a bf16 pool: the interpreter's fp32 -> bf16 cast truncates where the reference's rounds: one bf16 step;
    # sums over chunks of 256 in another order than the reference's: atol 1e-4, rtol 1e-3 (measured 3e-5)
    atol, rtol = (ATOL, RTOL) if shapes == "tiny" else (1e-4, 1e-3)
    rtol = rtol if pool_dtype == torch.float32 else 2**-7

    def close(a: Tensor, b: Tensor) -> None:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)

    cases.assert_packed_scan_is_each_sequence_alone(
        ops, load_kernels().ssd_parts, "cpu", pool_dtype, close, shapes
    )


@pytest.mark.parametrize("shapes", list(cases.SCAN_STAGES))
def test_our_scan_stages_are_mamba_ssms(ops: ModuleType, shapes: str) -> None:
    # the same sums in the same order, both in the interpreter's fp32 numpy: measured differences about 1e-6
    cases.assert_scan_stages_are_mamba_ssm(ops, "cpu", torch.float32, _close, shapes)


def test_mamba1_scan_keeps_the_state_through_padding(ops: ModuleType) -> None:
    torch.manual_seed(2)
    b, length, e, n = 3, 11, 8, 4
    lengths = torch.tensor([11, 4, 1])
    x, z = torch.randn(b, length, e), torch.randn(b, length, e)
    dt = F.softplus(torch.randn(b, length, e))
    dt = dt.masked_fill(~(torch.arange(length) < lengths[:, None]).unsqueeze(-1), 0.0)
    A, B, C, D, h0 = (
        -torch.rand(e, n),
        torch.randn(b, length, n),
        torch.randn(b, length, n),
        torch.randn(e),
        torch.randn(b, e, n),
    )
    _, final = ops.selective_scan(x, dt, A, B, C, D, z, h0)
    for r, size in enumerate(lengths.tolist()):
        sl = slice(r, r + 1)
        _, want = torch_selective_scan(x[sl, :size], dt[sl, :size], A, B[sl, :size], C[sl, :size], h0[sl])
        _close(final[r], want[0])


# ---- the runner --------------------------------------------------------------------------------


def test_batch_equals_the_torch_runner(model: MambaLM) -> None:
    ref = cases.restore_distinct_states(ModelRunner(model, cases.MAX_SLOTS))
    gpu = cases.restore_distinct_states(_gpu(model))
    segs = cases.segments()
    want, got = ref.prefill_batch(segs), gpu.prefill_batch(segs)
    cases.assert_batch_matches(got, want, (gpu, ref), segs, _close)
    for slot in cases.UNTOUCHED:
        cases.assert_states_close(gpu.capture(slot), ref.capture(slot), _close)
    nxt = [7 * i % 320 for i in range(cases.MAX_SLOTS)]
    _close(gpu.decode(nxt, list(range(cases.MAX_SLOTS))), ref.decode(nxt, list(range(cases.MAX_SLOTS))))


def test_batch_equals_one_at_a_time(model: MambaLM) -> None:
    solo, batched = (cases.restore_distinct_states(_gpu(model)) for _ in range(2))
    segs = cases.segments(seed=3)
    want = cases.one_at_a_time(solo, segs)
    cases.assert_batch_matches(batched.prefill_batch(segs), want, (batched, solo), segs, _close)


def test_chunk_aligned_captures_come_out_of_one_pass(model: MambaLM, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = cases.restore_distinct_states(_gpu(model))
    cases.assert_aligned_captures_take_one_pass(gpu, monkeypatch)


def test_a_positive_dt_floor_leaves_the_padding_inert(tmp_path: Path) -> None:
    """dt_limit (0.05, 0.5): the kernel's clamp would lift the padding's dt to 0.05; ours zeroes it after."""
    base = _load(tmp_path, "mamba2")
    model = MambaLM(base.cfg.with_(dt_limit=(0.05, 0.5)))
    model.load_state_dict(base.state_dict())
    ref = cases.restore_distinct_states(ModelRunner(model.eval(), cases.MAX_SLOTS))
    gpu = cases.restore_distinct_states(_gpu(model))
    segs = cases.segments(seed=5)
    cases.assert_batch_matches(gpu.prefill_batch(segs), ref.prefill_batch(segs), (gpu, ref), segs, _close)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_packed_pass_of_fresh_rows_equals_the_torch_runner(
    tmp_path: Path, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _load(tmp_path, "mamba2", groups)
    packed = GpuModelRunner(model, cases.MAX_SLOTS, "cpu", use_graphs=False, packed_prefill=True)
    cases.assert_packed_matches(packed, ModelRunner(model, cases.MAX_SLOTS), _close, monkeypatch)


async def test_an_engine_with_packed_prefill_answers_as_the_torch_runners(tmp_path: Path) -> None:
    """Requests end to end through the engine and a lossless cache: a burst of first turns (one packed pass,
    their prompt ends captured from it) and follow-ups resumed from those captures answer as the torch
    runner's engine does."""
    import asyncio

    from cache import CacheConfig, StateCache
    from server.engine import Engine, EngineConfig
    from server.engine.types import GenerationRequest, SamplingParams
    from server.model.tokenizer import Tokenizer
    from tests.tiny_models import make_chat_model_dir

    model_dir = make_chat_model_dir(tmp_path, seed=13)
    model = load_model(model_dir)[1]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)
    firsts = [cases.tokens(n, 40 + n, vocab=300) for n in (3, 12, 20, 7)]

    async def answers(runner: ModelRunner) -> list[list[tuple[int, float]]]:
        config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", cold_dtype="fp32")
        engine = Engine(
            runner, Tokenizer.from_pretrained(model_dir), StateCache(config, runner.state_spec()),
            config=EngineConfig(max_slots=4, prefill_budget=128, decode_ahead=True),
        )  # fmt: skip

        async def ask(rid: str, prompt: list[int], cached: int | None = None) -> list[tuple[int, float]]:
            req = GenerationRequest(rid, tuple(prompt), params, session_id=rid[-1])
            events = [e async for e in engine.generate(req)]
            if rid.startswith("b"):
                assert events[-1].cached_tokens > len(prompt) - 8  # resumed from the first turn's checkpoints
            if cached is not None:
                assert events[-1].cached_tokens == cached
            return [(e.token_id, e.logprob or 0.0) for e in events if e.token_id is not None]

        engine.start()
        try:
            out = list(await asyncio.gather(*(ask(f"a{i}", p) for i, p in enumerate(firsts))))
            follow = [[*p, *(t for t, _ in o), 5, 6, 7] for p, o in zip(firsts, out, strict=True)]
            out += await asyncio.gather(*(ask(f"b{i}", p) for i, p in enumerate(follow)))
            # an edited answer resumes from the first prompt's own checkpoint: a packed row's end capture, a
            # view of its slot until the worker copied it, before the decode launched ahead wrote the slot
            edits = [[*p, (o[0][0] + 1) % 300, 5, 6] for p, o in zip(firsts, out, strict=False)]
            return out + list(
                await asyncio.gather(*(ask(f"c{i}", p, len(firsts[i])) for i, p in enumerate(edits)))
            )
        finally:
            await engine.stop()

    gpu = GpuModelRunner(model, 4, "cpu", use_graphs=False, packed_prefill=True)
    passes: list[int] = []
    inner = gpu._prefill_packed
    gpu._prefill_packed = lambda segs: passes.append(len(segs)) or inner(segs)  # type: ignore[method-assign]
    got = await answers(gpu)
    assert passes and passes[0] >= 2  # the first turns went packed
    want = await answers(ModelRunner(model, 4))
    assert [[t for t, _ in a] for a in got] == [[t for t, _ in a] for a in want]
    # the logprobs follow the states: a pass that left a wrong state in a slot or a checkpoint shows here
    _close(
        torch.tensor([[lp for _, lp in a] for a in got]), torch.tensor([[lp for _, lp in a] for a in want])
    )
