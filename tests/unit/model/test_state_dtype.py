"""The bf16 live ssm state (`state_dtype=torch.bfloat16`): the pool and the state spec are bf16, the
mixers compute in fp32 from it, and prefill / decode / batched prefill stay close to the fp32 runner.

Tolerances. bf16 keeps 8 significant bits, so each store rounds an element by at most 2**-9 of its value.
Measured on these seeded tiny models: after a 27-token prefill and 64 greedy decode steps, the state
differs from the fp32 runner's by <= 1.6e-2 in relative norm (Mamba1; <= 6e-3 Mamba2), the logits by
<= 7.6e-4. The tests allow 5e-2 for states and 5e-3 for logits. Batched prefill and per-row prefill on
the bf16 runner round fp32 states that differ by fp32 noise (< 1e-5, see test_batched_prefill.py):
they end up at most one bf16 step apart (rtol 2**-7) or within that noise (atol 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner, PrefillSeg
from server.model.state import StatePool
from tests.tiny_models import hf_model

CHUNK = 8
LENGTH = 27
STATE_TOL, LOGIT_TOL = 5e-2, 5e-3
ONE_BF16_STEP = {"rtol": 2**-7, "atol": 1e-5}  # + the fp32 handoff atol of test_batched_prefill
BF16 = torch.bfloat16


@pytest.fixture(scope="module", params=["mamba2", "mamba2-groups", "mamba1"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MambaLM:
    arch = "mamba1" if request.param == "mamba1" else "mamba2"
    path = tmp_path_factory.mktemp(request.param)
    hf_model(arch, ngroups=2 if "groups" in request.param else 1, chunk_size=CHUNK, seed=7).save_pretrained(
        path
    )
    return load_model(path)[1]


def _tokens(n: int = LENGTH, seed: int = 0) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _pair(model: MambaLM, slots: int = 4) -> tuple[ModelRunner, ModelRunner]:
    return ModelRunner(model, slots), ModelRunner(model, slots, state_dtype=BF16)


def test_the_pool_and_the_spec_are_bf16(model: MambaLM) -> None:
    fp32, bf16 = _pair(model)
    assert bf16.pool.ssm.dtype == BF16 and bf16.state_spec()["ssm"] == (fp32.state_spec()["ssm"][0], BF16)
    assert bf16.state_spec()["conv"] == fp32.state_spec()["conv"]  # conv stays in the model dtype
    assert fp32.pool.ssm.dtype == torch.float32  # the default
    assert bf16.pool.ssm.nbytes * 2 == fp32.pool.ssm.nbytes


def test_the_pool_refuses_other_ssm_dtypes(model: MambaLM) -> None:
    with pytest.raises(ValueError, match="fp32 or bf16"):
        StatePool(model.cfg, 1, model.dtype, torch.device("cpu"), ssm_dtype=torch.float16)


def test_spare_slots_are_allocated_but_refused_to_callers(model: MambaLM) -> None:
    """A runner's spare slots (the GPU runner's forked row) sit past `slots` in the pool's tensors; no caller
    can name them."""
    pool = StatePool(model.cfg, 3, model.dtype, torch.device("cpu"), spare=1)
    assert pool.slots == 3 and pool.conv.shape[1] == pool.ssm.shape[1] == 4
    pool.read(2)
    for use in (pool.read, pool.reset, pool.views):
        with pytest.raises(IndexError):
            use(3)
    assert pool.spare_views()["ssm"].data_ptr() == pool.ssm[:, 3].data_ptr()
    with pytest.raises(IndexError):
        pool.spare_views(1)


@pytest.mark.parametrize("ssm_dtype", [torch.float32, BF16])
def test_reset_many_zeroes_those_slots_alone(model: MambaLM, ssm_dtype: torch.dtype) -> None:
    pool = StatePool(model.cfg, 4, torch.float32, torch.device("cpu"), ssm_dtype=ssm_dtype, spare=1)
    pool.conv.fill_(1.0)
    pool.ssm.fill_(2.0)
    pool.reset_many([3, 1])
    for slot in range(5):
        zero = slot in (1, 3)
        for t in (pool.conv[:, slot], pool.ssm[:, slot]):
            assert bool((t == 0).all()) if zero else not bool((t == 0).any()), slot
    pool.reset_many([2])
    assert not pool.conv[:, 2].any() and not pool.ssm[:, 2].any()
    with pytest.raises(IndexError):
        pool.reset_many([0, 4])  # the spare is the runner's own: refused before anything is zeroed
    assert bool((pool.conv[:, 0] == 1).all()) and bool((pool.conv[:, 4] == 1).all())
    pool.reset_many([])


def test_prefill_with_captures_stays_close_to_the_fp32_runner(model: MambaLM) -> None:
    fp32, bf16 = _pair(model)
    cuts = [3, CHUNK, 2 * CHUNK + 1]
    want = fp32.prefill(_tokens(), 0, capture_at=cuts, all_logits=True)
    got = bf16.prefill(_tokens(), 0, capture_at=cuts, all_logits=True)
    assert got.all_logits is not None and want.all_logits is not None
    assert _rel(got.all_logits, want.all_logits) < LOGIT_TOL
    for p in cuts:
        assert got.captures[p]["ssm"].dtype == BF16
        assert _rel(got.captures[p]["ssm"], want.captures[p]["ssm"]) < STATE_TOL
    assert bf16.capture(0)["ssm"].dtype == BF16
    assert _rel(bf16.capture(0)["ssm"], fp32.capture(0)["ssm"]) < STATE_TOL


def test_greedy_decode_stays_close_to_the_fp32_runner(model: MambaLM) -> None:
    fp32, bf16 = _pair(model)
    for r in (fp32, bf16):
        r.prefill(_tokens(), 2)
    token = 5
    for _ in range(64):  # teacher-forced on the fp32 runner's tokens
        want, got = fp32.decode([token, 0], [2, -1]), bf16.decode([token, 0], [2, -1])
        assert _rel(got[0], want[0]) < LOGIT_TOL
        token = int(want[0].argmax())
    assert _rel(bf16.capture(2)["ssm"], fp32.capture(2)["ssm"]) < STATE_TOL
    assert not bf16.capture(0)["ssm"].any()  # other slots untouched


def _segs() -> list[PrefillSeg]:
    """Three rows: shorter than the conv window, one chunk-aligned capture, two; slot 2 is left alone."""
    rows = [(3, 1, ()), (20, 3, (CHUNK,)), (LENGTH, 0, (CHUNK, 2 * CHUNK))]
    return [PrefillSeg(_tokens(n, seed=n), slot, caps) for n, slot, caps in rows]


def test_batched_prefill_equals_per_row_prefill_on_a_bf16_pool(model: MambaLM) -> None:
    segs = _segs()
    batched, single = ModelRunner(model, 4, state_dtype=BF16), ModelRunner(model, 4, state_dtype=BF16)
    got = batched.prefill_batch(segs)
    want = [single.prefill(s.tokens, s.slot, s.capture_at) for s in segs]
    for seg, g, w in zip(segs, got, want, strict=True):
        for p in seg.capture_at:
            assert g.captures[p]["ssm"].dtype == BF16
            torch.testing.assert_close(g.captures[p]["ssm"], w.captures[p]["ssm"], **ONE_BF16_STEP)
        live, alone = batched.capture(seg.slot)["ssm"], single.capture(seg.slot)["ssm"]
        torch.testing.assert_close(live, alone, **ONE_BF16_STEP)
    assert not batched.capture(2)["ssm"].any()


def test_batched_prefill_stays_close_to_the_fp32_runner(model: MambaLM) -> None:
    segs = _segs()
    fp32, bf16 = _pair(model)
    for seg, g, w in zip(segs, bf16.prefill_batch(segs), fp32.prefill_batch(segs), strict=True):
        assert _rel(g.last_logits, w.last_logits) < LOGIT_TOL
        assert _rel(bf16.capture(seg.slot)["ssm"], fp32.capture(seg.slot)["ssm"]) < STATE_TOL
        for p in seg.capture_at:
            assert _rel(g.captures[p]["ssm"], w.captures[p]["ssm"]) < STATE_TOL


def test_restore_takes_an_fp32_state_into_a_bf16_pool(model: MambaLM) -> None:
    fp32, bf16 = _pair(model)
    fp32.prefill(_tokens(), 0)
    bf16.restore(1, fp32.capture(0))
    assert torch.equal(bf16.capture(1)["ssm"], fp32.capture(0)["ssm"].to(BF16))
    assert _rel(bf16.decode([7], [1]), fp32.decode([7], [0])) < LOGIT_TOL
