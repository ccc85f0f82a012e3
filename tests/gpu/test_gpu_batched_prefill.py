"""Batched prefill on the GPU runner (one padded pass per group on the GPU kernels) against one-at-a-time
prefill and the CPU path, with restored non-zero states and captures at chunk-aligned and other
positions; and the CUDA-graph rules: no Triton compile or module load inside a capture, captures that
other threads' CUDA work cannot invalidate, eager fallback after a failed capture.

Tolerances as in test_gpu_runner.py (norm-relative: fp32 2e-3, since mamba-ssm's Triton products run
in TF32, bf16 4e-2); graph against eager on the same kernels 1e-5.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from server.model.gpu_layers import chunk_scan_states
from server.model.gpu_runner import GpuModelRunner
from server.model.kernels import load_kernels
from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner, PrefillSeg
from tests.gpu import prefill_cases as cases
from tests.tiny_models import hf_model

pytestmark = pytest.mark.gpu
VARIANTS = ["mamba2", "mamba2-groups", "mamba1"]


@pytest.fixture(scope="module", params=VARIANTS)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = "mamba1" if request.param == "mamba1" else "mamba2"
    path = tmp_path_factory.mktemp(request.param)
    groups = 2 if "groups" in request.param else 1
    hf_model(arch, ngroups=groups, chunk_size=cases.CHUNK, seed=11).save_pretrained(path)
    return path


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-12))


def _within(tol: float) -> cases.Close:
    def close(a: Tensor, b: Tensor) -> None:
        assert _rel(a, b) < tol

    return close


def _gpu(model: MambaLM, slots: int = cases.MAX_SLOTS, **kw: Any) -> GpuModelRunner:
    return GpuModelRunner(model, slots, "cuda", **kw)


# ---- batched == one at a time, == the CPU path -------------------------------------------------


@pytest.mark.parametrize("prefill_graphs", [True, False])
def test_batched_prefill_equals_one_at_a_time(model_dir: Path, prefill_graphs: bool) -> None:
    model = load_model(model_dir, device="cuda")[1]
    solo, batched = (cases.restore_distinct_states(_gpu(model, prefill_graphs=prefill_graphs)) for _ in "ab")
    segs = cases.segments()
    want = cases.one_at_a_time(solo, segs)
    cases.assert_batch_matches(batched.prefill_batch(segs), want, (batched, solo), segs, _within(2e-3))
    for slot in cases.UNTOUCHED:
        cases.assert_states_close(batched.capture(slot), solo.capture(slot), torch.testing.assert_close)
    slots = [seg.slot for seg in segs]
    for step in range(2):
        nxt = [(7 * step + 13 * i) % 320 for i in range(len(slots))]
        assert _rel(batched.decode(nxt, slots), solo.decode(nxt, slots)) < 2e-3


def test_long_rows_run_alone_as_graph_pieces(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of at least `graph_row_min` tokens take the single-row graph path, the rest one eager pass; the
    results are those of one prefill at a time."""
    model = load_model(model_dir, device="cuda")[1]
    solo, batched = (cases.restore_distinct_states(_gpu(model)) for _ in "ab")
    batched.graph_row_min = 9  # the cases' rows of 9 tokens and more run alone
    passes: list[list[int]] = []  # each pass's row lengths
    rows = batched._prefill_rows
    monkeypatch.setattr(
        batched,
        "_prefill_rows",
        lambda ids, lengths, *a: passes.append(list(lengths)) or rows(ids, lengths, *a),
    )
    segs = cases.segments()
    want = cases.one_at_a_time(solo, segs)
    cases.assert_batch_matches(batched.prefill_batch(segs), want, (batched, solo), segs, _within(2e-3))
    assert all(len(p) == 1 for p in passes if max(p) >= 9)  # long rows alone
    assert any(len(p) > 1 for p in passes)  # short ones still share a pass


LAYOUTS = {
    # groups [40, 17, 9] (3 rows of a 4 x 128 bucket) and [3, 1] (2 x 32)
    "a part per group": ([1, 3, 9, 40, 17], [6, 0, 3, 7, 1], {(4, 128), (2, 32)}),
    # one group of 5, cut into 4 x 128 and 1 row of a 2 x 128 (rows out of length order: the logits go back)
    "two parts": ([45, 60, 33, 50, 40], [2, 5, 0, 7, 4], {(4, 128), (2, 128)}),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_short_rows_replay_batched_graphs_equal_to_the_eager_pass(
    model_dir: Path, dtype: str, layout: str
) -> None:
    """Rows captured at their ends at most replay their buckets' graphs; logits, end captures and slot
    states equal the eager padded pass's, and no other slot changes by a bit (a bucket's padding rows
    rewrite a spare slot's own state)."""
    model = load_model(model_dir, device="cuda", dtype=dtype)[1]
    graphed, eager = (
        cases.restore_distinct_states(_gpu(model, **kw)) for kw in ({}, {"batch_graphs": False})
    )
    assert graphed.row_graphs is not None and eager.row_graphs is None
    before = {s: graphed.capture(s) for s in range(cases.MAX_SLOTS)}
    lengths, slots, buckets = LAYOUTS[layout]
    segs = [
        PrefillSeg(cases.tokens(n, i), slot, (n,) if i % 2 else ())
        for i, (n, slot) in enumerate(zip(lengths, slots, strict=True))
    ]
    got, want = graphed.prefill_batch(segs), eager.prefill_batch(segs)
    used = graphed.row_graphs._graphs  # captured at first use: the buckets that replayed
    assert set(used) == buckets and all(g is not None for g in used.values())
    cases.assert_batch_matches(got, want, (graphed, eager), segs, _within(1e-4))
    for slot in set(range(cases.MAX_SLOTS)) - set(slots):
        for name, tensor in graphed.capture(slot).items():
            assert torch.equal(tensor, before[slot][name]), (slot, name)
    nxt = [5, 6, 7, 8, 9]
    assert _rel(graphed.decode(nxt, slots), eager.decode(nxt, slots)) < 1e-4


# (length, captures): a follow-up captured at its user message's end, 3 tokens before the prompt's end; the
# same with the end captured too; a capture on a chunk boundary; a row of the widest bucket
# (length, capture_at): one capture inside (a 2-row bucket), two or three (the previous answer's end too: 4 rows)
FORKS = [
    (96, (93,)),
    (40, (37, 40)),
    (24, (cases.CHUNK,)),
    (500, (1,)),
    (96, (18, 93)),
    (120, (16, 50, 117, 120)),
]


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 4e-2)])  # one pass against two: TF32 apart
@pytest.mark.parametrize("length,capture_at", FORKS)
def test_a_lone_segment_with_inner_captures_runs_as_one_forked_replay(
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    tol: float,
    length: int,
    capture_at: tuple[int, ...],
) -> None:
    """One replay of a bucket of the segment and a fork per capture inside it (each up to its capture, on a
    spare slot of its own) gives the logits, captures and slot state of the prefill split at the captures,
    and leaves every other slot as it was, bit for bit."""
    model = load_model(model_dir, device="cuda", dtype=dtype)[1]
    forked, split = (cases.restore_distinct_states(_gpu(model, **kw)) for kw in ({}, {"batch_graphs": False}))
    before = {s: forked.capture(s) for s in range(cases.MAX_SLOTS)}
    seg = PrefillSeg(cases.tokens(length, 3), 5, capture_at)
    passes: list[str] = []  # prefill passes other than the forked replay
    for name in ("_prefill_rows", "_prefill_segment"):
        monkeypatch.setattr(forked, name, lambda *a, name=name: passes.append(name))
    got, want = forked.prefill_batch([seg]), split.prefill_batch([seg])
    assert passes == [] and forked.row_graphs is not None
    inside = [p for p in capture_at if p < length]
    assert [b for b, _ in forked.row_graphs._graphs] == [
        2 if len(inside) == 1 else 4
    ]  # the one that replayed
    cases.assert_batch_matches(got, want, (forked, split), [seg], _within(tol))
    assert sorted(got[0].captures) == sorted(capture_at)
    for slot in set(range(cases.MAX_SLOTS)) - {seg.slot}:
        for name, tensor in forked.capture(slot).items():
            assert torch.equal(tensor, before[slot][name]), (slot, name)
    assert _rel(forked.decode([7], [seg.slot]), split.decode([7], [seg.slot])) < tol


def test_a_segment_among_others_is_not_forked(model_dir: Path) -> None:
    """With other segments in the step (or no capture inside it, or more than MAX_FORKS) the segment takes the
    usual path: the spare slots serve only a lone segment's forks."""
    runner = _gpu(load_model(model_dir, device="cuda")[1])
    segs = [PrefillSeg(cases.tokens(40, 1), 1, (37,)), PrefillSeg(cases.tokens(12, 2), 3, ())]
    assert runner._fork_point(segs) is None
    assert runner._fork_point(segs[1:]) is None
    assert runner._fork_point(segs[:1]) == ([37], (2, 128))
    assert runner._fork_point([PrefillSeg(cases.tokens(40, 1), 1, (9, 20, 37))]) == ([37, 20, 9], (4, 128))
    assert runner._fork_point([PrefillSeg(cases.tokens(40, 1), 1, (5, 9, 20, 37))]) is None  # 4 > MAX_FORKS
    with pytest.raises(IndexError):
        runner.prefill_batch([PrefillSeg(cases.tokens(4, 1), cases.MAX_SLOTS, ())])  # the spare slot


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 4e-2)])
def test_batched_prefill_matches_the_cpu_path(model_dir: Path, dtype: str, tol: float) -> None:
    ref = cases.restore_distinct_states(ModelRunner(load_model(model_dir)[1], cases.MAX_SLOTS))
    gpu = cases.restore_distinct_states(_gpu(load_model(model_dir, device="cuda", dtype=dtype)[1]))
    segs = cases.segments(seed=9)
    for got, want, seg in zip(gpu.prefill_batch(segs), ref.prefill_batch(segs), segs, strict=True):
        assert _rel(got.last_logits, want.last_logits) < tol
        assert sorted(got.captures) == sorted(want.captures)
        for pos, state in want.captures.items():
            assert all(_rel(got.captures[pos][k], state[k]) < tol for k in ("conv", "ssm"))
        assert _rel(gpu.capture(seg.slot)["ssm"], ref.capture(seg.slot)["ssm"]) < tol


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_batched_prefill_at_realistic_shapes(arch: str) -> None:
    """p=64, n=128, chunk 256: captures at 256 and 512 come out of the pass, 300 splits it."""
    model = cases.random_model(arch, torch.float32)
    solo, batched = (cases.restore_distinct_states(_gpu(model, 4)) for _ in "ab")
    shapes = [(600, 2, (256, 300, 512)), (300, 0, (256,)), (40, 3, ()), (1, 1, (1,))]
    segs = [PrefillSeg(cases.tokens(n, i, vocab=512), s, c) for i, (n, s, c) in enumerate(shapes)]
    want = cases.one_at_a_time(solo, segs)
    cases.assert_batch_matches(batched.prefill_batch(segs), want, (batched, solo), segs, _within(2e-3))


def test_chunk_states_stay_fp32_and_the_outputs_unchanged() -> None:
    """bf16 inputs: the composed stages give the public scan's final state bit for bit and its y within a
    bf16 rounding (our outputs' stage, `gpu_ops.chunk_scan`, sums the same terms in other tiles), and the
    state entering chunk j is the final state of a scan over the first j chunks (what a split gives)."""
    from server.model import gpu_ops

    kernels = load_kernels()
    assert kernels.ssd_parts is not None and kernels.chunk_scan is not None
    torch.manual_seed(3)
    b, length, h, p, n, chunk = 2, 600, 8, 64, 128, 256
    x = torch.randn(b, length, h, p, device="cuda").bfloat16()
    B, C = (torch.randn(b, length, 1, n, device="cuda").bfloat16() for _ in "BC")
    dt = F.softplus(torch.randn(b, length, h, device="cuda") - 2)
    A, D = -torch.rand(h, device="cuda") - 0.1, torch.randn(h, device="cuda")
    init = torch.randn(b, h, p, n, device="cuda")
    y, entering, final = chunk_scan_states(kernels.ssd_parts, gpu_ops, x, dt, A, B, C, chunk, D, init)
    scan = kernels.chunk_scan
    y_pub, final_pub = scan(x, dt, A, B, C, chunk, D=D, initial_states=init, return_final_states=True)
    assert entering.dtype == torch.float32 and torch.equal(final, final_pub)
    _bf16_close(y, y_pub)
    for j in (1, 2):
        cut = (slice(None), slice(0, j * chunk))
        _, split = scan(
            x[cut], dt[cut], A, B[cut], C[cut], chunk, D=D, initial_states=init, return_final_states=True
        )
        assert torch.equal(entering[:, j], split)


def _bf16_close(a: Tensor, b: Tensor) -> None:
    """Equal but for a bf16 rounding of an output (fp32 sums in another order may round it the other way)."""
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("shapes", list(cases.SCAN_STAGES))
def test_our_scan_stages_are_mamba_ssms(shapes: str) -> None:
    from server.model import gpu_ops

    cases.assert_scan_stages_are_mamba_ssm(gpu_ops, "cuda", torch.bfloat16, _bf16_close, shapes)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_state_pass_on_the_pool_is_the_stage(pool_dtype: torch.dtype) -> None:
    from server.model import gpu_ops

    cases.assert_state_pass_is_the_stage(gpu_ops, load_kernels().ssd_parts, "cuda", pool_dtype)


def test_chunk_aligned_captures_take_no_split(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # without batched graphs: with them, a lone segment with up to MAX_FORKS captures inside runs as one forked
    # replay (`test_a_lone_segment_with_inner_captures_runs_as_one_forked_replay`), never as passes
    model = load_model(model_dir, device="cuda")[1]
    runner = cases.restore_distinct_states(_gpu(model, batch_graphs=False))
    cases.assert_aligned_captures_take_one_pass(runner, monkeypatch)


# ---- CUDA graphs: no JIT in a capture, thread-local capture, eager fallback ----------------------


def _sync_while_capturing(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn, made to synchronize the device when called inside a capture (illegal there: it fails)."""

    def wrapped(*args: Any) -> Tensor:
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return fn(*args)

    return wrapped


def test_a_failed_decode_capture_runs_the_bucket_eagerly(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model(model_dir, device="cuda")[1]
    graphed, eager = (cases.restore_distinct_states(_gpu(model, use_graphs=g)) for g in (True, False))
    graphs = graphed.graphs
    assert graphs is not None
    step = graphs.step
    graphs.step = _sync_while_capturing(step)
    with caplog.at_level(logging.WARNING, logger="server.model.gpu_graphs"):
        for _ in range(2):
            got, want = (r.decode([3, 4, 5], [0, 5, 2]) for r in (graphed, eager))
            assert _rel(got, want) < 1e-5
    assert graphs._graphs[4] is None and "decode bucket 4" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    graphs.step = step  # other buckets still capture
    assert _rel(graphed.decode([6], [1]), eager.decode([6], [1])) < 1e-5 and graphs._graphs[1] is not None
    for slot in (0, 1, 2, 5):
        assert _rel(graphed.capture(slot)["ssm"], eager.capture(slot)["ssm"]) < 1e-5


def test_a_failed_prefill_capture_runs_the_piece_eagerly(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The failing pieces run eagerly on the same split: the result equals intact graph pieces'."""
    model = load_model(model_dir, device="cuda")[1]
    failing, intact = (cases.restore_distinct_states(_gpu(model)) for _ in "ab")
    graphs = failing.prefill_graphs
    assert graphs is not None
    piece = graphs.piece
    graphs.piece = _sync_while_capturing(piece)
    tokens = cases.tokens(27, 4)  # one 32-token piece, 27 of them real
    with caplog.at_level(logging.WARNING, logger="server.model.gpu_graphs"):
        got, want = failing.prefill(tokens, 3), intact.prefill(tokens, 3)
    assert _rel(got.last_logits, want.last_logits) < 1e-5
    assert sorted(graphs._graphs) == [32] and not any(graphs._graphs.values())
    assert "32-token prefill piece" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    for name in ("conv", "ssm"):
        assert _rel(failing.capture(3)[name], intact.capture(3)[name]) < 1e-5
    graphs.piece = piece  # other lengths still capture
    failing.prefill(tokens[:4], 5)
    assert graphs._graphs[16] is not None


@pytest.fixture
def compiles_in_captures() -> Iterator[list[str]]:
    """Names of the Triton kernels compiled or loaded while a stream was capturing."""
    import triton

    seen: list[str] = []
    knobs = triton.knobs.runtime

    def on_compile(**kw: Any) -> bool:
        if torch.cuda.is_current_stream_capturing():
            seen.append(str(kw.get("repr")))
        return False  # go on compiling

    def on_load(*args: Any) -> None:
        if torch.cuda.is_current_stream_capturing():
            seen.append(str(args[2]))

    old = knobs.jit_cache_hook
    knobs.jit_cache_hook = on_compile
    knobs.kernel_load_start_hook.add(on_load)
    yield seen
    knobs.jit_cache_hook = old
    knobs.kernel_load_start_hook.remove(on_load)


def test_no_kernel_compiles_inside_a_capture(model_dir: Path, compiles_in_captures: list[str]) -> None:
    runner = cases.restore_distinct_states(_gpu(load_model(model_dir, device="cuda", dtype="bf16")[1], 8))
    runner.warmup()
    runner.prefill(cases.tokens(100, 1), 0)
    runner.decode([1, 2, 3], [0, 1, 2])
    assert compiles_in_captures == []
    assert runner.graphs is not None and all(runner.graphs._graphs.values())


def test_after_warmup_batched_prefills_of_any_mix_compile_nothing(
    model_dir: Path, compiles: list[str]
) -> None:
    """`warm_batched` covers every specialisation: row counts of 1, 16 and others, chunk counts alike,
    chunk-aligned captures, rows padded or not."""
    slots = 20
    runner = _gpu(load_model(model_dir, device="cuda", dtype="bf16")[1], slots)
    runner.warmup()
    compiles.clear()
    rng = random.Random(3)
    grain = runner._capture_grain()
    for b in [1, 2, 3, 16, 17, 20, *(rng.randint(1, slots) for _ in range(6))]:
        segs = []
        for slot in rng.sample(range(slots), b):
            n = rng.randint(1, 20 * cases.CHUNK)
            caps = sorted({p for p in (grain, 2 * grain, n) if 0 < p <= n}) if rng.random() < 0.5 else []
            segs.append(PrefillSeg(cases.tokens(n, slot), slot, caps))
        runner.prefill_batch(segs)
        runner.decode([1] * b, [s.slot for s in segs])
    torch.cuda.synchronize()
    assert compiles == []


def test_other_threads_cuda_work_cannot_invalidate_a_capture(model_dir: Path) -> None:
    """A thread allocating device and pinned memory on its own stream (as the cache's workers do) runs
    throughout every capture of `warmup`; each capture succeeds."""
    model = load_model(model_dir, device="cuda")[1]
    runner, eager = (cases.restore_distinct_states(_gpu(model, use_graphs=g)) for g in (True, False))
    stop, errors = threading.Event(), []

    def churn() -> None:
        stream, size = torch.cuda.Stream(), 1 << 16
        try:
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    host = torch.ones(size, pin_memory=True)
                    torch.empty(size, device="cuda").copy_(host, non_blocking=True)
                    stream.synchronize()
                    size = size * 2 if size < 1 << 24 else 1 << 16
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        runner.warmup()
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert runner.graphs is not None and runner.prefill_graphs is not None and runner.row_graphs is not None
    assert all(runner.graphs._graphs.values()) and all(runner.prefill_graphs._graphs.values())
    assert runner.row_graphs._graphs and all(runner.row_graphs._graphs.values())
    cases.restore_distinct_states(runner)  # warm_batched's passes ran on slots 0.. and reset them
    assert _rel(runner.decode([1, 2], [0, 7]), eager.decode([1, 2], [0, 7])) < 1e-5
