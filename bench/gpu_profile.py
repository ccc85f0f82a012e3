"""Where the GPU time goes: kernel profiles of prefill and decode, and block-size sweeps of our Triton kernels.

    python -m bench.gpu_profile [--model mamba2-2.7b] [--length 8192] [--rows 64] [--tokens 200]
                                [--sections prefill,burst,decode,sweep,stages] [--out profile.md]

- prefill: one prefill of `--length` tokens by upstream mamba_ssm, by ours with the torch conv and by ours
  with the Triton conv; wall time (median of 3) and the kernels that take the most device time;
- burst: `--rows` prompts of `--tokens` tokens prefilled at once: upstream's forward over them, our
  `prefill_batch` (eager), one row of as many tokens and `--packed-prefill`'s pass, each with its kernels;
  then our pass's wall time per batch size (the latency a prefill budget trades for its batch);
- decode: one eager decode step at batch 64 (ours), its top kernels;
- sweep: `ssm_step` (batch 1 / 64 / 256) and `conv_prefill` (one row of the prefill length, and a burst's
  64 rows of 208 tokens, reading xBC inside the in_proj output as the runner does) over block sizes and
  warps, in GB/s of the bytes each kernel must move;
- stages (not in the default list): the chunked scan's chunk_state and chunk_scan stages, mamba-ssm's kernels
  against ours (`gpu_ops`), on a burst's packed row and on one long sequence.
Everything is printed and appended to `--out` as markdown; this is the evidence behind the bench tables.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from bench.gpu_bench import VOCAB, Report, build_pair, sync_time, upstream_prefill_fn
from server.model import gpu_ops
from server.model.gpu_runner import GpuModelRunner
from server.model.lm import MambaLM
from server.model.runner import PrefillSeg


def top_kernels(fn: Callable[[], object], rows: int = 12) -> list[list[str]]:
    """[kernel, calls, device ms, share] for the kernels of one run of fn, most device time first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if _device_us(e) > 0]
    total = sum(_device_us(e) for e in events) or 1.0
    events.sort(key=_device_us, reverse=True)
    return [
        [
            e.key[:70].replace("|", "/"),
            str(e.count),
            f"{_device_us(e) / 1e3:.2f}",
            f"{_device_us(e) / total:.0%}",
        ]
        for e in events[:rows]
    ] + [["total", "", f"{total / 1e3:.2f}", "100%"]]


def _device_us(event: object) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def section_prefill(rep: Report, model: str, length: int) -> None:
    upstream, ours = build_pair(model)
    tokens = torch.randint(0, VOCAB, (length,)).tolist()
    runs: dict[str, Callable[[], object]] = {"upstream": upstream_prefill_fn(upstream, length)}
    for conv in ("torch", "triton"):
        runner = GpuModelRunner(ours, 1, "cuda", prefill_graphs=False, conv_prefill=conv)  # type: ignore[arg-type]

        def mine(runner: GpuModelRunner = runner) -> None:
            runner.reset(0)
            runner.prefill(tokens, 0)

        runs[f"ours, {conv} conv"] = mine
    header = ["kernel", "calls", "device ms", "share"]
    for name, fn in runs.items():
        fn()
        wall = sync_time(fn, reps=3)
        rep.table(f"profile: prefill {length:,} tokens, {model}, {name}: {wall * 1e3:.1f} ms wall", header,
                  top_kernels(fn))  # fmt: skip


def section_burst(rep: Report, model: str, rows: int, tokens: int) -> None:
    upstream, ours = build_pair(model)
    for layer in upstream.backbone.layers:  # the path generate()'s prefill takes without causal-conv1d
        layer.mixer.use_mem_eff_path = False
    ids = torch.randint(0, VOCAB, (rows, tokens), device="cuda")
    runner = GpuModelRunner(ours, rows, "cuda", use_graphs=False)
    segs = [PrefillSeg(ids[r].tolist(), r) for r in range(rows)]
    packed = ids.flatten().tolist()
    packer = GpuModelRunner(ours, rows, "cuda", use_graphs=False, packed_prefill=True)
    fresh = [PrefillSeg(ids[r].tolist(), r, (tokens,), True) for r in range(rows)]

    @torch.inference_mode()
    def up() -> None:
        upstream(ids, num_last_tokens=1)

    runs: dict[str, Callable[[], object]] = {
        f"upstream forward, {rows} x {tokens}": up,
        f"ours, prefill_batch of {rows} x {tokens}, eager": lambda: runner.prefill_batch(segs),
        f"ours, one row of {rows * tokens:,} tokens, eager": lambda: runner.prefill(packed, 0),
        f"ours, packed pass of {rows} x {tokens} (--packed-prefill), eager": partial(
            packer.prefill_batch, fresh
        ),
    }
    header = ["kernel", "calls", "device ms", "share"]
    for name, fn in runs.items():
        fn()
        wall = sync_time(fn, reps=3)
        rep.table(f"profile: {name}, {model}: {wall * 1e3:.1f} ms wall", header, top_kernels(fn, rows=16))
    rep.table(
        f"the packed pass of {rows} x {tokens}, eager, by torch op (self device time)",
        ["op", "input shapes", "calls", "device ms"],
        top_ops(partial(packer.prefill_batch, fresh)),
    )
    ended = [PrefillSeg(ids[r].tolist(), r, (tokens,)) for r in range(rows)]
    ms = _replayed_ms(GpuModelRunner(ours, rows, "cuda"), ended)
    rep.write(
        [f"ours, prefill_batch of {rows} x {tokens} captured at their ends (graph replays): {ms:.1f} ms wall"]
    )
    _packed_walls(rep, ours, ids, rows, tokens)
    _scan_layouts(rep, runner, rows, tokens)
    walls = []
    for b in sorted({max(1, rows // 8), max(1, rows // 4), max(1, rows // 2), rows}):
        part = segs[:b]

        def run(part: list[PrefillSeg] = part) -> None:
            runner.prefill_batch(part)

        run()
        ms = sync_time(run, reps=3) * 1e3
        walls.append([f"{b} x {tokens}", f"{ms:.1f}", f"{b * tokens / ms:,.0f}"])
    rep.table(f"our eager prefill_batch by batch size, {model}", ["rows", "wall ms", "tokens / ms"], walls)


def _replayed_ms(runner: GpuModelRunner, segs: list[PrefillSeg]) -> float:
    """Wall ms of `runner.prefill_batch(segs)` after one run that captures its graphs (the runner, and its
    slots' memory, go when this returns)."""
    runner.prefill_batch(segs)
    return sync_time(lambda: runner.prefill_batch(segs), reps=5) * 1e3


def _packed_walls(rep: Report, model: MambaLM, ids: Tensor, rows: int, tokens: int) -> None:
    """The same rows as fresh ones captured at their ends through `--packed-prefill`'s pass (one packed row,
    `server.model.gpu_packed`): eager, and as its bucket's graph replay; by batch size too (wall ms)."""
    fresh = [PrefillSeg(ids[r].tolist(), r, (tokens,), True) for r in range(rows)]
    lines, walls = [], []
    for graphs in (False, True):
        runner = GpuModelRunner(model, rows, "cuda", use_graphs=graphs, packed_prefill=True)
        for b in sorted({2, max(2, rows // 4), max(2, rows // 2), rows}):
            part = fresh[:b]

            def run(part: list[PrefillSeg] = part, runner: GpuModelRunner = runner) -> None:
                runner.prefill_batch(part)

            run()
            ms = sync_time(run, reps=3) * 1e3
            walls.append(
                [f"{b} x {tokens}", "replay" if graphs else "eager", f"{ms:.1f}", f"{b * tokens / ms:,.0f}"]
            )
        lines.append(
            f"ours, packed pass of {rows} x {tokens} ({'graph replay' if graphs else 'eager'}): {walls[-1][2]} ms wall"
        )
        del runner
    rep.write(lines)
    rep.table("the packed pass by batch size", ["rows", "pass", "wall ms", "tokens / ms"], walls)


def _scan_layouts(rep: Report, runner: GpuModelRunner, rows: int, tokens: int) -> None:
    """One layer's chunked scan stages over `rows` sequences: right-padded rows (width a multiple of 16) on the
    pool's slots, as the runner runs them, against one packed row with `seq_idx`, its sequences' final states
    either by mamba-ssm's `chunk_state_varlen` and a scatter into the slots (session 22's pass) or straight
    into the slots by `gpu_ops.final_states` (each from the zero state)."""
    from mamba_ssm.ops.triton.ssd_chunk_state import chunk_state_varlen

    from server.model.gpu_layers import chunk_scan_slots

    layer = runner.layers[0]
    parts, cfg = runner.kernels.ssd_parts, layer.cfg
    assert parts is not None
    h, p, n, chunk = cfg.nheads, cfg.headdim, cfg.d_state, cfg.chunk_size
    g = cfg.ngroups
    width = -(-tokens // 16) * 16

    def inputs(b: int, length: int) -> tuple[Tensor, ...]:
        x = torch.randn(b, length, h, p, device="cuda", dtype=torch.bfloat16)
        dt = torch.rand(b, length, h, device="cuda") * 0.1
        bc = torch.randn(b, length, 2, g, n, device="cuda", dtype=torch.bfloat16)
        return x, dt, bc[:, :, 0], bc[:, :, 1]

    A = -torch.rand(h, device="cuda")
    D = torch.ones(h, device="cuda")
    x, dt, B, C = inputs(rows, width)
    pool = torch.zeros(rows + 1, h, p, n, device="cuda")
    slots = torch.arange(rows, device="cuda")
    padded = lambda: chunk_scan_slots(parts, gpu_ops, x, dt, A, B, C, chunk, D, pool, slots)
    px, pdt, pB, pC = inputs(1, rows * tokens)
    cu = torch.arange(0, rows * tokens + 1, tokens, device="cuda", dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(rows, device="cuda", dtype=torch.int32), tokens)[None]

    def packed(into_slots: bool) -> None:
        dA_cumsum, dtc = parts.chunk_cumsum(pdt, A, chunk)
        own = gpu_ops.chunk_state(pB, px, dtc, dA_cumsum, seq_idx)
        entering, _ = parts.state_passing(
            own.flatten(-2),
            dA_cumsum[:, :, :, -1],
            seq_idx=seq_idx,
            chunk_size=chunk,
            out_dtype=torch.float32,
        )
        entering = entering.unflatten(-1, (p, n))
        cb = parts.bmm_chunk(pC, pB, chunk, seq_idx=seq_idx, output_dtype=torch.float32)
        gpu_ops.chunk_scan(cb, px, dtc, dA_cumsum, pC, entering, D, seq_idx)
        if into_slots:
            gpu_ops.final_states(px[0], pB[0], dtc[0], dA_cumsum[0], entering[0], cu, pool, slots, rows)
        else:
            pool[slots] = chunk_state_varlen(pB[0], px[0], dtc[0], dA_cumsum[0], cu, entering[0])

    header = ["kernel", "calls", "device ms", "share"]
    runs: tuple[tuple[str, Callable[[], object]], ...] = (
        (f"padded {rows} x {width}", padded),
        (f"packed 1 x {rows * tokens:,}, chunk_state_varlen + scatter", partial(packed, False)),
        (f"packed 1 x {rows * tokens:,}, final_states into the slots", partial(packed, True)),
    )
    for name, fn in runs:
        fn()
        ms = sync_time(fn, reps=5) * 1e3
        rep.table(f"one layer's scan stages, {name}: {ms:.2f} ms wall", header, top_kernels(fn))


def top_ops(fn: Callable[[], object], rows: int = 16) -> list[list[str]]:
    """[op, input shapes, calls, self device ms] for the torch ops of one run of fn that launch kernels
    themselves, most device time first: which op (at which shapes) each small kernel comes from."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if _device_us(e) > 0 and "::" in e.key]
    events.sort(key=_device_us, reverse=True)
    return [
        [e.key, str(e.input_shapes)[:90].replace("|", "/"), str(e.count), f"{_device_us(e) / 1e3:.2f}"]
        for e in events[:rows]
    ]


def section_decode(rep: Report, model: str, batch: int = 64) -> None:
    _, ours = build_pair(model)
    runner = GpuModelRunner(ours, batch, "cuda", use_graphs=False)
    tokens, slots = torch.randint(0, VOCAB, (batch,), device="cuda"), list(range(batch))
    rows = top_kernels(lambda: runner.decode(tokens, slots), rows=16)
    rep.table(f"profile: one eager decode step, {model}, batch {batch}", ["kernel", "calls", "device ms", "share"],
              rows)  # fmt: skip


def section_sweep(rep: Report, model: str, length: int, d2d: float) -> None:
    _, ours = build_pair(model)
    cfg = ours.cfg
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    rows = [row for batch in (1, 64, 256) for row in _sweep_ssm(h, p, n, g, batch, d2d)]
    c, k = cfg.conv_dim, cfg.d_conv
    weight = torch.randn(c, 1, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    # a long prompt; a burst's padded rows; a burst's packed row (sequences of 200 tokens from the zero state)
    for b, width, packed in ((1, length, False), (64, 208, False), (1, 8192, True)):
        # the conv reads xBC in place inside the in_proj output [z, xBC, dt] (strided rows), as the runner does
        proj = torch.randn(b, width, cfg.d_in_proj, device="cuda", dtype=torch.bfloat16)
        x = proj[..., cfg.d_inner : cfg.d_inner + c]
        state = torch.randn(b, c, k - 1, device="cuda", dtype=torch.bfloat16)
        start = torch.arange(width, device="cuda") // 200 * 200 if packed else None
        moved = 2 * x.numel() * 2
        for block_l, block_c, warps in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)):

            def conv(
                bl: int = block_l, bc: int = block_c, w: int = warps, x: Tensor = x, state: Tensor = state,
                start: Tensor | None = start,
            ) -> None:  # fmt: skip
                gpu_ops.conv_prefill(x, state, weight, bias, block_l=bl, block_c=bc, num_warps=w, start=start)

            secs = sync_time(conv, reps=5)
            shape = f"{b} x {width}{' packed' if packed else ''}"
            rows.append(["conv_prefill", shape, f"block_l={block_l} block_c={block_c} warps={warps}",
                         f"{secs * 1e6:.1f}", f"{moved / secs / 1e9:,.0f}", f"{moved / secs / 1e9 / d2d:.0%}"])  # fmt: skip
    header = ["kernel", "shape", "config", "us", "GB/s", "of copy bw"]
    rep.table(f"sweep: our Triton kernels, {model} shapes", header, rows)


def section_stages(rep: Report, model: str) -> None:
    """Two stages of the chunked scan at the model's head shapes, mamba-ssm's kernel against ours
    (`gpu_ops.chunk_state`, `gpu_ops.chunk_scan`), device us by `triton.testing.do_bench`: a burst's packed
    row of 41 x 197 tokens (`seq_idx`), and one sequence of 8,192 and of 32,768 tokens."""
    cfg = build_pair(model)[1].cfg  # (first: it registers the stub of mamba-ssm's CUDA extension)
    from mamba_ssm.ops.triton.ssd_combined import (
        _bmm_chunk_fwd,
        _chunk_cumsum_fwd,
        _chunk_scan_fwd,
        _chunk_state_fwd,
        _state_passing_fwd,
    )
    from triton.testing import do_bench

    h, p, n, g, chunk = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups, cfg.chunk_size
    rows = []
    for label, length, packed in (("41 x 197 packed", 41 * 197, True), ("8,192", 8192, False),
                                  ("32,768", 32768, False)):  # fmt: skip
        x = torch.randn(1, length, h, p, device="cuda", dtype=torch.bfloat16)
        B, C = (torch.randn(1, length, g, n, device="cuda", dtype=torch.bfloat16) * n**-0.5 for _ in "BC")
        raw, A = torch.randn(1, length, h, device="cuda") - 2, -torch.rand(h, device="cuda") - 0.5
        D = torch.ones(h, device="cuda")
        seq = torch.arange(length, device="cuda", dtype=torch.int32)[None] // 197 if packed else None
        dA, dt = _chunk_cumsum_fwd(raw, A, chunk, dt_softplus=True)
        own = _chunk_state_fwd(B, x, dt, dA, seq_idx=seq, states_in_fp32=True)
        entering = _state_passing_fwd(own.flatten(-2), dA[..., -1], seq_idx=seq, chunk_size=chunk,
                                      out_dtype=torch.float32)[0].unflatten(-1, (p, n))  # fmt: skip
        cb = _bmm_chunk_fwd(C, B, chunk, seq_idx=seq, output_dtype=torch.float32)
        pairs = {
            "chunk_state": (
                partial(_chunk_state_fwd, B, x, dt, dA, seq_idx=seq, states_in_fp32=True),
                partial(gpu_ops.chunk_state, B, x, dt, dA, seq),
            ),
            "chunk_scan": (
                partial(_chunk_scan_fwd, cb, x, dt, dA, C, entering, D=D, seq_idx=seq),
                partial(gpu_ops.chunk_scan, cb, x, dt, dA, C, entering, D, seq),
            ),
        }
        for stage, (theirs, ours) in pairs.items():
            want = theirs()
            want = want[0] if isinstance(want, tuple) else want  # _chunk_scan_fwd: (out, out_x)
            diff = (ours().float() - want.float()).abs().max().item()
            us = [do_bench(fn, warmup=20, rep=200) * 1e3 for fn in (theirs, ours)]
            rows.append(
                [stage, label, f"{us[0]:.1f}", f"{us[1]:.1f}", f"{us[0] / us[1]:.2f}x", f"{diff:.3g}"]
            )
    header = ["stage", "tokens", "mamba-ssm us", "ours us", "ours faster by", "max abs difference"]
    rep.table(f"the chunked scan's stages, {model} heads ({h} x {p}, state {n}, chunk {chunk})", header, rows)


def _sweep_ssm(h: int, p: int, n: int, g: int, batch: int, d2d: float) -> list[list[str]]:
    state = torch.randn(batch, h, p, n, device="cuda")  # (S, h, p, n) fp32
    x = torch.randn(batch, h, p, device="cuda", dtype=torch.bfloat16)
    dt = torch.randn(batch, h, device="cuda", dtype=torch.bfloat16)
    bias, A = torch.rand(h, device="cuda"), -torch.rand(h, device="cuda")
    B = torch.randn(batch, g, n, device="cuda", dtype=torch.bfloat16)
    C = torch.randn_like(B)
    D, idx = torch.rand(h, device="cuda"), torch.arange(batch, device="cuda", dtype=torch.int32)
    moved = 2 * state.numel() * 4  # read + write of the fp32 state dominates
    rows = []
    for block_p, warps in itertools.product((8, 16, 32), (2, 4, 8)):

        def run(bp: int = block_p, w: int = warps) -> None:
            gpu_ops.ssm_step(state, x, dt, bias, A, B, C, D, idx, block_p=bp, num_warps=w)

        secs = sync_time(run, reps=5)
        gbs = moved / secs / 1e9
        rows.append(["ssm_step", f"b={batch}", f"block_p={block_p} warps={warps}", f"{secs * 1e6:.1f}",
                     f"{gbs:,.0f}", f"{gbs / d2d:.0%}"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mamba2-2.7b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--sections", default="prefill,burst,decode,sweep")
    parser.add_argument("--out", type=Path, default=Path("profile.md"))
    args = parser.parse_args()
    from bench.gpu_bench import copy_bandwidth

    d2d, h2d = copy_bandwidth()
    rep = Report(args.out)
    rep.write(
        ["", f"## GPU profile: {torch.cuda.get_device_name()}, copy {d2d:,.0f} GB/s, H2D {h2d:,.1f} GB/s"]
    )
    sections = args.sections.split(",")
    if "prefill" in sections:
        section_prefill(rep, args.model, args.length)
    if "burst" in sections:
        section_burst(rep, args.model, args.rows, args.tokens)
    if "decode" in sections:
        section_decode(rep, args.model)
    if "sweep" in sections:
        section_sweep(rep, args.model, args.length, d2d)
    if "stages" in sections:
        section_stages(rep, args.model)


if __name__ == "__main__":
    main()
