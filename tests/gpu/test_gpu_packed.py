"""The packed prefill of fresh rows on the GPU (`server.model.gpu_packed`), eager and as graph replays, against
the CPU path and the padded passes; no Triton compile after the warm-up; a request-level mix on realistic
head shapes. Tolerances as in test_gpu_batched_prefill.py (norm-relative: fp32 2e-3, bf16 4e-2)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import Tensor

from server.model.gpu_packed import PACKED_BUCKETS
from server.model.gpu_runner import GpuModelRunner
from server.model.loader import load_model
from server.model.runner import ModelRunner, PrefillSeg
from tests.gpu import prefill_cases as cases
from tests.tiny_models import hf_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    groups = 2 if "groups" in request.param else 1
    hf_model("mamba2", ngroups=groups, chunk_size=cases.CHUNK, seed=11).save_pretrained(path)
    return path


def _within(tol: float) -> cases.Close:
    def close(a: Tensor, b: Tensor) -> None:
        err = (a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-12)
        assert float(err) < tol

    return close


@pytest.mark.parametrize("shapes", list(cases.PACKED_SCANS))
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_the_packed_scan_leaves_each_sequence_alone_in_its_slot(pool_dtype: torch.dtype, shapes: str) -> None:
    from server.model import gpu_ops
    from server.model.kernels import load_kernels

    tol = 2e-3 if pool_dtype == torch.float32 else 4e-2
    cases.assert_packed_scan_is_each_sequence_alone(
        gpu_ops, load_kernels().ssd_parts, "cuda", pool_dtype, _within(tol), shapes
    )


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "replay"])
def test_a_packed_pass_matches_the_cpu_path(
    model_dir: Path, graphs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = GpuModelRunner(
        load_model(model_dir, device="cuda")[1],
        cases.MAX_SLOTS,
        "cuda",
        use_graphs=graphs,
        packed_prefill=True,
    )
    assert (gpu.packed_graphs is not None) == graphs
    ref = ModelRunner(load_model(model_dir)[1], cases.MAX_SLOTS)
    cases.assert_packed_matches(gpu, ref, _within(2e-3), monkeypatch)


def test_replays_equal_the_eager_packed_pass_in_bf16(model_dir: Path) -> None:
    model = load_model(model_dir, device="cuda", dtype="bf16")[1]
    eager, replay = (
        GpuModelRunner(model, cases.MAX_SLOTS, "cuda", use_graphs=g, packed_prefill=True)
        for g in (False, True)
    )
    segs = [PrefillSeg(cases.tokens(n, n), slot, (n,), True) for slot, n in enumerate((3, 40, 17, 9))]
    for runner in (eager, replay):
        for seg in segs:
            runner.reset(seg.slot)
    for got, want, seg in zip(replay.prefill_batch(segs), eager.prefill_batch(segs), segs, strict=True):
        torch.testing.assert_close(got.last_logits, want.last_logits, atol=1e-5, rtol=1e-5)
        cases.assert_states_close(
            got.captures[len(seg.tokens)], want.captures[len(seg.tokens)], _within(1e-5)
        )


def test_after_warmup_packed_passes_compile_nothing_and_every_bucket_replays(
    model_dir: Path, compiles: list[str]
) -> None:
    slots = 20
    runner = GpuModelRunner(
        load_model(model_dir, device="cuda", dtype="bf16")[1], slots, "cuda", packed_prefill=True
    )
    runner.warmup()
    assert runner.packed_graphs is not None
    assert sorted(runner.packed_graphs._graphs) == sorted(PACKED_BUCKETS)
    assert all(runner.packed_graphs._graphs.values())  # every capture succeeded
    compiles.clear()
    rng = random.Random(5)
    for b in (2, 3, 16, 20):
        picked = rng.sample(range(slots), b)
        segs = [PrefillSeg(cases.tokens(rng.randint(1, 300), s), s, (), True) for s in picked]
        for seg in segs:
            runner.reset(seg.slot)
        runner.prefill_batch(segs)
        runner.decode([1] * b, picked)
    torch.cuda.synchronize()
    assert compiles == []


def test_packed_rows_at_realistic_shapes_equal_one_at_a_time() -> None:
    """p=64, n=128, chunk 256: fresh rows across chunk boundaries packed beside a continued one."""
    model = cases.random_model("mamba2", torch.float32)
    solo = cases.restore_distinct_states(GpuModelRunner(model, 4, "cuda"))
    packed = cases.restore_distinct_states(GpuModelRunner(model, 4, "cuda", packed_prefill=True))
    shapes = [(300, 0, True), (700, 1, True), (1, 2, True), (200, 3, False)]
    segs = [PrefillSeg(cases.tokens(n, i, vocab=512), s, (n,), f) for i, (n, s, f) in enumerate(shapes)]
    for runner in (solo, packed):
        for seg in segs:
            if seg.fresh:
                runner.reset(seg.slot)
    want = cases.one_at_a_time(solo, segs)
    cases.assert_batch_matches(packed.prefill_batch(segs), want, (packed, solo), segs, _within(2e-3))
