"""GPU benchmark of the runtime against upstream mamba_ssm, in one process and one run.

    python -m bench.gpu_bench [--quick] [--out BENCHMARKS.md] [--sections abc] [--variants]
                              [--conv-prefill torch|triton] [--decode-models mamba2-2.7b ...]
    python bench/cache_bench.py          # the cache helper's restore/fetch floors: run it in the same call

(a) decode tok/s at batch 1/16/64/256 for random-weight mamba2-130m / 1.3b / 2.7b shapes (bf16), ours
    (CUDA graph per bucket) next to upstream `MambaLMHeadModel.generate(cg=True)` on the same weights,
    and each as a fraction of its HBM roofline (bytes per step over the copy bandwidth measured here);
(b) prefill tok/s at 1k / 8k / 32k tokens against upstream (its generate prefill), with the host time
    of our call (launch overhead), the eager path next to the graph path, and the fixed cost implied by
    the 1k and 8k times;
(c) follow-up-turn TTFT (2.7b) on a 1k / 8k / 32k-token conversation for a hot, cold and disk hit of the
    state cache (`cache.manager.StateCache`) and a full re-prefill, with fetch latency against its floor.
Sections run in the order b, c, a; each table is printed and appended to `--out` (with the card's name)
as soon as it is measured. Needs about 5 minutes on one H100/H200 (the full (a) alone about 4).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._common import Report
from cache.config import CacheConfig
from cache.manager import StateCache
from server.model.config import ModelConfig
from server.model.gpu_layers import ConvPrefill
from server.model.gpu_prefill import GRAPH_PREFILL_MAX
from server.model.gpu_runner import GpuModelRunner
from server.model.kernels import load_kernels
from server.model.lm import MambaLM

log = logging.getLogger("gpu_bench")
SHAPES = {"mamba2-130m": (768, 24), "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}
VOCAB = 50277
NEW_TOKENS = 64  # the follow-up turn's new tokens


def free() -> None:
    """Runners and upstream's graph cache hold reference cycles (graphs -> bound step -> runner): collect them."""
    gc.collect()
    torch.cuda.empty_cache()


def sync_time(fn: Callable[[], object], reps: int = 1) -> float:
    """Median wall seconds of fn() with a device sync on each side."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> tuple[float, float]:
    """(device-to-device GB/s counting read + write, pinned host-to-device GB/s)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    d2d = 2 * a.numel() / sync_time(lambda: b.copy_(a), reps=10) / 1e9
    host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    h2d = host.numel() / sync_time(lambda: a[: host.numel()].copy_(host, non_blocking=True), reps=10) / 1e9
    return d2d, h2d


def build_pair(name: str, vocab: int = VOCAB) -> tuple[Any, MambaLM]:
    """Upstream MambaLMHeadModel with random weights and our MambaLM sharing the same tensors (bf16)."""
    load_kernels()  # registers the selective_scan_cuda stub before mamba_ssm's __init__ runs
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d_model, n_layer = SHAPES[name]
    torch.manual_seed(0)
    up_cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={"layer": "Mamba2"})
    upstream = MambaLMHeadModel(up_cfg, device="cuda", dtype=torch.bfloat16).eval()
    padded = upstream.backbone.embedding.weight.shape[0]
    cfg = ModelConfig(
        arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=padded, unpadded_vocab_size=vocab
    )
    with torch.device("meta"):
        ours = MambaLM(cfg)
    ours.load_state_dict(upstream.state_dict(), assign=True)
    ours.lm_head.weight = ours.backbone.embedding.weight
    return upstream, ours.eval()


def step_bytes(model: MambaLM, batch: int, ssm_bytes: int) -> int:
    """Fewest bytes a decode step moves: weights once (embedding rows aside), states read + written, logits."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.backbone.embedding.weight.numel() * 2 * (0 if cfg.tie_embeddings else 1)
    state = cfg.n_layer * (
        cfg.conv_dim * (cfg.d_conv - 1) * 2 + cfg.nheads * cfg.headdim * cfg.d_state * ssm_bytes
    )
    return weights + batch * (2 * state + cfg.vocab_size * 4)


def upstream_decode(upstream: Any, batch: int, steps: int) -> float:
    """tok/s of generate(cg=True): the difference of two lengths cancels prefill and fixed costs."""
    prompt = torch.randint(0, VOCAB, (batch, 16), device="cuda")
    short, long_ = 16 + 8, 16 + 8 + steps
    upstream.generate(prompt, max_length=long_, cg=True, top_k=1)  # captures the graph for long_
    t_short = sync_time(lambda: upstream.generate(prompt, max_length=short, cg=True, top_k=1), reps=3)
    t_long = sync_time(lambda: upstream.generate(prompt, max_length=long_, cg=True, top_k=1), reps=3)
    upstream._decoding_cache = None
    return batch * steps / (t_long - t_short)


def our_decode(
    model: MambaLM, batch: int, steps: int, ssm_step: str = "tssc", state_dtype: torch.dtype = torch.float32
) -> float:
    runner = GpuModelRunner(model, batch, "cuda", ssm_step=ssm_step, state_dtype=state_dtype)  # type: ignore[arg-type]
    runner.pool.ssm.normal_(0, 0.1)
    runner.pool.conv.normal_(0, 0.1)
    slots = list(range(batch))
    runner.warmup([batch], prefill=False)
    tokens = torch.randint(0, VOCAB, (batch,), device="cuda")

    def run() -> None:
        nonlocal tokens
        for _ in range(steps):
            tokens = runner.decode(tokens, slots).argmax(-1)  # greedy, on the device: no host sync

    run()
    return batch * steps / sync_time(run, reps=3)


def section_decode(rep: Report, models: list[str], batches: list[int], d2d: float, variants: bool) -> None:
    header = ["model", "batch", "upstream tok/s", "ours tok/s", "ratio", "ours (mamba_ssm ssu) tok/s"]
    header += ["ours, bf16 live state, tok/s", "ratio"]
    for name in models:
        rows = []
        upstream, ours = build_pair(name)
        for batch in batches:
            steps = 64 if batch <= 16 else 32
            up = upstream_decode(upstream, batch, steps)
            free()
            mine = our_decode(ours, batch, steps)
            free()
            alt = our_decode(ours, batch, steps, "mamba_ssm") if variants else float("nan")
            free()
            half = our_decode(ours, batch, steps, state_dtype=torch.bfloat16)
            free()
            roof_ours = step_bytes(ours, batch, 4) / (d2d * 1e9)
            roof_up = step_bytes(ours, batch, 2) / (d2d * 1e9)
            rows.append([
                name, str(batch), f"{up:,.0f}", f"{mine:,.0f}", f"{mine / up:.2f}x", f"{alt:,.0f}",
                f"{half:,.0f}", f"{half / up:.2f}x",
                f"{roof_up * up / batch:.0%}", f"{roof_ours * mine / batch:.0%}",
            ])  # fmt: skip
        del upstream, ours
        free()
        rep.table(f"(a) decode, bf16, {name}", [*header, "upstream % roofline", "ours % roofline"], rows)


def upstream_prefill_fn(upstream: Any, length: int) -> Callable[[], None]:
    """One upstream prefill of `length` random tokens (batch 1, logits of the last token only)."""
    from mamba_ssm.utils.generation import InferenceParams

    ids = torch.randint(0, VOCAB, (1, length), device="cuda")
    cache = upstream.allocate_inference_cache(1, length + 1)
    params = InferenceParams(max_seqlen=length + 1, max_batch_size=1, key_value_memory_dict=cache)

    @torch.inference_mode()
    def run() -> None:
        params.seqlen_offset = 0
        upstream(ids, inference_params=params, num_last_tokens=1)

    return run


def upstream_prefill(upstream: Any, length: int, reps: int) -> float:
    run = upstream_prefill_fn(upstream, length)
    run()
    return sync_time(run, reps)


def our_prefill(runner: GpuModelRunner, length: int, reps: int) -> tuple[float, float]:
    """(median seconds, median host seconds of the call before the sync)."""
    tokens = torch.randint(0, VOCAB, (length,)).tolist()
    runner.prefill(tokens, 0)
    host = []
    for _ in range(reps):
        runner.reset(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.prefill(tokens, 0)
        host.append(time.perf_counter() - t0)

    def fresh() -> None:
        runner.reset(0)
        runner.prefill(tokens, 0)

    return sync_time(fresh, reps), sorted(host)[reps // 2]


def section_prefill(rep: Report, models: list[str], lengths: list[int], conv: ConvPrefill) -> None:
    rows = []
    for name in models:
        upstream, ours = build_pair(name)
        runner = GpuModelRunner(ours, 1, "cuda", conv_prefill=conv)
        eager = GpuModelRunner(ours, 1, "cuda", prefill_graphs=False, conv_prefill=conv)
        times: dict[int, float] = {}
        for length in lengths:
            reps = 10 if length <= 1024 else 5 if length <= 8192 else 3
            up = upstream_prefill(upstream, length, reps)
            print(
                f"upstream prefill {length}: {torch.cuda.memory_allocated() / 1e9:.1f} GB allocated",
                flush=True,
            )
            runner.warmup(batch_sizes=[1])  # prefill graphs captured before timing
            mine, host = our_prefill(runner, length, reps)
            graphed = length <= GRAPH_PREFILL_MAX
            plain, plain_host = our_prefill(eager, length, reps) if graphed else (mine, host)
            times[length] = mine
            rows.append([
                name, f"{length:,}", f"{up * 1e3:.1f}", f"{mine * 1e3:.1f}", f"{up / mine:.2f}x",
                f"{length / mine:,.0f}", f"{host * 1e3:.1f}", f"{plain * 1e3:.1f} / {plain_host * 1e3:.1f}",
            ])  # fmt: skip
        if 1024 in times and 8192 in times:
            per_token = (times[8192] - times[1024]) / (8192 - 1024)
            fixed = (times[1024] - 1024 * per_token) * 1e3
            rows.append([name, "fixed cost at 1k", "", f"{fixed:.1f}", "", "", "", ""])
        del eager
        del upstream, ours, runner
        free()
    header = ["model", "tokens", "upstream ms", "ours ms", "speed-up", "ours tok/s", "ours host ms",
              "ours eager ms / host ms"]  # fmt: skip
    rep.table(f"(b) prefill, bf16, batch 1, conv prefill: {conv}", header, rows)


def _cache(tier: str, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], disk: Path) -> StateCache:
    big = 1 << 30
    cfg = CacheConfig(
        hot_bytes=big if tier == "hot" else 0,
        cold_bytes=big,
        disk_dir=disk if tier == "disk" else None,
        disk_bytes=big if tier == "disk" else 0,
        device="cuda",
    )
    return StateCache(cfg, spec)


def followup(runner: GpuModelRunner, tokens: list[int], tier: str, disk: Path) -> tuple[float, float, str]:
    """(TTFT s, fetch s, tier served) of the follow-up turn `tokens` whose first len-64 are saved."""
    cut = len(tokens) - NEW_TOKENS
    if tier == "none":
        runner.reset(0)
        return sync_time(lambda: runner.prefill(tokens, 0)), 0.0, "re-prefill"
    cache = _cache(tier, runner.state_spec(), disk)
    cache.warmup(
        runner.slot_state(0)
    )  # codec kernels compiled outside the timed region, on the slot's strides
    runner.reset(0)
    state = runner.prefill(tokens[:cut], 0, capture_at=[cut]).captures[cut]
    cache.capture("bench", "s", tokens[:cut], state, reason="bench")
    if tier == "disk":
        cache.close(flush=True)
        cache.resize(cold_bytes=0)
    torch.cuda.synchronize()
    lease = cache.lookup("bench", "s", tokens)
    assert lease is not None, "the cache missed"
    t0 = time.perf_counter()
    cache.fetch(lease, out=runner.slot_state(0))  # as the engine restores
    torch.cuda.synchronize()
    fetched = time.perf_counter()
    runner.prefill(tokens[cut:], 0)
    torch.cuda.synchronize()
    done = time.perf_counter()
    cache.release(lease)
    return done - t0, fetched - t0, lease.tier


def section_followup(rep: Report, lengths: list[int], d2d: float, h2d: float, conv: ConvPrefill) -> None:
    _, ours = build_pair("mamba2-2.7b")
    runner = GpuModelRunner(ours, 1, "cuda", conv_prefill=conv)
    spec = runner.state_spec()
    numel = {k: int(torch.Size(shape).numel()) for k, (shape, _) in spec.items()}
    floors = {
        "hot": (sum(numel.values()) * (1 + 4)) / (d2d * 1e9),
        "cold": sum(numel.values()) * 2 / (h2d * 1e9),
    }
    floors["disk"] = floors["cold"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            tokens = torch.randint(0, VOCAB, (length + NEW_TOKENS,)).tolist()
            runner.prefill(tokens[:128], 0)  # warm the kernels
            runner.warmup(batch_sizes=[1])  # capture every prefill graph before anything is timed
            base, _, _ = followup(runner, tokens, "none", Path(tmp))
            for tier in ("hot", "cold", "disk"):
                ttft, fetch, served = followup(runner, tokens, tier, Path(tmp) / f"{tier}{length}")
                floor = floors.get(served, float("nan"))
                rows.append([
                    f"{length:,}", served, f"{ttft * 1e3:.2f}", f"{fetch * 1e3:.2f}", f"{floor * 1e3:.2f}",
                    f"{base / ttft:.1f}x",
                ])  # fmt: skip
            rows.append([f"{length:,}", "re-prefill", f"{base * 1e3:.2f}", "", "", "1.0x"])
    state_mb = sum(numel[k] * (4 if k == "ssm" else 2) for k in numel) / 1e6
    title = f"(c) follow-up turn (+{NEW_TOKENS} tokens), mamba2-2.7b bf16, live state {state_mb:.0f} MB"
    header = [
        "conversation",
        "served from",
        "TTFT ms",
        "fetch into slot ms",
        "fetch floor ms",
        "vs re-prefill",
    ]
    rep.table(title, header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and sizes")
    parser.add_argument("--sections", default="abc")
    parser.add_argument("--variants", action="store_true", help="also time decode with mamba_ssm's ssu")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--conv-prefill", choices=["torch", "triton"], default="triton")
    parser.add_argument("--decode-models", nargs="*", choices=list(SHAPES), help="(a) only for these shapes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kernels = load_kernels()
    d2d, h2d = copy_bandwidth()
    card = torch.cuda.get_device_name()
    rep = Report(args.out)
    rep.write([
        "", f"## GPU runtime vs upstream mamba_ssm: {card}, {datetime.date.today()}", "",
        f"kernels: {kernels.summary()}; torch {torch.__version__}; "
        f"copy bandwidth: device {d2d:,.0f} GB/s (read + write), pinned H2D {h2d:,.1f} GB/s",
    ])  # fmt: skip
    models = ["mamba2-130m", "mamba2-2.7b"] if args.quick else list(SHAPES)
    if "b" in args.sections:
        section_prefill(rep, models, [1024, 8192] if args.quick else [1024, 8192, 32768], args.conv_prefill)
    if "c" in args.sections:
        section_followup(
            rep, [1024, 8192] if args.quick else [1024, 8192, 32768], d2d, h2d, args.conv_prefill
        )
    if "a" in args.sections:
        decode_models = args.decode_models or models
        section_decode(rep, decode_models, [1, 64] if args.quick else [1, 16, 64, 256], d2d, args.variants)


if __name__ == "__main__":
    main()
