"""The HTTP side of `bench.hybrid_bench`: conversations on a cache server and a `--no-cache` one (e2e_bench's),
the bytes a conversation's checkpoints take per tier, and the follow-up and bytes tables."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import e2e_bench as e2e
from bench._common import Report, Sample, Texts, ratio
from bench.hybrid_model import model_dtype

TIERS = ("hot", "cold", "disk")


@dataclass
class Served:
    cache: e2e.Server
    plain: e2e.Server
    texts: Texts
    convo: e2e.Plan  # the new tokens of a follow-up turn, the tokens of an answer
    on: e2e.Runs = field(default_factory=dict)  # (length, seed) -> turns on the cache server
    off: e2e.Runs = field(default_factory=dict)  # ... on the --no-cache server

    def talk(self, length: int, seed: int, cache: bool) -> e2e.Turns:
        """A conversation of `length` tokens and its follow-up turn (session e2e-{length}-{seed})."""
        turns = e2e.conversation(self.cache if cache else self.plain, self.texts, self.convo, length, seed)
        (self.on if cache else self.off)[(length, seed)] = turns
        return turns


def tier_metrics(url: str) -> dict[str, dict[str, float]]:
    """tssc_state_cache_{bytes,kv_bytes,checkpoints} per tier, from one /metrics read."""
    names = {
        "tssc_state_cache_bytes": "bytes",
        "tssc_state_cache_kv_bytes": "kv",
        "tssc_state_cache_checkpoints": "n",
    }
    out: dict[str, dict[str, float]] = {t: {"bytes": 0.0, "kv": 0.0, "n": 0.0} for t in TIERS}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            tier = sample.labels.get("tier", "")
            if sample.name in names and tier in out:
                out[tier][names[sample.name]] += float(sample.value)
    return out


def settled_metrics(url: str, tries: int = 20) -> dict[str, dict[str, float]]:
    """`tier_metrics` once two reads 0.25 s apart agree (captures at a request's finish are booked after its
    last chunk, and copies run on a side stream)."""
    last = tier_metrics(url)
    for _ in range(tries):
        time.sleep(0.25)
        now = tier_metrics(url)
        if now == last:
            break
        last = now
    return last


def hybrid_cfg(model_dir: Path) -> Any:
    """The model's config as the server reads it (`HybridConfig`: layer kinds, attention heads)."""
    from server.model.hybrid_archs import hybrid_config
    from server.model.hybrid_config import hybrid_arch
    from server.model.loader import read_raw_config

    raw = read_raw_config(model_dir)
    arch = hybrid_arch(raw)
    assert arch is not None, f"{model_dir} is not a hybrid"
    return hybrid_config(raw, arch)


def kv_token_bytes(model_dir: Path) -> int:
    """Attention KV bytes per token in the model dtype: attention layers x 2 x kv heads x head dim x size."""
    cfg = hybrid_cfg(model_dir)
    return cfg.n_attention * 2 * cfg.attention.n_kv_heads * cfg.attention.head_dim * model_dtype().itemsize


def checkpoint_bytes(served: Served, model_dir: Path, length: int, seed: int) -> dict[str, Any]:
    """A conversation of `length` tokens on the cache server, and what its checkpoints hold per tier: state and
    KV bytes stored (deltas of the tier metrics around it), the KV bytes that a full copy per checkpoint would
    take (session info counts each checkpoint's blocks in full), and sum of positions x KV bytes per token."""
    url = served.cache.url
    before = settled_metrics(url)
    served.talk(length, seed, cache=True)
    after = settled_metrics(url)
    info = httpx.get(f"{url}/v1/sessions/e2e-{length}-{seed}", timeout=30).json()
    per_token = kv_token_bytes(model_dir)
    tiers = {}
    for tier in TIERS:
        positions = [cp["position"] for cp in info["checkpoints"] if tier in cp["tiers"]]
        kv = int(after[tier]["kv"] - before[tier]["kv"])
        state = int(after[tier]["bytes"] - before[tier]["bytes"]) - kv
        full = int(info["bytes"].get(tier, 0)) - state  # every checkpoint's KV blocks counted in full
        if positions:
            tiers[tier] = {
                "checkpoints": len(positions), "positions": positions, "state_bytes": state, "kv_bytes": kv,
                "kv_full_copy_bytes": full, "kv_positions_x_token_bytes": sum(positions) * per_token,
            }  # fmt: skip
    return {"conversation_tokens": length, "kv_token_bytes": per_token, "tiers": tiers}


# ---- tables ---------------------------------------------------------------------------------------

BYTES_HEADER = ["tier", "checkpoints", "deepest position", "SSM state", "KV stored (blocks shared)",
                "KV, a full copy per checkpoint", "full copies / stored",
                "sum of position x KV per token (model dtype)",
                "all stored", "all, with full KV copies"]  # fmt: skip


def fmt_bytes(n: float) -> str:
    from server.engine.factory import format_bytes

    return format_bytes(int(n))


def bytes_table(rep: Report, data: dict[str, Any]) -> None:
    rows = []
    for tier, t in data["tiers"].items():
        state, kv, full = t["state_bytes"], t["kv_bytes"], t["kv_full_copy_bytes"]
        rows.append([
            tier, str(t["checkpoints"]), f"{max(t['positions']):,}", fmt_bytes(state), fmt_bytes(kv),
            fmt_bytes(full), ratio(full, kv), fmt_bytes(t["kv_positions_x_token_bytes"]),
            fmt_bytes(state + kv), fmt_bytes(state + full),
        ])  # fmt: skip
    title = f"checkpoint bytes of one {data['conversation_tokens']:,}-token conversation per tier"
    rep.table(title, BYTES_HEADER, rows)


def followup_tables(rep: Report, served: Served) -> dict[str, Any]:
    """e2e_bench's follow-up and first-turn tables, plus the tokens each follow-up prefilled -> every turn."""
    on, off = served.on, served.off
    rows = e2e.followup_rows(on, off, first=False)
    for row, length in zip(rows, sorted({k[0] for k in on}), strict=True):
        row += [_prefilled(on, length), _prefilled(off, length)]
    title = f"follow-up turn (+{served.convo.followup_new} tokens) TTFT, state cache vs --no-cache"
    extra = ["cache: tokens prefilled", "no-cache: tokens prefilled"]
    rep.table(title, [*e2e.FOLLOWUP_TURN_HEADER, *extra], rows)
    title = "first-turn TTFT (a miss: what capturing costs), state cache vs --no-cache"
    header = [*e2e.FOLLOWUP_HEADER, "cache / no-cache", "runs"]
    rep.table(title, header, e2e.followup_rows(on, off, first=True))
    return {
        f"{length}-{seed}-{'cache' if runs is on else 'no-cache'}": {
            "first": _sample(t.first), "followup": _sample(t.followup)
        }
        for runs in (on, off)
        for (length, seed), t in runs.items()
    }  # fmt: skip


def _prefilled(runs: e2e.Runs, length: int) -> str:
    """Median prompt tokens the follow-up turns of `length` prefilled (their prompt less the cached part)."""
    counts = sorted(
        t.followup.prompt_tokens - t.followup.cached_tokens for k, t in runs.items() if k[0] == length
    )
    return f"{counts[len(counts) // 2]:,}" if counts else "n/a"


def _sample(s: Sample) -> dict[str, Any]:
    return {"ttft_s": s.ttft, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens}
