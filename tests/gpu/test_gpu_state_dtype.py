"""The bf16 live ssm state on the GPU runner (`state_dtype=torch.bfloat16`) against the fp32-state GPU
runner on the same weights: prefill (eager and CUDA-graph pieces: mamba-ssm's chunk scan takes a bf16
`initial_states` and returns fp32 final states, copied into the bf16 pool) and batched prefill; decode
through our Triton `ssm_step` and mamba-ssm's `selective_state_update` (Mamba1, and `ssm_step="mamba_ssm"`),
graphs and eager; our `ssm_step` kernel on a bf16 pool against the fp32 pool rounded; the fused cache
codecs on a bf16 spec.

Tolerances as in tests/unit/model/test_state_dtype.py (measured there on CPU): with fp32 weights, after a
prefill and up to 32 teacher-forced decode steps, logits within 5e-3 and states within 5e-2 (relative
norm) of the fp32-state runner; the bf16-state GPU runner and the bf16-state torch runner agree within
the GPU tests' usual 2e-3 on logits (TF32 and kernel order) and 5e-2 on states (one bf16 step each side).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cache import CacheConfig, StateCache
from server.model.gpu_layers import SsmStep
from server.model.gpu_runner import GpuModelRunner, make_runner
from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner, PrefillSeg
from tests.tiny_models import hf_model

pytestmark = pytest.mark.gpu
CHUNK, LENGTH = 8, 27
BF16 = torch.bfloat16
STATE_TOL, LOGIT_TOL = 5e-2, 5e-3


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups", "mamba1"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    arch = "mamba1" if request.param == "mamba1" else "mamba2"
    path = tmp_path_factory.mktemp(request.param)
    hf_model(arch, ngroups=2 if "groups" in request.param else 1, chunk_size=CHUNK, seed=11).save_pretrained(
        path
    )
    return load_model(path, device="cuda")[1]


def _tokens(n: int = LENGTH, seed: int = 0) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-12))


def _pair(model: MambaLM, slots: int = 4, **kw: object) -> tuple[GpuModelRunner, GpuModelRunner]:
    fp32 = GpuModelRunner(model, slots, "cuda", **kw)  # type: ignore[arg-type]
    bf16 = GpuModelRunner(model, slots, "cuda", state_dtype=BF16, **kw)  # type: ignore[arg-type]
    return fp32, bf16


def test_make_runner_passes_the_state_dtype(model: MambaLM) -> None:
    runner = make_runner(model, 2, "cuda", state_dtype=BF16)
    assert isinstance(runner, GpuModelRunner)
    assert runner.pool.ssm.dtype == BF16 and runner.state_spec()["ssm"][1] == BF16


@pytest.mark.parametrize("graphs", [True, False])
def test_prefill_stays_close_to_the_fp32_state_runner(model: MambaLM, graphs: bool) -> None:
    fp32, bf16 = _pair(model, prefill_graphs=graphs)
    tokens = _tokens()
    for r in (fp32, bf16):  # the second segment starts from a non-zero (bf16-rounded) state
        r.prefill(tokens[:9], 1)
    cuts = [3, CHUNK]
    want, got = fp32.prefill(tokens[9:], 1, capture_at=cuts), bf16.prefill(tokens[9:], 1, capture_at=cuts)
    assert _rel(got.last_logits, want.last_logits) < LOGIT_TOL
    for p in cuts:
        assert got.captures[p]["ssm"].dtype == BF16
        assert _rel(got.captures[p]["ssm"], want.captures[p]["ssm"]) < STATE_TOL
    assert _rel(bf16.capture(1)["ssm"], fp32.capture(1)["ssm"]) < STATE_TOL
    assert not bf16.capture(0)["ssm"].any()


def test_graph_prefill_equals_eager_prefill_on_a_bf16_pool(model: MambaLM) -> None:
    graphed = GpuModelRunner(model, 2, "cuda", state_dtype=BF16)
    eager = GpuModelRunner(model, 2, "cuda", state_dtype=BF16, prefill_graphs=False)
    tokens = _tokens(100)
    for r in (graphed, eager):
        r.prefill(tokens[:7], 1)
    got, want = graphed.prefill(tokens[7:], 1), eager.prefill(tokens[7:], 1)  # 93 = 64 + 16 + 8 + 4 + 1
    assert _rel(got.last_logits, want.last_logits) < 2e-3
    assert _rel(graphed.capture(1)["ssm"], eager.capture(1)["ssm"]) < 2e-2  # one bf16 rounding each


def test_batched_prefill_stays_close_to_the_fp32_state_runner(model: MambaLM) -> None:
    fp32, bf16 = _pair(model)
    rows = [(3, 1, ()), (20, 3, (CHUNK,)), (LENGTH, 0, (CHUNK, 2 * CHUNK))]
    segs = [PrefillSeg(_tokens(n, seed=n), slot, caps) for n, slot, caps in rows]
    for seg, got, want in zip(segs, bf16.prefill_batch(segs), fp32.prefill_batch(segs), strict=True):
        assert _rel(got.last_logits, want.last_logits) < LOGIT_TOL
        assert bf16.capture(seg.slot)["ssm"].dtype == BF16
        assert _rel(bf16.capture(seg.slot)["ssm"], fp32.capture(seg.slot)["ssm"]) < STATE_TOL
        for p in seg.capture_at:
            assert got.captures[p]["ssm"].dtype == BF16
            assert _rel(got.captures[p]["ssm"], want.captures[p]["ssm"]) < STATE_TOL
    assert not bf16.capture(2)["ssm"].any()


@pytest.mark.parametrize("ssm_step", ["tssc", "mamba_ssm"])
@pytest.mark.parametrize("use_graphs", [True, False])
def test_decode_stays_close_to_the_fp32_state_runner(
    model: MambaLM, ssm_step: SsmStep, use_graphs: bool
) -> None:
    fp32, bf16 = _pair(model, 6, ssm_step=ssm_step, use_graphs=use_graphs)
    slots = [4, 0, 2]
    for r in (fp32, bf16):
        for s in slots:
            r.prefill(_tokens(6 + s, seed=s), s)
    tokens = torch.tensor([7, 8, 9], device="cuda")
    for _ in range(32):  # teacher-forced on the fp32-state runner's tokens
        want, got = fp32.decode(tokens, slots), bf16.decode(tokens, slots)
        assert _rel(got, want) < LOGIT_TOL
        tokens = want.argmax(-1)
    for s in slots:
        assert bf16.capture(s)["ssm"].dtype == BF16
        assert _rel(bf16.capture(s)["ssm"], fp32.capture(s)["ssm"]) < STATE_TOL
    for untouched in (1, 3, 5):
        assert not bf16.capture(untouched)["ssm"].any()


def test_the_gpu_runner_matches_the_torch_runner_with_bf16_states(model: MambaLM) -> None:
    ref = ModelRunner(model, 2, "cuda", state_dtype=BF16)
    gpu = GpuModelRunner(model, 2, "cuda", state_dtype=BF16)
    tokens = _tokens()
    want, got = ref.prefill(tokens, 0), gpu.prefill(tokens, 0)
    assert _rel(got.last_logits, want.last_logits) < 2e-3
    for t in (5, 6, 7):
        assert _rel(gpu.decode([t], [0]), ref.decode([t], [0])) < 2e-3
    assert _rel(gpu.capture(0)["ssm"], ref.capture(0)["ssm"]) < STATE_TOL


def _step_inputs(b: int, h: int, p: int, g: int, n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda")

    return {
        "x": rand(b, h, p), "dt": rand(b, h), "dt_bias": rand(h), "A": -rand(h).abs(),
        "B": rand(b, g, n), "C": rand(b, g, n), "D": rand(h),
    }  # fmt: skip


def test_ssm_step_kernel_on_a_bf16_pool_rounds_the_fp32_update() -> None:
    from server.model import gpu_ops

    slots, (b, h, p, g, n) = 5, (3, 4, 64, 2, 128)
    inputs = _step_inputs(b, h, p, g, n)
    idx = torch.tensor([3, -1, 0], dtype=torch.int32, device="cuda")
    start = torch.randn(slots, h, p, n, device="cuda").to(BF16)
    pool32, pool16 = start.float(), start.clone()
    y32 = gpu_ops.ssm_step(pool32, idx=idx, **inputs)
    y16 = gpu_ops.ssm_step(pool16, idx=idx, **inputs)
    torch.testing.assert_close(y16, y32, rtol=1e-5, atol=1e-5)  # y comes from the fp32 state either way
    torch.testing.assert_close(pool16, pool32.to(BF16), rtol=2**-7, atol=1e-6)  # rounded once on store
    for untouched in (1, 2, 4):
        assert torch.equal(pool16[untouched], start[untouched])


@pytest.mark.parametrize(("tier", "codec"), [("hot", "fp8"), ("hot", "fp16"), ("cold", "fp16")])
def test_fused_codecs_round_trip_a_bf16_slot(model: MambaLM, tier: str, codec: str) -> None:
    runner = GpuModelRunner(model, 3, "cuda", state_dtype=BF16)
    kw: dict[str, Any] = {"hot_bytes": 1 << 24, "cold_bytes": 1 << 24, "device": "cuda"}
    kw.update({"hot_dtype": codec} if tier == "hot" else {"hot_bytes": 0, "cold_dtype": codec})
    cache = StateCache(CacheConfig(**kw), runner.state_spec())
    tokens = _tokens()
    runner.prefill(tokens, 0)
    assert cache.capture("ns", "s", tokens, runner.capture(0), reason="test")
    lease = cache.lookup("ns", "s", [*tokens, 1])
    assert lease is not None and lease.tier == tier
    cache.fetch(lease, out=runner.slot_state(2))
    cache.release(lease)
    torch.cuda.synchronize()
    saved, restored = runner.capture(0)["ssm"], runner.capture(2)["ssm"]
    assert restored.dtype == BF16
    if codec == "fp8":
        assert _rel(restored, saved) < 2**-4
    else:
        assert torch.equal(restored, saved)  # FP16 storage holds a bf16 value exactly
